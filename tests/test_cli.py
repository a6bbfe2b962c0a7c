"""The console script: help, info, init-random, error lines and exit codes; a real pip install."""

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


@pytest.mark.slow
def test_pip_install_into_fresh_venv(tmp_path):
    """`pip install .` (not editable) into a new venv, then `starlift --help`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([str(pip), "install", "-q", "torch==2.13.0", str(REPO)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([str(venv / "bin" / "starlift"), "--help"], capture_output=True, text=True, check=True)
    assert "init-random" in out.stdout
    # The stage folders install as subpackages of starlift, never as top-level names.
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import starlift.model, starlift.export, starlift.runtimes, starlift.quantize, "
                           "importlib.util as u; print(u.find_spec('model'), u.find_spec('export'), "
                           "list(starlift.model.bundled_checkpoints()))"],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    assert site.stdout.strip() == "None None ['starcoder2-nano']"  # the bundled model ships in the wheel
