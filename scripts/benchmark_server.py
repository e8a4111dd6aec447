#!/usr/bin/env python
"""Serving benchmark: concurrent streaming clients through the real Cog server (scripts/serve).

    python scripts/benchmark_server.py --tiny                        # CPU: tiny random notus, under 3 minutes
    python scripts/benchmark_server.py --random /tmp/notus-random    # GPU: notus's exact size, random bf16
                                                                     # weights (written there first if missing)
    python scripts/benchmark_server.py --weights weights/            # GPU: the real checkpoint

For each N of --clients (default 1 8 32), N clients at once, each sending one prediction as callers
of the HTTP API would, streamed over SSE (Accept: text/event-stream) or answered as plain JSON (the
sync answer): two rounds of each, in the order SSE, JSON, JSON, SSE. Each has a prompt of --prompt-tokens tokens (chat template included), exactly
--new-tokens new tokens (min_tokens = max_tokens), sampled at temperature 0.7 / top_p 0.95 / top_k 50
with a seed of its own. Reported per N and mode: aggregate output tokens/s (every token over the time
from the requests to the last answer's end), per-stream tokens/s (median, from the predictions' own
metrics), time to first token p50/p95 from the prediction's own metric, and for SSE as a client sees
it (request sent to its first output event) with the lag between the two per prediction; SSE's
aggregate over JSON's, and each N's aggregate over the first N's. A client meeting 409 asks again
(counted). Then --sequential back-to-back predictions from one client, and --pairs pairs of
predictions released at one instant, counting 409s. Writes JSON under benchmarks/ and prints a
markdown table.
The server runs as the built image would (COG_MAX_CONCURRENCY from predict.py's @cog.concurrent,
unless set in the environment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import percentile, run_facts, write_report  # noqa: E402
from cog_server import admitted, at_once, boot, setup_timings  # noqa: E402
from notus.prompt import ChatPrompt, load_tokenizer  # noqa: E402
from random_checkpoint import add_checkpoint_arguments, checkpoint_from  # noqa: E402


def prompt_of(weights: Path, tokens: int) -> str:
    """A user message whose templated prompt is `tokens` tokens long (or the first length past it)."""
    tokenizer, template = load_tokenizer(weights)
    prompt = ChatPrompt(tokenizer, template)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    text = ""
    while len(prompt.ids("", text or "x")) < tokens:
        text += words[len(text.split()) % len(words)] + " "
    return text.strip()


def predict_one(url: str, inputs: dict, sse: bool, start: threading.Barrier | None = None) -> dict:
    """One prediction, streamed over SSE or answered as JSON: its metrics, its status, and for SSE when
    its first output event arrived.

    A 409 "At capacity" is asked again, as a client would, and counted (cog_server.admitted: coglet
    0.23.1 refuses a request that meets its slot pool's lock, free slots or not; these runs stay
    within the slots Cog admits).
    """
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    started = first = None  # coglet's `start` event (the prediction began in the worker), the first output
    sent = 0

    def send() -> requests.Response:
        nonlocal sent
        sent += 1
        return requests.post(f"{url}/predictions", json={"input": inputs}, stream=sse, timeout=600,
                             headers={"Accept": "text/event-stream"} if sse else None)

    with admitted(send) as response:
        if response.status_code != 200:
            return {"status": f"HTTP {response.status_code}", "error": response.text}
        if sse:
            # The raw bytes, not each event decoded: on a small machine the client's own parsing of
            # every chunk would take CPU from the server it measures. The first output event's arrival
            # is timed; only the completed event is decoded.
            received = b""
            for data in response.iter_content(chunk_size=None):
                received += data
                if started is None and b"event: start" in received:
                    started = time.perf_counter()
                if first is None and b"event: output" in received:
                    first = time.perf_counter()
            completed = received[received.rindex(b"event: completed"):]
            answer = json.loads(completed.split(b"data:", 1)[1].split(b"\n", 1)[0])
        else:
            answer = response.json()
    return {
        "status": answer.get("status"),
        "error": answer.get("error"),
        "first_chunk_s": None if first is None else first - t0,
        "start_event_s": None if started is None else started - t0,
        "end": time.perf_counter(),
        "metrics": answer.get("metrics", {}),
        "at_capacity_retries": sent - 1,
    }


def one_round(url: str, n: int, prompt: str, new_tokens: int, sse: bool) -> tuple[list[dict], float]:
    """n clients at once, one prediction each: their results, and the seconds until the last ended."""
    start = threading.Barrier(n + 1)
    results: list[dict] = [{} for _ in range(n)]

    def client(i: int) -> None:
        inputs = dict(prompt=prompt, max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.7, top_p=0.95,
                      top_k=50, seed=i)
        results[i] = predict_one(url, inputs, sse, start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    failed = [r for r in results if r["status"] != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} of {n} predictions did not succeed, e.g. {failed[0]}")
    assert sum(r["metrics"]["output_token_count"] for r in results) == n * new_tokens, "a stream ended early"
    return results, max(r["end"] for r in results) - t0


def run_clients(url: str, n: int, prompt: str, new_tokens: int) -> list[dict]:
    """n clients at once, over SSE and as JSON, two rounds each in the order SSE, JSON, JSON, SSE (a
    drift of the machine's speed during the run weighs on both modes alike): one summary per mode."""
    rounds = {True: [], False: []}
    for sse in (True, False, False, True):
        rounds[sse].append(one_round(url, n, prompt, new_tokens, sse))
    return [summary(n, new_tokens, sse, rounds[sse]) for sse in (True, False)]


def summary(n: int, new_tokens: int, sse: bool, rounds: list[tuple[list[dict], float]]) -> dict:
    results = [r for round_results, _ in rounds for r in round_results]
    wall = sum(seconds for _, seconds in rounds)
    metric_ttfts = [r["metrics"]["time_to_first_token"] for r in results]
    run = {
        "clients": n,
        "mode": "sse" if sse else "json",
        "rounds": len(rounds),
        "new_tokens_each": new_tokens,
        "wall_seconds": wall,
        "aggregate_tokens_per_second": len(results) * new_tokens / wall,
        "per_stream_tokens_per_second_median": statistics.median(r["metrics"]["tokens_per_second"] for r in results),
        # The prediction's own time_to_first_token metric: from predict's call to the engine's first token.
        "metric_ttft_p50_s": percentile(metric_ttfts, 0.5),
        "metric_ttft_p95_s": percentile(metric_ttfts, 0.95),
        "time_in_queue_max_s": max(r["metrics"].get("time_in_queue", 0.0) for r in results),
        "at_capacity_retries": sum(r["at_capacity_retries"] for r in results),
    }
    if sse:
        # As the client sees it: request sent to the first output event. And how much later than the
        # metric (which counts from predict's call) the first output arrives after coglet's `start`
        # event, sent as the prediction begins in the worker: the worker's own admission of the
        # prediction plus the delivery of the piece. Before `start` is coglet's handling of the request.
        firsts = [r["first_chunk_s"] for r in results]
        lags = [r["first_chunk_s"] - r["start_event_s"] - r["metrics"]["time_to_first_token"] for r in results]
        before = [r["start_event_s"] for r in results]
        run |= {"first_chunk_p50_s": percentile(firsts, 0.5), "first_chunk_p95_s": percentile(firsts, 0.95),
                "start_event_p50_s": percentile(before, 0.5), "start_event_p95_s": percentile(before, 0.95),
                "first_chunk_lag_p50_s": percentile(lags, 0.5), "first_chunk_lag_p95_s": percentile(lags, 0.95)}
    return run


def back_to_back(url: str, count: int) -> dict:
    """`count` sync predictions one after another from one client: how many met 409."""
    codes = [requests.post(f"{url}/predictions", json={"input": {"prompt": "Hi", "max_tokens": 2}}, timeout=60).status_code
             for _ in range(count)]
    return {"predictions": count, "http_409": codes.count(409), "http_200": codes.count(200)}


def pairs_at_once(url: str, count: int) -> dict:
    """`count` times, two sync predictions released at one instant (not asked again): how many met
    409 with slots free, coglet 0.23.1's slot-pool lock race (docs/coglet.md)."""
    def send(_) -> int:
        return requests.post(f"{url}/predictions", json={"input": {"prompt": "Hi", "max_tokens": 2}},
                             timeout=60).status_code

    codes = [code for _ in range(count) for code in at_once(send, [0, 1])]
    return {"requests": len(codes), "http_409": codes.count(409), "http_200": codes.count(200)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sequential", type=int, default=100, help="back-to-back predictions to count 409s over")
    parser.add_argument("--pairs", type=int, default=100, help="pairs of predictions at one instant to count 409s over")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()

    weights, model = checkpoint_from(args)
    prompt = prompt_of(weights, args.prompt_tokens)

    server, setup_seconds, health = boot(weights)
    try:
        setup_logs = health["setup"]["logs"]
        one_round(server.url, max(args.clients), prompt, 4, sse=True)  # warm-up: every batch size, briefly
        runs = []
        for n in args.clients:
            streamed, answered = run_clients(server.url, n, prompt, args.new_tokens)
            streamed["sse_over_json"] = streamed["aggregate_tokens_per_second"] / answered["aggregate_tokens_per_second"]
            runs += [streamed, answered]
        for run in runs:
            first = next(r for r in runs if r["mode"] == run["mode"])
            run["aggregate_over_first"] = run["aggregate_tokens_per_second"] / first["aggregate_tokens_per_second"]
        sequential = back_to_back(server.url, args.sequential)
        pairs = pairs_at_once(server.url, args.pairs)
    finally:
        server.stop()

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "model": model,
        **run_facts(kind),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "setup_seconds": setup_seconds,
        "engine_plan": [line for line in setup_logs.splitlines() if "KV-cache slots" in line],
        "setup_timings": setup_timings(setup_logs),
        "runs": runs,
        "back_to_back": sequential,
        "pairs_at_once": pairs,
    }
    path = write_report(args.out, f"server-{kind}", report)
    print(markdown_table(report))
    print(f"wrote {path}")


def markdown_table(report: dict) -> str:
    lines = [
        f"{report['model']} on {report['device']} (torch {report['torch']}), through scripts/serve; "
        f"{report['prompt_tokens']}-token prompts, {report['new_tokens']} new tokens each",
        *[f"engine: {line.strip()}" for line in report["engine_plan"]],
        *[f"setup: {line.strip()}" for line in report["setup_timings"]],
        "",
        "| clients | mode | aggregate tok/s | x first | SSE / JSON | per-stream tok/s (median) | "
        "TTFT p50 / p95 (metric) | first SSE chunk p50 / p95 (client) | start event p50 / p95 (client) | "
        "first chunk after start, less the metric, p50 / p95 | 409s asked again |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ms = lambda run, key: f"{run[key + '_p50_s'] * 1000:.1f} / {run[key + '_p95_s'] * 1000:.1f} ms"  # noqa: E731
    for r in report["runs"]:
        sse = r["mode"] == "sse"
        cells = [r["clients"], r["mode"], f"{r['aggregate_tokens_per_second']:.1f}", f"{r['aggregate_over_first']:.2f}",
                 f"{r['sse_over_json']:.2f}" if sse else "", f"{r['per_stream_tokens_per_second_median']:.1f}",
                 ms(r, "metric_ttft"), *((ms(r, "first_chunk"), ms(r, "start_event"), ms(r, "first_chunk_lag")) if sse
                                         else ("", "", "")),
                 r["at_capacity_retries"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    b = report["back_to_back"]
    p = report["pairs_at_once"]
    lines += ["", f"{b['predictions']} back-to-back predictions: {b['http_409']} met 409",
              f"{p['requests']} predictions sent in pairs at one instant: {p['http_409']} met 409 (coglet's lock race)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
