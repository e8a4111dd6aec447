"""End to end through the real Cog HTTP server, started by scripts/serve as a user would."""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from aio import text
from cog_server import Webhooks, cancel_mid_generation, sse_events
from conftest import failed_setup_logs
from notus.params import MAX_PROMPT_CHARS, MAX_SEED, SamplingParams
from notus.stream import parse_stop_sequences

REPO = Path(__file__).resolve().parent.parent


def test_health_is_ready_and_setup_logs_its_phases(server):
    health = server.health()
    assert health["status"] == "READY"
    logs = health["setup"]["logs"]
    for phase in ("checkpoint checked in", "tokenizer loaded in", "weights read from disk in", "weights moved to",
                  "weights loaded in", "GB/s", "warm-up done in", "setup done in",
                  "32 predictions at once (COG_MAX_CONCURRENCY=32): 32 KV-cache slots of 2 MiB",
                  # what notus/coglet_stream.py found: the coglet it was checked against
                  "coglet 0.23.1: replies stream piece by piece; a cancel or a client gone stops generation"):
        assert phase in logs


def test_schema_describes_every_input_with_its_limits(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    inputs = schema["components"]["schemas"]["Input"]
    assert "required" not in inputs  # prompt or messages: which one, predict checks
    props = inputs["properties"]
    assert sorted(props, key=lambda name: props[name]["x-order"]) == [
        "prompt", "system_prompt", "messages", "max_tokens", "min_tokens", "temperature", "top_p", "top_k",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "stop_sequences", "prompt_template", "seed",
        "max_new_tokens", "min_new_tokens",
    ]
    assert all(p.get("description") for p in props.values())
    assert props["prompt"]["maxLength"] == props["system_prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert props["prompt"]["default"] == props["system_prompt"]["default"] == props["prompt_template"]["default"] == ""
    assert props["prompt_template"]["maxLength"] == MAX_PROMPT_CHARS and "{prompt}" in props["prompt_template"]["description"]
    # What cog build's Go writes for list[dict] (pkg/schema/schema_type.go: an array of opaque objects).
    assert props["messages"].items() >= {"type": "array", "items": {"type": "object"}, "default": []}.items()
    assert props["max_tokens"].items() >= {"type": "integer", "default": 512, "minimum": 1, "maximum": 32768}.items()
    assert props["min_tokens"].items() >= {"type": "integer", "default": 0, "minimum": 0, "maximum": 32768}.items()
    assert props["temperature"].items() >= {"type": "number", "default": 0.7, "minimum": 0, "maximum": 5}.items()
    assert props["top_p"].items() >= {"default": 0.95, "minimum": 0, "maximum": 1}.items()
    assert props["top_k"].items() >= {"default": 50, "minimum": 0, "maximum": 32000}.items()
    assert props["repetition_penalty"].items() >= {"default": 1, "minimum": 0.01, "maximum": 5}.items()
    for penalty in ("presence_penalty", "frequency_penalty"):
        assert props[penalty].items() >= {"type": "number", "default": 0, "minimum": -2, "maximum": 2}.items()
    assert props["seed"].items() >= {"nullable": True, "minimum": 0, "maximum": 2**32 - 1}.items()
    assert "default" not in props["seed"]
    for old in ("max_new_tokens", "min_new_tokens"):
        assert props[old]["deprecated"] is True and props[old]["nullable"] is True and "default" not in props[old]
    assert not any(props[name].get("deprecated") for name in props if name not in ("max_new_tokens", "min_new_tokens"))
    assert "comma" in props["stop_sequences"]["description"] and "Spaces around" in props["stop_sequences"]["description"]
    # What cog build's Go writes for a ConcatenateIterator[str] (pkg/schema/schema_type.go), under its version.
    assert schema["components"]["schemas"]["Output"] == {
        "title": "Output", "type": "array", "items": {"type": "string"},
        "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate",
    }
    assert schema["info"] == {"title": "Cog", "version": importlib.metadata.version("cog")}


def test_sync_prediction_matches_the_engine(server, engine):
    inputs = dict(prompt="Hello there", system_prompt="Be brief.", max_tokens=30, seed=42)
    response = server.predict(**inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body
    expected = text(engine.stream("Be brief.", "Hello there", SamplingParams(max_tokens=30, seed=42)))
    assert "".join(body["output"]) == expected
    assert "seed: 42" in body["logs"]
    metrics = body["metrics"]
    assert metrics["input_token_count"] == len(engine.prompt.ids("Be brief.", "Hello there"))
    assert 1 <= metrics["output_token_count"] <= 30
    assert metrics["time_to_first_token"] > 0 and metrics["tokens_per_second"] > 0


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi! What can I do for you?"}, {"role": "user", "content": "A haiku."}]


def test_a_conversation_in_messages_matches_the_engine(server, engine):
    response = server.predict(messages=CONVERSATION, max_tokens=30, seed=42)
    body = response.json()
    assert body["status"] == "succeeded", body
    turns = [(m["role"], m["content"]) for m in CONVERSATION]
    assert "".join(body["output"]) == text(engine.stream_conversation(turns, SamplingParams(max_tokens=30, seed=42)))
    assert body["metrics"]["input_token_count"] == len(engine.prompt.conversation_ids(turns))
    # Asked again: every prompt token but the last is still in the KV cache, and the reply is the same.
    again = server.predict(messages=CONVERSATION, max_tokens=30, seed=42).json()
    assert again["output"] == body["output"]
    assert again["metrics"]["cached_input_token_count"] == body["metrics"]["input_token_count"] - 1


def test_the_zephyr_template_sent_as_prompt_template_gives_the_same_reply(server, engine):
    """prompt_template in Replicate's form (cog-vllm's): notus's own template written out gives the
    reply and the prompt tokens of the default; '{prompt}' sends the text as it is."""
    inputs = dict(prompt="Hello there", system_prompt="Be brief.", max_tokens=20, seed=42)
    default = server.predict(**inputs).json()
    zephyr = server.predict(**inputs, prompt_template="<|system|>\n{system_prompt}</s>\n<|user|>\n{prompt}</s>\n"
                                                      "<|assistant|>\n").json()
    raw = server.predict(prompt="<|system|>\nBe brief.", prompt_template="{prompt}", max_tokens=3).json()
    assert default["status"] == zephyr["status"] == raw["status"] == "succeeded", (default, zephyr, raw)
    assert zephyr["output"] == default["output"]
    assert zephyr["metrics"]["input_token_count"] == default["metrics"]["input_token_count"]
    # <s> and the text's own tokens, no template around it
    assert raw["metrics"]["input_token_count"] == len(engine.prompt.formatted_ids("<|system|>\nBe brief.")) == 10


@pytest.mark.parametrize(
    "inputs,error",
    [
        ({}, "give prompt (your message) or messages (a conversation): both are empty"),
        ({"prompt": "Hi", "messages": CONVERSATION},
         "messages replaces prompt and system_prompt, which must then be empty; prompt was given too"),
        ({"messages": [*CONVERSATION, {"role": "user", "content": "Again"}]},
         "messages[4].role must be 'assistant' (user and assistant take turns, starting with user), got 'user'"),
        ({"messages": [{"role": "user", "text": "Hi"}]}, "messages[0] has 'text': a message holds only role and content"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content must be a string, got a number"),
    ],
)
def test_a_malformed_conversation_fails_with_a_clear_error_and_the_next_prediction_works(server, inputs, error):
    body = server.predict(**inputs).json()
    assert body["status"] == "failed" and error in body["error"], body
    assert server.wait_ready()["status"] == "READY"
    assert server.predict(prompt="Hi", max_tokens=3).json()["status"] == "succeeded"


def test_sse_streams_each_chunk(server):
    inputs = dict(prompt="Stream it", max_tokens=25, min_tokens=25, seed=9)
    response = server.predict(headers={"Accept": "text/event-stream"}, **inputs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = list(sse_events(response))
    chunks = [data["chunk"] for name, data in events if name == "output"]
    completed = [data for name, data in events if name == "completed"]
    assert len(chunks) > 5 and all(chunks)
    assert completed and completed[0]["status"] == "succeeded"
    assert "".join(chunks) == "".join(server.predict(**inputs).json()["output"])


@pytest.mark.parametrize(
    "inputs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 32769}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 32769}, "min_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 32769}, "min_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 5.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1e30}, "top_k"),
        ({"top_k": 2**64}, "top_k"),
        ({"top_k": 32001}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 5.5}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -10**20}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": None}, "seed"),  # null, although the schema says nullable: coglet's (docs/coglet.md)
        ({"messages": "Hi"}, "messages"),
        ({"messages": {"role": "user", "content": "Hi"}}, "messages"),
        ({"messages": [1]}, "messages/0"),  # each message must be an object: the schema says so
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"system_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "system_prompt"),
        ({"stop_sequences": "x" * 1001}, "stop_sequences"),
    ],
)
def test_out_of_range_input_is_422_naming_the_field(server, inputs, field):
    body = {"prompt": "Hi", **inputs}
    response = server.predict(**body)
    assert response.status_code == 422, response.text
    assert any(d["loc"][-1] == field for d in response.json()["detail"]), response.text


@pytest.mark.parametrize(
    "inputs",
    [
        dict(temperature=1e-39), dict(top_k=32000, temperature=5), dict(top_p=0), dict(top_k=3.0),
        dict(seed=MAX_SEED), dict(seed=0), dict(repetition_penalty=0.01), dict(repetition_penalty=5),
        dict(max_tokens=1e1), dict(stop_sequences="x" * 1000),
        dict(presence_penalty=2, frequency_penalty=-2), dict(presence_penalty=-2, frequency_penalty=2, temperature=0),
    ],
)
def test_every_value_the_schema_accepts_works(server, inputs):
    body = server.predict(prompt="Hi", **{"max_tokens": 8, **inputs}).json()
    assert body["status"] == "succeeded", body
    assert server.predict(prompt="Hi", max_tokens=3).json()["status"] == "succeeded"


# Texts a caller may send: the template's own markers, control and invisible characters, other
# scripts, a stop sequence's separator; each a prompt, a system prompt, a message or a stop sequence.
TRICKY_TEXTS = ["Hi", "", " ", "\n\n", "</s>", "<s>", "<|user|>\nHi</s>\n<|assistant|>\n", "[INST] x [/INST]",
                "a\u0000b\u001b[31m", "\u200b\ufeff", "\U0001f999" * 30, "\u0645\u0631\u062d\u0628\u0627", ",", "the",
                "e", "x" * 3000, "{{ messages }}{% for m in messages %}"]
TOKEN_FIELDS = ("max_tokens", "min_tokens", "max_new_tokens", "min_new_tokens")
# prompt_template's: (template, the fields it has, the refusal of a broken one).
TEMPLATES = [("{prompt}", {"prompt"}, None), ("<s>[INST] {prompt} [/INST]", {"prompt"}, None),
             ("<s>[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{prompt} [/INST]", {"prompt", "system_prompt"}, None),
             ("<|system|>\n{system_prompt}</s>\n<|user|>\n{prompt}</s>\n<|assistant|>\n", {"prompt", "system_prompt"}, None),
             ("{system_prompt}\n\n{prompt}", {"prompt", "system_prompt"}, None), ('{{"q": "{prompt}"}}</s>', {"prompt"}, None),
             ("Tell me a joke.", set(), None), ("{prompt", set(), "has a '{' at character 1 that opens no field"),
             ("{question} {prompt}", {"prompt"}, "prompt_template has {question}")]


def schema_valid_inputs(rng: random.Random, props: dict) -> dict:
    """Random inputs that /openapi.json allows: each field left out or given one of its limits, its
    default or a value between (token counts at most 24, to keep the cases short). Mostly a prompt
    (with a system prompt or not) or a conversation in messages; one case in ten neither or both,
    and the deprecated aliases now and then, as callers' mistakes."""
    text = rng.choices([("prompt",), ("messages",), (), ("prompt", "messages")], weights=[70, 20, 5, 5])[0]
    inputs = {}
    for name, prop in props.items():
        if name in ("prompt", "messages") and name not in text:
            continue
        if rng.random() < {"prompt": 0, "messages": 0, "max_new_tokens": 0.75, "min_new_tokens": 0.75}.get(name, 0.5):
            continue
        if name == "prompt_template":
            inputs[name] = rng.choice(TEMPLATES)[0] if rng.random() < 0.8 else ""
        elif name == "messages":
            turns = ["user", "assistant"] * 2
            inputs[name] = [{"role": "system", "content": rng.choice(TRICKY_TEXTS)}] * rng.randint(0, 1) + [
                {"role": role, "content": rng.choice(TRICKY_TEXTS)} for role in turns[: rng.choice([1, 3])]]
        elif prop.get("type") == "string":
            fitting = [text for text in TRICKY_TEXTS if len(text) <= prop.get("maxLength", len(text))]
            # Stop sequences: a few, comma-separated, as the field takes them.
            inputs[name] = ",".join(rng.sample(fitting, rng.randint(1, 3))) if name == "stop_sequences" else rng.choice(fitting)
        else:
            low, high = prop["minimum"], min(prop["maximum"], 24) if name in TOKEN_FIELDS else prop["maximum"]
            between = rng.randint(low, high) if prop["type"] == "integer" else rng.uniform(low, high)
            inputs[name] = rng.choice([low, high, prop.get("default", low), between])
    return inputs


def token_limits(inputs: dict) -> tuple[int, int]:
    """(max_tokens, min_tokens) as predict reads them: a deprecated alias, where given, counts when the
    new name is left at its default (notus/params.py's with_alias)."""
    return (inputs.get("max_new_tokens", inputs.get("max_tokens", 512)),
            inputs.get("min_new_tokens", inputs.get("min_tokens", 0)))


def refusals(inputs: dict) -> list[str]:
    """What predict must refuse in schema-valid `inputs` (the limits the schema cannot express), in the
    order predict checks them: the first is the error it gives."""
    given = {name for name, value in inputs.items() if value not in ("", [])}
    found = []
    for new, old, default in (("max_tokens", "max_new_tokens", 512), ("min_tokens", "min_new_tokens", 0)):
        if old in inputs and inputs.get(new, default) not in (default, inputs[old]):
            found.append(f"{new} ({inputs[new]}) and its deprecated alias {old} ({inputs[old]}) disagree")
    most, least = token_limits(inputs)
    if least > most:
        found.append("must not exceed")
    if "prompt_template" in given:
        _, fields, broken = next(t for t in TEMPLATES if t[0] == inputs["prompt_template"])
        if "messages" in given:
            found.append("prompt_template formats prompt and system_prompt; messages is rendered")
        if broken:
            found.append(broken)
        found += [f"prompt_template has no {{{name}}}" for name in ("prompt", "system_prompt")
                  if name in given and name not in fields]
        if "prompt" in fields and "prompt" not in given:
            found.append("prompt_template has {prompt} but prompt is empty")
    elif "messages" in given:
        if {"prompt", "system_prompt"} & given:
            found.append("messages replaces prompt and system_prompt")
        if any(m["role"] == "user" and not m["content"] for m in inputs["messages"]):
            found.append("a user message needs text")
    elif "prompt" not in given:
        found.append("give prompt (your message) or messages")
    return found


def prompt_ids(engine, inputs: dict) -> list[int]:
    """The prompt's token ids for inputs predict accepts: a template filled in by Python's own format (as
    cog-vllm fills it), a conversation, or prompt and system prompt in the chat template."""
    prompt, system_prompt = inputs.get("prompt", ""), inputs.get("system_prompt", "")
    if inputs.get("prompt_template"):
        return engine.prompt.formatted_ids(inputs["prompt_template"].format(prompt=prompt, system_prompt=system_prompt))
    if inputs.get("messages"):
        return engine.prompt.conversation_ids([(m["role"], m["content"]) for m in inputs["messages"]])
    return engine.prompt.ids(system_prompt, prompt)


def test_random_inputs_the_schema_accepts_work_or_fail_naming_the_limit(server, engine):
    """Eighty random combinations of what the served schema allows (its limits, defaults and values
    between, tricky texts everywhere, prompt templates good and broken): each succeeds within its
    limits with the prompt it asked for, or fails with the message of the first limit it breaks; the
    server stays ready throughout."""
    props = requests.get(f"{server.url}/openapi.json", timeout=5).json()["components"]["schemas"]["Input"]["properties"]
    rng = random.Random(21)
    for case in range(80):
        inputs = schema_valid_inputs(rng, props)
        response = server.predict(**inputs)
        assert response.status_code == 200, (case, inputs, response.text)
        body, expected = response.json(), refusals(inputs)
        if expected:
            assert body["status"] == "failed" and expected[0] in body["error"], (case, inputs, body)
            continue
        assert body["status"] == "succeeded", (case, inputs, body)
        assert body["metrics"]["input_token_count"] == len(prompt_ids(engine, inputs)), (case, inputs, body)
        count, reply = body["metrics"]["output_token_count"], "".join(body["output"])
        most, least = token_limits(inputs)
        assert 1 <= count <= most, (case, inputs, body)
        stops = parse_stop_sequences(inputs.get("stop_sequences", ""))
        assert not any(stop in reply for stop in stops), (case, inputs, body)
        if not stops:  # the end of sequence is held until min_tokens
            assert count >= least, (case, inputs, body)
    assert server.health()["status"] == "READY"


@pytest.mark.parametrize("name,value", [("temperature", 2), ("repetition_penalty", 2), ("top_p", 1)])
def test_an_integer_where_a_float_is_expected_works_exactly_like_the_float(server, name, value):
    as_int = server.predict(prompt="Hi", max_tokens=20, seed=5, **{name: value}).json()
    as_float = server.predict(prompt="Hi", max_tokens=20, seed=5, **{name: float(value)}).json()
    assert as_int["status"] == as_float["status"] == "succeeded", as_int
    assert as_int["output"] == as_float["output"]


def test_deprecated_aliases_still_work(server):
    old = server.predict(prompt="Hi", max_new_tokens=7, min_new_tokens=7, seed=3).json()
    new = server.predict(prompt="Hi", max_tokens=7, min_tokens=7, seed=3).json()
    both = server.predict(prompt="Hi", max_tokens=7, max_new_tokens=7, min_tokens=7, min_new_tokens=7, seed=3).json()
    assert old["status"] == new["status"] == both["status"] == "succeeded", old
    assert old["output"] == new["output"] == both["output"]
    assert old["metrics"]["output_token_count"] == 7


def test_an_input_name_the_schema_lacks_is_ignored_as_docs_coglet_says(server):
    """coglet drops a name the schema lacks before predict sees it: a misspelt max_token runs with the default."""
    typo = server.predict(prompt="Hi", max_token=2, min_tokens=20, seed=4).json()
    assert typo["status"] == "succeeded" and typo["metrics"]["output_token_count"] >= 20, typo


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"max_tokens": 10, "max_new_tokens": 20},
         "max_tokens (10) and its deprecated alias max_new_tokens (20) disagree: send only max_tokens"),
        ({"min_tokens": 2, "min_new_tokens": 3},
         "min_tokens (2) and its deprecated alias min_new_tokens (3) disagree: send only min_tokens"),
        ({"max_tokens": 5, "min_tokens": 6}, "min_tokens (6) must not exceed max_tokens (5)"),
        ({"max_new_tokens": 5, "min_new_tokens": 6}, "min_new_tokens (6) must not exceed max_new_tokens (5)"),
        ({"min_new_tokens": 600}, "min_new_tokens (600) must not exceed max_tokens (512)"),
    ],
)
def test_bad_combinations_fail_clearly_and_the_server_stays_healthy(server, inputs, message):
    body = server.predict(prompt="Hi", **inputs).json()
    assert body["status"] == "failed" and message in body["error"], body
    assert server.wait_ready()["status"] == "READY"
    assert server.predict(prompt="Hi", max_tokens=3).json()["status"] == "succeeded"


def test_too_long_prompt_fails_with_its_token_count(server, engine):
    # At the schema's character limit (it lets through what might be a prompt of long tokens): the
    # context refuses it, quickly, with the count.
    prompt = "word " * (MAX_PROMPT_CHARS // 5)
    t0 = time.monotonic()
    body = server.predict(prompt=prompt, max_tokens=10).json()
    n = len(engine.prompt.ids("", prompt))
    assert body["status"] == "failed", body
    assert f"{n:,} tokens" in body["error"] and "32,768" in body["error"]
    assert time.monotonic() - t0 < 30
    assert server.wait_ready()["status"] == "READY"
    assert server.predict(prompt="Hi", max_tokens=3).json()["status"] == "succeeded"


def test_cancel_stops_generation_and_the_next_prediction_works(server):
    result = cancel_mid_generation(server)
    assert result["started"] and result["cores_busy_generating"] > 0.5  # generating: a core busy
    assert result["cancel_http_status"] == 200 and result["canceled"]
    assert result["cores_busy_after_cancel"] < 0.13  # the generation itself stopped, not only the stream
    assert server.wait_ready()["status"] == "READY"
    assert server.predict(prompt="Hi", max_tokens=3).json()["status"] == "succeeded"


def readme_curl_commands() -> list[str]:
    """The curl commands of the README's HTTP API section, as written (continuations and all)."""
    section = (REPO / "README.md").read_text().split("## The HTTP API", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands: list[str] = []
    for line in block.splitlines():
        if line.startswith("curl"):
            commands.append(line)
        elif commands and not line.startswith("#") and line.strip():
            commands[-1] += "\n" + line
    return commands


def test_the_readmes_curl_examples_work_against_the_server(server):
    """Each curl command of the README's HTTP API section, run as written against the real server:
    the replies are what the README says they are. Two changes for the test: the async example's
    webhook goes to a local receiver, and its story is held to 20,000 tokens (the tiny model's
    stories end in a few), so that the cancel after it finds it running."""
    commands = readme_curl_commands()
    assert len(commands) == 8, commands
    webhooks = Webhooks()
    try:
        for command in commands:
            command = command.replace("http://localhost:5000", server.url).replace("https://example.com/hook", webhooks.url)
            if "/cancel" in command:
                command += " -o /dev/null -w '%{http_code}'"
            if "respond-async" in command:
                command = command.replace('"Tell me a long story."', '"Tell me a long story.", "max_tokens": 20000, "min_tokens": 20000')
            run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, (command, run.stderr)
            out = run.stdout
            if "/health-check" in command:
                assert json.loads(out)["status"] in ("READY", "BUSY"), out
            elif "/openapi.json" in command:
                assert "prompt_template" in json.loads(out)["components"]["schemas"]["Input"]["properties"]
            elif "/cancel" in command:
                assert out == "200", out
                assert webhooks.wait_for(lambda hook: hook["status"] == "canceled", timeout=30), webhooks.received
            elif "text/event-stream" in command:
                events = [line for line in out.splitlines() if line.startswith("event:")]
                assert events.count("event: output") > 1 and events[-1] == "event: completed", out[-500:]
                assert '"status":"succeeded"' in out.replace(" ", "")
            elif "respond-async" in command:
                assert json.loads(out)["status"] in ("starting", "processing"), out
            else:
                body = json.loads(out)
                assert body["status"] == "succeeded" and "".join(body["output"]), (command, body)
    finally:
        webhooks.close()
    assert server.wait_ready(timeout=30)["status"] == "READY"


def test_missing_weights_fail_setup_naming_the_download_command(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    logs = failed_setup_logs(empty, tmp_path / "server.log")
    assert f"python scripts/download_weights.py --dir {empty}" in logs


@pytest.mark.skipif(torch.cuda.is_available() or "NOTUS_DEVICE" in os.environ, reason="needs a machine without a GPU")
def test_serve_asks_for_the_cpu_itself_and_says_so(server):
    assert "no usable CUDA device, so NOTUS_DEVICE=cpu" in server.log_path.read_text()
    assert "Running on the CPU in float32 (NOTUS_DEVICE=cpu)" in server.health()["setup"]["logs"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_usable_gpu_the_built_image_fails_setup_naming_the_cause(tiny_weights, tmp_path):
    # The built image sets no NOTUS_DEVICE: it wants CUDA, as NOTUS_DEVICE=cuda does here.
    logs = failed_setup_logs(tiny_weights, tmp_path / "server.log", env={"NOTUS_DEVICE": "cuda"})
    assert "No usable CUDA device" in logs and f"torch {torch.__version__}" in logs
    # torch's own reason: a CPU-only build (this project's tests) or a CUDA build with no driver (the image's)
    reason = "Found no NVIDIA driver" if torch.version.cuda else "Torch not compiled with CUDA enabled"
    assert reason in logs
    assert "set NOTUS_DEVICE=cpu" in logs
    assert "weights read from disk" not in logs  # failed before loading (or downloading) anything


def test_smoke_script_passes_every_check_on_the_tiny_model(tmp_path):
    """scripts/smoke_server.py, the GPU issue's end-to-end run (setup, sync, SSE, cancel), on the CPU."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke_server.py"), "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (report_file,) = tmp_path.glob("smoke-*.json")
    report = json.loads(report_file.read_text())
    assert len(report["checks"]) == 7 and all(c["ok"] for c in report["checks"])
    assert any("weights loaded in" in line for line in report["setup_timings"])
    assert any("warm-up done in" in line for line in report["setup_timings"])
    assert report["torch"] == torch.__version__ and "smoke_server.py --tiny" in report["command"]
