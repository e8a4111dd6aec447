"""How many predictions run at once, and the memory their KV cache takes.

Cog admits COG_MAX_CONCURRENCY predictions at once: predict.py's `@cog.concurrent(max=N)`, which
`cog build` bakes into the image (a value set at run time wins). The engine gives each admitted
prediction a KV-cache slot, so all of them decode in the same step. A slot holds notus's whole
4,096-token sliding window (notus/forward.py's ring), whatever the prompt's length:
32 layers x 8 KV heads x 128 x 4,096 positions x (K and V) x 2 bytes = 512 MiB in bf16.

The default, worked out for the A40 (48 GB) Replicate runs this on:
  46,068 MiB (what CUDA reports) - 0.5 GiB CUDA context - 13.5 GiB of bf16 weights
  - RESERVE (4 GiB: a 2,048-token prefill chunk's activations, the CUDA graphs, allocator slack)
  = 26.9995 GiB (the weights are 13.49 GiB): room for 53 slots, one of them the cache's scratch slot
  (notus/forward.py): 52.
N = 32 of them (16.5 GiB with the scratch slot): more streams add aggregate throughput but each step
also reads every stream's cache, so each stream slows down; at 32 streams of 1,000 tokens an A40 step reads about
18.8 GB (14.5 weights + 4.3 cache) against 14.5 for one stream, each stream keeping ~3/4 of its
solo speed, and the 10.5 GiB left over keeps long prompts safe. Replicate's cog-vllm also admits 32.

If fewer slots fit than Cog admits (a smaller GPU, or COG_MAX_CONCURRENCY raised), the engine
takes what fits and the other predictions wait in order for a free slot: slower, never refused.
"""

from __future__ import annotations

import logging
import math
import os

import torch

log = logging.getLogger("notus")

DEFAULT_CONCURRENCY = 32  # predict.py's @cog.concurrent(max=...) literal must say the same (tested)
A40_MEMORY = 46_068 * 2**20  # bytes, as torch.cuda.mem_get_info / nvidia-smi report an A40
CUDA_CONTEXT = 2**29  # the CUDA context and cuBLAS's handles: outside torch's allocator
RESERVE = 4 * 2**30  # kept free beside the weights and the cache (see above)
KV_BUDGET_ENV = "NOTUS_KV_CACHE_GIB"  # overrides the budget: a GPU shared with others, or tests


def admitted_predictions() -> int:
    """Predictions Cog runs at once: COG_MAX_CONCURRENCY, read as coglet reads it (missing or invalid: 1)."""
    value = os.environ.get("COG_MAX_CONCURRENCY", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def budget_from_free(free_bytes: int) -> int:
    """What the KV cache may take of the memory left after the weights: all but RESERVE."""
    return max(0, free_bytes - RESERVE)


def kv_budget_bytes(device: torch.device) -> int | None:
    """Bytes the KV cache may take: NOTUS_KV_CACHE_GIB, else what the GPU has free less RESERVE; None: no limit."""
    value = os.environ.get(KV_BUDGET_ENV)
    if value:
        try:
            gib = float(value)
        except ValueError:
            gib = math.nan
        if not 0 <= gib < 2**20:  # NaN and inf too
            raise ValueError(f"{KV_BUDGET_ENV}={value!r} is not a number of GiB (0 to 1,048,576)")
        return int(gib * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return budget_from_free(free)
    return None  # host memory: the tiny test model's slots are 2 MiB each


def plan_slots(admitted: int, per_slot: int, budget: int | None) -> int:
    """KV-cache slots for `admitted` predictions at once: one each, or as many as `budget` holds beside
    the scratch slot the cache also allocates (padding rows of a batch bucket write there). Logs the plan."""
    fit = admitted if budget is None else budget // per_slot - 1
    if fit < 1:
        raise RuntimeError(
            f"no room for even one KV-cache slot and the scratch slot ({per_slot / 2**20:,.0f} MiB each): "
            f"{budget / 2**30:.2f} GiB "
            f"available for it. Free GPU memory, or set {KV_BUDGET_ENV} to what may be used."
        )
    slots = min(admitted, fit)
    room = "" if budget is None else f"; {budget / 2**30:.1f} GiB available, room for {fit}"
    log.info("%d predictions at once (COG_MAX_CONCURRENCY=%d): %d KV-cache slots of %.0f MiB, %.2f GiB reserved%s",
             admitted, admitted, slots, per_slot / 2**20, (slots + 1) * per_slot / 2**30, room)
    if slots < admitted:
        log.warning("only %d of %d admitted predictions fit the KV cache: the others wait in order for a free slot",
                    slots, admitted)
    return slots
