"""Requests in flight together, as concurrent predictions on one event loop (as in Cog's worker): the
driver the benchmark modes share (scripts/benchmark.py, burst_benchmark.py, versus_transformers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from notus.engine import Engine, GenerationStats
from notus.params import SamplingParams


def stream_all(engine: Engine, prompts: list[list[int]], params_of: Callable[[int], SamplingParams],
               limit: int | None = None) -> tuple[float, list[tuple[GenerationStats, float]]]:
    """Streams every prompt (prompt i with `params_of(i)`) to its end through `Engine.stream_ids`, at
    most `limit` at a time (each next one starts as one ends; None: all at once). Returns the start
    time and, per prompt, its stats and the time its last token came (time.perf_counter())."""
    in_flight = asyncio.Semaphore(limit) if limit is not None and limit < len(prompts) else contextlib.nullcontext()

    async def one(i: int) -> tuple[GenerationStats, float]:
        async with in_flight:
            stats = GenerationStats()
            async for _ in engine.stream_ids(prompts[i], params_of(i), stats):
                pass
            return stats, time.perf_counter()

    async def all_of_them() -> tuple[float, list[tuple[GenerationStats, float]]]:
        start = time.perf_counter()
        return start, await asyncio.gather(*(one(i) for i in range(len(prompts))))

    return asyncio.run(all_of_them())
