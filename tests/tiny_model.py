"""A tiny random model of notus's architecture, with notus's real tokenizer and small files.

Same model class, vocabulary, special tokens, context length and chat template as notus-7b-v1;
only the widths and depth are shrunk so it runs on a CPU in milliseconds per token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common
import torch
from transformers import MistralConfig, MistralForCausalLM

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights"
SMALL_FILES = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"]
# mistral-common ships Mistral-7B-v0.1's tokenizer.model, byte-identical to notus's.
TOKENIZER_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
EOS_ID = 2


def build_tiny_notus(out: Path, eos_scale: float = 4.0, seed: int = 0) -> Path:
    """Writes a loadable weights dir to `out`. `eos_scale` makes EOS come up now and then."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        shutil.copy(WEIGHTS / name, out / name)
    shutil.copy(TOKENIZER_MODEL, out / "tokenizer.model")
    config_dict = json.loads((WEIGHTS / "config.json").read_text())
    config_dict.update(TINY, torch_dtype="float32")
    config = MistralConfig(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] *= eos_scale
    # Sharded with an index, like the real checkpoint.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5MB")
    # save_pretrained rewrites config.json; keep notus's own fields apart from the shrunk sizes.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    return out
