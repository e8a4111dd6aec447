"""The versus-transformers mode of scripts/benchmark.py (`--versus-transformers N [N ...]`): issue 21's
measure of the engine against transformers' own batching, on the same model object, in one run.

For each N, N random prompts of equal length, greedy, exactly `new_tokens` each, three ways:
  project     N concurrent requests through Engine.stream_ids (min_tokens = max_tokens);
  static      model.generate on the N prompts as one batch (equal lengths: no padding, the mask all ones);
  continuous  model.generate_batch, transformers' continuous batching.
Reported per path: aggregate output tokens/s (N x new_tokens over the median wall time from the
start to the last token), the tokens produced (asserted to be N x new_tokens), the torch threads
the model ran with; then project / static, project / continuous, project / the better of the two,
and each path's aggregate over its own single stream (below).

Each repetition runs the three paths in turn, and for N > 1 each path runs just before on one of the N
prompts alone: a path's scaling ("x its own 1 stream") is the median over the repetitions of N x
(one prompt's wall time) / (N prompts' wall time), and project / static (or continuous) the median of
the repetitions' ratios. Paired so: the development machine's speed drifts within one process (in
benchmarks/versus-transformers-cpu-20261129-231828.json the project's one stream read 224 to 380
tokens/s over five repetitions), and ratios of rows measured a minute apart took that drift in.
The continuous path's single prompt runs through the manager made for the N (max_requests_per_batch
N, its blocks for N): one persistent manager per row.

How transformers is run, and why:
- End of sequence off (eos_token_id=-1), not min_new_tokens = max_new_tokens: generate_batch drops
  MinNewTokensLengthLogitsProcessor (unsupported in continuous batching), and on the tiny model,
  whose step is mostly its vocabulary, that processor's vocabulary-wide masks made generate 1.2 to
  1.5 times slower. Without it both paths run with no logits processor, at their fastest, and agree
  token for token (`continuous_ids_equal_static`). The engine suppresses the end of sequence
  (min_tokens), so its tokens differ from theirs after the first one it suppressed.
- generate_batch: ContinuousBatchingConfig(num_blocks = twice what the N sequences fill,
  max_batch_tokens = the engine's prefill chunk, 2048, max_requests_per_batch = N, seed=0), one
  persistent manager per N: the warm-up call builds it (and captures its CUDA graphs on a GPU), the
  timed calls reuse it. Left to size its cache itself (from the host's free memory on the CPU), its
  first call took about 6 s and it ran at about half the speed (tiny model, 8 streams: about 390
  against 690 tokens/s).
- generate_batch's wall time ends at the last request's finish stamp (GenerationOutput.lifespan):
  the call itself returns about 0.5 s later (stopping its thread and a gc.collect() on the CPU).
The paths take turns within each repetition, so a slow spell of the machine touches all three.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from contextlib import contextmanager
from math import ceil

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from notus.engine import Engine
from notus.params import SamplingParams
from notus.prefill_plan import CHUNK
from request_streams import stream_all

PATHS = ("project", "static", "continuous")
WARM_UP_TOKENS = 8
# Per call, transformers warns of eos_token_id=-1 and of the persistent manager: expected here.
QUIET_LOGGERS = ("transformers.generation.utils", "ContinuousBatchingLogger")


def project_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """The prompts as concurrent predictions on one event loop, as in Cog's worker."""

    start, done = stream_all(engine, prompts, lambda i: SamplingParams(
        max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, seed=i))
    return {"seconds": max(end for _, end in done) - start, "tokens": sum(stats.output_token_count for stats, _ in done)}


def transformers_config(engine: Engine, new_tokens: int) -> GenerationConfig:
    """Greedy, exactly `new_tokens`: the end of sequence off (see the module's docstring)."""
    config = engine.generation_config(SamplingParams(max_tokens=new_tokens, temperature=0))
    config.eos_token_id = -1
    return config


def static_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    inputs = torch.tensor(prompts, device=engine.device)  # equal lengths: nothing to pad
    start = time.perf_counter()
    out = engine.model.generate(inputs=inputs, attention_mask=torch.ones_like(inputs),
                                generation_config=transformers_config(engine, new_tokens))
    seconds = time.perf_counter() - start
    ids = out[:, inputs.shape[1]:].tolist()
    return {"seconds": seconds, "tokens": sum(map(len, ids)), "ids": ids}


def continuous_config(prompts: list[list[int]], new_tokens: int) -> ContinuousBatchingConfig:
    page = ContinuousBatchingConfig.page_size
    blocks = len(prompts) * ceil((len(prompts[0]) + new_tokens) / page)
    return ContinuousBatchingConfig(num_blocks=2 * blocks, max_batch_tokens=CHUNK,
                                    max_requests_per_batch=len(prompts), seed=0)


def continuous_run(engine: Engine, prompts: list[list[int]], new_tokens: int, config: ContinuousBatchingConfig) -> dict:
    start = time.perf_counter()
    outputs = list(engine.model.generate_batch(
        prompts, generation_config=transformers_config(engine, new_tokens), continuous_batching_config=config,
        persistent_manager=True).values())
    # generate_batch logs a failed request and returns the rest: the token count below catches it.
    assert len(outputs) == len(prompts) and all(o.error is None for o in outputs), "generate_batch failed a request"
    ids = [o.generated_tokens for o in outputs]
    return {"seconds": max(o.lifespan[1] for o in outputs) - start, "tokens": sum(map(len, ids)), "ids": ids}


@contextmanager
def quiet():
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in QUIET_LOGGERS]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextmanager
def model_threads(model, seen: dict):
    """Notes the torch threads, and the attention implementation, of the thread that runs `model`."""
    def note(module, args):
        seen.update(torch_threads=torch.get_num_threads(), thread=threading.current_thread().name,
                    attention=model.config._attn_implementation)

    hook = model.register_forward_pre_hook(note)
    try:
        yield seen
    finally:
        hook.remove()


def versus_row(engine: Engine, prompts: list[list[int]], new_tokens: int, reps: int) -> dict:
    """The three paths on `prompts`, each warmed up once (a short run), then `reps` turns of all three
    (for N > 1 each path on the first prompt alone, then on all N: the module's docstring)."""
    config = continuous_config(prompts, new_tokens)
    runs = {"project": lambda chosen, tokens: project_run(engine, chosen, tokens),
            "static": lambda chosen, tokens: static_run(engine, chosen, tokens),
            "continuous": lambda chosen, tokens: continuous_run(engine, chosen, tokens, config)}
    facts = {"project": engine.scheduler.call(
        lambda: {"torch_threads": torch.get_num_threads(), "thread": threading.current_thread().name})}
    timed = {name: [] for name in PATHS}
    alone = {name: [] for name in PATHS}
    with quiet():
        try:
            warm_ups = [prompts, prompts[:1]] if len(prompts) > 1 else [prompts]
            for name in ("static", "continuous"):
                with model_threads(engine.model, facts.setdefault(name, {})):
                    for chosen in warm_ups:
                        runs[name](chosen, WARM_UP_TOKENS)
            for chosen in warm_ups:
                runs["project"](chosen, WARM_UP_TOKENS)
            manager = engine.model._cached_continuous_batching_manager
            resolved = manager.continuous_batching_config
            for _ in range(reps):
                for name in PATHS:
                    if len(prompts) > 1:
                        alone[name].append(runs[name](prompts[:1], new_tokens))
                    timed[name].append(runs[name](prompts, new_tokens))
        finally:
            engine.model.destroy_cached_continuous_batching_manager()

    n, expected = len(prompts), len(prompts) * new_tokens
    row = {"streams": n, "prompt_tokens": len(prompts[0]), "new_tokens_each": new_tokens}
    for name in PATHS:
        counts = [run["tokens"] for run in timed[name]] + [run["tokens"] * n for run in alone[name]]
        assert counts == [expected] * len(counts), f"{name}: {counts} tokens, not {n} x {new_tokens}"
        seconds = statistics.median(run["seconds"] for run in timed[name])
        row[name] = {"aggregate_tokens_per_second": expected / seconds, "tokens": expected, "wall_seconds": seconds,
                     "wall_seconds_runs": [run["seconds"] for run in timed[name]],
                     "one_stream_wall_seconds_runs": [run["seconds"] for run in alone[name]],
                     "over_one_stream": statistics.median(
                         n * one["seconds"] / run["seconds"] for one, run in zip(alone[name], timed[name]))
                     if alone[name] else 1.0,
                     **facts[name]}

    def over(other: str) -> float:
        return statistics.median(o["seconds"] / p["seconds"] for p, o in zip(timed["project"], timed[other]))

    row["project_over_static"], row["project_over_continuous"] = over("static"), over("continuous")
    row["project_over_best"] = min(row["project_over_static"], row["project_over_continuous"])
    row["continuous_ids_equal_static"] = timed["continuous"][-1]["ids"] == timed["static"][-1]["ids"]
    row["continuous_batching_config"] = {key: getattr(resolved, key) for key in (
        "page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch", "use_cuda_graph")}
    return row


def versus_table(report: dict) -> str:
    rows = report["versus_transformers"]
    threads = ", ".join(f"{name} {rows[0][name]['torch_threads']}" for name in PATHS)
    lines = [
        f"{report['model']} on {report['device']} (torch {report['torch']}, transformers {report['transformers']}; "
        f"torch threads: {threads}): N random prompts of {rows[0]['prompt_tokens']} tokens, greedy, exactly "
        f"{rows[0]['new_tokens_each']} new tokens each; aggregate output tok/s (x its own 1 stream, paired), "
        f"medians of {report['reps']}",
        "",
        "| streams | project | static generate | generate_batch | project / static | project / continuous "
        "| project / best |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = []
        for name in PATHS:
            r = row[name]
            scaling = f" ({r['over_one_stream']:.2f}x)"
            cells.append(f"{r['aggregate_tokens_per_second']:.1f}{scaling}")
        lines.append(f"| {row['streams']} | {' | '.join(cells)} | {row['project_over_static']:.2f} | "
                     f"{row['project_over_continuous']:.2f} | {row['project_over_best']:.2f} |")
    return "\n".join(lines)
