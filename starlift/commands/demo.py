"""``starlift demo``: the main job end to end on the embedded default model."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from starlift.model import load_checkpoint, random_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="keep the demo's files here (default: a temporary folder)")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="starlift-demo-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        ckpt = random_checkpoint("tiny", work / "tiny-random", seed=0, force=True)
        model = load_checkpoint(ckpt)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            past = model.empty_past()
            out = []
            for _ in range(16):
                logits, past = model(ids, past=past, attention_mask=torch.ones(1, past[0][0].shape[2] + ids.shape[1],
                                                                                dtype=torch.long))
                ids = logits[:, -1:].argmax(-1)
                out.append(int(ids))
        print(f"reference model on a random tiny checkpoint ({ckpt}): greedy ids {out}")
    return 0
