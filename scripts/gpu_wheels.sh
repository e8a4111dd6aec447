#!/usr/bin/env bash
# Here, before a run on a lent GPU machine (which reaches no package registry): the wheels it lacks,
# into .whl/ (ignored by git and by cog build), for the device tool to carry. That machine keeps its own torch
# (2.11, CUDA 13) and everything else it has; these are the versions this project pins (transformers,
# tokenizers, safetensors, the Hugging Face hub client, cog) that its image has older or not at all,
# and the packages they need that it lacks (transformers 5.23 checks at import that safetensors is
# 0.8.0 or newer, regex 2025.10.22 or newer, the hub client 1.31 or newer). mistral-common only ships the tokenizer.model the tests use.
# Then, in each device call: carry [".whl"] and run scripts/gpu_check.sh STEP (it installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() {  # NAME==VERSION as requirements*.txt pin it
  grep -hiE "^$1==" requirements.txt requirements-dev.txt
}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "$(pinned transformers)" "$(pinned tokenizers)" "$(pinned safetensors)" "$(pinned huggingface-hub)" "$(pinned hf-xet)" \
  "$(pinned cog)" "$(pinned mistral-common)" "$(pinned requests)" "$(pinned pytest-timeout)" \
  coglet==0.23.1 structlog==26.1.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0 \
  idna==3.20 click==8.5.1 regex==2026.11.15 typing-extensions==4.16.0
du -sh .whl
