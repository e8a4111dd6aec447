"""Cog adapter for notus-7b-v1: the inputs as the Replicate playground shows them, and the wiring.

All the logic lives in the `notus` package beside this file, which runs and is tested without Cog.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from cog import BasePredictor, ConcatenateIterator, Input

from notus.checkpoint import check_checkpoint
from notus.engine import MAX_NEW_TOKENS_LIMIT, Engine, GenerationStats, SamplingParams
from notus.stream import parse_stop_sequences
from notus.weights import DEFAULT_WEIGHTS_DIR, ensure_weights

log = logging.getLogger("notus")


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None) -> None:
        _log_to_stdout()
        t0 = time.perf_counter()
        # Cog passes COG_WEIGHTS as `weights`; without it, the weights/ folder of this project.
        weights_dir = ensure_weights(weights or os.environ.get("COG_WEIGHTS") or DEFAULT_WEIGHTS_DIR)
        t_check = time.perf_counter()
        check_checkpoint(weights_dir)  # a broken file fails here, named, not deep inside the load
        log.info("checkpoint checked in %.2f s", time.perf_counter() - t_check)
        self.engine = Engine.load(weights_dir)
        self.engine.warm_up()
        log.info("setup done in %.2f s", time.perf_counter() - t0)
        # Cog reads our stdout on another thread and closes the setup logs when setup returns:
        # a moment's pause keeps these last lines in them (seen missing without it).
        time.sleep(0.3)

    def predict(
        self,
        prompt: str = Input(description="Your message to the assistant.", min_length=1),
        system_prompt: str = Input(
            default="",
            description="Instructions that shape every reply (the chat's system message). "
            "Leave empty for none: the model was trained with an empty system turn in that case.",
        ),
        max_new_tokens: int = Input(
            default=512, ge=1, le=MAX_NEW_TOKENS_LIMIT,
            description="The most tokens to generate (a token is about 3/4 of a word). Lowered "
            "automatically when the prompt plus this exceeds the 32,768-token context.",
        ),
        min_new_tokens: int = Input(
            default=0, ge=0, le=MAX_NEW_TOKENS_LIMIT,
            description="The fewest tokens to generate: the end of the reply is held off until then.",
        ),
        temperature: float = Input(
            default=0.7, ge=0.0, le=5.0,
            description="Randomness of the reply: higher is more varied, lower more focused; "
            "0 always picks the most likely token (deterministic).",
        ),
        top_p: float = Input(
            default=0.95, ge=0.0, le=1.0,
            description="Nucleus sampling: sample only from the most likely tokens whose "
            "probabilities add up to top_p. Must be above 0; 1 turns it off.",
        ),
        top_k: int = Input(
            default=50, ge=0,
            description="Sample only from the top_k most likely tokens; 0 turns it off.",
        ),
        repetition_penalty: float = Input(
            default=1.0, ge=0.0,
            description="Penalise tokens already in the text: above 1 repeats less. Must be above 0; "
            "1 turns it off.",
        ),
        stop_sequences: str = Input(
            default="",
            description="Comma-separated texts that end the reply, e.g. '<end>,<stop>'. "
            "The reply stops right before the first one.",
        ),
        seed: Optional[int] = Input(
            default=None,
            description="Random seed for a repeatable reply. Leave empty for a random one "
            "(the seed used is in the logs).",
        ),
    ) -> ConcatenateIterator[str]:
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop_sequences=tuple(parse_stop_sequences(stop_sequences)),
            seed=seed,
        )
        stats = GenerationStats()
        try:
            yield from self.engine.stream(system_prompt, prompt, params, stats)
        finally:
            for name, value in stats.metrics().items():
                self.record_metric(name, value)


def _log_to_stdout() -> None:
    """The notus logger's lines go to stdout, which Cog shows as the prediction's logs."""
    if not log.handlers:
        handler = logging.StreamHandler(_CurrentStdout())
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class _CurrentStdout:
    """Writes to whatever sys.stdout is at the time: Cog swaps it to capture each prediction's logs."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
