"""A fast check of the checkpoint before loading it: no hashing, just headers and sizes.

Catches a missing, truncated or foreign file at setup with a message naming the file and the fix,
instead of loading garbage or failing later with a cryptic tensor error. Reads only config.json,
the shard index and each shard's safetensors header (a few KB per shard).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from notus.weights import DOWNLOAD_COMMAND, MANIFEST

# What notus-7b-v1 must be: a Mistral causal LM with Llama's 32k SentencePiece vocabulary.
EXPECTED_CONFIG = {"model_type": "mistral", "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}. Fetch the weights again with `{DOWNLOAD_COMMAND}`.")


def check_checkpoint(weights_dir: str | Path) -> dict[str, int]:
    """Raises CheckpointError on the first problem; returns {shard name: size in bytes}."""
    weights_dir = Path(weights_dir)
    config = _read_config(weights_dir / "config.json")
    expected = expected_shapes(config)
    shards = _shard_names(weights_dir)
    recorded = _verified_sizes(weights_dir)
    found: dict[str, list[int]] = {}
    sizes = {}
    for name in shards:
        header, sizes[name] = read_safetensors_header(weights_dir / name)
        if name in recorded and sizes[name] != recorded[name]:
            raise CheckpointError(
                weights_dir / name, f"is {sizes[name]:,} bytes, the verified download was {recorded[name]:,}"
            )
        for tensor, info in header.items():
            if tensor == "__metadata__":
                continue
            if tensor not in expected and not tensor.endswith("rotary_emb.inv_freq"):
                raise CheckpointError(weights_dir / name, f"holds tensor {tensor!r}, which notus-7b-v1 does not have")
            found[tensor] = info["shape"]
    for tensor, shape in expected.items():
        if tensor not in found:
            raise CheckpointError(weights_dir, f"no shard holds tensor {tensor!r}")
        if found[tensor] != shape:
            raise CheckpointError(
                weights_dir, f"tensor {tensor!r} has shape {found[tensor]}, config.json says {shape}"
            )
    return sizes


def _verified_sizes(weights_dir: Path) -> dict[str, int]:
    """Sizes recorded by the verified download (weights/VERIFIED.json), if there was one."""
    path = weights_dir / MANIFEST
    if not path.exists():
        return {}
    try:
        return {name: entry["size"] for name, entry in json.loads(path.read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"cannot be read ({e!r})") from None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot be read as JSON ({e})") from None
    for key, value in EXPECTED_CONFIG.items():
        if config.get(key) != value:
            raise CheckpointError(path, f"{key} is {config.get(key)!r}, notus-7b-v1 has {value!r}")
    if "MistralForCausalLM" not in config.get("architectures", []):
        raise CheckpointError(path, f"architectures is {config.get('architectures')!r}, not MistralForCausalLM")
    return config


def expected_shapes(config: dict) -> dict[str, list[int]]:
    """Every tensor of MistralForCausalLM and its shape, from config.json alone."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {
        "model.embed_tokens.weight": [vocab, hidden],
        "model.norm.weight": [hidden],
        "lm_head.weight": [vocab, hidden],
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [heads * head_dim, hidden],
            p + "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
            p + "self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
            p + "self_attn.o_proj.weight": [hidden, heads * head_dim],
            p + "mlp.gate_proj.weight": [inter, hidden],
            p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
        }
    return shapes


def _shard_names(weights_dir: Path) -> list[str]:
    index_path = weights_dir / "model.safetensors.index.json"
    if not index_path.exists():
        if (weights_dir / "model.safetensors").exists():
            return ["model.safetensors"]
        raise CheckpointError(weights_dir, "has neither model.safetensors.index.json nor model.safetensors")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(index_path, f"is not a safetensors index ({e!r})") from None
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (weights_dir / name).is_file():
            raise CheckpointError(weights_dir / name, "is missing (model.safetensors.index.json names it)")
    return names


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file, after checking the file holds all the bytes it announces."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(path, f"is {size} bytes, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(path, "is not a safetensors file (its header length makes no sense)")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(path, f"has an unreadable safetensors header ({e!r})") from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise CheckpointError(path, f"is {size:,} bytes but its header says {expected:,}: truncated or corrupt")
    return header, size
