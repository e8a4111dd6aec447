"""A reply streamed through Cog's runtime (coglet) piece by piece, and stopped by a cancel.

coglet 0.23.1 collects everything an `async def predict` yields and sends it only when it ends, and
it runs a sync `def predict` one prediction at a time. What streams (SSE, output webhooks) and stays
concurrent is an `async def predict` that *returns* a plain generator: coglet iterates it on the
prediction's own thread and sends each item as it comes. `stream()` makes that generator from the
engine's async one: each next() pulls one piece on coglet's event loop, in the prediction's
context (so its logs land in that prediction), and nothing is generated before coglet asks for the
first piece or after it stops asking.

coglet cancels (API cancel, SSE client gone) by cancelling the future of the coroutine it
submitted, long finished by then. `install()` hooks that future so its cancel also reaches the
piece being pulled. This module is the only place that knows coglet's internals, checked against
coglet 0.23.1 (`crates/coglet-python/src/predictor.rs`, `worker_bridge.rs`): it submits predict as
`asyncio.run_coroutine_threadsafe(_ctx_wrapper(...), loop)`, looking the function up on the
asyncio module at each call, and cancels with that future's `cancel()`. Where that no longer holds,
replies still stream but a cancel waits for the reply's end: setup and the first prediction say so,
and tests/test_streaming.py fails.

A cancel that lands while coglet is still handing the prediction over arrives another way: as an
exception injected into the prediction's thread (`PyThreadState_SetAsyncExc`, worker_bridge.rs),
raised at whatever line that thread runs next, after which coglet reports `canceled` (where it lands
in coglet's wait for predict's result, because the exception says so: `_say_cancelled()`) and never
cancels the future. It may land in the generator before its `try` or inside its `finally`, before
the cancel there; so the `try` opens before the pump is submitted, and the pump (on the event loop,
where no injected exception lands) stops at the next piece once the generator has ended or gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import importlib.metadata
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from queue import SimpleQueue

log = logging.getLogger("notus")

CHECKED_COGLET = "0.23.1"
_SUBMITTED_AS = "_ctx_wrapper"  # the coroutine coglet wraps each async prediction in

_submit = asyncio.run_coroutine_threadsafe  # the original: our own pumps never go through the hook
_END = object()  # the reply has ended


class _Raised:
    """What the engine's stream raised, for the reader to raise (asyncio.CancelledError: `canceled`)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Cancel:
    """One prediction's cancel: it cancels the task pumping its pieces, or stops it from starting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cancelled = False
        self._pumping: asyncio.Task | None = None
        self.reader: weakref.ref | None = None  # the generator coglet iterates

    def reader_gone(self) -> bool:
        """The generator coglet iterates has ended or been dropped: nobody reads another piece. Checked
        on the event loop, where the exception coglet injects into its prediction's thread cannot land."""
        if self.reader is None:
            return False
        reader = self.reader()
        return reader is None or reader.gi_frame is None

    def cancel(self) -> None:  # on any thread
        with self._lock:
            if self.cancelled:  # once: a second cancel would cut short the pump's wait for the engine
                return
            self.cancelled = True
            pumping = self._pumping
        if pumping is not None:
            pumping.get_loop().call_soon_threadsafe(pumping.cancel)

    def start_pumping(self) -> bool:  # on the event loop, in the pumping task
        with self._lock:
            if not self.cancelled:
                self._pumping = asyncio.current_task()
            return not self.cancelled

    def stop_pumping(self) -> None:
        with self._lock:
            self._pumping = None


# Set around coglet's submission of a prediction, so the prediction's coroutine (whose context is
# copied from the submitting thread) finds the cancel that coglet's future now carries.
_current_cancel: contextvars.ContextVar[_Cancel | None] = contextvars.ContextVar("notus_cancel", default=None)


def _hooked_submit(coro, loop):
    """asyncio.run_coroutine_threadsafe, which also gives a coglet prediction's future a cancel that
    reaches its stream (the future itself is done once predict has returned the generator)."""
    if getattr(coro, "__name__", None) != _SUBMITTED_AS:
        return _submit(coro, loop)
    cancel = _Cancel()
    token = _current_cancel.set(cancel)
    try:
        future = _submit(coro, loop)
    finally:
        _current_cancel.reset(token)
    cancel_future = weakref.WeakMethod(future.cancel)  # not a cycle: the future holds our generator

    def cancel_both() -> bool:
        cancel.cancel()
        cancel_future_now = cancel_future()
        return cancel_future_now is not None and cancel_future_now()

    future.cancel = cancel_both
    return future


def install() -> str:
    """Hooks coglet's submission of predictions (idempotent); returns a line for setup's log."""
    asyncio.run_coroutine_threadsafe = _hooked_submit
    _say_cancelled()
    try:
        version = importlib.metadata.version("coglet")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version == CHECKED_COGLET:
        return (f"coglet {version}: replies stream piece by piece; a cancel or a client gone stops "
                "generation within a step")
    return (f"coglet {version or 'not installed'}, not the {CHECKED_COGLET} that notus/coglet_stream.py was "
            "checked against: replies stream, but a cancel may not stop generation before the reply ends "
            "(the first prediction will say)")


def _say_cancelled() -> None:
    """A cancel that lands after coglet submitted predict but before its slot holds the future is
    injected into the prediction's thread, there waiting for predict's result(): coglet reports
    `canceled` only when that error's text holds "cancelled" (worker_bridge.rs), and the exception
    has no text, so the prediction came back `failed` ("Async prediction failed:
    CancelationException: ", 1 of 150 cancels in tests/test_concurrency.py's soak). Now it says so.
    Landing earlier, in the submission itself, coglet reports `failed` whatever the text ("Failed to
    submit coroutine: CancelationException: the prediction was cancelled": docs/coglet.md)."""
    try:
        from coglet import CancelationException
    except ImportError:  # another runtime: nothing to say
        return
    CancelationException.__str__ = lambda self: "the prediction was cancelled"


_warned = False


def stream(pieces: AsyncIterator[str], then: Callable[[], None] | None = None) -> Iterator[str]:
    """A generator of `pieces`, for coglet to iterate on the prediction's thread. Call it inside
    `async def predict` (it takes that coroutine's loop and context) and return what it gives.
    `then()` runs on that thread once a reply that began has ended (or stopped), after coglet has
    taken every piece: what the prediction records there (its metrics) comes after its output, as
    callers read it. It does not run for a reply cancelled before it began (nothing to record)."""
    global _warned
    cancel = _current_cancel.get()
    if cancel is None and not _warned:
        _warned = True
        log.warning("this prediction was not submitted the way coglet %s does it: a cancel or a client gone "
                    "will not stop generation before the reply ends (notus/coglet_stream.py)", CHECKED_COGLET)
    cancel = cancel or _Cancel()
    reader = _pull(pieces, asyncio.get_running_loop(), contextvars.copy_context(), cancel, then)
    cancel.reader = weakref.ref(reader)
    return reader


def _pull(pieces: AsyncIterator[str], loop: asyncio.AbstractEventLoop, context: contextvars.Context,
          cancel: _Cancel, then: Callable[[], None] | None) -> Iterator[str]:
    if asyncio._get_running_loop() is loop:  # we wait for the loop: on its own thread, that is forever
        raise RuntimeError("iterate this generator on another thread than its event loop's, as coglet does")
    reader = threading.get_ident()  # coglet's thread for this prediction
    queue: SimpleQueue = SimpleQueue()
    # Started by the first next(): nothing is generated for a prediction coglet never iterates. It runs
    # in a copy of the prediction's context (coglet routes logs and metrics by it) and never waits for
    # this thread, so a slow reader costs no engine time; one wake-up here hands over what is ready.
    pumping = None
    try:  # before the pump is submitted: an exception coglet injects from here on still stops it
        pumping = context.run(_submit, _pump(pieces, queue, cancel), loop)
        while True:
            item = queue.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            if cancel.cancelled:
                raise asyncio.CancelledError()  # what coglet reports as `canceled`
            yield item
    finally:
        # Left early (a cancel, an error, coglet stopped iterating): the engine's request ends, and its
        # metrics are recorded, before coglet ends the prediction. A no-op once the pump has ended.
        cancel.cancel()
        if pumping is not None and threading.get_ident() == reader:  # not when the GC closes it on another thread:
            concurrent.futures.wait([pumping])  # the loop's or the engine's, which the pump waits for
            if then is not None and not pumping.cancelled() and pumping.result():  # the pump began the reply
                try:
                    then()
                except Exception:  # logged: an error in what is recorded does not fail the reply
                    log.exception("what the prediction records after its reply failed")


async def _pump(pieces: AsyncIterator[str], queue: SimpleQueue, cancel: _Cancel) -> bool:
    """Hands `pieces` to the reader's queue; True once it began them (the engine's request started)."""
    began = False
    try:
        if not cancel.start_pumping() or cancel.reader_gone():  # gone already: never start the engine's request
            raise asyncio.CancelledError()
        began = True
        async with aclosing(pieces):
            async for piece in pieces:
                if cancel.reader_gone():  # coglet ended the prediction and our finally did not run (below)
                    raise asyncio.CancelledError()
                queue.put(piece)
        queue.put(_END)
    except BaseException as error:
        queue.put(_Raised(error))
    finally:
        cancel.stop_pumping()
    return began
