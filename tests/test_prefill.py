"""Packed prefill (notus/forward.py, notus/prefill_plan.py, notus/scheduler.py): waiting prompts'
chunks run in one forward, each attending only to itself, so a burst of arrivals costs a few
forwards, not one each; each request's tokens are the ones it gets alone, and one that fails fails
alone (float32, tiny model)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import torch

from burst_benchmark import NEW_TOKENS, burst_row, burst_table
from notus.engine import Engine
from notus.forward import Forward, KVCache, Segment
from notus.prefill_plan import CHUNK, plan_chunks
from notus.request import Request
from test_scheduler import GREEDY, ids_of, long_prompt

PARAMS = dict(max_tokens=12, min_tokens=12, **GREEDY)


@pytest.fixture(scope="module")
def engines(engine):
    """{name: engine} on the session's model, 8 slots each: packing on and off (no reuse, so each
    prompt is prefilled whole), and packing with reuse."""
    built = {"packed": Engine(engine.model, engine.prompt, reuse=False),
             "one at a time": Engine(engine.model, engine.prompt, reuse=False, pack=False),
             "packed, reusing": Engine(engine.model, engine.prompt, reuse=True)}
    yield built
    for e in built.values():
        e.scheduler.close()


class Prefills:
    """Records each prefill forward's segments (slot, start, length) on `engine`'s engine thread."""

    def __init__(self, engine: Engine, monkeypatch, fail_when=None):
        self.calls: list[list[tuple[int, int, int]]] = []
        prefill = engine.scheduler.forward.prefill

        def recorded(segments):
            self.calls.append([(s.slot, s.start, s.ids.shape[0]) for s in segments])
            logits = prefill(segments)  # every segment's keys and values written, then (maybe) the failure
            if fail_when is not None and fail_when(segments):
                raise torch.OutOfMemoryError("injected: out of memory in this prefill")
            return logits

        monkeypatch.setattr(engine.scheduler.forward, "prefill", recorded)


@contextlib.asynccontextmanager
async def arriving_together(engine: Engine, count: int):
    """Requests submitted inside the block reach the engine thread together: it waits (in a call())
    until `count` of them are in its inbox."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        entered.set()
        release.wait()

    holder = threading.Thread(target=engine.scheduler.call, args=(hold,))
    holder.start()
    entered.wait()
    try:
        yield
        while engine.scheduler._inbox.qsize() < count:
            await asyncio.sleep(0.001)
    finally:
        release.set()
        holder.join()


def burst(engine: Engine, prompts: list[list[int]]) -> list:
    """Each prompt's greedy tokens (or its error), all submitted at once."""
    async def one(ids):
        try:
            return await ids_of(engine, ids, **PARAMS)
        except torch.OutOfMemoryError as e:
            return e

    async def all_of_them():
        async with arriving_together(engine, len(prompts)):
            tasks = [asyncio.ensure_future(one(ids)) for ids in prompts]
        return await asyncio.gather(*tasks)

    return asyncio.run(all_of_them())


def alone(engine: Engine, ids: list[int]) -> list[int]:
    return asyncio.run(ids_of(engine, ids, **PARAMS))


@pytest.mark.parametrize("name, forwards", [("packed", 1), ("one at a time", 8)])
def test_a_burst_of_8_prompts_is_prefilled_in_one_forward_and_each_gets_its_tokens_alone(engines, monkeypatch,
                                                                                         name, forwards):
    engine = engines[name]
    prompts = [long_prompt(engine, 30 + 41 * i) for i in range(8)]  # 1,388 tokens: one chunk's budget
    expected = [alone(engines["one at a time"], ids) for ids in prompts]
    prefills = Prefills(engine, monkeypatch)
    assert burst(engine, prompts) == expected
    assert len(prefills.calls) == forwards, prefills.calls
    assert sorted(n for call in prefills.calls for _, _, n in call) == sorted(map(len, prompts))


def test_a_long_prompt_gets_what_the_short_ones_leave_of_the_chunk(engines, monkeypatch):
    engine = engines["packed"]
    prompts = [long_prompt(engine, 3000), long_prompt(engine, 300), long_prompt(engine, 200)]
    expected = [alone(engines["one at a time"], ids) for ids in prompts]
    prefills = Prefills(engine, monkeypatch)
    assert burst(engine, prompts) == expected
    # The shortest first, the long one the rest of the 2,048 tokens, then the rest of it.
    lengths = [[n for _, _, n in call] for call in prefills.calls]
    assert lengths == [[200, 300, CHUNK - 500], [3000 - (CHUNK - 500)]]


def test_packed_logits_equal_each_segments_logits_alone(engine):
    """Teacher-forced, in float32: first chunks (the causal kernel), a chunk after held ring entries
    (masked), and one after a ring that has wrapped, together in one forward and each alone; their
    logits and the keys and values they leave in the cache."""
    model, device = engine.model, engine.device
    ids = torch.tensor(long_prompt(engine, 6000), device=device)
    caches = [KVCache(model.config, slots=4, device=device, dtype=model.dtype) for _ in range(2)]
    forwards = [Forward(model, cache) for cache in caches]
    earlier = [Segment(1, ids[:700], 0), Segment(2, ids[:2048], 0), Segment(2, ids[2048:4096], 2048),
               Segment(2, ids[4096:4500], 4096)]
    for forward in forwards:  # slot 1 holds 700 positions; slot 2 4,500, past the 4,096-token window
        for segment in earlier:
            forward.prefill([segment])
    segments = [Segment(0, ids[1000:1300], 0), Segment(1, ids[700:900], 700), Segment(2, ids[4500:4800], 4500),
                Segment(3, ids[5000:5001], 0)]
    packed = forwards[0].prefill(segments)
    each = torch.cat([forwards[1].prefill([segment]) for segment in segments])
    assert packed.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(packed, each, rtol=1e-5, atol=1e-5 * each.std().item())
    torch.testing.assert_close(caches[0].kv, caches[1].kv, rtol=1e-5, atol=1e-6)


def test_a_failing_segment_of_a_packed_forward_fails_alone(engines, monkeypatch):
    """The packed forward writes every segment's keys and values, then fails: each segment runs
    again alone (one of them after a reused prefix, so it also reads held ring entries), the one
    that fails alone fails, the others give their tokens alone."""
    engine = engines["packed, reusing"]
    first = long_prompt(engine, 200)
    follow_up = first + alone(engine, first) + long_prompt(engine, 40)[1:]
    poisoned = long_prompt(engine, 77)
    prompts = [follow_up, long_prompt(engine, 20), poisoned, long_prompt(engine, 130), long_prompt(engine, 90)]
    expected = [alone(engines["one at a time"], ids) for ids in prompts]
    prefills = Prefills(engine, monkeypatch, fail_when=lambda segments: any(
        s.ids.shape[0] == len(poisoned) and s.ids.tolist() == poisoned for s in segments))
    results = burst(engine, prompts)
    assert isinstance(results[2], torch.OutOfMemoryError) and "injected" in str(results[2])
    assert results[:2] + results[3:] == expected[:2] + expected[3:]
    packed, *each = prefills.calls
    assert len(packed) == 5 and any(start > 0 for _, start, _ in packed)  # the follow-up's: after its prefix
    assert sorted(each) == sorted([segment] for segment in packed)  # then each alone, the same chunks


def test_the_burst_benchmark_reports_both_paths_and_their_ratios(engine):
    """scripts/benchmark.py --burst's measure (scripts/burst_benchmark.py), in-process and small."""
    generator = torch.Generator().manual_seed(0)

    def new_prompt(n: int) -> list[int]:  # a new one each time: nothing reused from the KV cache
        return [engine.prompt.bos_id] + torch.randint(1000, 31000, (n - 1,), generator=generator).tolist()

    row = burst_row(engine, 4, 16, 1, new_prompt)
    assert (row["prompts"], row["new_tokens_each"]) == (4, NEW_TOKENS)
    assert row["one_at_a_time"]["prefill_forwards"] == 4 and row["packed"]["prefill_forwards"] < 4
    for path in ("packed", "one_at_a_time"):
        assert 0 < row[path]["ttft_p50_s"] <= row[path]["ttft_p95_s"] and len(row[path]["runs"][0]["ttfts"]) == 4
    for q in ("p50", "p95"):
        assert row[f"ttft_{q}_one_at_a_time_over_packed"] == pytest.approx(
            row["one_at_a_time"][f"ttft_{q}_s"] / row["packed"][f"ttft_{q}_s"])
    assert engine.scheduler.pack  # packing back on
    table = burst_table({"model": "tiny", "device": "cpu", "torch": torch.__version__, "reps": 1, "burst": [row]})
    assert "| 4 | packed |" in table and "| 4 | one at a time | 4 |" in table


def test_a_long_prompt_whose_chunks_run_alone_is_not_held_back_by_a_stream_of_short_ones():
    """Past the window a prompt's chunk wraps its ring and runs alone, so it could only run when no
    shorter prompt waits; with a new short prompt every turn it would wait for ever. Left out two
    turns in a row, it goes first."""
    window = 4096
    long = Request(input_ids=[1] * (3 * window), max_tokens=1, wake=lambda: None, prefilled=window)
    ran = []
    for turn in range(6):
        short = Request(input_ids=[1] * 10, max_tokens=1, wake=lambda: None)  # a new short prompt every turn
        ran.append(long in [r for r, _ in plan_chunks([long, short], window)])
    assert all(any(ran[i : i + 3]) for i in range(4)), ran  # it runs at least once in any 3 turns in a row
