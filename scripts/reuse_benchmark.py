"""The conversation mode of scripts/benchmark.py (`--conversation`): what reusing the KV cache saves.

Two workloads, each timed on an engine with reuse and one without (the same model), in one run:
  fifth turn   a conversation of 4 turns (questions of random tokens, greedy replies of 64 tokens)
               to about 3,000 tokens, then the time to first token of its fifth turn (a 50-token
               question). Each turn's prompt is the last one, its reply, `</s>` and the next
               question: the conversation as a chat client sends it, at the token level.
  shared       8 callers at once, one 2,000-token system prompt seen before and a 50-token
               question each: the median and p95 time to first token.
Reported: each time with reuse and without, and without / with (higher is better).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

from notus.engine import Engine
from notus.params import SamplingParams

GREEDY = dict(temperature=0.0)


async def _first_token(engine: Engine, ids: list[int], max_tokens: int, out: list[int] | None = None) -> float:
    """Seconds from the request to its first token (greedy, exactly `max_tokens`; they go to `out`)."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, **GREEDY)
    t0, first = time.perf_counter(), None
    async for batch in engine.generate_ids(ids, params, 0):
        first = first or time.perf_counter()
        if out is not None:
            out += batch
    return first - t0


def fifth_turn(engine: Engine, random_ids: Callable[[int], list[int]], history: int = 3000) -> float:
    """Time to first token of the fifth turn, the first four run through `engine` first."""
    question = (history - 4 * 65) // 4  # four questions and four replies of 64 tokens and </s>
    ids = [engine.prompt.bos_id] + random_ids(question - 1)
    for turn in range(4):
        reply: list[int] = []
        asyncio.run(_first_token(engine, ids, 64, reply))
        ids = ids + reply + [engine.prompt.eos_id] + random_ids(question if turn < 3 else 50)
    return asyncio.run(_first_token(engine, ids, 1))


def shared_system_prompt(engine: Engine, random_ids: Callable[[int], list[int]], callers: int = 8) -> list[float]:
    """Each caller's time to first token: `callers` at once, after one earlier request with the prompt."""
    system = [engine.prompt.bos_id] + random_ids(1999)
    asyncio.run(_first_token(engine, system + random_ids(50), 1))  # the prompt seen before

    async def together():
        return await asyncio.gather(*(_first_token(engine, system + random_ids(50), 1) for _ in range(callers)))

    return list(asyncio.run(together()))


def conversation_report(model, prompt, slots: int, reps: int, random_ids_for: Callable[[int], Callable]) -> dict:
    """Both workloads, `reps` times each, on engines with and without reuse. `random_ids_for(seed)`
    gives a function of a length that returns random token ids: the same ids for both engines."""
    engines = {"reuse": Engine(model, prompt, slots=slots, reuse=True),
               "no_reuse": Engine(model, prompt, slots=slots, reuse=False)}
    try:
        for engine in engines.values():
            engine.warm_up()
        turn = {name: [fifth_turn(engine, random_ids_for(rep)) for rep in range(reps)] for name, engine in engines.items()}
        shared = {name: [t for rep in range(reps) for t in shared_system_prompt(engine, random_ids_for(100 + rep))]
                  for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.scheduler.close()

    def p95(values):
        return sorted(values)[max(0, round(0.95 * len(values)) - 1)]

    report = {"fifth_turn_ttft_s": {name: statistics.median(t) for name, t in turn.items()},
              "shared_ttft_p50_s": {name: statistics.median(t) for name, t in shared.items()},
              "shared_ttft_p95_s": {name: p95(t) for name, t in shared.items()}}
    for key in list(report):
        report[key.removesuffix("_s") + "_no_reuse_over_reuse"] = report[key]["no_reuse"] / report[key]["reuse"]
    return report


def conversation_table(report: dict) -> str:
    rows = [("fifth turn of 3,000 tokens of history: time to first token", "fifth_turn_ttft"),
            ("8 callers, a shared 2,000-token system prompt: p50 time to first token", "shared_ttft_p50"),
            ("the same: p95", "shared_ttft_p95")]
    lines = ["| workload | with reuse | without | without / with |", "| --- | --- | --- | --- |"]
    for label, key in rows:
        times = report[f"{key}_s"]
        lines.append(f"| {label} | {times['reuse'] * 1000:.1f} ms | {times['no_reuse'] * 1000:.1f} ms | "
                     f"{report[f'{key}_no_reuse_over_reuse']:.1f} |")
    return "\n".join(lines)
