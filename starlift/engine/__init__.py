"""Generation above the runners: the engine (sequences, their caches, the scheduler, the one
token loop), sampling, and the text API (``Generator``)."""

from .engine import Engine, RequestHandle, Scheduler, TokenEvent
from .generation import Generator
from .sampling import SamplingParams

__all__ = ["Engine", "Generator", "RequestHandle", "SamplingParams", "Scheduler", "TokenEvent"]
