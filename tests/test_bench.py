"""A smoke run of `starlift bench` on a tiny model: the output's shape only (speed is not tested), and the
optimum-onnx peer: its rows, its parity with transformers, its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from starlift.export import export_checkpoint
from tests.conftest import REPO, write_hf_checkpoint

EXTRA = {"openvino": "the openvino row needs starlift[openvino]", "onnxruntime_genai": "the genai peer needs "
         "starlift[genai]", "transformers": "the transformers peer needs starlift[bench]"}


def _needs(*modules):
    for module in modules:
        pytest.importorskip(module, reason=EXTRA[module])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The module's tiny checkpoint (read-only)."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", seed=1)


@pytest.fixture(scope="module")
def art(ckpt):
    """Its portable artifact, exported once (read-only)."""
    export_checkpoint(ckpt, ckpt.parent / "art", progress=False)
    return ckpt.parent / "art"


@pytest.mark.slow
def test_bench_smoke(tmp_path, ckpt, art):
    _needs("openvino", "onnxruntime_genai", "transformers")
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "bench", str(art), "--backend", "onnxruntime", "--backend",
                           "openvino", "--prompt-len", "8", "--new-tokens", "4", "--batch", "1,2", "--reps", "1",
                           "--positions", "8,32", "--peers", str(ckpt), "--genai", "--json", str(tmp_path / "b.json"),
                           "--plot", str(tmp_path / "b.png"), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["backend"] for r in report["results"]] == ["onnxruntime", "openvino", "transformers",
                                                         "onnxruntime-genai"]
    for r in report["results"]:
        assert r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0
        assert set(r["throughput_tokens_per_s"]) == {"1", "2"}
        assert set(r["latency_by_position_s"]) == ({"8", "32"} if r["backend"] != "onnxruntime-genai" else set())
        assert 0 < r["roofline_fraction"]
    assert report["machine"]["memory_bandwidth_bytes_per_s"] > 1e8
    # the console script restarted itself with glibc's huge-page tunable where THP is "madvise"
    from starlift.core import hugepages

    mode = hugepages.thp_mode()
    assert report["machine"]["transparent_huge_pages"] == (
        mode == "always" or (mode == "madvise" and hugepages._glibc_supports_it()))
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "roofline" in proc.stdout


# --- optimum-onnx peer: runs in its own venv (`make optimum-venv`), as a subprocess ----------------------------

def _optimum_python() -> Path:
    path = Path(os.environ.get("STARLIFT_OPTIMUM_PYTHON") or REPO / ".venv-optimum" / "bin" / "python")
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `make optimum-venv` (optimum-onnx needs transformers<4.58, so its own venv)")
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A checkpoint with a wide init, so that greedy decoding does not repeat one token, its portable
    artifact, and an optimum-onnx export cache that the two optimum tests share (each export costs
    a subprocess with torch and optimum)."""
    root = tmp_path_factory.mktemp("wide")
    ckpt = write_hf_checkpoint(root / "ckpt", seed=3, initializer_range=0.5)
    export_checkpoint(ckpt, root / "art", progress=False)
    return ckpt, root / "art", root / "optimum-cache"


@pytest.mark.slow
def test_bench_optimum_rows(tmp_path, wide):
    python = _optimum_python()
    ckpt, art, cache = wide
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "bench", str(art), "--prompt-len", "20", "--new-tokens", "4",
                           "--batch", "1,2", "--reps", "1", "--positions", "8", "--peers", str(ckpt),
                           "--optimum", str(python), "--optimum-cache", str(cache),
                           "--json", str(tmp_path / "b.json"), "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    rows = report["results"]
    assert [(r["backend"], r["precision"]) for r in rows] == [
        ("onnxruntime", "fp32"), ("transformers", "fp32"),
        ("optimum-onnx", "fp32"), ("optimum-onnx", "int8"), ("optimum-onnx", "int4")]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0 and 0 < r["roofline_fraction"]
        assert set(r["throughput_tokens_per_s"]) == {"1", "2"}
        assert r["is_peer"] == (r["backend"] != "onnxruntime")
    optimum = {r["precision"]: r for r in rows if r["backend"] == "optimum-onnx"}
    assert all(r["latency_by_position_s"] == {} and r["rss_bytes"] > 0 for r in optimum.values())
    # weight bytes are the exported files: fp32 holds at least the checkpoint's tensors, int4 fewer bytes
    assert optimum["fp32"]["weight_bytes"] >= (ckpt / "model.safetensors").stat().st_size * 0.9
    assert optimum["int4"]["weight_bytes"] < optimum["fp32"]["weight_bytes"]
    starlift_row = rows[0]
    best = max((r for r in rows[1:] if r["precision"] == "fp32"), key=lambda r: r["decode_tokens_per_s"])
    assert starlift_row["vs_best_peer"] == pytest.approx(starlift_row["decode_tokens_per_s"] / best["decode_tokens_per_s"])
    assert starlift_row["best_peer"].startswith(best["backend"])
    assert "vs best peer" in proc.stdout and "optimum-onnx int4" in proc.stdout
    assert len(list(cache.iterdir())) == 3  # fp32, int8, int4 exports, no temporary folder left


@pytest.mark.slow
def test_optimum_fp32_greedy_matches_transformers(wide):
    """The optimum peer runs the same model: its greedy tokens and every step's logits equal transformers',
    past the sliding window (16) and for a batch of 2."""
    import torch

    from starlift.bench.speed import OptimumPeer
    from tests.conftest import load_hf

    python = _optimum_python()
    ckpt, _, cache = wide  # the fp32 export of test_bench_optimum_rows is reused when it ran first
    ids = [[(7 * i + 3) % 90 + 5 for i in range(24)], [(5 * i + 1) % 90 + 7 for i in range(24)]]
    peer = OptimumPeer(python, ckpt, "fp32", cache).activate()
    try:
        got = peer.greedy(ids, 12)
    finally:
        peer.deactivate()
    with torch.no_grad():
        out = load_hf(ckpt).generate(torch.tensor(ids), attention_mask=torch.ones(2, 24, dtype=torch.int64),
                                     max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
    want = out.sequences[:, 24:].tolist()
    assert got["tokens"] == want
    assert len(set(want[0])) > 3
    ref = np.stack([x.numpy() for x in out.logits])
    assert np.abs(np.array(got["logits"]) - ref).max() < 1e-4


@pytest.mark.slow
def test_optimum_errors_name_the_problem(tmp_path, ckpt):
    from starlift.bench import speed as bench
    from starlift.core.errors import UsageError

    with pytest.raises(UsageError, match="--optimum needs --peers"):
        bench.run([], ["onnxruntime"], optimum_python=sys.executable)
    with pytest.raises(UsageError, match="make optimum-venv"):
        bench.run([], ["onnxruntime"], peers_reference=str(ckpt), optimum_python=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="--optimum-precision"):
        bench.run([], ["onnxruntime"], peers_reference=str(ckpt), optimum_python=sys.executable,
                  optimum_precisions=("int3",))
    # starlift's own interpreter has no optimum-onnx: the worker says so and the parent turns it into a UsageError
    peer = bench.OptimumPeer(sys.executable, ckpt, "fp32", tmp_path / "cache")
    with pytest.raises(UsageError, match="cannot import optimum-onnx.*make optimum-venv"):
        peer.activate()
    peer.deactivate()


@pytest.mark.slow
def test_optimum_worker_failure_is_a_peer_error(tmp_path, ckpt):
    import shutil

    from starlift.bench.speed import OptimumPeer, PeerError

    python = _optimum_python()
    ckpt = shutil.copytree(ckpt, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"not safetensors")
    peer = OptimumPeer(python, ckpt, "int8", tmp_path / "cache")
    with pytest.raises(PeerError, match=r"optimum-onnx peer \(int8"):
        peer.activate()
    peer.deactivate()
    assert not list((tmp_path / "cache").glob("*"))  # the failed export left no folder, finished or temporary


# --- starlift profile: where a step's time goes ------------------------------------------------------------------

@pytest.mark.slow
def test_profile_reports_kernels_by_op_and_python_overhead(tmp_path, ckpt):
    export_checkpoint(ckpt, tmp_path / "ort", flavour="ort", progress=False)
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "profile", str(tmp_path / "ort"), "--prompt-len", "12", "--steps", "6",
                           "--reps", "1", "--json", str(tmp_path / "p.json")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    p = report["profiled"]
    # the fused graph's own kernels are what the profiler saw
    assert {"GroupQueryAttention", "RotaryEmbedding", "MatMul"} <= set(p["by_op_ms"])
    assert abs(sum(p["by_op_fraction"].values()) - 1) < 1e-6
    assert 0 < p["kernels_ms"] <= p["run_ms"]
    assert 0 < report["ort_run_ms"] < report["step_ms"]
    assert report["python_overhead_ms"] == pytest.approx(report["step_ms"] - report["ort_run_ms"])
    assert "starlift Python" in proc.stdout and "GroupQueryAttention" in proc.stdout
    assert not list(Path.cwd().glob("starlift-ort-profile*"))  # the trace is removed


@pytest.mark.slow
def test_bench_serve_smoke(tmp_path):
    """`starlift bench-serve` on a tiny ort artifact: every measurement is present (speed is not tested)."""
    ckpt = write_hf_checkpoint(tmp_path / "ckpt", seed=1)
    export_checkpoint(ckpt, tmp_path / "ort", flavour="ort", progress=False)
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "bench-serve", str(tmp_path / "ort"), "--concurrency", "3", "--prompt-len", "8",
                           "--new-tokens", "6", "--reps", "1", "--requests", "5", "--long-prompt", "300",
                           "--prefill-chunk", "64", "--json", str(tmp_path / "s.json"), "--no-progress"],
                          capture_output=True, text=True, timeout=1800)  # ~90 s alone; generous on a loaded box
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((tmp_path / "s.json").read_text())["results"]
    assert row["cache"] == "slots"
    assert row["offline"]["decode_tokens_per_s"] > 0 and row["streams"]["decode_tokens_per_s"] > 0
    assert row["offline"]["direct_single_decode_tokens_per_s"] > 0 and len(row["offline"]["direct_samples"]) == 1
    assert row["poisson"]["requests"] == 5 and row["poisson"]["ttft_p99_s"] >= row["poisson"]["ttft_p50_s"] > 0
    assert [lp["prefill_chunk"] for lp in row["long_prompt"]] == [64, 300]
    assert all(lp["itl_during_max_s"] > 0 for lp in row["long_prompt"])
    assert "poisson arrivals" in proc.stdout


def test_profile_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "profile", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not an artifact folder" in proc.stderr


@pytest.mark.slow
def test_bench_sequential_loads_one_row_at_a_time(ckpt, art):
    """--sequential (models too big to load together): every row measured, the report says the rows
    were not interleaved, and the roofline uses the highest read bandwidth sampled."""
    from starlift.bench import speed as bench

    _needs("openvino", "transformers")
    report = bench.run([str(art)], ["onnxruntime", "openvino"], prompt_len=8, new_tokens=4,
                       batches=(1,), reps=1, positions=[8], progress=False, sequential=True, peers_reference=str(ckpt))
    assert report["settings"]["interleaved"] is False
    from starlift.core import hugepages

    assert report["machine"]["transparent_huge_pages"] == hugepages.active()  # in-process: no restart
    assert [r["backend"] for r in report["results"]] == ["onnxruntime", "openvino", "transformers"]
    m = report["machine"]
    assert m["memory_bandwidth_bytes_per_s"] == max(m["memory_bandwidth_samples"])
    assert len(m["memory_bandwidth_samples"]) == 2 + len(report["results"])
    for r in report["results"]:
        assert r["roofline_fraction"] == pytest.approx(r["decode_tokens_per_s"] / r["roofline_tokens_per_s"])
        assert r["vs_best_peer" if r["backend"] != "transformers" else "vs_transformers"] > 0
        assert "vs_best_peer_paired" not in r  # rows measured minutes apart are not paired


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_decode_read_bytes_counts_what_a_step_reads(tmp_path, tied):
    """The roofline's bytes per step: every weight, except an embedding table that only a Gather
    reads (untied); a tied table is also the LM head, so it is read in full."""
    from starlift.bench.speed import decode_read_bytes

    ckpt = write_hf_checkpoint(tmp_path / "ckpt", seed=2, tie_word_embeddings=tied)
    export_checkpoint(ckpt, tmp_path / "art", progress=False)
    files = sum(p.stat().st_size for p in (tmp_path / "art").glob("model.onnx*"))
    cfg = json.loads((ckpt / "config.json").read_text())
    table = cfg["vocab_size"] * cfg["hidden_size"] * 4
    read = decode_read_bytes(tmp_path / "art" / "model.onnx")
    small = 64 << 10  # initializers stored inside model.onnx (shape constants) and alignment
    expected = files if tied else files - table
    assert expected - small <= read <= expected


def test_batch_decode_rate_when_requests_never_decode_together(art):
    """An engine that runs one request at a time: the batch's requests never decode together, and
    the rate is the whole span's (it was 0, and bench-serve divided by it)."""
    from starlift.bench.speed import run_decode
    from starlift.engine import Engine
    from starlift.runtimes import create_runner

    with create_runner("onnxruntime", art) as runner, Engine(runner, max_batch=1) as engine:
        result = run_decode(engine, batch=2, prompt_len=4, new_tokens=4)
    assert 0 < result["decode_tokens_per_s"] < float("inf")
