"""``starlift init-random PRESET OUT --seed N``: a random-init checkpoint in Hugging Face layout."""

from __future__ import annotations

import argparse

from starlift.model.config import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the saved weights")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to copy into the checkpoint (default: none)")
    p.add_argument("--max-shard-mb", type=int, default=None, help="shard the weights into files of this size (default: one file)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def main(args: argparse.Namespace) -> int:
    from starlift.model.checkpoint import random_checkpoint

    shard = args.max_shard_mb * 1024 * 1024 if args.max_shard_mb else None
    out = random_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype, force=args.force,
                            tokenizer=args.tokenizer, max_shard_bytes=shard)
    print(f"wrote {out}")
    return 0
