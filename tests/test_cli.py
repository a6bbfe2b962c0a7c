"""The console script: help, info, init-random, error lines and exit codes, what a new user meets first
(output folders, --help, Ctrl-C, the README's commands, Hub ids). The real pip install: test_install.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def run(*args, check=False):
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def test_help_lists_commands():
    out = run("--help", check=True).stdout
    for cmd in ("info", "init-random"):
        assert cmd in out


def test_info_json_on_checkpoint(tiny_checkpoint):
    info = json.loads(run("info", tiny_checkpoint, "--json", "--context", "64", check=True).stdout)
    assert info["config"]["kv_heads"] == 2 and info["kv_cache"]["context"] == 64
    # 2 (k,v) x 2 layers x 2 kv heads x 8 head_dim x 64 tokens x 2 bytes
    assert info["kv_cache"]["fp16_bytes_full"] == 2 * 2 * 2 * 8 * 64 * 2
    from starlift.model import load_checkpoint

    n = sum(p.numel() for p in load_checkpoint(tiny_checkpoint).parameters())
    assert info["parameters"] == n


def test_info_on_preset_text():
    out = run("info", "starcoder2-3b", check=True).stdout
    assert "3030.37M parameters" in out and "2 KV heads" in out


@pytest.mark.slow
def test_init_random_then_refuse_existing(tmp_path):
    out = tmp_path / "r"
    run("init-random", "tiny", out, "--seed", "3", check=True)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    proc = run("init-random", "tiny", out)
    assert proc.returncode == 2
    assert "pass --force" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert run("init-random", "tiny", out, "--force").returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".starlift-tmp")]


def test_errors_are_one_line(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = run("info", tmp_path / "cfg")
    assert proc.returncode == 2 and "model_type is 'llama'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run("info", tmp_path / "missing")
    assert proc.returncode == 2 and "neither a checkpoint folder" in proc.stderr
    proc = run("--debug", "info", tmp_path / "missing")
    assert "Traceback" in proc.stderr


def _subparsers():
    from starlift.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return action.choices


def test_every_option_is_described_with_its_default():
    missing, no_default = [], []
    for name, sub in _subparsers().items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest in ("help", "debug"):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                missing.append(f"{name} {flag}")
            elif action.option_strings and action.default not in (None, False) and "default" not in (
                    sub._get_formatter()._get_help_string(action)):
                no_default.append(f"{name} {flag}")
        assert text.strip()
    assert not missing, f"options without a description: {missing}"
    assert not no_default, f"options whose help does not give the default: {no_default}"
    generate = _subparsers()["generate"].format_help()
    assert "{torch,onnxruntime,openvino,tensorrt}" in generate  # --backend lists its choices
    assert "(default: 64)" in generate and "runs silently" in generate  # --max-new-tokens, --no-verify


@pytest.mark.slow
def test_output_folders_get_parents_and_umask_permissions(tiny_checkpoint, tmp_path):
    """`starlift export CKPT out/a/b`: the missing parents are made, the artifact folder gets what
    the umask gives a new folder (not mkdtemp's 0700), and no progress bar lands in a pipe."""
    import os

    out = tmp_path / "fresh" / "clone" / "out"

    def umask():
        os.umask(0o027)

    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "export", str(tiny_checkpoint), str(out)], capture_output=True, text=True,
                          timeout=300, preexec_fn=umask)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stderr is a pipe: no tqdm bar, no warnings
    assert (out / "manifest.json").is_file() and proc.stdout.startswith(f"wrote {out}")
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "model.onnx").stat().st_mode & 0o777 == 0o640
    assert out.parent.stat().st_mode & 0o777 == 0o750


def test_interrupted_generate_says_only_that(nano_ort):
    """Ctrl-C in `starlift generate` prints `interrupted` (it writes no output folder to speak of)."""
    import signal
    import time

    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.Popen([str(exe), "generate", str(nano_ort), "--interactive"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # printed once the model is loaded
        assert "one prompt per line" in banner
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # stdin still open: Ctrl-C itself must end the blocking read, not an EOF
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip() == "starlift generate: interrupted"


def test_readme_fim_command_works(nano_ort):
    """The README's fill-in-the-middle line, run by bash as written: the prefix and suffix reach the
    model with real newlines (the same middle as the API's)."""
    import shlex

    import starlift

    line = next(x for x in (REPO / "README.md").read_text().splitlines()
                if x.startswith("starlift generate") and "--fim-prefix" in x)
    command = line.split("  #")[0].replace("out/nano", shlex.quote(str(nano_ort)), 1)
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{exe.parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    expected = starlift.load(nano_ort).fim("def f(x):\n    return ", "\n")
    assert proc.stdout == expected + "\n" and expected.strip()


def _hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """A Hugging Face cache holding ``repo_id`` as huggingface_hub lays a download out: files in
    blobs/ named by hash, snapshots/<commit>/ linking to them, refs/main naming the commit."""
    import hashlib

    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(Path("../../blobs") / blob.name)
    return repo / "snapshots" / commit


def test_hub_ids_resolve_through_the_local_hf_cache(tiny_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "bigcode/tiny-starcoder2", tiny_checkpoint)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "info", "bigcode/tiny-starcoder2", "--json"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] == {"model.safetensors": (snapshot / "model.safetensors").stat().st_size}
    hub = pytest.importorskip("huggingface_hub")  # its own scanner sees the same download
    code = ("import huggingface_hub as h; r = [x for x in h.scan_cache_dir().repos][0]; "
            "print(r.repo_id, [s.commit_hash for s in r.revisions])")
    seen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert seen.stdout.split()[0] == "bigcode/tiny-starcoder2" and snapshot.name in seen.stdout, seen.stderr
    del hub
    proc = subprocess.run([str(exe), "info", "bigcode/starcoder2-3b"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "hf download bigcode/starcoder2-3b" in proc.stderr and str(cache) in proc.stderr
