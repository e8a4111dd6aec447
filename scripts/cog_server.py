"""The real Cog HTTP server in a subprocess, started by scripts/serve as a user would start it.

For the tests and the scripts that drive the server (benchmark_server.py, smoke_server.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
AT_CAPACITY = "At capacity - all prediction slots busy"  # coglet's 409 when it takes no more predictions


class Server:
    """The real Cog HTTP server, started by scripts/serve as a user would.

    `command` and `cwd` start another predictor instead (the server reads `.cog/` in `cwd`).
    """

    def __init__(self, weights: Path | None, log_path: Path, wait_ready: bool = True, env: dict | None = None,
                 command: list[str] | None = None, cwd: Path = REPO):
        env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "PYTHON": sys.executable, **(env or {})}
        if weights is not None:
            env["COG_WEIGHTS"] = str(weights)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            command or [str(REPO / "scripts" / "serve")], cwd=cwd, env=env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self._wait_for_port()}"
        if wait_ready:
            self.wait_ready()

    def _wait_for_port(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"Starting coglet server on [\d.]+:(\d+)", self.log_path.read_text())
            if match:
                return int(match.group(1))
            assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.2)
        raise TimeoutError(self.log_path.read_text())

    def wait_for_log(self, text: str, timeout: float) -> bool:
        """Whether `text` appeared in the server's log within `timeout` seconds."""
        return _poll(lambda: text in self.log_path.read_text(), timeout)

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_setup(self, timeout: float = 120) -> dict:
        """Health once setup has ended, in success or failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if health["status"] != "STARTING":
                return health
            time.sleep(0.2)
        raise TimeoutError(self.health())

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.wait_setup(timeout)
            if health["status"] == "READY":
                return health
            assert health["status"] == "BUSY", health
            time.sleep(0.1)
        raise TimeoutError(self.health())

    def predict(self, timeout: float = 120, headers: dict | None = None, **inputs) -> requests.Response:
        """POST /predictions: a sync prediction (or an SSE stream with Accept: text/event-stream)."""
        return requests.post(f"{self.url}/predictions", json={"input": inputs}, headers=headers, timeout=timeout)

    def predict_async(self, prediction_id: str, hooks: dict | None = None, **inputs) -> requests.Response:
        """PUT /predictions/<id> with `Prefer: respond-async`: 202 at once, the results by webhook only
        (`hooks`: the body's webhook and webhook_events_filter)."""
        return requests.put(f"{self.url}/predictions/{prediction_id}", json={"input": inputs, **(hooks or {})},
                            headers={"Prefer": "respond-async"}, timeout=10)

    def cancel(self, prediction_id: str) -> requests.Response:
        """POST /predictions/<id>/cancel: 200 when the server knows the id, 404 when not (yet, or no more)."""
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=10)

    def worker_pid(self) -> int:
        """The worker process that runs the predictor (a child of the server)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                return int(stat.parent.name)
        raise LookupError("no worker process")

    def worker_cpu_seconds(self) -> float:
        """CPU time the worker has used so far (user + system)."""
        fields = Path(f"/proc/{self.worker_pid()}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def seconds_until_idle(self, within: float, window: float = 0.15) -> float | None:
        """Seconds until the worker stops using CPU (a window under 15 % of a core), None if it still
        works after `within` seconds: the engine thread keeps a core busy while it steps, on the GPU
        too (it waits on each step's event)."""
        t0 = time.monotonic()
        while True:
            if _cores_busy(self, window) < 0.15:
                return max(0.0, time.monotonic() - window - t0)
            if time.monotonic() - t0 > within:
                return None

    def worker_memory(self) -> int:
        """The worker's resident memory, in bytes."""
        for line in Path(f"/proc/{self.worker_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise LookupError("no VmRSS")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


def boot(weights: Path, timeout: float = 1800) -> tuple[Server, float, dict]:
    """scripts/serve on `weights` (its log in a new temporary folder), once setup is done: the server,
    the seconds from its start to READY, and the health check (setup's logs in it). Stop it when done."""
    t0 = time.perf_counter()
    server = Server(weights, Path(tempfile.mkdtemp(prefix="notus-server-")) / "server.log", wait_ready=False)
    try:
        health = server.wait_ready(timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server, time.perf_counter() - t0, health


def sse_events(response: requests.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) of a text/event-stream response, as each arrives.

    Lines end only at "\\n": the model's text inside the JSON may hold U+2028 or NEL, which
    str.splitlines() (and so requests' default iter_lines) would take for line ends.
    """
    name = None
    for raw in response.iter_lines(chunk_size=None, delimiter=b"\n"):
        line = raw.decode("utf-8").rstrip("\r")  # SSE is always UTF-8
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            yield name, json.loads(line.split(":", 1)[1])


def sse_prediction(server: Server, inputs: dict, stop_after: int | None = None, prediction_id: str | None = None,
                   on_chunk: Callable[[int], None] | None = None) -> dict:
    """One prediction streamed over SSE: its chunks with their arrival times (time.monotonic()), and
    the completed event (arrival time, data), None if the stream ended without one. `stop_after`
    chunks, the client closes the connection; `on_chunk(count)` runs after each chunk arrives."""
    chunks, completed = [], None
    body = {"input": inputs, **({"id": prediction_id} if prediction_id else {})}
    with admitted(lambda: requests.post(f"{server.url}/predictions", json=body,
                                        headers={"Accept": "text/event-stream"}, stream=True, timeout=120)) as response:
        assert response.status_code == 200, response.text
        for event, data in sse_events(response):
            if event == "output":
                chunks.append((time.monotonic(), data["chunk"]))
                if on_chunk is not None:
                    on_chunk(len(chunks))
                if len(chunks) == stop_after:
                    break  # leaving the `with` closes the connection
            elif event == "completed":
                completed = (time.monotonic(), data)
    return {"chunks": chunks, "completed": completed}


def admitted(send: Callable[[], requests.Response]) -> requests.Response:
    """send(), again while coglet answers 409 At capacity with slots free; any other answer as it is.

    coglet 0.23.1 refuses a request that arrives while another holds its slot pool's lock
    (PermitPool::try_acquire gives up on try_lock, crates/coglet/src/permit/pool.rs), whatever the
    free slots: requests released at one instant meet it now and then (2 to 7 of 200 requests sent
    in pairs here, scripts/benchmark_server.py). Callers that stay below the slots Cog admits know a
    409 is that race, and a client would ask again too.
    """
    for _ in range(20):
        response = send()
        if response.status_code != 409 or response.json().get("error") != AT_CAPACITY:
            return response
        response.close()
        time.sleep(0.05)
    return response


def at_once(fn: Callable, items: list) -> list:
    """fn(item) for every item, all released at the same instant, each in its own thread."""
    start = threading.Barrier(len(items))

    def run(item):
        start.wait()
        return fn(item)

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(run, items))


def setup_timings(logs: str) -> list[str]:
    """Setup's phase timings as it logged them (weights read and moved, warm-up and graph capture, total)."""
    return [line.strip() for line in logs.splitlines() if re.search(r"\bin \d+\.\d+ s\b", line)]


class Webhooks:
    """Receives a prediction's webhooks: Cog reports async predictions (PUT, respond-async) only that way."""

    def __init__(self):
        arrivals = self.arrivals = []  # (time.monotonic(), webhook), as each arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                arrivals.append((time.monotonic(), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}/hook"

    @property
    def received(self) -> list[dict]:
        """The webhooks, in the order they arrived."""
        return [webhook for _, webhook in self.arrivals]

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> bool:
        """Whether a webhook matching `predicate` arrived within `timeout` seconds."""
        return _poll(lambda: any(predicate(h) for h in self.received), timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def cancel_mid_generation(server: Server, prediction_id: str = "cancel-me") -> dict:
    """Starts a prediction that would run for 32,768 tokens, cancels it while it generates, and
    measures the worker's CPU use (cores busy) before and after the cancel: the engine thread keeps a
    core busy while it steps (on the GPU too: it waits on each step's event), none when idle."""
    webhooks = Webhooks()
    try:
        response = server.predict_async(prediction_id, dict(webhook=webhooks.url, webhook_events_filter=["completed"]),
                                        prompt="Go on forever", max_tokens=32768, min_tokens=32768, seed=1)
        assert response.status_code == 202, response.text
        # The server logs the start (output webhooks would tell too, one per token: thousands here).
        started = server.wait_for_log(f'"Starting prediction","prediction_id":"{prediction_id}"', timeout=30)
        busy = _cores_busy(server, seconds=1.0)
        t0 = time.monotonic()
        cancel_status = server.cancel(prediction_id).status_code
        canceled = webhooks.wait_for(lambda h: h["status"] == "canceled", timeout=10)
        cancel_seconds = time.monotonic() - t0
        time.sleep(0.5)  # the step in flight ends
        idle = _cores_busy(server, seconds=1.5)
        return {"started": started, "cores_busy_generating": busy, "cancel_http_status": cancel_status,
                "canceled": canceled, "cancel_to_canceled_s": cancel_seconds, "cores_busy_after_cancel": idle,
                "webhooks": [h["status"] for h in webhooks.received]}
    finally:
        webhooks.close()


def _poll(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether `condition()` came true within `timeout` seconds (checked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _cores_busy(server: Server, seconds: float) -> float:
    start = server.worker_cpu_seconds()
    time.sleep(seconds)
    return (server.worker_cpu_seconds() - start) / seconds
