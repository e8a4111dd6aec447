"""The engine's async API from plain (synchronous) tests: one event loop per call, as Cog's worker has one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing


async def joined(pieces: AsyncIterator[str]) -> str:
    async with aclosing(pieces):
        return "".join([piece async for piece in pieces])


async def flattened(batches: AsyncIterator[list[int]]) -> list[int]:
    async with aclosing(batches):
        return [token async for batch in batches for token in batch]


def text(pieces: AsyncIterator[str]) -> str:
    return asyncio.run(joined(pieces))


def concurrently(fn: Callable[..., Awaitable], items) -> list:
    """await fn(item) for every item, all at once on one event loop; their results in order."""

    async def all_of_them():
        return await asyncio.gather(*(fn(item) for item in items))

    return asyncio.run(all_of_them())
