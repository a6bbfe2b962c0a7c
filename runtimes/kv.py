"""KV state the engine owns: many sequences over one runner.

A ``KVCache`` holds the keys and values of up to ``max_batch`` sequences; the runner that made
it holds only the model. The engine drives it between steps:

    add(seq) -> prefill(seq, ids)* -> join(seq) -> decode(tokens)* ... -> remove(seq)

``prefill`` runs one sequence alone (batch 1, a chunk of its prompt at a time); ``join`` puts a
prefilled sequence into the decode batch, whose order is ``rows``; ``decode`` runs one token of
every row together. Two kinds exist: ``ConcatBatch`` here (any backend's concat-grow graph,
rows left-padded to a common length) and ONNX Runtime's ``SlotPool`` (a preallocated buffer per
layer whose rows have their own lengths, for GroupQueryAttention graphs that read them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable

import numpy as np

from starlift.core.errors import StarliftError, UsageError


class KVCache(ABC):
    kind = "cache"
    # decode_many() takes several tokens for every row of a batch in one call; otherwise only
    # for a batch of one row, and a row extends alone (``extend``) after a one-token step
    multi_token_batch = False

    def __init__(self, runner, max_batch: int):
        if max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {max_batch}")
        self.runner, self.max_batch = runner, max_batch
        self.rows: list[Hashable] = []  # the decode batch, in the order decode() takes tokens

    @property
    def context(self) -> int | None:
        return self.runner.meta.context

    @abstractmethod
    def add(self, seq: Hashable) -> None:
        """Reserve room for a new, empty sequence (not yet in the decode batch)."""

    @abstractmethod
    def prefill(self, seq: Hashable, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` (1-D) to ``seq`` alone; float32 logits of the last token (V,), or of
        every token (T, V) with ``all_logits``."""

    @abstractmethod
    def join(self, seq: Hashable) -> None:
        """Put a prefilled sequence at the end of the decode batch (``rows``)."""

    @abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One new token per row of ``rows`` (int64, same order); float32 logits (rows, V). The
        array may be a buffer the next call overwrites: read it before calling again."""

    @abstractmethod
    def remove(self, seq: Hashable) -> None:
        """Forget ``seq`` (prefilling or decoding) and free its room."""

    # ---- speculative decoding: several tokens per row, then the rejected ones taken back ----
    def decode_many(self, tokens: list) -> list[np.ndarray]:
        """Row i of ``rows`` gets ``tokens[i]`` (1 or more ids) in one call; float32 logits
        ``(len(tokens[i]), V)`` per row. Every fed token is in the cache afterwards until
        ``rollback`` takes some back. Caches without ``multi_token_batch`` take one row only."""
        raise StarliftError(f"the {self.kind} cache cannot decode several tokens per row")

    def extend(self, seq: Hashable, ids: np.ndarray) -> np.ndarray:
        """Append ``ids`` to a decoding row alone (batch 1); float32 logits (len(ids), V)."""
        raise StarliftError(f"the {self.kind} cache cannot extend one decoding row alone")

    def rollback(self, drops: dict) -> None:
        """Take the last ``drops[seq]`` tokens back out of each row's cache (rejected drafts)."""
        raise StarliftError(f"the {self.kind} cache cannot take tokens back")

    @abstractmethod
    def length(self, seq: Hashable) -> int:
        """Tokens in ``seq``'s cache."""

    @abstractmethod
    def __contains__(self, seq: Hashable) -> bool: ...

    def close(self) -> None:
        """Release the cache's memory (the cache is unusable afterwards)."""
        self.rows = []

    def _check_room(self, seq: Hashable, new: int) -> None:
        total = self.length(seq) + new
        if self.context and total > self.context:
            raise UsageError(f"{total} tokens exceed the model's context of {self.context}")


class ConcatBatch(KVCache):
    """Left-padded ``[B, kv_heads, P, head_dim]`` tensors in the backend's own handles.

    A new sequence is prefilled alone (batch 1, chunked) and joins the decode batch by left
    padding both to the longer length; a retired row is dropped and the padding all rows share
    is trimmed. Only those membership changes convert handles to numpy; a decode step feeds
    the present handles back as the next past, as the graph's concat contract says.
    """

    kind = "concat"
    multi_token_batch = True

    def __init__(self, runner, max_batch: int):
        super().__init__(runner, max_batch)
        self._junk = None  # after decode_many: per row, padding tokens fed past its own (rolled back next)
        self._pending: dict[Hashable, list] = {}  # seq -> [past handles (batch 1), length]
        self._past = None  # the decode batch's handles
        self._width = 0  # P: padded length of the decode batch
        self._pads = np.zeros(0, np.int64)  # leading padding per row
        self._lens = np.zeros(0, np.int64)  # real tokens per row

    def __contains__(self, seq) -> bool:
        return seq in self._pending or seq in self.rows

    def add(self, seq) -> None:
        if seq in self:
            raise StarliftError(f"sequence {seq!r} is already in the cache")
        if len(self._pending) + len(self.rows) >= self.max_batch:
            raise StarliftError(f"the cache holds {self.max_batch} sequences already")
        self._pending[seq] = [self.runner.empty_past(1), 0]

    def length(self, seq) -> int:
        if seq in self._pending:
            return self._pending[seq][1]
        return int(self._lens[self.rows.index(seq)])

    def prefill(self, seq, ids, all_logits: bool = False) -> np.ndarray:
        past, done = self._pending[seq]
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        t = ids.shape[1]
        self._check_room(seq, t)
        # logits_to_keep=1: the graph skips the LM head for every position but the one read
        logits, present = self.runner.run(ids, np.ones((1, done + t), np.int64),
                                          np.arange(done, done + t, dtype=np.int64)[None], past,
                                          logits_to_keep=0 if all_logits else 1)
        self._pending[seq] = [present, done + t]
        return logits[0] if all_logits else logits[0, -1]

    def join(self, seq) -> None:
        self._junk = None  # a membership change: a failed speculative step's padding is not ours to drop
        past, length = self._pending.pop(seq)
        if not self.rows:
            self._past, self._width = past, length
            self._pads, self._lens = np.zeros(1, np.int64), np.array([length], np.int64)
        else:
            width = max(self._width, length)
            batch = self.runner.past_to_numpy(self._past)
            new = self.runner.past_to_numpy(past)
            self._past = self.runner.past_from_numpy(
                [np.concatenate([_left_pad(a, width), _left_pad(b, width)], axis=0) for a, b in zip(batch, new,
                                                                                                     strict=True)])
            self._pads = np.concatenate([self._pads + (width - self._width), [width - length]])
            self._lens = np.concatenate([self._lens, [length]])
            self._width = width
        self.rows.append(seq)

    def decode(self, tokens) -> np.ndarray:
        if not self.rows:
            raise StarliftError("no sequence has joined the decode batch")
        if self.context and self._width + 1 > self.context:
            raise UsageError(f"{self._width + 1} tokens exceed the model's context of {self.context}")
        width = self._width + 1
        mask = (np.arange(width)[None, :] >= self._pads[:, None]).astype(np.int64)
        ids = np.asarray(tokens, np.int64).reshape(-1, 1)
        logits, self._past = self.runner.run(ids, mask, self._lens[:, None], self._past)
        self._width, self._lens = width, self._lens + 1
        return logits[:, -1]

    def decode_many(self, tokens) -> list[np.ndarray]:
        """Right-pads the shorter rows' tokens (a row's padding comes after its real tokens, so
        causal attention never lets them change its logits) and takes the padding back in
        ``rollback``, which must follow before the next step."""
        n = len(self.rows)
        if len(tokens) != n or not n:
            raise StarliftError(f"decode_many needs tokens for each of the {n} rows, got {len(tokens)}")
        counts = np.array([len(t) for t in tokens], np.int64)
        t = int(counts.max())
        if self.context and self._width + t > self.context:
            raise UsageError(f"{self._width + t} tokens exceed the model's context of {self.context}")
        ids = np.empty((n, t), np.int64)
        for i, row in enumerate(tokens):
            ids[i, :len(row)] = row
            ids[i, len(row):] = row[-1]
        width = self._width + t
        mask = (np.arange(width)[None, :] >= self._pads[:, None]).astype(np.int64)
        positions = self._lens[:, None] + np.arange(t)[None, :]
        logits, self._past = self.runner.run(ids, mask, positions, self._past, logits_to_keep=t)
        self._width, self._lens = width, self._lens + t
        self._junk = t - counts
        return [logits[i, :c] for i, c in enumerate(counts)]

    def rollback(self, drops: dict) -> None:
        d = np.array([drops.get(seq, 0) for seq in self.rows], np.int64)
        if self._junk is not None:
            d, self._junk = d + self._junk, None
        if not d.any():
            return
        width = self._width - int(d.min())
        arrays = self.runner.past_to_numpy(self._past)
        if (d == d[0]).all():  # every row drops as many: cut the end
            out = [np.ascontiguousarray(a[:, :, :width]) for a in arrays]
        else:  # each row's kept tokens move to the end; what it dropped becomes leading padding
            out = []
            for a in arrays:
                b = np.zeros(a.shape[:2] + (width,) + a.shape[3:], a.dtype)
                for i, drop in enumerate(d):
                    keep = self._width - int(drop)
                    b[i, :, width - keep:] = a[i, :, :keep]
                out.append(b)
        self._pads = self._pads + (width - (self._width - d))
        self._lens = self._lens - d
        trim = int(self._pads.min())
        if trim:
            out = [np.ascontiguousarray(a[:, :, trim:]) for a in out]
            self._pads, width = self._pads - trim, width - trim
        self._past, self._width = self.runner.past_from_numpy(out), width

    def remove(self, seq) -> None:
        if self._pending.pop(seq, None) is not None:
            return
        self._junk = None
        i = self.rows.index(seq)
        del self.rows[i]
        if not self.rows:
            self._past, self._width = None, 0
            self._pads, self._lens = np.zeros(0, np.int64), np.zeros(0, np.int64)
            return
        keep = np.array([r for r in range(len(self._pads)) if r != i])
        pads = self._pads[keep]
        trim = int(pads.min())  # the padding every remaining row shares
        arrays = self.runner.past_to_numpy(self._past)
        self._past = self.runner.past_from_numpy([np.ascontiguousarray(a[keep][:, :, trim:]) for a in arrays])
        self._pads, self._lens, self._width = pads - trim, self._lens[keep], self._width - trim

    def close(self) -> None:
        super().close()
        self._pending, self._past = {}, None


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    """(B, G, P, D) -> (B, G, width, D) with zeros in front (masked out by attention_mask)."""
    if a.shape[2] == width:
        return a
    out = np.zeros(a.shape[:2] + (width,) + a.shape[3:], a.dtype)
    out[:, :, width - a.shape[2]:] = a
    return out


class SingleBatch:
    """One batch fed by hand (``runner.single_batch(batch)``): left-padded rows, prompt and steps in
    any chunks, logits of every token. For teacher-forced measurements and tests; generation
    runs on the engine's caches."""

    def __init__(self, runner, batch: int):
        self.runner, self.batch = runner, batch
        self.past = runner.empty_past(batch)
        self.past_length = 0

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0) -> np.ndarray:
        """Append to this batch's cache; float32 logits (B, T, V), or of the last N positions
        with ``logits_to_keep=N`` (see ``Runner.run``)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise UsageError(f"input_ids has shape {ids.shape}; this batch holds {self.batch} rows")
        if np.shape(attention_mask) != (self.batch, self.past_length + ids.shape[1]):
            raise UsageError(f"attention_mask must be (batch, past + tokens) = "
                             f"{(self.batch, self.past_length + ids.shape[1])}, got {np.shape(attention_mask)}")
        logits, self.past = self.runner.run(ids, attention_mask, position_ids, self.past, logits_to_keep)
        self.past_length += ids.shape[1]
        return logits
