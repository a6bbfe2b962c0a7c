"""Export: both flavours against transformers over a crossed sliding window, the portable
contract, OpenVINO, onnxruntime-genai, half precisions, size, verify, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from starlift.core.artifact import verify
from starlift.core.errors import ArtifactError, CheckpointError, ConfigError, UsageError
from starlift.export import export_checkpoint
from tests.conftest import load_hf, write_hf_checkpoint
from tests.helpers import OpenVinoDecoder, OrtDecoder, genai_greedy, hf_full_logits, padded_ids

TOL = 1e-4
LAYERS = 4  # conftest's tiny_exports


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """Window 16, weights large enough that greedy decoding does not collapse to one token."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("varied") / "ckpt", seed=11, initializer_range=0.3)


@pytest.fixture(scope="module")
def exported_checkpoint(tiny_exports):
    """The checkpoint behind ``exported``: the session's 4-layer tiny one (window 16, conftest)."""
    return tiny_exports[0]


@pytest.fixture(scope="module")
def hf(exported_checkpoint):
    return load_hf(exported_checkpoint)


@pytest.fixture(scope="module")
def exported(tiny_exports):
    """flavour -> the checkpoint's fp32 artifact, exported once per session (conftest's
    tiny_exports, which the parity and localization tests read too; read-only: a test that
    damages an artifact copies it first)."""
    return tiny_exports[1].__getitem__


@pytest.fixture(scope="module", params=["portable", "ort"])
def artifact(request, exported):
    return exported(request.param)


def test_teacher_forced_decode_crosses_window(artifact, hf):
    """10-token prefill then 85 single-token steps with window 16: every step within 1e-4."""
    ids, mask = padded_ids([95], 99, seed=5)
    expected = hf_full_logits(hf, ids, mask)
    got = OrtDecoder(artifact / "model.onnx").run_chunks(ids, mask, [10] + [1] * 85)
    per_step = np.abs(got - expected).max(axis=(0, 2))
    assert per_step.shape == (95,) and per_step.max() <= TOL, per_step.max()
    # a window-less model would differ past the window: the test can tell
    assert hf.config.sliding_window == 16


def test_left_padded_batch_decode(artifact, hf):
    ids, mask = padded_ids([60, 41], 99, seed=6)
    expected = hf_full_logits(hf, ids, mask)
    got = OrtDecoder(artifact / "model.onnx").run_chunks(ids, mask, [30] + [1] * 30)
    real = mask.astype(bool)
    assert np.abs(got - expected)[real].max() <= TOL


def test_manifest_and_configs(artifact):
    manifest = verify(artifact)
    assert manifest["format"] == "starlift-artifact/1"
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "config.json", "generation_config.json",
                                      "genai_config.json"}
    assert manifest["validation"]["passed"] and manifest["validation"]["max_abs_error"] <= TOL
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "starlift"}
    assert "model.safetensors" in manifest["source"]["files"]
    # fp32 from an fp32 checkpoint: the save read every weight from the file, not from the model
    assert manifest["build_memory"]["weights_from_file_bytes"] == manifest["size"]["weight_bytes"]
    genai = json.loads((artifact / "genai_config.json").read_text())
    assert genai["model"]["type"] == "decoder"
    assert 0 <= genai["model"]["eos_token_id"] < 99
    # shared only where the graph updates the cache in place (GroupQueryAttention)
    assert genai["search"]["past_present_share_buffer"] is (manifest["flavour"] == "ort")
    assert genai["model"]["decoder"]["num_key_value_heads"] == 2


def test_portable_contract(exported):
    out = exported("portable")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    assert not {op for _, op in ops} & {"If", "Loop", "Scan"}
    names = [i.name for i in model.graph.input]
    assert names == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")] + ["logits_to_keep"]
    # logits_to_keep is optional: an initializer holding 0 (every position) gives it its default
    init = next(t for t in model.graph.initializer if t.name == "logits_to_keep")
    default = onnx.numpy_helper.to_array(init, base_dir=str(out))
    assert default.shape == () and default.dtype == np.int64 and int(default) == 0
    assert [o.name for o in model.graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    types = {i.name: i.type.tensor_type for i in model.graph.input}
    assert types["input_ids"].elem_type == onnx.TensorProto.INT64
    assert types["attention_mask"].elem_type == onnx.TensorProto.INT64
    kv = types["past_key_values.0.key"]
    assert kv.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in kv.shape.dim]
    assert dims[1] == 2 and dims[3] == 8  # kv heads and head dim are static
    assert isinstance(dims[0], str) and isinstance(dims[2], str)  # dynamic batch and past


def test_openvino_runs_portable_with_parity(exported, hf):
    pytest.importorskip("openvino", reason="openvino is a test extra")
    out = exported("portable")
    ids, mask = padded_ids([70, 52], 99, seed=8)
    expected = hf_full_logits(hf, ids, mask)
    got = OpenVinoDecoder(out / "model.onnx").run_chunks(ids, mask, [20] + [1] * 50)
    assert np.abs(got - expected)[mask.astype(bool)].max() <= TOL


def test_logits_to_keep_equals_the_full_logits_last_positions(artifact, hf):
    """The graph's logits_to_keep input: the last N positions of the full logits (both flavours,
    ONNX Runtime, and OpenVINO on the portable graph), equal to the last positions of transformers' logits;
    not feeding it keeps every position."""
    import torch

    from starlift.runtimes import create_runner

    ids, mask = padded_ids([30, 21], 99, seed=4)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        # the last 3 of transformers' full logits: its own argument is `num_logits_to_keep` before
        # 4.50 and `logits_to_keep` after, and the floors CI step runs 4.48
        hf_last = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos)).logits.numpy()[:, -3:]
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    assert "logits_to_keep" in [i.name for i in graph.input]  # in the graph, not only cut by the runner
    # the slice sits inside the last layer (export/trace.py hoists it): the output projection and
    # the MLP run on the kept positions, the residual stream is cut where the layer adds to it
    starts = {o for n in graph.node if n.name == "/model/logits_to_keep/Start" for o in n.output}
    kept = [n for n in graph.node if n.op_type == "Slice" and n.input[1] in starts]
    readers = {n.op_type for n in graph.node for k in kept if k.output[0] in n.input}
    assert len(kept) == 2 and "MatMul" in readers, (len(kept), readers)
    portable = json.loads((artifact / "manifest.json").read_text())["flavour"] == "portable"
    backends = ["onnxruntime"] + (["openvino"] if portable and _has("openvino") else [])
    for backend in backends:
        with create_runner(backend, artifact) as runner:
            full = runner.single_batch(2).forward(ids, mask, pos)
            assert full.shape == (2, 30, 99)  # the default: every position
            for keep in (1, 3, 30, 45):
                last = runner.single_batch(2).forward(ids, mask, pos, logits_to_keep=keep)
                assert last.shape == (2, min(keep, 30), 99), (backend, keep)
                assert np.abs(last - full[:, -last.shape[1]:]).max() <= 1e-5, (backend, keep)
                # the graph itself computed only those positions (not cut afterwards)
                graph_logits, _ = runner._run_impl(ids, mask, pos, runner.empty_past(2), keep)
                assert graph_logits.shape[1] == min(keep, 30), (backend, keep)
                if keep == 3:
                    assert np.abs(last - hf_last).max() <= TOL, backend
            # a decode step after a last-1 prefill continues the same cache
            single = runner.single_batch(2)
            single.forward(ids, mask, pos, logits_to_keep=1)
            step = single.forward(ids[:, -1:], np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1,
                                  logits_to_keep=1)
            single = runner.single_batch(2)
            single.forward(ids, mask, pos, logits_to_keep=1)
            again = single.forward(ids[:, -1:], np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1)
            assert step.shape == again.shape == (2, 1, 99) and np.abs(step - again).max() <= 1e-5


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _greedy_reference(hf, prompt, steps, eos):
    import torch

    ids = torch.tensor([prompt])
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(hf(ids).logits[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if nxt == eos:
            break
    return ids[0].tolist()


def test_onnxruntime_genai_greedy_equals_transformers(artifact, hf):
    prompt = [5, 17, 42, 8, 61, 23]
    expected = _greedy_reference(hf, prompt, 40, eos=hf.config.eos_token_id)
    assert genai_greedy(artifact, prompt, 40) == expected
    assert len(set(expected[len(prompt):])) >= 3  # a greedy run that does not collapse to one token


@pytest.mark.slow
@pytest.mark.parametrize("dtype,flavour", [("fp16", "portable"), ("fp16", "ort"), ("bf16", "portable")])
def test_half_precision_exports(tmp_path, varied_checkpoint, dtype, flavour):
    out = tmp_path / dtype
    manifest = export_checkpoint(varied_checkpoint, out, dtype=dtype, flavour=flavour, progress=False)
    assert manifest["dtype"] == dtype
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs["logits"] == onnx.TensorProto.FLOAT  # logits in fp32
    expected_kv = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    assert outputs["present.0.key"] == expected_kv
    v = manifest["validation"]
    if dtype == "fp16":
        assert v["finite"] and v["passed"]
        if flavour == "ort":  # fused RoPE on fp16 activations, angle caches cast from fp32
            assert manifest["fusions"]["rotary_embedding"] == 4
        ids, mask = padded_ids([50], 99, seed=9)
        logits = OrtDecoder(out / "model.onnx", np.float16).run_chunks(ids, mask, [20] + [1] * 30)
        assert np.isfinite(logits).all()
    else:
        pytest.importorskip("openvino", reason="bf16 runs on OpenVINO here (ORT CPU has no bf16 kernels)")
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(out / "model.onnx")), "CPU")
        ids, mask = padded_ids([12], 99, seed=9)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(12)[None]}
        for i in range(2):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = ov.Tensor(ov.Type.bf16, [1, 2, 0, 8])
        res = compiled(feed)
        logits = next(v for k, v in res.items() if "logits" in k.get_names())  # a port may carry several names
        assert np.isfinite(logits).all()


@pytest.mark.slow
def test_tied_embedding_stored_once_and_size_ratio(tmp_path):
    ckpt = write_hf_checkpoint(tmp_path / "mid", seed=2, vocab_size=8192, hidden_size=128, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "mid-onnx"
    manifest = export_checkpoint(ckpt, out, progress=False)
    assert manifest["size"]["ratio"] <= 1.05, manifest["size"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [(i.name, list(i.dims)) for i in model.graph.initializer if 8192 in i.dims]
    assert big == [("model.embed_tokens.weight", [8192, 128])]


def test_verify_fails_on_flipped_byte_and_bad_names(tmp_path, exported):
    out = tmp_path / "v"
    shutil.copytree(exported("portable"), out)
    verify(out)
    data = out / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        verify(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["../escape"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify(out)


def _no_litter(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".starlift-tmp")]


def test_bad_inputs_leave_nothing(tmp_path, varied_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(varied_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="truncated"):
        export_checkpoint(broken, tmp_path / "o1", progress=False)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        export_checkpoint(broken, tmp_path / "o2", progress=False)
    cfg = json.loads((varied_checkpoint / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'gpt2'"):
        export_checkpoint(broken, tmp_path / "o3", progress=False)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="--force"):
        export_checkpoint(varied_checkpoint, existing, progress=False)
    assert (existing / "keep.txt").read_text() == "precious"
    with pytest.raises(UsageError, match="cannot write"):
        export_checkpoint(varied_checkpoint, "/proc/starlift-cannot-write-here", progress=False)
    with pytest.raises(UsageError, match="cannot write"):
        export_checkpoint(varied_checkpoint, tmp_path / "exists" / "keep.txt" / "x", progress=False)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))
    assert _no_litter(tmp_path)


@pytest.mark.slow
def test_failed_validation_removes_artifact(tmp_path, varied_checkpoint, monkeypatch):
    """A graph that disagrees with the reference fails the export and leaves nothing behind."""
    from starlift.core import tolerance

    monkeypatch.setattr(tolerance, "SAFETY", 0.0)  # an impossible bound: any rounding fails it
    from starlift.core.errors import ParityError

    with pytest.raises(ParityError, match="artifact was removed"):
        export_checkpoint(varied_checkpoint, tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict").exists() and _no_litter(tmp_path)


def test_attention_fast_path_runs_where_no_row_is_padded(exported):
    """The If picks the kernel without the bias and the window for an unpadded prompt within the
    window (seen in ORT's profile), the full kernel for a left-padded batch and past the window;
    a row gets the same logits either way."""
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    out = exported("ort")
    ids, mask = padded_ids([12, 7], 99, seed=3)
    with OnnxRuntimeRunner(out / "model.onnx", profile=True) as runner:
        alone = runner.single_batch(1).forward(ids[1:, 5:], mask[1:, 5:], np.arange(7)[None])
        padded = runner.single_batch(2).forward(ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0))
        past = runner.single_batch(1)  # 20 positions: past the window of 16
        past.forward(ids[:1], mask[:1], np.arange(12)[None])
        past.forward(ids[:1, :8], np.ones((1, 20), np.int64), np.arange(12, 20)[None])
        trace = json.loads(Path(runner.end_profiling()).read_text())
    ran = [e["name"] for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    attention = [n.removesuffix("_kernel_time") for n in ran if "GroupQueryAttention" in n]
    fast = [n for n in attention if n.endswith("_no_padding")]
    full = [n for n in attention if not n.endswith(("_no_padding", "_if"))]
    # fast: the prompt alone, the first 12 positions; full: the padded batch, the step past the window
    assert len(fast) == 2 * LAYERS and len(full) == 2 * LAYERS, ran
    np.testing.assert_allclose(alone[0], padded[1, -7:], atol=1e-4)


def test_ort_flavour_uses_group_query_attention_with_the_window(exported):
    out = exported("ort")
    manifest = verify(out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    # each layer's attention is an If: a kernel without the padding bias and the window for
    # prompts that need neither (then), the full one otherwise (else)
    branches = [n for n in model.graph.node if n.op_type == "If"]
    assert len(branches) == LAYERS and manifest["fusions"]["attention_fast_path"] == LAYERS
    assert {n.input[0] for n in branches} == {"attention_fast_path"}
    sub = {a.name: a.g for a in branches[0].attribute}
    fast, gqa = ([n for n in sub[b].node if n.op_type == "GroupQueryAttention"] for b in ("then_branch", "else_branch"))
    assert len(fast) == len(gqa) == 1 and manifest["fusions"]["group_query_attention"] == LAYERS
    assert [n.op_type for n in sub["else_branch"].node] == ["Expand", "GroupQueryAttention"]  # bias built here only
    gqa = [next(n for n in {a.name: a.g for a in b.attribute}["else_branch"].node if n.op_type == "GroupQueryAttention")
           for b in branches]
    assert manifest["kv_cache"]["shared_buffer"] is True and manifest["kv_cache"]["per_row_lengths"] is True
    assert {p.key: p.value for p in model.metadata_props}["starlift.kv_cache.per_row_lengths"] == "true"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["local_window_size"] == 16 and attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    fast_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fast[0].attribute}
    assert fast_attrs == {**attrs, "local_window_size": -1} and len(fast[0].input) == 7  # no bias input
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]  # the attention really was replaced
    # RoPE: one RotaryEmbedding per q and per k, fed by the projections; no rotate-half left
    rope = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rope) == 2 * LAYERS and manifest["fusions"]["rotary_embedding"] == 2 * LAYERS
    assert {n.input[1] for n in rope} == {"position_ids"}
    assert not [n for n in model.graph.node if n.op_type in ("Neg", "Transpose")
                and not n.name.startswith("/model/logits_to_keep/")]  # its Neg makes the slice start
    producer = {o: n for n in model.graph.node for o in n.output}  # values go in as projected: no reshapes
    assert {producer[g.input[2]].op_type for g in gqa} <= {"Add", "MatMul"}
    assert not [n for n in model.graph.node if n.op_type == "Expand"]  # no bias built outside the else branch
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(out / "model.onnx") as runner:  # a case ORT's kernel cannot do: a clear error
        single = runner.single_batch(2)
        ids, mask = padded_ids([6, 6], 99)
        single.forward(ids[:, :3], mask[:, :3], np.broadcast_to(np.arange(3), (2, 3)))
        with pytest.raises(UsageError, match="prefill each batch in one call"):
            single.forward(ids[:, 3:], mask, np.broadcast_to(np.arange(3, 6), (2, 3)))


def test_ort_flavour_slot_pool_rows_have_their_own_lengths(exported, hf):
    """The ORT runner's slot pool (GQA graphs): one preallocated buffer per layer, bound as past
    and present, updated in place (the same memory every step once grown), two rows of
    different lengths decoded in one step; each row's logits equal transformers' for that
    sequence alone, across the window and through buffer growth (capacity 8 -> 128)."""
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    out = exported("ort")
    rng = np.random.default_rng(12)
    seqs = [rng.integers(1, 99, size=70), rng.integers(1, 99, size=57)]
    prompt = [20, 7]
    with OnnxRuntimeRunner(out / "model.onnx", initial_capacity=8) as runner:
        assert runner.shared_kv
        cache = runner.create_cache(2)
        assert cache.kind == "slots"
        cache.add(0)
        cache.add(1)
        got = [[cache.prefill(i, s[:p], all_logits=True)] for i, (s, p) in enumerate(zip(seqs, prompt, strict=True))]
        cache.join(0)
        cache.join(1)
        pointers = set()
        for t in range(50):
            logits = cache.decode(np.array([seqs[0][20 + t], seqs[1][7 + t]]))
            for i in range(2):
                got[i].append(logits[i:i + 1].copy())
            if cache.capacity == 128:
                pointers.add(cache._buffers[0].ctypes.data)
        assert len(pointers) == 1 and cache._buffers[0].shape[2] == 128
    for i, s in enumerate(seqs):
        expected = hf_full_logits(hf, s[None], np.ones((1, len(s)), np.int64))[0]
        assert np.abs(np.concatenate(got[i]) - expected).max() <= TOL
    portable = exported("portable")
    with pytest.raises(UsageError, match="export with --flavour ort"):
        OnnxRuntimeRunner(portable / "model.onnx", kv_buffer="shared").activate()


def test_onnxruntime_genai_batch_of_unequal_prompts_equals_transformers(artifact, hf):
    """A batch of unequal prompts through genai (right-padded with pad_token_id, genai's
    convention; for the ort flavour one preallocated KV buffer is shared): the unpadded row's
    greedy tokens equal transformers' for that prompt alone across the window; the padded row's
    equal them while the sequence fits the window. Past it they may not: the sliding window
    counts cache slots (as transformers' does for a padded batch), so the padding between a
    short prompt and its generated tokens takes part of that row's window (seen on this
    checkpoint: the 20th token differs, by a logit margin of 0.6)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test extra")
    prompts = [[5, 17, 42, 8, 61, 23, 9, 30], [11, 4, 77]]
    steps = 30
    width = max(map(len, prompts))
    pad = json.loads((artifact / "genai_config.json").read_text())["model"]["pad_token_id"]
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + steps, do_sample=False, batch_size=2)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    for row, prompt in enumerate(prompts):
        expected = _greedy_reference(hf, prompt, steps, eos=hf.config.eos_token_id)
        sequence = [int(t) for t in gen.get_sequence(row)]
        got = prompt + sequence[width:]  # genai keeps the padding between prompt and generated tokens
        upto = len(expected) if len(prompt) == width else hf.config.sliding_window
        assert got[:upto] == expected[:upto]
        assert len(got) >= len(expected)


@pytest.mark.slow
def test_ort_flavour_refuses_a_partly_fused_graph(varied_checkpoint):
    """The ort flavour's manifest promises an in-place KV buffer for every layer: a graph where
    fewer GroupQueryAttention (or RotaryEmbedding) nodes than layers were fused is an error, not
    an artifact. Here the config claims one layer more than the traced graph has."""
    import dataclasses

    from starlift.core.errors import StarliftError
    from starlift.export import flavours
    from starlift.export.trace import trace
    from starlift.model import Starcoder2Config, load_checkpoint

    config = Starcoder2Config.from_hf(varied_checkpoint)
    graph = flavours.optimize_portable(trace(load_checkpoint(varied_checkpoint), opset=18))
    with pytest.raises(StarliftError, match="fused 2 GroupQueryAttention and 4 RotaryEmbedding nodes for 3 layers"):
        flavours.to_ort(graph, dataclasses.replace(config, num_hidden_layers=3))
