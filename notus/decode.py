"""The decode loop: one long-lived thread that owns the model, a static KV cache and the compiled step.

Why a hand-written loop instead of `model.generate` per request:
- The KV cache is allocated once (transformers' StaticCache, sized for the whole context) and only
  reset between requests, so nothing is reallocated and the decode step has one shape.
- That step is compiled by inductor (fused kernels, far fewer launches than eager). CUDA graphs
  (mode "reduce-overhead") are not the default: notus's cache is a 4,096-token sliding window whose
  transformers layer keeps its length as a Python int; compiled, that int becomes an input of the
  graph, and CUDA graph trees record a new graph for every new value, i.e. every token. Set
  NOTUS_COMPILE_MODE=reduce-overhead to try them. Compiled code and CUDA graphs belong to the
  thread that made them, hence one thread for all requests, warm-up included.
- The host never waits for the GPU except to read the token it streams, and even that is one step
  behind: step n+1 is queued before token n is read, so the GPU always has work. At the end one
  step too many has been queued; its token is dropped.
- Prefill runs eagerly (not compiled), so a new prompt length never triggers a recompilation.

Sampling uses transformers' own logits processors in generate's order, so every input keeps the
meaning it has with `model.generate` (greedy gives the same tokens; a seed gives the same sample).
Two guards keep every setting the schema accepts from putting NaN or inf into sampling (on a GPU
that is a device-side assert that breaks every later request): temperature divides logits shifted
so their maximum is 0 (a temperature of 1e-39 gives -inf for all but the best token, not inf), and
a row with no finite score left (only a broken model's logits do that) samples uniformly.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StaticCache
from transformers.generation import (
    CompileConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

log = logging.getLogger("notus")

# Where inductor keeps compiled kernels, so a second boot skips most of the compile. Inside the
# project: `cog predict` mounts it, so the cache survives between runs on the same machine.
DEFAULT_COMPILE_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "torch-compile"
# torch.compile mode of the decode step (see the module docstring for why not "reduce-overhead").
COMPILE_MODE = os.environ.get("NOTUS_COMPILE_MODE", "default")


@dataclass
class DecodeRequest:
    """One generation handed to the decode thread. Token ids arrive on `tokens`, then None."""

    input_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    tokens: queue.Queue = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)  # set by the consumer: stop now
    done: threading.Event = field(default_factory=threading.Event)  # set by the decode thread
    error: BaseException | None = None


class Decoder:
    """Runs DecodeRequests one after another on the thread it starts."""

    def __init__(self, model, eos_id: int, max_length: int, compile: bool | None = None):
        self.model = model
        self.device = model.device
        self.eos_id = eos_id
        self.max_length = max_length
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.compile_mode = COMPILE_MODE if self.compile else None
        self.cuda_graphs = self.compile_mode == "reduce-overhead" and self.device.type == "cuda"
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        # Positions live on the device: slicing them per step needs no host-to-device copy.
        self.positions = torch.arange(max_length, device=self.device)
        if self.compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(DEFAULT_COMPILE_CACHE))
            # transformers' compiled __call__ (what generate uses for static caches); dynamic=None
            # so the cache's step counter does not force a recompile per token.
            self.step = model.get_compiled_call(CompileConfig(mode=self.compile_mode))
        else:
            self.step = model.__call__
        self._requests: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="notus-decode", daemon=True)
        self._thread.start()

    def submit(self, request: DecodeRequest) -> DecodeRequest:
        if len(request.input_ids) + request.max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt ({len(request.input_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the {self.max_length}-token context"
            )
        self._requests.put(request)
        return request

    def call(self, fn: Callable[[], object]) -> object:
        """Runs `fn` on the decode thread (where the CUDA graphs live) and returns its result."""
        future: Future = Future()
        self._requests.put((fn, future))
        return future.result()

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            if isinstance(request, tuple):  # a call(): run it, hand back its result
                fn, future = request
                try:
                    with torch.inference_mode():
                        future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)
                continue
            try:
                with torch.inference_mode():
                    self._run(request)
            except BaseException as e:  # handed to the consumer; the thread serves the next request
                request.error = e
            finally:
                request.tokens.put(None)
                request.done.set()

    def _run(self, r: DecodeRequest) -> None:
        torch.manual_seed(r.seed)  # CPU and every GPU: a seed gives the same sample as generate
        n = len(r.input_ids)
        ids = torch.tensor([r.input_ids + [self.eos_id] * r.max_new_tokens], device=self.device)
        processors = self._processors(r, n)
        sample = r.temperature > 0
        reader = _TokenReader(self.device)

        token = _pick(processors, ids[:, :n], self._prefill(ids[:, :n]), sample)
        for i in range(r.max_new_tokens):
            ids[:, n + i] = token  # on the device: the penalties see the output so far
            reader.send(token)
            following = None
            if i + 1 < r.max_new_tokens and not r.stop.is_set():
                # Queue the next step before reading this token: the GPU never waits on the host.
                following = _pick(processors, ids[:, : n + i + 1], self._decode_step(token, n + i), sample)
            token_id = reader.receive()
            r.tokens.put(token_id)
            if token_id == self.eos_id or r.stop.is_set() or following is None:
                return
            token = following

    def raw_step_seconds(self, prompt_length: int, steps: int) -> float:
        """Seconds per bare decode step (model only: no sampling, no streaming), for the benchmark."""

        def measure() -> float:
            ids = torch.full((1, prompt_length), self.eos_id, device=self.device)
            token = self._prefill(ids)[:, -1].argmax(-1)
            synchronize(self.device)
            t0 = time.perf_counter()
            for i in range(steps):
                token = self._decode_step(token, prompt_length + i)[:, -1].argmax(-1)
            synchronize(self.device)
            return (time.perf_counter() - t0) / steps

        return self.call(measure)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Empties the cache and runs the prompt through it (eagerly); the last position's logits."""
        self.cache.reset()
        positions = self.positions[: ids.shape[1]]
        return self.model(
            input_ids=ids, position_ids=positions[None], cache_position=positions,
            past_key_values=self.cache, use_cache=True, logits_to_keep=1,
        ).logits

    def _decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """One compiled step: `token` at `position` into the cache; its logits.

        With CUDA graphs the logits live in the graph's output buffer, which the next replay
        overwrites: use them (as _pick does, by copying) before the next step and keep no reference.
        """
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        cache_position = self.positions[position : position + 1]
        return self.step(
            input_ids=token.view(1, 1), position_ids=cache_position.view(1, 1), cache_position=cache_position,
            past_key_values=self.cache, use_cache=True,
        ).logits

    def _processors(self, r: DecodeRequest, prompt_length: int) -> LogitsProcessorList:
        """The processors model.generate would use for these settings, in its order."""
        processors = LogitsProcessorList()
        if r.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(r.repetition_penalty))
        if r.min_new_tokens > 0:
            processors.append(
                MinNewTokensLengthLogitsProcessor(prompt_length, r.min_new_tokens, self.eos_id, device=self.device)
            )
        if r.temperature > 0:
            if r.temperature != 1.0:
                processors.append(ShiftedTemperature(r.temperature))
            if r.top_k != 0:
                processors.append(TopKLogitsWarper(top_k=r.top_k, min_tokens_to_keep=1))
            if r.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=r.top_p, min_tokens_to_keep=1))
        return processors


class ShiftedTemperature(LogitsProcessor):
    """generate's temperature, safe for any temperature above 0.

    softmax((x - max x) / t) is softmax(x / t), but the shifted scores are all <= 0: dividing them
    by a tiny t gives 0 for the best token and -inf for the rest, never inf - inf = NaN.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return (scores - scores.amax(dim=-1, keepdim=True)) / self.temperature


def processed_scores(processors: LogitsProcessorList, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits in float32 through the processors: finite numbers or -inf only."""
    scores = _finite_or_minus_inf(logits[:, -1].to(copy=True, dtype=torch.float32))
    return _finite_or_minus_inf(processors(ids, scores))


def sampling_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores); a row without a single finite score (a broken model) becomes uniform."""
    probs = torch.softmax(scores, dim=-1)
    return torch.where(probs.isnan().any(dim=-1, keepdim=True), 1.0 / probs.shape[-1], probs)


def _finite_or_minus_inf(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max, neginf=-torch.inf)


def _pick(processors: LogitsProcessorList, ids: torch.Tensor, logits: torch.Tensor, sample: bool) -> torch.Tensor:
    """The next token, shape [1], left on the device (no host synchronisation)."""
    scores = processed_scores(processors, ids, logits)
    if sample:
        return torch.multinomial(sampling_probabilities(scores), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _TokenReader:
    """Brings each token to the host through pinned buffers, without blocking on later GPU work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        if self.cuda:
            self.slots = [(torch.empty(1, dtype=torch.long, pin_memory=True), torch.cuda.Event()) for _ in range(2)]
            self.turn = 0

    def send(self, token: torch.Tensor) -> None:
        if not self.cuda:
            self.pending.append(token)
            return
        host, ready = self.slots[self.turn]
        self.turn ^= 1
        host.copy_(token, non_blocking=True)
        ready.record()
        self.pending.append((host, ready))

    def receive(self) -> int:
        if not self.cuda:
            return int(self.pending.pop(0))
        host, ready = self.pending.pop(0)
        ready.synchronize()  # waits for this token only, not for the step queued after it
        return int(host)
