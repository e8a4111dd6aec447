"""scripts/benchmark_load.py runs (here on the tiny checkpoint; its figures matter on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.cpu_script
def test_load_benchmark_writes_its_ratios(tiny_weights, tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_load.py"), "--weights", str(tiny_weights),
         "--device", "cpu", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (result_file,) = tmp_path.glob("load-*.json")
    result = json.loads(result_file.read_text())
    assert result["bytes"] == sum(p.stat().st_size for p in tiny_weights.glob("*.safetensors"))
    assert result["load_over_read"] == result["load_seconds"] / result["disk_read_seconds"]
    assert result["device"] == "cpu" and result["peak_host_anon_bytes"] >= result["host_anon_bytes_before"]
    assert result["read_seconds"] + result["move_seconds"] <= result["load_seconds"]
    assert "benchmark_load.py" in result["command"]
