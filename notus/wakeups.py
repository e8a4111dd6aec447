"""Waking the consumers of an engine turn's tokens: one cross-thread call per event loop per turn.

Each `loop.call_soon_threadsafe` writes a byte to the loop's self-pipe, a system call, and lets the
loop's thread take the GIL there and then: called once per request, 32 streams cost the engine
thread 32 of them between two steps (most of its hand-out time on the CPU). The engine thread
gathers a turn's events instead and sends each loop its own in one callback when the turn ends
(and once before its work, for the requests it dropped on a stop: Scheduler.send_wakeups).
"""

from __future__ import annotations

import asyncio


class Wakeups:
    """Events to set on their loops, gathered on the engine thread during a turn (`add`), sent
    together (`send`). Only the engine thread calls either: no lock."""

    def __init__(self):
        self._pending: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._pending.setdefault(loop, []).append(event)

    def send(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, events in pending.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the loop has closed: nobody is left to wake
                pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()
