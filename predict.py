"""Cog adapter for notus-7b-v1: the inputs as the Replicate playground shows them, and the wiring.

All the logic lives in the `notus` package beside this file, which runs and is tested without Cog.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

import cog
from cog import BasePredictor, ConcatenateIterator, Input

from notus import coglet_stream

from notus.capacity import admitted_predictions
from notus.checkpoint import check_checkpoint
from notus.engine import Engine, GenerationStats
from notus.loading import pick_device
from notus.messages import conversation
from notus.params import (
    CONTEXT_LENGTH,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    MAX_PENALTY,
    MAX_PROMPT_CHARS,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_SEQUENCES_CHARS,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    VOCAB_SIZE,
    SamplingParams,
    with_alias,
)
from notus.prompt_template import fill
from notus.stream import parse_stop_sequences
from notus.weights import DEFAULT_WEIGHTS_DIR, ensure_weights

log = logging.getLogger("notus")


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None) -> None:
        _log_to_stdout()
        t0 = time.perf_counter()
        device = pick_device()  # before any download: a GPU image without a usable GPU fails now
        # Cog passes COG_WEIGHTS as `weights`; without it, the weights/ folder of this project.
        weights_dir = ensure_weights(weights or os.environ.get("COG_WEIGHTS") or DEFAULT_WEIGHTS_DIR)
        t_check = time.perf_counter()
        check_checkpoint(weights_dir)  # a broken file fails here, named, not deep inside the load
        log.info("checkpoint checked in %.2f s", time.perf_counter() - t_check)
        # One KV-cache slot for each prediction Cog lets in at once (COG_MAX_CONCURRENCY), as many as fit.
        self.engine = Engine.load(weights_dir, device, admitted=admitted_predictions())
        self.engine.warm_up()
        log.info(coglet_stream.install())
        log.info("setup done in %.2f s", time.perf_counter() - t0)
        # Cog reads our stdout on another thread and closes the setup logs when setup returns:
        # a moment's pause keeps these last lines in them (seen missing without it).
        time.sleep(0.3)

    def healthcheck(self) -> bool:
        """False once the engine thread has stopped (an internal error it could not recover from, such
        as a broken GPU): Cog's /health-check then answers UNHEALTHY, not READY, while every prediction
        sent here would fail."""
        engine = getattr(self, "engine", None)
        return engine is None or engine.scheduler.alive

    # Both read from this source by `cog build`: the literal max becomes the image's COG_MAX_CONCURRENCY
    # (why 32: notus/capacity.py); without @cog.streaming the built image refuses SSE (406).
    # A coroutine that returns a plain generator: the one shape coglet 0.23.1 both streams and runs
    # concurrently (notus/coglet_stream.py).
    @cog.concurrent(max=32)
    @cog.streaming
    async def predict(
        self,
        prompt: str = Input(
            default="", max_length=MAX_PROMPT_CHARS,
            description="Your message to the assistant. Leave empty when you send messages instead.",
        ),
        system_prompt: str = Input(
            default="", max_length=MAX_PROMPT_CHARS,
            description="Instructions that shape every reply (the chat's system message). "
            "Leave empty for none: the model was trained with an empty system turn in that case.",
        ),
        messages: list[dict] = Input(
            default=[],
            description="A whole conversation instead of prompt and system_prompt (which must then be "
            'empty), as a JSON list: [{"role": "system", "content": "Be brief."}, {"role": "user", '
            '"content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": '
            '"Tell me a joke."}]. At most one system message, first; then user and assistant take turns, '
            "ending with the user message the reply answers.",
        ),
        max_tokens: int = Input(
            default=DEFAULT_MAX_TOKENS, ge=1, le=CONTEXT_LENGTH,
            description="The most tokens to generate (a token is about 3/4 of a word). Lowered "
            f"automatically when the prompt plus this exceeds the {CONTEXT_LENGTH:,}-token context.",
        ),
        min_tokens: int = Input(
            default=DEFAULT_MIN_TOKENS, ge=0, le=CONTEXT_LENGTH,
            description="The fewest tokens to generate: the end of the reply is held off until then. "
            "At most max_tokens.",
        ),
        temperature: float = Input(
            default=0.7, ge=0.0, le=MAX_TEMPERATURE,
            description="Randomness of the reply: higher is more varied, lower more focused; "
            "0 always picks the most likely token (deterministic).",
        ),
        top_p: float = Input(
            default=0.95, ge=0.0, le=1.0,
            description="Nucleus sampling: sample only from the most likely tokens whose "
            "probabilities add up to top_p. 1 turns it off; 0 keeps only the most likely token.",
        ),
        top_k: int = Input(
            default=50, ge=0, le=VOCAB_SIZE,
            description="Sample only from the top_k most likely tokens; 0 turns it off.",
        ),
        repetition_penalty: float = Input(
            default=1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
            description="Penalise tokens already in the text: above 1 repeats less, below 1 more; "
            "1 turns it off.",
        ),
        presence_penalty: float = Input(
            default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
            description="Penalise every token already in the reply once, whatever its count: above 0 "
            "steers toward new topics. 0 turns it off (OpenAI's meaning).",
        ),
        frequency_penalty: float = Input(
            default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
            description="Penalise tokens by how often they already appear in the reply: above 0 "
            "repeats less. 0 turns it off (OpenAI's meaning).",
        ),
        stop_sequences: str = Input(
            default="", max_length=MAX_STOP_SEQUENCES_CHARS,
            description="Texts that end the reply, separated by commas (so a stop sequence cannot "
            "contain a comma), e.g. '<end>,<stop>'. Spaces around each are ignored: '<end>, <stop>' "
            "is the same. The reply stops right before the first one found.",
        ),
        prompt_template: str = Input(
            default="", max_length=MAX_PROMPT_CHARS,
            description="Your own prompt format instead of notus's chat template, as Replicate's language "
            "models take it: {prompt} and {system_prompt} mark where they go, {{ and }} are literal braces. "
            "'{prompt}' alone sends the prompt as it is. <s>, </s> and <unk> in the result are the special "
            "tokens, and one <s> always comes first. Leave empty for the zephyr chat template notus was "
            "trained with.",
        ),
        seed: Optional[int] = Input(
            default=None, ge=0, le=MAX_SEED,
            description="Random seed (0 to 4294967295) for a repeatable reply. Leave empty for a "
            "random one (the seed used is in the logs).",
        ),
        max_new_tokens: Optional[int] = Input(
            default=None, ge=1, le=CONTEXT_LENGTH, deprecated=True,
            description="Deprecated: the old name of max_tokens, still honoured. Send max_tokens "
            "instead; giving both with different values fails the prediction.",
        ),
        min_new_tokens: Optional[int] = Input(
            default=None, ge=0, le=CONTEXT_LENGTH, deprecated=True,
            description="Deprecated: the old name of min_tokens, still honoured. Send min_tokens "
            "instead; giving both with different values fails the prediction.",
        ),
    ) -> ConcatenateIterator[str]:
        stats = GenerationStats()  # time to first token counts from here
        params = SamplingParams(
            max_tokens=with_alias("max_tokens", max_tokens, DEFAULT_MAX_TOKENS, "max_new_tokens", max_new_tokens),
            min_tokens=with_alias("min_tokens", min_tokens, DEFAULT_MIN_TOKENS, "min_new_tokens", min_new_tokens),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            stop_sequences=tuple(parse_stop_sequences(stop_sequences)),
            seed=seed,
        )
        # Checked here as well as in the engine, to name the fields as the caller sent them.
        params.validate({name: alias for name, alias, value in (("max_tokens", "max_new_tokens", max_new_tokens),
                                                                ("min_tokens", "min_new_tokens", min_new_tokens))
                         if value is not None})
        if prompt_template:
            reply = self.engine.stream_formatted(fill(prompt_template, prompt, system_prompt, messages), params, stats)
        else:
            reply = self.engine.stream_conversation(conversation(prompt, system_prompt, messages), params, stats)
        # A cancel (or a client gone) arrives in the engine's stream as asyncio.CancelledError: it stops
        # the request within a step, and the error goes on up to Cog. The metrics follow the last piece.
        scope = self.scope  # this prediction's, found here on coglet's event loop, not on its other threads
        return coglet_stream.stream(reply, then=lambda: _record(scope, stats))


def _record(scope, stats: GenerationStats) -> None:
    for name, value in stats.metrics().items():
        scope.record_metric(name, value)


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
