"""The runner surface every backend implements (after Polygraphy's runners).

A runner holds one loaded model and nothing about sequences. ``activate()`` loads the backend
(imported lazily); ``run(ids, mask, positions, past, logits_to_keep=0)`` is one call of the
decoder graph on a concat cache (past in, present out, both in the backend's own handles;
logits of the last N positions only with ``logits_to_keep=N``: a prefill for generation
passes 1); ``create_cache()`` makes the KV state object that the engine owns and drives (``runtimes/kv.py``: a left-padded
concat batch for every backend, or a backend's own cache such as ONNX Runtime's slot pool).
Shapes and names are read from the loaded model (``_read_metadata_impl``), never from a list of
model types. Inputs are checked against that metadata before the backend sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from starlift.core.errors import StarliftError, UsageError

Past = list[Any]  # one backend handle per past_key_values.{i}.key/value input, in past_names order


@dataclass(frozen=True)
class ModelMeta:
    """What a runner learned from its model: enough to build caches and check inputs."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: np.dtype
    context: int | None = None


class Lifecycle(ABC):
    """activate() / deactivate() and the with-block, shared by decoder and classifier runners:
    ``_load()`` runs once on activation, ``_deactivate_impl()`` once on deactivation."""

    is_active = False

    def activate(self):
        if not self.is_active:
            self._load()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def _load(self) -> None: ...

    def _deactivate_impl(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        return None


class Runner(Lifecycle):
    """activate / run / deactivate around small ``*_impl`` hooks."""

    name = "runner"

    def __init__(self) -> None:
        self.is_active = False
        self.meta: ModelMeta | None = None

    def _load(self) -> None:
        self._activate_impl()
        self.meta = self._read_metadata_impl()

    # ---- the model as a function ----------------------------------------------------------
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: Past, logits_to_keep: int = 0) -> tuple[np.ndarray, Past]:
        """One decoder call on a concat cache: float32 logits (B, T, V), or (B, min(N, T), V) for
        the last N positions with ``logits_to_keep=N`` (0: every position), and the present
        handles (past + the new tokens). ``past`` is consumed: use the returned handles from
        then on. Graphs with the ``logits_to_keep`` input skip the LM head for the other
        positions; for the others (older artifacts, TensorRT, which reads the input as a
        constant) the logits are cut here, so every backend returns the same shape."""
        self._require_active()
        logits_to_keep = check_logits_to_keep(logits_to_keep)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        self.check_inputs(input_ids, attention_mask, position_ids)
        logits, present = self._run_impl(input_ids, attention_mask, position_ids, past, logits_to_keep)
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits, present

    def check_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> None:
        b, t = input_ids.shape if input_ids.ndim == 2 else (None, None)
        if b is None or t == 0:
            raise UsageError(f"input_ids must be (batch, tokens) with tokens >= 1, got shape {input_ids.shape}")
        if attention_mask.ndim != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < t:
            raise UsageError(f"attention_mask must be (batch, past + tokens) with batch {b}, got {attention_mask.shape}")
        if position_ids.shape != (b, t):
            raise UsageError(f"position_ids must be {(b, t)}, got {position_ids.shape}")
        meta = self.meta
        if input_ids.min() < 0 or input_ids.max() >= meta.vocab_size:
            raise UsageError(f"token ids must be in [0, {meta.vocab_size}), got {input_ids.min()}..{input_ids.max()}")
        if meta.context and attention_mask.shape[1] > meta.context:
            raise UsageError(f"{attention_mask.shape[1]} tokens exceed the model's context of {meta.context}")

    # ---- KV handles of a concat cache (row surgery converts at membership changes only) ----
    @abstractmethod
    def empty_past(self, batch: int) -> Past:
        """Zero-length past handles for ``batch`` rows: a prefill is a call with no past."""

    @abstractmethod
    def past_to_numpy(self, past: Past) -> list[np.ndarray]:
        """The handles as numpy arrays (B, G, P, D), for adding or dropping rows."""

    @abstractmethod
    def past_from_numpy(self, arrays: list[np.ndarray]) -> Past:
        """Handles holding these arrays (the inverse of ``past_to_numpy``)."""

    # ---- caches the engine owns -----------------------------------------------------------
    def create_cache(self, max_batch: int):
        """The KV state of up to ``max_batch`` sequences. Every backend gets a left-padded concat
        batch (``ConcatBatch``); a backend with a better cache overrides this."""
        from .kv import ConcatBatch

        self._require_active()
        return ConcatBatch(self, max_batch)

    def single_batch(self, batch: int = 1):
        """A single batch fed by hand, for teacher-forced measurements (parity, quality, tests):
        ``single_batch(b).forward(ids, mask, positions)`` appends to its own cache and returns logits."""
        from .kv import SingleBatch

        self._require_active()
        if batch < 1:
            raise UsageError(f"batch must be at least 1, got {batch}")
        return SingleBatch(self, batch)

    def _require_active(self) -> None:
        if not self.is_active:
            raise StarliftError(f"the {self.name} runner is not active; call activate() or use it in a with-block")

    # ---- hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _read_metadata_impl(self) -> ModelMeta: ...

    @abstractmethod
    def _run_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  past: Past, logits_to_keep: int = 0) -> tuple[np.ndarray, Past]: ...


def check_logits_to_keep(logits_to_keep) -> int:
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
        raise UsageError(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got {logits_to_keep!r}")
    return int(logits_to_keep)


def kv_inputs_from_names(names_shapes: dict[str, tuple]) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from ``past_key_values.{i}.key`` inputs shaped [B, G, P, D]."""
    keys = sorted((n for n in names_shapes if n.startswith("past_key_values.") and n.endswith(".key")),
                  key=lambda n: int(n.split(".")[1]))
    if not keys:
        raise StarliftError("the model has no past_key_values.{i}.key inputs: it is not a starlift/optimum-style "
                            "decoder with a KV cache")
    shape = names_shapes[keys[0]]
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise StarliftError(f"{keys[0]} has shape {shape}; expected [batch, kv_heads, past, head_dim] with static "
                            "kv_heads and head_dim")
    return len(keys), shape[1], shape[3]
