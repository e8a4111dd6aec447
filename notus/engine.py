"""The generation engine: notus-7b-v1 on the GPU (or the CPU in tests), many requests at once.

`Engine.stream()` takes a system + user message (`stream_conversation()` a whole conversation) and
yields clean text chunks as the model produces them, asynchronously; any number of coroutines (on any event loops) may call it at once. The tokens come from the engine thread
(notus/scheduler.py), which batches every request in flight into one decode step; as soon as a
consumer stops (stop sequence, cancel, error) its request leaves the batch at the next step or
prefill chunk, so its work stops within a token, not at max_tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import GenerationConfig

from notus.capacity import kv_budget_bytes, plan_slots
from notus.forward import KVCache
from notus.layers import layer_weights
from notus.loading import load_model
from notus.messages import Conversation, conversation
from notus.params import SamplingParams
from notus.prompt import ChatPrompt, load_tokenizer
from notus.sampling import RowSettings
from notus.request import Request
from notus.scheduler import Scheduler
from notus.stream import TextStream, TokenBytes
from notus.wakeups import Wakeups

log = logging.getLogger("notus")

# Sequences decoded at once (KV-cache slots) where nobody says (tests, benchmarks); predict.py's
# setup sizes it from what Cog admits (notus/capacity.py).
DEFAULT_SLOTS = 8


@dataclass
class GenerationStats:
    """What one prediction reports as metrics."""

    seed: int | None = None
    input_token_count: int = 0
    cached_input_token_count: int = 0  # prompt tokens whose keys and values were reused, not computed
    output_token_count: int = 0
    time_to_first_token: float | None = None  # from the call, waiting for a slot included
    tokens_per_second: float | None = None
    time_in_queue: float | None = None  # waiting for a free KV-cache slot (near 0 when one was free)
    _start: float = field(default_factory=time.perf_counter, repr=False)

    def token_arrived(self) -> None:
        self.output_token_count += 1
        if self.time_to_first_token is None:
            self.time_to_first_token = time.perf_counter() - self._start

    def decoded(self, tokens: int, first_at: float | None, last_at: float | None) -> None:
        """Decode speed: the tokens after the first over the time from the first to the last, as the
        engine handed them out (a consumer that lags reads several at once)."""
        if tokens > 1 and first_at is not None and last_at is not None and last_at > first_at:
            self.tokens_per_second = (tokens - 1) / (last_at - first_at)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "input_token_count": self.input_token_count,
            "cached_input_token_count": self.cached_input_token_count,
            "output_token_count": self.output_token_count,
        }
        if self.time_in_queue is not None:
            out["time_in_queue"] = self.time_in_queue
        if self.time_to_first_token is not None:
            out["time_to_first_token"] = self.time_to_first_token
            out["tokens_per_second"] = self.tokens_per_second or (
                self.output_token_count / self.time_to_first_token if self.time_to_first_token else 0.0
            )
        return out


class Engine:
    def __init__(self, model, prompt: ChatPrompt, slots: int = DEFAULT_SLOTS, cuda_graphs: bool | None = None,
                 reuse: bool = True, pack: bool = True):
        self.model = model
        self.prompt = prompt
        self.tokenizer = prompt.tokenizer
        self.token_bytes = TokenBytes(self.tokenizer)
        self.device = model.device
        if self.device.type == "cpu":
            # The CPU serves tests, benchmarks and tries of the API with the tiny model: its ops are too
            # small to split across cores, and torch's second thread took the core the streams are
            # served from (8 streams at once ran at half the speed with one thread per core).
            torch.set_num_threads(1)
        # The longest sequence the model takes: prompt plus new tokens.
        self.context_length = model.config.max_position_embeddings
        # cuda_graphs=None: CUDA graphs on the GPU (captured by warm_up), eager elsewhere.
        # reuse: a prompt that begins as a sequence still in the KV cache skips its prefill (notus/prefix_cache.py).
        # pack: waiting prompts' chunks prefilled together in one forward (off only to measure the difference).
        self.wakeups = Wakeups()  # the engine thread's wake-ups, sent together (at most twice a turn)
        self.scheduler = Scheduler(model, prompt.eos_id, slots, cuda_graphs=cuda_graphs, reuse=reuse, pack=pack,
                                   send_wakeups=self.wakeups.send)

    @classmethod
    def load(cls, weights_dir: str | Path, device: str | None = None, admitted: int = DEFAULT_SLOTS) -> "Engine":
        """Tokenizer and weights from `weights_dir` (bf16 on the GPU, float32 on the CPU), and a
        KV-cache slot for each of `admitted` predictions at once, as many as fit (notus/capacity.py)."""
        weights_dir = Path(weights_dir)
        t0 = time.perf_counter()
        tokenizer, template = load_tokenizer(weights_dir)
        prompt = ChatPrompt(tokenizer, template)
        log.info("tokenizer loaded in %.2f s", time.perf_counter() - t0)
        model = load_model(weights_dir, device)
        for layer in model.model.layers:  # q/k/v and gate/up merged now, before the KV cache takes what is left
            layer_weights(layer)
        per_slot = KVCache.bytes_per_slot(model.config, model.dtype)
        slots = plan_slots(admitted, per_slot, kv_budget_bytes(model.device))
        return cls(model, prompt, slots=slots)

    def warm_up(self) -> None:
        """Captures every decode graph and runs every path once, so the first request is as fast as the tenth."""
        t0 = time.perf_counter()
        graphs = self.scheduler.capture_graphs()
        t_graphs = time.perf_counter() - t0
        sampled = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.7, top_p=0.9, top_k=50,
                                 repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5, seed=0)
        greedy = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)

        async def both() -> None:
            for params in (sampled, greedy):
                async for _ in self.stream("", "Hello", params):
                    pass

        asyncio.run(both())
        log.info("warm-up done in %.2f s (%d CUDA graphs captured in %.2f s)",
                 time.perf_counter() - t0, graphs, t_graphs)

    def stream(
        self, system_prompt: str, prompt: str, params: SamplingParams, stats: GenerationStats | None = None
    ) -> AsyncIterator[str]:
        """Text of the reply to one system + user exchange (see stream_conversation)."""
        return self.stream_conversation(conversation(prompt, system_prompt), params, stats)

    def stream_conversation(
        self, turns: Conversation, params: SamplingParams, stats: GenerationStats | None = None
    ) -> AsyncIterator[str]:
        """Text of the reply to a conversation (notus/messages.py checks it, here), as soon as each
        piece is complete. Fills `stats` as it goes. The templated prompt's stream_ids() itself: no
        generator in between for every piece to pass through."""
        return self.stream_ids(functools.partial(self.prompt.conversation_ids, turns), params, stats)

    def stream_formatted(self, text: str, params: SamplingParams, stats: GenerationStats | None = None) -> AsyncIterator[str]:
        """Text of the reply to a prompt the caller formatted (a filled-in prompt_template: ChatPrompt.formatted_ids)."""
        return self.stream_ids(functools.partial(self.prompt.formatted_ids, text), params, stats)

    async def stream_ids(
        self, input_ids: list[int] | Callable[[], list[int]], params: SamplingParams,
        stats: GenerationStats | None = None,
    ) -> AsyncIterator[str]:
        """Text of the reply to an already templated prompt (the benchmark's), or to the ids a function
        makes (stream_conversation's tokenizing), called on a worker thread: the longest prompts the
        checks let through take the tokenizer 1.5 s on the development CPU, which on the event loop
        would stall every other reply's stream (the tokenizer lets go of the GIL).

        One piece per token that completes text, however the tokens arrived: the same inputs and
        seed give the same list of pieces, alone or beside others.
        """
        stats = stats if stats is not None else GenerationStats()
        params.validate()
        if callable(input_ids):
            input_ids = await asyncio.to_thread(input_ids)
        stats.input_token_count = len(input_ids)
        params = self._fit_context(len(input_ids), params)
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        stats.seed = seed
        log.info("seed: %d", seed)

        text = TextStream(self.token_bytes, list(params.stop_sequences))
        async with aclosing(self.generate_ids(input_ids, params, seed, stats)) as batches:
            async for batch in batches:
                for token_id in batch:
                    stats.token_arrived()
                    piece = text.push(token_id)
                    if piece:
                        yield piece
                    if text.stopped:
                        return  # leaving the `async with` stops the request now
        tail = text.finish()
        if tail:
            yield tail

    def _fit_context(self, prompt_tokens: int, params: SamplingParams) -> SamplingParams:
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ValueError(
                f"The prompt is {prompt_tokens:,} tokens (system prompt and template included); "
                f"notus-7b-v1 takes at most {self.context_length:,} tokens in all, so the prompt can be "
                f"at most {self.context_length - 1:,} tokens. Shorten the prompt."
            )
        if params.max_tokens <= room:
            return params
        log.info(
            "max_tokens lowered from %d to %d: the prompt is %d tokens and the context holds %d",
            params.max_tokens, room, prompt_tokens, self.context_length,
        )
        return replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        """What `model.generate` takes for these settings: the reference in tests and the benchmark."""
        sample = params.temperature > 0
        return GenerationConfig(
            max_new_tokens=params.max_tokens,
            min_new_tokens=params.min_tokens or None,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=params.top_k if sample else None,
            repetition_penalty=params.repetition_penalty,
            bos_token_id=self.prompt.bos_id,
            eos_token_id=self.prompt.eos_id,
            pad_token_id=self.prompt.eos_id,
            use_cache=True,  # notus's config.json says false (a training setting)
        )

    async def generate_ids(self, input_ids: list[int], params: SamplingParams, seed: int,
                           stats: GenerationStats | None = None) -> AsyncIterator[list[int]]:
        """Token ids as the engine hands them out, in lists (those of one wake-up); leaving stops the
        model. What stream_ids() turns into text; benchmarks and tests that compare ids use it directly."""
        arrived, loop = asyncio.Event(), asyncio.get_running_loop()
        settings = RowSettings(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, min_tokens=params.min_tokens, seed=seed,
        )
        request = Request(input_ids=input_ids, max_tokens=params.max_tokens, settings=settings,
                          wake=lambda: self.wakeups.add(loop, arrived))  # on the engine thread
        try:  # submitted inside the try: a cancel landing anywhere after this line still stops it
            self.scheduler.submit(request)
            ended = False
            while not ended:
                await arrived.wait()
                arrived.clear()
                if stats is not None and request.admitted_at is not None:
                    # Waiting for a slot, not for the engine's turn to take the request in.
                    stats.time_in_queue = request.admitted_at - request.queued_at
                    stats.cached_input_token_count = request.cached
                batch = []
                while request.tokens:
                    token = request.tokens.popleft()
                    if token is None:
                        ended = True
                        break
                    batch.append(token)
                if batch:
                    yield batch
            if request.error is not None:
                raise request.error
        finally:
            request.stop.set()  # the engine drops it at its next turn, wherever it is
            while not request.done.is_set():  # its slot free again, its work on the GPU stopped
                arrived.clear()
                await arrived.wait()
            if stats is not None:
                stats.decoded(request.delivered, request.first_token_at, request.last_token_at)
