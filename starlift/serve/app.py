"""The ASGI app: OpenAI's completions and chat completions, llama.cpp's ``/infill``, models,
health and Prometheus metrics, as a thin layer over one ``Engine``.

Each route parses and validates the body into a typed request (``schemas``), turns it into
engine requests (``engine.submit``), and streams the handles' events back, as server-sent
events or one JSON body. Errors answer in OpenAI's error JSON: 400 naming the field for bad
input (the engine's ``UsageError`` too), 401 for a missing or wrong bearer token, 404 for
another model's name, 429 with ``Retry-After`` when the engine's queue is full (its
``QueueFullError``). A client that disconnects cancels its requests, which frees their cache
rows within one engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from starlift.core.errors import QueueFullError, StarliftError, UsageError
from starlift.engine import RequestHandle, SamplingParams

from .metrics import Metrics
from .schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, InfillRequest, error_body

ROUTES = ("/v1/completions", "/v1/chat/completions", "/infill", "/v1/classify", "/v1/models", "/health", "/metrics")
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ApiError(Exception):
    """An answer in OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


# the first word of an engine UsageError -> the request field it is about
_PARAM_OF = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "repetition_penalty": "repetition_penalty", "seed": "seed", "logprobs": "logprobs", "stop": "stop",
             "prompt": "prompt", "prompt_ids": "prompt", "token": "prompt", "the": "prompt"}


def _usage_error(e: UsageError, rename: dict[str, str] | None = None) -> ApiError:
    first = str(e).split(" ", 1)[0].strip("(:,")
    param = _PARAM_OF.get(first)
    if rename and param in rename:
        param = rename[param]
    return ApiError(400, str(e), param)


async def parse(request: Request, model: type[BaseModel]):
    """The body as ``model``, whatever its Content-Type (curl -d sends a form type; llama.cpp's
    server and OpenAI's read JSON anyway)."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON body ({e}); send a JSON object") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: list) -> ApiError:
    """pydantic's first error, with the field as OpenAI names it (``messages[0].role``)."""
    err = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if err.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}; send a JSON "
                             "object with Content-Type: application/json")
    loc = [x for x in err.get("loc", ()) if x != "body"]
    # a union's member name (str, list[int], ...) is not a field: drop it from the path
    loc = [x for x in loc if isinstance(x, int) or not any(c in str(x) for c in "[]()")
           and str(x) not in ("str", "int", "float", "bool", "function-after")]
    param = ""
    for x in loc:
        param += f"[{x}]" if isinstance(x, int) else (f".{x}" if param else str(x))
    if not loc and err.get("type") == "model_attributes_type":
        return ApiError(400, "the body must be a JSON object")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "missing":
        return ApiError(400, f"'{param}' is required", param or None)
    return ApiError(400, f"'{param}': {msg}" if param else msg, param or None)


class EventStream(StreamingResponse):
    """Server-sent events that cancel their engine requests when the client leaves.

    Starlette's StreamingResponse, under ASGI spec 2.4 servers, learns of a disconnect only when
    its next send fails: a request still waiting in the queue or prefilling a long prompt would
    hold its slot until then. Here a task listens for ``http.disconnect`` for the whole response
    and cancels the handles at once."""

    def __init__(self, content, on_disconnect: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        listen = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({stream, listen}, return_when=asyncio.FIRST_COMPLETED)
            if stream in done:
                stream.result()
                return
            self.on_disconnect()
            stream.cancel()
        except OSError:  # the server could not send: the client is gone
            self.on_disconnect()
        finally:
            listen.cancel()
            for task in (stream, listen):
                if not task.done():
                    try:
                        await task
                    except (asyncio.CancelledError, OSError):
                        pass


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: Any) -> bytes:
    return b"data: " + _JSON(obj).encode() + b"\n\n"


class Server:
    """The state one app serves: the engine, its tokenizer, the names, the key, the metrics."""

    def __init__(self, generator, model_name: str, api_key: str | None = None, chat_template: str | None = None):
        self.generator = generator  # None for a classifier (create_classify_app)
        self.engine = generator.engine if generator is not None else None
        self.tokenizer = generator.tokenizer if generator is not None else None
        self.model_name = model_name
        self.api_key = api_key.encode() if api_key else None
        self.chat_template = _compile_template(chat_template) if chat_template else None
        self.created = int(time.time())
        self.precision: str | None = None  # the artifact's, for `starlift parity --url` (GET /v1/models)
        self.metrics = Metrics(self.engine)
        self._token_text: dict[int, str] = {}

    # ---- helpers ------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # constant-time: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with", None, "invalid_request_error", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r} "
                                "(GET /v1/models)", "model", "invalid_request_error", "model_not_found")

    def need_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise ApiError(400, "this artifact has no tokenizer.json: send the prompt as token ids", param)
        return self.tokenizer

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token]) if self.tokenizer else str(token)
        return text

    def params(self, rename: dict[str, str] | None = None, **kwargs) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except UsageError as e:
            raise _usage_error(e, rename) from None

    def submit(self, jobs: list[tuple[list[int], SamplingParams, dict]],
               rename: dict[str, str] | None = None) -> list[RequestHandle]:
        """Submit every job, or none: a later one failing (queue full, bad input) cancels the earlier."""
        handles: list[RequestHandle] = []
        try:
            for ids, params, options in jobs:
                handles.append(self.engine.submit(ids, params, **options))
                self.metrics.prompt_tokens.inc(len(ids))
        except QueueFullError as e:
            for h in handles:
                h.cancel()
            raise ApiError(429, str(e), None, "requests", "rate_limit_exceeded",
                           {"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
        except UsageError as e:
            for h in handles:
                h.cancel()
            raise _usage_error(e, rename) from None
        except StarliftError as e:  # the engine is closed: the server is shutting down
            for h in handles:
                h.cancel()
            raise ApiError(503, f"the server is shutting down ({e})", None, "server_error") from None
        return handles

    def observe(self, handle: RequestHandle, event, last: float | None) -> float:
        self.metrics.generation_tokens.inc()  # as they come: a cancelled request's tokens count too
        if last is None:
            self.metrics.ttft.observe(event.time - handle.submitted_time)
        else:
            self.metrics.itl.observe(event.time - last)
        return event.time

    @staticmethod
    def failed(handle: RequestHandle) -> ApiError | None:
        if handle.finish_reason == "error":
            return ApiError(500, f"generation failed: {type(handle.error).__name__}: {handle.error}", None,
                            "server_error")
        if handle.finish_reason == "cancelled":
            return ApiError(503, "the request was cancelled: the server is shutting down", None, "server_error")
        return None

    async def collect(self, handle: RequestHandle, logprobs: bool) -> list:
        """Read a handle to its end (metrics observed); the events when logprobs are wanted."""
        events, last = [], None
        async for event in handle:
            last = self.observe(handle, event, last)
            if logprobs:
                events.append(event)
        return events

    async def merged(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, event) from several handles as they come; the one-handle case directly."""
        if len(handles) == 1:
            handle, last = handles[0], None
            async for event in handle:
                last = self.observe(handle, event, last)
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle) -> None:
            last = None
            try:
                async for event in handle:
                    last = self.observe(handle, event, last)
                    queue.put_nowait((i, event))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        try:
            running = len(tasks)
            while running:
                i, event = await queue.get()
                if event is None:
                    running -= 1
                else:
                    yield i, event
        finally:
            for t in tasks:
                t.cancel()

    async def until_disconnect(self, request: Request, handles: list[RequestHandle], work):
        """Run ``work`` unless the client disconnects first (then cancel the handles; vLLM's
        ``with_cancellation``): a non-streaming request must not hold rows for nobody."""
        task = asyncio.ensure_future(work)
        listen = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({task, listen}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            self.cancel(handles, disconnected=True)
            task.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            listen.cancel()

    def cancel(self, handles: list[RequestHandle], disconnected: bool = False) -> None:
        if disconnected and any(not h.done for h in handles):
            self.metrics.disconnects.inc()
        for h in handles:
            h.cancel()

    def usage(self, handles: list[RequestHandle]) -> dict:
        prompt = sum(h.prompt_tokens for h in handles)
        completion = sum(h.completion_tokens for h in handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs_json(self, events: list, offset0: int = 0) -> dict:
        """OpenAI's completion logprobs, plus the token ids (``token_ids``, ``top_token_ids``,
        ``top_token_logprobs``: the ids a text key can merge are kept apart)."""
        tokens, offsets, offset = [], [], offset0
        for e in events:
            text = self.token_text(e.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top_logprobs} for e in events],
                "text_offset": offsets, "token_ids": [e.token_id for e in events],
                "top_token_ids": [[t for t, _ in e.top_logprobs] for e in events],
                "top_token_logprobs": [[lp for _, lp in e.top_logprobs] for e in events]}


def _finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


def _compile_template(source: str):
    """A Jinja chat template in transformers' sandbox (the environment HF templates are written for)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"the chat template does not compile: {e}") from e


def chat_template_of(folder: str | Path) -> str | None:
    """The ``chat_template`` of a tokenizer_config.json (or chat_template.jinja) beside the model."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def _base_app(server: Server, max_model_len: int | None, task: str) -> FastAPI:
    """What every app has: error handlers, request counting, health, metrics, models."""
    app = FastAPI(title="starlift", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors()).response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}",
                        code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error").response()

    app.add_middleware(_CountRequests, metrics=server.metrics)

    # ---- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "starlift", "task": task, "max_model_len": max_model_len,
                                            "precision": server.precision}]}

    return app


def _wrong_task(app: FastAPI, routes: tuple[str, ...], served: str, use: str) -> None:
    """Routes of the other kind of model answer 400 saying which route serves this one."""

    async def wrong(request: Request):
        raise ApiError(400, f"this server serves a {served} model: use {use}", None, code="wrong_task")

    for route in routes:
        app.add_api_route(route, wrong, methods=["POST"])


def create_app(generator, *, model_name: str = "starlift", api_key: str | None = None,
               chat_template: str | None = None, precision: str | None = None) -> FastAPI:
    """The app over ``generator`` (what ``starlift.load`` returns; its engine serves every request).
    ``precision`` (the artifact's: fp32, fp16, int8, ...) is listed by ``GET /v1/models``."""
    server = Server(generator, model_name, api_key, chat_template)
    server.precision = precision
    app = _base_app(server, server.engine.context, "text-generation")
    _wrong_task(app, ("/v1/classify",), "text-generation", "/v1/completions, /v1/chat/completions or /infill")

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        body = await parse(request, CompletionRequest)
        server.check_model(body.model)
        jobs = []
        for prompt in body.prompts():
            if isinstance(prompt, str):
                if not prompt and body.suffix is None:
                    raise ApiError(400, "'prompt' is empty; give at least one character or token", "prompt")
                tok = server.need_tokenizer("prompt")
                if body.suffix is not None:
                    ids, fim = tok.encode_fim(prompt, body.suffix), True
                else:
                    ids, fim = tok.encode(prompt), False
            else:
                if body.suffix is not None:
                    raise ApiError(400, "'suffix' needs a text prompt (fill in the middle is built from text)",
                                   "suffix")
                ids, fim = prompt, False
            max_tokens = body.max_tokens or max(1, server.engine.context - len(ids))  # null: as many as fit
            for j in range(body.n):
                params = server.params(max_new_tokens=max_tokens, temperature=body.temperature,
                                       top_p=body.top_p, top_k=body.top_k,
                                       repetition_penalty=body.repetition_penalty,
                                       seed=None if body.seed is None else body.seed + j, ignore_eos=body.ignore_eos,
                                       **_speculative(body))
                jobs.append((ids, params, {"stop": body.stop or [], "fim": fim, "logprobs": body.logprobs}))
        handles = server.submit(jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
        want_lp = body.logprobs is not None

        if body.stream:
            async def events():
                try:
                    offsets = [0] * len(handles)
                    async for i, e in server.merged(handles):
                        if not e.text and not want_lp and e.finish_reason is None:
                            continue
                        choice = {"index": i, "text": e.text, "logprobs": None,
                                  "finish_reason": _finish(e.finish_reason)}
                        if want_lp:
                            choice["logprobs"] = server.logprobs_json([e], offsets[i])
                            offsets[i] += len(server.token_text(e.token_id))
                        chunk = {**base, "choices": [choice]}
                        if e.finish_reason is not None:
                            choice["token_ids"] = handles[i].token_ids
                        yield _sse(chunk)
                    for h in handles:
                        if (err := server.failed(h)) is not None:
                            yield _sse(error_body(err.message, err.type, None, err.code))
                            break
                    else:  # usage in every response (stream_options.include_usage or not): a last chunk
                        yield _sse({**base, "choices": [], "usage": server.usage(handles)})
                    yield b"data: [DONE]\n\n"
                finally:
                    server.cancel(handles)

            return EventStream(events(), lambda: server.cancel(handles, disconnected=True))

        async def complete():
            try:
                collected = await asyncio.gather(*(server.collect(h, want_lp) for h in handles))
            finally:
                server.cancel(handles)
            for h in handles:
                if (err := server.failed(h)) is not None:
                    raise err
            choices = []
            for i, (h, evs) in enumerate(zip(handles, collected, strict=True)):
                choices.append({"index": i, "text": h.text, "logprobs": server.logprobs_json(evs) if want_lp else None,
                                "finish_reason": _finish(h.finish_reason), "token_ids": h.token_ids})
            return {**base, "choices": choices, "usage": server.usage(handles)}

        return await server.until_disconnect(request, handles, complete())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        server.check_key(request)
        body = await parse(request, ChatCompletionRequest)
        server.check_model(body.model)
        if server.chat_template is None:
            raise ApiError(400, f"the model {server.model_name!r} has no chat template (StarCoder2 base models have "
                                "none): start the server with --chat-template FILE, or use /v1/completions",
                           "messages", code="no_chat_template")
        tok = server.need_tokenizer("messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = server.chat_template.render(messages=messages, add_generation_prompt=True,
                                               bos_token=_eos_text(server), eos_token=_eos_text(server))
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception or a bad template
            raise ApiError(400, f"the chat template failed on these messages: {e}", "messages") from None
        ids = tok.encode(text)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, server.engine.context - len(ids))
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        jobs = []
        for j in range(body.n):
            params = server.params(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                   top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                                   seed=None if body.seed is None else body.seed + j, ignore_eos=body.ignore_eos,
                                       **_speculative(body))
            jobs.append((ids, params, {"stop": body.stop or [], "logprobs": top}))
        handles = server.submit(jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": server.model_name}

        def chat_lp(events):
            return {"content": [{"token": server.token_text(e.token_id), "logprob": e.logprob,
                                 "top_logprobs": [{"token": server.token_text(t), "logprob": lp}
                                                  for t, lp in e.top_logprobs]} for e in events]}

        if body.stream:
            async def events():
                try:
                    for i in range(len(handles)):
                        yield _sse({**base, "object": "chat.completion.chunk",
                                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
                    async for i, e in server.merged(handles):
                        if not e.text and top is None and e.finish_reason is None:
                            continue
                        choice = {"index": i, "delta": {"content": e.text} if e.text else {},
                                  "logprobs": chat_lp([e]) if top is not None else None,
                                  "finish_reason": _finish(e.finish_reason)}
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [choice]})
                    for h in handles:
                        if (err := server.failed(h)) is not None:
                            yield _sse(error_body(err.message, err.type, None, err.code))
                            break
                    else:
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                                    "usage": server.usage(handles)})
                    yield b"data: [DONE]\n\n"
                finally:
                    server.cancel(handles)

            return EventStream(events(), lambda: server.cancel(handles, disconnected=True))

        async def complete():
            try:
                collected = await asyncio.gather(*(server.collect(h, top is not None) for h in handles))
            finally:
                server.cancel(handles)
            for h in handles:
                if (err := server.failed(h)) is not None:
                    raise err
            choices = [{"index": i, "message": {"role": "assistant", "content": h.text},
                        "logprobs": chat_lp(evs) if top is not None else None,
                        "finish_reason": _finish(h.finish_reason)}
                       for i, (h, evs) in enumerate(zip(handles, collected, strict=True))]
            return {**base, "object": "chat.completion", "choices": choices, "usage": server.usage(handles)}

        return await server.until_disconnect(request, handles, complete())

    @app.post("/infill")
    async def infill(request: Request):
        server.check_key(request)
        body = await parse(request, InfillRequest)
        tok = server.need_tokenizer("input_prefix")
        ids = []
        file_sep = tok.find_token("<file_sep>")
        for extra in body.input_extra:  # repository context before the FIM prompt, StarCoder2's <file_sep> format
            if file_sep is not None:
                ids.append(file_sep)
            ids += tok.encode(f"{extra.filename}\n{extra.text}" if extra.filename else extra.text)
        ids += tok.encode_fim(body.input_prefix, body.input_suffix)
        if body.prompt:
            ids += tok.encode(body.prompt)
        n_predict = body.n_predict if body.n_predict > 0 else max(1, server.engine.context - len(ids))
        rename = {"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty"}
        params = server.params(rename, max_new_tokens=n_predict, temperature=body.temperature,
                               top_k=body.top_k or None, top_p=body.top_p,
                               repetition_penalty=None if body.repeat_penalty == 1.0 else body.repeat_penalty,
                               seed=None if body.seed < 0 else body.seed, ignore_eos=body.ignore_eos,
                               **_speculative(body))
        handles = server.submit([(ids, params, {"stop": body.stop, "fim": True})], rename)
        handle = handles[0]

        def final() -> dict:
            hit_word = handle.finish_reason == "stop" and body.stop and handle.text != tok.decode(handle.token_ids)
            return {"content": "", "stop": True, "model": server.model_name,
                    "stop_type": "limit" if handle.finish_reason == "length" else ("word" if hit_word else "eos"),
                    "tokens_predicted": handle.completion_tokens, "tokens_evaluated": handle.prompt_tokens,
                    "truncated": False}

        if body.stream:
            async def events():
                try:
                    async for _, e in server.merged(handles):
                        if e.text:
                            yield _sse({"content": e.text, "stop": False})
                    if (err := server.failed(handle)) is not None:
                        yield _sse(error_body(err.message, err.type, None, err.code))
                    else:
                        yield _sse(final())
                finally:
                    server.cancel(handles)

            return EventStream(events(), lambda: server.cancel(handles, disconnected=True))

        async def complete():
            try:
                await server.collect(handle, False)
            finally:
                server.cancel(handles)
            if (err := server.failed(handle)) is not None:
                raise err
            return {**final(), "content": handle.text}

        return await server.until_disconnect(request, handles, complete())

    return app


def create_classify_app(pipeline, *, model_name: str = "starlift", api_key: str | None = None,
                        max_queue: int = 64) -> FastAPI:
    """``POST /v1/classify`` over a text- or token-classification pipeline
    (``starlift.pipeline("text-classification", ARTIFACT)``), with the same models, health,
    metrics, key and error JSON as the generation app. The pipeline runs in a worker thread, one
    call at a time (a runner's buffers are not shared between threads; each call batches its
    texts); beyond ``max_queue`` waiting calls the answer is 429."""
    server = Server(None, model_name, api_key)
    task = pipeline.task
    app = _base_app(server, pipeline.classifier.info.context, task)
    _wrong_task(app, ("/v1/completions", "/v1/chat/completions", "/infill"), task, "/v1/classify")
    slots = asyncio.Semaphore(1)
    waiting = {"n": 0}
    tokenizer = pipeline.classifier.tokenizer

    def run(body: ClassifyRequest, texts: list[str]) -> list[dict]:
        if task == "text-classification":
            ranked = pipeline(texts, top_k=None, function_to_apply=body.function_to_apply,
                              truncation=body.truncation)
            return [{"label": r[0]["label"], "score": r[0]["score"],
                     "labels": r if body.top_k is None else r[:body.top_k]} for r in ranked]
        out = pipeline(texts, aggregation_strategy=body.aggregation_strategy, ignore_labels=body.ignore_labels,
                       truncation=body.truncation)
        return [{"entities": e} for e in out]

    @app.post("/v1/classify")
    async def classify(request: Request):
        server.check_key(request)
        body = await parse(request, ClassifyRequest)
        server.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if waiting["n"] > max_queue:
            raise ApiError(429, f"{waiting['n']} classification calls are waiting (max_queue {max_queue}); retry "
                                "later", None, "requests", "rate_limit_exceeded", {"Retry-After": "1"})
        waiting["n"] += 1
        try:
            async with slots:
                data = await asyncio.to_thread(run, body, texts)
        except UsageError as e:
            raise ApiError(400, str(e), "input") from None
        finally:
            waiting["n"] -= 1
        tokens = sum(len(tokenizer.encode(t)) for t in texts)
        server.metrics.prompt_tokens.inc(tokens)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": server.model_name, "data": [{"index": i, **d} for i, d in enumerate(data)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


def _eos_text(server: Server) -> str:
    """StarCoder2's <|endoftext|> is both its BOS and EOS."""
    eos = server.generator.eos_token_id
    return server.token_text(eos) if eos is not None else ""


class _CountRequests:
    """Pure ASGI middleware counting answers by route and status (a BaseHTTPMiddleware would
    buffer the event streams)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()


def _speculative(body) -> dict:
    """The request's speculative decoding fields, for SamplingParams (which checks them: 400)."""
    out = {"speculative": body.speculative}
    if body.draft_tokens is not None:
        out["draft_tokens"] = body.draft_tokens
    return out
