"""Reuse of what the engine already computed (notus/prefix_cache.py): a prompt that begins as a
sequence still in the KV cache skips that part of its prefill, and gives exactly the text it gets
without reuse (float32, the tiny model): in place, copied from another slot, across the window."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aio import concurrently
from notus.engine import Engine, GenerationStats
from notus.params import SamplingParams
from notus.prefix_cache import PrefixCache
from test_scheduler import long_prompt

REPO = Path(__file__).resolve().parent.parent
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95)


@pytest.fixture(scope="module")
def engines(engine):
    """(with reuse, without): the session's model in two engines of 4 slots."""
    reusing = Engine(engine.model, engine.prompt, slots=4, reuse=True)
    plain = Engine(engine.model, engine.prompt, slots=4, reuse=False)
    yield reusing, plain
    reusing.scheduler.close()
    plain.scheduler.close()


async def generate(engine: Engine, ids: list[int], seed: int = 5, **params) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    out = []
    async for batch in engine.generate_ids(ids, SamplingParams(**params), seed, stats):
        out += batch
    return out, stats


def run(engine: Engine, ids: list[int], **params) -> tuple[list[int], GenerationStats]:
    return asyncio.run(generate(engine, ids, **params))


@pytest.mark.parametrize("settings", [dict(temperature=0), SAMPLED], ids=["greedy", "seeded"])
def test_the_next_turn_of_a_conversation_reuses_the_last_and_gives_the_same_tokens(engines, settings):
    reusing, plain = engines
    first = long_prompt(reusing, 900 if settings["temperature"] else 901)
    reply, stats = run(reusing, first, max_tokens=20, min_tokens=20, **settings)
    assert stats.cached_input_token_count == 0  # nothing of it held yet
    # The next turn: the whole first exchange (the reply's last token was never fed) and a new question.
    follow_up = first + reply + long_prompt(reusing, 60)[1:]
    again, stats = run(reusing, follow_up, max_tokens=20, **settings)
    assert stats.cached_input_token_count == len(first) + len(reply) - 1
    assert again == run(plain, follow_up, max_tokens=20, **settings)[0]


def test_a_prefix_held_by_a_running_request_is_copied_into_another_slot(engines):
    """Many callers sharing one long system prompt: the second arrives while the first decodes."""
    reusing, plain = engines
    shared = long_prompt(reusing, 2000)
    a, b = shared + long_prompt(reusing, 50)[1:], shared + long_prompt(reusing, 40)[1:]

    async def both():
        first = asyncio.ensure_future(generate(reusing, a, max_tokens=60, min_tokens=60, **SAMPLED))
        while reusing.scheduler._decoding == []:  # a is past its prefill: its slot holds the prefix
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(generate(reusing, b, max_tokens=20, **SAMPLED))
        return await asyncio.gather(first, second)

    (tokens_a, _), (tokens_b, stats_b) = asyncio.run(both())
    assert stats_b.cached_input_token_count == len(shared)
    # Both slots hold the prefix's very keys and values (the tiny model's attention is nearly
    # uniform, so its tokens alone would hardly notice wrong keys).
    cache, held = reusing.scheduler.cache, reusing.scheduler.prefixes.held
    slot_a, slot_b = [slot for slot, ids in enumerate(held) if ids and ids[: len(shared)] == shared]
    n = len(shared)
    assert torch.equal(cache.k[:, slot_a, :n], cache.k[:, slot_b, :n])
    assert torch.equal(cache.v[:, slot_a, :n], cache.v[:, slot_b, :n])
    assert tokens_a == run(plain, a, max_tokens=60, min_tokens=60, **SAMPLED)[0]
    assert tokens_b == run(plain, b, max_tokens=20, **SAMPLED)[0]


def test_reuse_across_the_window_gives_the_same_tokens_and_a_wrapped_ring_is_not_reused(engines):
    reusing, plain = engines
    # 3,000 tokens held, then a prompt of 5,000 that begins with them: its prefill runs from 3,000
    # across the 4,096-token window.
    held = long_prompt(reusing, 3000)
    run(reusing, held, max_tokens=1)
    longer = held + long_prompt(reusing, 2001)[1:]
    tokens, stats = run(reusing, longer, max_tokens=30, min_tokens=30, **SAMPLED)
    assert stats.cached_input_token_count == len(held)  # every prompt token of it was written
    assert tokens == run(plain, longer, max_tokens=30, min_tokens=30, **SAMPLED)[0]
    # That sequence passed the window: its first positions are overwritten, nothing of it is reused.
    longest = longer + tokens + long_prompt(reusing, 100)[1:]
    tokens, stats = run(reusing, longest, max_tokens=20, **SAMPLED)
    assert stats.cached_input_token_count == 0
    assert tokens == run(plain, longest, max_tokens=20, **SAMPLED)[0]


def test_kept_caches_never_make_a_request_wait(engines):
    reusing, _ = engines
    for i in range(4):  # every slot holds a finished request's sequence
        run(reusing, long_prompt(reusing, 100 + i), max_tokens=2)
    assert len(reusing.scheduler._free) == 4
    results = concurrently(lambda ids: generate(reusing, ids, max_tokens=5), [long_prompt(reusing, 300 + i) for i in range(4)])
    assert all(len(tokens) == 5 and stats.time_in_queue < 0.5 for tokens, stats in results)


# The bookkeeping alone.

def test_the_ring_rule_a_sequence_is_reusable_until_it_nearly_wraps():
    cache = PrefixCache(slots=2, window=10)
    cache.taken(0, [1, 2, 3], reused=0)
    cache.extend(0, [1, 2, 3])
    assert cache.reusable(0, [1, 2, 3, 4]) == 3
    assert cache.reusable(0, [1, 2, 3]) == 2  # the last prompt token is always computed: its logits
    assert cache.reusable(0, [1, 9, 3, 4]) == 1
    cache.extend(0, [4, 5, 6, 7, 8])  # 8 held: one more step in flight could write position 8 or 9
    assert cache.reusable(0, list(range(1, 20))) == 8
    cache.extend(0, [9])  # 9 held in a ring of 10: the next write wraps onto position 0
    assert cache.reusable(0, list(range(1, 20))) == 0
    cache.taken(0, [7, 7], reused=0)  # a new request starts over: reusable again as it goes
    cache.extend(0, [7, 7])
    assert cache.reusable(0, [7, 7, 7]) == 2


def test_choose_in_place_else_a_copy_else_an_empty_slot_else_the_least_recently_used():
    cache = PrefixCache(slots=5, window=1000)
    a, b, c = list(range(100)), list(range(50)) + [-1] * 50, [7] * 100
    for slot, ids in enumerate([a, b, c]):
        cache.taken(slot, ids, 0)
        cache.extend(slot, ids)
    # In place: the free slot that holds the longest prefix.
    assert cache.choose(free=[0, 1, 2, 3, 4], busy=[], ids=a + [5]) == (0, 100, None)
    # A busy slot holds it: copied into the lowest empty free slot.
    assert cache.choose(free=[1, 2, 3, 4], busy=[0], ids=a + [5]) == (3, 100, 0)
    # Only the chat template's few tokens in common: not worth a held conversation, an empty slot.
    assert cache.choose(free=[0, 1, 2, 3, 4], busy=[], ids=a[:10] + [9] * 90) == (3, 0, None)
    # No empty slot left: the least recently used.
    for slot in (3, 4):
        cache.taken(slot, c, 0)
        cache.extend(slot, c)
    assert cache.choose(free=[0, 1, 2, 3, 4], busy=[], ids=[9] * 100) == (0, 0, None)


def test_an_unrelated_request_leaves_a_held_conversation_alone_while_a_slot_is_empty(engine):
    """Every prompt begins with the same template tokens; that must not cost a conversation its cache."""
    reusing = Engine(engine.model, engine.prompt, slots=4, reuse=True)
    try:
        first = engine.prompt.conversation_ids([("user", "word " * 400)])
        reply, _ = run(reusing, first, max_tokens=10, min_tokens=10)
        run(reusing, engine.prompt.conversation_ids([("user", "Something else entirely.")]), max_tokens=3)
        follow_up = first + reply + [engine.prompt.eos_id] + engine.prompt.tokenizer.encode("\n<|user|>\nMore.").ids
        _, stats = run(reusing, follow_up, max_tokens=3)
        assert stats.cached_input_token_count == len(first) + len(reply) - 1
    finally:
        reusing.scheduler.close()


@pytest.mark.cpu_script
def test_the_conversation_benchmark_runs_and_reports_both_engines(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--tiny", "--device", "cpu", "--conversation",
                    "--reps", "1", "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=300)
    (result_file,) = tmp_path.glob("conversation-cpu-*.json")
    report = json.loads(result_file.read_text())
    assert "--conversation" in report["command"] and report["torch"] == torch.__version__
    for key in ("fifth_turn_ttft", "shared_ttft_p50", "shared_ttft_p95"):
        times = report[f"{key}_s"]
        assert times["reuse"] > 0 and times["no_reuse"] > 0
        assert report[f"{key}_no_reuse_over_reuse"] == pytest.approx(times["no_reuse"] / times["reuse"])
