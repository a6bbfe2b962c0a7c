"""The engine: many requests over one runner, batched continuously (in-flight).

One background thread runs the loop. Each iteration:

1. takes new requests and cancellations handed over by other threads (under a lock held only
   for that hand-over: never across a model call, never across a caller's ``yield``);
2. asks the ``Scheduler`` what runs: admissions into free cache rows, and prompt chunks within a
   token budget (vLLM v1's shape: the scheduler decides, the executor runs what it is handed);
3. runs one decode step for every decoding sequence together, then the prefill chunks (batch 1
   each), samples each request's next token with its own sampler, and emits ``TokenEvent``s;
4. retires finished and cancelled requests, freeing their rows before the next step.

A long prompt is fed in chunks between decode steps, so running streams keep getting tokens
while it is prefilled. Callers hold a ``RequestHandle``: iterate it (from a thread, or with
``async for`` from any event loop) to get events; ``cancel()``, ``close()`` or dropping it
frees the request's row within one step.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from starlift.core.errors import QueueFullError, StarliftError, UsageError

from .sampling import MAX_LOGPROBS, Sampler, SamplingParams, logprobs
from .speculative import PromptLookup, schedule
from .text import TextState

FINISH_REASONS = ("stop", "length", "cancelled", "error")
DEFAULT_PREFILL_CHUNK = 128
_ids = itertools.count()
_live_engines: weakref.WeakSet = weakref.WeakSet()


class TokenEvent(NamedTuple):
    """One generated token of one request (a named tuple: cheap to make once per token).

    ``text`` is the new final text (UTF-8 safe; held back while it could be the start of a stop
    string; cut at a stop string; may be ""). ``logprob``/``top_logprobs`` come from the model's
    raw logits (log_softmax before temperature and filters) when the request asked for them.
    ``finish_reason`` is set on a request's last event.
    """

    token_id: int
    text: str
    index: int
    time: float
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


_END = object()


class _Channel:
    """Events from the engine thread to one consumer: a thread (blocking ``get``) or an asyncio
    task in any event loop (``aget``; woken with ``call_soon_threadsafe``)."""

    def __init__(self):
        self._items: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._ended = False
        self.finished = threading.Event()  # set with the end: join() waits for it alone, one wake-up

    def put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waiter, self._waiter = self._waiter, None
        if item is _END:
            self.finished.set()
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                pass

    def get(self, timeout: float | None = None):
        with self._cond:
            while not self._items:
                if self._ended:
                    return _END
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"no event within {timeout} s")
            item = self._items.popleft()
            if item is _END:
                self._ended = True
            return item

    async def aget(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    if item is _END:
                        self._ended = True
                    return item
                if self._ended:
                    return _END
                future = loop.create_future()
                self._waiter = (loop, future)
            await future


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _Request:
    """The engine's state of one request. It never refers to its handle, so a handle the caller
    drops is collected (and cancels the request)."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 text: TextState | None, top_logprobs: int | None):
        self.id, self.prompt, self.params = request_id, prompt, params
        self.sampler = Sampler(params, prompt)
        self.stop_ids, self.text, self.top_logprobs = stop_ids, text, top_logprobs
        self.channel = _Channel()
        self.prefilled = 0  # prompt tokens in the cache
        self.generated = 0  # tokens sampled (a final EOS / stop token included)
        self.tokens: list[int] = []  # the completion's ids, without a final EOS / stop token
        self.last_token = -1
        # prompt-lookup speculative decoding: the n-gram index, drafts proposed and accepted
        self.lookup = PromptLookup(prompt) if params.speculative == "prompt-lookup" else None
        self.drafted = self.accepted = 0
        self.draft_len = params.draft_tokens  # adapted by speculative.schedule after each verification
        self.draft_pause, self.draft_backoff = 0, 1  # plain steps before the next draft, and the next wait
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancel_requested = False
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __repr__(self) -> str:
        return f"<request {self.id}>"


class RequestHandle:
    """What ``Engine.submit`` returns: iterate it for ``TokenEvent``s (``for`` in a thread,
    ``async for`` in an event loop; one consumer per handle). After the end: ``finish_reason``
    ("stop", "length", "cancelled" or "error"), ``prompt_tokens``, ``completion_tokens``,
    ``error`` and ``text``. ``cancel()``/``close()``, or dropping the handle, frees its row."""

    def __init__(self, engine: Engine, request: _Request):
        self._engine, self._request = engine, request

    @property
    def id(self) -> str:
        return self._request.id

    @property
    def done(self) -> bool:
        return self._request.finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        return self._request.finish_reason

    @property
    def error(self) -> BaseException | None:
        return self._request.error

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt)

    @property
    def completion_tokens(self) -> int:
        return self._request.generated

    @property
    def token_ids(self) -> list[int]:
        """The completion's token ids, without a final EOS or stop token id."""
        return list(self._request.tokens)

    @property
    def text(self) -> str:
        """The completion's final text (so far, before the end)."""
        r = self._request
        return r.text.text if r.text is not None else ""

    @property
    def draft_tokens(self) -> int:
        """Draft tokens proposed for verification (speculative decoding; 0 otherwise)."""
        return self._request.drafted

    @property
    def accepted_tokens(self) -> int:
        """Draft tokens the model accepted (each saved one model call)."""
        return self._request.accepted

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / proposed draft tokens; None when none were proposed."""
        r = self._request
        return r.accepted / r.drafted if r.drafted else None

    @property
    def first_token_time(self) -> float | None:
        return self._request.first_token_time

    @property
    def submitted_time(self) -> float:
        return self._request.submitted

    def __iter__(self) -> RequestHandle:
        return self

    def __next__(self) -> TokenEvent:
        item = self._request.channel.get()
        if item is _END:
            raise StopIteration
        return item

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._request.channel.aget()
        if item is _END:
            raise StopAsyncIteration
        return item

    def join(self, timeout: float | None = None) -> RequestHandle:
        """Block until the request has ended, without consuming its events (they stay queued for
        a later iteration); one wake-up at the end instead of one per token."""
        if not self._request.channel.finished.wait(timeout):
            raise TimeoutError(f"request {self.id} did not end within {timeout} s")
        return self

    def wait(self, timeout: float | None = None) -> RequestHandle:
        """Block until the end and drop the events not read yet; returns the handle (then read
        ``text``, ``token_ids``, ``finish_reason``)."""
        self.join(timeout)
        channel = self._request.channel
        while channel.get(0) is not _END:
            pass
        return self

    def cancel(self) -> None:
        if self._request.finish_reason is None:
            self._engine._cancel(self._request)

    close = cancel

    def __enter__(self) -> RequestHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):
        try:
            self.cancel()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the engine may be gone already
            pass

    def __repr__(self) -> str:
        return f"<RequestHandle {self.id} {self.finish_reason or 'running'}>"


@dataclass
class Plan:
    """What one iteration runs: the prompt chunks (request, tokens) after the decode step."""

    admitted: list[_Request]
    chunks: list[tuple[_Request, int]]


class Scheduler:
    """Decides, between steps, which requests run and how many prompt tokens each feeds.

    Requests wait in FIFO order until a cache row is free (``max_batch`` rows); admitted ones
    are prefilled first come, first served, within ``prefill_budget`` prompt tokens per
    iteration and at most ``prefill_chunk`` per request (vLLM's ``max_num_batched_tokens`` and
    ``long_prefill_token_threshold``); every decoding request gets one token per iteration. It
    only decides: the engine executes the plan."""

    def __init__(self, max_batch: int, prefill_chunk: int, prefill_budget: int | None = None):
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []
        self.decoding: list[_Request] = []

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def schedule(self) -> Plan:
        admitted = []
        while self.waiting and self.active < self.max_batch:
            request = self.waiting.popleft()
            self.prefilling.append(request)
            admitted.append(request)
        budget, chunks = self.prefill_budget, []
        for request in self.prefilling:
            if budget <= 0:
                break
            n = min(budget, self.prefill_chunk, len(request.prompt) - request.prefilled)
            chunks.append((request, n))
            budget -= n
        return Plan(admitted, chunks)

    def prefilled(self, request: _Request) -> None:
        self.prefilling.remove(request)
        self.decoding.append(request)

    def remove(self, request: _Request) -> bool:
        """Forget ``request``; True when it was still waiting for a row."""
        for group in (self.prefilling, self.decoding):
            if request in group:
                group.remove(request)
                return False
        try:
            self.waiting.remove(request)
        except ValueError:
            return False
        return True


class Engine:
    """Continuous batching over one runner: ``submit`` from any thread, events back per request.

    ``max_batch`` sequences share the KV cache (rows); up to ``max_queue`` more wait for a row;
    ``prefill_chunk`` prompt tokens are fed per iteration between decode steps; a larger
    ``prefill_budget`` lets several requests feed a chunk each in one iteration (a burst of
    short prompts gets its first tokens without a decode step between each two prefills, at
    the cost of one longer gap for the streams already decoding). ``context``
    defaults to the model's. ``trace=True`` records every iteration's timing (``trace``)."""

    def __init__(self, runner, tokenizer=None, eos_token_id: int | None = None, *, max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, context: int | None = None,
                 trace: bool = False, prefill_budget: int | None = None):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("prefill_budget", prefill_chunk if prefill_budget is None else prefill_budget)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise UsageError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        self.runner = runner.activate()
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.context = context or runner.meta.context
        self.vocab_size = runner.meta.vocab_size
        self._file_sep = tokenizer.find_token("<file_sep>") if tokenizer is not None else None
        self._cond = threading.Condition(threading.RLock())  # reentrant: a handle collected in any thread cancels
        self._incoming: deque[_Request] = deque()
        self._cancels: deque[_Request] = deque()
        self._queued = 0  # submitted, not yet admitted into a row
        self._active = 0
        self._room_waiters = 0  # submit(wait=True) callers waiting for room in the queue
        self._closing = False
        self._thread: threading.Thread | None = None
        self._scheduler = Scheduler(max_batch, prefill_chunk, self.prefill_budget)
        self._cache = None
        self._totals = {"finished": dict.fromkeys(FINISH_REASONS, 0), "prompt_tokens": 0, "generated_tokens": 0,
                        "steps": 0, "prefill_chunks": 0, "draft_tokens": 0, "accepted_tokens": 0}
        self._latency = None  # moving average of request seconds, for retry_after
        self.trace: list[tuple] | None = [] if trace else None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._cond:
            if self._closing:
                raise StarliftError("the engine is closed; create a new one")
            if self._thread is None:
                self._cache = self.runner.create_cache(self.max_batch)
                self._thread = threading.Thread(target=self._loop, name="starlift-engine", daemon=True)
                self._thread.start()
                _live_engines.add(self)
        return self

    def close(self) -> None:
        """Cancel every request and stop the loop (joins its thread)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        s = self._scheduler
        for request in [*self._incoming, *s.waiting, *s.prefilling, *s.decoding]:
            self._end(request, "cancelled")
        self._incoming.clear()
        s.waiting.clear()
        s.prefilling.clear()
        s.decoding.clear()
        if self._cache is not None:
            self._cache.close()
        with self._cond:
            self._queued = self._active = 0

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closing

    # ---- the API ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, stop: Sequence[str] = (),
               stop_token_ids: Sequence[int] = (), fim: bool = False, logprobs: int | None = None,
               request_id: str | None = None, wait: bool = False) -> RequestHandle:
        """Queue one request; its handle yields ``TokenEvent``s. Raises at once, affecting no other
        request: ``UsageError`` for bad input or a prompt that does not fit the context with its
        max tokens, ``QueueFullError`` when ``max_queue`` requests already wait (``wait=True``
        waits for room instead)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise UsageError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_ids)
        if self.context and len(prompt) + params.max_new_tokens > self.context:
            raise UsageError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.context} tokens; shorten the prompt or lower max_new_tokens")
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if s]
        if any(not isinstance(s, str) for s in stop):
            raise UsageError("stop must be a string or a list of strings")
        if stop and self.tokenizer is None:
            raise UsageError("stop strings need a tokenizer: this engine has none (pass stop_token_ids instead)")
        stop_ids = set()
        for t in stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise UsageError(f"stop_token_ids must be token ids in [0, {self.vocab_size}), got {t!r}")
            stop_ids.add(int(t))
        if fim and self._file_sep is not None:
            stop_ids.add(self._file_sep)  # StarCoder2: <file_sep> (and EOS) end a middle
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise UsageError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        text = TextState(self.tokenizer, stop) if self.tokenizer is not None else None
        request = _Request(request_id or f"req-{next(_ids)}", prompt, params, stop_ids, text, logprobs)
        self.start()
        with self._cond:
            while True:
                if self._closing:
                    raise StarliftError("the engine is closed; create a new one")
                if self._queued < self.max_queue + max(0, self.max_batch - self._active):
                    break
                if not wait:
                    raise QueueFullError(
                        f"the queue is full ({self._queued} requests wait for {self.max_batch} rows, max_queue "
                        f"{self.max_queue}); retry later", retry_after=self._retry_after())
                self._room_waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._room_waiters -= 1
            self._queued += 1
            self._incoming.append(request)
            self._cond.notify_all()
        return RequestHandle(self, request)

    def stats(self) -> dict:
        """queued (waiting for a row), active (prefilling + decoding), max_batch, max_queue, and
        totals: requests finished by reason, prompt and generated tokens, steps."""
        with self._cond:
            totals = self._totals
            return {"queued": self._queued, "active": self._active, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "finished": dict(totals["finished"]),
                    "prompt_tokens": totals["prompt_tokens"], "generated_tokens": totals["generated_tokens"],
                    "steps": totals["steps"], "prefill_chunks": totals["prefill_chunks"],
                    "draft_tokens": totals["draft_tokens"], "accepted_tokens": totals["accepted_tokens"],
                    "acceptance_rate": (totals["accepted_tokens"] / totals["draft_tokens"]
                                        if totals["draft_tokens"] else None),
                    "cache": getattr(self._cache, "kind", None)}

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, np.ndarray):
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            raise UsageError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
        if not prompt_ids:
            raise UsageError("the prompt is empty; give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in prompt_ids):
            raise UsageError("prompt_ids must be integers (token ids)")
        prompt = [int(t) for t in prompt_ids]
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= self.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.vocab_size}), got {low}..{high}")
        return prompt

    def _retry_after(self) -> float:
        per_request = self._latency if self._latency is not None else 1.0
        waves = (self._queued + 1) / self.max_batch
        return round(max(0.1, per_request * waves), 3)

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            if request.finish_reason is None and not request.cancel_requested:
                request.cancel_requested = True
                self._cancels.append(request)
                self._cond.notify_all()

    # ---- the loop (engine thread) -------------------------------------------------------------
    def _loop(self) -> None:
        s = self._scheduler
        while True:
            with self._cond:
                while not (self._incoming or self._cancels or s.has_work() or self._closing):
                    self._cond.wait()
                if self._closing:
                    return
                s.waiting.extend(self._incoming)
                self._incoming.clear()
                cancels = list(self._cancels)
                self._cancels.clear()
            try:
                for request in cancels:
                    self._retire(request, "cancelled")
                self._iteration()
            except Exception as e:  # noqa: BLE001 - a bug must not kill the loop: fail what was running
                for request in [*s.waiting, *s.prefilling, *s.decoding]:
                    self._retire(request, "error", e)
                self._cache.close()
                self._cache = self.runner.create_cache(self.max_batch)
            if self._active != s.active or self._room_waiters:
                with self._cond:
                    self._active = s.active
                    self._cond.notify_all()  # submitters waiting for room

    def _iteration(self) -> None:
        s, cache = self._scheduler, self._cache
        tracing = self.trace is not None
        if tracing:
            start, run0 = time.perf_counter(), getattr(self.runner, "run_seconds", 0.0)
        plan = s.schedule()
        if plan.admitted:
            for request in plan.admitted:
                cache.add(request)
            with self._cond:
                self._queued -= len(plan.admitted)
                self._active = s.active
        finished: list[_Request] = []
        decoded = len(cache.rows)
        if decoded:
            rows = [r for r in cache.rows]
            drafts = self._drafts(rows, cache)
            if drafts is not None:
                try:
                    self._speculative_step(rows, drafts, cache, finished)
                except Exception as e:  # noqa: BLE001 - the backend failed this step: its rows end with the error
                    for request in rows:
                        if request.finish_reason is None:
                            self._retire(request, "error", e)
                rows = []
            else:
                tokens = np.fromiter((r.last_token for r in rows), np.int64, len(rows))
                try:
                    logits = cache.decode(tokens)
                except Exception as e:  # noqa: BLE001 - the backend failed this step: its rows end with the error
                    for request in rows:
                        self._retire(request, "error", e)
                    rows = []
            if rows:
                if all(r.sampler.greedy and r.top_logprobs is None for r in rows):
                    picks = logits.argmax(axis=-1).tolist()  # one call for a greedy batch
                else:
                    picks = [r.sampler(row) for r, row in zip(rows, logits, strict=True)]
                now = time.perf_counter()
                for request, token, row in zip(rows, picks, logits, strict=True):
                    if self._emit(request, token, row, now):
                        finished.append(request)
            self._totals["steps"] += 1
        prefill_tokens = prefill_calls = 0
        for request, n in plan.chunks:
            if request.finish_reason is not None or request not in cache:
                continue
            ids = np.asarray(request.prompt[request.prefilled:request.prefilled + n], np.int64)
            try:
                logits = cache.prefill(request, ids)
            except Exception as e:  # noqa: BLE001 - this request's prompt failed; the others go on
                self._retire(request, "error", e)
                continue
            request.prefilled += n
            prefill_tokens += n
            prefill_calls += 1
            self._totals["prefill_chunks"] += 1
            if request.prefilled == len(request.prompt):
                s.prefilled(request)
                if self._emit(request, request.sampler(logits), logits, time.perf_counter()):
                    finished.append(request)
                else:
                    cache.join(request)
        for request in finished:
            self._retire(request, request.finish_reason)
        if tracing:
            # (start, end, decoded rows, prefill tokens, prefill calls, seconds in the runtime)
            self.trace.append((start, time.perf_counter(), decoded, prefill_tokens, prefill_calls,
                               getattr(self.runner, "run_seconds", 0.0) - run0))

    # ---- speculative decoding ------------------------------------------------------------------
    def _drafts(self, rows: list[_Request], cache) -> list[list[int]] | None:
        """Each row's draft tokens (prompt lookup), or None when no row has one (a plain step)."""
        out, any_draft = [], False
        for request in rows:
            draft: list[int] = []
            if request.lookup is not None:
                # room: no more drafts than tokens left to make (the last one accepted ends it by
                # length), and the last token with the draft within the context
                k = min(request.draft_len, request.params.max_new_tokens - request.generated)
                if self.context:
                    k = min(k, self.context - cache.length(request) - 1)
                if request.draft_pause:
                    request.draft_pause -= 1
                elif k > 0:
                    draft = request.lookup.draft(k)
                    any_draft = any_draft or bool(draft)
            out.append(draft)
        return out if any_draft else None

    def _speculative_step(self, rows: list[_Request], drafts: list[list[int]], cache, finished: list) -> None:
        """One step where some rows verify drafts: each row keeps the longest prefix of its draft
        the model agrees with, plus the model's own next token; the rest leaves the cache.

        In one call where the cache takes several tokens per row (the concat batch; the slot
        pool with one row). Otherwise (the slot pool with more rows: GroupQueryAttention takes
        several new tokens for batch 1 only) a plain one-token step for every row, then each
        row whose first draft token was accepted feeds the rest of its draft alone."""
        fed = [1 + len(d) for d in drafts]
        if cache.multi_token_batch or len(rows) == 1:
            blocks = cache.decode_many([[r.last_token, *d] for r, d in zip(rows, drafts, strict=True)])
            extend = None
        else:
            first = cache.decode(np.fromiter((r.last_token for r in rows), np.int64, len(rows)))
            blocks = [first[i:i + 1] for i in range(len(rows))]
            fed = [1] * len(rows)

            def extend(i):
                fed[i] += len(drafts[i])
                return np.concatenate([blocks[i], cache.extend(rows[i], np.asarray(drafts[i], np.int64))])
        now = time.perf_counter()
        drops = {}
        for i, (request, draft) in enumerate(zip(rows, drafts, strict=True)):
            block = blocks[i]
            request.drafted += len(draft)
            j = 0
            while True:
                if j < len(draft):
                    token, ok = request.sampler.verify(block[j], draft[j])
                else:
                    token, ok = request.sampler(block[j]), False
                request.accepted += ok
                if self._emit(request, token, block[j], now):
                    finished.append(request)
                    break
                if not ok:
                    break
                j += 1
                if j >= len(block):  # the rest of the draft was not fed yet (the slot pool's two calls)
                    block = extend(i)
            drops[request] = fed[i] - (j + 1)
            if draft:
                request.draft_len, request.draft_pause, request.draft_backoff = schedule(
                    request.draft_len, request.draft_backoff, j, len(draft),
                    request.params.draft_tokens)
        cache.rollback(drops)

    def _emit(self, request: _Request, token: int, logits: np.ndarray, now: float) -> bool:
        """Record a sampled token and hand its event to the consumer; True when the request ends."""
        params = request.params
        request.generated += 1
        if request.first_token_time is None:
            request.first_token_time = now
        text = request.text
        finish = None
        if (token == self.eos_token_id and not params.ignore_eos) or token in request.stop_ids:
            finish = "stop"  # the EOS / stop token ends the completion and is not part of it
        else:
            request.tokens.append(token)
            request.last_token = token
            request.sampler.seen(token)
            if request.lookup is not None:
                request.lookup.extend((token,))
            if text is not None:
                text.push(token)
                if text.hit_stop:
                    finish = "stop"
            if finish is None and request.generated >= params.max_new_tokens:
                finish = "length"
        if finish is not None and text is not None:
            text.finish()
        piece = text.ready() if text is not None else ""
        lp = top = None
        if request.top_logprobs is not None:
            lp, top = logprobs(logits, token, request.top_logprobs)
        if finish is not None:
            request.finish_reason = finish
        request.channel.put(TokenEvent(token, piece, request.generated - 1, now, lp, top, finish))
        return finish is not None  # the stream ends in _end, once its row is free

    def _retire(self, request: _Request, reason: str, error: BaseException | None = None) -> None:
        """Free the request's row and close its stream (engine thread, between steps)."""
        if self._scheduler.remove(request):
            with self._cond:
                self._queued -= 1
        cache = self._cache
        if cache is not None and request in cache:
            cache.remove(request)
        self._end(request, reason, error)

    def _end(self, request: _Request, reason: str, error: BaseException | None = None) -> None:
        """Count the request in the totals, then end its stream (so a caller who saw the end
        sees its row free and the totals updated)."""
        if request.finished_time is not None:
            return
        if request.finish_reason is None:
            request.finish_reason, request.error = reason, error
        request.finished_time = time.perf_counter()
        seconds = request.finished_time - request.submitted
        with self._cond:
            totals = self._totals
            totals["finished"][request.finish_reason] += 1
            totals["prompt_tokens"] += len(request.prompt)
            totals["generated_tokens"] += request.generated
            totals["draft_tokens"] += request.drafted
            totals["accepted_tokens"] += request.accepted
            self._latency = seconds if self._latency is None else 0.9 * self._latency + 0.1 * seconds
            self._active = self._scheduler.active
        request.channel.put(_END)


@atexit.register
def _close_engines() -> None:  # a loop still inside a backend call at interpreter exit can crash it
    for engine in list(_live_engines):
        engine.close()
