"""Transparent huge pages for the runtimes' weight buffers.

A decode step streams every weight once, and with 4 KiB pages it takes a TLB miss every 4 KiB.
Linux backs memory with 2 MiB pages when the allocation asks for them (``madvise``,
``MADV_HUGEPAGE``) under THP mode ``madvise``, this machine's and Debian's default. ONNX
Runtime and OpenVINO allocate their (prepacked) weights through ``malloc`` and never ask.
glibc (2.35 and newer) asks for every large ``malloc`` when the process starts with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. The tunable is read once at process start, so the
``starlift`` console script re-executes itself with it before any runtime is imported. There
is no library call to make that change from inside a running process.

Opt out with ``STARLIFT_HUGEPAGES=0``. Library users who want the same gain start Python with
the variable set themselves. ``starlift bench`` records whether it was on.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), None when unknown."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def active() -> bool:
    """Whether large allocations of this process get huge pages."""
    mode = thp_mode()
    return mode == "always" or (mode == "madvise" and TUNABLE in os.environ.get("GLIBC_TUNABLES", ""))


def _glibc_supports_it() -> bool:
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def reexec_with_huge_pages() -> None:
    """Re-execute the console script with the glibc tunable set, when it would change something;
    returns (doing nothing) otherwise."""
    if os.environ.get("STARLIFT_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if sys.platform != "linux" or thp_mode() != "madvise" or not _glibc_supports_it():
        return
    script = sys.argv[0]
    if Path(script).name != "starlift" or not os.path.isfile(script):
        return  # not the console script (python -c, an embedding program): nothing safe to re-run
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), TUNABLE) if x)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, script, *sys.argv[1:]], env)
    except OSError:
        return  # could not re-execute: run as we are, only slower
