"""The StarCoder2 tokenizer over the ``tokenizers`` library, with streaming decode and FIM."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starlift.core.errors import CheckpointError, UsageError

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[int]  # 1 where the post-processor added a special token


class Tokenizer:
    """``encode`` adds no special tokens; ``decode`` keeps them unless asked to skip them."""

    def __init__(self, backend):
        self._tok = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist; a tokenizer.json from the checkpoint is needed")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{path} is not a valid tokenizers JSON file ({e})") from e

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        from .folders import resolve_checkpoint

        return cls.from_file(resolve_checkpoint(folder) / "tokenizer.json")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise UsageError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> Encoded:
        """What transformers' tokenizer call gives a pipeline: ids with the post-processor's special
        tokens (none for StarCoder2), each token's string, its (start, end) characters in ``text``,
        and which tokens the post-processor added."""
        if not isinstance(text, str):
            raise UsageError(f"encode_with_offsets() takes a str, got {type(text).__name__}")
        e = self._tok.encode(text, add_special_tokens=True)
        return Encoded(list(e.ids), list(e.tokens), [tuple(o) for o in e.offsets], list(e.special_tokens_mask))

    def tokens_to_string(self, tokens: list[str]) -> str:
        """Token strings back to text through the tokenizer's decoder (transformers'
        ``convert_tokens_to_string`` for fast tokenizers)."""
        return self._tok.decoder.decode(tokens) if self._tok.decoder is not None else " ".join(tokens)

    @property
    def unk_token_id(self) -> int | None:
        unk = getattr(self._tok.model, "unk_token", None)
        return self._tok.token_to_id(unk) if unk else None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def find_token(self, token: str) -> int | None:
        """The id of ``token``, or None when the vocabulary has no such token."""
        return self._tok.token_to_id(token)

    def token_id(self, token: str) -> int:
        idx = self.find_token(token)
        if idx is None:
            raise UsageError(f"the tokenizer has no token {token!r}; it is not a StarCoder2 tokenizer")
        return idx

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """StarCoder2's fill-in-the-middle prompt (prefix-suffix-middle order)."""
        return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """FIM prompt ids, with the special tokens as ids (never as text a user typed)."""
        return ([self.token_id(FIM_PREFIX)] + self.encode(prefix) + [self.token_id(FIM_SUFFIX)]
                + self.encode(suffix) + [self.token_id(FIM_MIDDLE)])

    def special_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental decode: ``push(id)`` returns the new text that is final, ``flush()`` the rest.

    The pieces join to exactly ``decode(all_ids)``: text is held back while the decoded tail
    ends in U+FFFD (an incomplete UTF-8 sequence), and a window of recent ids is re-decoded so
    that each step costs O(1) rather than decoding the whole sequence again.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            piece = new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is held back (a genuinely invalid sequence decodes to U+FFFD here)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]
