"""Server-side text of a stream: incremental detokenization and stop strings.

Text that could be the start of a stop string is held back until the next
token shows whether the stop string completes, so a stop string split across
two tokens (or two chunks) is still found and never partly sent.
"""

from __future__ import annotations

from tilert.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopMatcher:
    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops = stops
        self.include_stop = include_stop
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to send, matched stop string or None)."""
        if not self.stops:
            return text, None
        buf = self._held + text
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self._held = ""
            return buf[: i + len(s)] if self.include_stop else buf[:i], s
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TextStream:
    """Token ids in, text deltas out, with stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], include_stop: bool) -> None:
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stops, include_stop)
        self.matched: str | None = None

    def push(self, token: int) -> str:
        text, self.matched = self.matcher.push(self.detok.push(token))
        return text

    def push_text(self, text: str) -> str:
        out, self.matched = self.matcher.push(text)
        return out

    def finish(self) -> str:
        """What is still held when the stream ends for another reason."""
        text, matched = self.matcher.push(self.detok.flush())
        if matched is not None:
            self.matched = matched
            return text
        return text + self.matcher.flush()
