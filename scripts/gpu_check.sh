#!/usr/bin/env bash
# The GPU check in one device call of at most 8 minutes, its steps in order of value, each under its
# own time limit and each writing its results to $OUT as it finishes (a cut run still returns what
# it did):
#   1. the CUDA-only tests (tests/test_cuda.py: graph replays, no synchronising copy, pinned kernels; bf16, as shipped)
#   2. the engine's tests on CUDA (tests/test_engine.py, tests/test_scheduler.py; float32)
#   3. the decode benchmark: batch 1 against plain generate, then 1, 8 and 32 streams (exact size, bf16)
#   4. teacher-forced logits against transformers' forward (exact size, bf16), and the attention kernels that ran
#   5. the server end to end on a random checkpoint of the exact size: setup's timings, a sync
#      prediction, an SSE stream, a cancel
# First, here: scripts/gpu_wheels.sh. Then through the device tool, with carry [".whl"] and timeout_s 540:
#   bash scripts/gpu_check.sh
# Rehearsal on a CPU, in a copy of the GPU machine's Python (docs/gpu.md): bash scripts/gpu_check.sh --tiny
# $OUT/steps.jsonl has a line per step (its exit status, seconds, command); every JSON names the torch that ran.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
: >"$OUT/steps.jsonl"
timeout -k 5 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHON=python3

if [ "${1:-}" = "--tiny" ]; then  # the rehearsal: the same steps, the tiny model on the CPU
  export NOTUS_DEVICE=cpu
  model=(--tiny) bench=(--streams 1 8 --reps 2 --new-tokens 32) checkpoint=(--tiny)
else
  model=() bench=(--streams 1 8 32 --reps 3 --new-tokens 128) checkpoint=(--random /tmp/notus-random)
fi

timeout -k 5 20 python3 - <<'EOF' | tee "$OUT/versions.txt"
import importlib.metadata, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no usable GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {gpu}; transformers {transformers.__version__}; "
      f"cog {importlib.metadata.version('cog')}")
EOF
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$OUT/versions.txt" 2>/dev/null

step() {  # step NAME SECONDS COMMAND...: runs it under its limit, logs to $OUT/NAME.log, notes it in steps.jsonl
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  python3 -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": int(sys.argv[3]),
    "limit": int(sys.argv[4]), "timed_out": sys.argv[2] in ("124", "137"), "command": " ".join(sys.argv[5:])}))' \
    "$name" "$rc" "$((SECONDS - start))" "$limit" "$@" >>"$OUT/steps.jsonl"
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  tail -n 12 "$OUT/$name.log"
}

device=${NOTUS_DEVICE:-cuda}
pytest=(python3 -m pytest -q -p no:cacheprovider -rfEs)
# The graphs, the kernels and the copies as they ship: bf16. The engine's tests compare tokens exactly:
# float32 (bf16 rounding flips the tiny random model's near ties).
step tests-cuda 60 env NOTUS_DEVICE="$device" "${pytest[@]}" --junitxml="$OUT/tests-cuda.xml" tests/test_cuda.py
# Less the tests marked cpu_script, which run a script with --device cpu whatever NOTUS_DEVICE says (CI
# runs them): about half of this step's time in the rehearsal, none of it on the GPU.
step tests-engine 80 env NOTUS_DEVICE="$device" NOTUS_DTYPE=float32 "${pytest[@]}" --junitxml="$OUT/tests-engine.xml" \
  -m "not cpu_script" \
  tests/test_engine.py tests/test_compaction.py tests/test_prefill.py tests/test_scheduler.py
step decode 120 python3 scripts/benchmark.py "${model[@]}" "${bench[@]}" --out "$OUT"
step logits 60 python3 scripts/logit_parity.py "${model[@]}" --out "$OUT"
step server 110 python3 scripts/smoke_server.py "${checkpoint[@]}" --out "$OUT"
echo "== steps: $(python3 -c 'import json, sys; print(", ".join("%s %s" % (s["step"], s["rc"]) for s in map(json.loads, open(sys.argv[1]))))' "$OUT/steps.jsonl")"
