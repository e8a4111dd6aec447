"""End to end through the real Cog HTTP server, started by scripts/serve as a user would."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests

from conftest import failed_setup_logs
from notus.engine import SamplingParams


def test_health_is_ready_and_setup_logs_its_phases(server):
    health = server.health()
    assert health["status"] == "READY"
    logs = health["setup"]["logs"]
    for phase in ("checkpoint checked in", "tokenizer loaded in", "weights read from disk in", "weights moved to",
                  "weights loaded in", "GB/s", "warm-up done in", "setup done in"):
        assert phase in logs


def test_schema_describes_every_input_with_its_limits(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["prompt"]
    props = inputs["properties"]
    assert sorted(props, key=lambda name: props[name]["x-order"]) == [
        "prompt", "system_prompt", "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k",
        "repetition_penalty", "stop_sequences", "seed",
    ]
    assert all(p.get("description") for p in props.values())
    assert props["max_new_tokens"].items() >= {"type": "integer", "default": 512, "minimum": 1, "maximum": 32768}.items()
    assert props["temperature"].items() >= {"type": "number", "default": 0.7, "minimum": 0, "maximum": 5}.items()
    assert props["top_p"].items() >= {"default": 0.95, "maximum": 1}.items()
    assert props["seed"]["nullable"] is True and "default" not in props["seed"]
    output = schema["components"]["schemas"]["Output"]
    assert output["x-cog-array-type"] == "iterator" and output["x-cog-array-display"] == "concatenate"


def test_sync_prediction_matches_the_engine(server, engine):
    inputs = dict(prompt="Hello there", system_prompt="Be brief.", max_new_tokens=30, seed=42)
    response = server.predict(**inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body
    expected = "".join(engine.stream("Be brief.", "Hello there", SamplingParams(max_new_tokens=30, seed=42)))
    assert "".join(body["output"]) == expected
    assert "seed: 42" in body["logs"]
    metrics = body["metrics"]
    assert metrics["input_token_count"] == len(engine.prompt.ids("Be brief.", "Hello there"))
    assert 1 <= metrics["output_token_count"] <= 30
    assert metrics["time_to_first_token"] > 0 and metrics["tokens_per_second"] > 0


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    response.encoding = "utf-8"  # SSE is always UTF-8; requests would guess Latin-1
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def test_sse_streams_each_chunk(server):
    inputs = dict(prompt="Stream it", max_new_tokens=25, min_new_tokens=25, seed=9)
    response = server.predict(headers={"Accept": "text/event-stream"}, **inputs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    chunks = [data["chunk"] for name, data in events if name == "output"]
    completed = [data for name, data in events if name == "completed"]
    assert len(chunks) > 5 and all(chunks)
    assert completed and completed[0]["status"] == "succeeded"
    assert "".join(chunks) == "".join(server.predict(**inputs).json()["output"])


@pytest.mark.parametrize(
    "inputs,field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 32769}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 32769}, "min_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 5.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": "abc"}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_out_of_range_input_is_422_naming_the_field(server, inputs, field):
    body = {"prompt": "Hi", **inputs}
    if body["prompt"] is None:
        del body["prompt"]
    response = server.predict(**body)
    assert response.status_code == 422, response.text
    assert any(d["loc"][-1] == field for d in response.json()["detail"]), response.text


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"top_p": 0}, "top_p must be above 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be above 0"),
        ({"max_new_tokens": 5, "min_new_tokens": 6}, "min_new_tokens (6) must not exceed max_new_tokens (5)"),
    ],
)
def test_bad_combinations_fail_clearly_and_the_server_stays_healthy(server, inputs, message):
    body = server.predict(prompt="Hi", **inputs).json()
    assert body["status"] == "failed" and message in body["error"]
    assert server.wait_ready()["status"] == "READY"
    assert server.predict(prompt="Hi", max_new_tokens=3).json()["status"] == "succeeded"


def test_too_long_prompt_fails_with_its_token_count(server, engine):
    prompt = "word " * 33000
    body = server.predict(prompt=prompt, max_new_tokens=10).json()
    n = len(engine.prompt.ids("", prompt))
    assert body["status"] == "failed", body
    assert f"{n:,} tokens" in body["error"] and "32,768" in body["error"]
    assert server.wait_ready()["status"] == "READY"
    assert server.predict(prompt="Hi", max_new_tokens=3).json()["status"] == "succeeded"


class _Webhooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def test_cancel_stops_generation_and_the_next_prediction_works(server):
    hooks = HTTPServer(("127.0.0.1", 0), _Webhooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        response = requests.put(
            f"{server.url}/predictions/cancel-me",
            json={
                "input": {"prompt": "Go on forever", "max_new_tokens": 32768, "min_new_tokens": 32768, "seed": 1},
                "webhook": f"http://127.0.0.1:{hooks.server_port}/hook",
                "webhook_events_filter": ["output", "completed"],
            },
            headers={"Prefer": "respond-async"}, timeout=10,
        )
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 30
        while not any(h.get("output") for h in _Webhooks.received) and time.monotonic() < deadline:
            time.sleep(0.1)  # wait until it is really generating
        worker = server.worker_pid()
        busy_start = cpu_seconds(worker)
        time.sleep(1)
        assert cpu_seconds(worker) - busy_start > 0.5  # generating: a core busy

        assert requests.post(f"{server.url}/predictions/cancel-me/cancel", timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while not any(h["status"] == "canceled" for h in _Webhooks.received) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(h["status"] == "canceled" for h in _Webhooks.received)
        time.sleep(0.5)
        idle_start = cpu_seconds(worker)
        time.sleep(1.5)
        assert cpu_seconds(worker) - idle_start < 0.2  # the generation itself stopped, not only the stream
        assert server.wait_ready()["status"] == "READY"
        assert server.predict(prompt="Hi", max_new_tokens=3).json()["status"] == "succeeded"
    finally:
        hooks.shutdown()


def test_missing_weights_fail_setup_naming_the_download_command(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    logs = failed_setup_logs(empty, tmp_path / "server.log")
    assert f"python scripts/download_weights.py --dir {empty}" in logs
