"""Quality measures of a candidate's teacher-forced logits against a reference's.

Public so that every stage measuring quality (``starlift parity``, the quantize gate) computes
the same numbers the same way. Rows are positions, columns the vocabulary; a 49k vocabulary in
float64 is 400 KB a row, so everything runs ``chunk`` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray, tie: float = 0.0, chunk: int = 256,
                   candidate_kind: str = "logits") -> dict[str, Any]:
    """Max/mean |error|, mean KL(reference || candidate), top-1 and top-5 agreement.

    ``tie``: the candidate's top-1 counts as agreeing when the reference rates it within ``tie``
    of its own best (a tie the reference cannot break within its tolerance); 0 is strict argmax.
    ``candidate_kind="logprobs"``: the candidate gives log-probabilities (an HTTP endpoint's
    ``logprobs``), compared with the reference's log-softmax instead of its raw logits.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"reference {reference.shape} and candidate {candidate.shape} differ in shape")
    max_abs, sum_abs, kl_sum, top1, top5, finite, scale = 0.0, 0.0, 0.0, 0, 0.0, True, 0.0
    n = reference.shape[0]
    for i in range(0, n, chunk):
        ref, cand = reference[i:i + chunk], candidate[i:i + chunk]
        ref_lp, cand_lp = log_softmax(ref), log_softmax(cand)
        ref_cmp = ref_lp if candidate_kind == "logprobs" else ref
        scale = max(scale, float(np.abs(ref_cmp).max()))
        diff = np.abs(ref_cmp - cand)
        finite &= bool(np.isfinite(cand).all())
        max_abs, sum_abs = max(max_abs, float(diff.max())), sum_abs + float(diff.sum())
        kl_sum += float((np.exp(ref_lp) * (ref_lp - cand_lp)).sum())
        chosen = ref[np.arange(len(ref)), cand.argmax(-1)]
        top1 += int((chosen >= ref.max(-1) - tie).sum())
        k = min(5, ref.shape[-1] - 1)
        ref5 = np.argpartition(-ref, k, axis=-1)[:, :k]
        cand5 = np.argpartition(-cand, k, axis=-1)[:, :k]
        top5 += sum(len(set(a) & set(b)) / k for a, b in zip(ref5, cand5, strict=True))
    if not finite:
        max_abs = float("inf")
    return {
        "max_abs_error": max_abs,
        "mean_abs_error": sum_abs / reference.size,
        "mean_kl": max(kl_sum / n, 0.0) if finite else float("inf"),
        "top1_agreement": top1 / n,
        "top1_tie": tie,
        "top5_agreement": top5 / n,
        "scale": scale,
        "finite": finite,
    }


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")


def perplexity(logits: Sequence[np.ndarray], ids: Sequence[Sequence[int]], chunk: int = 256) -> float:
    """exp(mean negative log-likelihood of each next token), over windows of (T, V) logits and
    their (T,) token ids (the last position of a window has no next token in it)."""
    nll = []
    for lg, tokens in zip(logits, ids, strict=True):
        tokens = np.asarray(tokens)
        for i in range(0, len(lg) - 1, chunk):
            rows = np.arange(i, min(i + chunk, len(lg) - 1))
            nll.append(-log_softmax(lg[rows])[np.arange(len(rows)), tokens[rows + 1]])
    return float(np.exp(np.concatenate(nll).mean())) if nll else float("nan")
