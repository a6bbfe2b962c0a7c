"""Hugging Face checkpoint folders: load (memory-mapped, validated), save, make random ones.

Layout read and written: ``config.json``, ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``, optionally
``tokenizer.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import json
import mmap
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from starlift.core.errors import CheckpointError, UsageError
from starlift.core.fsutil import atomic_output_dir

from .config import PRESETS, Starcoder2Config
from .folders import (  # noqa: F401 (re-exported)
    PICKLE_SUFFIXES,
    bundled_checkpoints,
    read_safetensors_header,
    resolve_checkpoint,
    weight_files,
)
from .heads import model_class
from .modeling import RotaryEmbedding

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# safetensors dtype codes and their torch dtypes.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---- safetensors, read by hand ---------------------------------------------------------------
# The safetensors library copies each tensor out of the file on get_tensor(); reading the
# header ourselves (folders.read_safetensors_header, no torch) lets every tensor be a view into
# one private memory map (no second copy of the weights), and lets us validate dtype, shape and
# offsets before any tensor is touched.

_MAPS: list[weakref.ref] = []


def release_mapped_pages() -> int:
    """Drop the resident pages of every checkpoint memory map still alive (``MADV_DONTNEED``);
    returns how many maps were advised.

    After an export has written its weights, something in torch.export / onnxscript can keep a
    reference to the parameters, and with it their maps: the pages the save read stay resident
    (measured: the whole 1.8 GB of a 3b-wide checkpoint, doubling the validation's peak). The maps
    are private and never written, so dropped pages are read again from the file if touched:
    the values cannot change, only where they live."""
    advised = 0
    for ref in list(_MAPS):
        mm = ref()
        if mm is None:
            _MAPS.remove(ref)
            continue
        try:
            mm.madvise(mmap.MADV_DONTNEED)
            advised += 1
        except (ValueError, OSError, AttributeError):  # closed, or a platform without madvise
            pass
    return advised


def mmap_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one file as views into a private (copy-on-write) memory map."""
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _MAPS.append(weakref.ref(mm))
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if end == begin:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        yield name, raw.view(dtype).reshape(info["shape"])


def iter_checkpoint_tensors(folder: Path, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    for file in weight_files(folder, allow_pickle):
        if file.suffix == ".safetensors":
            yield from mmap_safetensors(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def _expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None,
                    allow_pickle: bool = False, num_layers: int | None = None,
                    compute_dtype: str | None = None) -> torch.nn.Module:
    """Load a Hugging Face StarCoder2 folder (or a bundled name) into the reference model.

    The module follows config.json's ``architectures``: :class:`Starcoder2` for the causal LM,
    ``Starcoder2ForSequenceClassification`` / ``Starcoder2ForTokenClassification`` for the heads.
    Weights are views into a memory map when the stored dtype is the one asked for, so the
    model costs no second copy of the weights. ``dtype`` None keeps the stored dtype.
    ``num_layers``: only the first N decoder layers (with the embedding, final norm and head),
    the reference of a cut validation graph (starlift/core/graphcut.py); the other layers are never read.
    ``compute_dtype``: activations (and the cache) in this dtype whatever the weights' (each weight
    cast when it is used): fp16 weights computed in fp32 hold half the memory of an fp32 model and,
    for an fp16 checkpoint, compute what it computes (torch's CPU fp16 matmuls are also ~100x
    slower than fp32 ones on AVX2 machines).
    """
    import dataclasses

    folder = resolve_checkpoint(path)
    config = Starcoder2Config.from_hf(folder)
    skipped: set[str] = set()
    if num_layers is not None:
        if not 0 < num_layers <= config.num_hidden_layers:
            raise UsageError(f"num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}")
        skipped = {f"model.layers.{i}." for i in range(num_layers, config.num_hidden_layers)}
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = model_class(config)(config)
    expected = _expected_shapes(model)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_tensors(folder, allow_pickle):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta; some old checkpoints store it
        if name == "lm_head.weight" and config.tie_word_embeddings and config.head is None:
            continue  # tied: the head is the embedding matrix, stored once in the model
        if skipped and name.startswith("model.layers.") and ".".join(name.split(".")[:3]) + "." in skipped:
            continue
        if name not in expected:
            raise CheckpointError(
                f"{folder}: unexpected tensor {name!r}; this is not a StarCoder2 checkpoint matching its config.json"
            )
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{folder}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{expected[name]}; the weights do not belong to this config"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{folder}: tensor {name!r} has dtype {tensor.dtype}; expected floating-point weights")
        state[name] = tensor if target is None or tensor.dtype == target else tensor.to(target)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: missing tensor(s) {shown}; the checkpoint is incomplete")
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary = RotaryEmbedding(config)  # non-persistent buffer: rebuilt off the meta device
    if compute_dtype is not None:
        if compute_dtype not in DTYPES:
            raise UsageError(f"unknown compute dtype {compute_dtype!r}; use one of fp32, fp16, bf16")
        model.model.compute_dtype = DTYPES[compute_dtype]
    return model.eval()


def save_checkpoint(model: torch.nn.Module, path: str | Path, force: bool = False,
                    max_shard_bytes: int | None = None, extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``model`` in the layout transformers writes (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = model.config
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    first = next(iter(state.values()))
    hf = config.to_hf()
    hf["torch_dtype"] = dtype_name.get(first.dtype, "float32")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with atomic_output_dir(path, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            (tmp / name).write_bytes(Path(src).read_bytes())
    return Path(path)


def _random_tensors(config: Starcoder2Config, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The random parameters one at a time, in state_dict order (one generator: the same values
    whether they are collected into a model or streamed into files)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = model_class(config)(config)
    for name, p in model.state_dict().items():
        if "layernorm" in name or name.startswith("model.norm"):
            base = 1.0 if name.endswith("weight") else 0.0
            t = base + 0.05 * torch.randn(p.shape, generator=gen)
        else:
            t = 0.02 * torch.randn(p.shape, generator=gen)
        yield name, t.to(dtype)


def init_random(config: Starcoder2Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random model (LM or head, as ``config`` says) whose every parameter (biases and norms too) is non-trivial."""
    with torch.device("meta"):
        model = model_class(config)(config)
    model.load_state_dict(dict(_random_tensors(config, seed, dtype)), assign=True)
    model.model.rotary = RotaryEmbedding(config)
    return model.eval()


def _stream_random_checkpoint(config: Starcoder2Config, path: str | Path, seed: int, dtype: torch.dtype,
                              max_shard_bytes: int, force: bool, extra_files: dict[str, Path] | None) -> Path:
    """A random checkpoint written shard by shard as its tensors are made: the peak is one shard,
    not the model (safetensors' save_file copies every tensor it is given into bytes first; with
    the whole 7b shape in memory that is 2 x 14.4 GB)."""
    from safetensors.torch import save_file

    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    with atomic_output_dir(path, force=force) as tmp:
        shard: dict[str, torch.Tensor] = {}
        names: list[list[str]] = []
        size = total = 0

        def flush() -> None:
            nonlocal shard, size
            save_file(shard, str(tmp / f"shard-{len(names):05d}.safetensors"), metadata={"format": "pt"})
            names.append(list(shard))
            shard, size = {}, 0

        for name, t in _random_tensors(config, seed, dtype):
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[name] = t
            size += nbytes
            total += nbytes
        if shard:
            flush()
        weight_map = {}
        for i, members in enumerate(names):
            final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            (tmp / f"shard-{i:05d}.safetensors").rename(tmp / final)
            weight_map.update({k: final for k in members})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf = config.to_hf()
        hf["torch_dtype"] = dtype_name[dtype]
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            (tmp / name).write_bytes(Path(src).read_bytes())
    return Path(path)


# Above this many weight bytes a random checkpoint is streamed into shards of this size.
STREAM_BYTES = 2 << 30


def random_checkpoint(preset_or_config: str | Starcoder2Config, path: str | Path, seed: int = 0,
                      dtype: str = "fp32", force: bool = False, tokenizer: str | Path | None = None,
                      max_shard_bytes: int | None = None) -> Path:
    """Write a random-init checkpoint (a preset name or a config) for tests and benchmarks."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise UsageError(f"unknown preset {preset_or_config!r}; available: {', '.join(PRESETS)}")
        config = PRESETS[preset_or_config]
    else:
        config = preset_or_config
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    extra = {"tokenizer.json": Path(tokenizer)} if tokenizer else None
    weight_bytes = config.num_parameters() * torch.empty((), dtype=DTYPES[dtype]).element_size()
    if weight_bytes > STREAM_BYTES:
        return _stream_random_checkpoint(config, path, seed, DTYPES[dtype], max_shard_bytes or STREAM_BYTES,
                                         force, extra)
    model = init_random(config, seed, DTYPES[dtype])
    return save_checkpoint(model, path, force=force, max_shard_bytes=max_shard_bytes, extra_files=extra)
