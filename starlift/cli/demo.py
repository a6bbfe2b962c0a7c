"""``starlift demo``: the main job end to end on the embedded default model.

Export starcoder2-nano (portable and ort flavours), quantize, run the parity gate, complete a
few code prompts and one fill-in-the-middle on ONNX Runtime and OpenVINO, and print one table
(backend, flavour, precision, tokens/s, parity verdict) and the completions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\nimport"]
FIM = ("def area(width, height):\n    return ", "\n\n\nprint(area(3, 4))\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="keep the demo's artifacts here (default: a temporary folder)")
    p.add_argument("--model", default="starcoder2-nano", help="checkpoint to run (default: the bundled nano model)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion")


def _tokens_per_second(gen, prompt: str, n: int) -> float:
    ids = gen.tokenizer.encode(prompt)
    gen.generate(ids, max_new_tokens=4, ignore_eos=True)  # warm-up
    start = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=n, ignore_eos=True)
    return len(out) / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> int:
    import starlift
    from starlift.evaluation import parity
    from starlift.export import export_checkpoint
    from starlift.model import bundled_checkpoints
    from starlift.quantize import quantize_artifact

    if args.model == "starcoder2-nano" and "starcoder2-nano" not in bundled_checkpoints():
        print("starcoder2-nano is not bundled in this install; pass --model CHECKPOINT")
        return 1
    with tempfile.TemporaryDirectory(prefix="starlift-demo-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        arts: dict[tuple[str, str], Path] = {}
        for flavour in ("portable", "ort"):
            out = work / f"nano-{flavour}-fp32"
            print(f"export {args.model} -> {out} ({flavour})", flush=True)
            export_checkpoint(args.model, out, flavour=flavour, force=True, progress=False)
            arts[(flavour, "fp32")] = out
        for mode in ("int8", "int4"):
            out = work / f"nano-ort-{mode}"
            print(f"quantize {arts[('ort', 'fp32')].name} -> {out.name} ({mode})", flush=True)
            quantize_artifact(arts[("ort", "fp32")], out, mode=mode, force=True, progress=False)
            arts[("ort", mode)] = out

        runs = [("onnxruntime", "ort", "fp32"), ("onnxruntime", "portable", "fp32"), ("openvino", "portable", "fp32"),
                ("onnxruntime", "ort", "int8"), ("onnxruntime", "ort", "int4")]
        rows, completions = [], {}
        for backend, flavour, precision in runs:
            path = arts[(flavour, precision)]
            report = parity.run(path, args.model, [backend], steps=200)
            gen = starlift.load(path, backend=backend)
            tps = _tokens_per_second(gen, PROMPTS[0], 64)
            if (backend, precision) in (("onnxruntime", "fp32"), ("openvino", "fp32")) and backend not in completions:
                # A 6M-parameter model loops under plain greedy decoding; a mild repetition penalty
                # (transformers' rule) keeps the completions readable.
                completions[backend] = ([(p, gen.generate(p, max_new_tokens=args.max_new_tokens, stop=["\n\n\n"],
                                                          repetition_penalty=1.2)) for p in PROMPTS],
                                        gen.fim(*FIM, max_new_tokens=16, repetition_penalty=1.2))
            gen.close()
            b = report["backends"][backend]
            rows.append((backend, flavour, precision, tps, b["top1_agreement"], b["mean_kl"],
                         "PASS" if report["passed"] else "FAIL"))

        print()
        print(f"{'backend':<12} {'flavour':<9} {'precision':<9} {'tokens/s':>9} {'top1':>6} {'mean KL':>9}  parity")
        for backend, flavour, precision, tps, top1, kl, verdict in rows:
            print(f"{backend:<12} {flavour:<9} {precision:<9} {tps:>9.1f} {top1:>6.3f} {kl:>9.2e}  {verdict}")
        for backend, (texts, middle) in completions.items():
            print(f"\n===== completions on {backend} (greedy, repetition penalty 1.2) =====")
            for prompt, text in texts:
                print(f"--- {prompt!r}\n{prompt}{text}")
            print(f"--- fill-in-the-middle\n{FIM[0]}[{middle}]{FIM[1]}")
        failed = [r for r in rows if r[-1] != "PASS"]
    return 1 if failed else 0
