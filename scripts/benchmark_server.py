#!/usr/bin/env python
"""Serving benchmark: concurrent streaming clients through the real Cog server (scripts/serve).

    python scripts/benchmark_server.py --tiny                        # CPU: tiny random notus, under 3 minutes
    python scripts/benchmark_server.py --random /tmp/notus-random    # GPU: notus's exact size, random bf16
                                                                     # weights (written there first if missing)
    python scripts/benchmark_server.py --weights weights/            # GPU: the real checkpoint

For each N of --clients (default 1 8 32), N clients at once, each streaming one prediction over SSE
(Accept: text/event-stream), as callers of the HTTP API would: a prompt of --prompt-tokens tokens
(chat template included), exactly --new-tokens new tokens (min_tokens = max_tokens), sampled at
temperature 0.7 / top_p 0.95 / top_k 50 with a seed of its own. Reported per N: aggregate output
tokens/s (every token over the time from the requests to the last stream's end), time to first token
p50/p95 from the predictions' own metric and as a client sees it (request sent to first output
event; with coglet 0.23.1 that is when the prediction ends, see README), per-stream tokens/s (median,
from the prediction's own metrics), and the aggregate over the first N's; a client meeting 409 asks
again (counted). Then --sequential back-to-back predictions from one client, and --pairs pairs of
predictions released at one instant, counting 409s. Writes JSON under benchmarks/ and prints a
markdown table.
The server runs as the built image would (COG_MAX_CONCURRENCY from predict.py's @cog.concurrent,
unless set in the environment).
"""

from __future__ import annotations

import argparse
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
from cog_server import admitted, at_once, boot, setup_timings, sse_events  # noqa: E402
from notus.prompt import ChatPrompt, load_tokenizer  # noqa: E402
from random_checkpoint import add_checkpoint_arguments, checkpoint_from  # noqa: E402


def prompt_of(weights: Path, tokens: int) -> str:
    """A user message whose templated prompt is `tokens` tokens long (or the first length past it)."""
    tokenizer, frame = load_tokenizer(weights)
    prompt = ChatPrompt(tokenizer, frame)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    text = ""
    while len(prompt.ids("", text or "x")) < tokens:
        text += words[len(text.split()) % len(words)] + " "
    return text.strip()


def stream_one(url: str, inputs: dict, start: threading.Barrier | None = None) -> dict:
    """One SSE prediction: when its first output arrived, its metrics, its status.

    A 409 "At capacity" is asked again, as a client would, and counted (cog_server.admitted: coglet
    0.23.1 refuses a request that meets its slot pool's lock, free slots or not; these runs stay
    within the slots Cog admits).
    """
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    first = None
    completed = {}
    sent = 0

    def send() -> requests.Response:
        nonlocal sent
        sent += 1
        return requests.post(f"{url}/predictions", json={"input": inputs}, headers={"Accept": "text/event-stream"},
                             stream=True, timeout=600)

    with admitted(send) as response:
        if response.status_code != 200:
            return {"status": f"HTTP {response.status_code}", "error": response.text}
        for event, data in sse_events(response):
            if event == "output" and first is None:
                first = time.perf_counter()
            elif event == "completed":
                completed = data
    end = time.perf_counter()
    return {
        "status": completed.get("status"),
        "error": completed.get("error"),
        "time_to_first_token_s": None if first is None else first - t0,
        "end": end,
        "metrics": completed.get("metrics", {}),
        "at_capacity_retries": sent - 1,
    }


def run_clients(url: str, n: int, prompt: str, new_tokens: int) -> dict:
    """n clients at once, one streaming prediction each."""
    start = threading.Barrier(n + 1)
    results: list[dict] = [{} for _ in range(n)]

    def client(i: int) -> None:
        inputs = dict(prompt=prompt, max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.7, top_p=0.95,
                      top_k=50, seed=i)
        results[i] = stream_one(url, inputs, start)

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
    tokens = sum(r["metrics"]["output_token_count"] for r in results)
    assert tokens == n * new_tokens, "a stream ended early"
    ttfts = [r["time_to_first_token_s"] for r in results]
    metric_ttfts = [r["metrics"]["time_to_first_token"] for r in results]
    return {
        "clients": n,
        "new_tokens_each": new_tokens,
        "wall_seconds": max(r["end"] for r in results) - t0,
        "aggregate_tokens_per_second": tokens / (max(r["end"] for r in results) - t0),
        "per_stream_tokens_per_second_median": statistics.median(r["metrics"]["tokens_per_second"] for r in results),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        # The prediction's own time_to_first_token metric: when the engine handed out the first token.
        # coglet 0.23.1 sends an async predict's chunks only when it ends, so clients see them later.
        "metric_ttft_p50_s": percentile(metric_ttfts, 0.5),
        "metric_ttft_p95_s": percentile(metric_ttfts, 0.95),
        "time_in_queue_max_s": max(r["metrics"].get("time_in_queue", 0.0) for r in results),
        "at_capacity_retries": sum(r["at_capacity_retries"] for r in results),
    }


def back_to_back(url: str, count: int) -> dict:
    """`count` sync predictions one after another from one client: how many met 409."""
    codes = [requests.post(f"{url}/predictions", json={"input": {"prompt": "Hi", "max_tokens": 2}}, timeout=60).status_code
             for _ in range(count)]
    return {"predictions": count, "http_409": codes.count(409), "http_200": codes.count(200)}


def pairs_at_once(url: str, count: int) -> dict:
    """`count` times, two sync predictions released at one instant (not asked again): how many met
    409 with slots free, coglet 0.23.1's slot-pool lock race (README)."""
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
        run_clients(server.url, max(args.clients), prompt, 4)  # warm-up: every batch size, briefly
        runs = []
        for n in args.clients:
            runs.append(run_clients(server.url, n, prompt, args.new_tokens))
            runs[-1]["aggregate_over_first"] = runs[-1]["aggregate_tokens_per_second"] / runs[0]["aggregate_tokens_per_second"]
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
        "| clients | aggregate tok/s | x first | per-stream tok/s (median) | TTFT p50 / p95 (metric) | "
        "first SSE chunk p50 / p95 (client) | 409s asked again |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['clients']} | {r['aggregate_tokens_per_second']:.1f} | {r['aggregate_over_first']:.2f} | "
                     f"{r['per_stream_tokens_per_second_median']:.1f} | {r['metric_ttft_p50_s'] * 1000:.1f} / "
                     f"{r['metric_ttft_p95_s'] * 1000:.1f} ms | {r['ttft_p50_s'] * 1000:.1f} / "
                     f"{r['ttft_p95_s'] * 1000:.1f} ms | {r['at_capacity_retries']} |")
    b = report["back_to_back"]
    p = report["pairs_at_once"]
    lines += ["", f"{b['predictions']} back-to-back predictions: {b['http_409']} met 409",
              f"{p['requests']} predictions sent in pairs at one instant: {p['http_409']} met 409 (coglet's lock race)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
