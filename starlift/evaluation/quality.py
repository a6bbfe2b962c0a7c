"""One measurement of an artifact against a reference, shared by the quantize gate and ``starlift parity``.

Both read the same text (by default ``default_text()``: a short built-in snippet followed by
standard-library modules held out from starcoder2-nano's training, 4 windows of 1024 tokens)
the same way, so their verdicts agree (``starlift.core.tolerance``, rule 5):

- windows: each window is one prefill on an empty cache; its logits at every position against
  the reference's (max |error|, mean KL, top-1/top-5 agreement, perplexity);
- decode: the first ``prompt`` tokens of the first window as a prefill, then ``steps`` tokens
  one at a time through the cache. Those logits are compared with the reference's at the same
  positions and with the candidate's own prefill of the window (``cache_consistency``: a cached
  step must compute what a full recompute computes).

Where the logits come from is a ``LogitSource``: a runner of any backend (``RunnerSource``),
the reference model, or later a deployed endpoint. ``kind = "logprobs"`` marks a source of
full log-probability rows, compared with the reference's log-softmax (``metrics.compare_logits``).
An HTTP source for issue 14's ``starlift serve`` is not built: the server returns the top-k
log-probabilities of the next token (token-id prompts, ``max_tokens`` 1), which needs a comparison
restricted to the returned ids (docs/guide/parity.md, "A deployed endpoint").
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from starlift.core import tolerance
from starlift.core.errors import UsageError

from . import metrics

BUILTIN_TEXT = '''import os
from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float

    def norm(self) -> float:
        return (self.x ** 2 + self.y ** 2) ** 0.5


def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]


if __name__ == "__main__":
    print(fibonacci(10), Point(3, 4).norm(), os.getcwd())
'''

# Standard-library modules every CPython ships as source; also in starcoder2-nano's held-out
# set, so the bundled model never trained on them. The snippet alone is about 200 tokens, where
# one flipped prediction moves top-1 by 0.005, the width of a gate's margin.
EVAL_MODULES = ("base64", "contextlib", "copy", "fileinput")
WINDOW_TOKENS = 1024
WINDOWS = 4
DECODE_PROMPT = 16
DECODE_STEPS = 32


def default_text() -> tuple[str, str]:
    """(text, description) read when no text is given."""
    parts, used = [BUILTIN_TEXT], []
    for name in EVAL_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py") and Path(spec.origin).is_file():
            parts.append(Path(spec.origin).read_text(encoding="utf-8"))
            used.append(name)
    if not used:  # a Python without its library's sources
        return BUILTIN_TEXT, "built-in"
    return "\n".join(parts), f"built-in + Python {platform.python_version()} stdlib {', '.join(used)}"


@dataclass
class Plan:
    """What is measured: the token windows, and the cached-decode run inside the first one."""

    windows: list[list[int]]
    prompt: int
    steps: int
    text: str = "given"

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)


def make_plan(tokenizer, vocab_size: int, context: int, text: str | None = None, windows: int = WINDOWS,
              window_tokens: int = WINDOW_TOKENS, steps: int = DECODE_STEPS, prompt: int = DECODE_PROMPT,
              seed: int = 0) -> Plan:
    """Tokenize the text (default ``default_text()``) into ``windows`` windows of at most
    ``window_tokens`` (and the context); without a tokenizer, fixed pseudo-random ids."""
    if windows < 1:
        raise UsageError(f"the number of windows must be at least 1, got {windows}")
    if steps < 1:
        raise UsageError(f"the number of decode steps must be at least 1, got {steps}")
    size = max(2, min(window_tokens, context))
    described = "given"
    if tokenizer is None:
        ids = np.random.default_rng(seed).integers(0, vocab_size, size=size * windows).tolist()
        described = "random token ids (no tokenizer.json)"
    else:
        if text is None:
            text, described = default_text()
        ids = tokenizer.encode(text)
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)][:windows]
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        raise UsageError("the text is too short: give at least two tokens of text")
    first = len(chunks[0])
    prompt = max(1, min(prompt, first - 1))
    steps = min(steps, first - prompt)
    return Plan(chunks, prompt, steps, described)


class LogitSource(Protocol):
    """Teacher-forced scores of one model: a prefill, and a prefill followed by cached steps."""

    name: str
    kind: str  # "logits", or "logprobs" for a source that only returns log-probabilities

    def prefill(self, ids: list[int]) -> np.ndarray:
        """(T, V) scores of ``ids`` run as one prefill on an empty cache."""

    def decode(self, ids: list[int], prompt: int) -> np.ndarray:
        """(T - prompt, V) scores of ``ids[prompt:]`` fed one token at a time after a prefill of
        ``ids[:prompt]``: the rows for positions prompt .. T-1."""


@dataclass
class RunnerSource:
    """A ``starlift.runtimes`` runner (activated) as a LogitSource."""

    runner: Any
    name: str = ""
    kind: str = "logits"

    def __post_init__(self) -> None:
        self.name = self.name or self.runner.name

    def prefill(self, ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], np.int64)
        return self.runner.single_batch(1).forward(x, np.ones_like(x), np.arange(len(ids))[None])[0]

    def decode(self, ids: list[int], prompt: int) -> np.ndarray:
        """A prefill of ``prompt`` tokens, then one token per step through the KV cache generation
        uses (the engine's ``runner.create_cache``); the logits of the decoded positions."""
        x = np.asarray(ids, np.int64)
        cache = self.runner.create_cache(1)
        try:
            cache.add(0)
            cache.prefill(0, x[:prompt])
            cache.join(0)
            rows = [np.array(cache.decode(x[t:t + 1])) for t in range(prompt, len(ids))]  # copies: the buffer is reused
        finally:
            cache.close()
        return np.concatenate(rows, axis=0)


@dataclass
class ReferenceRun:
    """The reference's logits over a plan's windows: computed once, compared with every candidate."""

    windows: list[np.ndarray]
    name: str
    perplexity: float = field(default=float("nan"))


def run_reference(source: LogitSource, plan: Plan) -> ReferenceRun:
    logits = [source.prefill(w) for w in plan.windows]
    return ReferenceRun(logits, source.name, metrics.perplexity(logits, plan.windows))


def measure(reference: ReferenceRun, candidate: LogitSource, plan: Plan, precision: str, shape: tolerance.Shape,
            against: str, reference_precision: str = "fp32") -> dict[str, Any]:
    """The candidate's numbers on the plan and the verdict of the tolerance policy
    (``reference_precision``: the dtype the reference ran in, see ``tolerance.logit_checks``)."""
    tolerance.check_precision(precision)
    windows = [candidate.prefill(w) for w in plan.windows]
    ref_all = np.concatenate(reference.windows)
    scale = float(np.abs(ref_all).max())
    checks = tolerance.logit_checks(precision, shape, scale, against, reference_precision)
    values = metrics.compare_logits(ref_all, np.concatenate(windows), tie=checks.pop("top1_tie").bound,
                                    candidate_kind=candidate.kind)
    decoded = candidate.decode(plan.windows[0][:plan.prompt + plan.steps], plan.prompt)
    rows = slice(plan.prompt, plan.prompt + plan.steps)
    ref_rows = reference.windows[0][rows]
    if candidate.kind == "logprobs":
        ref_rows = metrics.log_softmax(ref_rows)
    values["max_abs_error"] = max(values["max_abs_error"], metrics.max_abs_error(ref_rows, decoded))
    values["cache_consistency"] = metrics.max_abs_error(windows[0][rows], decoded)
    values["finite"] = bool(values["finite"] and np.isfinite(decoded).all())
    values.update({"tokens": plan.tokens, "windows": len(plan.windows), "text": plan.text,
                   "decode_prompt_tokens": plan.prompt, "decode_steps": plan.steps, "against": against,
                   "perplexity_reference": reference.perplexity,
                   "perplexity": metrics.perplexity(windows, plan.windows)})
    values["perplexity_change"] = values["perplexity"] / reference.perplexity - 1
    values.update(judge(values, checks))
    return values


def judge(values: dict[str, Any], checks: dict[str, tolerance.Check]) -> dict[str, Any]:
    """Polygraphy-style verdicts: each check with its value and bound; passed only if all pass."""
    judged = {}
    for name, check in checks.items():
        value = values[name]
        judged[name] = {"value": value, "tolerance": check.bound, "direction": check.direction,
                        "passed": bool(np.isfinite(value) and check.passes(value))}
    return {"checks": judged, "passed": bool(values["finite"] and all(c["passed"] for c in judged.values()))}
