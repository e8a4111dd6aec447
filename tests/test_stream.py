"""Streamed text: each token's text at once, never a broken character, never an exception, stop sequences exact."""

from __future__ import annotations

import codecs
import random

import pytest

from notus.stream import StopSequenceMatcher, TextStream, TokenBytes, parse_stop_sequences

EOS = 2


def stream_chunks(tokenizer, ids, stops=None) -> list[str]:
    text = TextStream(TokenBytes(tokenizer), stops)
    chunks = []
    for token_id in ids:
        chunks.append(text.push(token_id))
        if text.stopped:
            break
    chunks.append(text.finish())
    return chunks


def test_each_token_goes_out_as_soon_as_it_is_complete(engine):
    ids = engine.tokenizer.encode("Hello world, how are you?", add_special_tokens=False).ids
    chunks = stream_chunks(engine.tokenizer, ids)
    # One chunk per token, not held to a word boundary, nothing left for the end.
    assert chunks[:-1] == [engine.tokenizer.decode(ids[: i + 1])[len(engine.tokenizer.decode(ids[:i])):] for i in range(len(ids))]
    assert all(chunks[:-1]) and chunks[-1] == ""


TEXTS = [
    "Emoji: 👋🏽 🎉🎉 and 🇫🇷 flags",
    "CJK: 日本語の文章です。中文句子。한국어 문장",
    "Accents: café, naïve, Ærø, São Paulo, Łódź",
    "  two leading spaces, and   three inside",
    "line one\nline two\n\n\tindented\n",
    " single leading space",
    "mixed 👋 日本 é\n  x",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_is_exact_and_never_broken(engine, sp, text):
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids + [EOS]
    chunks = stream_chunks(engine.tokenizer, ids)
    assert all("\ufffd" not in chunk for chunk in chunks)
    joined = "".join(chunks)
    # Equal to the tokenizer's decode (minus the EOS), and to SentencePiece's own.
    assert joined == engine.tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids[:-1])
    assert joined == text  # spaces neither lost nor doubled


def test_byte_fallback_character_waits_for_its_last_byte(engine):
    ids = engine.tokenizer.encode("a👋", add_special_tokens=False).ids
    chunks = stream_chunks(engine.tokenizer, ids)
    # The emoji is four byte tokens: nothing goes out until the fourth completes it.
    assert chunks[-5:] == ["", "", "", "👋", ""]
    assert "".join(chunks) == "a👋"


def test_stop_sequence_spanning_tokens(engine):
    text = "The answer is 42.\nUser: and then more text"
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    pieces = [engine.tokenizer.decode([i]) for i in ids]
    assert "User:" not in pieces  # the stop really spans several tokens
    chunks = stream_chunks(engine.tokenizer, ids, ["\nUser:"])
    assert "".join(chunks) == "The answer is 42."


def test_partial_match_is_held_then_released(engine):
    text = "I said Use it, then User: bye"
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    chunks = stream_chunks(engine.tokenizer, ids, ["User:"])
    assert "".join(chunks) == "I said Use it, then "
    # "Use" is held while it could still become "User:", and sent once it cannot.
    matcher = StopSequenceMatcher(["User:"])
    assert matcher.feed("I said Use") == "I said "
    assert matcher.feed(" it") == "Use it"


def test_earliest_stop_sequence_wins_and_output_ends_before_it():
    matcher = StopSequenceMatcher(["world", "lo w"])
    out = "".join(matcher.feed(c) for c in "hello world")
    assert out == "hel" and matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_held_text_is_flushed_at_the_end():
    matcher = StopSequenceMatcher(["</answer>"])
    assert matcher.feed("done </ans") == "done "
    assert matcher.flush() == "</ans" and not matcher.stopped


def test_stop_sequence_at_the_very_start(engine):
    ids = engine.tokenizer.encode("STOP here", add_special_tokens=False).ids
    assert "".join(stream_chunks(engine.tokenizer, ids, ["STOP"])) == ""


def test_nothing_is_ever_taken_back(engine):
    text = "abcabcabd abcabd"
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    chunks = stream_chunks(engine.tokenizer, ids, ["abcabd"])
    assert "".join(chunks) == "abc"


@pytest.mark.parametrize(
    "value,expected",
    [("", []), (None, []), ("<end>", ["<end>"]), ("<end>,<stop>", ["<end>", "<stop>"]), ("a,,b,", ["a", "b"]),
     ("\n\n,User:", ["\n\n", "User:"]),
     # Spaces around each are dropped (what a person typing a list means); other whitespace counts.
     ("<end>, <stop>", ["<end>", "<stop>"]), (" Human: , \nUser:", ["Human:", "\nUser:"]), (" , ", []),
     ("two words", ["two words"])],
)
def test_parse_stop_sequences(value, expected):
    assert parse_stop_sequences(value) == expected


def test_stop_sequences_with_spaces_after_the_commas_stop_the_reply(engine):
    text = "The answer is 42. <stop> and more"
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    chunks = stream_chunks(engine.tokenizer, ids, parse_stop_sequences("<end>, <stop>"))
    assert "".join(chunks) == "The answer is 42. "


# --- Any id sequence the model may write: never an exception, exact text, U+FFFD for bad bytes ---

def byte_id(byte: int) -> int:
    return 3 + byte  # notus's <0x00>..<0xFF> are ids 3..258


def reference_bytes(sp, ids: list[int]) -> bytes:
    """The bytes the ids spell, read off SentencePiece's own piece table (not the code under test)."""
    out = bytearray()
    for i in ids:
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        piece = sp.id_to_piece(i)
        out += bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.replace("\u2581", " ").encode()
    return bytes(out)


codecs.register_error("test-each-byte", lambda e: ("\ufffd" * (e.end - e.start), e.end))


def reference_text(sp, ids: list[int]) -> str:
    """Standard UTF-8 decoding, one U+FFFD per byte that is not part of a character, first space dropped."""
    text = reference_bytes(sp, ids).decode("utf-8", errors="test-each-byte")
    return text[1:] if text.startswith(" ") else text


def random_ids(rng: random.Random) -> list[int]:
    """Ids rich in byte tokens: whole characters, cut ones, stray bytes, next to pieces and control tokens."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 24)):
        r = rng.random()
        char = chr(rng.choice([rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF), rng.randint(0x10000, 0x10FFFF)]))
        if r < 0.25:
            ids += [byte_id(b) for b in char.encode("utf-8", "surrogatepass")]  # a whole character
        elif r < 0.3:
            ids += [byte_id(b) for b in char.encode("utf-8", "surrogatepass")[:-1]]  # a cut one
        elif r < 0.37:
            ids.append(byte_id(rng.randint(0, 255)))  # any byte at all
        elif r < 0.55:
            ids.append(byte_id(0x0A))  # how the model writes a newline
        elif r < 0.92:
            ids.append(rng.randint(259, 31999))  # an ordinary piece
        else:
            ids.append(rng.choice([0, 1, 2]))  # <unk>, <s>, </s>
    return ids


ISSUE_CASES = [
    [78, 216, 4451],  # <0x4B> <0xD5> ▁$(
    ["▁Hello", "<0x0A>", "<0xD8>", "▁the"],
    ["<0xF0>", "<0x9F>", "<0x91>", "<0x8B>", "<0xD8>", "▁the", "<0xE6>"],
]


@pytest.mark.parametrize("case", ISSUE_CASES)
def test_invalid_bytes_become_u_fffd_and_nothing_sent_is_taken_back(engine, sp, case):
    ids = [i if isinstance(i, int) else engine.tokenizer.token_to_id(i) for i in case]
    chunks = stream_chunks(engine.tokenizer, ids)
    text = "".join(chunks)
    assert text == reference_text(sp, ids) == sp.decode(ids)  # SentencePiece itself agrees here
    assert text.count("\ufffd") >= 1


def test_ten_thousand_random_id_sequences_stream_exactly(engine, sp):
    token_bytes = TokenBytes(engine.tokenizer)
    rng = random.Random(20261123)
    valid = 0
    for _ in range(10_000):
        ids = random_ids(rng)
        stream = TextStream(token_bytes)
        sent = "".join(stream.push(i) for i in ids) + stream.finish()  # chunks only ever append
        try:
            reference_bytes(sp, ids).decode("utf-8")
        except UnicodeDecodeError:
            assert sent == reference_text(sp, ids), ids
        else:
            valid += 1
            assert sent == engine.tokenizer.decode(ids, skip_special_tokens=True) == reference_text(sp, ids), ids
    assert 3_000 < valid < 7_000, valid  # both kinds well represented


def test_a_character_cut_by_the_end_of_generation_is_one_u_fffd_per_byte(engine):
    ids = engine.tokenizer.encode("ok 👋", add_special_tokens=False).ids[:-2]  # two of 👋's four bytes
    assert stream_chunks(engine.tokenizer, ids) == ["ok", " ", "", "", "\ufffd\ufffd"]


def test_token_bytes_cover_the_whole_vocabulary(engine, sp):
    token_bytes = TokenBytes(engine.tokenizer)
    assert len(token_bytes.table) == sp.get_piece_size() == 32000
    assert token_bytes[0] == token_bytes[1] == token_bytes[2] == b""  # <unk>, <s>, </s>: no text
    assert token_bytes[byte_id(0xD8)] == b"\xd8" and token_bytes[32000] == token_bytes[-1] == b""
