"""One generation as the consumer and the engine thread share it (notus/scheduler.py, notus/engine.py).

The consumer submits it and reads `tokens` as `wake()` cues it; the engine thread fills in its
bookkeeping, appends tokens and ends it. Every way a request ends goes through `end()`: nobody waits
on a request whose end was not written.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from notus.sampling import RowSettings


@dataclass(eq=False)  # each request is itself: `in` and remove() must not compare prompts
class Request:
    """One generation. Token ids arrive on `tokens`, then None; `error` is set if it failed.

    The engine thread calls `wake()` after it appends to `tokens` (once per step, not per token):
    the consumer's cue to read them, from any thread or event loop. It may only note the wake-up,
    to send it with the turn's others from the scheduler's `send_wakeups` (notus/wakeups.py).
    """

    input_ids: list[int]
    max_tokens: int
    wake: Callable[[], None]
    settings: RowSettings = field(default_factory=RowSettings)
    tokens: deque = field(default_factory=deque)
    stop: threading.Event = field(default_factory=threading.Event)  # set by the consumer: stop now
    done: threading.Event = field(default_factory=threading.Event)  # set by the engine thread
    error: BaseException | None = None
    # The engine thread's bookkeeping.
    queued_at: float | None = None  # perf_counter() when the engine thread took it in
    admitted_at: float | None = None  # perf_counter() when it got a slot
    slot: int | None = None
    cached: int = 0  # prompt tokens whose keys and values were already in the cache (notus/prefix_cache.py)
    prefilled: int = 0
    passed: int = 0  # turns in a row its prefill was left out (notus/prefill_plan.py)
    sampled: int = 0  # tokens sampled (some maybe not read yet)
    delivered: int = 0
    last_token: int | None = None  # the last one delivered
    # perf_counter() when the first and the latest tokens were handed out: the decode speed, as the
    # engine made the tokens (a consumer may read several at once, late).
    first_token_at: float | None = None
    last_token_at: float | None = None

    def end(self, wake: bool = True) -> None:
        """The end as the consumer reads it: no token after, done, woken."""
        self.tokens.append(None)
        self.done.set()
        if wake:
            self.wake()

    def end_unserved(self, reason: str, wake: bool = True) -> None:
        """Ends a request the engine thread will never serve: its consumer reads the reason as its error.
        `wake`: on the engine thread, sent with the others (a consumer that submits needs none)."""
        self.error = RuntimeError(reason)
        self.end(wake)


def own_copy(error: Exception) -> Exception:
    """A copy of `error` saying the same, else `error` itself (a class that cannot be rebuilt from its args):
    each request an error fails raises its own, as a consumer's raise adds its frames to the object's
    traceback, which the others would then carry (and keep alive)."""
    try:
        copied = copy.copy(error)
    except Exception:  # noqa: BLE001
        return error
    return copied if type(copied) is type(error) and str(copied) == str(error) else error
