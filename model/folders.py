"""Checkpoint folders without torch: bundled names, Hugging Face Hub ids in the local cache,
and the weight files a folder holds.

The runtimes, the tokenizer and ``starlift info`` use these on the core install (no torch), so
they live apart from ``checkpoint.py``, which loads weights into the PyTorch model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from importlib import resources
from pathlib import Path
from typing import Any

from starlift.core.errors import CheckpointError, UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def bundled_checkpoints() -> dict[str, Path]:
    """Checkpoints shipped inside the package, by name (e.g. ``starcoder2-nano``)."""
    root = Path(str(resources.files("starlift") / "checkpoints"))
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads (HF_HUB_CACHE, HF_HOME, ... as it reads them)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` (its ``main`` revision) in the local Hugging Face cache,
    None when it is not there. huggingface_hub (a dependency of tokenizers, so on the core
    install) reads its own cache layout; ``local_files_only``: starlift never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError (absent), HFValidationError (not a repo id)
        if type(e).__name__ in ("LocalEntryNotFoundError", "HFValidationError", "OfflineModeIsEnabled"):
            return None
        raise


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a path, a bundled name, or a Hub id already in the local
    Hugging Face cache; a clear error otherwise."""
    p = Path(path)
    if p.is_dir():
        return p
    bundled = bundled_checkpoints()
    if str(path) in bundled:
        return bundled[str(path)]
    if p.exists():
        raise UsageError(f"{p} is a file; pass the checkpoint folder that holds config.json and the weights")
    if _HUB_ID.match(str(path)):
        snapshot = hub_snapshot(str(path))
        if snapshot is None:
            raise UsageError(
                f"{path} is not a folder here, and the Hugging Face cache ({hub_cache_dir()}) has no download of it; "
                f"starlift never downloads: run `hf download {path}` (huggingface_hub's CLI; older releases: "
                f"`huggingface-cli download {path}`) where the Hub is reachable, then rerun, or pass the "
                "checkpoint folder")
        if not (snapshot / "config.json").is_file():
            raise CheckpointError(f"the Hugging Face cache's copy of {path} ({snapshot}) has no config.json: the "
                                  f"download is incomplete; run `hf download {path}` again")
        return snapshot
    names = ", ".join(bundled) or "none installed"
    raise UsageError(f"{path} is neither a checkpoint folder nor a bundled checkpoint (bundled: {names}) "
                     "nor a Hugging Face Hub id (org/name)")


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder: one safetensors file, the shards its index names,
    or (only with ``allow_pickle``) pickle files."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"{index} names {name!r}, which is outside the checkpoint folder")
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: shard {name} named by the index is missing; copy the whole checkpoint")
        return [folder / name for name in files]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} has only pickle weights ({', '.join(p.name for p in pickles)}), which can run "
                "arbitrary code when loaded; convert them to safetensors, or pass allow_pickle=True "
                "if you trust their source (they are then loaded with weights_only=True)"
            )
        return pickles
    raise CheckpointError(
        f"{folder} has no weights: expected model.safetensors or model.safetensors.index.json with its shards"
    )


# ---- safetensors headers (checkpoint.py maps the data; the exporter reads dtypes and offsets) --
# bytes per element of each safetensors dtype code
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Validated header of a safetensors file and the byte offset where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download or re-save it")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {n} is larger than the file ({size} bytes); the file is corrupt or truncated")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize, shape, (begin, end) = _ST_ITEMSIZE[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from e
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape or offsets {info!r}")
        nbytes = math.prod(shape) * itemsize
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} offsets {begin}..{end} do not fit its shape {shape} "
                f"({nbytes} bytes) inside {data_len} data bytes; the file is corrupt or truncated"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap; the file is corrupt")
    return header, data_start
