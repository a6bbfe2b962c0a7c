"""The code passes ruff, and the layout holds: imports point down (DESIGN.md), absolute and
relative ones alike, and the runtime side of the package never imports torch."""

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


# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {
    "model": "starlift.model", "export": "starlift.export", "quantize": "starlift.quantize",
    "runtimes": "starlift.runtimes", "starlift": "starlift",
}
ROLES = ("core", "engine", "evaluation", "bench", "cli", "serve")
STAGES = ("model", "export", "quantize", "runtimes")

# part of starlift -> parts it must not import. Nothing imports bench or cli but themselves (cli
# drives everything); core imports none of ours.
EVERYTHING = {*STAGES, *ROLES, "api"}
FORBIDDEN = {
    "core": EVERYTHING - {"core"},
    "model": {"export", "quantize", "runtimes", "engine", "evaluation", "serve", "api", "bench", "cli"},
    "export": {"quantize", "runtimes", "engine", "evaluation", "serve", "api", "bench", "cli"},
    "quantize": {"export", "engine", "serve", "api", "bench", "cli"},
    "runtimes": {"export", "quantize", "engine", "evaluation", "serve", "api", "bench", "cli"},
    "engine": {"export", "quantize", "evaluation", "serve", "api", "bench", "cli"},
    "evaluation": {"export", "quantize", "serve", "bench", "cli"},
    "serve": {"export", "quantize", "evaluation", "bench", "cli"},
    "api": {"export", "quantize", "evaluation", "serve", "bench", "cli"},
    "bench": {"cli", "serve"},
    "cli": set(),
}


def _module_of(path: Path) -> str:
    """The installed module name of a source file (``runtimes/base.py`` -> ``starlift.runtimes.base``)."""
    rel = path.relative_to(REPO)
    parts = [*PACKAGES[rel.parts[0]].split("."), *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str | None:
    """Which part of starlift a module belongs to: a stage, a role package, ``api``, or None."""
    parts = module.split(".")
    if parts[0] != "starlift":
        return None
    if len(parts) == 1:
        return "init"
    return parts[1] if parts[1] in EVERYTHING else None


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module ``path`` imports (relative imports resolved), with the line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{a.name}", node.lineno) for a in node.names]  # `from . import x`
    return found


def _sources() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (REPO / folder).rglob("*.py"))


def test_the_guard_sees_every_part():
    parts = {_part(_module_of(p)) for p in _sources()}
    assert {*STAGES, "core", "engine", "evaluation", "bench", "cli", "api"} <= parts
    # a relative import resolves to the installed name: `from .base import Runner` in runtimes/
    names = {name for name, _ in _imports(REPO / "runtimes" / "onnxruntime_runner.py",
                                          "starlift.runtimes.onnxruntime_runner")}
    assert {"starlift.runtimes.base", "starlift.runtimes.base.Runner"} <= names
    assert _part("starlift.bench.speed") == "bench" and _part("starlift.api") == "api" and _part("numpy") is None


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_down(part):
    bad = []
    for path in _sources():
        module = _module_of(path)
        if _part(module) != part:
            continue
        for name, line in _imports(path, module):
            target = _part(name)
            if target in FORBIDDEN[part]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, f"starlift.{part} imports what it must not: {bad}"


def test_runtime_side_never_imports_torch():
    """What runs an artifact (the package, load(), the engine, the ONNX Runtime runner, the
    tokenizer, the CLI and the commands that run on the core install) imports without torch."""
    code = ("import sys\n"
            "import starlift, starlift.api, starlift.engine, starlift.runtimes.onnxruntime_runner\n"
            "from starlift.model import Tokenizer, resolve_checkpoint, Starcoder2Config\n"
            "from starlift.cli import build_parser\n"
            "import starlift.cli.generate, starlift.cli.verify, starlift.cli.info\n"
            "build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'onnx', 'onnxscript', 'onnx_ir', 'safetensors'))\n"
            "print(' '.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
