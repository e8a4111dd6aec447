"""The step-parts mode of scripts/benchmark.py (`--step-parts N [N ...]`): where the engine's time goes
with N rows, each part timed alone on the engine thread, and how well each part batches.

For each N, eagerly (no CUDA graph, no request, no streaming), the step the CPU runs for N greedy
rows of one length, as issue 21's comparison (`--versus-transformers`) runs them:
  step     Scheduler._step: the whole decode step (the forward, the sampler, the positions' update);
  layers   Forward.decode less its logits: embedding, rotary, every layer;
  logits   Forward.logits: the final norm and the vocabulary projection, in the layout the step asks for;
  sampler  Sampler.sample: the greedy pass over the logits, with the hold on EOS;
and the prefill of N prompts of --prompt-lengths' first length, in forwards of at most CHUNK tokens
(as the scheduler packs them), per prompt token.

Each part's scaling is N x part(1) / part(N): how many times more work N rows get done in the time,
N for a part that costs the same for N rows as for one. A step's scaling is a mean of its parts'
(weighted by their time with N rows), so it stays below its best part's: a part that scales below
a target and weighs much in the step bounds the step (issue 21's 32 streams at 10x one stream:
docs/benchmarks.md). A served run adds what changes little with N (the engine's turn, handing
tokens out), which lifts its ratio, and the prefill, which lowers it.

The vocabulary projection's rate (FLOP/s) is reported beside a 1,024-square matrix product's on the
same device, in the same dtype and threads, through the kernel the projection uses (oneDNN on the
CPU in float32; torch's default CPU matmul, MKL's, reached about half of oneDNN's rate on the
development machine's AMD CPU): how near the projection runs to what the device's matrix kernels
reach. The parts of all the N are timed in turns within each repetition (medians), so the
machine's drift touches every N alike.

    python scripts/benchmark.py --tiny --step-parts 1 8 32 --prompt-lengths 128 --reps 5
"""

from __future__ import annotations

import statistics
import time
from math import ceil

import torch

from notus.engine import Engine
from notus.forward import Segment
from notus.prefill_plan import CHUNK

PARTS = ("step", "layers", "logits", "sampler")
ENTRIES = 160  # the ring entries each row reads: the middle of a 128-token prompt's 64 new tokens


def _seconds(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of `fn`, over `calls` calls after one unmeasured."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def _decode_parts(engine: Engine, rows: int, calls: int) -> dict[str, float]:
    """One timing of each decode part for `rows` rows reading ENTRIES entries each (engine thread).
    No row is active: every write goes to the scratch slot, and the positions do not move. The rows'
    positions and entries read (the variable-length kernel's, on the GPU) are put back after."""
    scheduler, forward = engine.scheduler, engine.scheduler.forward
    lengths = [ENTRIES] * rows
    saved = scheduler.positions[:rows].clone(), scheduler.used[:rows].clone()
    positions = scheduler.positions[:rows].fill_(ENTRIES - 1)
    scheduler.used[:rows].fill_(ENTRIES)
    args = (scheduler.tokens[:rows], positions, scheduler.write_slots[:rows], scheduler.used[:rows], lengths)
    hidden = torch.randn(rows, engine.model.config.hidden_size, device=engine.device, dtype=engine.model.dtype)
    logits = forward.decode(*args, column_major=True)
    times = {
        "step": _seconds(lambda: scheduler._step(rows, lengths, candidates=1, penalties=False), engine.device, calls),
        "decode": _seconds(lambda: forward.decode(*args, column_major=True), engine.device, calls),
        "logits": _seconds(lambda: forward.logits(hidden, column_major=True), engine.device, calls),
        "sampler": _seconds(lambda: scheduler.sampler.sample(logits, slice(0, rows), positions, 1, False),
                            engine.device, calls),
    }
    positions.copy_(saved[0])
    scheduler.used[:rows].copy_(saved[1])
    times["layers"] = times.pop("decode") - times["logits"]
    return times


def _prefill_per_token(engine: Engine, prompts: int, length: int, generator: torch.Generator) -> float:
    """Seconds per prompt token to prefill `prompts` prompts of `length` tokens, packed in forwards of
    at most CHUNK tokens as the scheduler packs them (engine thread; slots without a request)."""
    per_forward = max(1, CHUNK // length)
    segments = [Segment(slot, torch.randint(1000, 31000, (length,), generator=generator).to(engine.device), 0)
                for slot in range(prompts)]
    groups = [segments[i : i + per_forward] for i in range(0, prompts, per_forward)]
    return _seconds(lambda: [engine.scheduler.forward.prefill(group) for group in groups], engine.device, 2) / (prompts * length)


def matmul_flops_per_s(engine: Engine, size: int = 1024) -> float:
    """FLOP/s of a size x size matrix product in the model's dtype on its device (engine thread), through
    the kernel the vocabulary projection uses (oneDNN's on the CPU in float32: notus/forward.py's
    _packed_lm_head)."""
    a = torch.randn(size, size, device=engine.device, dtype=engine.model.dtype)
    if engine.scheduler.forward.packed_lm_head is not None:
        product = lambda: torch.ops.mkldnn._linear_pointwise(a, a, None, "none", [], "")  # noqa: E731
    else:
        product = lambda: a @ a  # noqa: E731
    return 2 * size**3 / engine.scheduler.call(lambda: _seconds(product, engine.device, 10))


def step_parts_report(engine: Engine, rows: list[int], prompt_tokens: int, reps: int) -> list[dict]:
    """Per N in `rows`: each part's median seconds, its share of the step and its scaling (see the
    module's docstring). `rows` must start with 1."""
    if rows[0] != 1 or max(rows) > engine.scheduler.slots or engine.scheduler.prefixes is not None:
        raise ValueError("step parts need rows starting at 1, at most the engine's slots, and no KV-cache reuse")
    generator = torch.Generator().manual_seed(0)
    calls = 20 if engine.device.type == "cuda" else 50
    timings = {n: [] for n in rows}
    for _ in range(reps):
        for n in rows:
            parts = engine.scheduler.call(lambda n=n: _decode_parts(engine, n, calls))
            parts["prefill_per_token"] = engine.scheduler.call(lambda n=n: _prefill_per_token(engine, n, prompt_tokens, generator))
            timings[n].append(parts)
    medians = {n: {k: statistics.median(t[k] for t in timings[n]) for k in timings[n][0]} for n in rows}
    one = medians[1]
    config = engine.model.config
    reference = matmul_flops_per_s(engine)
    return [{
        "rows": n,
        "seconds": medians[n],
        "share_of_step": {k: medians[n][k] / medians[n]["step"] for k in PARTS[1:]},
        # N x part(1) / part(N); the prefill's per token, so part(1) / part(N).
        "scaling": {**{k: n * one[k] / medians[n][k] for k in PARTS},
                    "prefill_per_token": one["prefill_per_token"] / medians[n]["prefill_per_token"]},
        "logits_flops_per_s": 2 * n * config.hidden_size * config.vocab_size / medians[n]["logits"],
        "matmul_flops_per_s": reference,
        "prefill_forwards": ceil(n / max(1, CHUNK // prompt_tokens)),
        "entries_read_per_row": ENTRIES,
        "prompt_tokens": prompt_tokens,
    } for n in rows]


def step_parts_table(report: dict) -> str:
    rows = report["step_parts"]
    lines = [
        f"{report['model']} on {report['device']} (torch {report['torch']}): one greedy decode step of N rows "
        f"({rows[0]['entries_read_per_row']} entries each), each part alone, eager; prefill of N prompts of "
        f"{rows[0]['prompt_tokens']} tokens; medians of {report['reps']}",
        "",
        "Each cell: the part's time (its share of the step) and its scaling, N x part(1) / part(N) "
        "(per token for the prefill).",
        "",
        "| rows | step | layers | logits | sampler | prefill per token | logits GFLOP/s (of a 1,024-square matmul's) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, share, scaling = row["seconds"], row["share_of_step"], row["scaling"]
        parts = " | ".join(f"{s[k] * 1e3:.3f} ms ({share[k]:.0%}), {scaling[k]:.2f}x" for k in PARTS[1:])
        lines.append(f"| {row['rows']} | {s['step'] * 1e3:.3f} ms, {scaling['step']:.2f}x | {parts} | "
                     f"{s['prefill_per_token'] * 1e6:.1f} us, {scaling['prefill_per_token']:.2f}x | "
                     f"{row['logits_flops_per_s'] / 1e9:.0f} ({row['logits_flops_per_s'] / row['matmul_flops_per_s']:.0%}) |")
    return "\n".join(lines)
