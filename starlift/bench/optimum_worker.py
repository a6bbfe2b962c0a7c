"""The optimum-onnx peer of ``starlift bench``, run as a script by the interpreter of a venv that
has optimum-onnx (``make optimum-venv``): optimum-onnx needs transformers<4.58, starlift uses 5.x,
so the two never share a process. This file imports only the standard library, numpy,
onnxruntime, torch, transformers and optimum: never starlift.

    python optimum_worker.py CHECKPOINT --precision fp32|int8|int4 --workdir DIR [--threads N]

It exports CHECKPOINT the way an optimum user would (StarCoder2 is not supported natively, so the
Mistral-style custom ONNX config), quantizes it with the tools a user of optimum and ONNX Runtime
would pick, caches every export in DIR, loads it with ``ORTModelForCausalLM`` and then answers one
JSON request per stdin line with one JSON reply per stdout line:

    (on startup)                                                 -> {"ready": true, "weight_bytes": ..., "rss_bytes": ...}
    {"batch": 1, "prompt_len": 128, "new_tokens": 128, "seed": 0} -> {"ttft_s": ..., "decode_tokens_per_s": ...}
    {"cmd": "greedy", "ids": [[...]], "new_tokens": 8}            -> {"tokens": [[...]], "logits": [step][batch][vocab]}

Errors: a message on stderr and exit 1 (3 when optimum-onnx cannot be imported).
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
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

# Bump when the recipe below changes so that cached exports are redone.
RECIPE = "1"
PRECISIONS = ("fp32", "int8", "int4")


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS instead
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _prompt(vocab: int, batch: int, length: int, seed: int = 0):
    """The same ids as starlift.bench._prompt (same generator, same formula)."""
    import numpy as np

    return np.random.default_rng(seed).integers(min(38, vocab - 1), vocab, size=(batch, length)).astype(np.int64)


def _read_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    if not path.is_file():
        _fail(f"{checkpoint} has no config.json (expected a Hugging Face checkpoint folder)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "starcoder2":
        _fail(f"{path}: model_type is {config.get('model_type')!r}, expected 'starcoder2'")
    if not list(checkpoint.glob("*.safetensors")):
        _fail(f"{checkpoint} has no *.safetensors weights")
    return config


def _cache_key(checkpoint: Path) -> str:
    """The checkpoint's config and weight files (name, size, mtime) and the tools' versions."""
    import onnxruntime
    import optimum.version
    import torch
    import transformers

    h = hashlib.sha256()
    h.update((checkpoint / "config.json").read_bytes())
    for p in sorted(checkpoint.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"{RECIPE} {optimum.version.__version__} {transformers.__version__} {onnxruntime.__version__} "
             f"{torch.__version__}".encode())
    return h.hexdigest()[:16]


def _staged_checkpoint(checkpoint: Path, config: dict, tmp: Path) -> Path:
    """transformers 5 saves rope_theta inside rope_parameters, which transformers 4.x ignores (it
    would use its default 10000 silently): give 4.x the top-level rope_theta it reads."""
    rope = config.get("rope_parameters")
    if "rope_theta" in config or not isinstance(rope, dict):
        return checkpoint
    if rope.get("rope_type", "default") != "default":
        _fail(f"rope_parameters {rope} is not supported by this worker (only the default RoPE)")
    staged = tmp / "checkpoint"
    staged.mkdir()
    for p in checkpoint.iterdir():
        if p.name != "config.json":
            (staged / p.name).symlink_to(p.resolve())
    (staged / "config.json").write_text(json.dumps({**config, "rope_theta": rope["rope_theta"]}, indent=2))
    return staged


def _export_fp32(checkpoint: Path, config: dict, out: Path) -> None:
    """optimum's documented path for an architecture it does not know: ``main_export`` with a
    custom ONNX config. StarCoder2's decoder inputs (input_ids, attention_mask, position_ids, GQA
    past key/values) are Mistral's, so MistralOnnxConfig describes them."""
    from optimum.exporters.onnx import main_export
    from optimum.exporters.onnx.model_configs import MistralOnnxConfig
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        source = _staged_checkpoint(checkpoint, config, Path(tmp))
        hf_config = AutoConfig.from_pretrained(source)
        onnx_config = MistralOnnxConfig(hf_config, task="text-generation", use_past=True, use_past_in_inputs=True)
        main_export(str(source), out, task="text-generation-with-past", library_name="transformers",
                    custom_onnx_configs={"model": onnx_config})


def _quantize_int8(src: Path, out: Path) -> None:
    """Dynamic int8 through optimum's ORTQuantizer (onnxruntime's quantize_dynamic underneath),
    with the AutoQuantizationConfig preset for this CPU, as optimum's docs show."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = ""
    if Path("/proc/cpuinfo").is_file():
        flags = Path("/proc/cpuinfo").read_text()
    if platform.machine().lower() in ("arm64", "aarch64"):
        qconfig = AutoQuantizationConfig.arm64(is_static=False, per_channel=False)
    elif "avx512_vnni" in flags or "avx512vnni" in flags:
        qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    elif "avx512f" in flags:
        qconfig = AutoQuantizationConfig.avx512(is_static=False, per_channel=False)
    else:
        qconfig = AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
    quantizer = ORTQuantizer.from_pretrained(src, file_name="model.onnx")
    large = sum(p.stat().st_size for p in src.glob("model.onnx*")) >= 2**31
    quantizer.quantize(quantization_config=qconfig, save_dir=out, file_suffix=None,
                       use_external_data_format=large)
    _copy_configs(src, out)


def _quantize_int4(src: Path, out: Path) -> None:
    """int4 weights: optimum has no int4, so this is what a user of ONNX Runtime's own tools would
    do: MatMulNBitsQuantizer on every MatMul (RTN, the tool's default asymmetric), block 32,
    accuracy_level 4 (int8 compute on CPU)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(str(src / "model.onnx"), bits=4, block_size=32, accuracy_level=4)
    quant.process()
    out.mkdir(parents=True, exist_ok=True)
    quant.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    _copy_configs(src, out)


def _copy_configs(src: Path, out: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


def _build(workdir: Path, key: str, precision: str, make) -> Path:
    """``workdir/KEY-PRECISION``, made once: written into a temporary folder, then renamed."""
    final = workdir / f"{key}-{precision}"
    if (final / "model.onnx").is_file():
        return final
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-{precision}-", dir=workdir))
    try:
        make(tmp / "out")
        try:
            os.rename(tmp / "out", final)
        except OSError:  # another worker finished the same export first
            if not (final / "model.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare(checkpoint: Path, precision: str, workdir: Path) -> Path:
    config = _read_config(checkpoint)
    key = _cache_key(checkpoint)
    fp32 = _build(workdir, key, "fp32", lambda out: _export_fp32(checkpoint, config, out))
    if precision == "int8":
        return _build(workdir, key, "int8", lambda out: _quantize_int8(fp32, out))
    if precision == "int4":
        return _build(workdir, key, "int4", lambda out: _quantize_int4(fp32, out))
    return fp32


class Peer:
    def __init__(self, folder: Path, threads: int | None):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        self.torch = torch
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            torch.set_num_threads(threads)
        before = _rss()
        # use_io_binding left as optimum chooses it (None: on for CUDA, off on CPU): a user's default.
        self.model = ORTModelForCausalLM.from_pretrained(folder, session_options=options)
        # The KV-heads fix: ORTModelForCausalLM takes num_key_value_heads from the config only for
        # a fixed list of model types and falls back to num_attention_heads for the others, so the
        # empty first past of a GQA StarCoder2 gets the wrong head count ("past_key_values.0.key:
        # Got 12 Expected 4"). A user sets the attribute after loading.
        self.model.num_key_value_heads = self.model.config.num_key_value_heads
        self.rss_bytes = _rss() - before
        self.weight_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model")
                                and not p.name.endswith(".json"))
        self.vocab = self.model.config.vocab_size

    def _step(self, ids, mask, pos, past):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values

    def _run(self, ids, new_tokens: int, on_logits=None):
        """Prefill, then greedy steps; mirrors starlift.bench.run_decode. Returns (tokens, times)."""
        torch = self.torch
        batch, prompt_len = ids.shape
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, past = self._step(ids, torch.ones_like(ids), torch.arange(prompt_len).expand(batch, -1), None)
            token = logits[:, -1].argmax(-1)
            ttft = time.perf_counter() - t0
            if on_logits:
                on_logits(logits[:, -1])
            tokens = [token]
            t1 = time.perf_counter()
            for step in range(new_tokens - 1):
                pos = prompt_len + step
                logits, past = self._step(token[:, None], torch.ones((batch, pos + 1), dtype=torch.int64),
                                          torch.full((batch, 1), pos, dtype=torch.int64), past)
                token = logits[:, -1].argmax(-1)
                tokens.append(token)
                if on_logits:
                    on_logits(logits[:, -1])
            decode = time.perf_counter() - t1
        return torch.stack(tokens, 1), ttft, decode

    def decode(self, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
        ids = self.torch.from_numpy(_prompt(self.vocab, batch, prompt_len, seed))
        _, ttft, decode = self._run(ids, new_tokens)
        return {"ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / decode}

    def greedy(self, ids: list, new_tokens: int) -> dict:
        """Greedy tokens and every step's last-position logits (for checking against transformers)."""
        steps = []
        tokens, _, _ = self._run(self.torch.tensor(ids, dtype=self.torch.int64), new_tokens,
                                 on_logits=lambda x: steps.append(x.float().tolist()))
        return {"tokens": tokens.tolist(), "logits": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    # Replies go to the real stdout; anything a library prints goes to stderr instead.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as e:
        _fail(f"{sys.executable} cannot import optimum-onnx ({e}); run `make optimum-venv`", 3)
    try:
        folder = prepare(args.checkpoint.resolve(), args.precision, args.workdir.expanduser().resolve())
        peer = Peer(folder, args.threads)
        send({"ready": True, "weight_bytes": peer.weight_bytes, "rss_bytes": peer.rss_bytes, "folder": str(folder),
              "use_io_binding": bool(peer.model.use_io_binding)})
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            cmd = req.get("cmd", "decode")
            if cmd == "decode":
                send(peer.decode(int(req["batch"]), int(req["prompt_len"]), int(req["new_tokens"]),
                                 int(req.get("seed", 0))))
            elif cmd == "greedy":
                send(peer.greedy(req["ids"], int(req["new_tokens"])))
            elif cmd == "quit":
                break
            else:
                _fail(f"unknown request {cmd!r}")
    except SystemExit:
        raise
    except Exception as e:  # the parent reads the last line; the traceback helps debugging
        traceback.print_exc(file=sys.stderr)
        _fail(f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
