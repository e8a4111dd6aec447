"""Generated token ids -> clean text chunks, ready to stream.

Each token's text goes out as soon as it is complete: `DecodeStream` decodes one id at a time in
O(1), holding back only the bytes of a character split over several byte-fallback tokens (emoji,
CJK), so no chunk ever carries a broken character. Stop sequences are matched on the text; a
possible beginning of one is held back until it is decided, so nothing is sent and taken back.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def parse_stop_sequences(value: str | None) -> list[str]:
    """Comma-separated, as Replicate's language models take them; empty entries are dropped."""
    return [s for s in (value or "").split(",") if s]


class StopSequenceMatcher:
    """Cuts text at the first stop sequence, across as many chunks as it spans."""

    def __init__(self, stop_sequences: list[str]):
        self.stop_sequences = [s for s in stop_sequences if s]
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """Text that can be sent now; after a stop sequence, nothing more."""
        if self.stopped:
            return ""
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stop_sequences) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return held[: min(hits)]
        keep = self._longest_open_prefix(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        """At the end of generation, held text was not a stop sequence after all."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _longest_open_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that a stop sequence starts with."""
        best = 0
        for stop in self.stop_sequences:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Feeds generated ids in, gets streamable text out."""

    def __init__(self, tokenizer: Tokenizer, stop_sequences: list[str] | None = None):
        self._tokenizer = tokenizer
        # skip_special_tokens: the EOS (and any other control token) never reaches the user.
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stops = StopSequenceMatcher(stop_sequences or [])

    @property
    def stopped(self) -> bool:
        """True once a stop sequence was seen: generation should end."""
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        text = self._decoder.step(self._tokenizer, token_id)
        return self._stops.feed(text) if text else ""

    def finish(self) -> str:
        return self._stops.flush()
