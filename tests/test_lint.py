"""The code passes ruff, and the stage layout holds: runtimes never import export."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it is in the test extra)")
    proc = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# stage -> stages it must not import (model <- export <- quantize; runtimes never import export)
FORBIDDEN = {
    "model": {"export", "quantize", "runtimes"},
    "export": {"quantize", "runtimes"},
    "runtimes": {"export", "quantize"},
}


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_stage_imports_follow_the_data_flow(stage):
    bad = []
    for path in (REPO / stage).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                if parts[0] == "starlift" and len(parts) > 1 and parts[1] in FORBIDDEN[stage]:
                    bad.append(f"{path.name}: {name}")
    assert not bad, f"{stage}/ imports a later stage: {bad}"
