"""Parity and quality for classification heads: their outputs against a reference's.

A classifier's output is a label (and its probability), per sequence or per token, so it is
judged on that: how often the argmax label agrees, how far each label's probability moves, and
the raw logit error. The samples are windows of code text of several lengths (sequence heads:
one label per window; token heads: one per token), run in right-padded batches so that padding
is exercised the way the pipelines use it. ``starlift parity`` uses ``run``; ``starlift quantize``
uses ``metrics`` against the fp32 artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from starlift.core.errors import UsageError

HEAD_TASKS = ("text-classification", "token-classification")

# check -> (direction, bound) per precision, as in parity.TOLERANCES. fp32: what rounding leaves,
# so maxima. Lower precisions: the labels must hold and the probabilities move little on average;
# the largest probability change is reported, not gated (it is one output in thousands: 0.27-0.39
# for int4 below). Set from starcoder2-nano's trained body under a random score head (5 sequence
# labels, 3 token labels; docs/guide/classification.md): label agreement / mean |prob change|
# fp16 1.000-0.9995 / 0.0003-0.0005, int8 1.000-0.995 / 0.0013-0.0031, int4 0.961-0.969 / 0.015-0.020.
TOLERANCES: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {"max_abs_error": ("max", 1e-3), "max_prob_error": ("max", 1e-3), "label_agreement": ("min", 0.99)},
    "fp16": {"mean_prob_error": ("max", 0.005), "label_agreement": ("min", 0.98)},
    "bf16": {"mean_prob_error": ("max", 0.02), "label_agreement": ("min", 0.95)},
    "int8": {"mean_prob_error": ("max", 0.01), "label_agreement": ("min", 0.98)},
    "int4": {"mean_prob_error": ("max", 0.05), "label_agreement": ("min", 0.93)},
}


def samples(tokenizer, vocab_size: int, text: str | None, task: str, count: int = 48,
            lengths: tuple[int, ...] = (7, 16, 33, 64, 100, 128)) -> list[list[int]]:
    """``count`` token windows of the given lengths cycled, spread over the text (fixed random ids
    when there is no tokenizer). Token heads get fewer, longer windows: every token is a sample."""
    from starlift.evaluation.parity import BUILTIN_TEXT

    if tokenizer is not None:
        ids = tokenizer.encode(text if text is not None else BUILTIN_TEXT)
    else:
        ids = np.random.default_rng(0).integers(0, vocab_size, size=2048).tolist()
    if len(ids) < 2:
        raise UsageError("the text is too short: give at least two tokens of text")
    if task == "token-classification":
        count, lengths = max(1, count // 8), tuple(max(lengths) * k for k in (1, 2))
    out = []
    for i in range(count):
        n = min(lengths[i % len(lengths)], len(ids))
        start = (i * 97) % (len(ids) - n + 1)
        out.append(ids[start:start + n])
    return out


def scores(logits: np.ndarray, problem_type: str | None) -> np.ndarray:
    """Probabilities as the pipelines compute them (softmax, sigmoid, or the raw regression value)."""
    from starlift.engine.classification import FUNCTIONS, default_function

    return FUNCTIONS[default_function(problem_type, logits.shape[-1])](logits.astype(np.float64))


def metrics(reference: list[np.ndarray], candidate: list[np.ndarray], problem_type: str | None) -> dict[str, Any]:
    """Logit error, probability error, label agreement and KL over every output row (a sequence's
    logits, or each token's)."""
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    cand = np.concatenate([c.reshape(-1, c.shape[-1]) for c in candidate]).astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    diff = np.abs(ref - cand)
    p_ref, p_cand = scores(ref, problem_type), scores(cand, problem_type)
    prob = np.abs(p_ref - p_cand)
    from starlift.engine.classification import default_function

    function = default_function(problem_type, ref.shape[-1])
    if function == "sigmoid":  # a label is on when its probability passes 0.5
        agreement = float(((p_ref > 0.5) == (p_cand > 0.5)).mean())
    else:
        agreement = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    kl = None
    if function == "softmax":
        lr = np.log(np.clip(p_ref, 1e-300, None))
        lc = np.log(np.clip(p_cand, 1e-300, None))
        kl = max(float((p_ref * (lr - lc)).sum(-1).mean()), 0.0)
    return {"rows": int(ref.shape[0]), "labels": int(ref.shape[-1]), "score_function": function,
            "max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
            "max_prob_error": float(prob.max()), "mean_prob_error": float(prob.mean()),
            "label_agreement": agreement, "mean_kl": kl, "finite": finite}


def judge(values: dict[str, Any], precision: str) -> dict[str, Any]:
    checks = {}
    from starlift.core import tolerance

    tolerance.check_precision(precision)  # an unknown precision is an error, never fp32's bounds
    for name, (direction, bound) in TOLERANCES[precision].items():
        value = values[name]
        ok = value <= bound if direction == "max" else value >= bound
        checks[name] = {"value": value, "tolerance": bound, "direction": direction, "passed": bool(ok),
                        "required_tolerance": value}
    return {"checks": checks, "passed": bool(all(c["passed"] for c in checks.values()) and values["finite"])}


def is_head(path: str | Path) -> bool:
    from starlift.api import artifact_task, is_artifact
    from starlift.model.checkpoint import resolve_checkpoint

    folder = Path(path) if is_artifact(path) else resolve_checkpoint(path)
    return artifact_task(folder) in HEAD_TASKS


def run(path: str | Path, reference: str | Path, backends: list[str], text: str | None = None,
        precision: str | None = None, runner_options: dict | None = None, count: int = 48) -> dict[str, Any]:
    """Each backend's classifier on ``path`` against the reference checkpoint's torch head (fp32)."""
    from starlift.api import artifact_task, is_artifact
    from starlift.core.artifact import read_manifest
    from starlift.model.checkpoint import resolve_checkpoint
    from starlift.model.tokenizer import Tokenizer
    from starlift.runtimes.classifiers import CLASSIFIER_BACKENDS, TorchClassifier, batched_logits, create_classifier

    for b in backends:
        if b not in CLASSIFIER_BACKENDS:
            raise UsageError(f"backend {b!r} has no classifier runner; classifier backends: "
                             f"{', '.join(CLASSIFIER_BACKENDS)}")
    path = Path(path)
    artifact = is_artifact(path)
    ref_folder = resolve_checkpoint(reference)
    task, ref_task = artifact_task(path if artifact else resolve_checkpoint(path)), artifact_task(ref_folder)
    if task != ref_task:
        raise UsageError(f"{path} is a {task} model but the reference {reference} is a {ref_task} model: "
                         "they are different models")
    if precision is None:
        precision = read_manifest(path).get("precision", "fp32") if artifact else "fp32"
    tok_file = next((f for f in (path / "tokenizer.json", ref_folder / "tokenizer.json") if f.is_file()), None)
    tokenizer = Tokenizer.from_file(tok_file) if tok_file else None
    with TorchClassifier(ref_folder, dtype="fp32") as ref_runner:
        info = ref_runner.info
        cases = samples(tokenizer, info.vocab_size, text, task)
        ref_logits = batched_logits(ref_runner, cases)
    report: dict[str, Any] = {"task": task, "precision": precision, "reference": str(reference), "path": str(path),
                              "labels": list(info.labels), "samples": len(cases),
                              "tokens": int(sum(map(len, cases))), "backends": {}}
    for backend in backends:
        if CLASSIFIER_BACKENDS[backend][1] != artifact:
            raise UsageError(f"{path} is not an exported artifact; the {backend} backend needs one" if not artifact
                             else f"{path} is an ONNX artifact; the {backend} backend runs a checkpoint folder")
        with create_classifier(backend, path, **(runner_options or {}).get(backend, {})) as runner:
            if runner.info.labels != info.labels:
                raise UsageError(f"{path} has labels {list(runner.info.labels)} but the reference has "
                                 f"{list(info.labels)}: they are different models")
            cand = batched_logits(runner, cases)
        values = metrics(ref_logits, cand, info.problem_type)
        values.update(judge(values, precision))
        report["backends"][backend] = values
    report["passed"] = all(v["passed"] for v in report["backends"].values())
    return report


def format_table(report: dict[str, Any]) -> str:
    unit = "sequences" if report["task"] == "text-classification" else "tokens"
    rows = next(iter(report["backends"].values()))["rows"] if report["backends"] else 0
    lines = [f"parity of {report['path']} vs {report['reference']} ({report['task']}, {report['precision']}, "
             f"{rows} {unit} from {report['samples']} padded samples, labels {', '.join(report['labels'])})",
             f"{'backend':<12} {'max|err|':>10} {'max|dprob|':>10} {'labels':>7}  verdict"]
    for name, v in report["backends"].items():
        failed = [f"{k} {c['value']:.3g} (tol {c['tolerance']:g})" for k, c in v["checks"].items() if not c["passed"]]
        lines.append(f"{name:<12} {v['max_abs_error']:>10.2e} {v['max_prob_error']:>10.2e} "
                     f"{v['label_agreement']:>7.3f}  " + ("PASS" if v["passed"] else "FAIL: " + "; ".join(failed)))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
