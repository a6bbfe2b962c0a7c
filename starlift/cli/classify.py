"""``starlift classify PATH --text T [--text T ...] [--file F] [--top-k K | --all] [--aggregation S] [--json]``.

Runs the classification pipeline of PATH's task (text- or token-classification, read from the
artifact) and prints one block per text, or the pipeline's output as JSON.
"""

from __future__ import annotations

import argparse
import json

from starlift.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="classification artifact folder, or checkpoint folder with --backend torch")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    p.add_argument("--file", action="append", default=None, help="a UTF-8 file whose whole content is one text "
                                                                 "(repeatable)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime, openvino or torch")
    p.add_argument("--top-k", type=int, default=None, help="text-classification: the K best labels (default 1)")
    p.add_argument("--all", action="store_true", help="text-classification: every label, best first")
    p.add_argument("--function", default=None, choices=["softmax", "sigmoid", "none"],
                   help="text-classification: score function (default: from the model's problem type)")
    p.add_argument("--aggregation", default="none", choices=["none", "simple"],
                   help="token-classification: group adjacent tokens of one entity (simple) or not (none)")
    p.add_argument("--ignore-label", action="append", default=None,
                   help="token-classification: a label not to print (repeatable; default O)")
    p.add_argument("--truncate", action="store_true", help="keep the start of a text longer than the context")
    p.add_argument("--batch-size", type=int, default=8, help="texts run together in one padded batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's own choice)")
    p.add_argument("--json", action="store_true", help="print the pipeline's output as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's hash check")


def main(args: argparse.Namespace) -> int:
    import starlift
    from starlift.api import artifact_task, is_artifact
    from starlift.cli.generate import _read_prompt_file
    from starlift.model.checkpoint import resolve_checkpoint

    texts = list(args.text or []) + [_read_prompt_file(f) for f in args.file or []]
    if not texts:
        raise UsageError("give at least one --text TEXT or --file F")
    if args.top_k is not None and args.all:
        raise UsageError("--top-k and --all go separately: --all prints every label")
    task = artifact_task(args.path if is_artifact(args.path) else resolve_checkpoint(args.path))
    if task not in ("text-classification", "token-classification"):
        raise UsageError(f"{args.path} is a {task} model; `starlift classify` runs classifiers "
                         "(use `starlift generate` for a causal LM)")
    options = {"threads": args.threads} if args.threads else {}
    pipe = starlift.pipeline(task, model=args.path, backend=args.backend, verify_artifact=not args.no_verify,
                             batch_size=args.batch_size, truncation=args.truncate, **options)
    if task == "text-classification":
        call = {"function_to_apply": args.function}
        if args.all or args.top_k is not None:
            call["top_k"] = None if args.all else args.top_k
        results = pipe(texts, **call)
    else:
        results = pipe(texts, aggregation_strategy=args.aggregation, ignore_labels=args.ignore_label)
    if args.json:  # the pipeline's own output for the list of texts
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    if task == "text-classification" and "top_k" not in call:
        results = [[r] for r in results]  # one dict per text: printed like a top-1 list
    for i, (text, result) in enumerate(zip(texts, results, strict=True)):
        if len(texts) > 1:
            print(f"[{i}] {text[:60]!r}")
        if task == "text-classification":
            for r in result:
                print(f"{r['label']}\t{r['score']:.4f}")
        else:
            key = "entity_group" if args.aggregation == "simple" else "entity"
            for r in result:
                where = f"{r['start']}:{r['end']}"
                print(f"{where:>9}  {r[key]:<16} {r['score']:.4f}  {r['word']!r}")
    return 0
