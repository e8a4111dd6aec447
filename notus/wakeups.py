"""Waking an event loop's waiting requests from the engine thread: one callback per engine turn.

Each `loop.call_soon_threadsafe` writes a byte to the loop's self-pipe, a system call: once per
request per step, 32 streams cost the engine thread 32 of them between two steps (most of its
hand-out time on the CPU). The events one turn sets on a loop go to it in one callback instead.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

_LOCK = threading.Lock()
_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWakeups] = weakref.WeakKeyDictionary()


class LoopWakeups:
    """Events of one loop that the engine thread sets; `set_soon` from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[asyncio.Event] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWakeups:
        with _LOCK:
            wakeups = _BY_LOOP.get(loop)
            if wakeups is None:
                wakeups = _BY_LOOP[loop] = cls(loop)
            return wakeups

    def set_soon(self, event: asyncio.Event) -> None:
        """Sets `event` on its loop: with the other events of this turn, in one callback."""
        with self.lock:
            self.pending.append(event)
            if len(self.pending) > 1:
                return  # a callback is already on its way and will take this one too
        try:
            self.loop.call_soon_threadsafe(self._set_pending)
        except RuntimeError:  # the loop has closed: nobody is left to wake
            pass

    def _set_pending(self) -> None:  # on the loop
        with self.lock:
            events, self.pending = self.pending, []
        for event in events:
            event.set()
