"""Active rows first (Scheduler._compact): a request left in a high slot moves down into a slot freed
below it, so decode steps compute and read just the requests in flight; the move changes nothing
in its reply, and a conversation held in the freed slot stays reusable."""

from __future__ import annotations

import asyncio

import pytest
import torch

from notus.engine import Engine
from test_reuse import generate
from test_scheduler import GREEDY, engine_ids, long_prompt

SHORT = dict(max_tokens=3, min_tokens=3, **GREEDY)
# Sampled with every penalty: the sampler's per-slot state (counts, seen, settings) must move too.
LONG = dict(max_tokens=40, min_tokens=40, temperature=0.9, top_k=40, repetition_penalty=1.3,
            presence_penalty=0.5, frequency_penalty=0.5)


@pytest.fixture
def fresh(engine):
    """A new engine of 4 empty slots on the session's model: requests take slots 0, 1, 2 in order."""
    made = []

    def make(**kwargs) -> Engine:
        made.append(Engine(engine.model, engine.prompt, slots=4, **kwargs))
        return made[-1]

    yield make
    for e in made:
        e.scheduler.close()


def record_batches(e: Engine, monkeypatch) -> list[int]:
    batches = []
    step = e.scheduler._step

    def recorded(batch, *args, **kwargs):
        batches.append(batch)
        return step(batch, *args, **kwargs)

    monkeypatch.setattr(e.scheduler, "_step", recorded)
    return batches


async def three(e: Engine, prompts: list[list[int]]):
    """Two short requests (slots 0 and 1) and a long one (slot 2), submitted in that order."""
    return await asyncio.gather(generate(e, prompts[0], **SHORT), generate(e, prompts[1], **SHORT),
                                generate(e, prompts[2], seed=7, **LONG))


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no reuse"])
def test_a_request_left_in_a_high_slot_moves_down_and_its_reply_is_unchanged(fresh, monkeypatch, reuse):
    e = fresh(reuse=reuse)
    batches = record_batches(e, monkeypatch)
    prompts = [long_prompt(e, 50), long_prompt(e, 60), long_prompt(e, 70)]
    _, _, (tokens, _) = asyncio.run(three(e, prompts))
    alone = fresh(reuse=reuse)
    assert tokens == engine_ids(alone, prompts[2], seed=7, **LONG)
    # Once the short ones ended, the long one ran alone in slot 0: steps of one row, not three (bucket 4).
    assert 4 in batches and batches[-30:] == [1] * 30, batches
    # Its keys and values moved with it: slot 0 holds what the request alone wrote there.
    n = len(prompts[2]) + len(tokens) - 1
    moved, own = e.scheduler.cache.kv[:, :, 0, :n], alone.scheduler.cache.kv[:, :, 0, :n]
    torch.testing.assert_close(moved, own, rtol=1e-5, atol=1e-5)


def test_a_conversation_held_in_the_freed_slot_stays_reusable(fresh):
    e, plain = fresh(reuse=True), fresh(reuse=False)
    prompts = [long_prompt(e, 50), long_prompt(e, 60), long_prompt(e, 70)]
    (reply, _), _, _ = asyncio.run(three(e, prompts))
    # The first request's slot 0 went to the long one; its ring moved up, not overwritten.
    follow_up = prompts[0] + reply + long_prompt(e, 30)[1:]
    again, stats = asyncio.run(generate(e, follow_up, **SHORT))
    assert stats.cached_input_token_count == len(prompts[0]) + len(reply) - 1
    assert again == engine_ids(plain, follow_up, seed=5, **SHORT)


@pytest.mark.parametrize("graphs", [True, False], ids=["graph shapes", "eager"])
def test_the_kv_entries_counted_are_those_each_step_reads_and_those_live(fresh, monkeypatch, graphs):
    """scheduler.kv_entries, what the benchmark reports as K/V bytes read per step against those live:
    checked against the shapes attention actually ran (graph shapes: every row reads the bucket)."""
    e = fresh(cuda_graphs=graphs)
    forward, scheduler = e.scheduler.forward, e.scheduler
    steps = []
    decode = forward.decode

    def recorded(tokens, positions, write_slots, used, lengths, **kwargs):
        read = tokens.shape[0] * lengths if isinstance(lengths, int) else sum(lengths)
        decoding = (write_slots != scheduler.cache.scratch).tolist()
        live = sum(min(int(p) + 1, scheduler.window) for p, a in zip(positions.tolist(), decoding) if a)
        steps.append((read, live))
        return decode(tokens, positions, write_slots, used, lengths, **kwargs)

    monkeypatch.setattr(forward, "decode", recorded)
    prompts = [long_prompt(e, 50), long_prompt(e, 60), long_prompt(e, 300)]
    asyncio.run(three(e, prompts))
    counted = scheduler.kv_entries
    assert counted["steps"] == len(steps)
    assert counted["read"] == sum(read for read, _ in steps) and counted["live"] == sum(live for _, live in steps)
    if graphs:  # the long one alone in slot 0 at the end: one row reads its bucket, 512 entries for 300-340
        assert steps[-1] == (512, 300 + 40 - 1)
