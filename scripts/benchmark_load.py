#!/usr/bin/env python
"""Cold-load benchmark: how long setup's weight load takes against the disk's own read speed.

In one run, on the same files: (1) read every shard sequentially (the disk's speed), (2) load them
the way setup does (notus.loading.load_model: a sequential read, then from_pretrained with
device_map onto the GPU), each with the files dropped from the page cache first (posix_fadvise
DONTNEED) so both start cold. Reports the ratio load / read (target: at most 1.25) and the peak
host memory of the load, which runs in a child process so its peak is its own.

    python scripts/benchmark_load.py --weights weights/            # the real checkpoint
    python scripts/benchmark_load.py --random /tmp/notus-random     # writes a random-weight notus
                                                                    # of the exact config first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from notus.loading import read_into_page_cache  # noqa: E402
from random_checkpoint import write_full  # noqa: E402


def drop_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_in_child(weights: Path, device: str | None) -> dict:
    # The child imports first, then measures only the weight load (what the ratio is about). A
    # sampler thread records the peak of anonymous memory (RssAnon): what the load itself holds in
    # host memory. VmHWM also counts the mapped shards' page-cache pages, which are no copy.
    code = (
        "import json, re, threading, time, torch\n"
        "from notus.loading import load_model\n"
        "def kb(key): return int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "peak = [kb('RssAnon')]; before = peak[0]; done = threading.Event()\n"
        "def sample():\n"
        "    while not done.wait(0.005): peak[0] = max(peak[0], kb('RssAnon'))\n"
        "threading.Thread(target=sample, daemon=True).start()\n"
        "phases = {}\n"
        "t0 = time.perf_counter()\n"
        f"model = load_model({str(weights)!r}, device={device!r}, phases=phases)\n"
        "seconds = time.perf_counter() - t0\n"
        "done.set(); peak[0] = max(peak[0], kb('RssAnon'))\n"
        "print(json.dumps({'load_seconds': seconds, **phases, 'host_anon_bytes_before': before * 1024,\n"
        "                  'peak_host_anon_bytes': peak[0] * 1024, 'peak_host_rss_bytes': kb('VmHWM') * 1024,\n"
        "                  'device': str(model.device)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="an existing checkpoint directory")
    source.add_argument("--random", type=Path, help="write a random-weight notus here first")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: $NOTUS_DEVICE, else cuda)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="where the JSON result goes")
    args = parser.parse_args()

    weights = write_full(args.random) if args.random else args.weights
    files = sorted(weights.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)

    drop_from_page_cache(files)
    read = read_into_page_cache(files)  # the same sequential read setup does first
    drop_from_page_cache(files)
    load = load_in_child(weights, args.device)

    result = {
        "bytes": total,
        "disk_read_seconds": read,
        "disk_read_gb_per_s": total / read / 1e9,
        **load,
        "load_gb_per_s": total / load["load_seconds"] / 1e9,
        "load_over_read": load["load_seconds"] / read,
        # What the load added to the host's peak anonymous memory, against the checkpoint's size
        # (on the GPU it must stay well below 1: no full copy in host memory).
        "peak_host_growth_over_checkpoint": (load["peak_host_anon_bytes"] - load["host_anon_bytes_before"]) / total,
        "machine": platform.node(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"load / disk read = {result['load_over_read']:.2f} (target <= 1.25); peak host memory growth = "
          f"{result['peak_host_growth_over_checkpoint']:.2f} x checkpoint; wrote {path}")


if __name__ == "__main__":
    main()
