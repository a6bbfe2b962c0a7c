"""The parity gate passes faithful artifacts and fails when the reference is a different model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def setup(tiny_exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt, arts = tiny_exports
    perturbed = root / "perturbed"
    shutil.copytree(ckpt, perturbed)
    tensors = load_file(perturbed / "model.safetensors")
    w = tensors["model.layers.1.mlp.c_fc.weight"]
    tensors["model.layers.1.mlp.c_fc.weight"] = w * 1.02  # a 2% change in one matrix
    save_file(tensors, perturbed / "model.safetensors", metadata={"format": "pt"})
    return arts["portable"], ckpt, perturbed


def cli(*args):
    exe = Path(sys.executable).with_name("starlift")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_parity_passes_on_faithful_artifact(setup, tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino backend needs starlift[openvino]")
    art, ckpt, _ = setup
    proc = cli("parity", art, "--reference", ckpt, "--backend", backend, "--steps", "40",
               "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and list(report["backends"]) == [backend]
    b = report["backends"][backend]
    assert set(b) >= {"max_abs_error", "mean_kl", "top1_agreement", "top5_agreement", "greedy_match_tokens", "passed"}
    assert b["max_abs_error"] <= 1e-4 and b["top1_agreement"] == 1.0
    assert b["greedy_match_tokens"] == b["greedy_steps"]
    assert "PASS" in proc.stdout


def test_parity_fails_against_a_different_model(setup, tmp_path):
    art, _, perturbed = setup
    proc = cli("parity", art, "--reference", perturbed, "--json", tmp_path / "r.json")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["backends"]["onnxruntime"]["passed"] is False
    assert "FAIL" in proc.stdout and "max_abs_error" in proc.stdout


def test_torch_runner_on_checkpoint_passes(setup):
    _, ckpt, _ = setup
    from starlift.evaluation import parity

    report = parity.run(ckpt, ckpt, ["torch"], steps=20)
    assert report["passed"] and report["backends"]["torch"]["max_abs_error"] <= 1e-4


def test_parity_bad_text_file(setup, tmp_path):
    art, ckpt, _ = setup
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"def f():\n\xff\xfe")
    proc = cli("parity", art, "--reference", ckpt, "--text", bad)
    assert proc.returncode == 2 and "not valid UTF-8" in proc.stderr
