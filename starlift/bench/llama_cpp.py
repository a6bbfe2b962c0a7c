"""llama.cpp as a peer of ``starlift bench``: llama-cpp-python in its own venv (``make llama-cpp``),
driven through ``llama_cpp_worker.py`` in a subprocess, so starlift's venv never depends on it."""

from __future__ import annotations

import os
from pathlib import Path

from starlift.core.errors import UsageError

from .speed import WorkerPeer, _Row

QUANTS = ("f32", "q8_0", "q4_0", "q4_k_m")
# the precision column: which starlift rows a llama.cpp row is compared with
PRECISION = {"f32": "fp32", "q8_0": "int8", "q4_0": "int4", "q4_k_m": "int4"}
DEFAULT_DIR = Path("~/.cache/starlift/llama.cpp")  # `make llama-cpp`'s default LLAMA_CPP_DIR
DEFAULT_CACHE = Path("~/.cache/starlift/gguf")
# Tokenizers whose BPE pre-tokenizer llama.cpp's converter does not recognize by its hash, declared
# by name: starcoder2-nano's has StarCoder2's (individual digits, then byte-level).
PRE_TOKENIZER = "starcoder"


def resolve(python_or_dir: str | Path) -> tuple[Path, Path]:
    """(python, llama.cpp tree) from ``make llama-cpp``'s folder or from its venv's python."""
    given = Path(python_or_dir).expanduser()
    if given.is_dir():
        python, folder = given / "venv" / "bin" / "python", given
    else:  # FOLDER/venv/bin/python (not resolved: a venv's python is a symlink to the system's)
        python = given.absolute()
        folder = python.parents[2] if len(python.parents) > 2 else python.parent
    tree = folder / "llama.cpp"
    if not python.is_file() or not os.access(python, os.X_OK):
        raise UsageError(f"--llama-cpp {python_or_dir}: no interpreter at {python}; build llama.cpp with "
                         "`make llama-cpp` (LLAMA_CPP_DIR, default ~/.cache/starlift/llama.cpp) and pass that folder")
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise UsageError(f"--llama-cpp {python_or_dir}: {tree}/convert_hf_to_gguf.py is missing; pass the folder "
                         "`make llama-cpp` wrote (it holds venv/ and llama.cpp/)")
    return python, tree


class LlamaCppPeer(WorkerPeer):
    """llama-cpp-python's ``Llama`` on a GGUF converted from the checkpoint by llama.cpp's own
    ``convert_hf_to_gguf.py`` and quantized by ``llama_model_quantize`` (cached in ``cache_dir``).
    Batch 1 only (the binding's ``Llama`` holds one sequence); measured end to end, like the
    optimum peer, so no latency-by-position curve."""

    name = "llama.cpp"
    label = "--llama-cpp"
    venv_hint = "build it with `make llama-cpp` and pass LLAMA_CPP_DIR"
    WORKER = Path(__file__).with_name("llama_cpp_worker.py")
    max_batch = 1

    def __init__(self, python_or_dir: str | Path, checkpoint: Path, quant: str, cache_dir: str | Path | None = None,
                 threads: int | None = None, n_ctx: int = 8192, flash_attn: bool = False,
                 pre_tokenizer: str | None = PRE_TOKENIZER, lookup: int | None = None):
        from starlift.model import resolve_checkpoint

        python, self.tree = resolve(python_or_dir)
        super().__init__(python, resolve_checkpoint(checkpoint), quant, threads)
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
        self.n_ctx, self.flash_attn, self.pre_tokenizer = n_ctx, flash_attn, pre_tokenizer
        self.lookup = lookup  # llama-cpp-python's prompt-lookup decoding with this many draft tokens

    def _command(self) -> list[str]:
        cmd = [self.python, str(self.WORKER), "serve", str(self.checkpoint), "--quant", self.precision,
               "--tree", str(self.tree), "--workdir", str(self.cache_dir), "--n-ctx", str(self.n_ctx)]
        cmd += ["--threads", str(self.threads)] if self.threads else []
        cmd += ["--pre-tokenizer", self.pre_tokenizer] if self.pre_tokenizer else []
        cmd += ["--lookup", str(self.lookup)] if self.lookup else []
        return cmd + (["--flash-attn"] if self.flash_attn else [])

    def _ready(self, reply: dict) -> None:
        super()._ready(reply)
        self.gguf, self.version = reply["gguf"], reply.get("llama_cpp")

    def decode(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
        if batch != 1:
            raise UsageError("the llama.cpp peer runs batch 1 only")
        return self.request({"cmd": "decode", "prompt_len": prompt_len, "new_tokens": new_tokens, "seed": 0})

    def complete(self, ids: list[int], new_tokens: int) -> dict:
        """Greedy ``new_tokens`` after the prompt ``ids``: tokens, TTFT and total seconds."""
        return self.request({"cmd": "complete", "ids": [int(t) for t in ids], "new_tokens": new_tokens})

    def tokenize(self, text: str) -> list[int]:
        return self.request({"cmd": "tokenize", "text": text})["ids"]


def rows(python_or_dir: str, reference: Path, quants, cache_dir, threads: int | None, n_ctx: int = 8192,
         flash_attn: bool = False) -> list[_Row]:
    from starlift.model import Starcoder2Config, resolve_checkpoint

    reference = resolve_checkpoint(reference)  # a folder or a bundled name (the worker gets a folder)
    bad = [q for q in quants if q not in QUANTS]
    if bad or not quants:
        raise UsageError(f"--llama-cpp-quant takes {', '.join(QUANTS)}, got {bad or 'nothing'}")
    resolve(python_or_dir)  # fail before any model is loaded
    config = Starcoder2Config.from_hf(reference)
    kv = config.kv_cache_bytes(1, bytes_per_value=2)  # llama.cpp's default KV cache type is f16
    # weight_bytes (and the bytes a step reads) are replaced by the GGUF's size once it exists
    return [_Row(f"llama.cpp {q}", str(reference), "llama.cpp",
                 lambda q=q: LlamaCppPeer(python_or_dir, reference, q, cache_dir, threads, n_ctx, flash_attn),
                 config.num_parameters() * 4, PRECISION[q], kv)
            for q in quants]
