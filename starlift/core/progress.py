"""Progress bars for long work: tqdm on a terminal, nothing in a log file or a pipe."""

from __future__ import annotations


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar (``leave=False``) that draws only when stderr is a terminal.

    ``disable=None`` is tqdm's own switch for that: a bar written into a non-terminal log
    is a wall of carriage returns nobody can read. ``enabled=False`` (``--no-progress``) turns
    it off everywhere.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
