"""A smoke run of `starlift bench` on a tiny model: the output's shape only (speed is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from starlift.export import export_checkpoint
from tests.conftest import write_hf_checkpoint


def test_bench_smoke(tmp_path):
    ckpt = write_hf_checkpoint(tmp_path / "ckpt", seed=1)
    export_checkpoint(ckpt, tmp_path / "art", progress=False)
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "bench", str(tmp_path / "art"), "--backend", "onnxruntime", "--backend",
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
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "roofline" in proc.stdout
