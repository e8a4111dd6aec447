"""Generated token ids -> clean text chunks, ready to stream. Never fails, whatever the ids.

Each token's text goes out as soon as it is complete. notus's tokenizer writes characters it has
no piece for as byte tokens (`<0xF0>` `<0x9F>` `<0x91>` `<0x8B>` for 👋), so text is decoded at the
byte level: every id maps to its bytes once (`TokenBytes`), and an incremental UTF-8 decoder holds
back only the bytes of a character not yet complete. Bytes that cannot become a character (the
model is free to write any byte sequence) come out as one U+FFFD each, exactly as SentencePiece's
own decode shows them, and never as an exception; nothing already sent is ever taken back.
(tokenizers' DecodeStream raises "Invalid prefix encountered" on such sequences.)

Stop sequences are matched on the text; a possible beginning of one is held back until it is
decided, so nothing is sent and taken back there either.
"""

from __future__ import annotations

import codecs
import re

from tokenizers import Tokenizer

# One U+FFFD per byte that is not part of a valid character (Python's "replace" gives one per
# maximal invalid run; SentencePiece and tokenizers' ByteFallback give one per byte).
_REPLACE_EACH_BYTE = "notus.replace-each-byte"
codecs.register_error(_REPLACE_EACH_BYTE, lambda e: ("\ufffd" * (e.end - e.start), e.end))
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """Each token id's bytes, as notus's decoder (notus/prompt.py) spells them.

    That decoder turns `▁` into a space, byte pieces into their byte, fuses everything and strips
    one leading space from the whole text; control tokens (`<unk>`, `<s>`, `</s>`) are skipped.
    Built once per tokenizer (32,000 entries), then a list lookup per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self.table: list[bytes] = []
        for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
            piece = tokenizer.id_to_token(i)
            byte = _BYTE_PIECE.fullmatch(piece or "")
            if i in special or piece is None:
                self.table.append(b"")
            elif byte:
                self.table.append(bytes([int(byte.group(1), 16)]))
            else:
                self.table.append(piece.replace("\u2581", " ").encode("utf-8"))

    def __getitem__(self, token_id: int) -> bytes:
        # An id outside the vocabulary (a model whose head is wider than its tokenizer) has no text.
        return self.table[token_id] if 0 <= token_id < len(self.table) else b""


class TokenText:
    """Token ids in, text out, one token at a time: O(1) per token, no exception on any id."""

    def __init__(self, token_bytes: TokenBytes):
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=_REPLACE_EACH_BYTE)
        self._started = False

    def push(self, token_id: int) -> str:
        return self._strip_first_space(self._utf8.decode(self._bytes[token_id]))

    def finish(self) -> str:
        """The end of generation: the bytes of an unfinished character, as U+FFFD each."""
        return self._strip_first_space(self._utf8.decode(b"", final=True))

    def _strip_first_space(self, text: str) -> str:
        # SentencePiece writes a word's leading space into its piece (`▁Hello`); the decoder drops
        # the one the text starts with.
        if text and not self._started:
            self._started = True
            return text[1:] if text[0] == " " else text
        return text


def parse_stop_sequences(value: str | None) -> list[str]:
    """Comma-separated, as Replicate's language models take them, so no stop sequence holds a comma.

    The spaces around each are dropped, so "<end>, <stop>" means "<end>" and "<stop>"; any other
    whitespace counts ("\\n\\n,User:" stops at a blank line or at "User:"). Empty entries are dropped.
    """
    return [s for s in (part.strip(" ") for part in (value or "").split(",")) if s]


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

    def __init__(self, token_bytes: TokenBytes, stop_sequences: list[str] | None = None):
        self._text = TokenText(token_bytes)
        self._stops = StopSequenceMatcher(stop_sequences or [])

    @property
    def stopped(self) -> bool:
        """True once a stop sequence was seen: generation should end."""
        return self._stops.stopped

    def push(self, token_id: int) -> str:
        text = self._text.push(token_id)
        return self._stops.feed(text) if text else ""

    def finish(self) -> str:
        tail = self._text.finish()
        return self._stops.feed(tail) + self._stops.flush()
