"""``starlift bench PATH... [--backend B ...] [--prompt-len] [--new-tokens] [--batch] [--reps] [--peers CKPT]
[--genai] [--optimum PYTHON]``."""

from __future__ import annotations

import argparse
import json

from starlift.core.errors import UsageError
from starlift.runtimes import BACKENDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="artifact folders (every one is a row)")
    p.add_argument("--workload", choices=("decode", "latency"), default="decode",
                   help="decode: tokens/s, TTFT, batches, memory; latency: the code-completion workload (TTFT on "
                        "long prompts, fill-in-the-middle and edit requests from held-out files, end-to-end latency), "
                        "see starlift/bench/latency.py")
    p.add_argument("--backend", action="append", default=None, choices=list(BACKENDS),
                   help="backend to run the artifacts on (repeatable; default: onnxruntime)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before the timed decode")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per repetition")
    p.add_argument("--batch", default="1,4,8", help="comma-separated batch sizes (1 is always measured)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per row and batch, interleaved; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's own choice)")
    p.add_argument("--positions", default=None,
                   help="comma-separated cache positions for the step-latency curve (default: none measured)")
    p.add_argument("--peers", metavar="CHECKPOINT", default=None,
                   help="also run transformers' eager Starcoder2ForCausalLM on this checkpoint (default: no peers; needs starlift[bench])")
    p.add_argument("--genai", action="store_true",
                   help="also run onnxruntime-genai's own generation loop on each artifact (a peer; needs starlift[genai])")
    p.add_argument("--optimum", metavar="PYTHON", default=None,
                   help="also run optimum-onnx's export of the --peers checkpoint (ORTModelForCausalLM; fp32, dynamic "
                        "int8, int4 MatMulNBits) through this interpreter, which must have optimum-onnx: it needs "
                        "transformers<4.58, so it lives in its own venv (`make optimum-venv`: .venv-optimum/bin/python)")
    p.add_argument("--optimum-precision", default="fp32,int8,int4", metavar="LIST",
                   help="comma-separated optimum-onnx rows (default fp32,int8,int4)")
    p.add_argument("--optimum-cache", metavar="DIR", default=None,
                   help="where optimum-onnx exports are cached, keyed by checkpoint and precision "
                        "(default ~/.cache/starlift/optimum-onnx)")
    p.add_argument("--llama-cpp", metavar="PYTHON_OR_DIR", default=None,
                   help="also run llama.cpp (llama-cpp-python) on the --peers checkpoint, converted by llama.cpp's own "
                        "convert_hf_to_gguf.py: the folder `make llama-cpp` wrote (default ~/.cache/starlift/llama.cpp) "
                        "or its venv's python; batch 1 only")
    p.add_argument("--llama-cpp-quant", default="f32,q8_0,q4_0", metavar="LIST",
                   help="comma-separated llama.cpp rows: f32, q8_0, q4_0, q4_k_m (default f32,q8_0,q4_0)")
    p.add_argument("--llama-cpp-cache", metavar="DIR", default=None,
                   help="where GGUF conversions are cached (default ~/.cache/starlift/gguf)")
    p.add_argument("--sequential", action="store_true",
                   help="load and time one row at a time, for models that do not fit in memory together "
                        "(rows are then not interleaved)")
    g = p.add_argument_group("latency workload (--workload latency)")
    g.add_argument("--ttft-lens", default="1024,4096", metavar="LIST", help="prompt lengths for time to first token")
    g.add_argument("--fim-prefix", default="1024,4096", metavar="LIST",
                   help="fill-in-the-middle prefix budgets in tokens (clipped to the model's context)")
    g.add_argument("--fim-suffix", type=int, default=128, help="fill-in-the-middle suffix tokens")
    g.add_argument("--fim-new-tokens", type=int, default=32, help="tokens generated per fill-in-the-middle request")
    g.add_argument("--edit-tokens", type=int, default=512, help="tokens of the file the edit request re-emits")
    g.add_argument("--edit-new-tokens", type=int, default=64, help="tokens generated per edit request")
    g.add_argument("--requests", type=int, default=3, help="requests per fim size and for edit")
    g.add_argument("--llama-cpp-flash-attn", action="store_true",
                   help="llama.cpp with flash attention (default: off)")
    g.add_argument("--speculative", choices=["prompt-lookup"], default=None,
                   help="also run each artifact with this speculative decoding (rows side by side with plain)")
    g.add_argument("--draft-tokens", type=int, default=8, help="with --speculative: draft tokens per step")
    g.add_argument("--llama-cpp-lookup", type=int, default=None, metavar="K",
                   help="also run each llama.cpp quant with llama-cpp-python's prompt-lookup decoding, K draft tokens")
    p.add_argument("--json", default=None, help="write the report here (default: only the table is printed)")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here (matplotlib; default: no chart)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} values must be positive, got {text!r}")
    return values


def _latency(args: argparse.Namespace) -> int:
    from starlift.bench import latency

    quants = tuple(x.strip() for x in args.llama_cpp_quant.split(",") if x.strip())
    report = latency.run(args.paths, args.backend or ["onnxruntime"], args.peers, llama_cpp=args.llama_cpp,
                         llama_cpp_quants=quants, llama_cpp_cache=args.llama_cpp_cache,
                         flash_attn=args.llama_cpp_flash_attn, ttft_lens=_ints(args.ttft_lens, "--ttft-lens"),
                         fim_prefixes=_ints(args.fim_prefix, "--fim-prefix"), fim_suffix=args.fim_suffix,
                         fim_new=args.fim_new_tokens, edit_tokens=args.edit_tokens, edit_new=args.edit_new_tokens,
                         requests_per_size=args.requests, reps=args.reps, threads=args.threads,
                         progress=not args.no_progress, speculative=args.speculative, draft_tokens=args.draft_tokens,
                         llama_cpp_lookup=args.llama_cpp_lookup)
    print(latency.format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def main(args: argparse.Namespace) -> int:
    from starlift.bench import speed as bench

    if args.workload == "latency":
        return _latency(args)

    batches = tuple(sorted(set([1, *_ints(args.batch, "--batch")])))
    positions = _ints(args.positions, "--positions") if args.positions else None
    report = bench.run(args.paths, args.backend or ["onnxruntime"], prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, batches=batches, reps=args.reps, peers_reference=args.peers, genai=args.genai,
                       optimum_python=args.optimum, optimum_cache=args.optimum_cache,
                       optimum_precisions=tuple(x.strip() for x in args.optimum_precision.split(",") if x.strip()),
                       llama_cpp=args.llama_cpp, llama_cpp_cache=args.llama_cpp_cache,
                       llama_cpp_quants=tuple(x.strip() for x in args.llama_cpp_quant.split(",") if x.strip()),
                       threads=args.threads, positions=positions, progress=not args.no_progress,
                       sequential=args.sequential)
    print(bench.format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        bench.plot(report, args.plot)
    return 0
