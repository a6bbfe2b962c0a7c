"""Generation above the runners: sampling, the token loop and the text API (``Generator``)."""

from .generation import Generator, SamplingParams, generate_tokens

__all__ = ["Generator", "SamplingParams", "generate_tokens"]
