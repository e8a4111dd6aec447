#!/usr/bin/env python
"""Smoke test of the container's server end to end: scripts/serve on a checkpoint, as a user starts it,
then what a user does first. Setup's phase timings, a sync prediction, the same prediction streamed over
SSE (same seed: the same text), a cancel of a long generation (the worker must go idle, not only the
stream end), and a prediction after it.

    python scripts/smoke_server.py --random /tmp/notus-random   # GPU: notus's exact size, random bf16
                                                                # weights (written there first if missing)
    python scripts/smoke_server.py --weights weights/           # GPU: the real checkpoint
    python scripts/smoke_server.py --tiny                       # CPU: the tiny random notus

Prints each check, writes them with setup's timings as JSON under --out, and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from benchmark import run_facts, write_report  # noqa: E402
from cog_server import Server, boot, cancel_mid_generation, setup_timings, sse_events  # noqa: E402
from random_checkpoint import add_checkpoint_arguments, checkpoint_from  # noqa: E402

INPUTS = dict(prompt="Write a haiku about the sea.", system_prompt="You are a poet.", max_tokens=64, seed=7)


def smoke(server: Server) -> list[dict]:
    """The checks, each {"check", "ok", "detail"}."""
    checks = []

    def check(name: str, ok: bool, detail) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    response = server.predict(**INPUTS)
    body = response.json() if response.status_code == 200 else {}
    sync_text = "".join(body.get("output") or [])
    check("sync prediction succeeds with text and metrics",
          body.get("status") == "succeeded" and sync_text and body["metrics"].get("time_to_first_token"),
          {"http": response.status_code, "status": body.get("status"), "error": body.get("error"),
           "metrics": body.get("metrics"), "text": sync_text[:200]})

    t0 = time.perf_counter()
    response = server.predict(headers={"Accept": "text/event-stream"}, **INPUTS)
    events = list(sse_events(response)) if response.status_code == 200 else []
    chunks = [data["chunk"] for name, data in events if name == "output"]
    completed = next((data for name, data in events if name == "completed"), {})
    check("SSE stream succeeds in chunks", completed.get("status") == "succeeded" and len(chunks) > 1,
          {"http": response.status_code, "chunks": len(chunks), "status": completed.get("status"),
           "seconds": round(time.perf_counter() - t0, 3)})
    check("SSE text equals the sync text (same seed)", "".join(chunks) == sync_text,
          {"sse": "".join(chunks)[:200], "sync": sync_text[:200]})

    cancel = cancel_mid_generation(server, "smoke-cancel")
    check("a cancel ends the prediction", cancel["cancel_http_status"] == 200 and cancel["canceled"], cancel)
    check("while it generates, the worker keeps a core busy", cancel["started"] and cancel["cores_busy_generating"] > 0.5,
          cancel["cores_busy_generating"])
    check("after the cancel the worker is idle (the generation stopped, not only its stream)",
          cancel["cores_busy_after_cancel"] < 0.13, cancel["cores_busy_after_cancel"])

    body = server.predict(prompt="Hi", max_tokens=3).json()
    check("the next prediction succeeds", body.get("status") == "succeeded", body.get("status"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()

    weights, _ = checkpoint_from(args)

    server, boot_seconds, health = boot(weights)
    try:
        timings = setup_timings(health["setup"]["logs"])
        print(f"ready in {boot_seconds:.1f} s; setup: " + "; ".join(timings), flush=True)
        checks = smoke(server)
    finally:
        server.stop()

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"weights": str(weights), "boot_seconds": boot_seconds, "setup_timings": timings, "checks": checks,
              **run_facts(kind)}
    path = write_report(args.out, f"smoke-{kind}", report)
    failed = [c["check"] for c in checks if not c["ok"]]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed; wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
