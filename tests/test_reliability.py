"""Reliability: interrupted and failing exports leave nothing, untrusted files are refused,
bad input fails before any work, one Generator serves several threads, and property-based
generation never crashes and always yields valid text."""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import starlift
from starlift.core.artifact import verify
from starlift.core.errors import ArtifactError, UsageError
from starlift.export import export_checkpoint
from tests.conftest import write_hf_checkpoint

STARLIFT = str(Path(sys.executable).with_name("starlift"))


def litter(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".starlift-tmp")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("rel") / "ckpt", seed=9, initializer_range=0.3)


@pytest.fixture(scope="module")
def text_gen(text_exports):
    gen = starlift.load(text_exports[1]["portable"])  # conftest's session export (the real tokenizer)
    yield gen
    gen.close()


@pytest.mark.slow
def test_killed_exports_leave_nothing_and_rerun_succeeds(ckpt, tmp_path):
    """SIGKILL can't be caught, so its temp folder may remain (never a partial OUT); SIGINT and
    SIGTERM are handled and leave nothing at all."""
    rng = random.Random(0)
    out = tmp_path / "out"
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([STARLIFT, "export", str(ckpt), str(out), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.0, 6.0))
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal: a complete, valid artifact
            verify(out)
            subprocess.run(["rm", "-rf", str(out)], check=True)
            continue
        assert not out.exists(), f"partial output after {sig!r}"
        assert not litter(tmp_path), f"temporary folders left after {sig!r}"
    proc = subprocess.run([STARLIFT, "export", str(ckpt), str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    verify(out)


@pytest.mark.slow
def test_full_disk_leaves_nothing(ckpt, tmp_path):
    """RLIMIT_FSIZE makes the write of model.onnx.data fail like a full disk."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "full"
    proc = subprocess.run([STARLIFT, "export", str(ckpt), str(out), "--no-progress"], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and not litter(tmp_path)


@pytest.mark.slow
def test_existing_output_is_never_overwritten_without_force(ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("x")
    proc = subprocess.run([STARLIFT, "export", str(ckpt), str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "precious").read_text() == "x"


@pytest.fixture(scope="module")
def intact(tiny_exports):
    """One exported artifact (the session's; vocab 99); tests that damage one copy it."""
    return tiny_exports[1]["portable"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "config", "symlink", "absolute"])
def test_artifact_damage_is_caught_before_loading(intact, tmp_path, damage):
    import shutil

    art = tmp_path / "a"
    shutil.copytree(intact, art)
    data = art / "model.onnx.data"
    manifest = json.loads((art / "manifest.json").read_text())
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[100] ^= 0xFF
        data.write_bytes(bytes(raw))
        match = "sha256"
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:1000])
        match = "sha256"
    elif damage == "missing":
        data.unlink()
        match = "missing"
    elif damage == "config":
        (art / "config.json").unlink()
        match = "missing"
    elif damage == "symlink":
        target = tmp_path / "elsewhere"
        target.write_bytes((art / "config.json").read_bytes())
        (art / "config.json").unlink()
        (art / "config.json").symlink_to(target)
        match = "symbolic link"
    else:
        manifest["files"]["/etc/passwd"] = "0" * 64
        (art / "manifest.json").write_text(json.dumps(manifest))
        match = "outside the artifact"
    with pytest.raises(ArtifactError, match=match):
        starlift.load(art)
    proc = subprocess.run([STARLIFT, "generate", str(art), "--prompt", "x"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([STARLIFT, "verify", str(art)], capture_output=True, text=True)
    assert proc.returncode == 1 and match.split()[0] in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-k", "-3"], "--top-k must be"),
    (["--prompt", "x", "--backend", "nosuch"], "invalid choice: 'nosuch'"),
    (["--prompt", "x", "--max-new-tokens", "100000"], "lower --max-new-tokens, or pass --truncate"),
    (["--prompt", ""], "empty"),
    (["--fim-prefix", "a"], "go together"),
])
def test_cli_bad_generation_input(text_gen, args, message):
    """One line naming the problem with the command line's own spelling (flags, not the Python
    keywords max_new_tokens / truncate=True)."""
    art = text_gen.source
    proc = subprocess.run([STARLIFT, "generate", str(art), *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert message in line and len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "truncate=True" not in line and "max_new_tokens" not in line and "top_p" not in line
    if "--backend" in args:  # the choices are listed
        assert all(b in line for b in ("onnxruntime", "openvino", "tensorrt", "torch"))


def test_invalid_utf8_prompt_file(text_gen, tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"def f():\n    return '\xc3\x28'\n")
    proc = subprocess.run([STARLIFT, "generate", str(text_gen.source), "--prompt-file", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid UTF-8" in proc.stderr


def test_unknown_flavour_is_a_usage_error(ckpt, tmp_path):
    proc = subprocess.run([STARLIFT, "export", str(ckpt), str(tmp_path / "x"), "--flavour", "fast"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_mismatched_tokenizer_vocab(intact, tmp_path, shared_tokenizer):
    import shutil

    art = tmp_path / "a"
    shutil.copytree(intact, art)
    (art / "tokenizer.json").write_bytes(shared_tokenizer.read_bytes())  # 49152 tokens vs a 99-token model
    with pytest.raises(UsageError, match="do not belong together"):
        starlift.load(art, verify_artifact=False)


def test_one_generator_from_many_threads(text_gen):
    prompts = ["def f(x):", "import os", "class A:", "x = [", "for i in range(10):", "while True:"]
    expected = {p: text_gen.generate(p, max_new_tokens=12) for p in prompts}
    results: dict[str, list[str]] = {p: [] for p in prompts}
    errors = []

    def worker(p):
        try:
            for _ in range(3):
                results[p].append(text_gen.generate(p, max_new_tokens=12))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == [expected[p]] * 3 for p, r in results.items())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(min_size=1, max_size=40),
       temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
       top_k=st.one_of(st.none(), st.integers(0, 100)),
       top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
       penalty=st.one_of(st.none(), st.floats(0.5, 2.0)),
       seed=st.integers(0, 2**31 - 1))
def test_property_generation_is_valid_text(text_gen, prompt, temperature, top_k, top_p, penalty, seed):
    kw = dict(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
              seed=seed)
    text = text_gen.generate(prompt, **kw)
    assert isinstance(text, str)
    text.encode("utf-8")  # valid text (no lone surrogates)
    assert "".join(text_gen.stream(prompt, **kw)) == text


@pytest.mark.slow
def test_pickle_checkpoint_refused_by_export(ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    torch.save(load_file(ckpt / "model.safetensors"), pk / "pytorch_model.bin")
    proc = subprocess.run([STARLIFT, "export", str(pk), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and "arbitrary code" in proc.stderr
    proc = subprocess.run([STARLIFT, "export", str(pk), str(tmp_path / "o"), "--allow-pickle", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_transformers_keywords_map_or_name_the_starlift_way(text_gen):
    greedy = text_gen.generate("def f(x):", max_new_tokens=8)
    assert text_gen.generate("def f(x):", max_new_tokens=8, do_sample=False, num_beams=1,
                             num_return_sequences=1) == greedy
    sampled = text_gen.generate("def f(x):", max_new_tokens=8, do_sample=True, seed=3)  # transformers: T=1
    assert sampled == text_gen.generate("def f(x):", max_new_tokens=8, temperature=1.0, seed=3)
    full = text_gen.generate("def f(x):", max_new_tokens=12)
    stop = full[4:6]
    assert text_gen.generate("def f(x):", max_new_tokens=12, stop_strings=[stop]) == full[:full.find(stop)]
    pipe = starlift.api.TextGenerationPipeline(text_gen)
    assert pipe("def f(x):", max_new_tokens=8, do_sample=False)[0]["generated_text"] == "def f(x):" + greedy
    for kwargs, named in [({"max_length": 20}, "max_new_tokens"), ({"num_return_sequences": 2}, "pass the prompt N times"),
                          ({"num_beams": 4}, "beam search"), ({"streamer": object()}, "stream("),
                          ({"eos_token_id": 0}, "ignore_eos=True"), ({"tempreature": 0.5}, "unknown argument")]:
        with pytest.raises(UsageError, match=named.replace("(", r"\(")):
            text_gen.generate("def f(x):", max_new_tokens=8, **kwargs)
    with pytest.raises(UsageError, match="max_new_tokens"):
        list(text_gen.stream("def f(x):", max_length=20))
    with pytest.raises(UsageError, match="max_new_tokens"):
        text_gen.fim("def f(x):", "\n", max_length=20)
    assert text_gen.fim("a = ", "\n", max_new_tokens=4, do_sample=False) == text_gen.fim("a = ", "\n", max_new_tokens=4)


@pytest.mark.slow
def test_loading_hashes_once_then_trusts_an_unchanged_stamp(ckpt, tmp_path):
    """The first load hashes every file and records a stamp (size, mtime, ctime, inode); the next
    loads trust it while nothing changed. A write that keeps size and mtime still changes ctime:
    the next load hashes again and refuses the file. `starlift verify` always hashes."""
    import os

    from starlift.core.artifact import stamp_path

    art = tmp_path / "a"
    export_checkpoint(ckpt, art, progress=False)
    stamp = stamp_path(art)
    assert not stamp.exists()  # the exporter records none for its temporary folder
    starlift.load(art).close()
    recorded = stamp.stat().st_mtime_ns
    first = json.loads(stamp.read_text())
    assert set(first["files"]) == set(json.loads((art / "manifest.json").read_text())["files"])
    time.sleep(0.01)
    starlift.load(art).close()
    assert stamp.stat().st_mtime_ns == recorded  # trusted: not hashed again, nothing rewritten
    data = art / "model.onnx.data"
    before = data.stat()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # same size ...
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and mtime put back
    assert data.stat().st_size == before.st_size and data.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(ArtifactError, match="sha256"):
        starlift.load(art)
    raw[len(raw) // 3] ^= 0x10  # restored: loads again, and `starlift verify` re-hashes every byte
    data.write_bytes(bytes(raw))
    starlift.load(art).close()
    proc = subprocess.run([STARLIFT, "verify", str(art)], capture_output=True, text=True)
    assert proc.returncode == 0 and "files hashed" in proc.stdout and "ONNX checker passed" in proc.stdout
