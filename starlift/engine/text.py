"""A request's text: decoded as tokens arrive, never splitting a UTF-8 character, cut at the
first stop string, and held back while its end could still be the start of one."""

from __future__ import annotations

from collections.abc import Sequence

from starlift.model.tokenizer import Tokenizer


class TextState:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False  # a stop string was found, or finish() was called
        self.hit_stop = False  # a stop string was found

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
        start = max(0, len(self.text) - self.longest)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = self.hit_stop = True

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
