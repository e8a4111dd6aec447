"""Which token ids each KV-cache slot still holds, so a new request can start where they diverge.

A finished request's keys and values stay in its slot until the slot is needed. A new request whose
ids begin with a held sequence's ids skips their prefill: in that very slot when it is free, or from
a copy of the ring's first entries into its own slot (many callers sharing one long system prompt).

The ring rule. A slot's ring holds position p at entry p % window. A held sequence is reusable only
while its ring has never wrapped: positions 0..n-1 written, n + 1 < window (one more step may still
be in flight for a request that just ended, writing position n or n + 1). Then entries 0..m-1 hold
exactly positions 0..m-1 for any prefix m <= n. Once a sequence passes the window, its first
positions are overwritten (and a new prefix would need all of them): it is not kept.

Slots to reuse are chosen least recently used; a free slot is free whatever it holds, so no request
ever waits because of a kept cache.
"""

from __future__ import annotations

import itertools


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
        ids need no prefill, and the slot to copy them from (None: they are in place)."""
        best_free = max(free, key=lambda s: (self.reusable(s, ids), self._used[s]))
        in_place = self.reusable(best_free, ids)
        source, copied = None, 0
        for s in busy:  # a free slot holding more would have been best_free
            n = self.reusable(s, ids)
            if n > max(in_place, copied):
                source, copied = s, n
        if source is None:
            slot = best_free if in_place else self._least_recently_used(free)
            return slot, in_place, None
        slot = self._least_recently_used([s for s in free if s != source] or free)
        if slot == source:  # the source is the only free slot: reuse it in place
            return slot, copied, None
        return slot, copied, source

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

    def _least_recently_used(self, slots: list[int]) -> int:
        return min(slots, key=lambda s: (self._used[s], s))
