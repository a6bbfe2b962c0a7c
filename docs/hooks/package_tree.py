"""MkDocs hook: let mkdocstrings read starlift's sources as one package tree.

The stage folders (model/, export/, quantize/, runtimes/) install as ``starlift.model`` & co.
through pyproject's package-dir mapping, which griffe's static loader cannot follow (it resolves
symbolic links back to the real folders, so links do not help). Before the build this hook
copies the Python sources into the installed layout under ``build/docs-src/starlift`` (a few
hundred KB), and mkdocs.yml points mkdocstrings' ``paths`` there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

STAGES = ("model", "export", "quantize", "runtimes")


def on_config(config):
    repo = Path(config.config_file_path).parent
    tree = repo / "build" / "docs-src" / "starlift"
    shutil.rmtree(tree.parent, ignore_errors=True)
    sources = shutil.ignore_patterns("__pycache__", "checkpoints")
    shutil.copytree(repo / "starlift", tree, ignore=sources)
    for stage in STAGES:
        shutil.copytree(repo / stage, tree / stage, ignore=sources)
    return config
