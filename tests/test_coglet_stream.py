"""notus/coglet_stream.py against what coglet 0.23.1 does with an async predict, in-process.

`Coglet` below is that protocol in a few lines of Python, as coglet's source does it
(crates/coglet-python/src/predictor.rs, worker_bridge.rs): its event loop on a thread of its own,
predict's coroutine wrapped in `_ctx_wrapper` (which sets the prediction's log route) and submitted
with `asyncio.run_coroutine_threadsafe`, the returned generator iterated on the prediction's own
thread, a cancel as `cancel()` on the submitted future. tests/test_streaming.py checks the same
through the real server.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import gc
import threading
import time

import pytest

from notus import coglet_stream

LOG_ROUTE: contextvars.ContextVar[str | None] = contextvars.ContextVar("prediction_id", default=None)


async def _ctx_wrapper(coro, prediction_id):  # noqa: PT019 (coglet's name: the hook looks for it)
    token = LOG_ROUTE.set(prediction_id)
    try:
        return await coro
    finally:
        LOG_ROUTE.reset(token)


class Coglet:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, predict, prediction_id="p1"):
        """The future coglet keeps for the prediction (looked up on the asyncio module, as coglet does)."""
        return asyncio.run_coroutine_threadsafe(_ctx_wrapper(predict, prediction_id), self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Source:
    """The engine's side: an async stream of pieces that records what happened to it."""

    def __init__(self, pieces=10, every=0.02, fail_at=None, cleanup=0.0):
        self.n, self.every, self.fail_at, self.cleanup = pieces, every, fail_at, cleanup
        self.started, self.closed = threading.Event(), threading.Event()
        self.made: list[float] = []
        self.routes: list[str | None] = []

    async def pieces(self):
        self.started.set()
        try:
            for i in range(self.n):
                await asyncio.sleep(self.every)
                if i == self.fail_at:
                    raise ValueError("the engine failed")
                self.made.append(time.monotonic())
                self.routes.append(LOG_ROUTE.get())
                yield f"{i} "
        finally:
            await asyncio.sleep(self.cleanup)  # as the engine waits a step for its request to leave
            self.closed.set()


async def predict(source: Source):
    """As predict.py does it: a coroutine that returns the generator."""
    return coglet_stream.stream(source.pieces())


@pytest.fixture
def coglet(monkeypatch):
    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", asyncio.run_coroutine_threadsafe)  # restored after
    coglet_stream.install()
    coglet = Coglet()
    yield coglet
    coglet.close()


@pytest.fixture
def no_gc():
    """No garbage collection in the test: a generator is freed when its last reference goes, or not
    at all while the test holds one."""
    gc.disable()
    yield
    gc.enable()


def test_each_piece_arrives_as_it_is_made_in_the_predictions_context(coglet):
    source = Source(pieces=10, every=0.03)
    pieces, arrived = [], []
    for piece in coglet.submit(predict(source), "pred-7").result(5):
        pieces.append(piece)
        arrived.append(time.monotonic())
    assert pieces == [f"{i} " for i in range(10)]
    assert max(a - m for a, m in zip(arrived, source.made)) < 0.1  # each as made, not all at the end
    assert arrived[-1] - arrived[0] > 0.2
    assert source.routes == ["pred-7"] * 10  # coglet routes the logs of every piece's work to its prediction


def test_nothing_is_generated_before_coglet_iterates(coglet):
    source = Source()
    generator = coglet.submit(predict(source)).result(5)
    time.sleep(0.2)
    assert not source.started.is_set()
    del generator  # coglet never iterated it (its cancel landed in between): still nothing
    time.sleep(0.1)
    assert not source.started.is_set()


def test_coglets_cancel_mid_stream_stops_the_source_before_the_prediction_ends(coglet):
    source = Source(pieces=1000, every=0.01)
    future = coglet.submit(predict(source))
    generator = future.result(5)
    got = [next(generator) for _ in range(3)]
    t0 = time.monotonic()
    future.cancel()  # done since predict returned: only the hook reaches the stream
    with pytest.raises(asyncio.CancelledError):  # what coglet reports as `canceled`
        list(generator)
    assert source.closed.is_set()  # stopped (and its metrics recorded) before coglet ends the prediction
    assert time.monotonic() - t0 < 0.5
    assert got == ["0 ", "1 ", "2 "] and len(source.made) < 100


def test_a_cancel_lets_the_engine_finish_stopping_before_the_prediction_ends(coglet):
    source = Source(pieces=1000, every=0.005, cleanup=0.1)
    future = coglet.submit(predict(source))
    generator = future.result(5)
    threading.Timer(0.05, future.cancel).start()  # while coglet sends a piece (slowly: pieces queue up)
    with pytest.raises(asyncio.CancelledError):
        for _ in generator:
            time.sleep(0.02)
    # Not cut short by the reader's own stop after the cancel: the slot is free when coglet says canceled.
    assert source.closed.is_set()


def test_a_generator_coglet_drops_without_closing_stops_the_source(coglet, no_gc):
    source = Source(pieces=1000, every=0.005)
    future = coglet.submit(predict(source))
    generator = future.result(5)
    next(generator)
    del future, generator  # coglet returned early (an error sending output) without closing it
    assert source.closed.wait(1) and len(source.made) < 50


def test_a_cancel_before_the_first_piece_generates_nothing(coglet):
    source = Source()
    future = coglet.submit(predict(source))
    generator = future.result(5)
    future.cancel()
    with pytest.raises(asyncio.CancelledError):
        next(generator)
    assert not source.made


def test_a_cancel_while_predict_runs_still_works(coglet):
    started, cancelled = threading.Event(), threading.Event()

    async def slow_predict():
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = coglet.submit(slow_predict())
    started.wait(5)
    assert future.cancel()  # coglet's own cancel of the coroutine, unchanged by the hook
    assert future.cancelled() and cancelled.wait(1)


def test_closing_the_generator_stops_the_source(coglet):
    source = Source(pieces=1000, every=0.01)
    generator = coglet.submit(predict(source)).result(5)
    assert [next(generator) for _ in range(2)] == ["0 ", "1 "]
    generator.close()  # coglet stopped iterating (an error sending output, the worker shutting down)
    assert source.closed.is_set() and len(source.made) < 100


def test_an_error_of_the_source_fails_the_prediction_with_its_message(coglet):
    source = Source(pieces=10, fail_at=3)
    generator = coglet.submit(predict(source)).result(5)
    with pytest.raises(ValueError, match="the engine failed"):
        list(generator)
    assert source.closed.is_set()


def test_other_coroutines_are_submitted_untouched(coglet):
    async def other():
        return 1

    future = asyncio.run_coroutine_threadsafe(other(), coglet.loop)
    assert future.result(5) == 1 and "cancel" not in vars(future)


def test_iterating_on_the_event_loops_own_thread_is_refused_not_a_deadlock(coglet):
    source = Source()

    async def on_the_loop():
        generator = await predict(source)
        with pytest.raises(RuntimeError, match="another thread"):
            next(generator)
        return True

    assert coglet.submit(on_the_loop()).result(5)


def test_without_the_hook_replies_still_stream_and_it_says_a_cancel_cannot_reach_them(monkeypatch, caplog):
    monkeypatch.setattr(coglet_stream, "_warned", False)
    coglet = Coglet()
    try:
        source = Source(pieces=3)
        # Not submitted the way coglet 0.23.1 does it (another runtime, or a coglet that changed).
        generator = asyncio.run_coroutine_threadsafe(predict(source), coglet.loop).result(5)
        assert list(generator) == ["0 ", "1 ", "2 "]
    finally:
        coglet.close()
    assert "a cancel or a client gone will not stop generation" in caplog.text


class CancelationException(BaseException):
    """What coglet injects into a prediction's thread when a cancel lands as it hands the prediction over."""


def _inject_cancel(thread_id: int) -> None:
    """As coglet's worker_bridge.rs does: PyThreadState_SetAsyncExc, raised at the thread's next line."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(CancelationException))


def _cancel_interrupted(self) -> None:
    """_Cancel.cancel as a second injected exception leaves it: raised before it cancels anything."""
    raise CancelationException()


@pytest.mark.parametrize("where", ["as the pump is submitted", "in the generator's finally, before its cancel"])
def test_a_cancel_coglet_injects_into_the_predictions_thread_stops_the_source(coglet, monkeypatch, no_gc, where):
    """coglet 0.23.1 reports `canceled` once the injected exception leaves the generator and never
    cancels the future: the source must stop anyway (before the fix it made every piece of the reply,
    for nobody, seen once in tests/test_streaming.py's 40 early cancels)."""
    source = Source(pieces=1000, every=0.005)
    submit = coglet_stream._submit

    def submit_then_inject(coro, loop):
        future = submit(coro, loop)
        if where == "as the pump is submitted" and coro.__name__ == "_pump":
            _inject_cancel(threading.get_ident())
        return future

    monkeypatch.setattr(coglet_stream, "_submit", submit_then_inject)
    if where != "as the pump is submitted":  # one lands mid-stream, a second one (coglet sends two) in the finally
        monkeypatch.setattr(coglet_stream._Cancel, "cancel", _cancel_interrupted)
        threading.Timer(0.1, _inject_cancel, (threading.get_ident(),)).start()
    generator = coglet.submit(predict(source)).result(5)
    with pytest.raises(CancelationException):
        for _ in generator:
            pass
    # Stopped, or never started (the cancel came before the pump began: nothing to close).
    source.closed.wait(1)
    assert source.closed.is_set() or not source.started.is_set(), "the source generates for nobody"
    made = len(source.made)
    time.sleep(0.1)
    assert len(source.made) == made


def test_a_pump_whose_reader_has_already_gone_does_not_start_the_source(coglet, monkeypatch, no_gc):
    """The injected exception lands right after the pump is submitted and a second one in the finally
    before its cancel (coglet sends two): the generator has ended before the pump starts. Noticed
    only at the first piece, the engine's request would have been admitted and prefilled for nobody."""
    source = Source(pieces=1000, every=0.5)  # the first piece comes late (a long prompt's prefill)
    submit = coglet_stream._submit
    gate = threading.Event()

    def submit_then_inject(coro, loop):
        if coro.__name__ == "_pump":
            loop.call_soon_threadsafe(gate.wait, 1)  # the pump starts only after the generator has ended
        future = submit(coro, loop)
        if coro.__name__ == "_pump":
            _inject_cancel(threading.get_ident())
        return future

    monkeypatch.setattr(coglet_stream, "_submit", submit_then_inject)
    monkeypatch.setattr(coglet_stream._Cancel, "cancel", _cancel_interrupted)
    generator = coglet.submit(predict(source)).result(5)
    with pytest.raises(CancelationException):
        next(generator)
    assert generator.gi_frame is None
    gate.set()
    time.sleep(0.2)
    assert not source.started.is_set(), "the engine's request started for a reader already gone"


def test_a_cancel_injected_while_coglet_waits_for_predicts_result_reads_as_a_cancel(coglet):
    """coglet 0.23.1 (worker_bridge.rs, the async predict's `future.result()` error arm) reports
    `canceled` only when the error's text holds "cancelled" or "CancelledError"; the cancel it
    injects there had no text, so the prediction came back `failed`."""
    import coglet as real_coglet

    assert "cancelled" in str(real_coglet.CancelationException())


def predict_then(source: Source, then):
    """predict.py's shape with its metrics: `then` records, on coglet's thread, after the reply."""
    async def predict():
        return coglet_stream.stream(source.pieces(), then=then)
    return predict()


@pytest.mark.parametrize("ending", ["to its end", "an engine error", "a cancel mid-stream"])
def test_what_a_prediction_records_comes_after_every_piece_whatever_ends_it(coglet, ending):
    source = Source(pieces=5 if ending != "a cancel mid-stream" else 1000, every=0.01,
                    fail_at=3 if ending == "an engine error" else None)
    taken, recorded = [], []
    future = coglet.submit(predict_then(source, lambda: recorded.append((list(taken), source.closed.is_set()))))
    generator = future.result(5)
    try:
        for piece in generator:
            taken.append(piece)
            if ending == "a cancel mid-stream" and len(taken) == 3:
                future.cancel()
    except (ValueError, asyncio.CancelledError):
        assert ending != "to its end"
    # Once, on coglet's thread, after every piece coglet took and after the engine's request ended.
    assert recorded == [(taken, True)] and len(taken) == {"to its end": 5, "an engine error": 3,
                                                         "a cancel mid-stream": 3}[ending]


def test_nothing_is_recorded_for_a_reply_cancelled_before_it_began(coglet):
    source, recorded = Source(), []
    future = coglet.submit(predict_then(source, lambda: recorded.append("metrics")))
    generator = future.result(5)
    future.cancel()  # before coglet asks for the first piece: the engine's request never starts
    with pytest.raises(asyncio.CancelledError):
        next(generator)
    assert recorded == [] and not source.started.is_set()


def test_a_failure_to_record_leaves_the_reply_as_it_was(coglet, caplog):
    def fail():
        raise RuntimeError("no scope")

    assert list(coglet.submit(predict_then(Source(pieces=3), fail)).result(5)) == ["0 ", "1 ", "2 "]
    assert "what the prediction records after its reply failed" in caplog.text
