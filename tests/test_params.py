"""Every value the schema accepts works: exact JSON numbers, the deprecated aliases, a sampler that never sees NaN."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

from aio import flattened, text
from notus.engine import GenerationStats
from notus.params import (
    CONTEXT_LENGTH,
    LONGEST_PIECE_BYTES,
    LONGEST_PIECE_CHARS,
    MAX_PROMPT_BYTES,
    MAX_PROMPT_CHARS,
    VOCAB_SIZE,
    SamplingParams,
    with_alias,
)
from notus.sampling import RowSettings, Sampler
from notus.stream import TokenBytes
from random_checkpoint import WEIGHTS


def test_limits_are_notus_own(engine):
    config = json.loads((WEIGHTS / "config.json").read_text())
    assert CONTEXT_LENGTH == config["max_position_embeddings"] and VOCAB_SIZE == config["vocab_size"]
    # No token is longer than LONGEST_PIECE_CHARS, so no prompt that fits the context is longer than
    # MAX_PROMPT_CHARS: the schema's maxLength refuses only prompts that could never run.
    longest = max(len(b.decode("utf-8", errors="replace")) for b in TokenBytes(engine.tokenizer).table)
    assert longest == LONGEST_PIECE_CHARS
    assert MAX_PROMPT_CHARS == CONTEXT_LENGTH * LONGEST_PIECE_CHARS
    # Nor more than LONGEST_PIECE_BYTES of UTF-8 (its pieces as the normalised text spells them: a
    # typed U+2581 is 3 bytes), so no prompt that fits the context is longer than MAX_PROMPT_BYTES.
    tokenizer = engine.tokenizer
    control = tokenizer.get_added_tokens_decoder()
    ordinary = [piece for piece, i in tokenizer.get_vocab().items()
                if i not in control and not re.fullmatch("<0x[0-9A-F]{2}>", piece)]
    assert max(len(piece.encode()) for piece in ordinary) == LONGEST_PIECE_BYTES
    assert MAX_PROMPT_BYTES == CONTEXT_LENGTH * LONGEST_PIECE_BYTES
    # And the bound is met: 16 typed U+2581 are one token of 48 bytes.
    assert len(engine.prompt.ids("", "\N{LOWER ONE EIGHTH BLOCK}" * 16 * 100)) < len(engine.prompt.ids("", "")) + 102


def test_json_numbers_are_made_exact():
    params = SamplingParams(temperature=2, top_p=1, repetition_penalty=2, top_k=3.0, max_tokens=1e3, seed=7.0)
    assert params == SamplingParams(temperature=2.0, top_p=1.0, repetition_penalty=2.0, top_k=3, max_tokens=1000, seed=7)
    assert type(params.temperature) is float and type(params.top_k) is int and type(params.seed) is int


@pytest.mark.parametrize(
    "value,alias_value,expected",
    [(512, None, 512), (100, None, 100), (512, 64, 64), (64, 64, 64), (64.0, 64, 64)],
)
def test_deprecated_alias_counts_when_the_new_name_is_left_at_its_default(value, alias_value, expected):
    assert with_alias("max_tokens", value, 512, "max_new_tokens", alias_value) == expected


def test_new_name_and_alias_that_disagree_fail_naming_both():
    with pytest.raises(ValueError, match=r"^max_tokens \(100\) and its deprecated alias max_new_tokens \(64\) disagree"):
        with_alias("max_tokens", 100, 512, "max_new_tokens", 64)


def reply_ids(engine, prompt="Tell me a story.", **params) -> list[int]:
    ids = engine.prompt.ids("", prompt)
    return asyncio.run(flattened(engine.generate_ids(ids, SamplingParams(**params), seed=params.get("seed", 0))))


@pytest.mark.parametrize("settings", [dict(temperature=1e-39), dict(top_p=0.0), dict(top_k=1)])
def test_settings_at_the_edge_of_greedy_give_the_greedy_reply(engine, settings):
    # temperature 1e-39 overflowed to inf and NaN before; top_p 0 was refused.
    greedy = reply_ids(engine, max_tokens=40, min_tokens=40, temperature=0)
    assert reply_ids(engine, max_tokens=40, min_tokens=40, seed=3, **{"temperature": 0.7, **settings}) == greedy


EXTREMES = [
    dict(temperature=1e-39), dict(temperature=5.0, top_k=0, top_p=1.0), dict(temperature=5.0, top_k=32000),
    dict(repetition_penalty=0.01), dict(repetition_penalty=5.0), dict(top_p=1e-9), dict(top_p=0.0),
]


@pytest.mark.parametrize("settings", EXTREMES)
def test_every_setting_in_range_generates(engine, settings):
    stats = GenerationStats()
    assert text(engine.stream("", "Hi", SamplingParams(max_tokens=30, min_tokens=30, seed=1, **settings), stats))
    assert stats.output_token_count == 30


LOGITS = {
    "ordinary": lambda: torch.randn(1, 1, VOCAB_SIZE) * 5,
    "huge": lambda: torch.randn(1, 1, VOCAB_SIZE).sign() * 3e38,
    "inf and nan": lambda: torch.randn(1, 1, VOCAB_SIZE).index_fill_(-1, torch.tensor([5, 9]), torch.inf)
    .index_fill_(-1, torch.tensor([7]), torch.nan),
    "all nan": lambda: torch.full((1, 1, VOCAB_SIZE), torch.nan),
}


@pytest.mark.parametrize("logits", LOGITS.values(), ids=LOGITS.keys())
@pytest.mark.parametrize("settings", EXTREMES + [dict(min_tokens=50), dict(temperature=0)])
def test_no_nan_or_inf_reaches_sampling(settings, logits):
    params = SamplingParams(**{"temperature": 0.7, **settings})
    sampler = Sampler(1, VOCAB_SIZE, eos_id=2, device=torch.device("cpu"))
    sampler.start(0, RowSettings(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                 repetition_penalty=params.repetition_penalty, min_tokens=params.min_tokens, seed=3),
                  torch.tensor([1, 400, 500, 400]))
    scores = logits()[:, -1]
    penalised = sampler._penalised(scores.clone(), torch.tensor([0]))
    assert not penalised.isnan().any() and not (penalised == torch.inf).any()
    for i in range(3):  # and the whole draw, a few times
        token = sampler.sample(scores.clone(), torch.tensor([0]), torch.tensor([3 + i])).item()
        assert 0 <= token < VOCAB_SIZE
        assert token != 2 or params.min_tokens == 0
