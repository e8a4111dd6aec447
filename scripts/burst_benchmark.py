"""The burst mode of scripts/benchmark.py (`--burst N [N ...]`): what packing waiting prompts into one
prefill forward saves (notus/scheduler.py).

For each N, N new random prompts of `--burst-prompt` tokens submitted at once, as concurrent
predictions on one event loop (as in Cog's worker), each generating NEW_TOKENS tokens (greedy), on
one engine with packing on and off (Scheduler.pack, switched between bursts). The two take turns
within each repetition, so a slow spell of the machine touches both; every burst's prompts are new,
so nothing is reused from the KV cache. Reported per N and path: time to first token p50 and p95
over every request of every repetition, the prefill forwards a burst took and its wall time to the
last token (medians); then one at a time / packed for the p50 and the p95 (higher: packing saves more).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import contextmanager

from notus.engine import Engine
from notus.params import SamplingParams
from request_streams import stream_all

NEW_TOKENS = 16
PATHS = {"packed": True, "one_at_a_time": False}


@contextmanager
def counted_prefills(engine: Engine):
    """A list that gets one entry per prefill forward the engine runs inside the block."""
    forward, calls = engine.scheduler.forward, []
    prefill = forward.prefill

    def counted(segments):
        calls.append(len(segments))
        return prefill(segments)

    forward.prefill = counted
    try:
        yield calls
    finally:
        del forward.prefill  # the class's method again


def burst_run(engine: Engine, prompts: list[list[int]], pack: bool) -> dict:
    """The prompts at once; each one's time to first token, the prefill forwards, the wall time."""
    engine.scheduler.call(lambda: setattr(engine.scheduler, "pack", pack))  # between turns, on its thread

    with counted_prefills(engine) as prefills:
        start, done = stream_all(engine, prompts, lambda i: SamplingParams(
            max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0, seed=i))
    assert all(stats.output_token_count == NEW_TOKENS for stats, _ in done), "a request ended early"
    return {"ttfts": [stats.time_to_first_token for stats, _ in done], "prefill_forwards": len(prefills),
            "wall_seconds": max(end for _, end in done) - start}


def burst_row(engine: Engine, n: int, prompt_tokens: int, reps: int, new_prompt: Callable[[int], list[int]]) -> dict:
    """N prompts at once, `reps` times with packing and without (after one warm-up burst of each)."""
    runs = {name: [] for name in PATHS}
    try:
        for rep in range(reps + 1):
            for name, pack in PATHS.items():
                run = burst_run(engine, [new_prompt(prompt_tokens) for _ in range(n)], pack)
                if rep:  # the first: warm-up
                    runs[name].append(run)
    finally:
        engine.scheduler.call(lambda: setattr(engine.scheduler, "pack", True))
    row = {"prompts": n, "prompt_tokens": prompt_tokens, "new_tokens_each": NEW_TOKENS}
    for name in PATHS:
        ttfts = [t for run in runs[name] for t in run["ttfts"]]
        row[name] = {"ttft_p50_s": statistics.median(ttfts),
                     "ttft_p95_s": statistics.quantiles(ttfts, n=20, method="inclusive")[18],  # as benchmark.percentile
                     "prefill_forwards": statistics.median(run["prefill_forwards"] for run in runs[name]),
                     "wall_seconds": statistics.median(run["wall_seconds"] for run in runs[name]),
                     "runs": runs[name]}
    for q in ("p50", "p95"):
        row[f"ttft_{q}_one_at_a_time_over_packed"] = row["one_at_a_time"][f"ttft_{q}_s"] / row["packed"][f"ttft_{q}_s"]
    return row


def burst_table(report: dict) -> str:
    rows = report["burst"]
    lines = [
        f"{report['model']} on {report['device']} (torch {report['torch']}): N prompts of "
        f"{rows[0]['prompt_tokens']} tokens at once, {rows[0]['new_tokens_each']} new tokens each (greedy), "
        f"{report['reps']} bursts of each path; TTFT over every request, forwards and wall time their medians",
        "",
        "| prompts at once | prefill | prefill forwards | TTFT p50 | TTFT p95 | burst wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for name, label in (("packed", "packed"), ("one_at_a_time", "one at a time")):
            r = row[name]
            lines.append(f"| {row['prompts']} | {label} | {r['prefill_forwards']:g} | {r['ttft_p50_s'] * 1000:.1f} ms | "
                         f"{r['ttft_p95_s'] * 1000:.1f} ms | {r['wall_seconds'] * 1000:.1f} ms |")
        lines.append(f"| {row['prompts']} | **one at a time / packed** | | "
                     f"{row['ttft_p50_one_at_a_time_over_packed']:.2f} | {row['ttft_p95_one_at_a_time_over_packed']:.2f} | |")
    return "\n".join(lines)
