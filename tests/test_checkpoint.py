"""Nothing broken is ever loaded: setup's fast check names the bad file and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, failed_setup_logs
from notus.checkpoint import CheckpointError, check_checkpoint
from random_checkpoint import TOKENIZER_MODEL, WEIGHTS

FIX = "python scripts/download_weights.py"


@pytest.fixture
def weights(tiny_weights, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(tiny_weights, tmp_path / "weights"))


def shards(weights: Path) -> list[Path]:
    return sorted(weights.glob("*.safetensors"))


def break_missing_shard(weights: Path) -> Path:
    shard = shards(weights)[1]
    shard.unlink()
    return shard


def break_truncated_shard(weights: Path) -> Path:
    shard = shards(weights)[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    return shard


def break_config(weights: Path) -> Path:
    config = weights / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 32002}))
    return config


def test_a_good_checkpoint_passes(tiny_weights):
    sizes = check_checkpoint(tiny_weights)
    assert sizes == {p.name: p.stat().st_size for p in shards(tiny_weights)}


@pytest.mark.parametrize(
    "breaker,problem",
    [
        (break_missing_shard, "is missing"),
        (break_truncated_shard, "truncated or corrupt"),
        (break_config, "vocab_size is 32002, notus-7b-v1 has 32000"),
    ],
)
def test_broken_checkpoints_are_refused_naming_the_file(weights, breaker, problem):
    bad_file = breaker(weights)
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(weights)
    assert str(bad_file) in str(error.value) and problem in str(error.value) and FIX in str(error.value)


def test_a_foreign_config_is_refused(weights):
    config = weights / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama', notus-7b-v1 has 'mistral'"):
        check_checkpoint(weights)


def test_shapes_must_agree_with_config(weights):
    config = weights / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "intermediate_size": 256}))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight' has shape \[128, 64\], config.json says \[256, 64\]"):
        check_checkpoint(weights)


def test_a_file_that_is_not_safetensors_is_refused(weights):
    shard = shards(weights)[0]
    shard.write_bytes(b"<html>rate limited</html>" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        check_checkpoint(weights)


@pytest.mark.parametrize("breaker", [break_missing_shard, break_truncated_shard, break_config])
def test_setup_fails_through_the_real_server(weights, tmp_path, breaker):
    bad_file = breaker(weights)
    logs = failed_setup_logs(weights, tmp_path / "server.log")
    assert str(bad_file) in logs and FIX in logs
    assert "weights loaded" not in logs  # refused before loading


def test_a_shard_that_changed_since_the_verified_download_is_refused(weights):
    recorded = {p.name: {"size": p.stat().st_size} for p in shards(weights)}
    (weights / "VERIFIED.json").write_text(json.dumps({"files": recorded}))
    check_checkpoint(weights)  # sizes as recorded: fine
    changed = shards(weights)[1]
    recorded[changed.name]["size"] += 8
    (weights / "VERIFIED.json").write_text(json.dumps({"files": recorded}))
    with pytest.raises(CheckpointError, match="the verified download was") as error:
        check_checkpoint(weights)
    assert str(changed) in str(error.value)


def test_the_try_it_command_writes_a_checkpoint_setup_accepts(tmp_path):
    # The README's "try it in a minute": a tiny random notus, then scripts/serve on it (as the
    # session's server fixture does with the same code).
    out = tmp_path / "notus-tiny"
    result = subprocess.run([sys.executable, "scripts/random_checkpoint.py", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=True)
    assert "gibberish" in result.stdout
    check_checkpoint(out)  # what setup checks before loading
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER_MODEL.read_bytes()
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        assert (out / name).read_text() == (WEIGHTS / name).read_text()
