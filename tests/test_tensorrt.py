"""TensorRT runner: graph checks, optimization profiles and the engine cache key run everywhere;
building and running an engine needs TensorRT and an NVIDIA GPU and skips without them."""

from __future__ import annotations

import importlib.util
import itertools
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from starlift.core.errors import StarliftError, UsageError
from starlift.export import export_checkpoint
from starlift.runtimes.tensorrt_runner import (
    DECODE,
    DEFAULT_CACHE_DIR,
    PREFILL,
    TensorRTRunner,
    _write_atomic,
    check_portable_onnx,
    choose_profile,
    decoder_io,
    engine_cache_key,
    engine_cache_path,
    onnx_sha256,
    profile_shapes,
)

pytestmark = pytest.mark.slow  # the slow tier: `make test-slow` (CI runs both)

TRT_SKIP_REASON = ("TensorRT is not installed here (not on this machine's package index) and no NVIDIA GPU: "
                   "the TensorRT runner is unverified")


def require_tensorrt_gpu():
    """Skip unless TensorRT imports and cuda-python sees a CUDA device."""
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP_REASON)
    try:
        from starlift.runtimes.tensorrt_runner import _import_cudart

        cudart = _import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        ok = err == cudart.cudaError_t.cudaSuccess and count > 0
    except StarliftError:
        ok = False
    if not ok:
        pytest.skip(f"no CUDA device visible to cuda-python: {TRT_SKIP_REASON}")
    return trt


@pytest.fixture(scope="module")
def portable(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "portable"
    export_checkpoint(tiny_checkpoint, out, flavour="portable", progress=False, validate_steps=1)
    return out


@pytest.fixture(scope="module")
def ort_flavour(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "ort"
    export_checkpoint(tiny_checkpoint, out, flavour="ort", progress=False, validate_steps=1)
    return out


def onnx_inputs(path) -> dict[str, tuple]:
    """The inputs TensorRT's parser builds a profile for: an input that also has an initializer
    (logits_to_keep, default 0) is read as a constant weight there, not as a network input."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim)
            for i in graph.input if i.name not in weights}


# ---- graph checks ---------------------------------------------------------------------------
def test_portable_artifact_passes(portable):
    check_portable_onnx(portable / "model.onnx")


def test_ort_flavour_rejected_naming_the_contrib_op(ort_flavour):
    graph = onnx.load(str(ort_flavour / "model.onnx"), load_external_data=False).graph
    contrib = {f"com.microsoft::{n.op_type}" for n in graph.node if n.domain == "com.microsoft"}
    assert contrib, "the ort flavour is expected to hold com.microsoft ops"
    with pytest.raises(StarliftError) as e:
        check_portable_onnx(ort_flavour / "model.onnx")
    message = str(e.value)
    assert "TensorRT cannot run" in message and "--flavour portable" in message
    assert all(op in message for op in contrib), (contrib, message)


def test_control_flow_rejected(tmp_path):
    def branch(name, value):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])
        const = helper.make_node("Constant", [], [f"{name}_out"],
                                 value=helper.make_tensor(f"{name}_v", TensorProto.FLOAT, [1], [value]))
        return helper.make_graph([const], name, [], [out])

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 0.0))
    graph = helper.make_graph([node], "if_graph", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    with pytest.raises(StarliftError, match=r"control flow \(If\).*--flavour portable"):
        check_portable_onnx(path)


def test_missing_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="model.onnx"):
        check_portable_onnx(tmp_path / "model.onnx")


def test_decoder_io(portable):
    meta = decoder_io(portable / "model.onnx")
    assert (meta.num_layers, meta.kv_heads, meta.head_dim, meta.vocab_size) == (2, 2, 8, 99)
    assert meta.kv_dtype == np.float32 and meta.context == 512


# ---- optimization profiles ------------------------------------------------------------------
def test_profiles_match_onnx_inputs(portable):
    meta = decoder_io(portable / "model.onnx")
    inputs = onnx_inputs(portable / "model.onnx")
    profiles = profile_shapes(meta.num_layers, meta.kv_heads, meta.head_dim, max_batch=4, max_context=64,
                              max_prefill=16)
    assert len(profiles) == 2
    for shapes in profiles:
        assert set(shapes) == set(inputs)
        for name, (lo, opt, hi) in shapes.items():
            assert len(lo) == len(opt) == len(hi) == len(inputs[name]), name
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (name, lo, opt, hi)
            for dim, static in enumerate(inputs[name]):  # static ONNX dims are pinned to their value
                if static is not None:
                    assert lo[dim] == opt[dim] == hi[dim] == static, (name, dim)
        assert shapes["attention_mask"][2][1] == 64  # the mask reaches max_context
        assert shapes["input_ids"][2][0] == 4  # and the batch max_batch


def test_profiles_cover_prefill_and_decode():
    layers, context, prefill = 2, 24, 6
    profiles = profile_shapes(layers, 2, 8, max_batch=3, max_context=context, max_prefill=prefill)
    pre, dec = profiles[PREFILL], profiles[DECODE]
    assert pre["input_ids"][1][1] == prefill and pre["past_key_values.0.key"][1][2] == 0  # opt: a full prompt
    assert all(shape[1] == 1 for shape in dec["input_ids"])  # decode: exactly one new token
    assert dec["past_key_values.1.value"][1][2] > 0  # opt: a decode step on a filled cache

    def inside(shapes, batch, tokens, past):
        wanted = {"input_ids": (batch, tokens), "position_ids": (batch, tokens),
                  "attention_mask": (batch, past + tokens)}
        wanted.update({f"past_key_values.{i}.{kv}": (batch, 2, past, 8) for i in range(layers)
                       for kv in ("key", "value")})
        return all(all(lo <= d <= hi for lo, d, hi in zip(shapes[n][0], shape, shapes[n][2], strict=True))
                   for n, shape in wanted.items())

    # every call the runner accepts (tokens <= max_prefill, past + tokens <= max_context) fits its profile
    for batch, tokens in itertools.product((1, 3), range(1, prefill + 1)):
        for past in range(0, context - tokens + 1):
            profile = choose_profile(tokens, past)
            assert inside(profiles[profile], batch, tokens, past), (batch, tokens, past, profile)
    assert choose_profile(5, 0) == choose_profile(1, 0) == choose_profile(4, 9) == PREFILL
    assert choose_profile(1, 9) == DECODE


@pytest.mark.parametrize("bad", [dict(max_batch=0), dict(max_prefill=65), dict(max_context=0)])
def test_profile_arguments_checked(bad):
    args = dict(num_layers=2, kv_heads=2, head_dim=8, max_batch=4, max_context=64, max_prefill=16) | bad
    with pytest.raises(UsageError):
        profile_shapes(**args)


# ---- engine cache -----------------------------------------------------------------------------
def test_cache_key_stable_and_sensitive():
    profiles = profile_shapes(2, 2, 8, 4, 64, 16)
    base = dict(onnx_sha256="a" * 64, trt_version="10.13.0", gpu_name="NVIDIA L4", profiles=profiles)
    key = engine_cache_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert engine_cache_key(**base) == key
    assert engine_cache_key(**{**base, "profiles": profile_shapes(2, 2, 8, 4, 64, 16)}) == key
    changed = [dict(onnx_sha256="b" * 64), dict(trt_version="11.0.0"), dict(gpu_name="NVIDIA H100"),
               dict(profiles=profile_shapes(2, 2, 8, 4, 128, 16)), dict(profiles=profile_shapes(2, 2, 8, 8, 64, 16))]
    keys = {engine_cache_key(**{**base, **c}) for c in changed}
    assert key not in keys and len(keys) == len(changed)


def test_cache_path(tmp_path):
    assert engine_cache_path(tmp_path, "k") == tmp_path / "k.engine"
    default = engine_cache_path(None, "k")
    assert default == DEFAULT_CACHE_DIR.expanduser() / "k.engine" and default.is_absolute()
    assert default.parent.parts[-3:] == (".cache", "starlift", "tensorrt")


def test_onnx_digest_covers_external_weights(portable, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(portable, copy)
    digest = onnx_sha256(copy / "model.onnx")
    assert digest == onnx_sha256(portable / "model.onnx")
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[-1] ^= 0xFF  # same graph, different weights: the cached engine must not be reused
    (copy / "model.onnx.data").write_bytes(bytes(data))
    assert onnx_sha256(copy / "model.onnx") != digest


def test_engine_written_atomically(tmp_path):
    path = tmp_path / "cache" / "k.engine"
    _write_atomic(path, b"plan")
    _write_atomic(path, b"plan2")
    assert path.read_bytes() == b"plan2"
    assert [p.name for p in path.parent.iterdir()] == ["k.engine"]  # no temporary left behind


# ---- the runner -------------------------------------------------------------------------------
def test_runner_options(portable, tmp_path):
    runner = TensorRTRunner(portable / "model.onnx")
    assert (runner.max_context, runner.max_prefill, runner.max_batch) == (512, 512, 8)
    assert TensorRTRunner(portable / "model.onnx", max_context=64).max_prefill == 64
    with pytest.raises(UsageError, match="max_context"):
        TensorRTRunner(tmp_path / "model.onnx")  # no config.json to read the context from
    with pytest.raises(UsageError):
        TensorRTRunner(portable / "model.onnx", max_context=32, max_prefill=64)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is importable here: the missing-library message cannot be exercised")
def test_activate_without_tensorrt_says_so(portable, tmp_path):
    runner = TensorRTRunner(portable / "model.onnx", cache_dir=tmp_path)
    with pytest.raises(StarliftError, match="needs TensorRT and an NVIDIA GPU; pip install tensorrt"):
        runner.activate()
    assert not runner.is_active and not list(tmp_path.iterdir())


def test_matches_onnxruntime(portable, tmp_path):
    """Prefill 7 tokens then 10 decode steps, batch 2 with left padding: logits within 1e-3 of ORT."""
    require_tensorrt_gpu()
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner
    from tests.helpers import positions

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 99, size=(2, 17), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    pos = positions(mask)
    chunks = [(0, 7)] + [(s, s + 1) for s in range(7, 17)]
    results = []
    for runner in (OnnxRuntimeRunner(portable / "model.onnx"),
                   TensorRTRunner(portable / "model.onnx", cache_dir=tmp_path, max_batch=2, max_context=32,
                                  max_prefill=8)):
        with runner:
            single = runner.single_batch(2)
            results.append(np.concatenate([single.forward(ids[:, a:b], mask[:, :b], pos[:, a:b])
                                           for a, b in chunks], axis=1))
    expected, got = results
    assert got.shape == expected.shape == (2, 17, 99) and got.dtype == np.float32
    real = mask.astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-3
    (engine,) = tmp_path.glob("*.engine")  # built once and cached
    built = engine.stat().st_mtime_ns
    with TensorRTRunner(portable / "model.onnx", cache_dir=tmp_path, max_batch=2, max_context=32,
                        max_prefill=8) as again:
        assert again.engine_path == engine
        single = again.single_batch(2)
        assert np.abs(single.forward(ids[:, :7], mask[:, :7], pos[:, :7]) - expected[:, :7])[real[:, :7]].max() <= 1e-3
    assert engine.stat().st_mtime_ns == built  # loaded from the cache, not rebuilt
