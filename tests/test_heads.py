"""Classification heads (issue 17): transformers-written Starcoder2ForSequenceClassification /
ForTokenClassification checkpoints (2 and 5 labels, two body shapes) against transformers in
PyTorch, ONNX Runtime (both flavours) and OpenVINO with padded batches; pipelines equal to
transformers' pipelines on the same texts and tokenizer; quantize, parity, CLI and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import starlift
from starlift.core.errors import CheckpointError, ConfigError, UsageError
from starlift.export import export_checkpoint
from starlift.model import Starcoder2Config, bundled_checkpoints, last_non_pad_index, load_checkpoint
from starlift.quantize import quantize_artifact
from starlift.runtimes.classifiers import create_classifier
from starlift.runtimes.onnx_metadata import all_nodes
from tests.conftest import TINY, TINY_VARIANTS

TOL = 1e-4
NANO_TOKENIZER = bundled_checkpoints()["starcoder2-nano"] / "tokenizer.json"
SEQ, TOK = "Starcoder2ForSequenceClassification", "Starcoder2ForTokenClassification"
PAD = 0  # <|endoftext|> in the StarCoder2 tokenizer
# name -> (architecture, labels, body overrides): two body shapes (GQA with window 16; one KV head,
# no biases, window 5), 2 and 5 labels; vocabulary and tokenizer of starcoder2-nano (8192).
SHAPE_B = TINY_VARIANTS["gqa4-nobias"]
HEADS = {
    "seq2": (SEQ, None, dict(vocab_size=8192, pad_token_id=PAD)),  # transformers' default labels
    "tok5": (TOK, ["O", "B-VAR", "I-VAR", "B-CALL", "I-CALL"], dict(vocab_size=8192, pad_token_id=PAD)),
    "seq5": (SEQ, [f"q{i}" for i in range(5)], dict(SHAPE_B, vocab_size=8192, pad_token_id=PAD)),
    "tok2": (TOK, ["keep", "drop"], dict(SHAPE_B, vocab_size=8192, pad_token_id=PAD, token_classification_bias=False)),
}
TEXTS = ["def add(a, b):\n    return a + b\n", "import os", "x = [i ** 2 for i in range(10)]  # squares",
         "class Point:\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n"]


def write_head_checkpoint(path: Path, architecture: str, labels: list[str] | None, seed: int = 0,
                          tokenizer: Path | None = None, **overrides) -> Path:
    """A random classifier saved by transformers' own save_pretrained (biases, norms and the score
    randomized so that every parameter matters and the labels are not all one)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (test extra)")
    torch.manual_seed(seed)
    kw = {**TINY, "initializer_range": 0.3, **overrides}
    if labels is not None:
        kw.update(id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    model = getattr(transformers, architecture)(transformers.Starcoder2Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / "tokenizer.json")
    return path


def load_hf(path: Path):
    import transformers

    config = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def head_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    return {name: write_head_checkpoint(root / name, arch, labels, seed=i, tokenizer=NANO_TOKENIZER, **body)
            for i, (name, (arch, labels, body)) in enumerate(HEADS.items())}


# Exports are the slow part (tracing): one per checkpoint, chosen so that each head, each body
# shape and each label count runs on both flavours (and OpenVINO on the portable ones).
EXPORTS = [("seq2", "portable"), ("tok5", "ort"), ("seq5", "ort"), ("tok2", "portable")]


class _Artifacts(dict):
    """(name, flavour) -> artifact folder, exported on first use."""

    def __init__(self, checkpoints, root):
        super().__init__()
        self.checkpoints, self.root = checkpoints, root

    def __missing__(self, key):
        name, flavour = key
        out = self.root / f"{name}-{flavour}"
        export_checkpoint(self.checkpoints[name], out, flavour=flavour, progress=False)
        self[key] = out
        return out


@pytest.fixture(scope="session")
def head_artifacts(head_checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    return _Artifacts(head_checkpoints, tmp_path_factory.mktemp("head-artifacts"))


def padded(vocab: int, seed: int = 0, length: int = 23) -> tuple[np.ndarray, np.ndarray]:
    """Four rows: full, left-padded, right-padded, and a short row padded on both ends of the range."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(4, length)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, (left, right) in enumerate([(0, 0), (6, 0), (0, 9), (0, length - 3)]):
        mask[row, :left] = 0
        mask[row, length - right:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def hf_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # transformers' own call: positions 0..T-1 whatever the padding
        return hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def assert_close(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    keep = mask.astype(bool) if ours.ndim == 3 else np.ones(len(ours), bool)
    err = np.abs(ours - theirs)[keep].max()
    assert err <= TOL, err


# ---- the reference model ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HEADS))
def test_reference_matches_transformers_with_padding(name, head_checkpoints):
    path = head_checkpoints[name]
    ours, hf = load_checkpoint(path), load_hf(path)
    arch, labels, body = HEADS[name]
    assert type(ours).__name__ == arch and ours.config.head.num_labels == len(labels or [0, 1])
    assert ours.config.head.labels == tuple(hf.config.id2label[i] for i in range(len(hf.config.id2label)))
    ids, mask = padded(ours.config.vocab_size)
    with torch.no_grad():
        got, _ = ours(torch.from_numpy(ids), torch.from_numpy(mask))
    expected = hf_logits(hf, ids, mask)
    assert_close(got.numpy(), expected, mask)
    if arch == SEQ:  # pooled where transformers pools: each padded row equals the row alone
        for row in range(len(ids)):
            real = ids[row][mask[row].astype(bool)]
            with torch.no_grad():
                alone, _ = ours(torch.from_numpy(real[None]))
            assert np.abs(alone[0].numpy() - got[row].numpy()).max() <= TOL
    else:
        assert (ours.score.bias is None) == (name == "tok2")  # token_classification_bias: false


def test_pooling_reads_pad_tokens_like_transformers():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 0, 6, 0, 0], [0, 0, 0, 0, 0]])
    assert last_non_pad_index(ids, 0).tolist() == [2, 4, 2, 0]
    assert last_non_pad_index(ids, None).tolist() == [4, 4, 4, 4]


def test_no_pad_token_refuses_batches_like_transformers(tmp_path):
    path = write_head_checkpoint(tmp_path / "nopad", SEQ, None, seed=9)
    ours, hf = load_checkpoint(path), load_hf(path)
    assert ours.config.pad_token_id is None
    ids = torch.randint(1, 99, (2, 10))
    with pytest.raises(ValueError, match="no padding token"):
        hf(ids)
    with pytest.raises(UsageError, match="no pad_token_id"):
        ours(ids)
    with torch.no_grad():  # one row: the last token, as transformers takes it
        assert (ours(ids[:1])[0] - hf(ids[:1]).logits).abs().max().item() <= TOL
    with create_classifier("torch", path) as runner:
        with pytest.raises(UsageError, match="one text at a time"):
            runner.infer(ids.numpy(), np.ones((2, 10), np.int64))
        assert runner.infer(ids[:1].numpy(), np.ones((1, 10), np.int64)).shape == (1, 2)


# ---- exported artifacts ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,flavour", EXPORTS)
def test_artifacts_match_transformers_on_onnxruntime_and_openvino(name, flavour, head_checkpoints, head_artifacts):
    artifact = head_artifacts[name, flavour]
    hf = load_hf(head_checkpoints[name])
    ids, mask = padded(hf.config.vocab_size, seed=1)
    expected = hf_logits(hf, ids, mask)
    backends = ["onnxruntime"] + (["openvino"] if flavour == "portable" else [])
    if "openvino" in backends:
        pytest.importorskip("openvino", reason="openvino is a test extra")
    for backend in backends:
        with create_classifier(backend, artifact) as runner:
            assert_close(runner.infer(ids, mask), expected, mask)
    manifest = json.loads((artifact / "manifest.json").read_text())
    arch, labels, _ = HEADS[name]
    assert manifest["task"] == ("text-classification" if arch == SEQ else "token-classification")
    assert manifest["head"]["labels"] == list(hf.config.id2label[i] for i in range(hf.config.num_labels))
    assert manifest["validation"]["passed"] and manifest["kv_cache"] is None
    if flavour == "ort":  # the same fused body as the causal LM's ort flavour
        assert manifest["fusions"]["group_query_attention"] == 2 and manifest["fusions"]["rotary_embedding"] == 4


@pytest.mark.slow
def test_head_graph_contract(head_artifacts):
    import onnx

    for name, flavour in EXPORTS:
        artifact = head_artifacts[name, flavour]
        graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
        assert [o.name for o in graph.output] == ["logits"]
        dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
        labels = 2 if name.endswith("2") else 5
        assert dims[-1] == labels and len(dims) == (2 if name.startswith("seq") else 3)
        if flavour == "portable":
            assert all(n.domain in ("", "ai.onnx") for n in graph.node)
        names = {i.name for i in graph.initializer}
        assert "score.weight.T" in names and not any("lm_head" in n for n in names)
        assert not (artifact / "genai_config.json").exists()  # onnxruntime-genai runs decoders only


# ---- pipelines against transformers' pipelines -----------------------------------------------

def _hf_pipeline(task, checkpoint):
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    return transformers.pipeline(task, model=load_hf(checkpoint), tokenizer=tokenizer)


def _same(ours, theirs):
    """Equal structure, keys and non-score values; scores within 1e-5."""
    theirs = json.loads(json.dumps(theirs, default=float))
    if isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (ours, theirs)
        for a, b in zip(ours, theirs, strict=True):
            _same(a, b)
        return
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key == "score":
            assert abs(ours[key] - value) <= 1e-5, (ours, theirs)
        else:
            assert ours[key] == value, (key, ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_text_classification_pipeline_equals_transformers(backend, head_checkpoints, head_artifacts):
    ckpt = head_checkpoints["seq2"]
    theirs = _hf_pipeline("text-classification", ckpt)
    model = head_artifacts["seq2", "portable"] if backend == "onnxruntime" else ckpt
    ours = starlift.pipeline("text-classification", model=model, backend=backend, batch_size=3)
    assert len({theirs(t)[0]["label"] for t in TEXTS}) == 2  # both labels occur: the comparison can fail
    for kwargs in [{}, {"top_k": 1}, {"top_k": None}, {"top_k": None, "function_to_apply": "sigmoid"}]:
        _same(ours(TEXTS[0], **kwargs), theirs(TEXTS[0], **kwargs))
        _same(ours(TEXTS, **kwargs), theirs(TEXTS, **kwargs))


@pytest.mark.slow
def test_token_classification_pipeline_equals_transformers(head_checkpoints, head_artifacts):
    ckpt = head_checkpoints["tok5"]
    theirs = _hf_pipeline("token-classification", ckpt)
    ours = starlift.pipeline("token-classification", model=head_artifacts["tok5", "ort"])
    everything = theirs(TEXTS, ignore_labels=[])
    assert len({e["entity"] for row in everything for e in row}) >= 3  # varied labels: the test can fail
    for kwargs in [{}, {"ignore_labels": []}, {"aggregation_strategy": "simple"},
                   {"aggregation_strategy": "simple", "ignore_labels": []}]:
        _same(ours(TEXTS[3], **kwargs), theirs(TEXTS[3], **kwargs))
        _same(ours(TEXTS, **kwargs), theirs(TEXTS, **kwargs))
    pytest.importorskip("openvino", reason="openvino is a test extra")
    theirs = _hf_pipeline("token-classification", head_checkpoints["tok2"])  # no "O": every token is listed
    pipe = starlift.pipeline("ner", model=head_artifacts["tok2", "portable"], backend="openvino")
    _same(pipe(TEXTS), theirs(TEXTS))
    _same(pipe(TEXTS, aggregation_strategy="simple"), theirs(TEXTS, aggregation_strategy="simple"))


@pytest.mark.slow
def test_pipelines_refuse_wrong_task_and_bad_arguments(tmp_path, head_artifacts, head_checkpoints):
    with pytest.raises(UsageError, match="is a token-classification model"):
        starlift.pipeline("text-classification", model=head_artifacts["tok5", "ort"])
    with pytest.raises(UsageError, match="not a text generator"):
        starlift.load(head_artifacts["seq5", "ort"])
    pipe = starlift.pipeline("token-classification", model=head_artifacts["tok5", "ort"])
    with pytest.raises(UsageError, match="aggregation_strategy 'first' is not supported"):
        pipe("x = 1", aggregation_strategy="first")
    with pytest.raises(UsageError, match="text pairs"):
        starlift.pipeline("text-classification", model=head_artifacts["seq5", "ort"])({"text": "a", "text_pair": "b"})
    with pytest.raises(UsageError, match="more than the model's context of 512"):
        starlift.pipeline("text-classification", model=head_artifacts["seq5", "ort"])("x = 1\n" * 300)
    bare = shutil.copytree(head_checkpoints["seq5"], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match="has no tokenizer.json"):
        starlift.pipeline("text-classification", model=bare, backend="torch")


# ---- quantize, parity, CLI -------------------------------------------------------------------

@pytest.mark.slow
def test_quantized_classifier_keeps_its_head_and_is_judged_on_labels(tmp_path, head_artifacts):
    import onnx

    src = head_artifacts["tok5", "ort"]
    manifest = quantize_artifact(src, tmp_path / "int8", mode="int8", progress=False)
    q = manifest["quality"]
    assert q["task"] == "token-classification" and q["rows"] > 1000  # every token of the samples
    assert q["label_agreement"] >= 0.98 and q["passed"] and manifest["quantization"]["head_bits"] == 32
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False).graph
    kept = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == "score.weight.T"]
    assert len(kept) == 1  # the head stays a float MatMul; the body's MatMuls are 8-bit
    assert {n.op_type for n in all_nodes(graph)} >= {"MatMulNBits", "GroupQueryAttention"}
    manifest = quantize_artifact(src, tmp_path / "int4", mode="int4", head_bits=8,
                                                   allow_quality_loss=True, progress=False)
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type == "MatMulNBits"}
    assert sorted(set(bits.values())) == [4, 8] and list(bits.values()).count(8) == 1
    with create_classifier("onnxruntime", tmp_path / "int4") as runner:
        assert np.isfinite(runner.infer(*padded(8192))).all()
    with pytest.raises(UsageError, match="8 bits or in float"):
        quantize_artifact(src, tmp_path / "h4", mode="int4", head_bits=4, progress=False)


@pytest.mark.slow
def test_parity_and_classify_commands(tmp_path, head_checkpoints, head_artifacts, capsys):
    from starlift.cli import main
    from starlift.evaluation import parity

    artifact, ckpt = head_artifacts["seq2", "portable"], head_checkpoints["seq2"]
    report_path = tmp_path / "parity.json"
    assert main(["parity", str(artifact), "--reference", str(ckpt), "--backend", "onnxruntime",
                 "--backend", "openvino", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["task"] == "text-classification" and report["samples"] == 48
    assert report["backends"]["openvino"]["max_abs_error"] <= TOL
    # a reference whose head differs: the gate fails and says why
    from safetensors.torch import load_file, save_file

    other = shutil.copytree(ckpt, tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    tensors["score.weight"] = tensors["score.weight"].flip(0)  # the two labels swapped
    save_file(tensors, other / "model.safetensors")
    bad = parity.run(artifact, other, ["onnxruntime"])
    assert not bad["passed"] and not bad["backends"]["onnxruntime"]["checks"]["label_agreement"]["passed"]
    assert "FAIL" in parity.format_table(bad)
    capsys.readouterr()
    assert main(["classify", str(artifact), "--text", TEXTS[0], "--text", TEXTS[1], "--all", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    theirs = _hf_pipeline("text-classification", ckpt)(TEXTS[:2], top_k=None)
    _same(printed, theirs)
    assert main(["classify", str(head_artifacts["tok5", "ort"]), "--text", TEXTS[0], "--aggregation", "simple"]) == 0
    assert main(["classify", str(artifact)]) == 2  # no text


# ---- strict loading --------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    ({"architectures": ["Starcoder2ForQuestionAnswering"]}, "unsupported architectures"),
    ({"architectures": [SEQ, TOK]}, "exactly one of"),
    ({"id2label": {"0": "a", "2": "b"}}, "every label id 0..n-1"),
    ({"id2label": {"0": "a", "1": "b"}, "num_labels": 3}, "num_labels=3 but id2label names 2"),
    ({"problem_type": "ranking"}, "problem_type='ranking'"),
    ({"token_classification_bias": False}, "applies to Starcoder2ForTokenClassification only"),
    ({"architectures": ["Starcoder2ForCausalLM"], "problem_type": "regression"}, "no classification head"),
])
def test_head_config_errors_are_named(change, match):
    cfg = {**Starcoder2Config().to_hf(), "architectures": [SEQ], **change}
    with pytest.raises(ConfigError, match=match):
        Starcoder2Config.from_hf(cfg)


def test_head_config_roundtrip_and_defaults(head_checkpoints):
    config = Starcoder2Config.from_hf(head_checkpoints["tok2"])
    assert config.task == "token-classification" and config.head.labels == ("keep", "drop")
    assert not config.head.bias and Starcoder2Config.from_hf(config.to_hf()) == config
    default = Starcoder2Config.from_hf(head_checkpoints["seq2"])  # transformers writes no id2label for 2 labels
    assert default.head.labels == ("LABEL_0", "LABEL_1")
    n = sum(p.numel() for p in load_checkpoint(head_checkpoints["tok2"]).parameters())
    assert config.num_parameters() == n
    # transformers 4.x wrote id2label into causal-LM configs too: ignored there
    causal = {**Starcoder2Config().to_hf(), "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}
    assert Starcoder2Config.from_hf(causal).head is None


def test_score_weight_is_loaded_strictly(tmp_path, head_checkpoints):
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(head_checkpoints["seq5"], tmp_path / "broken")
    tensors = load_file(ckpt / "model.safetensors")
    score = tensors.pop("score.weight")
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) score.weight"):
        load_checkpoint(ckpt)
    tensors["score.weight"] = score[:3]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'score.weight' has shape \(3, 32\).*\(5, 32\)"):
        load_checkpoint(ckpt)
    tensors["score.weight"], tensors["lm_head.weight"] = score, torch.zeros(99, 32)
    save_file(tensors, ckpt / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'lm_head.weight'"):
        load_checkpoint(ckpt)
