"""Generation, written once above the runners: it never knows which backend it drives.

``generate_tokens`` is the core (after mlx-lm's ``generate_step``): a generator that yields the
next token of every sequence in a left-padded batch, with the sampling steps passed in as
plain callables. ``Generator`` adds text: prompts as str / list[str] / token ids, streaming
that never splits a UTF-8 character, stop strings (also across tokens), and fill-in-the-middle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starlift.core.errors import UsageError
from starlift.model.tokenizer import Tokenizer
from starlift.runtimes.base import Runner

from .keywords import from_transformers

LogitsProcessor = Callable[[np.ndarray, list[list[int]]], np.ndarray]


# ---- sampling: plain functions over (B, V) float logits ---------------------------------------
def repetition_penalty(penalty: float) -> LogitsProcessor:
    """transformers' rule: a seen token's logit is divided by ``penalty`` if positive, else multiplied."""

    def apply(logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        for row, seen in enumerate(history):
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            vals = logits[row, idx]
            logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    return apply


def top_k_filter(k: int) -> LogitsProcessor:
    def apply(logits, history):
        if k >= logits.shape[-1]:
            return logits
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
        return np.where(logits < kth, -np.inf, logits)

    return apply


def top_p_filter(p: float) -> LogitsProcessor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (at least one)."""

    def apply(logits, history):
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        cum = np.cumsum(probs, axis=-1)
        remove_sorted = cum - probs >= p  # mass before this token already reaches p
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, -np.inf, logits)

    return apply


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is None or self.temperature < 0 or not np.isfinite(self.temperature):
            raise UsageError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise UsageError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    def processors(self) -> list[LogitsProcessor]:
        procs = []
        if self.repetition_penalty and self.repetition_penalty != 1.0:
            procs.append(repetition_penalty(self.repetition_penalty))
        if self.temperature > 0:
            if self.top_k:
                procs.append(top_k_filter(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(top_p_filter(self.top_p))
        return procs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Greedy at temperature 0, else a draw from softmax(logits / T) (after the filters)."""
    if params.temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / params.temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((logits.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), logits.shape[-1] - 1)


def generate_tokens(runner: Runner, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    eos_token_id: int | None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, step by step; stops when every row hit EOS."""
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    ids = np.zeros((batch, longest), np.int64)
    mask = np.zeros((batch, longest), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    runner.reset(batch)
    logits = runner.forward(ids, mask, positions, logits_to_keep=1)[:, -1, :]  # the LM head on the last position only
    rng = np.random.default_rng(params.seed)
    history = [list(p) for p in prompts]
    processors = params.processors()
    finished = np.zeros(batch, dtype=bool)
    next_pos = positions[:, -1] + 1
    for step in range(params.max_new_tokens):
        scores = logits
        if processors:  # greedy/plain sampling read the logits as they are: no copy per token
            scores = logits.astype(np.float32, copy=True)
            for proc in processors:
                scores = proc(scores, history)
        tokens = sample(scores, params, rng).astype(np.int64)
        yield tokens
        for row, tok in enumerate(tokens):
            history[row].append(int(tok))
        if eos_token_id is not None and not params.ignore_eos:
            finished |= tokens == eos_token_id
            if finished.all():
                return
        if step + 1 == params.max_new_tokens:
            return
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits = runner.forward(tokens[:, None], mask, next_pos[:, None])[:, -1, :]
        next_pos = next_pos + 1


class _RowText:
    """Decoded text of one generated row: streaming-safe, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> None:
        if not self.stopped:
            self._append(self.decoder.push(token))

    def finish(self) -> None:
        if not self.stopped:
            self._append(self.decoder.flush())
        self.stopped = True

    def _append(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def ready(self) -> str:
        """New final text: held back while it could still be the start of a stop string."""
        end = len(self.text)
        if not self.stopped:
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


class Generator:
    """One generation API over any runner. Calls are serialized, so one Generator is safe to
    share between threads (each call gets the runner and its cache to itself)."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer | None, eos_token_id: int | None,
                 context: int | None = None, source: str | Path | None = None):
        self.runner = runner.activate()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.context = context or runner.meta.context
        self.source = source
        self._lock = threading.RLock()
        if tokenizer is not None and tokenizer.vocab_size > runner.meta.vocab_size:
            raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                             f"{runner.meta.vocab_size}: they do not belong together; use the artifact's tokenizer.json")

    @property
    def backend(self) -> str:
        return self.runner.name

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- prompts --------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise UsageError(f"{self.source} has no tokenizer.json: pass token ids instead of text, or export a "
                             "checkpoint that includes its tokenizer.json")
        return self.tokenizer

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise UsageError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise UsageError("the prompt is empty; give at least one character of text")
        return self._need_tokenizer().encode(prompt)

    def _fit(self, ids: list[int], params: SamplingParams, truncate: bool) -> list[int]:
        if not ids:
            raise UsageError("the prompt is empty; give at least one token")
        if self.context and len(ids) + params.max_new_tokens > self.context:
            if not truncate or params.max_new_tokens >= self.context:
                raise UsageError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's context "
                    f"of {self.context} tokens; shorten the prompt, lower max_new_tokens, or pass truncate=True to keep "
                    "the end of the prompt")
            ids = ids[len(ids) + params.max_new_tokens - self.context:]
        return ids

    # ---- public API -----------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                 truncate: bool = False, **transformers_kwargs):
        """str -> new text; list[str] -> list of new texts (one left-padded batch);
        list[int] -> new token ids. transformers' ``do_sample`` and ``stop_strings`` are understood;
        its other keywords are refused with the starlift way (see ``engine/keywords.py``)."""
        if transformers_kwargs:
            temperature, stop = from_transformers(transformers_kwargs, temperature, stop, "generate()")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if isinstance(prompt, str):
            return "".join(self._stream_texts(self._fit(self._encode(prompt), params, truncate), params, stops))
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            encoded = [self._encode(p) for p in prompt]
            rows = self._run_texts(encoded, params, stops, truncate)
            return [row.text for row in rows]
        if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) and all(
                isinstance(t, (int, np.integer)) for t in prompt):
            return self._run_ids([int(t) for t in prompt], params, stops, truncate)
        raise UsageError("prompt must be a non-empty str, a non-empty list of str, or a non-empty list of token ids")

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None,
               stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
               truncate: bool = False, **transformers_kwargs) -> Iterator[str]:
        """Text pieces whose concatenation equals ``generate()``'s text for the same arguments."""
        if transformers_kwargs:
            temperature, stop = from_transformers(transformers_kwargs, temperature, stop, "stream()")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return self._stream_texts(self._fit(self._encode(prompt), params, truncate), params, stops)

    def fim(self, prefix: str, suffix: str, max_new_tokens: int = 64, **kwargs) -> str:
        """Fill in the middle: StarCoder2's <fim_prefix>P<fim_suffix>S<fim_middle> prompt; returns the middle."""
        tok = self._need_tokenizer()
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise UsageError("fim() takes a prefix and a suffix as str")
        ids = tok.encode_fim(prefix, suffix)
        ours = set(SamplingParams.__dataclass_fields__) | {"stop", "truncate"}
        theirs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ours}
        if theirs:
            kwargs["temperature"], kwargs["stop"] = from_transformers(theirs, kwargs.get("temperature", 0.0),
                                                                      kwargs.get("stop"), "fim()")
        stops = kwargs.pop("stop", None)
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        params = SamplingParams(max_new_tokens, **{k: kwargs.pop(k) for k in list(kwargs)
                                                   if k in SamplingParams.__dataclass_fields__})
        truncate = kwargs.pop("truncate", False)
        if kwargs:
            raise UsageError(f"unknown argument(s) to fim(): {', '.join(kwargs)}")
        # <file_sep> (and <|endoftext|>, the EOS) end a middle, as StarCoder2 was trained.
        file_sep = tok.find_token("<file_sep>")
        eos = self.eos_token_id
        with self._lock:
            row = _RowText(tok, stops)
            for tokens in generate_tokens(self.runner, [self._fit(ids, params, truncate)], params, eos):
                t = int(tokens[0])
                if (t == eos and not params.ignore_eos) or t == file_sep:
                    break
                row.push(t)
                if row.stopped:
                    break
            row.finish()
            return row.text

    # ---- internals ------------------------------------------------------------------------
    def _run_ids(self, ids: list[int], params: SamplingParams, stops: list[str], truncate: bool) -> list[int]:
        ids = self._fit(ids, params, truncate)
        out: list[int] = []
        with self._lock:
            row = _RowText(self.tokenizer, stops) if (stops and self.tokenizer) else None
            for tokens in generate_tokens(self.runner, [ids], params, self.eos_token_id):
                t = int(tokens[0])
                if t == self.eos_token_id and not params.ignore_eos:
                    break
                out.append(t)
                if row is not None:
                    row.push(t)
                    if row.stopped:
                        break
        return out

    def _run_texts(self, prompts: list[list[int]], params: SamplingParams, stops: list[str],
                   truncate: bool) -> list[_RowText]:
        prompts = [self._fit(p, params, truncate) for p in prompts]
        rows = [_RowText(self.tokenizer, stops) for _ in prompts]
        with self._lock:
            for tokens in generate_tokens(self.runner, prompts, params, self.eos_token_id):
                for row, t in zip(rows, tokens, strict=True):
                    if row.stopped:
                        continue
                    if int(t) == self.eos_token_id and not params.ignore_eos:
                        row.finish()
                    else:
                        row.push(int(t))
                if all(r.stopped for r in rows):
                    break
        for row in rows:
            row.finish()
        return rows

    def _stream_texts(self, ids: list[int], params: SamplingParams, stops: list[str]) -> Iterator[str]:
        row = _RowText(self._need_tokenizer(), stops)
        with self._lock:
            for tokens in generate_tokens(self.runner, [ids], params, self.eos_token_id):
                t = int(tokens[0])
                if t == self.eos_token_id and not params.ignore_eos:
                    break
                row.push(t)
                piece = row.ready()
                if piece:
                    yield piece
                if row.stopped:
                    break
            row.finish()
            piece = row.ready()
            if piece:
                yield piece
