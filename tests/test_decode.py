"""The fast decode path (notus/decode.py) on the CPU: same tokens as generate, one thread, flat cost."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from notus.engine import Engine, GenerationStats
from notus.params import SamplingParams
from notus.stream import TextStream
from test_engine import ForwardCounter

REPO = Path(__file__).resolve().parent.parent
GREEDY = dict(temperature=0)


def generate_reference(engine: Engine, ids: list[int], **params) -> list[int]:
    """transformers' own generate (dynamic cache, eager) with the same settings."""
    config = engine.generation_config(SamplingParams(**params))
    out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                generation_config=config)
    return out[0, len(ids):].tolist()


def engine_ids(engine: Engine, ids: list[int], **params) -> list[int]:
    return list(engine._generate_ids(ids, SamplingParams(**params), seed=0))


def long_prompt(engine: Engine, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(length)
    return [engine.prompt.bos_id] + torch.randint(1000, 31000, (length - 1,), generator=generator).tolist()


def test_greedy_across_the_sliding_window_equals_generate(engine):
    # notus's cache keeps the last 4,096 tokens: a prompt just under it makes the decode cross it.
    window = engine.model.config.sliding_window
    ids = long_prompt(engine, window - 10)
    params = dict(max_tokens=30, min_tokens=30, **GREEDY)
    assert engine_ids(engine, ids, **params) == generate_reference(engine, ids, **params)


def test_compiled_decode_step_gives_the_same_tokens_as_generate(tiny_weights):
    # The GPU path minus CUDA graphs: inductor compiles the decode step on the CPU too.
    compiled = Engine.load(tiny_weights, device="cpu", compile=True)
    compiled.warm_up()  # compiles both cache paths (before and after the window is full)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0, "warm-up compiled nothing"
    _assert_compiled_parity(compiled)
    # After warm-up nothing compiles again: not per token, not per prompt length, not past the window.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def _assert_compiled_parity(compiled: Engine) -> None:
    short = compiled.prompt.ids("", "Hello there")
    params = dict(max_tokens=60, min_tokens=60, **GREEDY)
    assert engine_ids(compiled, short, **params) == generate_reference(compiled, short, **params)
    crossing = long_prompt(compiled, compiled.model.config.sliding_window - 10)
    params = dict(max_tokens=20, min_tokens=20, **GREEDY)
    assert engine_ids(compiled, crossing, **params) == generate_reference(compiled, crossing, **params)
    sampled = dict(max_tokens=40, min_tokens=10, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1)
    ours = list(compiled._generate_ids(short, SamplingParams(**sampled), seed=5))
    torch.manual_seed(5)
    assert ours == generate_reference(compiled, short, **sampled)


def test_every_request_runs_on_one_long_lived_thread(engine):
    # CUDA graphs belong to the thread that captured them: all model calls must stay on one thread.
    params = SamplingParams(max_tokens=4, min_tokens=4)
    with ForwardCounter(engine.model) as forwards:
        for _ in range(3):
            "".join(engine.stream("", "Hi", params))
        other = threading.Thread(target=lambda: "".join(engine.stream("", "Hi", params)))  # a request from elsewhere
        other.start()
        other.join()
    assert forwards.calls >= 4 * 4
    assert forwards.threads == {engine.decoder._thread.ident}


class TimedStats(GenerationStats):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def token_arrived(self) -> None:
        self.times.append(time.perf_counter())
        super().token_arrived()


def test_per_token_cost_stays_flat_as_the_output_grows(engine):
    # Timing on a shared CPU is noisy: a real growth shows in every attempt, noise rarely in three.
    ratios = []
    for attempt in range(3):
        stats = TimedStats()
        params = SamplingParams(max_tokens=2100, min_tokens=2100, seed=3)
        text = "".join(engine.stream("", "Write at length.", params, stats))
        assert stats.output_token_count == 2100 and text
        gaps = [b - a for a, b in zip(stats.times, stats.times[1:])]
        early, late = statistics.median(gaps[10:210]), statistics.median(gaps[1900:2100])
        ratios.append(late / early)
        if late <= 1.2 * early:
            return
    pytest.fail(f"token ~2000 costs {min(ratios):.2f}x or more what token ~20 costs (attempts: {ratios})")


def test_text_stream_cost_per_token_does_not_grow_with_the_text(engine):
    ids = long_prompt(engine, 2100)[1:]
    stream = TextStream(engine.token_bytes, ["never appears \u2603"])
    costs = []
    for token_id in ids:
        t0 = time.perf_counter()
        stream.push(token_id)
        costs.append(time.perf_counter() - t0)
    early, late = statistics.median(costs[10:210]), statistics.median(costs[1850:2050])
    assert late <= 1.2 * early + 2e-6, f"push #2000 takes {late * 1e6:.1f} us, push #20 {early * 1e6:.1f} us"


def test_benchmark_runs_on_the_cpu_and_reports_its_ratios(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--tiny", "--reps", "2", "--prompt-lengths", "16", "64",
         "--new-tokens", "32", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (result_file,) = tmp_path.glob("decode-cpu-*.json")
    report = json.loads(result_file.read_text())
    assert report["torch"] == torch.__version__ and "benchmark.py --tiny" in report["command"]
    assert [row["prompt_tokens"] for row in report["results"]] == [16, 64]
    for row in report["results"]:
        for path in ("baseline", "project"):
            assert all(run["tokens"] == 32 for run in row[path]["runs"])
            assert row[path]["time_to_first_token_s"] > 0 and row[path]["bandwidth_share"] > 0
        assert row["project_over_baseline_decode"] == pytest.approx(
            row["project"]["decode_tokens_per_s"] / row["baseline"]["decode_tokens_per_s"])
