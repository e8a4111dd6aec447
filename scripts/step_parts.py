"""The step-parts mode of scripts/benchmark.py (`--step-parts N [N ...]`): where the engine's time goes
with N rows, each part timed alone on the engine thread, and how well each part batches.

For each N, eagerly (no CUDA graph, no request, no streaming), the decode step the CPU runs for N
greedy rows of one length, each reading the ring entries of the middle of the reply (the prompt's
length plus half of --new-tokens):
  step     Scheduler._step: the whole decode step (the forward, the sampler, the positions' update);
  layers   Forward.decode less its logits: embedding, rotary, every layer;
  logits   Forward.logits: the final norm and the vocabulary projection, in the layout the step asks for;
  sampler  Sampler.sample: the greedy pass over the logits, with the hold on EOS;
  other    the step less the three: what running them together costs beyond running each alone;
and the prefill of N prompts of --prompt-lengths' first length, in the forwards the scheduler plans
and runs for them (notus/prefill_plan.py, Scheduler._forward), per prompt token. (A served run of
32 prompts of 128 tokens prefills in two forwards, so its two halves sit one position apart and its
steps take one masked attention call instead of the unmasked one timed here: about the same cost.)

Each part's scaling is N x part(1) / part(N): how many times more work N rows get done in the time,
N for a part that costs the same for N rows as for one. A step's scaling is a mean of its parts'
(weighted by their time with N rows), so it stays below its best part's: a part that scales below
a target and weighs much in the step bounds the step (issue 21's 32 streams at 10x one stream:
docs/benchmarks.md). The vocabulary projection's rate (FLOP/s) is reported beside a square matrix
product's (1,024 on the CPU, 4,096 on a GPU) on the same device, dtype and threads, through the
kernel the projection uses (oneDNN on the CPU in float32). The parts of all the N are timed in turns
within each repetition (medians), so the machine's drift touches every N alike.

    python scripts/benchmark.py --tiny --step-parts 1 8 32 --prompt-lengths 128 --new-tokens 64 --reps 5
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from notus.engine import Engine
from notus.prefill_plan import plan_chunks
from notus.request import Request
from timing import seconds_per_call

PARTS = ("step", "layers", "logits", "sampler", "other")


def _decode_parts(engine: Engine, rows: int, entries: int, calls: int) -> dict[str, float]:
    """One timing of each decode part for `rows` rows reading `entries` ring entries each (engine
    thread, no request in flight). No row is active: every write goes to the scratch slot. The rows'
    tokens, positions and entries read (the variable-length kernel's, on the GPU) are put back after."""
    scheduler, forward = engine.scheduler, engine.scheduler.forward
    lengths = [entries] * rows
    kept = [state[:rows].clone() for state in (scheduler.tokens, scheduler.positions, scheduler.used)]
    positions = scheduler.positions[:rows].fill_(entries - 1)
    scheduler.used[:rows].fill_(entries)
    args = (scheduler.tokens[:rows], positions, scheduler.write_slots[:rows], scheduler.used[:rows], lengths)
    hidden = torch.randn(rows, engine.model.config.hidden_size, device=engine.device, dtype=engine.model.dtype)
    logits = forward.decode(*args, column_major=True)
    times = {
        "step": seconds_per_call(lambda: scheduler._step(rows, lengths, candidates=1, penalties=False), engine.device, calls),
        "decode": seconds_per_call(lambda: forward.decode(*args, column_major=True), engine.device, calls),
        "logits": seconds_per_call(lambda: forward.logits(hidden, column_major=True), engine.device, calls),
        "sampler": seconds_per_call(lambda: scheduler.sampler.sample(logits, slice(0, rows), positions, 1, False),
                                    engine.device, calls),
    }
    for state, values in zip((scheduler.tokens, scheduler.positions, scheduler.used), kept):
        state[:rows].copy_(values)
    times["layers"] = times.pop("decode") - times["logits"]
    times["other"] = times["step"] - times["layers"] - times["logits"] - times["sampler"]
    return times


def _prefill_per_token(engine: Engine, prompts: int, length: int, generator: torch.Generator) -> tuple[float, int]:
    """(seconds per prompt token, forwards) to prefill `prompts` prompts of `length` tokens in slots
    0..prompts-1, planned and run as the scheduler does (plan_chunks, then Scheduler._forward for each
    turn's chunks), no decoding between (engine thread). It writes those slots' rings, which no
    request holds."""
    scheduler = engine.scheduler
    requests = [Request(input_ids=torch.randint(1000, 31000, (length,), generator=generator).tolist(), max_tokens=1,
                        wake=lambda: None, slot=slot) for slot in range(prompts)]
    forwards = 0

    def prefill_all() -> None:
        nonlocal forwards
        forwards = 0
        for request in requests:
            request.prefilled = request.passed = 0
        left = list(requests)
        while left:
            chunks = plan_chunks(left, scheduler.window, scheduler.pack)
            scheduler._forward(chunks)
            forwards += 1
            for request, n in chunks:
                request.prefilled += n
            left = [r for r in left if r.prefilled < len(r.input_ids)]

    return seconds_per_call(prefill_all, engine.device, 2) / (prompts * length), forwards


def square_matmul(engine: Engine) -> tuple[int, Callable[[], object]]:
    """(size, a call) of a size x size matrix product in the model's dtype on its device, through the
    kernel the vocabulary projection uses (oneDNN's, its weight packed, on the CPU in float32:
    notus/forward.py's _packed_lm_head). 4,096 on a GPU, where a smaller one is bound by its launch."""
    size = 4096 if engine.device.type == "cuda" else 1024
    a = torch.randn(size, size, device=engine.device, dtype=engine.model.dtype)
    if engine.scheduler.forward.packed_lm_head is not None:
        packed = torch.ops.mkldnn._reorder_linear_weight(a, size)
        return size, lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    return size, lambda: a @ a


def step_parts_report(engine: Engine, rows: list[int], prompt_tokens: int, new_tokens: int, reps: int) -> list[dict]:
    """Per N in `rows`: each part's median seconds, its share of the step and its scaling (see the
    module's docstring). The engine must be idle, without KV-cache reuse (the prefill writes slots)."""
    scheduler = engine.scheduler
    if rows[0] != 1 or max(rows) > scheduler.slots:
        raise ValueError(f"step parts need rows starting at 1 and at most the engine's {scheduler.slots} slots, got {rows}")
    if prompt_tokens < 1:
        raise ValueError(f"step parts need prompts of at least 1 token, got {prompt_tokens}")
    if scheduler.prefixes is not None or scheduler.call(scheduler._busy):
        raise ValueError("step parts need an idle engine without KV-cache reuse")
    entries = min(prompt_tokens + new_tokens // 2, scheduler.window)
    generator = torch.Generator().manual_seed(0)
    calls = 20 if engine.device.type == "cuda" else 50
    size, matmul = square_matmul(engine)
    timings, matmul_seconds, forwards = {n: [] for n in rows}, [], {}
    for _ in range(reps):
        for n in rows:
            parts = scheduler.call(lambda n=n: _decode_parts(engine, n, entries, calls))
            parts["prefill_per_token"], forwards[n] = scheduler.call(
                lambda n=n: _prefill_per_token(engine, n, prompt_tokens, generator))
            timings[n].append(parts)
        matmul_seconds.append(scheduler.call(lambda: seconds_per_call(matmul, engine.device, 10)))
    medians = {n: {k: statistics.median(t[k] for t in timings[n]) for k in timings[n][0]} for n in rows}
    one = medians[1]
    config = engine.model.config
    reference = 2 * size**3 / statistics.median(matmul_seconds)
    return [{
        "rows": n,
        "seconds": medians[n],
        "share_of_step": {k: medians[n][k] / medians[n]["step"] for k in PARTS[1:]},
        # N x part(1) / part(N); the prefill's per token, so part(1) / part(N).
        "scaling": {**{k: n * one[k] / medians[n][k] for k in PARTS},
                    "prefill_per_token": one["prefill_per_token"] / medians[n]["prefill_per_token"]},
        "logits_flops_per_s": 2 * n * config.hidden_size * config.vocab_size / medians[n]["logits"],
        "matmul_size": size,
        "matmul_flops_per_s": reference,
        "prefill_forwards": forwards[n],
        "entries_read_per_row": entries,
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
        f"| rows | step | layers | logits | sampler | other | prefill per token | logits GFLOP/s (of a "
        f"{rows[0]['matmul_size']:,}-square matmul's) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, share, scaling = row["seconds"], row["share_of_step"], row["scaling"]
        parts = " | ".join(f"{s[k] * 1e3:.3f} ms ({share[k]:.0%}), {scaling[k]:.2f}x" for k in PARTS[1:])
        lines.append(f"| {row['rows']} | {s['step'] * 1e3:.3f} ms, {scaling['step']:.2f}x | {parts} | "
                     f"{s['prefill_per_token'] * 1e6:.1f} us, {scaling['prefill_per_token']:.2f}x | "
                     f"{row['logits_flops_per_s'] / 1e9:.0f} ({row['logits_flops_per_s'] / row['matmul_flops_per_s']:.0%}) |")
    return "\n".join(lines)
