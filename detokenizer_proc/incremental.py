"""Incremental detokenization of one request: ids in, text deltas out, never half a character,
never text at or after a stop string."""

from __future__ import annotations

from typing import Optional

from engine.shared.protocol import DetokenizeSpec

# Decoding from a few tokens before the new ones lets the tokenizer merge spaces and byte pieces
# exactly as it would in the full text.
_CONTEXT_TOKENS = 5


class DecodeState:
    """Per-request decoding state: the ids so far and how much of their text was already emitted."""

    def __init__(self, spec: DetokenizeSpec) -> None:
        self.spec = spec
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode context starts here
        self.read_offset = 0  # ids before this are already in self.text
        self.text = ""  # all complete text decoded so far
        self.sent = 0  # chars of self.text already emitted

    def windows(self) -> tuple[list[int], list[int]]:
        """The two id windows whose decoded difference is the new text."""
        return self.ids[self.prefix_offset : self.read_offset], self.ids[self.prefix_offset :]

    def advance(self, prefix_text: str, full_text: str, final: bool) -> None:
        """Take the decoded windows; hold back an incomplete UTF-8 character (decodes to U+FFFD).
        When the request is over, complete text is taken and a dangling partial character dropped."""
        if final:
            full_text = full_text.rstrip("\ufffd")
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.text += full_text[len(prefix_text) :]
            self.prefix_offset = max(self.read_offset, len(self.ids) - _CONTEXT_TOKENS)
            self.read_offset = len(self.ids)

    def take_delta(self, finished: bool, matched_stop: Optional[str]) -> str:
        """Text not yet emitted; cut at a matched stop string; hold back a possible stop prefix."""
        end = len(self.text)
        if finished:
            if matched_stop is not None and not self.spec.no_stop_trim:
                pos = self.text.find(matched_stop, max(0, self.sent - len(matched_stop) + 1))
                if pos == -1:
                    pos = self.text.find(matched_stop)
                if pos != -1:
                    end = max(pos, self.sent)
        elif self.spec.stop:
            end -= _stop_prefix_len(self.text, self.spec.stop, self.sent)
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


def _stop_prefix_len(text: str, stops: list[str], start: int) -> int:
    """Length of the longest tail of text[start:] that begins some stop string (held back for now)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text) - start), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
        if stop in text[start:]:
            # The scheduler will finish the request at this stop; emit nothing from the stop on.
            best = max(best, len(text) - (start + text[start:].find(stop)))
    return best
