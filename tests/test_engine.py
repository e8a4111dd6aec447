"""The engine on a tiny random notus: real transformers generation, real tokenizer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch

from aio import text as joined_text
from notus.engine import Engine, GenerationStats
from notus.params import SamplingParams

EOS = 2


def reply(engine, prompt="Tell me a story.", system_prompt="", **params) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    text = joined_text(engine.stream(system_prompt, prompt, SamplingParams(**params), stats))
    return text, stats


def generate_reference(engine, ids: list[int], **params) -> list[int]:
    """transformers' own generate (dynamic cache, eager) with the same settings, on the engine's device."""
    inputs = torch.tensor([ids], device=engine.device)
    out = engine.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                generation_config=engine.generation_config(SamplingParams(**params)))
    return out[0, len(ids):].tolist()


def plain_generate(engine, prompt: str, seed: int, **params) -> list[int]:
    """Reference for a user message: generate, sampling (if any) from torch's generator seeded with `seed`."""
    torch.manual_seed(seed)
    return generate_reference(engine, engine.prompt.ids("", prompt), **params)


def test_greedy_equals_plain_generate(engine):
    text, stats = reply(engine, "Hello there", temperature=0, max_tokens=60)
    expected = plain_generate(engine, "Hello there", seed=0, temperature=0, max_tokens=60)
    assert stats.output_token_count == len(expected)
    assert text == engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_same_seed_same_text_and_other_seed_other_text(engine):
    a, _ = reply(engine, seed=123, max_tokens=40, min_tokens=40)
    b, _ = reply(engine, seed=123, max_tokens=40, min_tokens=40)
    c, _ = reply(engine, seed=124, max_tokens=40, min_tokens=40)
    assert a == b and a != c


def test_temperature_zero_is_deterministic_without_a_seed(engine):
    a, sa = reply(engine, temperature=0, max_tokens=40)
    b, sb = reply(engine, temperature=0, max_tokens=40)
    assert a == b and sa.seed != sb.seed


def test_seed_is_logged_when_picked(engine, caplog):
    with caplog.at_level(logging.INFO, logger="notus"):
        _, stats = reply(engine, max_tokens=2)
    assert f"seed: {stats.seed}" in caplog.text


def test_generation_ends_at_eos_and_eos_is_not_in_the_text(engine):
    ended_early = []
    for seed in range(6):
        text, stats = reply(engine, seed=seed, max_tokens=300)
        assert "</s>" not in text
        if stats.output_token_count < 300:
            ended_early.append(seed)
    assert ended_early, "the tiny model emits EOS now and then; no run ended at EOS"


def test_min_tokens_holds_off_eos(engine):
    for seed in range(3):
        expected = plain_generate(engine, "Tell me a story.", seed=seed, max_tokens=300)
        if EOS in expected:
            break
    first_eos = expected.index(EOS) + 1
    _, stats = reply(engine, seed=seed, max_tokens=300, min_tokens=first_eos + 20)
    assert stats.output_token_count >= first_eos + 20


def test_max_tokens_is_exact(engine):
    _, stats = reply(engine, seed=3, max_tokens=25, min_tokens=25)
    assert stats.output_token_count == 25


def test_stop_sequence_ends_generation_right_before_it(engine):
    full, full_stats = reply(engine, seed=5, max_tokens=120, min_tokens=120)
    stop = full[len(full) // 2 : len(full) // 2 + 6]
    assert stop.strip(), "pick a stop sequence with visible text"
    text, stats = reply(engine, seed=5, max_tokens=120, min_tokens=120, stop_sequences=(stop,))
    assert text == full[: full.index(stop)]
    assert stats.output_token_count < full_stats.output_token_count


def test_metrics(engine):
    _, stats = reply(engine, seed=1, max_tokens=20, min_tokens=20)
    metrics = stats.metrics()
    assert metrics["input_token_count"] == len(engine.prompt.ids("", "Tell me a story."))
    assert metrics["output_token_count"] == 20
    assert 0 < metrics["time_to_first_token"] < 10
    assert metrics["tokens_per_second"] > 0


def test_a_one_token_reply_reports_that_token_over_its_time_to_first_token(engine):
    """No decode speed after the first token exists: the README's tokens_per_second for that case."""
    _, stats = reply(engine, seed=1, max_tokens=1)
    metrics = stats.metrics()
    assert metrics["output_token_count"] == 1
    assert metrics["tokens_per_second"] == pytest.approx(1 / metrics["time_to_first_token"])


class ForwardCounter:
    """Counts the engine's forward passes (prefill chunks and decode steps) and the threads they ran on."""

    def __init__(self, engine):
        self.calls, self.threads = 0, set()
        self._forward = engine.scheduler.forward
        for name in ("prefill", "decode"):
            setattr(self._forward, name, self._counted(getattr(self._forward, name)))

    def _counted(self, method):
        def counted(*args, **kwargs):
            self.calls += 1
            self.threads.add(threading.current_thread().ident)
            return method(*args, **kwargs)
        return counted

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self._forward.prefill, self._forward.decode  # the class's methods again


def test_prompt_too_long_fails_before_generating(engine):
    prompt = "hello " * 33000
    with ForwardCounter(engine) as forwards, pytest.raises(ValueError) as error:
        reply(engine, prompt, max_tokens=10)
    n = len(engine.prompt.ids("", prompt))
    assert f"{n:,} tokens" in str(error.value) and "32,768" in str(error.value)
    assert forwards.calls == 0


def test_max_tokens_is_lowered_to_fit_the_context(engine, caplog, monkeypatch):
    # A short context stands in for 32,768 so the test stays fast on a CPU.
    prompt_tokens = len(engine.prompt.ids("", "Tell me a story."))
    monkeypatch.setattr(engine, "context_length", prompt_tokens + 30)
    with caplog.at_level(logging.INFO, logger="notus"):
        _, stats = reply(engine, seed=2, max_tokens=500, min_tokens=500)
    assert stats.output_token_count == 30
    assert "max_tokens lowered from 500 to 30" in caplog.text


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(top_p=1.5), "top_p must be between 0 and 1, got 1.5"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be between 0.01 and 5, got 0.0"),
        (dict(max_tokens=10, min_tokens=11), "min_tokens (11) must not exceed max_tokens (10)"),
        (dict(max_tokens=0), "max_tokens must be between 1 and 32768, got 0"),
        (dict(temperature=5.5), "temperature must be between 0 and 5, got 5.5"),
        (dict(top_k=-1), "top_k must be between 0 (off) and 32000, got -1"),
        (dict(top_k=32001), "top_k must be between 0 (off) and 32000, got 32001"),
        (dict(seed=2**32), "seed must be between 0 and 4294967295, got 4294967296"),
        (dict(seed=-1), "seed must be between 0 and 4294967295, got -1"),
        (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
        (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
        (dict(temperature="2"), "temperature must be a finite number, got '2'"),
    ],
)
def test_bad_settings_get_clear_errors(engine, params, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        reply(engine, **params)


def test_empty_prompt_is_refused(engine):
    with pytest.raises(ValueError, match=r"^give prompt \(your message\) or messages \(a conversation\): both are empty$"):
        reply(engine, "")


def test_leaving_the_stream_stops_the_model(engine):
    async def read_five_then_leave():
        stream = engine.stream("", "Go on forever", SamplingParams(max_tokens=32000, min_tokens=32000, seed=1))
        pieces = 0
        async for _ in stream:
            pieces += 1
            if pieces == 5:
                break
        with ForwardCounter(engine) as forwards:
            t0 = time.perf_counter()
            await stream.aclose()
            assert time.perf_counter() - t0 < 2
            after_close = forwards.calls
            await asyncio.sleep(0.3)
            assert forwards.calls == after_close <= 1  # at most the step already queued, then nothing

    asyncio.run(read_five_then_leave())
    text, _ = reply(engine, seed=1, max_tokens=5)  # and the next request runs normally
    assert text


def test_one_engine_turn_wakes_all_its_requests_on_a_loop_with_one_cross_thread_call(engine, monkeypatch):
    """Each call_soon_threadsafe is a system call on the engine thread (a byte to the loop's
    self-pipe), between two steps: 8 streams on one loop cost at most one per sending of the engine's
    wake-ups (at most two a turn), not one each (notus/wakeups.py), and every stream still gets all
    its tokens."""
    scheduler, sendings = engine.scheduler, []
    send = scheduler.send_wakeups
    monkeypatch.setattr(scheduler, "send_wakeups", lambda: sendings.append(1) or send())

    async def eight_streams():
        loop = asyncio.get_running_loop()
        calls, schedule = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kwargs: calls.append(args) or schedule(*args, **kwargs)
        params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)

        async def token_count(i: int) -> int:
            stats = GenerationStats()
            async for _ in engine.stream_ids([1, 100 + i], params, stats):
                pass
            return stats.output_token_count

        return await asyncio.gather(*(token_count(i) for i in range(8))), len(calls)

    counts, calls = asyncio.run(eight_streams())
    assert counts == [16] * 8
    # At most one a sending (17 to 32 seen: more turns when the requests arrive over several of them),
    # where one per request and token would be 128 or more.
    assert calls <= len(sendings) and calls < 64, (calls, len(sendings))


def test_require_weights_names_what_is_missing_and_the_fix(tmp_path, tiny_weights):
    from notus.weights import require_weights

    assert require_weights(tiny_weights) == tiny_weights
    with pytest.raises(FileNotFoundError) as error:
        require_weights(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "config.json" in message and "safetensors" in message
    assert "python scripts/download_weights.py" in message and "COG_WEIGHTS" in message


def test_the_device_is_cuda_unless_the_cpu_is_asked_for(monkeypatch):
    from notus.loading import pick_device

    monkeypatch.setenv("NOTUS_DEVICE", "cpu")
    assert pick_device() == "cpu"
    assert pick_device("cpu") == "cpu"
    monkeypatch.setenv("NOTUS_DEVICE", "tpu")
    with pytest.raises(ValueError, match="NOTUS_DEVICE must be cuda or cpu, got 'tpu'"):
        pick_device()
    monkeypatch.delenv("NOTUS_DEVICE")
    if torch.cuda.is_available():
        assert pick_device() == "cuda"
    else:
        with pytest.raises(RuntimeError, match="No usable CUDA device.*set NOTUS_DEVICE=cpu"):
            pick_device()


def test_the_dtype_is_the_devices_unless_notus_dtype_says_otherwise(tiny_weights, monkeypatch):
    from notus.loading import load_model, pick_dtype

    monkeypatch.delenv("NOTUS_DTYPE", raising=False)
    assert pick_dtype("cuda") == torch.bfloat16 and pick_dtype("cpu") == torch.float32
    monkeypatch.setenv("NOTUS_DTYPE", "bfloat16")
    assert load_model(tiny_weights, "cpu").dtype == torch.bfloat16
    monkeypatch.setenv("NOTUS_DTYPE", "float16")
    with pytest.raises(ValueError, match="NOTUS_DTYPE must be one of bfloat16, float32, got 'float16'"):
        load_model(tiny_weights, "cpu")


def within(seconds: float, fn):
    """fn()'s result, or a failure after `seconds`: a hung stream cannot be cancelled out of (its
    cancel waits for the engine), so the deadline is a thread's join, not asyncio's."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"still waiting after {seconds} s"
    return result[0]


def stream_error(engine, on_first_piece=lambda: None, prompt="Tell me a story.") -> Exception:
    """What a long greedy stream raises (calling on_first_piece() once its first piece came)."""

    async def read() -> Exception:
        pieces = 0
        try:
            async for _ in engine.stream("", prompt, SamplingParams(max_tokens=5000, min_tokens=5000, temperature=0)):
                pieces += 1
                if pieces == 1:
                    on_first_piece()
        except Exception as e:  # noqa: BLE001 - what predict would see
            return e
        raise AssertionError("the stream ended normally")

    return within(30, lambda: asyncio.run(read()))


def break_the_device(scheduler, monkeypatch):
    """What a sticky CUDA error does: every later operation on the device raises."""

    def device_lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for owner, name in ((scheduler.forward, "prefill"), (scheduler.forward, "decode"), (scheduler, "_set_active")):
        monkeypatch.setattr(owner, name, device_lost)


@pytest.mark.parametrize("when", ["mid-stream", "before the request"])
def test_a_broken_device_fails_every_request_at_once_and_reports_itself_unhealthy(engine, monkeypatch, when):
    """No request may wait for ever on a device that fails: the one in flight (or the first one sent)
    fails naming the error, the engine stops (predict.py's healthcheck turns false, Cog's
    /health-check UNHEALTHY), and every later request fails at once naming it too."""
    from predict import Predictor  # imports cog: only where it is needed

    broken = Engine(engine.model, engine.prompt, slots=2)
    predictor = Predictor()
    predictor.engine = broken
    assert predictor.healthcheck()
    if when == "mid-stream":
        error = stream_error(broken, lambda: break_the_device(broken.scheduler, monkeypatch))
    else:
        break_the_device(broken.scheduler, monkeypatch)
        error = stream_error(broken)
    assert "illegal memory access" in str(error), error
    within(10, lambda: broken.scheduler._thread.join())
    assert not broken.scheduler.alive and not predictor.healthcheck()
    t0 = time.monotonic()
    later = stream_error(broken, prompt="Hi")
    assert time.monotonic() - t0 < 1
    assert "the engine stopped" in str(later) and "illegal memory access" in str(later), later


def test_closing_the_engine_ends_the_streams_in_flight(engine):
    closing = Engine(engine.model, engine.prompt, slots=2)
    closer = threading.Thread(target=closing.scheduler.close)
    error = stream_error(closing, closer.start)
    closer.join(timeout=30)
    assert isinstance(error, RuntimeError) and "closed" in str(error), error
    assert "closed" in str(stream_error(closing, prompt="Hi"))


def test_tokens_per_second_is_the_engines_speed_even_when_the_reader_lags(engine, monkeypatch):
    """The decode speed is timed where the engine makes the tokens: a reader whose event loop was
    busy for a second reads 19 tokens at once, and reports the engine's speed, not its reading's."""
    slow = Engine(engine.model, engine.prompt, slots=2)
    step = slow.scheduler._decode_step

    def at_most_50_a_second():
        launched = step()
        time.sleep(0.02)
        return launched

    monkeypatch.setattr(slow.scheduler, "_decode_step", at_most_50_a_second)

    async def lagging_reader(stats):
        pieces = slow.stream("", "Hi", SamplingParams(max_tokens=20, min_tokens=20, temperature=0), stats)
        first = await anext(pieces)
        time.sleep(1.0)  # the loop busy elsewhere: the other 19 tokens wait, then come in one read
        return [first] + [piece async for piece in pieces]

    stats = GenerationStats()
    try:
        asyncio.run(lagging_reader(stats))
    finally:
        slow.scheduler.close()
    assert stats.output_token_count == 20
    assert 25 < stats.metrics()["tokens_per_second"] <= 50, stats.metrics()
