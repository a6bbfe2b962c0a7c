"""The text API (``Generator``, what ``starlift.load`` returns), written once above the runners.

Every call is a request on the ``Engine`` (one token loop for everything): prompts as str /
list[str] / token ids, streaming that never splits a UTF-8 character, stop strings (also across
tokens), and fill-in-the-middle. Calls from many threads run together in the engine's batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from starlift.core.errors import UsageError
from starlift.model.tokenizer import Tokenizer
from starlift.runtimes.base import Runner

from .engine import DEFAULT_PREFILL_CHUNK, Engine, RequestHandle
from .keywords import from_transformers
from .sampling import SamplingParams
from .speculative import DEFAULT_DRAFT_TOKENS

_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ignore_eos",
             "speculative", "draft_tokens")


class Generator:
    """One generation API over any runner. Safe to share between threads and callers: each
    call is a request on the engine, batched with whatever else runs."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer | None, eos_token_id: int | None,
                 context: int | None = None, source: str | Path | None = None, *, max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefill_budget: int | None = None):
        self.runner = runner.activate()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.context = context or runner.meta.context
        self.source = source
        if tokenizer is not None and tokenizer.vocab_size > runner.meta.vocab_size:
            raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                             f"{runner.meta.vocab_size}: they do not belong together; use the artifact's tokenizer.json")
        self.engine = Engine(runner, tokenizer, eos_token_id, max_batch=max_batch, max_queue=max_queue,
                             prefill_chunk=prefill_chunk, prefill_budget=prefill_budget, context=self.context)

    @property
    def backend(self) -> str:
        return self.runner.name

    def close(self) -> None:
        self.engine.close()
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

    def _submit(self, ids: list[int], params: SamplingParams, stops: list[str], truncate: bool,
                fim: bool = False) -> RequestHandle:
        # wait=True: a caller of this blocking API waits for room in the queue instead of failing
        return self.engine.submit(self._fit(ids, params, truncate), params, stop=stops, fim=fim, wait=True)

    @staticmethod
    def _stops(stop) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    @staticmethod
    def _result(handle: RequestHandle) -> RequestHandle:
        handle.join()  # one wake-up at the end, not one per token
        if handle.finish_reason == "error":
            raise handle.error
        return handle

    # ---- public API -----------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                 truncate: bool = False, speculative: str | None = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                 **transformers_kwargs):
        """str -> new text; list[str] -> list of new texts (all submitted at once, batched by the
        engine); list[int] -> new token ids. transformers' ``do_sample`` and ``stop_strings`` are
        understood; its other keywords are refused with the starlift way (see ``engine/keywords.py``).
        ``speculative="prompt-lookup"`` verifies up to ``draft_tokens`` tokens drafted from the
        prompt and output per model call (greedy output unchanged; see docs/guide/speculative.md)."""
        if transformers_kwargs:
            temperature, stop = from_transformers(transformers_kwargs, temperature, stop, "generate()")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos,
                                speculative, draft_tokens)
        stops = self._stops(stop)
        if isinstance(prompt, str):
            return self._result(self._submit(self._encode(prompt), params, stops, truncate)).text
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            encoded = [self._encode(p) for p in prompt]
            fitted = [self._fit(ids, params, truncate) for ids in encoded]  # every prompt checked before any runs
            handles = []
            try:
                for ids in fitted:
                    handles.append(self._submit(ids, params, stops, False))
                return [self._result(h).text for h in handles]
            finally:
                for h in handles:
                    h.cancel()
        if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            if stops:
                self._need_tokenizer()
            return self._result(self._submit([int(t) for t in prompt], params, stops, truncate)).token_ids
        raise UsageError("prompt must be a non-empty str, a non-empty list of str, or a non-empty list of token ids")

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None,
               stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
               truncate: bool = False, speculative: str | None = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
               **transformers_kwargs) -> Iterator[str]:
        """Text pieces whose concatenation equals ``generate()``'s text for the same arguments.
        The request starts now; closing or dropping the iterator cancels it."""
        if transformers_kwargs:
            temperature, stop = from_transformers(transformers_kwargs, temperature, stop, "stream()")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos,
                                speculative, draft_tokens)
        handle = self._submit(self._encode(prompt), params, self._stops(stop), truncate)
        return _pieces(handle)

    def fim(self, prefix: str, suffix: str, max_new_tokens: int = 64, **kwargs) -> str:
        """Fill in the middle: StarCoder2's <fim_prefix>P<fim_suffix>S<fim_middle> prompt; returns the middle
        (<file_sep> and <|endoftext|>, the EOS, end it, as StarCoder2 was trained)."""
        tok = self._need_tokenizer()
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise UsageError("fim() takes a prefix and a suffix as str")
        ours = set(_SAMPLING) | {"stop", "truncate"}
        theirs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ours}
        if theirs:
            kwargs["temperature"], kwargs["stop"] = from_transformers(theirs, kwargs.get("temperature", 0.0),
                                                                      kwargs.get("stop"), "fim()")
        stops = self._stops(kwargs.pop("stop", None))
        params = SamplingParams(max_new_tokens, **{k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING})
        truncate = kwargs.pop("truncate", False)
        if kwargs:
            raise UsageError(f"unknown argument(s) to fim(): {', '.join(kwargs)}")
        return self._result(self._submit(tok.encode_fim(prefix, suffix), params, stops, truncate, fim=True)).text


def _pieces(handle: RequestHandle) -> Iterator[str]:
    try:
        for event in handle:
            if event.text:
                yield event.text
        if handle.finish_reason == "error":
            raise handle.error
    finally:
        handle.cancel()  # closed or dropped early: free the row
