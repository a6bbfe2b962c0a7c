"""Typed errors. Every message names the problem and what to do about it.

The CLI turns a ``StarliftError`` into one line on stderr: ``UsageError`` (bad input the user
can fix) exits 2, every other ``StarliftError`` (an operation that failed) exits 1.
"""


class StarliftError(Exception):
    """Base class of every error starlift raises on purpose."""

    exit_code = 1


class UsageError(StarliftError, ValueError):
    """Bad input: a wrong argument, an unknown name, an out-of-range value."""

    exit_code = 2


class ConfigError(UsageError):
    """A config.json starlift refuses (wrong model type, unsupported setting)."""


class CheckpointError(StarliftError):
    """A checkpoint folder or weight file that cannot be loaded as it is."""


class ArtifactError(StarliftError):
    """An exported artifact that is missing files, fails its hashes or its checks."""


class ParityError(StarliftError):
    """A model whose logits leave the tolerance against the reference; ``quality``: the
    measurement that failed, when the error is a quality gate's verdict (else None)."""

    def __init__(self, message: str, quality: dict | None = None):
        super().__init__(message)
        self.quality = quality


class QueueFullError(StarliftError):
    """The engine's queue is full: try again after ``retry_after`` seconds (an estimate)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class MemoryBudgetError(StarliftError):
    """Work whose estimated peak memory is larger than the budget (--max-memory or what is available)."""
