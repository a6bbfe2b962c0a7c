"""What parity and the quantize gate measure, in numpy only: the built-in code text, the
teacher-forced case built from it, and the logit measures (error, KL, top-1/top-5 agreement,
perplexity) of a candidate's logits against a reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starlift.core.errors import UsageError

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


@dataclass
class ParityCase:
    tokens: list[int]
    prompt_len: int


def make_case(tokenizer, vocab_size: int, text: str | None, steps: int, prompt_len: int = 16) -> ParityCase:
    if tokenizer is not None:
        ids = tokenizer.encode(text if text is not None else BUILTIN_TEXT)
    else:  # no tokenizer in the artifact: fixed pseudo-random ids
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab_size, size=prompt_len + steps).tolist()
    if len(ids) < 2:
        raise UsageError("the parity text is too short: give at least two tokens of text")
    prompt_len = min(prompt_len, len(ids) - 1)
    ids = ids[: prompt_len + steps]
    return ParityCase(ids, prompt_len)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def metrics(reference: np.ndarray, candidate: np.ndarray, chunk: int = 256) -> dict[str, float]:
    """Error, KL, top-1/top-5 agreement over positions, ``chunk`` rows at a time (a 49k vocabulary
    in float64 is 400 KB a row: whole-array temporaries would need gigabytes)."""
    max_abs, sum_abs, kl_sum, top1, top5, finite = 0.0, 0.0, 0.0, 0, 0.0, True
    n = reference.shape[0]
    for i in range(0, n, chunk):
        ref, cand = reference[i:i + chunk], candidate[i:i + chunk]
        diff = np.abs(ref - cand)
        max_abs, sum_abs = max(max_abs, float(diff.max())), sum_abs + float(diff.sum())
        finite &= bool(np.isfinite(cand).all())
        ref_lp, cand_lp = log_softmax(ref), log_softmax(cand)
        kl_sum += float((np.exp(ref_lp) * (ref_lp - cand_lp)).sum())
        top1 += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        ref5 = np.argpartition(-ref, 5, axis=-1)[:, :5]
        cand5 = np.argpartition(-cand, 5, axis=-1)[:, :5]
        top5 += sum(len(set(a) & set(b)) / 5 for a, b in zip(ref5, cand5, strict=True))
    return {
        "max_abs_error": max_abs,
        "mean_abs_error": sum_abs / reference.size,
        "mean_kl": max(kl_sum / n, 0.0),
        "top1_agreement": top1 / n,
        "top5_agreement": top5 / n,
        "finite": finite,
    }


def perplexity(logits: list[np.ndarray], tokens: list[np.ndarray], rows: int = 256) -> float:
    """exp(mean negative log-likelihood) of each window's next tokens: ``logits[i]`` (T, V) predicts
    ``tokens[i][1:]``; row blocks, since a float64 log-softmax of 49k columns is large."""
    nll = []
    for lg, ids in zip(logits, tokens, strict=True):
        for i in range(0, len(lg) - 1, rows):
            index = np.arange(i, min(i + rows, len(lg) - 1))
            nll.append(-log_softmax(lg[index])[np.arange(len(index)), ids[index + 1]])
    return float(np.exp(np.concatenate(nll).mean()))
