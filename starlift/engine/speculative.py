"""Prompt-lookup speculative decoding: drafts from the request's own text, verified exactly.

A request that asks for it (``SamplingParams(speculative="prompt-lookup", draft_tokens=K)``)
drafts up to K tokens per step from n-gram matches: the last n tokens (n = 3, then 2, then 1)
of its prompt + output are looked up at their most recent earlier occurrence, and the tokens
that followed it there are the draft (code repeats itself: re-emitting a file with an edit,
renaming, a loop body). The engine feeds the row its last token and the draft in one model
call and keeps the longest prefix the model agrees with, plus the model's own next token:

- greedy: a draft token is kept while it equals the model's choice at its position, so the
  output is the one plain decoding makes;
- sampling: a prompt-lookup draft is a point mass q = 1{d}, so standard speculative sampling
  (Leviathan et al. 2023, Chen et al. 2023) accepts d with probability min(1, p(d)/q(d)) = p(d)
  and, on a rejection, draws from the residual max(p - q, 0) normalised: p with d removed. The
  emitted tokens are distributed as the target's own samples.

Written here because the matching is a few lines over the request's token list and the
acceptance rule must run inside the engine's own step (vLLM's and transformers' versions are
tied to their engines).
"""

from __future__ import annotations

import numpy as np

from starlift.core.errors import UsageError

METHODS = ("prompt-lookup",)
DEFAULT_DRAFT_TOKENS = 8
MAX_DRAFT_TOKENS = 64
MAX_NGRAM = 3


def check_method(method, draft_tokens) -> None:
    if method is not None and method not in METHODS:
        raise UsageError(f"speculative must be None or one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)) \
            or not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise UsageError(f"draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], got {draft_tokens!r}")


class PromptLookup:
    """N-gram index over one request's tokens (prompt, then output as it grows).

    ``last[n][ngram]`` / ``first[n][ngram]`` are the ends of the n-gram's most recent and first
    occurrences that have a token after them; updated in O(MAX_NGRAM) per appended token, so a
    lookup costs the same at any length. The most recent occurrence is the likeliest to go on
    as the text does now (the copy of the file being re-emitted); when too few tokens follow it
    (a run of one token or a short cycle: the occurrence just before the current one), the
    first occurrence, which has the longest continuation."""

    def __init__(self, prompt: list[int], max_ngram: int = MAX_NGRAM):
        self.tokens: list[int] = []
        self.max_ngram = max_ngram
        self.last: list[dict] = [{} for _ in range(max_ngram + 1)]
        self.first: list[dict] = [{} for _ in range(max_ngram + 1)]
        self.extend(prompt)

    def extend(self, tokens) -> None:
        seq, last, first = self.tokens, self.last, self.first
        for t in tokens:
            end = len(seq) - 1  # the n-grams ending here get a continuation now
            for n in range(1, self.max_ngram + 1):
                if end - n + 1 < 0:
                    break
                key = tuple(seq[end - n + 1:end + 1])
                last[n][key] = end
                first[n].setdefault(key, end)
            seq.append(int(t))

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest suffix n-gram's latest earlier occurrence."""
        seq = self.tokens
        for n in range(min(self.max_ngram, len(seq)), 0, -1):
            key = tuple(seq[-n:])
            end = self.last[n].get(key)
            if end is not None:
                if len(seq) - end - 1 < k:
                    end = self.first[n][key]
                return seq[end + 1:end + 1 + k]
        return []


MAX_PAUSE = 32  # steps: the longest wait after drafts keep failing


def schedule(draft_len: int, backoff: int, accepted: int, proposed: int, max_len: int) -> tuple[int, int, int]:
    """The next (draft length, steps to wait before drafting again, next wait) after a verified
    draft of ``proposed`` tokens of which ``accepted`` were kept.

    The draft length follows transformers' schedule for assistant models: +2 after a fully
    accepted draft, -1 otherwise. Beyond it, a draft rejected at its first token starts a wait
    that doubles while that repeats (1, 2, 4 ... MAX_PAUSE plain steps), and any accepted token
    ends it: where the model does not follow the text (measured: the trained starcoder2-nano
    re-emits a file for 0-2 tokens), each verification costs more than a plain step and brings
    one token, so it stops paying for them; the tokens are the same either way."""
    if accepted >= proposed:
        return min(max_len, draft_len + 2), 0, 1
    if accepted == 0:
        return max(1, draft_len - 1), backoff, min(2 * backoff, MAX_PAUSE)
    return max(1, draft_len - 1), 0, 1


def residual_sample(probs: np.ndarray, draft: int, rng: np.random.Generator) -> int:
    """A draw from max(p - q, 0) normalised, q the point mass on ``draft``: p without ``draft``."""
    p = probs.astype(np.float64, copy=True)
    p[draft] = 0.0
    total = p.sum()
    if total <= 0:  # p was a point mass on the draft: the draft is always accepted, never here
        return int(draft)
    u = rng.random() * total
    return int(min(np.searchsorted(np.cumsum(p), u, side="right"), p.shape[0] - 1))
