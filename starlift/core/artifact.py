"""The artifact folder: its manifest, verification, and the configs runtimes read.

Shared by export (which writes artifacts) and runtimes (which verify them before loading), so
it lives in the top-level package: runtimes never import export.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import ArtifactError, UsageError
from .fsutil import sha256_file

FORMAT = "starlift-artifact/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
# The decoder's optional input: logits for the last N positions only (int64 scalar, default 0 = all).
LOGITS_TO_KEEP = "logits_to_keep"
# ONNX metadata (metadata_props) of a graph whose GroupQueryAttention reads each row's length from
# the attention mask (seqlens_k = index of the last 1 per row): "true" lets a runner keep many
# sequences of different lengths in one shared, right-padded buffer (ONNX Runtime's slot pool)
PER_ROW_LENGTHS_KEY = "starlift.kv_cache.per_row_lengths"
# The node of the decoder graph that turns logits_to_keep into the start of the positions kept
# (export/trace.py); every Slice that keeps those positions reads its output
LOGITS_TO_KEEP_START = "/model/logits_to_keep/Start"
# The ort flavour runs each layer's attention in an If on this boolean value (export/gqa.py): the
# kernel without the padding bias and the sliding window where no row needs them, the full one
# otherwise
FAST_PATH_CONDITION = "attention_fast_path"
# A 4-bit artifact's optional second graph for wide steps (``starlift quantize --int8-gemm``,
# quantize/int8_gemm.py): the same decoder contract, its matmuls on the integer GEMM, its weights
# read from model.onnx.data. Its metadata names the steps a runner sends to it: a row's step of at
# least min_tokens new tokens (a prompt), a decode step of at least min_rows rows.
GEMM_FILE = "int8_gemm.onnx"
GEMM_MIN_TOKENS_KEY = "starlift.int8_gemm.min_tokens"
GEMM_MIN_ROWS_KEY = "starlift.int8_gemm.min_rows"


def past_names(layers: int) -> list[str]:
    """The decoder contract's KV inputs, layer by layer: key then value."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """The decoder contract's KV outputs, in the order of ``past_names``."""
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _safe_member(folder: Path, name: str) -> Path:
    """A file named by the manifest, refused if it would leave the artifact folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise ArtifactError(f"{folder}/{MANIFEST} names {name!r}, which points outside the artifact folder "
                            "(only plain file names inside it are allowed); refusing it")
    parts = Path(name).parts
    if any(p in ("..", ".") for p in parts) or len(parts) != 1:
        raise ArtifactError(f"{folder}/{MANIFEST} names {name!r}, which points outside the artifact folder; refusing it")
    path = folder / name
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link; artifacts must hold real files (re-export it)")
    return path


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``folder`` and write manifest.json with ``info``."""
    from .signing import SIGNATURE

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    manifest = {"format": FORMAT, "files": files, **info}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """The parsed manifest of ``folder`` (from ``data`` when the caller already read, and checked, its bytes)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if data is None:
        data = _manifest_bytes(folder)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is damaged, re-export it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} has no file list; the artifact is damaged, re-export it")
    return manifest


def _manifest_bytes(folder: Path) -> bytes:
    if not folder.is_dir():
        raise UsageError(f"{folder} is not an artifact folder; pass the folder `starlift export` wrote")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {folder} is not a starlift artifact (re-export it)")
    return path.read_bytes()


def stamp_path(folder: str | Path) -> Path:
    """Where the verification stamp of ``folder`` is kept: the user's cache (``STARLIFT_CACHE_DIR``,
    else ``XDG_CACHE_HOME/starlift``, else ``~/.cache/starlift``), never the artifact folder,
    which a service may only be able to read."""
    root = os.environ.get("STARLIFT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "starlift"
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:32]
    return Path(root).expanduser() / "verified" / f"{key}.json"


def _file_stamps(paths: dict[str, Path]) -> dict[str, list[int]]:
    """size, mtime, ctime, inode and device of every file: any write, copy, move, chmod or touch
    changes at least one (ctime cannot be set back by a program)."""
    stamps = {}
    for name, path in paths.items():
        st = path.stat()
        stamps[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return stamps


def _stamp_matches(folder: Path, manifest_sha: str, paths: dict[str, Path]) -> bool:
    try:
        stamp = json.loads(stamp_path(folder).read_text())
        return (stamp.get("folder") == str(folder.resolve()) and stamp.get("manifest_sha256") == manifest_sha
                and stamp.get("files") == _file_stamps(paths))
    except (OSError, ValueError):
        return False


def _write_stamp(folder: Path, manifest_sha: str, paths: dict[str, Path]) -> None:
    path = stamp_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"folder": str(folder.resolve()), "manifest_sha256": manifest_sha,
                                   "files": _file_stamps(paths)}))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a full hash on the next load


def verify(folder: str | Path, check_onnx: bool = True, public_key: str | Path | None = None, *,
           fast: bool = False, stamp: bool = True) -> dict[str, Any]:
    """Check every file the manifest names against its sha256, refuse names leaving the folder,
    run the ONNX checker (``check_onnx``, when the ``onnx`` package is installed).

    With ``public_key`` (a public-key file or a folder of trusted ones) the manifest's signature is
    checked first, over the very bytes then parsed, and files the manifest does not list are refused.

    ``fast`` (what loading does): when the files still have the size, mtime, ctime and inode
    recorded the last time they were all hashed and found to match this very manifest, they are
    not hashed again; any write, copy or touch since then brings the full hash back. Without
    ``fast`` (``starlift verify``) every byte is hashed. Either way a full hash that passes records
    the stamp (unless ``stamp=False``: an exporter checking its temporary folder).
    """
    folder = Path(folder)
    data = _manifest_bytes(folder)
    if public_key is not None:
        from .signing import SIGNATURE, check_signature, trusted_keys

        check_signature(folder, data, trusted_keys(public_key))
    manifest = read_manifest(folder, data)
    paths = {name: _safe_member(folder, name) for name in manifest["files"]}  # every name before any hash
    if public_key is not None:
        unlisted = sorted(p.name for p in folder.iterdir() if p.name not in paths and p.name not in (MANIFEST, SIGNATURE))
        if unlisted:
            raise ArtifactError(f"{folder} holds {', '.join(unlisted)}, which the signed manifest does not list; "
                                "remove it or re-export and re-sign the artifact")
    for path in paths.values():
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete (copy it whole or re-export it)")
    for required in (MODEL_FILE, "config.json"):
        if required not in manifest["files"]:
            raise ArtifactError(f"{folder}: the manifest lists no {required}; the artifact is incomplete")
    manifest_sha = hashlib.sha256(data).hexdigest()
    if not (fast and _stamp_matches(folder, manifest_sha, paths)):
        for name, expected in manifest["files"].items():
            actual = sha256_file(paths[name])
            if actual != expected:
                raise ArtifactError(f"{paths[name]} does not match its sha256 in the manifest (expected "
                                    f"{expected[:12]}..., got {actual[:12]}...): the file was changed or corrupted; "
                                    "re-export it")
        if stamp:
            _write_stamp(folder, manifest_sha, paths)
    if check_onnx:
        try:
            import onnx
        except ImportError:
            manifest = {**manifest, "onnx_checker": "ONNX checker skipped: the onnx package is not installed "
                                                    "(pip install 'starlift[quantize]')"}
        else:
            try:  # on the path, not a loaded proto: models over 2 GB have external data
                onnx.checker.check_model(str(folder / MODEL_FILE))
            except onnx.checker.ValidationError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ArtifactError(f"{folder / MODEL_FILE} fails the ONNX checker: {first}") from e
    return manifest


def shares_kv_buffer(model_path: str | Path) -> bool | None:
    """Whether the artifact around ``model_path`` says its graph updates a shared past/present
    buffer in place (GroupQueryAttention: ``kv_cache.shared_buffer``, written by the exporter from
    the fused graph; older ort-flavour manifests only say ``flavour: ort``). None when there is no
    manifest to ask (a bare ONNX file)."""
    path = Path(model_path).parent / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is damaged, re-export it") from e
    kv = manifest.get("kv_cache") if isinstance(manifest, dict) else None
    if isinstance(kv, dict) and "shared_buffer" in kv:
        return bool(kv["shared_buffer"])
    return manifest.get("flavour") == "ort" if isinstance(manifest, dict) else None


def genai_config(config, *, flavour: str, share_buffer: bool, eos_token_id: int | None,
                 bos_token_id: int | None, pad_token_id: int | None, context: int | None = None) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for a decoder artifact, token ids inside the vocabulary."""
    vocab = config.vocab_size

    def inside(token: int | None, fallback: int) -> int:
        return token if isinstance(token, int) and 0 <= token < vocab else fallback

    eos = inside(eos_token_id, 0)
    return {
        "model": {
            "bos_token_id": inside(bos_token_id, eos),
            "context_length": context or config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": inside(pad_token_id, eos),
            "type": "decoder",
            "vocab_size": vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context or config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
