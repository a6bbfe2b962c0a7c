"""The llama.cpp peer of ``starlift bench``, run as a script by the interpreter of the venv that
`make llama-cpp` builds (llama-cpp-python compiled for this CPU, plus convert_hf_to_gguf.py's own
requirements: transformers<5). starlift's venv never imports llama_cpp: this file imports only
the standard library, numpy and llama_cpp (and, in ``convert`` mode, llama.cpp's converter).

    python llama_cpp_worker.py serve CHECKPOINT --quant f32|q8_0|q4_0|q4_k_m --tree LLAMA_CPP_TREE
                                     --workdir DIR [--threads N] [--pre-tokenizer NAME] [--flash-attn]
                                     [--lookup K]

It converts CHECKPOINT with the tree's own ``convert_hf_to_gguf.py`` (f32; in a child process,
so the converter's torch never stays in the measured process), quantizes through
``llama_cpp.llama_model_quantize``, caches every GGUF in DIR, loads it with ``llama_cpp.Llama``
and answers one JSON request per stdin line with one JSON reply per stdout line:

    (on startup)                                                 -> {"ready": true, "weight_bytes", "rss_bytes", "gguf"}
    {"cmd": "decode", "prompt_len": 128, "new_tokens": 128, "seed": 0} -> {"ttft_s", "decode_tokens_per_s"}
    {"cmd": "complete", "ids": [...], "new_tokens": 32}          -> {"tokens", "ttft_s", "total_s"}
    {"cmd": "tokenize", "text": "..."}                           -> {"ids": [...]}

``--lookup K`` loads the model with llama-cpp-python's own prompt-lookup decoding
(``LlamaPromptLookupDecoding(num_pred_tokens=K)``, its default 2-gram matching) as the draft
model; ``complete`` then runs the binding's ``Llama.generate`` loop (greedy), which verifies
the drafts (the binding computes every position's logits then: ``logits_all`` is forced on).

Generation is greedy and runs exactly ``new_tokens`` steps (EOS does not stop it: every row does
the same work). Logits are read with ``llama_get_logits`` after each ``eval``: with
``logits_all=False`` (llama.cpp then computes only the last position's logits, as a generation
prefill should) ``Llama.scores`` is never filled.

``convert`` mode (used by ``serve``): ``python llama_cpp_worker.py convert CHECKPOINT OUT.gguf
--tree TREE [--pre-tokenizer NAME]``. ``--pre-tokenizer`` declares the BPE pre-tokenizer of a
tokenizer the converter does not know by its hash (the converter's own update script would
download reference tokenizers from the hub to learn it): starcoder2-nano's tokenizer has
StarCoder2's pre-tokenizer (individual digits, then byte-level), so it is declared ``starcoder``.

Errors: a message on stderr and exit 1 (3 when llama_cpp cannot be imported).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts this file's folder (the starlift package) first on sys.path: drop it
# so that none of starlift's module names can shadow a library's.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

# Bump when the recipe below changes so that cached conversions are redone.
RECIPE = "1"
QUANTS = ("f32", "q8_0", "q4_0", "q4_k_m")


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _prompt(vocab: int, length: int, seed: int = 0):
    """The same ids as starlift.bench.speed._prompt, batch 1 (same generator, same formula)."""
    import numpy as np

    return np.random.default_rng(seed).integers(min(38, vocab - 1), vocab, size=(1, length)).astype(np.int64)[0]


# ---- convert ----------------------------------------------------------------------------------
def convert(checkpoint: Path, out: Path, tree: Path, pre_tokenizer: str | None) -> None:
    """llama.cpp's own convert_hf_to_gguf.py, run in this process (a child of ``serve``)."""
    import runpy

    script = tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        _fail(f"{script} is missing: pass the llama.cpp tree that `make llama-cpp` unpacks (LLAMA_CPP_DIR/llama.cpp)")
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    if pre_tokenizer:
        from conversion import base

        recognized = base.TextModel.get_vocab_base_pre

        def declared(self, tokenizer):
            try:
                return recognized(self, tokenizer)
            except NotImplementedError:  # an unknown hash: the pre-tokenizer the caller declared
                return pre_tokenizer

        base.TextModel.get_vocab_base_pre = declared
    sys.argv = [str(script), str(checkpoint), "--outfile", str(out), "--outtype", "f32"]
    runpy.run_path(str(script), run_name="__main__")


def _cache_key(checkpoint: Path, pre_tokenizer: str | None) -> str:
    import llama_cpp

    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        if (checkpoint / name).is_file():
            h.update((checkpoint / name).read_bytes())
    for p in sorted(checkpoint.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"{RECIPE} {llama_cpp.__version__} {pre_tokenizer}".encode())
    return h.hexdigest()[:16]


def _build(final: Path, make) -> Path:
    """``final``, made once: written beside it under a temporary name, then renamed."""
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}-", dir=final.parent)
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


def _convert_child(checkpoint: Path, out: Path, tree: Path, pre_tokenizer: str | None) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "convert", str(checkpoint), str(out), "--tree", str(tree)]
    if pre_tokenizer:
        cmd += ["--pre-tokenizer", pre_tokenizer]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        lines = [x for x in done.stdout.splitlines() if x.strip()]
        hint = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
        _fail(f"convert_hf_to_gguf.py failed on {checkpoint}: {hint}")


def _quantize(src: Path, dst: Path, quant: str, threads: int | None) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = threads or 0
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        _fail(f"llama_model_quantize {quant} of {src} failed")


def prepare(checkpoint: Path, quant: str, tree: Path, workdir: Path, pre_tokenizer: str | None,
            threads: int | None) -> Path:
    if not (checkpoint / "config.json").is_file():
        _fail(f"{checkpoint} has no config.json (expected a Hugging Face checkpoint folder)")
    if not (checkpoint / "tokenizer.json").is_file():
        _fail(f"{checkpoint} has no tokenizer.json: llama.cpp's converter needs the tokenizer (copy the model's "
              "tokenizer.json next to its weights)")
    key = _cache_key(checkpoint, pre_tokenizer)
    f32 = _build(workdir / f"{key}-f32.gguf", lambda out: _convert_child(checkpoint, out, tree, pre_tokenizer))
    if quant == "f32":
        return f32
    return _build(workdir / f"{key}-{quant}.gguf", lambda out: _quantize(f32, out, quant, threads))


# ---- serve ------------------------------------------------------------------------------------
class Peer:
    def __init__(self, gguf: Path, threads: int | None, n_ctx: int, flash_attn: bool, lookup: int | None = None):
        import llama_cpp
        import numpy as np

        self.np = np
        before = _rss()
        draft = None
        if lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
        self.lookup = bool(lookup)
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   # with a draft model the binding needs logits_all=True passed: it
                                   # forces the flag on, but sizes its score buffer from the argument
                                   logits_all=bool(lookup), flash_attn=flash_attn, verbose=False, draft_model=draft)
        self.rss_bytes = _rss() - before
        self.weight_bytes = gguf.stat().st_size
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(logits.argmax())

    def run(self, ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Prefill, then greedy steps: (tokens, seconds to the first token, total seconds)."""
        llm = self.llm
        llm.reset()
        if self.lookup:  # the binding's own speculative loop: greedy, drafts verified per eval
            t0 = time.perf_counter()
            tokens, ttft = [], None
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                tokens.append(int(token))
                if len(tokens) == new_tokens:
                    break
            return tokens, ttft, time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.eval(ids)
        token = self._next()
        ttft = time.perf_counter() - t0
        tokens = [token]
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = self._next()
            tokens.append(token)
        return tokens, ttft, time.perf_counter() - t0

    def decode(self, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
        _, ttft, total = self.run(_prompt(self.vocab, prompt_len, seed).tolist(), new_tokens)
        return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / (total - ttft)}


def serve(args) -> None:
    # Replies go to the real stdout; anything a library prints goes to stderr instead.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        _fail(f"{sys.executable} cannot import llama_cpp ({e}); run `make llama-cpp`", 3)
    checkpoint = args.checkpoint.resolve()
    gguf = prepare(checkpoint, args.quant, args.tree.resolve(), args.workdir.expanduser().resolve(),
                   args.pre_tokenizer, args.threads)
    peer = Peer(gguf, args.threads, args.n_ctx, args.flash_attn, args.lookup)
    send({"ready": True, "weight_bytes": peer.weight_bytes, "rss_bytes": peer.rss_bytes, "gguf": str(gguf),
          "n_vocab": peer.vocab, "llama_cpp": llama_cpp.__version__})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.get("cmd", "decode")
        if cmd == "decode":
            send(peer.decode(int(req["prompt_len"]), int(req["new_tokens"]), int(req.get("seed", 0))))
        elif cmd == "complete":
            tokens, ttft, total = peer.run([int(t) for t in req["ids"]], int(req["new_tokens"]))
            send({"tokens": tokens, "ttft_s": ttft, "total_s": total})
        elif cmd == "tokenize":
            send({"ids": peer.llm.tokenize(req["text"].encode("utf-8"), add_bos=False, special=True)})
        elif cmd == "quit":
            break
        else:
            _fail(f"unknown request {cmd!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("--quant", choices=QUANTS, required=True)
    s.add_argument("--tree", type=Path, required=True)
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--n-ctx", type=int, default=8192)
    s.add_argument("--pre-tokenizer", default=None)
    s.add_argument("--flash-attn", action="store_true")
    s.add_argument("--lookup", type=int, default=None, help="prompt-lookup decoding with K draft tokens")
    c = sub.add_parser("convert")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--tree", type=Path, required=True)
    c.add_argument("--pre-tokenizer", default=None)
    args = p.parse_args()
    try:
        if args.mode == "convert":
            convert(args.checkpoint, args.out, args.tree, args.pre_tokenizer)
        else:
            serve(args)
    except SystemExit:
        raise
    except Exception as e:  # the parent reads the last line; the traceback helps debugging
        traceback.print_exc(file=sys.stderr)
        _fail(f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
