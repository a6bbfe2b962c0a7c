"""The ``starlift`` console script: one parser, one module per subcommand (``add_arguments`` + ``main``).

Failures print one line on stderr (exit 2 for bad usage, 1 for a failed operation); ``--debug``
shows the traceback. SIGTERM is turned into an exception so temporary folders are removed.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import traceback

from starlift.core.errors import StarliftError
from starlift.core.extras import error_for_missing_module, require

# subcommand -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "info": ("starlift.cli.info", "describe a checkpoint: parameters, bytes, KV-cache memory"),
    "init-random": ("starlift.cli.init_random", "write a random-init checkpoint of a preset shape"),
    "export": ("starlift.cli.export", "export a checkpoint to a validated ONNX artifact"),
    "quantize": ("starlift.cli.quantize", "fp16/int8/int4 artifacts with their quality measured"),
    "verify": ("starlift.cli.verify", "check an artifact's hashes, file names and ONNX graph (and signature)"),
    "keygen": ("starlift.cli.keygen", "create an Ed25519 key pair for signing artifacts"),
    "sign": ("starlift.cli.sign", "sign an artifact's manifest with a private key"),
    "generate": ("starlift.cli.generate", "generate text or fill in the middle on any backend"),
    "classify": ("starlift.cli.classify", "label texts or their tokens with a classification artifact"),
    "parity": ("starlift.cli.parity", "teacher-forced logits of runners vs the reference; exit 1 on FAIL"),
    "bench": ("starlift.cli.bench", "decode speed, TTFT, batch throughput, RSS and roofline vs peers"),
    "bench-serve": ("starlift.cli.bench_serve", "the engine under many callers: streams vs offline batch, Poisson "
                                                "arrivals (TTFT, inter-token), a long prompt arriving"),
    "profile": ("starlift.cli.profile", "where a decode step's time goes: ORT kernels by op, framework, Python"),
    "serve": ("starlift.cli.serve", "an OpenAI-compatible HTTP server on the engine (starlift[serve])"),
    "loadtest": ("starlift.cli.loadtest", "many streaming clients against an OpenAI-compatible server: throughput, "
                                          "TTFT, inter-token latency, 5xx, leaked slots, server RSS"),
    "soak": ("starlift.cli.soak", "thousands of generations in one process, RSS sampled (leak check)"),
    "demo": ("starlift.cli.demo", "the main job end to end on the embedded default model"),
}

# What a command needs beyond the core install (numpy, tokenizers, onnxruntime), checked before it
# starts so that a missing extra is one line naming it, not an ImportError halfway through.
REQUIRES = {
    "init-random": ("torch", "safetensors"),
    "export": ("torch", "safetensors", "onnx", "onnxscript", "onnx_ir", "tqdm"),
    "quantize": ("onnx", "onnx_ir", "tqdm"),
    "parity": ("torch", "safetensors"),
    "bench": ("torch", "onnx", "psutil", "tqdm"),
    "profile": ("onnx",),
    "soak": ("psutil",),
    "demo": ("torch", "safetensors", "onnx", "onnxscript", "onnx_ir", "tqdm", "openvino"),
    "keygen": ("cryptography",),
    "sign": ("cryptography",),
}

# Commands that write an output folder: an interrupted one keeps nothing of it.
WRITERS = {"init-random", "export", "quantize"}

# The Python API's keyword spellings in error messages, as the command line spells them.
FLAGS = [
    (re.compile(r"\bverify_artifact=False\b"), "--no-verify"),
    (re.compile(r"\ballow_pickle=True\b"), "--allow-pickle"),
    (re.compile(r"\btruncate=True\b"), "--truncate"),
    (re.compile(r"\bignore_eos=True\b"), "--ignore-eos"),
    (re.compile(r"\btemperature must\b"), "--temperature must"),
    *[(re.compile(rf"\b{name}\b"), "--" + name.replace("_", "-"))
      for name in ("max_new_tokens", "top_k", "top_p", "repetition_penalty")],
]


def as_flags(message: str) -> str:
    """An API error message with its keyword arguments spelled as the CLI's flags."""
    for pattern, flag in FLAGS:
        message = pattern.sub(flag, message)
    return message


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already or has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and "%(default)" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other failure of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so cleanup handlers run."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the fault tests via a subprocess
    raise _Terminated()


def build_parser() -> argparse.ArgumentParser:
    from starlift import __version__

    parser = _Parser(
        prog="starlift",
        description="StarCoder2 from PyTorch to validated ONNX artifacts and interchangeable runtimes.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"starlift {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def add_artifact_output_options(p: argparse.ArgumentParser, stage: str) -> None:
    """The options every command that writes an artifact takes (export, quantize)."""
    p.add_argument("--sign-key", default=None, help="sign the artifact with this private key as it is written "
                   "(see `starlift keygen`; default: unsigned)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help=f"memory the {stage} may use, e.g. 20G (default: what the machine has available); "
                        "refused before it starts when the estimated peak is larger")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script: huge pages for the weights (see hugepages.py)
        from starlift.core.hugepages import reexec_with_huge_pages

        reexec_with_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    command = f"starlift {args.command}"
    try:
        require(*REQUIRES.get(args.command, ()), purpose=command)
        return int(importlib.import_module(args._module).main(args) or 0)
    except StarliftError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{command}: error: {as_flags(str(e))}", file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, _Terminated):
        kept = "; no partial output was kept" if args.command in WRITERS else ""
        print(f"{command}: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as e:  # an operation failed for a reason we did not foresee
        if args.debug:
            traceback.print_exc()
        extra = error_for_missing_module(e, command) if isinstance(e, ModuleNotFoundError) else None
        if extra is not None:  # an optional library that a backend or an option needs
            print(f"{command}: error: {extra}", file=sys.stderr)
            return extra.exit_code
        print(f"{command}: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
