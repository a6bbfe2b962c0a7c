"""The core install (``pip install starlift``, no extras) runs artifacts without torch.

A fresh venv gets the project without extras from this machine's package index (numpy,
tokenizers, onnxruntime and what they need); `starlift generate` and `starlift.load(...).generate`
run an artifact there and give the full install's text. Needs the package index (or pip's cache):
offline, the test skips and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import starlift
from tests.conftest import REPO

pytestmark = [pytest.mark.index, pytest.mark.slow]

# pip's words for "the index (or a wheel) could not be reached": only these make the test skip
OFFLINE = ("No matching distribution found", "Could not find a version that satisfies", "NewConnectionError",
           "Temporary failure in name resolution", "Network is unreachable", "ProxyError")
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory) -> Path:
    if os.environ.get("STARLIFT_TEST_OFFLINE") == "1":
        pytest.skip("STARLIFT_TEST_OFFLINE=1: the core-install test needs the package index")
    venv = tmp_path_factory.mktemp("core-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(REPO)], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode and any(word in proc.stderr for word in OFFLINE):
        pytest.skip(f"the package index is not reachable (pip: {proc.stderr.strip().splitlines()[-1]}); the "
                    "core-install test needs it")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def _run(venv: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_core_install_runs_an_artifact_without_torch(core_venv, nano_ort, tmp_path):
    python, exe = core_venv / "bin" / "python", core_venv / "bin" / "starlift"
    # the venv really is the core install: no torch, no onnx, no transformers to fall back on
    absent = _run(core_venv, python, "-c", "import importlib.util as u; "
                  "print([m for m in ('torch', 'onnx', 'onnxscript', 'onnx_ir', 'safetensors', 'transformers', "
                  "'openvino') if u.find_spec(m)])", cwd=tmp_path)
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    expected = starlift.load(nano_ort).generate(PROMPT, max_new_tokens=12)
    assert expected.strip()

    proc = _run(core_venv, exe, "generate", nano_ort, "--prompt", PROMPT, "--max-new-tokens", 12, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"

    code = ("import sys, starlift\n"
            f"gen = starlift.load({str(nano_ort)!r})\n"
            f"print(gen.generate({PROMPT!r}, max_new_tokens=12), end='')\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'transformers'})\n"
            "print('\\nheavy modules:', heavy, file=sys.stderr)\n")
    proc = _run(core_venv, python, "-X", "importtime", "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected
    assert "heavy modules: []" in proc.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "import time:" in line}
    assert "onnxruntime" in imported and "tokenizers" in imported and not imported & {"torch", "onnx"}


def test_core_install_commands_and_layout(core_venv, nano_ort, tmp_path):
    exe = core_venv / "bin" / "starlift"
    assert "init-random" in _run(core_venv, exe, "--help", cwd=tmp_path).stdout
    proc = _run(core_venv, exe, "verify", nano_ort, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout and "ONNX checker skipped" in proc.stdout, proc.stderr
    proc = _run(core_venv, exe, "info", "starcoder2-nano", cwd=tmp_path)
    assert proc.returncode == 0 and "M parameters" in proc.stdout, proc.stderr
    # a command that needs an extra says which, in one line
    for args, extra in ((["export", "starcoder2-nano", tmp_path / "out"], "starlift[export]"),
                        (["quantize", nano_ort, tmp_path / "q", "--mode", "int8"], "starlift[quantize]"),
                        (["generate", nano_ort, "--prompt", "x", "--backend", "openvino"], "starlift[openvino]"),
                        (["serve", nano_ort, "--ray", "--replicas", "2"], "starlift[ray]")):
        proc = _run(core_venv, exe, *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert extra in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    # the stage folders install as subpackages of starlift, never as top-level names; nano ships in the wheel
    site = _run(core_venv, core_venv / "bin" / "python", "-c",
                "import starlift.model, starlift.runtimes, importlib.util as u; print(u.find_spec('model'), "
                "u.find_spec('export'), u.find_spec('starlift.export') is not None, "
                "list(starlift.model.bundled_checkpoints()))", cwd=tmp_path)
    assert site.stdout.strip() == "None None True ['starcoder2-nano']", site.stderr
