"""Writing output folders so that nothing is ever half-written.

Every command that writes a folder (export, quantize, init-random) writes into a temporary
sibling and renames it into place at the end; an exception, SIGINT or SIGTERM removes the
temporary folder; an existing output is replaced only with ``force``. Missing parent folders
are created (as ``mkdir -p`` would), and the finished folder gets the permissions the umask
gives a new folder, not the temporary folder's private 0700.
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


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty OUT unless forced; refuse a location we cannot create or write.

    Nothing is created here (a refused command leaves no folder behind): the parents are made
    by ``atomic_output_dir`` when the work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty; pass --force to replace it, or choose another path")
    parent = out.absolute().parent
    base = _existing_ancestor(parent)
    if not base.is_dir():
        raise UsageError(f"cannot write {out}: {base} is a file, not a folder; choose another output path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: no write permission in {base}; choose a writable path")
    return out


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename."""
    out = check_output_dir(out, force)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: a fresh clone has no out/ yet
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARKER}{out.name}-", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}; choose a writable path") from e
    try:
        yield tmp
        # mkdtemp makes the folder 0700 (private while it is incomplete); the finished artifact
        # gets what `mkdir` would give it, so a service running as another user can read it.
        os.chmod(tmp, 0o777 & ~_umask())
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
