"""Loading notus's weights from disk onto the GPU fast, without a full copy in host memory.

Two phases, each logged with its seconds:
1. read: every shard sequentially, in large reads, into the page cache. This is the disk's best
   case (one pass, no random page faults) and the only phase that waits on the disk.
2. move: from_pretrained with device_map maps the (now cached) shards and copies each tensor to the
   device as it goes; only the few tensors in flight exist in host memory at once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

log = logging.getLogger("notus")

READ_CHUNK = 64 * 1024 * 1024
# The one switch for running without a GPU (float32, far too slow for the real model): cpu or cuda.
DEVICE_ENV = "NOTUS_DEVICE"
# The weights' dtype, when not the device's default (bf16 on the GPU, float32 on the CPU). float32 on
# a GPU is for exact comparisons (the tests on a GPU): bf16 rounding flips a random model's near ties.
DTYPE_ENV = "NOTUS_DTYPE"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(device: str | None = None) -> str:
    """`device`, else $NOTUS_DEVICE, else CUDA, which must then work.

    A GPU image whose CUDA is unusable (no device, a host driver too old for the build) fails here
    with torch's own reason, instead of loading 29 GB of float32 weights onto the CPU and serving
    at CPU speed.
    """
    device = device or os.environ.get(DEVICE_ENV) or "cuda"
    if device == "cpu":
        log.warning("Running on the CPU in float32 (%s=cpu): fine for trying the API and for tests, "
                    "far too slow for the real model.", DEVICE_ENV)
        return device
    if not device.startswith("cuda"):
        raise ValueError(f"{DEVICE_ENV} must be cuda or cpu, got {device!r}")
    try:
        torch.cuda.init()  # raises with the reason (no driver, driver too old, no device, CPU-only build)
        reason = None if torch.cuda.device_count() else "no CUDA device is visible"
    except Exception as e:  # torch raises AssertionError for a CPU-only build, RuntimeError otherwise
        reason = str(e).strip() or type(e).__name__
    if reason:
        raise RuntimeError(
            f"No usable CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) reports: "
            f"{reason}. notus-7b-v1 needs an NVIDIA GPU with a driver recent enough for that CUDA version. "
            f"To run on the CPU anyway (float32, very slow), set {DEVICE_ENV}=cpu."
        )
    return device


def pick_dtype(device: str) -> torch.dtype:
    """$NOTUS_DTYPE, else bf16 on the GPU and float32 on the CPU."""
    name = os.environ.get(DTYPE_ENV) or ("bfloat16" if device.startswith("cuda") else "float32")
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def read_into_page_cache(files: list[Path]) -> float:
    """Reads `files` once, sequentially; returns the seconds it took."""
    buffer = bytearray(READ_CHUNK)  # one reused buffer: the bytes stay in the page cache, not here
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while f.readinto(buffer):
                pass
    return time.perf_counter() - t0


def load_model(weights_dir: str | Path, device: str | None = None, phases: dict | None = None):
    """notus's weights on `device`: bf16 on the GPU, float32 on the CPU (or $NOTUS_DTYPE).

    Logs each phase's seconds, and puts them in `phases` ({"read_seconds", "move_seconds"}) if given.
    """
    weights_dir = Path(weights_dir)
    device = device or pick_device()
    dtype = pick_dtype(device)
    shards = sorted(weights_dir.glob("*.safetensors"))
    gigabytes = sum(p.stat().st_size for p in shards) / 1e9

    read = read_into_page_cache(shards)
    log.info("weights read from disk in %.2f s (%.2f GB at %.2f GB/s)", read, gigabytes, gigabytes / read if read else 0.0)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype, device_map=device)
    model.eval()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    move = time.perf_counter() - t0
    log.info("weights moved to %s (%s) in %.2f s", device, dtype, move)
    total = read + move
    if phases is not None:
        phases.update(read_seconds=read, move_seconds=move)
    log.info("weights loaded in %.2f s: %.2f GB at %.2f GB/s", total, gigabytes, gigabytes / total if total else 0.0)
    return model
