"""Which token ids each KV-cache slot still holds, so a new request can start where they diverge.

A finished request's keys and values stay in its slot until the slot is needed. A new request whose
ids begin with a held sequence's ids skips their prefill: in that very slot when it is free, or from
a copy of the ring's first entries into its own slot (many callers sharing one long system prompt).

The ring rule. A slot's ring holds position p at entry p % window. A held sequence is reusable only
while its ring has never wrapped: positions 0..n-1 written, n + 1 < window (one more step may still
be in flight for a request that just ended, writing position n or n + 1). Then entries 0..m-1 hold
exactly positions 0..m-1 for any prefix m <= n. Once a sequence passes the window, its first
positions are overwritten (and a new prefix would need all of them): it is not kept.

A slot to overwrite is an empty one, else the least recently used; a free slot is free whatever it
holds, so no request ever waits because of a kept cache.
"""

from __future__ import annotations

import itertools

MIN_REUSE = 32  # tokens: less is not worth a slot's held sequence (every prompt's first 16 are the template's)


class PrefixCache:
    def __init__(self, slots: int, window: int):
        self.window = window
        # The ids at positions 0.. of each slot's ring; None once it has (nearly) wrapped.
        self.held: list[list[int] | None] = [[] for _ in range(slots)]
        self._used = [0] * slots  # when each slot was last given out (a counter)
        self._clock = itertools.count(1)

    def reusable(self, slot: int, ids: list[int]) -> int:
        """How many of `ids`' first tokens `slot`'s ring holds (at most len(ids) - 1: the last one's
        logits are needed)."""
        held = self.held[slot]
        if not held:
            return 0
        limit = min(len(held), len(ids) - 1)
        if held[:limit] == ids[:limit]:  # the usual case, a conversation going on: compared in C
            return limit
        m = 0
        while held[m] == ids[m]:
            m += 1
        return m

    def choose(self, free: list[int], busy: list[int], ids: list[int]) -> tuple[int, int, int | None]:
        """(slot, reused, source) for a new request: the free slot to take, how many of its first
        ids need no prefill, and the slot to copy them from (None: they are in place).

        A held prefix counts from MIN_REUSE tokens (every prompt begins with the chat template's few):
        in place when a free slot holds it, else copied from a busy slot that does. Otherwise, or as
        the copy's destination, the lowest empty slot, else the least recently used one, so that
        an unrelated request does not overwrite a conversation while an empty slot is left.
        """
        held = {s: self.reusable(s, ids) for s in (*free, *busy)}  # each prefix compared once
        in_place = max(free, key=lambda s: (held[s], -s))
        reused = held[in_place]
        source = max(busy, key=held.__getitem__, default=None)
        copied = held[source] if source is not None else 0
        if reused >= MIN_REUSE and reused >= copied:
            return in_place, reused, None
        empty = [s for s in free if not self.held[s]]
        slot = min(empty) if empty else min(free, key=lambda s: (self._used[s], s))
        if copied >= MIN_REUSE:
            return slot, copied, source
        return slot, 0, None

    def taken(self, slot: int, ids: list[int], reused: int) -> None:
        """`slot` now holds `ids[:reused]` and will hold the rest as its prefill goes."""
        self.held[slot] = list(ids[:reused])
        self._used[slot] = next(self._clock)

    def extend(self, slot: int, ids: list[int]) -> None:
        """Positions after the held ones are written with `ids`."""
        held = self.held[slot]
        if held is not None:
            held.extend(ids)
            if len(held) + 1 >= self.window:
                self.held[slot] = None  # the ring is about to wrap: nothing in it can be reused

    def forget(self, slot: int) -> None:
        """What `slot` holds is unknown (its request failed): nothing to reuse."""
        self.held[slot] = None

    def swap(self, a: int, b: int) -> None:
        """Slots `a` and `b` exchanged their rings (the engine moved a request down)."""
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self._used[a], self._used[b] = self._used[b], self._used[a]
