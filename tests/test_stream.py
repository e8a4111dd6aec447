"""Streamed text: each token's text at once, never a broken character, stop sequences exact."""

from __future__ import annotations

import pytest

from notus.stream import StopSequenceMatcher, TextStream, parse_stop_sequences

EOS = 2


def stream_chunks(tokenizer, ids, stops=None) -> list[str]:
    text = TextStream(tokenizer, stops)
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
     ("\n\n,User:", ["\n\n", "User:"])],
)
def test_parse_stop_sequences(value, expected):
    assert parse_stop_sequences(value) == expected
