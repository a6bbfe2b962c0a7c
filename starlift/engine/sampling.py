"""Sampling: parameters, logits processors as plain functions, and a per-request sampler.

Each request samples its own row of logits with its own random generator (seeded from its own
seed), so a seeded sample never depends on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from starlift.core.errors import UsageError

from .speculative import DEFAULT_DRAFT_TOKENS, check_method, residual_sample

LogitsProcessor = Callable[[np.ndarray, list[list[int]]], np.ndarray]
MAX_LOGPROBS = 20  # the OpenAI API's limit for top logprobs


# ---- logits processors: plain functions over (B, V) float logits ------------------------------
def repetition_penalty(penalty: float) -> LogitsProcessor:
    """transformers' rule: a seen token's logit is divided by ``penalty`` if positive, else multiplied."""

    def apply(logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        for row, seen in enumerate(history):
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            vals = logits[row, idx]
            logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    return apply


def top_k_filter(k: int) -> LogitsProcessor:
    def apply(logits, history):
        if k >= logits.shape[-1]:
            return logits
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
        return np.where(logits < kth, -np.inf, logits)

    return apply


def top_p_filter(p: float) -> LogitsProcessor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (at least one)."""

    def apply(logits, history):
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        cum = np.cumsum(probs, axis=-1)
        remove_sorted = cum - probs >= p  # mass before this token already reaches p
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, -np.inf, logits)

    return apply


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    speculative: str | None = None  # "prompt-lookup": drafts from n-gram matches, verified exactly
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # the most draft tokens verified per step

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is None or self.temperature < 0 or not np.isfinite(self.temperature):
            raise UsageError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise UsageError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")
        check_method(self.speculative, self.draft_tokens)

    @property
    def greedy(self) -> bool:
        """Plain argmax of the raw logits: nothing to process, nothing to draw."""
        return self.temperature == 0 and not self.processors()

    def processors(self) -> list[LogitsProcessor]:
        procs = []
        if self.repetition_penalty and self.repetition_penalty != 1.0:
            procs.append(repetition_penalty(self.repetition_penalty))
        if self.temperature > 0:
            if self.top_k:
                procs.append(top_k_filter(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(top_p_filter(self.top_p))
        return procs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Greedy at temperature 0, else a draw from softmax(logits / T) (after the filters)."""
    if params.temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / params.temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((logits.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), logits.shape[-1] - 1)


class Sampler:
    """One request's sampling state: its parameters, its own generator, the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt: list[int]):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.processors = params.processors()
        self.greedy = not self.processors and params.temperature == 0
        self.history = [list(prompt)] if params.repetition_penalty else None

    def __call__(self, logits: np.ndarray) -> int:
        """The next token from one row of raw logits (V,)."""
        if self.greedy:
            return int(logits.argmax())  # greedy reads the logits as they are: no copy per token
        scores = logits[None].astype(np.float32, copy=True)
        for proc in self.processors:
            scores = proc(scores, self.history or [[]])
        return int(sample(scores, self.params, self.rng)[0])

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a sample is drawn from (temperature > 0): softmax(processed / T), (V,)."""
        scores = logits[None].astype(np.float64, copy=True)
        for proc in self.processors:
            scores = proc(scores, self.history or [[]])
        scaled = scores[0] / self.params.temperature
        scaled -= scaled.max()
        p = np.exp(scaled)
        return p / p.sum()

    def verify(self, logits: np.ndarray, draft: int) -> tuple[int, bool]:
        """(token, draft accepted) at a position whose draft is ``draft``. Greedy (temperature 0):
        the model's choice, accepted when it equals the draft. Sampling: speculative sampling with
        a point-mass draft: accept with probability p(draft), else draw from p without it."""
        if self.params.temperature == 0:
            token = self(logits)
            return token, token == draft
        p = self.probs(logits)
        if self.rng.random() < p[draft]:
            return int(draft), True
        return residual_sample(p, draft, self.rng), False

    def seen(self, token: int) -> None:
        if self.history is not None:
            self.history[0].append(token)


def logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log_softmax of the model's raw logits (before temperature and filters): the chosen token's
    logprob and the ``top`` most likely (token, logprob), best first."""
    x = logits.astype(np.float64)
    x = x - x.max()
    lp = x - np.log(np.exp(x).sum())
    best: list[tuple[int, float]] = []
    if top:
        idx = np.argpartition(-lp, top - 1)[:top] if top < lp.shape[0] else np.arange(lp.shape[0])
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        best = [(int(i), float(lp[i])) for i in idx]
    return float(lp[token]), best
