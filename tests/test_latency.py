"""The code-completion latency workload (`starlift bench --workload latency`) on starcoder2-nano, and
the llama.cpp peer (its own venv, built by `make llama-cpp`): conversion by llama.cpp's own
converter, greedy tokens against starlift's, the bench rows. Speed is not tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import starlift
from starlift.bench import latency
from starlift.model import resolve_checkpoint
from starlift.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # the slow tier: `make test-slow` (CI runs both)


def test_requests_are_built_from_held_out_files():
    tok = Tokenizer.from_file(resolve_checkpoint("starcoder2-nano") / "tokenizer.json")
    files = latency.heldout_files()
    reqs = latency.build_requests(tok, files, context=1024, ttft_lens=[300], fim_prefixes=[200, 4096], fim_suffix=20,
                                  fim_new=8, edit_tokens=120, edit_new=8, count=2)
    kinds = [r.key for r in reqs]
    assert kinds == ["ttft 300", "fim 200", "fim 200", "fim 4096", "fim 4096", "edit", "edit"]
    assert len(reqs[0].ids) == 300
    fim_prefix, fim_suffix, fim_middle = (tok.token_id(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    for r in reqs[1:5]:
        assert r.ids[0] == fim_prefix and r.ids[-1] == fim_middle and r.ids.count(fim_suffix) == 1
        assert r.ids.index(fim_suffix) - 1 == r.detail["prefix_tokens"]
        assert r.detail["suffix_tokens"] == 20
        assert len(r.ids) + r.new_tokens <= 1024  # the 4096 budget is clipped to nano's context
    assert reqs[3].detail["prefix_tokens"] == 1024 - 20 - 8 - 3
    edit = reqs[5]
    text = tok.decode(edit.ids)
    original, edited_head = text.split("<file_sep>")[1:]
    assert "_v2" in edited_head and "_v2" not in original  # one identifier renamed in the re-emitted file
    assert len(edit.detail["reference_continuation"]) == 8
    # the edit requests alone, as the scripts outside the bench take them: the same prompts
    alone = latency.edit_requests(tok, edit_tokens=120, count=2, edit_new=8)
    assert [(r.ids, r.new_tokens, r.detail) for r in alone] == [(r.ids, r.new_tokens, r.detail) for r in reqs[5:]]


def test_latency_workload_runs_generation(nano_ort, tmp_path):
    report = latency.run([str(nano_ort)], ["onnxruntime"], None, ttft_lens=(64,), fim_prefixes=(96,), fim_suffix=16,
                         fim_new=4, edit_tokens=64, edit_new=5, requests_per_size=1, reps=2, threads=1, progress=False)
    assert [r["workload"] for r in report["results"]] == ["ttft 64", "fim 96", "edit"]
    for r in report["results"]:
        assert 0 < r["ttft_s"] <= r["total_s"] and len(r["samples"]["total_s"]) == 2
        assert (r["decode_tokens_per_s"] is None) == (r["workload"] == "ttft 64")
    assert report["requests"]["fim 96"][0]["prompt_tokens"] == 96 + 16 + 3
    assert "fim 96" in latency.format_table(report)


def test_latency_workload_speculative_rows(nano_ort):
    """--speculative adds a row per artifact beside the plain one: same greedy tokens, a decode
    ratio against plain, the acceptance rate."""
    report = latency.run([str(nano_ort)], ["onnxruntime"], None, ttft_lens=(32,), fim_prefixes=(64,), fim_suffix=16,
                         fim_new=6, edit_tokens=96, edit_new=12, requests_per_size=1, reps=1, threads=1,
                         progress=False, speculative="prompt-lookup", draft_tokens=4)
    spec = [r for r in report["results"] if r["row"].endswith("prompt-lookup 4")]
    assert [r["workload"] for r in spec] == ["ttft 32", "fim 64", "edit"]
    for r in spec[1:]:
        assert r["speculative"]["decode_vs_plain"] > 0 and 0 <= r["speculative"]["acceptance"] <= 1
    assert set(report["checks"]["greedy_agreement"].values()) == {1.0}  # exact: the plain row's tokens
    assert "x plain (acceptance" in latency.format_table(report)


# --- llama.cpp: its own venv (`make llama-cpp`), driven in a subprocess --------------------------------------

def _llama_dir() -> Path:
    path = Path(os.environ.get("STARLIFT_LLAMA_CPP") or Path("~/.cache/starlift/llama.cpp").expanduser())
    if not (path / "venv" / "bin" / "python").is_file():
        pytest.skip(f"{path} has no llama.cpp build: run `make llama-cpp` (about 20 min on 2 cores) or set "
                    "STARLIFT_LLAMA_CPP to the folder it wrote")
    return path


def test_llama_cpp_peer_converts_nano_and_agrees_with_starlift(nano_ort, tmp_path):
    """llama.cpp's converter reads nano once its pre-tokenizer is declared; its tokenizer and its
    f32 greedy tokens equal starlift's; q8_0 comes from llama_model_quantize."""
    from starlift.bench.llama_cpp import LlamaCppPeer

    folder = _llama_dir()
    tok = Tokenizer.from_file(nano_ort / "tokenizer.json")
    text = latency.heldout_files()[1][1][:1500]
    ids = tok.encode(text)[:200]
    expected = starlift.load(nano_ort).generate(ids, max_new_tokens=12, ignore_eos=True)
    peer = LlamaCppPeer(folder, resolve_checkpoint("starcoder2-nano"), "f32", tmp_path / "gguf", threads=1, n_ctx=512)
    try:
        peer.activate()
        assert peer.tokenize(text) == tok.encode(text)
        out = peer.complete(ids, 12)
        assert out["tokens"] == expected
        assert 0 < out["ttft_s"] < out["total_s"]
    finally:
        peer.deactivate()
    lookup = LlamaCppPeer(folder, resolve_checkpoint("starcoder2-nano"), "f32", tmp_path / "gguf", threads=1,
                          n_ctx=512, lookup=4)  # llama-cpp-python's own prompt-lookup decoding
    try:
        lookup.activate()
        assert lookup.complete(ids, 12)["tokens"] == expected
    finally:
        lookup.deactivate()
    q8 = LlamaCppPeer(folder, resolve_checkpoint("starcoder2-nano"), "q8_0", tmp_path / "gguf", threads=1, n_ctx=512)
    try:
        q8.activate()
        assert q8.weight_bytes < peer.weight_bytes / 2
        assert len(q8.complete(ids, 4)["tokens"]) == 4
    finally:
        q8.deactivate()


def test_bench_llama_cpp_rows(nano_ort, tmp_path):
    folder = _llama_dir()
    exe = Path(sys.executable).with_name("starlift")
    nano = str(resolve_checkpoint("starcoder2-nano"))
    proc = subprocess.run([str(exe), "bench", str(nano_ort), "--peers", nano, "--llama-cpp", str(folder),
                           "--llama-cpp-quant", "f32", "--llama-cpp-cache", str(tmp_path / "gguf"), "--prompt-len", "16",
                           "--new-tokens", "4", "--batch", "1,2", "--reps", "1", "--positions", "16",
                           "--json", str(tmp_path / "b.json"), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    llama = next(r for r in rows if r["backend"] == "llama.cpp")
    assert llama["precision"] == "fp32" and llama["decode_tokens_per_s"] > 0
    assert llama["throughput_tokens_per_s"]["2"] is None  # batch 1 only
    assert np.isfinite(next(r for r in rows if r["backend"] == "onnxruntime")["throughput_tokens_per_s"]["2"])


def test_llama_cpp_flag_errors_name_the_fix(tmp_path):
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "bench", str(tmp_path), "--workload", "latency", "--llama-cpp", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "export it first" in proc.stderr
    from starlift.bench.llama_cpp import resolve
    from starlift.core.errors import UsageError

    with pytest.raises(UsageError, match="make llama-cpp"):
        resolve(tmp_path)
