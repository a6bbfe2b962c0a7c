"""Export-time validation: the written artifact, run in ONNX Runtime, against the reference model.

A fixed token sequence goes through a prefill and several decode steps (teacher forced, batch
2, the second row left-padded) in both; the per-step logits must agree within the tolerance
policy's bound for the dtype (``starlift.core.tolerance``: the graph against the PyTorch model
in the same dtype, at the reference logits' scale). Reference logits are computed before the
ONNX session exists, so the torch model can be released first and the two never hold the
weights at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from starlift.core import tolerance

if TYPE_CHECKING:  # the torch side runs in the build (export/build.py); ONNX Runtime's side needs no torch
    from starlift.model import Starcoder2


@dataclass
class ValidationCase:
    ids: np.ndarray  # (B, prompt + steps) token ids
    mask: np.ndarray  # (B, prompt + steps); row 1 left-padded
    prompt_len: int
    steps: int


def make_case(vocab: int, prompt_len: int = 32, steps: int = 8, pad: int = 5, seed: int = 1234) -> ValidationCase:
    rng = np.random.default_rng(seed)
    total = prompt_len + steps
    ids = rng.integers(min(38, vocab - 1), vocab, size=(2, total)).astype(np.int64)
    mask = np.ones((2, total), dtype=np.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ValidationCase(ids, mask, prompt_len, steps)


def positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def reference_logits(model: Starcoder2, case: ValidationCase) -> list[np.ndarray]:
    """[prefill logits (B, P, V), step 1 (B, 1, V), ...] from the torch model's cached path."""
    import torch

    ids, mask = torch.from_numpy(case.ids), torch.from_numpy(case.mask)
    pos = torch.from_numpy(positions(case.mask))
    out, past = [], model.empty_past(batch=ids.shape[0])
    chunks = [(0, case.prompt_len)] + [(t, t + 1) for t in range(case.prompt_len, case.prompt_len + case.steps)]
    with torch.no_grad():
        for a, b in chunks:
            logits, past = model(ids[:, a:b], mask[:, :b], pos[:, a:b], past)
            out.append(logits.numpy())
    return out


def onnx_logits(model_path: str, case: ValidationCase, kv_dtype: np.dtype, providers=None) -> list[np.ndarray]:
    """The same sequence through an ONNX Runtime session of the artifact (concat-grow cache)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Prepacking copies every MatMul weight into MLAS's layout at session start; for a few
    # validation steps that doubles the weights in memory for nothing. Without it, ORT maps
    # the external data file and reads the weights in place.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    # No arena: it grows in doubling chunks that stay reserved after the prefill (measured on the
    # 113M fp32 graph: 16 MiB of the validation's peak); nine runs do not need its speed.
    opts.enable_cpu_mem_arena = False
    session = ort.InferenceSession(model_path, opts, providers=providers or ["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
    batch = case.ids.shape[0]
    pos = positions(case.mask)
    past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=kv_dtype) for i in past_inputs}
    chunks = [(0, case.prompt_len)] + [(t, t + 1) for t in range(case.prompt_len, case.prompt_len + case.steps)]
    out = []
    for a, b in chunks:
        feed = {"input_ids": case.ids[:, a:b], "attention_mask": case.mask[:, :b], "position_ids": pos[:, a:b], **past}
        results = session.run(["logits", *present_names], feed)
        out.append(results[0].astype(np.float32))
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(present_names, results[1:], strict=True)}
    return out


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], mask: np.ndarray, prompt_len: int,
            dtype: str, shape: tolerance.Shape) -> dict:
    """Max/mean error over real (unpadded) positions, per step, and a verdict."""
    per_step, total_abs, count, finite, scale = [], 0.0, 0, True, 0.0
    for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        cols = slice(0, prompt_len) if i == 0 else slice(prompt_len + i - 1, prompt_len + i)
        real = mask[:, cols].astype(bool)
        err = np.abs(r - c)[real]
        scale = max(scale, float(np.abs(r[real]).max()))
        finite &= bool(np.isfinite(c[real]).all())
        per_step.append(float(err.max()))
        total_abs += float(err.sum())
        count += err.size
    max_err = max(per_step)
    bound = tolerance.logit_checks(dtype, shape, scale, against="same-dtype")["max_abs_error"].bound
    return {
        "max_abs_error": max_err,
        "mean_abs_error": total_abs / max(count, 1),
        "max_abs_error_per_step": per_step,
        "finite": finite,
        "tolerance": bound,
        "logit_scale": scale,
        "passed": bool(finite and max_err <= bound),
    }
