#!/usr/bin/env python
"""Fine-tune starcoder2-nano into "starcoder2-nano-edit": the same model, taught to re-emit a file
with a small change.

Why: issue 18's edit workload (re-emitting a file with a small change) is where prompt-lookup
speculation pays, but only on a model that copies. starcoder2-nano (6M parameters, 72 minutes of
training) does not: its greedy continuations of the edit prompts follow the file for 0-2 tokens
(docs/performance/latency.md section 6), while real StarCoder2 models re-emit files. This script
continues nano's training on nano's own training files (its held-out files stay held out) with a
share of every batch made of edit pairs, ``<file_sep> original <file_sep> edited <|endoftext|>``:
a line-aligned chunk of a training file and the same chunk after one random edit (an identifier
renamed everywhere, a line deleted, a line inserted, a number or a string changed). The rest of
each batch is nano's own data stream (files, half as fill-in-the-middle), so it stays a code model.

Chunks are at most --max-chunk tokens so that the copy distance stays inside nano's 256-token
sliding window: a token cannot attend to its original further back than that (a 6-layer model
can pass information further, not copy exactly).

The checkpoint measured in docs/performance/latency.md section 8 took three runs, each from the
one before (--base), 1,900 steps in all, about 50 minutes on two threads (fp32):

    .venv/bin/python training/finetune_edit.py --steps 500 --threads 2 --out nano-edit
    .venv/bin/python training/finetune_edit.py --base nano-edit --steps 700 --edit-share 0.8 \
        --lr 1.5e-3 --threads 2 --out nano-edit2
    .venv/bin/python training/finetune_edit.py --base nano-edit2 --steps 700 --edit-share 0.8 \
        --lr 1.5e-3 --seed 1235 --threads 2 --out nano-edit3

On a CPU with native bf16 (AVX-512 BF16), ``--precision bf16`` on each of the three gave a
copy top-1 of 0.884 (fp32: 0.881) in 30 minutes instead of 50 (section 9 of the same page).

Before and after, on the held-out files: teacher-forced loss on the first 8 windows (nano's
validation subset); teacher-forced top-1 on the edited half of 40 edit pairs ("copy top-1");
and, on the bench's own edit requests (``starlift.bench.latency``, one identifier renamed), how
many of 64 greedy tokens follow the edited file before the first difference.
"""

from __future__ import annotations

import argparse
import json
import keyword
import math
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# train_nano sets the thread variables from --threads before torch starts (it reads sys.argv).
# isort: off
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_nano as tn  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
# isort: on

from starlift.model import Tokenizer, load_checkpoint, resolve_checkpoint, save_checkpoint  # noqa: E402

FILE_SEP = 6  # <file_sep> in StarCoder2's (and nano's) special-token order
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
_NUMBER = re.compile(r"\b\d+\b")
_STRING = re.compile(r"(['\"])([A-Za-z ]{3,})\1")
_RENAMES = (lambda w: w + "_v2", lambda w: w + "2", lambda w: "new_" + w, lambda w: w + "_old",
            lambda w: w[:1].upper() + w[1:] if w[:1].islower() else w.lower(), lambda w: w + "_list")


def edit(text: str, rng: random.Random) -> str:
    """One small random edit of a chunk of code (the text itself when none applies)."""
    lines = text.splitlines(keepends=True)
    kind = rng.choices(("rename", "delete", "insert", "number", "string"), weights=(5, 1, 1, 1, 1))[0]
    if kind == "rename":
        counts: dict[str, int] = {}
        for w in _IDENT.findall(text):
            counts[w] = counts.get(w, 0) + 1
        words = sorted(w for w, c in counts.items() if c >= 2 and not keyword.iskeyword(w))
        if words:
            word = rng.choice(words)
            return re.sub(rf"\b{re.escape(word)}\b", rng.choice(_RENAMES)(word), text)
    if kind == "delete" and len(lines) > 2:
        del lines[rng.randrange(1, len(lines))]
        return "".join(lines)
    if kind == "insert" and len(lines) > 1:
        k = rng.randrange(1, len(lines))
        indent = re.match(r"[ \t]*", lines[k]).group(0)
        lines.insert(k, indent + rng.choice(("# TODO: check this\n", "pass\n", "print(locals())\n", "\n")))
        return "".join(lines)
    if kind == "number" and _NUMBER.search(text):
        spots = list(_NUMBER.finditer(text))
        m = rng.choice(spots)
        return text[:m.start()] + str(int(m.group(0)) + rng.randint(1, 9)) + text[m.end():]
    if kind == "string" and _STRING.search(text):
        m = rng.choice(list(_STRING.finditer(text)))
        return text[:m.start(2)] + m.group(2).upper() + text[m.end(2):]
    return edit(text, rng) if rng.random() < 0.9 else text


def edit_stream(tok: HFTokenizer, texts: list[str], min_tokens: int, max_chunk: int, rng: random.Random) -> np.ndarray:
    """Edit pairs packed one after another, [<file_sep>, original, <file_sep>, edited, EOT], at
    least min_tokens of them."""
    weights = [len(t) for t in texts]
    pairs: list[list[int]] = []
    total = 0
    while total < min_tokens:
        originals, edited = [], []
        while len(originals) < 256:
            text = rng.choices(texts, weights=weights)[0]
            lines = text.splitlines(keepends=True)
            start = rng.randrange(len(lines))
            budget = rng.randint(24, max_chunk) * 3  # characters: nano's tokens average 3-4 characters
            chunk = ""
            for line in lines[start:]:
                if chunk and len(chunk) + len(line) > budget:
                    break
                chunk += line
            if chunk.strip():
                originals.append(chunk)
                edited.append(edit(chunk, rng))
        for o, e in zip(tn.encode(tok, originals), tn.encode(tok, edited), strict=True):
            pairs.append([FILE_SEP, *o[:max_chunk], FILE_SEP, *e[:max_chunk], tn.EOT])
            total += len(pairs[-1])
    return np.fromiter((t for p in pairs for t in p), dtype=np.int64)


def edit_requests(folder: Path, edit_tokens: int) -> list:
    """The bench's edit requests on the held-out files (starlift bench --workload latency)."""
    from starlift.bench.latency import edit_requests as bench_edit_requests

    return bench_edit_requests(Tokenizer.from_pretrained(folder), edit_tokens)


def follows(model, requests) -> list[int]:
    """For each request, how many of its 64 greedy tokens equal the edited file's continuation."""
    out = []
    for r in requests:
        gen = tn.greedy(model, r.ids, r.new_tokens, 1024)
        ref = r.detail["reference_continuation"]
        out.append(next((i for i, (a, b) in enumerate(zip(gen, ref, strict=False)) if a != b), min(len(gen), len(ref))))
    return out


@torch.no_grad()
def copy_top1(model, pairs: list[list[int]]) -> float:
    """Teacher-forced top-1 accuracy on the edited half of edit pairs (held-out files): how often
    the model's next token is the right one while re-emitting."""
    model.eval()
    hits = total = 0
    for p in pairs:
        x = torch.tensor([p])
        logits, _ = model(x[:, :-1])
        k = p.index(FILE_SEP, 1)  # the second <file_sep>: the edited copy follows it
        hits += int((logits[0, k:].argmax(-1) == x[0, k + 1:]).sum())
        total += len(p) - 1 - k
    return hits / total


def heldout_pairs(tok, held_texts: list[str], count: int = 40) -> list[list[int]]:
    stream = edit_stream(tok, held_texts, 20000, 224, random.Random(7)).tolist()
    ends = [i for i, t in enumerate(stream) if t == tn.EOT]
    return [stream[a + 1:b + 1] for a, b in zip([-1, *ends], ends, strict=False)][:count]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="starcoder2-nano", help="the checkpoint to fine-tune")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16 autocast pays only on CPUs with native bf16: 1.6x faster per step on an "
                         "AVX-512 BF16 EPYC, 15x slower on an AVX2-only one (docs/performance/latency.md, "
                         "sections 8 and 9)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--edit-share", type=float, default=0.6, help="share of each batch's rows that are edit pairs")
    ap.add_argument("--max-chunk", type=int, default=224, help="tokens per original chunk (inside the window)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--edit-tokens", type=int, default=200, help="the evaluation's edit requests (as the bench's)")
    args = ap.parse_args()
    if args.max_chunk * 2 + 3 > args.seq_len:
        sys.exit(f"--max-chunk {args.max_chunk}: a pair must fit a window of --seq-len {args.seq_len}")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    base = resolve_checkpoint(args.base)
    base_record = json.loads((base / "training_record.json").read_text())
    # the data split and nano's hyperparameters come from nano's own record, whichever checkpoint
    # is fine-tuned (nano, or an earlier run of this script)
    record = json.loads((resolve_checkpoint("starcoder2-nano") / "training_record.json").read_text())

    # -- data: nano's own split, checked against its record
    train, held, _skipped, _excluded = tn.collect_files(Path(sysconfig.get_paths()["stdlib"]))
    recorded_held = {e["path"] for e in record["data"]["held_out"]}
    if {f["path"] for f in held} != recorded_held:
        sys.exit("this Python's standard library splits differently from the one nano was trained on")
    tok = HFTokenizer.from_file(str(base / "tokenizer.json"))
    texts = [f["text"] for f in train]
    ids = tn.encode(tok, texts)
    plain = tn.Batches(tok, texts, ids, args.seq_len, 1, args.seed, record["hyperparameters"]["fim_rate"])
    n_edit_rows = math.ceil(args.steps * args.batch * args.edit_share) + args.batch
    pair_stream = edit_stream(tok, texts, (n_edit_rows + 1) * args.seq_len + 1, args.max_chunk, rng)
    n_windows = (len(pair_stream) - 1) // args.seq_len
    if n_windows < n_edit_rows:
        sys.exit(f"edit stream too short: {n_windows} windows for {n_edit_rows} rows")
    order = rng.sample(range(n_windows), n_windows)
    edit_windows = [torch.from_numpy(pair_stream[s * args.seq_len:s * args.seq_len + args.seq_len + 1].copy())
                    for s in order]
    tn.log(f"{len(train)} training files; {len(pair_stream):,} edit-pair tokens in {n_windows} windows")

    val_batch = tn.validation_batch(tn.encode(tok, [f["text"] for f in held]), args.seq_len)
    requests = edit_requests(base, args.edit_tokens)
    pairs = heldout_pairs(tok, [f["text"] for f in held])

    def measure(model, when: str) -> dict:
        model.eval()
        with torch.no_grad():
            m = {"val_loss": tn.lm_loss(model, val_batch, "fp32").item(), "copy_top1": copy_top1(model, pairs),
                 "follows": follows(model, requests)}
        tn.log(f"{when}: held-out loss {m['val_loss']:.4f}, copy top-1 {m['copy_top1']:.3f}; greedy tokens "
               f"following the edited file {m['follows']} of 64")
        return m

    model = load_checkpoint(base, dtype=torch.float32)
    before = measure(model, "before")

    # -- train
    model.train()
    opt = tn.make_optimizer(model, args.lr, record["hyperparameters"]["weight_decay"], (0.9, 0.95))
    curve, next_edit = [], 0
    t_train = time.time()
    with tn.fast_attention():
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = tn.lr_at(step, args.steps, args.lr, args.warmup, 0.1)
            rows = []
            for _ in range(args.batch):
                if rng.random() < args.edit_share:
                    rows.append(edit_windows[next_edit])
                    next_edit += 1
                else:
                    rows.append(plain.next()[0])
            loss = tn.lm_loss(model, torch.stack(rows), args.precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"loss is {loss.item()} at step {step + 1}")
            curve.append(round(loss.item(), 4))
            if (step + 1) % 25 == 0 or step + 1 == args.steps:
                el = time.time() - t_train
                tn.log(f"step {step + 1}/{args.steps} loss {np.mean(curve[-25:]):.4f} ({el / (step + 1):.2f} s/step)")
    train_seconds = time.time() - t_train
    after = measure(model, "after")

    # -- the checkpoint: nano's tokenizer, a record of this run beside nano's
    rec = {
        "model": "starcoder2-nano-edit",
        "base": {"name": args.base, "command": base_record["command"], "seed": base_record.get("seed")},
        "command": ".venv/bin/python training/finetune_edit.py " + " ".join(sys.argv[1:]),
        "hyperparameters": vars(args),
        "train_seconds": train_seconds,
        "edit_pairs_tokens": int(len(pair_stream)),
        "loss_curve": curve,
        "before": before,
        "after": after,
        "data": {"held_out": record["data"]["held_out"],
                 "rule": "nano's training files only; nano's held-out files are neither trained on nor edited"},
    }
    with tempfile.TemporaryDirectory(prefix="starcoder2-nano-edit-") as tmp:
        work = Path(tmp)
        (work / "training_record.json").write_text(json.dumps(rec, indent=1) + "\n")
        (work / "README.md").write_text(
            "# starcoder2-nano-edit\n\nstarcoder2-nano fine-tuned for "
            f"{args.steps} steps to re-emit a file with a small change (`training/finetune_edit.py`; "
            "the command and the before/after measurements are in `training_record.json`). A stand-in for a "
            "code model that copies, for the edit workload of `starlift bench --workload latency`.\n")
        extra = {"tokenizer.json": base / "tokenizer.json", "README.md": work / "README.md",
                 "training_record.json": work / "training_record.json"}
        save_checkpoint(model, Path(args.out), force=True, extra_files=extra)
    os.chmod(args.out, 0o755)
    tn.log(f"wrote {args.out}; {train_seconds / 60:.1f} min of training, {(time.time() - t_start) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
