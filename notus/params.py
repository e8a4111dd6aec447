"""One request's settings: every input's limits, JSON numbers made exact, the deprecated aliases.

predict.py declares its Cog inputs with these limits, so the schema refuses an out-of-range value
with a 422 naming the field; `SamplingParams.validate` checks them again (and what the schema
cannot express) for callers that do not come through Cog, with errors naming the limit and value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# notus's max_position_embeddings: the prompt plus the reply, in tokens.
CONTEXT_LENGTH = 32768
VOCAB_SIZE = 32000
# The longest piece of notus's vocabulary is 16 characters, so no text that fits the context is
# longer than this: a prompt beyond it can only fail, and is refused before it is tokenized.
LONGEST_PIECE_CHARS = 16
MAX_PROMPT_CHARS = CONTEXT_LENGTH * LONGEST_PIECE_CHARS
# And no piece stands for more than 48 bytes of UTF-8 (16 typed U+2581 `▁`, 3 bytes each): a prompt of
# characters outside the vocabulary within MAX_PROMPT_CHARS (4 bytes, so 4 byte tokens each: 2 million
# tokens, 1.7 s of tokenizing) is refused untokenized too.
LONGEST_PIECE_BYTES = 48
MAX_PROMPT_BYTES = CONTEXT_LENGTH * LONGEST_PIECE_BYTES
# Stop sequences are short markers ("\n\nUser:"); matching cost grows with their length.
MAX_STOP_SEQUENCES_CHARS = 1000
MAX_TEMPERATURE = 5.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 5.0
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty: -2 to 2, as OpenAI's
# A seed is a 32-bit unsigned integer, the range of the seeds this container picks itself.
MAX_SEED = 2**32 - 1

DEFAULT_MAX_TOKENS = 512
DEFAULT_MIN_TOKENS = 0

_INTEGERS = ("max_tokens", "min_tokens", "top_k", "seed")
_FLOATS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings, with the meaning the Cog inputs document."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = DEFAULT_MIN_TOKENS
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95  # 1 = off; 0 keeps only the most likely token
    top_k: int = 50  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # 0 = off; subtracted once from every token already in the reply
    frequency_penalty: float = 0.0  # 0 = off; subtracted per occurrence in the reply
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None  # None = pick one (and log it)

    def __post_init__(self) -> None:
        # JSON has one number type: `"temperature": 2` arrives as an int, `"top_k": 3.0` as a float.
        for name in _FLOATS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        for name in _INTEGERS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_int(name, getattr(self, name)))

    def validate(self, sent_as: dict[str, str] | None = None) -> None:
        """Clear errors naming the limit and the value, and each field by the name the caller sent
        (`sent_as`: a field's deprecated alias, where the caller used that)."""
        max_name, min_name = ((sent_as or {}).get(name, name) for name in ("max_tokens", "min_tokens"))
        _check(1 <= self.max_tokens <= CONTEXT_LENGTH, f"max_tokens must be between 1 and {CONTEXT_LENGTH}, got {self.max_tokens}")
        _check(0 <= self.min_tokens <= CONTEXT_LENGTH, f"min_tokens must be between 0 and {CONTEXT_LENGTH}, got {self.min_tokens}")
        _check(self.min_tokens <= self.max_tokens, f"{min_name} ({self.min_tokens}) must not exceed {max_name} ({self.max_tokens})")
        _check(0 <= self.temperature <= MAX_TEMPERATURE, f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}")
        _check(0 <= self.top_p <= 1, f"top_p must be between 0 and 1, got {self.top_p}")
        _check(0 <= self.top_k <= VOCAB_SIZE, f"top_k must be between 0 (off) and {VOCAB_SIZE}, got {self.top_k}")
        _check(
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"repetition_penalty must be between {MIN_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g}, "
            f"got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-MAX_PENALTY <= value <= MAX_PENALTY, f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value}")
        _check(self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}, got {self.seed}")


def with_alias(name: str, value: int, default: int, alias: str, alias_value: int | None) -> int:
    """The value of an input that kept its old name as a deprecated alias.

    The alias counts when it is given and the new name is left at its default; given both with
    different values, the request fails naming both.
    """
    if alias_value is None:
        return value
    if value != default and _as_int(name, value) != _as_int(alias, alias_value):
        raise ValueError(
            f"{name} ({value}) and its deprecated alias {alias} ({alias_value}) disagree: send only {name}"
        )
    return alias_value


def _as_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_int(name: str, value: int | float) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
