#!/usr/bin/env python
"""Writes a notus-7b-v1 checkpoint with RANDOM weights: it answers with gibberish.

For trying the HTTP API and the Cog contract in a minute without the 14.5 GB download, for the
tests, and for benchmarks. Everything but the weights is notus's own: config.json, the generation
and tokenizer configs (with the chat template), and tokenizer.model (the mistral-common package,
installed by requirements-dev.txt, ships a byte-identical copy).

    python scripts/random_checkpoint.py /tmp/notus-tiny            # tiny: 17 MB, runs on any CPU
    COG_WEIGHTS=/tmp/notus-tiny scripts/serve                      # the real server on it
    python scripts/random_checkpoint.py --full /tmp/notus-random   # notus's exact size (14.5 GB, bf16)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import mistral_common
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights"
SMALL_FILES = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"]
# mistral-common ships Mistral-7B-v0.1's tokenizer.model, byte-identical to notus's.
TOKENIZER_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
# notus's architecture shrunk (same vocabulary, context, sliding window): milliseconds per token on a CPU.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
EOS_ID = 2


def write_small_files(out: Path) -> Path:
    """notus's config, tokenizer and chat template, without weights."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        shutil.copy(WEIGHTS / name, out / name)
    shutil.copy(TOKENIZER_MODEL, out / "tokenizer.model")
    return out


def write_tiny(out: Path, eos_scale: float = 4.0, seed: int = 0) -> Path:
    """The tiny random notus, float32, sharded with an index like the real checkpoint.

    `eos_scale` makes the end-of-sequence token come up now and then, so replies end by themselves.
    """
    config = json.loads((WEIGHTS / "config.json").read_text())
    config.update(TINY, torch_dtype="float32")
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] *= eos_scale
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5MB")
    # save_pretrained rewrites the configs: notus's own files, with only the sizes shrunk.
    write_small_files(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_full(out: Path) -> Path:
    """notus's exact architecture with random bf16 weights, sharded like the real one (14.5 GB)."""
    config = AutoConfig.from_pretrained(WEIGHTS)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="2GB")
    return write_small_files(out)  # save_pretrained rewrites the configs: notus's own files


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--tiny / --random DIR / --weights DIR (one required): the checkpoint a server script starts on."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="the tiny random notus (CPU)")
    source.add_argument("--random", type=Path, help="a random-weight notus of the exact size here (written if missing)")
    source.add_argument("--weights", type=Path, help="a real checkpoint")


def checkpoint_from(args) -> tuple[Path, str]:
    """(directory, description) of the checkpoint add_checkpoint_arguments' options name, written if needed."""
    if args.tiny:
        return write_tiny(Path(tempfile.mkdtemp(prefix="notus-tiny-"))), "tiny random notus"
    if args.random:
        if not (args.random / "model.safetensors.index.json").exists():
            write_full(args.random)
        return args.random, "random-weight notus-7b-v1 (exact config), bf16"
    return args.weights, f"notus-7b-v1 weights from {args.weights}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the directory to write (created if missing)")
    parser.add_argument("--full", action="store_true", help="notus's exact size instead of the tiny model")
    args = parser.parse_args()
    out = write_full(args.out) if args.full else write_tiny(args.out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"wrote a random-weight notus ({'full size' if args.full else 'tiny'}, {size:,.0f} MB) to {out}: "
          "it writes gibberish; it is for trying the API, tests and benchmarks")


if __name__ == "__main__":
    main()
