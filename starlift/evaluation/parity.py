"""The parity gate: teacher-forced logits of any runner against the reference model.

The reference is the project's PyTorch model in float32 on the reference checkpoint. Each
backend's runner reads the same text in the same windows as the quantize gate
(``starlift.evaluation.quality``: prefill windows, then cached decode steps inside the first
one), and is judged by the one tolerance policy (``starlift.core.tolerance``) for the
artifact's precision, against the reference. Reported Polygraphy-style: each check with its
value and tolerance; the gate passes only when every check of every backend does. Greedy
continuations are reported beside (how many tokens match the reference's).

``localize=True`` adds, per backend, where it leaves the reference: the first decoder layer
and sub-block over tolerance and the error curve (``starlift.evaluation.localize``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import tolerance
from starlift.core.errors import UsageError

from . import quality
from .quality import BUILTIN_TEXT  # noqa: F401 - the short snippet, re-exported for callers


class _ModelSource:
    """The reference PyTorch model as a LogitSource (one full pass per window)."""

    kind = "logits"

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def prefill(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.tensor([ids]))[0][0].numpy()

    def decode(self, ids: list[int], prompt: int) -> np.ndarray:  # pragma: no cover - the reference only prefills
        raise NotImplementedError


def greedy(runner, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens through the engine (the one token loop), EOS ignored."""
    from starlift.engine import Engine, SamplingParams

    with Engine(runner, max_batch=1) as engine:
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=steps, ignore_eos=True)).wait()
        if handle.error is not None:
            raise handle.error
        return handle.token_ids


def _release_reference() -> None:
    """Make sure a released reference model's weights leave the process: a lingering reference
    (a cycle, a cached graph) would keep its memory-mapped pages resident beside the next model
    (a 7b fp16 reference is 14.4 GB). Dropped pages are read again from the file if touched."""
    import gc

    from starlift.model.checkpoint import release_mapped_pages

    gc.collect()
    release_mapped_pages()


def run(path: str | Path, reference: str | Path, backends: list[str], text: str | None = None, steps: int = 32,
        greedy_steps: int = 16, precision: str | None = None, runner_options: dict | None = None,
        windows: int = quality.WINDOWS, window_tokens: int = quality.WINDOW_TOKENS, localize: bool = False,
        localize_tokens: int | None = None, reference_dtype: str = "fp32") -> dict[str, Any]:
    """Compare each backend's runner on ``path`` with the reference checkpoint; returns the report.

    ``reference_dtype``: the dtype the torch reference holds its weights in; it computes in float32
    (``load_checkpoint``'s ``compute_dtype``). fp32 (the default) needs 4 bytes per parameter, so
    big checkpoints (7b: 28.8 GB) keep the fp16 they are stored in; the bounds widen by fp16's own
    rounding (``tolerance.reference_allowance``), which covers an fp32 checkpoint's weights
    rounded to fp16 (for an fp16 checkpoint the reference is exact and the widening is slack)."""
    from starlift.evaluation import heads

    if heads.is_head(path):  # a classifier: its labels and probabilities instead of next-token logits
        return heads.run(path, reference, backends, text=text, precision=precision, runner_options=runner_options)
    from starlift.api import is_artifact
    from starlift.core.artifact import read_manifest
    from starlift.model import load_checkpoint, resolve_checkpoint
    from starlift.model.tokenizer import Tokenizer
    from starlift.runtimes import BACKENDS, create_runner
    from starlift.runtimes.torch_runner import TorchRunner

    from . import localize as loc

    for b in backends:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend {b!r}; available backends: {', '.join(BACKENDS)}")
    if reference_dtype not in tolerance.FLOAT_PRECISIONS:
        raise UsageError(f"--reference-dtype {reference_dtype!r}: use one of {', '.join(tolerance.FLOAT_PRECISIONS)}")
    if localize and reference_dtype != "fp32":
        raise UsageError("--localize compares the residual stream with the fp32 reference's: drop --reference-dtype "
                         f"{reference_dtype} (or --localize)")
    path = Path(path)
    artifact = is_artifact(path)
    manifest = read_manifest(path) if artifact else {}
    precision = tolerance.check_precision(precision or manifest.get("precision", "fp32"))
    # the reference computes in float32 whatever its weights are held in (fp16 weights: half the
    # memory; for an fp16 checkpoint, exactly the fp32 reference's numbers)
    ref_model = load_checkpoint(reference, dtype=reference_dtype, compute_dtype="fp32")
    config = ref_model.config
    tok_file = next((f for f in (path / "tokenizer.json", resolve_checkpoint(reference) / "tokenizer.json")
                     if f.is_file()), None)
    tokenizer = Tokenizer.from_file(tok_file) if tok_file else None
    plan = quality.make_plan(tokenizer, config.vocab_size, config.max_position_embeddings, text, windows=windows,
                             window_tokens=window_tokens, steps=steps)
    shape = tolerance.Shape.of(config)
    ref_run = quality.run_reference(_ModelSource(ref_model, "reference"), plan)
    probe = ref_stream = None
    if localize:
        all_ids = [t for w in plan.windows for t in w]
        length = localize_tokens or loc.default_probe_length(config, len(all_ids))
        probe = loc.make_probe(all_ids, length)
        ref_stream = loc.reference_stream(ref_model, probe)
    del ref_model  # the backends' sessions never share memory with the reference's weights
    _release_reference()
    ref_runner = TorchRunner(reference, dtype=reference_dtype, compute_dtype="fp32").activate()
    ref_greedy = greedy(ref_runner, plan.windows[0][:plan.prompt], greedy_steps)
    ref_runner.deactivate()
    del ref_runner
    _release_reference()
    report: dict[str, Any] = {"precision": precision, "reference": str(reference),
                              "reference_dtype": reference_dtype, "path": str(path),
                              "tokens": plan.tokens, "windows": len(plan.windows), "text": plan.text,
                              "decode_prompt_tokens": plan.prompt, "decode_steps": plan.steps,
                              "perplexity_reference": ref_run.perplexity, "backends": {}}
    for backend in backends:
        if BACKENDS[backend][2] and not artifact:
            raise UsageError(f"{path} is not an exported artifact; the {backend} backend needs one")
        runner = create_runner(backend, path, **(runner_options or {}).get(backend, {}))
        with runner:
            if runner.meta.vocab_size != config.vocab_size:
                raise UsageError(f"{path} has a vocabulary of {runner.meta.vocab_size} but the reference has "
                                 f"{config.vocab_size}: they are different models")
            values = quality.measure(ref_run, quality.RunnerSource(runner, backend), plan, precision, shape,
                                     against="reference", reference_precision=reference_dtype)
            got_greedy = greedy(runner, plan.windows[0][:plan.prompt], greedy_steps)
        match = next((i for i, (a, b) in enumerate(zip(ref_greedy, got_greedy, strict=True)) if a != b),
                     len(ref_greedy))
        values["greedy_match_tokens"] = match
        values["greedy_steps"] = greedy_steps
        if localize:
            if backend in loc.LOCALIZE_BACKENDS and artifact:
                result = loc.localize(path, backend, precision, shape, probe, ref_stream, manifest)
                values["first_divergence"] = result["first_divergence"]
                values["localization"] = result
            else:
                values["first_divergence"] = None
                values["localization"] = {"skipped": f"localization runs on {', '.join(loc.LOCALIZE_BACKENDS)} "
                                                     "artifacts"}
        report["backends"][backend] = values
    report["passed"] = all(v["passed"] for v in report["backends"].values())
    return report


def format_table(report: dict[str, Any]) -> str:
    if report.get("task") in ("text-classification", "token-classification"):
        from starlift.evaluation.heads import format_table as head_table

        return head_table(report)
    from . import localize as loc

    lines = [f"parity of {report['path']} vs {report['reference']} ({report['precision']}; {report['tokens']} tokens "
             f"in {report['windows']} window(s) of {report['text']}, + {report['decode_steps']} cached decode steps)",
             f"{'backend':<12} {'max|err|':>10} {'mean KL':>10} {'top1':>7} {'top5':>7} {'cache':>10} {'greedy':>8}"
             "  verdict"]
    for name, v in report["backends"].items():
        failed = [f"{k} {c['value']:.3g} (tol {c['tolerance']:.3g})" for k, c in v["checks"].items() if not c["passed"]]
        if not v["finite"]:
            failed.insert(0, "non-finite logits")
        lines.append(f"{name:<12} {v['max_abs_error']:>10.2e} {v['mean_kl']:>10.2e} {v['top1_agreement']:>7.3f} "
                     f"{v['top5_agreement']:>7.3f} {v['cache_consistency']:>10.2e} "
                     f"{v['greedy_match_tokens']:>4}/{v['greedy_steps']:<3}  "
                     + ("PASS" if v["passed"] else "FAIL: " + "; ".join(failed)))
    for v in report["backends"].values():
        result = v.get("localization")
        if result and "curve" in result:
            lines.append("")
            lines.append(loc.format_curve(result))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def write_json(report: dict[str, Any], out: str | Path) -> None:
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
