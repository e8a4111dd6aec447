"""The schema `cog build` writes: streaming only with @cog.streaming, as cog's builder decides it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, Server
from notus.capacity import (A40_MEMORY, CUDA_CONTEXT, DEFAULT_CONCURRENCY, KV_BUDGET_ENV, budget_from_free,
                            kv_budget_bytes, plan_slots)
from notus.forward import KVCache
from notus.schema import declared_concurrency, declares_streaming

HEADER = "from cog import BasePredictor, ConcatenateIterator\n"


def predictor(decorators: str = "", imports: str = "", returns: str = "ConcatenateIterator[str]") -> str:
    return HEADER + imports + textwrap.dedent(f"""
        class Predictor(BasePredictor):
            {decorators}
            def predict(self, prompt: str) -> {returns}:
                yield "echo: "
                yield prompt
        """)


@pytest.mark.parametrize(
    "imports,decorators",
    [
        ("import cog\n", "@cog.streaming"),
        ("import cog\n", "@cog.streaming()"),
        ("import cog as c\n", "@c.streaming"),
        ("from cog import streaming\n", "@streaming"),
        ("from cog import streaming as s\n", "@s"),
    ],
)
def test_the_streaming_decorator_is_read_from_the_source(imports, decorators):
    assert declares_streaming(predictor(decorators, imports), "Predictor")


@pytest.mark.parametrize(
    "imports,decorators",
    [
        ("", ""),
        ("import cog\n", ""),
        ("import cog\n", "@cog.concurrent(max=2)"),
        ("from functools import cache as streaming\n", "@streaming"),  # not cog's
        ("import other as cog\n", "@cog.streaming"),
    ],
)
def test_without_cogs_streaming_decorator_there_is_no_streaming(imports, decorators):
    assert not declares_streaming(predictor(decorators, imports), "Predictor")


def test_this_projects_predictor_declares_streaming():
    assert declares_streaming((REPO / "predict.py").read_text(), "Predictor")


def write_schema(directory: Path) -> subprocess.CompletedProcess:
    # notus importable from the predictor's directory, ahead of (not instead of) a PYTHONPATH already set
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "notus.schema", "--predictor", "predict.py:Predictor", "--out", ".cog/openapi_schema.json"],
        cwd=directory, env=env, capture_output=True, text=True, timeout=120,
    )


def test_streaming_decorator_on_a_non_iterator_is_refused(tmp_path):
    (tmp_path / "predict.py").write_text(predictor("@cog.streaming", "import cog\n", returns="str"))
    result = write_schema(tmp_path)
    assert result.returncode != 0 and "@streaming requires Iterator" in result.stderr


@pytest.mark.parametrize("decorated", [False, True])
def test_sse_needs_the_decorator_as_in_the_built_image(tmp_path, decorated):
    (tmp_path / "predict.py").write_text(predictor("@cog.streaming" if decorated else "", "import cog\n"))
    assert write_schema(tmp_path).returncode == 0
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"  # the worker is a bare `python`
    server = Server(None, tmp_path / "server.log", cwd=tmp_path,
                    command=[sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                    env={"COG_PREDICT_TYPE_STUB": "predict.py:Predictor", "PATH": path})
    try:
        schema = requests.get(f"{server.url}/openapi.json", timeout=5).json()
        assert schema["paths"]["/predictions"]["post"].get("x-cog-streaming", False) is decorated
        sse = server.predict(prompt="hi", headers={"Accept": "text/event-stream"})
        assert sse.status_code == (200 if decorated else 406), sse.text
        # coglet frees a slot just after a stream's last event; this stub has one (no @cog.concurrent).
        server.wait_ready()
        body = server.predict(prompt="hi").json()
        assert body.get("output") == ["echo: ", "hi"], body  # JSON works either way
    finally:
        server.stop()


def concurrent_predictor(decorator: str, imports: str = "import cog\n", asynchronous: bool = True) -> str:
    return f"{imports}class Predictor:\n    {decorator}\n    {'async ' if asynchronous else ''}def predict(self): ...\n"


@pytest.mark.parametrize(
    "source,expected",
    [
        (concurrent_predictor("@cog.concurrent(max=32)"), 32),
        (concurrent_predictor("@c.concurrent(max=4)", "import cog as c\n"), 4),
        (concurrent_predictor("@concurrent(max=2)", "from cog import concurrent\n"), 2),
        (concurrent_predictor("@cog.concurrent"), 1),
        (concurrent_predictor("@cog.concurrent()"), 1),
        (concurrent_predictor("@cog.streaming"), None),
        (concurrent_predictor("@other.concurrent(max=9)", "import other\n"), None),
    ],
)
def test_concurrency_is_read_from_the_source_as_cog_build_reads_it(source, expected):
    assert declared_concurrency(source, "Predictor") == expected


@pytest.mark.parametrize(
    "source,message",
    [
        (concurrent_predictor("@cog.concurrent(max=N)"), "integer literal"),
        (concurrent_predictor("@cog.concurrent(8)"), "literal integer max="),
        (concurrent_predictor("@cog.concurrent(max=0)"), "at least 1"),
        (concurrent_predictor("@cog.concurrent(max=8)", asynchronous=False), "requires an async"),
    ],
)
def test_concurrency_the_builder_refuses_is_refused(source, message):
    with pytest.raises(ValueError, match=message):
        declared_concurrency(source, "Predictor")


def test_the_image_admits_the_default_concurrency_and_it_fits_an_a40():
    """predict.py's literal (what `cog build` bakes in) is notus/capacity.py's worked-out default,
    and that many 512 MiB slots fit an A40 beside notus's bf16 weights and the reserve."""
    assert declared_concurrency((REPO / "predict.py").read_text(), "Predictor") == DEFAULT_CONCURRENCY
    config = AutoConfig.from_pretrained(REPO / "weights")
    per_slot = KVCache.bytes_per_slot(config, torch.bfloat16)
    assert per_slot == 512 * 2**20
    with torch.device("meta"):  # notus's exact architecture, no memory: its bf16 weights' size
        weights = sum(p.numel() * 2 for p in AutoModelForCausalLM.from_config(config).parameters())
    assert 14.4e9 < weights < 14.6e9
    fit = budget_from_free(A40_MEMORY - CUDA_CONTEXT - weights) // per_slot - 1  # less the scratch slot
    assert DEFAULT_CONCURRENCY <= fit < 2 * DEFAULT_CONCURRENCY  # fits, without leaving most of the card idle
    assert fit == 52  # the figure notus/capacity.py and docs/serving.md give
    result = subprocess.run([sys.executable, "-m", "notus.schema", "--concurrency"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == str(DEFAULT_CONCURRENCY)  # what scripts/serve exports


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "-1", "1e300"])
def test_a_kv_cache_budget_that_is_no_size_fails_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv(KV_BUDGET_ENV, value)
    with pytest.raises(ValueError, match=f"{KV_BUDGET_ENV}='{value}' is not a number of GiB"):
        kv_budget_bytes(torch.device("cpu"))
    monkeypatch.setenv(KV_BUDGET_ENV, "0.5")
    assert kv_budget_bytes(torch.device("cpu")) == 2**29


def test_the_slot_plan_counts_the_scratch_slot_the_cache_allocates():
    """KVCache allocates one slot more than the plan's (padding rows write to it): a budget of
    exactly 33 slots' bytes holds 32, and the reserve logged is what the cache takes."""
    per_slot = 512 * 2**20
    assert plan_slots(32, per_slot, 33 * per_slot) == 32
    assert plan_slots(32, per_slot, 33 * per_slot - 1) == 31
    with pytest.raises(RuntimeError, match="scratch slot"):
        plan_slots(1, per_slot, per_slot)
    cache = KVCache(AutoConfig.from_pretrained(REPO / "weights"), slots=2, device=torch.device("meta"),
                    dtype=torch.bfloat16)
    assert sum(t.numel() * t.element_size() for t in (cache.k, cache.v)) == 3 * KVCache.bytes_per_slot(
        AutoConfig.from_pretrained(REPO / "weights"), torch.bfloat16)
