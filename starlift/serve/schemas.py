"""Request bodies of the HTTP API, as pydantic models (FastAPI validates them), and the error JSON.

Fields follow OpenAI's legacy completions and chat completions, and llama.cpp's ``/infill``.
Unknown fields are ignored, as OpenAI's clients send some the server need not know; fields the
server knows but cannot honour (``echo``, non-zero penalties, ``logit_bias``) answer 400 naming
the field instead of being silently dropped. Extensions (vLLM's names): ``top_k``,
``repetition_penalty``, ``ignore_eos``; starlift's ``speculative`` ("prompt-lookup") and
``draft_tokens`` (see docs/guide/speculative.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from starlift.engine.sampling import MAX_LOGPROBS

MAX_STOPS = 16
NonNegInt = Annotated[int, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: NonNegInt | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: NonNegInt | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    ignore_eos: bool = False
    speculative: str | None = None  # starlift: "prompt-lookup" speculative decoding (SamplingParams checks it)
    draft_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        return [s for s in stops if s]

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("is not supported (only 0); use repetition_penalty, a starlift extension")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("is not supported; send it empty or leave it out")
        return v


TokenIds = list[Annotated[int, Field(ge=0, strict=True)]]  # strict: true is not token 1


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("is empty; give a string, a list of strings, or a list of token ids")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("is not supported: the completion never repeats the prompt")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("is not supported (only 1); use n for several completions")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one string or one list of token ids per entry."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class InputExtra(_Body):
    filename: str = ""
    text: str = ""


class InfillRequest(_Body):
    """llama.cpp's ``/infill`` body (the fields editor plugins send)."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InputExtra] = []
    prompt: str = ""  # llama.cpp: text appended after the middle token (the start of the middle)
    n_predict: int = -1  # -1: until EOS or the context is full
    temperature: Annotated[float, Field(ge=0)] = 0.8  # llama.cpp's default
    top_k: NonNegInt = 40
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    repeat_penalty: Annotated[float, Field(gt=0)] = 1.0
    seed: int = -1
    stop: list[str] = []
    stream: bool = False
    ignore_eos: bool = False
    speculative: str | None = None  # starlift: "prompt-lookup" speculative decoding
    draft_tokens: int | None = None

    @field_validator("n_predict")
    @classmethod
    def _n_predict(cls, v):
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of tokens, or -1 for as many as fit")
        return v


class ClassifyRequest(_Body):
    """``/v1/classify``: one text or a list; a text-classification model ranks its labels
    (``top_k`` best, all when null), a token-classification model tags its tokens."""

    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)]
    top_k: Annotated[int, Field(ge=1)] | None = None
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None
    aggregation_strategy: Literal["none", "simple"] = "none"
    ignore_labels: list[str] | None = None
    truncation: bool = False


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
