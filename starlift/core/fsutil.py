"""Writing output folders so that nothing is ever half-written.

Every command that writes a folder (export, quantize, init-random) writes into a temporary
sibling and renames it into place at the end; an exception, SIGINT or SIGTERM removes the
temporary folder; an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

TMP_MARKER = ".starlift-tmp-"


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty OUT unless forced; refuse a parent we cannot write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty; pass --force to replace it, or choose another path")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {out}: its parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: no write permission in {parent}; choose a writable path")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename."""
    out = check_output_dir(out, force)
    parent = out.absolute().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARKER}{out.name}-", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}; choose a writable path") from e
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_MARKER}{out.name}-old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
