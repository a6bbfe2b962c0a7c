"""The runner surface every backend implements (after Polygraphy's runners).

A runner owns one model and its KV cache. ``activate()`` loads the backend (imported lazily),
``reset(batch)`` starts an empty cache, ``forward(ids, mask, positions)`` runs a prefill or a
decode step, appends to the cache and returns float32 logits (of the last ``logits_to_keep``
positions only, when that is given: a prefill for generation passes 1). Shapes and names are read from
the loaded model (``_read_metadata_impl``), never from a list of model types. Inputs are
checked against that metadata before the backend sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from starlift.core.errors import StarliftError, UsageError


@dataclass(frozen=True)
class ModelMeta:
    """What a runner learned from its model: enough to build caches and check inputs."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: np.dtype
    context: int | None = None


class Runner(ABC):
    """activate / reset / forward / deactivate around small ``*_impl`` hooks."""

    name = "runner"

    def __init__(self) -> None:
        self.is_active = False
        self.meta: ModelMeta | None = None
        self._batch = 0
        self._past_length = 0

    # ---- lifecycle ------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self._activate_impl()
            self.meta = self._read_metadata_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # ---- cache and steps ------------------------------------------------------------------
    @property
    def past_length(self) -> int:
        return self._past_length

    def reset(self, batch: int) -> None:
        """Drop the cache and start an empty one for ``batch`` sequences."""
        self._require_active()
        if batch < 1:
            raise UsageError(f"batch must be at least 1, got {batch}")
        self._batch = batch
        self._past_length = 0
        self._reset_impl(batch)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                logits_to_keep: int = 0) -> np.ndarray:
        """Run the new tokens through the model and its cache; float32 logits (B, T, V), or
        (B, min(N, T), V) for the last N positions with ``logits_to_keep=N`` (0: every position).
        Graphs with the ``logits_to_keep`` input skip the LM head for the other positions; for
        the others (older artifacts, TensorRT, which reads the input as a constant) the logits
        are cut here, so every backend returns the same shape."""
        self._require_active()
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise UsageError(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got {logits_to_keep!r}")
        logits_to_keep = int(logits_to_keep)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        b, t = input_ids.shape if input_ids.ndim == 2 else (None, None)
        if b is None or t == 0:
            raise UsageError(f"input_ids must be (batch, tokens) with tokens >= 1, got shape {input_ids.shape}")
        if b != self._batch:
            raise UsageError(f"input_ids has batch {b}, but the cache was reset for batch {self._batch}; call reset({b})")
        if attention_mask.shape != (b, self._past_length + t):
            raise UsageError(f"attention_mask must be (batch, past + tokens) = {(b, self._past_length + t)}, "
                             f"got {attention_mask.shape}")
        if position_ids.shape != (b, t):
            raise UsageError(f"position_ids must be {(b, t)}, got {position_ids.shape}")
        meta = self.meta
        if input_ids.min() < 0 or input_ids.max() >= meta.vocab_size:
            raise UsageError(f"token ids must be in [0, {meta.vocab_size}), got {input_ids.min()}..{input_ids.max()}")
        if meta.context and self._past_length + t > meta.context:
            raise UsageError(f"{self._past_length + t} tokens exceed the model's context of {meta.context}")
        logits = self._forward_impl(input_ids, attention_mask, position_ids, logits_to_keep)
        self._past_length += t
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits

    def _require_active(self) -> None:
        if not self.is_active:
            raise StarliftError(f"the {self.name} runner is not active; call activate() or use it in a with-block")

    # ---- hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _read_metadata_impl(self) -> ModelMeta: ...

    @abstractmethod
    def _reset_impl(self, batch: int) -> None: ...

    @abstractmethod
    def _forward_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                      position_ids: np.ndarray, logits_to_keep: int = 0) -> np.ndarray: ...

    def _deactivate_impl(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        return None


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
