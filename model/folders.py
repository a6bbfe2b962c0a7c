"""Checkpoint folders without torch: bundled names, Hugging Face Hub ids in the local cache,
and the weight files a folder holds.

The runtimes, the tokenizer and ``starlift info`` use these on the core install (no torch), so
they live apart from ``checkpoint.py``, which loads weights into the PyTorch model.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

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
