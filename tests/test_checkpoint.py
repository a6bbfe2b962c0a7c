"""Checkpoint folders: sharded and single files, memory-mapped loading, strict errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from starlift.core.errors import CheckpointError, ConfigError, UsageError
from starlift.model import Starcoder2Config, load_checkpoint, random_checkpoint, save_checkpoint
from tests.conftest import load_hf, write_hf_checkpoint


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_weights_are_views_of_one_memory_map(tiny_checkpoint):
    from starlift.model.checkpoint import read_safetensors_header

    model = load_checkpoint(tiny_checkpoint)
    header, _ = read_safetensors_header(tiny_checkpoint / "model.safetensors")
    params = dict(model.named_parameters())
    names = [n for n in header if n in params]
    base = params[names[0]].data_ptr() - header[names[0]]["data_offsets"][0]
    # Every weight sits at its file offset inside one mapping: views, not copies.
    for name in names:
        assert params[name].data_ptr() - base == header[name]["data_offsets"][0], name


def test_sharded_checkpoint_loads_and_matches(tmp_path, tiny_checkpoint):
    import transformers

    ref = load_hf(tiny_checkpoint)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 99, (1, 12))
    with torch.no_grad():
        a, _ = load_checkpoint(sharded)(ids)
        b = load_checkpoint(tiny_checkpoint)(ids)[0]
    assert torch.equal(a, b)
    del transformers


def test_save_checkpoint_is_read_by_transformers(tmp_path, tiny_checkpoint):
    ours = load_checkpoint(tiny_checkpoint)
    out = save_checkpoint(ours, tmp_path / "resaved", max_shard_bytes=10_000)
    ref = load_hf(out)
    ids = torch.randint(0, 99, (1, 20))
    with torch.no_grad():
        assert (ours(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-4


def test_random_checkpoint_deterministic(tmp_path):
    a = random_checkpoint("tiny", tmp_path / "a", seed=7)
    b = random_checkpoint("tiny", tmp_path / "b", seed=7)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "lm_head.weight" not in ta  # tied: stored once
    with pytest.raises(UsageError, match="not empty"):
        random_checkpoint("tiny", tmp_path / "a", seed=7)
    with pytest.raises(UsageError, match="unknown preset"):
        random_checkpoint("huge", tmp_path / "c")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(UsageError, match="neither a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_non_starcoder2_config(tmp_path, tiny_checkpoint):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("key,value,match", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("hidden_act", "relu", "hidden_act"),
    ("norm_type", "rms_norm", "norm_type"),
    ("some_new_feature", True, "some_new_feature"),
])
def test_unsupported_settings_are_named(key, value, match):
    cfg = Starcoder2Config().to_hf()
    cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        Starcoder2Config.from_hf(cfg)


def test_real_starcoder2_3b_style_config_reads():
    cfg = {"architectures": ["Starcoder2ForCausalLM"], "attention_dropout": 0.1, "residual_dropout": 0.1,
           "embedding_dropout": 0.1, "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu_pytorch_tanh",
           "hidden_size": 3072, "initializer_range": 0.018042, "intermediate_size": 12288,
           "max_position_embeddings": 16384, "mlp_type": "default", "model_type": "starcoder2",
           "norm_epsilon": 1e-05, "norm_type": "layer_norm", "num_attention_heads": 24, "num_hidden_layers": 30,
           "num_key_value_heads": 2, "rope_theta": 999999.4420358813, "sliding_window": 4096,
           "torch_dtype": "bfloat16", "transformers_version": "4.37.0.dev0", "use_bias": True, "use_cache": True,
           "vocab_size": 49152}
    config = Starcoder2Config.from_hf(cfg)
    from starlift.model import preset

    p = preset("starcoder2-3b")
    assert (config.hidden_size, config.num_key_value_heads, config.rope_theta, config.sliding_window) == \
        (p.hidden_size, p.num_key_value_heads, p.rope_theta, p.sliding_window)
    assert config.num_parameters() == p.num_parameters()


def test_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "missing")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.c_fc.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.mlp.c_fc.weight"):
        load_checkpoint(ckpt)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tiny_checkpoint):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "shape")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \(8, 32\), but config.json implies \(16, 32\)"):
        load_checkpoint(ckpt)


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_checkpoint):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "trunc")
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt)
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="header length"):
        load_checkpoint(ckpt)


def test_pickle_refused_unless_allowed(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    torch.save(load_file(tiny_checkpoint / "model.safetensors"), ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint(ckpt)
    model = load_checkpoint(ckpt, allow_pickle=True)
    ids = torch.randint(0, 99, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], load_checkpoint(tiny_checkpoint)(ids)[0])


def test_no_weights(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "noweights"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="has no weights"):
        load_checkpoint(ckpt)


def test_load_as_other_dtype(tiny_checkpoint):
    m = load_checkpoint(tiny_checkpoint, dtype="bf16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    with pytest.raises(UsageError, match="unknown dtype"):
        load_checkpoint(tiny_checkpoint, dtype="int3")


def test_hf_written_checkpoint_with_tokenizer(tmp_path, shared_tokenizer):
    path = write_hf_checkpoint(tmp_path / "withtok", tokenizer=shared_tokenizer, vocab_size=49152)
    from starlift.model import Tokenizer

    assert Tokenizer.from_pretrained(path).vocab_size == 49152
