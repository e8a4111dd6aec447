#!/usr/bin/env bash
# The GPU issue's runs, one step per device call, each well inside the 10-minute limit of a call.
# First, here: scripts/gpu_wheels.sh. Then, through the device tool, with carry [".whl"]:
#   bash scripts/gpu_check.sh tests    # the test suite on CUDA (tiny model, float32), greedy parity and
#                                      # teacher-forced logit parity (exact size, bf16)
#   bash scripts/gpu_check.sh decode   # scripts/benchmark.py --streams 1 8 32 (exact size, random bf16)
#   bash scripts/gpu_check.sh serve    # a random checkpoint on disk: cold load, the server (1/8/32
#                                      # clients, 100 back to back), then a second boot: its setup
#                                      # timings, a sync prediction, an SSE stream and a cancel
# Results (JSON, logs) go to $OUT, which the device tool brings back; every one names the torch
# that ran (the machine's own) and the exact command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHON=python3
python3 - <<'EOF' | tee "$OUT/versions.txt"
import importlib.metadata, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no usable GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {gpu}; transformers {transformers.__version__}; "
      f"cog {importlib.metadata.version('cog')}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$OUT/versions.txt" || true

case "${1:-}" in
  tests)
    # In-process tests on the GPU (NOTUS_DEVICE=cuda); the servers they start serve on it too. In
    # float32: the tests compare tokens exactly, and bf16 rounding flips the tiny random model's near
    # ties; greedy parity then checks bf16 on notus's exact size, with generate's margin where they differ.
    NOTUS_DEVICE=cuda NOTUS_DTYPE=float32 timeout 330 python3 -m pytest -q -p no:cacheprovider -rfEs 2>&1 \
      | tee "$OUT/tests.log" | tail -40
    timeout 150 python3 scripts/greedy_parity.py --out "$OUT"
    # Teacher-forced logits against transformers' forward in bf16 (prefill, decode, the graphs' masked shape).
    timeout 90 python3 scripts/logit_parity.py --out "$OUT"
    # Which fused attention kernels SDPA may use for notus's shapes in notus/forward.py (a False
    # everywhere means the math kernel: the scores materialised).
    python3 - <<'PY' 2>&1 | tee "$OUT/sdpa.txt"
import torch
from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_efficient_attention, can_use_flash_attention
def t(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(1, 1, 2048, 6144, device="cuda", dtype=torch.bool)
cases = {  # name: (q, k, mask, is_causal, enable_gqa)
    "prefill, first chunk (causal, gqa)": (t(1, 32, 2048, 128), t(1, 8, 2048, 128), None, True, True),
    "prefill, later chunk (mask, kv repeated)": (t(1, 32, 2048, 128), t(1, 32, 6144, 128), mask, False, False),
    "prefill, later chunk (mask, gqa)": (t(1, 32, 2048, 128), t(1, 8, 6144, 128), mask, False, True),
    "decode, 32 rows (mask, folded queries)": (t(32, 8, 4, 128), t(32, 8, 4096, 128),
                                               torch.ones(32, 1, 1, 4096, device="cuda", dtype=torch.bool), False, False),
}
for name, (q, k, m, causal, gqa) in cases.items():
    p = SDPAParams(q, k, k, m, 0.0, causal, gqa)
    print(f"{name}: flash {can_use_flash_attention(p)}, efficient {can_use_efficient_attention(p)}, "
          f"cudnn {can_use_cudnn_attention(p)}")
PY
    ;;
  decode)
    timeout 540 python3 scripts/benchmark.py --streams 1 8 32 --out "$OUT"
    ;;
  serve)
    weights=/tmp/notus-random
    timeout 190 python3 scripts/benchmark_load.py --random "$weights" --out "$OUT"
    timeout 230 python3 scripts/benchmark_server.py --random "$weights" --out "$OUT"
    # A second boot of the same image (the page cache is warm now): setup's phase timings again, then a
    # sync prediction, an SSE stream and a cancel.
    timeout 140 python3 scripts/smoke_server.py --random "$weights" --out "$OUT"
    ;;
  *)
    echo "usage: $0 tests|decode|serve" >&2
    exit 2
    ;;
esac
