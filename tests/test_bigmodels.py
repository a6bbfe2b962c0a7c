"""Big models on ordinary machines (issue 19), on the tiny shape: the memory estimator refuses
what cannot fit, export validates a cut graph that still catches a wrong graph, streaming int4
from an fp16 artifact quantizes every MatMul as onnxruntime's own quantizer does, and random
checkpoints stream into shards with the same values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from starlift.core import memory, tolerance
from starlift.core.artifact import verify
from starlift.core.errors import MemoryBudgetError, UsageError
from starlift.export import export_checkpoint
from starlift.quantize import quantize_artifact
from tests.conftest import write_hf_checkpoint

pytestmark = pytest.mark.slow  # the slow tier: `make test-slow` (CI runs both)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 3 layers, so that a cut after 1 or 2 layers leaves some out; blocks of 32 fit hidden 64
    return write_hf_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", seed=7, vocab_size=256, hidden_size=64,
                               intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, initializer_range=0.1)


@pytest.fixture(scope="module")
def fp16_cut(ckpt, tmp_path_factory):
    """An fp16 ort export validated on the graph cut after 2 of its 3 layers, built in a child
    process as big models are (``isolate``: the tiny shape would be built in-process)."""
    out = tmp_path_factory.mktemp("fp16") / "ort"
    export_checkpoint(ckpt, out, flavour="ort", dtype="fp16", validate_layers=2, progress=False, isolate=True)
    return out


def test_estimates_grow_with_the_model_and_the_budget_refuses(ckpt, tmp_path):
    from starlift.model.config import PRESETS

    seven, fifteen = PRESETS["starcoder2-7b"].to_hf(), PRESETS["starcoder2-15b"].to_hf()
    w7 = memory.model_sizes(seven)["params"] * 2
    cut, whole = (memory.estimate_export(seven, "fp16", validate_layers=n, checkpoint_dtype="fp16") for n in (2, 0))
    # the whole-graph check holds fp32 copies of every fp16 weight; a cut does not, and the save
    # drops the checkpoint's pages as it goes (measured 7b: 3.75 GB for 14.4 GB of weights)
    assert cut < 0.4 * w7 < 2.5 * w7 < whole
    assert memory.estimate_export(fifteen, "fp16", validate_layers=2) > cut
    stream = memory.estimate_quantize(seven, "fp16", "int4", quality_layers=2, streaming=True, eval_tokens=1024)
    assert stream < 0.5 * w7 < memory.estimate_quantize(seven, "fp32", "int4", quality_layers=0, streaming=False)
    # generation: at or above what the 7b int4 session measured (7.10 GB for 16 tokens,
    # docs/performance/bigmodels.md), and a long prompt costs more than a short one
    assert 7.10e9 <= memory.estimate_run(seven, "int4", tokens=16) < memory.estimate_run(seven, "int4", tokens=2048)
    assert memory.parse_size("1.5G") == int(1.5 * memory.GIB) and memory.parse_size("800MiB") == 800 << 20
    with pytest.raises(UsageError, match="not a size"):
        memory.parse_size("lots")
    with pytest.raises(MemoryBudgetError, match=r"export needs about .* GiB .* --max-memory is 0\.00 GiB") as e:
        export_checkpoint(ckpt, tmp_path / "x", max_memory=1 << 20, progress=False)
    assert "--validate-layers" in str(e.value) and not (tmp_path / "x").exists()
    assert memory.available_bytes() is None or memory.available_bytes() > 0


def test_cut_validation_is_recorded_with_stage_peaks(fp16_cut):
    manifest = verify(fp16_cut)
    v = manifest["validation"]
    assert v["passed"] and v["graph"] == "cut" and v["layers"] == 2 and v["of_layers"] == 3
    assert v["max_abs_error"] <= v["tolerance"]
    assert not (fp16_cut / "validate-cut.onnx").exists()
    mem = manifest["build_memory"]
    peaks = mem["peak_rss_bytes"]
    assert {"load", "reference", "trace", "save", "validate", "package"} <= set(peaks)
    # the build ran in a child (torch was there, not here): every stage sample is the sum of the
    # two processes, at most the sum of their high-water marks
    assert mem["isolated_build"] and mem["build_process_peak_rss_bytes"] > 100 << 20
    assert max(v for k, v in peaks.items() if k != "process_peak") <= (
        peaks["process_peak"] + mem["build_process_peak_rss_bytes"])
    assert "exited before" in v["processes"]


def test_an_isolated_build_reports_its_errors_with_their_type(ckpt, tmp_path):
    import json
    import shutil

    from starlift.core.errors import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))  # the weights say 96
    with pytest.raises(CheckpointError, match="config.json implies"):
        export_checkpoint(broken, tmp_path / "never", progress=False, isolate=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing half-written


def test_a_cut_graph_against_the_wrong_reference_fails(fp16_cut, ckpt):
    """The cut check can fail: the graph cut after 1 layer against the 2-layer torch model."""
    from starlift.core import graphcut as cut
    from starlift.export import validate
    from starlift.model import load_checkpoint

    case = validate.make_case(256, steps=2)
    path = cut.write_cut(fp16_cut / "model.onnx", 1, fp16_cut / "cut1.onnx")
    try:
        got = validate.onnx_logits(str(path), case, np.float16)
    finally:
        path.unlink()
    right = validate.reference_logits(load_checkpoint(ckpt, dtype="fp16", num_layers=1), case)
    wrong = validate.reference_logits(load_checkpoint(ckpt, dtype="fp16", num_layers=2), case)
    shape = tolerance.Shape(num_layers=1, width=96)  # the cut's depth, the model's widest dot product
    assert validate.compare(right, got, case.mask, case.prompt_len, "fp16", shape)["passed"]
    assert not validate.compare(wrong, got, case.mask, case.prompt_len, "fp16", shape)["passed"]


def test_cut_of_the_fused_fp32_graph(nano_ort):
    """fp32 ort graphs fuse the residual and the previous layer's bias into SkipLayerNormalization:
    the cut carries them to the final norm (trained nano: a wrong cut is far off)."""
    from starlift.core import graphcut as cut
    from starlift.export import validate
    from starlift.model import load_checkpoint
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    case = validate.make_case(8192, steps=2)
    for layers in (1, 3):
        path = cut.write_cut(nano_ort / "model.onnx", layers, nano_ort / f"cut{layers}.onnx")
        try:
            got = validate.onnx_logits(str(path), case, np.float32)
            # logits_to_keep survives the cut (its Slice sits between the final norm and the head)
            ids = case.ids[:1, :case.prompt_len]
            with OnnxRuntimeRunner(path) as runner:
                assert runner._has_keep
                last = runner.single_batch(1).forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None],
                                                      logits_to_keep=1)
            assert last.shape == (1, 1, 8192)
            np.testing.assert_allclose(last[0, 0], got[0][0, case.prompt_len - 1], atol=1e-3)
        finally:
            path.unlink()
        model = load_checkpoint("starcoder2-nano", num_layers=layers)
        ref, shape = validate.reference_logits(model, case), tolerance.Shape.of(model.config)
        assert validate.compare(ref, got, case.mask, case.prompt_len, "fp32", shape)["passed"], layers


def test_streaming_int4_from_fp16_matches_onnxruntimes_quantizer(fp16_cut, ckpt, tmp_path):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    out = tmp_path / "int4"
    m = quantize_artifact(fp16_cut, out, mode="int4", progress=False, allow_quality_loss=True, quality_layers=1,
                          eval_windows=1)
    assert verify(out)["precision"] == "int4" and m["dtype"] == "fp16" and m["quantization"]["streaming"]
    assert m["quality"]["graph"] == "cut" and m["quality"]["finite"] and m["quality"]["tokens"] > 50
    src = onnx.load(str(fp16_cut / "model.onnx"))
    q = onnx.load(str(out / "model.onnx"))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in src.graph.initializer}
    qinit = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    # every layer's six MatMuls (q, k, v, o, c_fc, c_proj) and the head; no float weight is multiplied any more
    assert len(nbits) == 3 * 6 + 1 == m["quantization"]["matmuls"] + m["quantization"]["head"]
    assert not [n for n in q.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in qinit]
    node = next(n for n in nbits if "mlp/c_fc" in n.name or "c_fc" in n.input[1])
    source = node.input[1].removesuffix("_Q4")
    ref = mnq.DefaultWeightOnlyQuantizer(mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4))
    packed, scales, zero_points = ref.qbits_block_quant(weights[source])
    assert np.array_equal(qinit[node.input[1]], packed) and np.array_equal(qinit[node.input[2]], scales)
    assert np.array_equal(qinit[node.input[3]], zero_points) and qinit[node.input[2]].dtype == np.float16
    # it runs, next to the fp16 source
    ids = np.random.default_rng(0).integers(40, 256, size=(1, 24))
    logits = []
    for path in (fp16_cut, out):
        with OnnxRuntimeRunner(path / "model.onnx") as runner:
            logits.append(runner.single_batch(1).forward(ids, np.ones_like(ids), np.arange(24)[None])[0])
    assert np.isfinite(logits[1]).all() and 0 < np.abs(logits[0] - logits[1]).max() < 1.0
    # parity against a reference run in fp16 (a 7b fp32 reference does not fit 24 GiB): the bounds
    # widen by exactly the fp16 reference's own bound, and the report says which reference ran
    from starlift.evaluation import parity

    kw = {"windows": 1, "window_tokens": 48, "steps": 4, "greedy_steps": 4}
    fp32, fp16 = (parity.run(out, ckpt, ["onnxruntime"], reference_dtype=d, **kw) for d in ("fp32", "fp16"))
    assert fp16["reference_dtype"] == "fp16" and fp16["backends"]["onnxruntime"]["finite"]
    shape = tolerance.Shape(3, 96)
    widened = [r["backends"]["onnxruntime"]["checks"]["max_abs_error"]["tolerance"] for r in (fp32, fp16)]
    assert widened[1] > widened[0]
    assert tolerance.reference_allowance("int4", shape, 10.0, "fp16") == pytest.approx(
        tolerance.reference_allowance("int4", shape, 10.0) + tolerance.bound("fp16", shape, 10.0))
    with pytest.raises(UsageError, match="--localize"):
        parity.run(out, ckpt, ["onnxruntime"], reference_dtype="fp16", localize=True, **kw)


def test_streaming_refuses_what_it_cannot_do(fp16_cut, tmp_path):
    with pytest.raises(UsageError, match="int4/int8 weight-only RTN"):
        quantize_artifact(fp16_cut, tmp_path / "x", mode="int4", algo="hqq", progress=False)
    with pytest.raises(UsageError, match="quality-layers"):
        quantize_artifact(fp16_cut, tmp_path / "x", mode="int4", quality_layers=3, progress=False)
    with pytest.raises(MemoryBudgetError, match="quantize needs about"):
        quantize_artifact(fp16_cut, tmp_path / "x", mode="int4", max_memory=1 << 20, progress=False)
    assert not (tmp_path / "x").exists()


def test_streamed_random_checkpoint_has_the_same_values(tmp_path):
    from starlift.model import checkpoint, load_checkpoint
    from starlift.model.config import PRESETS

    checkpoint._stream_random_checkpoint(PRESETS["tiny"], tmp_path / "s", 3, torch.float16, 20_000, False, None)
    assert len(list((tmp_path / "s").glob("model-*-of-*.safetensors"))) > 1
    streamed, made = load_checkpoint(tmp_path / "s").state_dict(), checkpoint.init_random(
        PRESETS["tiny"], 3, torch.float16).state_dict()
    assert streamed.keys() == made.keys() and all(torch.equal(streamed[k], made[k]) for k in made)


def test_fp16_weights_computed_in_fp32_are_the_fp32_model_of_those_weights(ckpt):
    """parity's big-model reference: fp16 weights (half the memory) cast per use, activations and
    cache in fp32; the numbers are those of an fp32 model of the same (fp16-rounded) weights."""
    from starlift.model import load_checkpoint
    from starlift.runtimes.torch_runner import TorchRunner

    ids = torch.randint(40, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    mixed = load_checkpoint(ckpt, dtype="fp16", compute_dtype="fp32")
    exact = load_checkpoint(ckpt, dtype="fp16").float()
    assert next(mixed.parameters()).dtype == torch.float16
    with torch.no_grad():
        (a, past), (b, _) = mixed(ids), exact(ids)
    assert torch.equal(a, b) and past[0][0].dtype == torch.float32
    with TorchRunner(ckpt, dtype="fp16", compute_dtype="fp32") as runner:
        assert runner.meta.kv_dtype == np.float32
