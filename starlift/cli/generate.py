"""``starlift generate PATH --backend B (--prompt | --prompt-file | --fim-prefix/--fim-suffix | --interactive)``."""

from __future__ import annotations

import argparse
import sys

from starlift.core.errors import UsageError
from starlift.runtimes import BACKENDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="artifact folder, or a checkpoint folder / bundled name / cached Hub id with --backend torch")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS),
                   help="runtime to run on (openvino needs starlift[openvino], torch needs starlift[export])")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text, taken as it is (in bash, $'...' turns \\n into a newline)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    src.add_argument("--fim-prefix", help="fill-in-the-middle: the code before the gap (with --fim-suffix); taken as it "
                     "is, like --prompt")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF (one per line)")
    p.add_argument("--fim-suffix", help="fill-in-the-middle: the code after the gap")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: 1, all)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide seen tokens' positive logits by this, multiply negative ones (default: 1, off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=None, help="stop string, not included in the output (repeatable; default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that is too long")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--speculative", choices=["prompt-lookup"], default=None,
                   help="speculative decoding: verify tokens drafted from n-gram matches in the prompt and output, "
                        "several per model call (greedy output unchanged; see docs/guide/speculative.md)")
    p.add_argument("--draft-tokens", type=int, default=8, help="with --speculative: the most draft tokens per call")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's own choice)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the artifact against its manifest: a corrupted or altered weight file then "
                        "runs silently, giving wrong text without any error (default: check; the first load hashes "
                        "every file, later loads only their size/mtime/ctime stamp)")
    p.add_argument("--public-key", default=None,
                   help="refuse the artifact unless it is signed by this public key (KEY.pub) or one in this folder "
                        "(default: no signature required)")


def _read_prompt_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save the prompt as UTF-8") from e
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e


def main(args: argparse.Namespace) -> int:
    import starlift

    if (args.fim_prefix is None) != (args.fim_suffix is None):
        raise UsageError("--fim-prefix and --fim-suffix go together")
    if not (args.prompt is not None or args.prompt_file or args.fim_prefix is not None or args.interactive):
        raise UsageError("give --prompt TEXT, --prompt-file F, --fim-prefix P --fim-suffix S, or --interactive")
    options = {"threads": args.threads} if args.threads else {}
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    ignore_eos=args.ignore_eos, truncate=args.truncate, speculative=args.speculative,
                    draft_tokens=args.draft_tokens)
    from starlift.engine.generation import SamplingParams

    SamplingParams(**{k: v for k, v in sampling.items() if k != "truncate"})  # bad values fail before loading
    gen = starlift.load(args.path, backend=args.backend, verify_artifact=not args.no_verify,
                        public_key=args.public_key, **options)
    with gen:  # the engine thread and the session end here, also on Ctrl-C
        if args.fim_prefix is not None:
            print(gen.fim(args.fim_prefix, args.fim_suffix, stop=args.stop, **sampling))
            return 0
        prompts = [args.prompt if args.prompt is not None else _read_prompt_file(args.prompt_file)] \
            if not args.interactive else None
        if args.interactive:
            print(f"starlift {gen.backend}: one prompt per line (\\n for newlines), Ctrl-D to quit", file=sys.stderr)
            prompts = (line.rstrip("\n").replace("\\n", "\n") for line in sys.stdin)
        for prompt in prompts:
            if not prompt and args.interactive:
                continue  # a blank line in interactive mode
            if args.stream or args.interactive:
                for piece in gen.stream(prompt, stop=args.stop, **sampling):
                    print(piece, end="", flush=True)
                print()
            else:
                print(gen.generate(prompt, stop=args.stop, **sampling))
        return 0
