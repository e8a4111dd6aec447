#!/usr/bin/env python
"""Decode benchmark: this project's generation path against plain `model.generate`, in one run.

    python scripts/benchmark.py                      # GPU: notus's exact config, random bf16 weights
    python scripts/benchmark.py --weights weights/   # GPU: the real checkpoint
    python scripts/benchmark.py --tiny               # CPU: the tiny test model (development only)

For each prompt length (128 and 2048 tokens by default), after a warm-up, it runs `--reps` times:
  baseline  plain model.generate, eager, default cache, TextIteratorStreamer read from a new thread
            (what Cog's examples do);
  project   Engine.stream_ids: the code Predictor.predict runs (the engine thread, the project's
            KV cache, CUDA-graph decode steps on the GPU, streaming text).
Every run generates exactly --new-tokens tokens (min_tokens = max_tokens), greedy.

Reported per path: time to first token (median), decode tokens/s (median, tokens after the first),
share of memory bandwidth (bytes read per token x tokens/s / the bandwidth a device-to-device copy
reaches in the same run), peak device memory; then project / baseline. Also the bare model step
(no sampling, no streaming) as a floor.

With --streams N [N ...], also N concurrent requests through the engine for each N (prompt lengths
mixed from --prompt-lengths, exactly --new-tokens each, sampled at temperature 0.7 / top_p 0.95 /
top_k 50): aggregate output tokens/s, per-stream decode tokens/s, time to first token p50/p95, and
each N's aggregate over the first N's. Each N serves the same mix, at least one prompt of each
length: with N=1 they run one after another. Writes JSON under benchmarks/ and prints markdown tables.

    python scripts/benchmark.py --streams 1 8 32          # GPU
    python scripts/benchmark.py --tiny --streams 1 8      # CPU, under 3 minutes

With --conversation, only what reusing the KV cache saves (scripts/reuse_benchmark.py): the fifth
turn of a 3,000-token conversation and 8 callers sharing a 2,000-token system prompt, each with
reuse and without, in one run.

    python scripts/benchmark.py --tiny --conversation --reps 3   # CPU

With --versus-transformers N [N ...], only issue 21's comparison (scripts/versus_transformers.py): for
each N, N random prompts of the first --prompt-lengths' tokens (128 by default), greedy, exactly --new-tokens each,
through the engine, through model.generate as one batch and through model.generate_batch
(transformers' continuous batching), on the same model: aggregate output tokens/s of each, project
over each and over the better of the two, and each path over its own 1 stream (paired within each
repetition).

    python scripts/benchmark.py --tiny --versus-transformers 1 8 32 --new-tokens 64 --prompt-lengths 128 --reps 5

With --burst N [N ...], only what packing prefill saves (scripts/burst_benchmark.py): for each N, N new
prompts of --burst-prompt tokens (128 by default) at once, 16 new tokens each, with packing on and off
in the same engine, --reps bursts of each: time to first token p50/p95, prefill forwards per burst,
and one at a time / packed.

    python scripts/benchmark.py --tiny --burst 8 32 --burst-prompt 128 --reps 3

With --step-parts N [N ...] (starting at 1), only where one decode step's time goes with N rows (the
whole step, its layers, the vocabulary's logits, the sampler) and the prefill per token, each timed
alone, and how each scales with N (scripts/step_parts.py).

    python scripts/benchmark.py --tiny --step-parts 1 8 32 --prompt-lengths 128 --new-tokens 64 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, TextIteratorStreamer  # noqa: E402

from notus.engine import DEFAULT_SLOTS, Engine, GenerationStats  # noqa: E402
from notus.loading import load_model, pick_dtype  # noqa: E402
from notus.params import SamplingParams  # noqa: E402
from notus.prompt import ChatPrompt, load_tokenizer  # noqa: E402
from random_checkpoint import write_small_files, write_tiny  # noqa: E402
from op_count import decode_step_ops  # noqa: E402
from reuse_benchmark import conversation_report, conversation_table  # noqa: E402
from versus_transformers import versus_row, versus_table  # noqa: E402
from burst_benchmark import burst_row, burst_table  # noqa: E402
from step_parts import step_parts_report, step_parts_table  # noqa: E402
from request_streams import stream_all  # noqa: E402
from timing import seconds_per_call  # noqa: E402


def tokenizer_dir(weights: Path | None) -> Path:
    """A folder with notus's tokenizer: the checkpoint's, else notus's small files (scripts/random_checkpoint.py)."""
    if weights is not None:
        return weights
    return write_small_files(Path(tempfile.mkdtemp(prefix="notus-tokenizer-")))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--weights / --tiny (default: a random notus of the exact config) and --device, as build_model takes them."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="a real checkpoint (default: random weights, exact config)")
    source.add_argument("--tiny", action="store_true", help="the tiny test model (CPU development)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_model(args):
    """(model, description): real weights, the tiny test model, or a random notus of the exact config."""
    if args.weights:
        return load_model(args.weights, args.device), f"notus-7b-v1 weights from {args.weights}"
    if args.tiny:
        model = load_model(write_tiny(Path(tempfile.mkdtemp(prefix="notus-tiny-"))), args.device)
        return model, f"tiny random notus (scripts/random_checkpoint.py), {model.dtype}"
    config = AutoConfig.from_pretrained(REPO / "weights")
    dtype = pick_dtype(args.device)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), f"random-weight notus-7b-v1 (weights/config.json), {dtype}"


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every weight once, except the embedding table (only gathered)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - embedding.numel() * embedding.element_size()


def copy_bandwidth(device: str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), the practical ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds_per_call(lambda: dst.copy_(src), device, reps)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


class _TimedStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also notes when each generated token reached it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True
        super().put(value)


def run_baseline(engine: Engine, ids: list[int], new_tokens: int) -> dict:
    """Plain generate in a new thread, text through TextIteratorStreamer, as Cog's examples do."""
    model, device = engine.model, engine.device
    streamer = _TimedStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    config = engine.generation_config(SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0))
    inputs = torch.tensor([ids], device=device)
    t0 = time.perf_counter()
    worker = threading.Thread(target=model.generate, kwargs=dict(
        inputs=inputs, attention_mask=torch.ones_like(inputs), generation_config=config, streamer=streamer))
    worker.start()
    text = "".join(streamer)
    end = time.perf_counter()
    worker.join()
    times = streamer.token_times
    return _timing(t0, times[0], end, len(times), text)


async def joined(pieces) -> str:
    return "".join([piece async for piece in pieces])


def run_project(engine: Engine, ids: list[int], new_tokens: int) -> dict:
    """The path Predictor.predict runs: Engine.stream_ids, on an event loop as in Cog's worker."""
    stats = GenerationStats()
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, seed=0)
    text = asyncio.run(joined(engine.stream_ids(ids, params, stats)))
    end = time.perf_counter()
    first = stats._start + stats.time_to_first_token
    return _timing(stats._start, first, end, stats.output_token_count, text)


def _timing(start: float, first: float, end: float, tokens: int, text: str) -> dict:
    return {
        "time_to_first_token_s": first - start,
        "decode_tokens_per_s": (tokens - 1) / (end - first) if end > first else None,
        "tokens": tokens,
        "text_chars": len(text),
    }


def measure(name, run, engine, ids, args) -> dict:
    device = engine.device.type
    reset_peak(device)
    # Both paths share one process: the weights, and the project's cache, are allocated before
    # either runs. The peak above this is what the path itself needs.
    allocated_before = torch.cuda.memory_allocated() if device == "cuda" else None
    run(engine, ids, args.new_tokens)  # warm-up
    runs = [run(engine, ids, args.new_tokens) for _ in range(args.reps)]
    assert all(r["tokens"] == args.new_tokens for r in runs), f"{name}: token count differs from --new-tokens"
    return {
        "time_to_first_token_s": statistics.median(r["time_to_first_token_s"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "peak_memory_bytes": peak_memory(device),
        "peak_memory_above_start_bytes": peak_memory(device) - allocated_before if device == "cuda" else None,
        "runs": runs,
    }


def bare_step_seconds(engine: Engine, prompt_length: int, steps: int) -> float:
    """Seconds per bare decode step of one sequence (the CUDA graph on the GPU; no sampling read-back)."""
    scheduler = engine.scheduler
    filled = min(prompt_length + steps, scheduler.window)
    length = scheduler._bucket(scheduler.length_buckets, filled)

    def measure() -> float:
        graph = scheduler.graphs.get((1, length))
        step = graph.replay if graph is not None else lambda: scheduler.forward.decode(
            scheduler.tokens[:1], scheduler.positions[:1], scheduler.write_slots[:1], scheduler.used[:1],
            length if scheduler.cuda_graphs else [filled])
        return seconds_per_call(step, engine.device, steps)

    return scheduler.call(measure)


def run_facts(device: str) -> dict:
    """What every result file records of its run: the device, the host's CPU, the versions, the
    machine, the command."""
    host_cpu = cpu_description()
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else host_cpu,
        "host_cpu": host_cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.node(),
        "command": " ".join(["python", f"scripts/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
    }


def cpu_description() -> str:
    """The host CPU as figures depend on it: its model, the vector kernels torch picks on it, its
    cores (the development machine's CPU changes from day to day: AVX2 on some, AVX-512 on others)."""
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()} kernels, {os.cpu_count()} cores"


def write_report(out: Path, name: str, report: dict) -> Path:
    """`report` as out/NAME-<date>-<time>.json."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def random_prompt(engine: Engine, length: int, generator: torch.Generator) -> list[int]:
    """BOS, then ordinary vocabulary: the same kind of ids for every path."""
    return [engine.prompt.bos_id] + torch.randint(1000, 31000, (length - 1,), generator=generator).tolist()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    at = (len(ordered) - 1) * q
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def run_streams(engine: Engine, prompts: list[list[int]], streams: int, new_tokens: int) -> dict:
    """Every prompt, `streams` of them in flight at a time, as concurrent predictions on the one
    event loop of Cog's worker (each stream starts the next prompt as soon as its last one ends)."""
    def params_of(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.7, top_p=0.95, top_k=50, seed=i)

    before = dict(engine.scheduler.kv_entries)
    start, done = stream_all(engine, prompts, params_of, limit=streams)
    end = max(t for _, t in done)
    kv = {k: engine.scheduler.kv_entries[k] - before[k] for k in before}
    per_entry = engine.scheduler.cache.bytes_per_entry
    tokens = sum(stats.output_token_count for stats, _ in done)
    assert tokens == new_tokens * len(prompts), "a stream ended early"
    ttfts = [stats.time_to_first_token for stats, _ in done]
    per_stream = [stats.tokens_per_second for stats, _ in done]
    return {
        "streams": streams,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens_each": new_tokens,
        "wall_seconds": end - start,
        "aggregate_tokens_per_second": tokens / (end - start),
        "per_stream_tokens_per_second_median": statistics.median(per_stream),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        # Decode attention's K/V: bytes read per step against the bytes live (each row's own entries).
        "kv_read_bytes_per_step": kv["read"] * per_entry / kv["steps"],
        "kv_live_bytes_per_step": kv["live"] * per_entry / kv["steps"],
        "kv_read_over_live": kv["read"] / kv["live"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--streams", type=int, nargs="*", default=[], help="concurrent requests to measure, e.g. 1 8 32")
    parser.add_argument("--no-graphs", action="store_true", help="the project path without CUDA graphs")
    parser.add_argument("--conversation", action="store_true",
                        help="only the KV-cache reuse workloads (scripts/reuse_benchmark.py), with and without reuse")
    parser.add_argument("--versus-transformers", type=int, nargs="+", metavar="N",
                        help="only N greedy streams through the engine, model.generate and model.generate_batch, "
                             "e.g. 1 8 32 (scripts/versus_transformers.py)")
    parser.add_argument("--burst", type=int, nargs="+", metavar="N",
                        help="only N prompts at once with packed prefill and without, e.g. 8 32 (scripts/burst_benchmark.py)")
    parser.add_argument("--burst-prompt", type=int, default=128, metavar="TOKENS", help="each burst prompt's length")
    parser.add_argument("--step-parts", type=int, nargs="+", metavar="N",
                        help="only where a step's time goes with N rows, each part alone, e.g. 1 8 32 (scripts/step_parts.py)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, description = build_model(args)
    tokenizer, template = load_tokenizer(tokenizer_dir(args.weights))
    if args.conversation:
        return conversation_mode(model, ChatPrompt(tokenizer, template), description, args)
    # KV-cache reuse off: these modes repeat their prompts (a warm-up, then each repetition), which
    # reuse would skip and the baselines prefill; what reuse saves is --conversation's measure.
    engine = Engine(model, ChatPrompt(tokenizer, template),
                    slots=max([DEFAULT_SLOTS, *args.streams, *(args.versus_transformers or []), *(args.burst or []),
                              *(args.step_parts or [])]),
                    cuda_graphs=False if args.no_graphs else None, reuse=False)
    engine.warm_up()
    if args.versus_transformers:
        return versus_mode(engine, description, args)
    if args.burst:
        return burst_mode(engine, description, args)
    if args.step_parts:
        return step_parts_mode(engine, description, args)
    setup_seconds = time.perf_counter() - t0

    device = engine.device.type
    bytes_per_token = weight_bytes_per_token(model)
    bandwidth = copy_bandwidth(device)
    generator = torch.Generator().manual_seed(0)
    results = []
    for length in args.prompt_lengths:
        ids = random_prompt(engine, length, generator)
        row = {"prompt_tokens": length}
        for name, run in (("baseline", run_baseline), ("project", run_project)):
            row[name] = measure(name, run, engine, ids, args)
            row[name]["bandwidth_share"] = bytes_per_token * row[name]["decode_tokens_per_s"] / bandwidth
        raw = bare_step_seconds(engine, length, args.new_tokens)
        row["raw_model_step"] = {"seconds": raw, "tokens_per_s": 1 / raw, "bandwidth_share": bytes_per_token / raw / bandwidth}
        # What streaming, sampling and the hand-over add per token on top of the bare step.
        row["project_overhead_per_token_s"] = 1 / row["project"]["decode_tokens_per_s"] - raw
        row["project_over_baseline_decode"] = row["project"]["decode_tokens_per_s"] / row["baseline"]["decode_tokens_per_s"]
        row["baseline_over_project_ttft"] = row["baseline"]["time_to_first_token_s"] / row["project"]["time_to_first_token_s"]
        results.append(row)

    streams = []
    for n in args.streams:
        # The same mix of prompt lengths for every N, at least one of each: 1 stream serves the
        # mix one request after another, so each ratio measures batching, not a lighter workload.
        count = max(n, len(args.prompt_lengths))
        prompts = [random_prompt(engine, args.prompt_lengths[i % len(args.prompt_lengths)], generator)
                   for i in range(count)]
        run_streams(engine, prompts, n, 8)  # warm-up: the same batch shapes, briefly
        streams.append(run_streams(engine, prompts, n, args.new_tokens))
        streams[-1]["aggregate_over_first"] = streams[-1]["aggregate_tokens_per_second"] / streams[0]["aggregate_tokens_per_second"]

    report = {
        "model": description,
        **run_facts(device),
        "cuda_graphs": len(engine.scheduler.graphs),
        "torch_threads": torch.get_num_threads(),
        "kv_cache_reuse": engine.scheduler.prefixes is not None,
        "slots": engine.scheduler.slots,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "weight_bytes_per_token": bytes_per_token,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "setup_seconds": setup_seconds,
        "decode_step_ops": decode_step_ops(engine.scheduler),
        "results": results,
        "streams": streams,
    }
    path = write_report(args.out, f"decode-{device}", report)
    print(markdown_table(report))
    print(f"wrote {path}")


def conversation_mode(model, prompt: ChatPrompt, description: str, args) -> None:
    def random_ids_for(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return lambda n: torch.randint(1000, 31000, (n,), generator=generator).tolist()

    report = {"model": description, **run_facts(str(model.device.type)), "reps": args.reps,
              **conversation_report(model, prompt, DEFAULT_SLOTS, args.reps, random_ids_for)}
    path = write_report(args.out, f"conversation-{model.device.type}", report)
    print(f"{description} on {report['device']} (torch {report['torch']}): KV-cache reuse, median of {args.reps}")
    print(conversation_table(report))
    print(f"wrote {path}")


def versus_mode(engine: Engine, description: str, args) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = [versus_row(engine, [random_prompt(engine, args.prompt_lengths[0], generator) for _ in range(n)],
                       args.new_tokens, args.reps) for n in args.versus_transformers]
    device = engine.device.type
    report = {"model": description, **run_facts(device), "cuda_graphs": len(engine.scheduler.graphs),
              "slots": engine.scheduler.slots, "kv_cache_reuse": engine.scheduler.prefixes is not None,
              "reps": args.reps, "versus_transformers": rows}
    path = write_report(args.out, f"versus-transformers-{device}", report)
    print(versus_table(report))
    print(f"wrote {path}")


def burst_mode(engine: Engine, description: str, args) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = [burst_row(engine, n, args.burst_prompt, args.reps, lambda length: random_prompt(engine, length, generator))
            for n in args.burst]
    device = engine.device.type
    report = {"model": description, **run_facts(device), "cuda_graphs": len(engine.scheduler.graphs),
              "slots": engine.scheduler.slots, "reps": args.reps, "burst": rows}
    path = write_report(args.out, f"burst-{device}", report)
    print(burst_table(report))
    print(f"wrote {path}")


def step_parts_mode(engine: Engine, description: str, args) -> None:
    device = engine.device.type
    report = {"model": description, **run_facts(device), "torch_threads": torch.get_num_threads(), "reps": args.reps,
              "step_parts": step_parts_report(engine, args.step_parts, args.prompt_lengths[0], args.new_tokens, args.reps)}
    path = write_report(args.out, f"step-parts-{device}", report)
    print(step_parts_table(report))
    print(f"wrote {path}")


def markdown_table(report: dict) -> str:
    lines = [
        f"{report['model']} on {report['device']} (torch {report['torch']}, transformers {report['transformers']}, "
        f"{report['cuda_graphs']} CUDA graphs); copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; "
        f"{report['new_tokens']} new tokens, median of {report['reps']}",
        "",
        "| prompt | path | time to first token | decode tok/s | bandwidth share | peak memory (above start) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        for name in ("baseline", "project"):
            r = row[name]
            memory = (f"{r['peak_memory_bytes'] / 2**30:.1f} GiB ({r['peak_memory_above_start_bytes'] / 2**30:.2f})"
                      if r["peak_memory_bytes"] else "n/a")
            lines.append(f"| {row['prompt_tokens']} | {name} | {r['time_to_first_token_s'] * 1000:.1f} ms | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['bandwidth_share']:.0%} | {memory} |")
        raw = row["raw_model_step"]
        lines.append(f"| {row['prompt_tokens']} | bare model step | | {raw['tokens_per_s']:.1f} | "
                     f"{raw['bandwidth_share']:.0%} | |")
        lines.append(f"| {row['prompt_tokens']} | **ratio** | baseline / project = "
                     f"{row['baseline_over_project_ttft']:.2f} | project / baseline = "
                     f"{row['project_over_baseline_decode']:.2f} | | |")
    ops = report["decode_step_ops"]
    lines += ["", f"A decode step launches {ops['total']} operations: {ops['per_layer']} per layer, "
                  f"{ops['outside']} outside the layers (scripts/op_count.py)."]
    if report["streams"]:
        lines += ["", "| streams | prompts | aggregate tok/s | x first | per-stream tok/s (median) | TTFT p50 | TTFT p95 "
                      "| K/V read per step (x live) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["streams"]:
            lines.append(f"| {r['streams']} | {len(r['prompt_tokens'])} | {r['aggregate_tokens_per_second']:.1f} | "
                         f"{r['aggregate_over_first']:.2f} | "
                         f"{r['per_stream_tokens_per_second_median']:.1f} | {r['ttft_p50_s'] * 1000:.1f} ms | "
                         f"{r['ttft_p95_s'] * 1000:.1f} ms | {r['kv_read_bytes_per_step'] / 2**20:.1f} MiB "
                         f"({r['kv_read_over_live']:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
