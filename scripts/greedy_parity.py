#!/usr/bin/env python
"""Greedy parity: the first --tokens greedy tokens of this project's path against `model.generate`'s.

    python scripts/greedy_parity.py                    # GPU: notus's exact config, random bf16 weights
    python scripts/greedy_parity.py --weights weights/ # GPU: the real checkpoint
    python scripts/greedy_parity.py --tiny             # CPU: the tiny test model (float32: all must agree)

For each prompt (chat-templated messages, and random-token prompts of 2,048 and 5,000 tokens, the
latter crossing the 4,096-token sliding window), greedy tokens come from the engine alone, from the
engine with every prompt at once, and from plain `model.generate`. It reports, per prompt and path,
the index of the first token that differs from generate's (none: all --tokens agree) and, there,
how far apart generate's two candidates were: bf16 may flip a near tie, which is rounding, while a
wide margin is a bug. Writes JSON under --out and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from benchmark import add_model_arguments, build_model, run_facts, tokenizer_dir, write_report  # noqa: E402
from notus.engine import Engine  # noqa: E402
from notus.params import SamplingParams  # noqa: E402
from notus.prompt import ChatPrompt, load_tokenizer  # noqa: E402

MESSAGES = [
    ("", "Hello! Who are you?"),
    ("You are a helpful assistant.", "Write a haiku about the sea."),
    ("Answer briefly.", "What is the capital of France, and why is it famous?"),
]
RANDOM_LENGTHS = [2048, 5000]


async def engine_tokens(engine: Engine, ids: list[int], tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0)
    return [t async for batch in engine.generate_ids(ids, params, seed=0) for t in batch]


async def all_at_once(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    return list(await asyncio.gather(*(engine_tokens(engine, ids, tokens) for ids in prompts)))


def generate_tokens(engine: Engine, ids: list[int], tokens: int) -> tuple[list[int], torch.Tensor]:
    """generate's greedy tokens, and its logits at each step [tokens, vocab]."""
    config = engine.generation_config(SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0))
    config.output_logits = config.return_dict_in_generate = True
    inputs = torch.tensor([ids], device=engine.device)
    out = engine.model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)[:, 0].float().cpu()


def compare(reference: list[int], logits: torch.Tensor, got: list[int]) -> dict:
    """Where `got` first leaves `reference`, and generate's margin there between its token and ours."""
    for i, (want, have) in enumerate(zip(reference, got)):
        if want != have:
            return {"first_difference": i, "generate_margin": (logits[i, want] - logits[i, have]).item(),
                    "generate_top2_gap": (logits[i].topk(2).values[0] - logits[i].topk(2).values[1]).item()}
    return {"first_difference": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, description = build_model(args)
    tokenizer, template = load_tokenizer(tokenizer_dir(args.weights))
    engine = Engine(model, ChatPrompt(tokenizer, template), slots=len(MESSAGES) + len(RANDOM_LENGTHS))
    engine.warm_up()
    generator = torch.Generator().manual_seed(0)
    prompts = [engine.prompt.ids(system, user) for system, user in MESSAGES] + [
        [engine.prompt.bos_id] + torch.randint(1000, 31000, (n - 1,), generator=generator).tolist()
        for n in RANDOM_LENGTHS]

    together = asyncio.run(all_at_once(engine, prompts, args.tokens))
    rows = []
    for ids, batched in zip(prompts, together):
        reference, logits = generate_tokens(engine, ids, args.tokens)
        alone = asyncio.run(engine_tokens(engine, ids, args.tokens))
        rows.append({"prompt_tokens": len(ids), "alone": compare(reference, logits, alone),
                     "all_at_once": compare(reference, logits, batched)})
    engine.scheduler.close()

    report = {"model": description, **run_facts(args.device), "tokens": args.tokens, "prompts": rows}
    path = write_report(args.out, f"parity-{args.device}", report)
    print(f"{description} on {report['device']} (torch {report['torch']}, transformers {report['transformers']}): "
          f"first greedy token that differs from generate's, of {args.tokens}")
    print("\n| prompt tokens | engine alone | engine, all at once |\n| --- | --- | --- |")
    for row in rows:
        cells = []
        for path_name in ("alone", "all_at_once"):
            c = row[path_name]
            cells.append("none" if c["first_difference"] is None else
                         f"{c['first_difference']} (margin {c['generate_margin']:.3g}, top-2 gap {c['generate_top2_gap']:.3g})")
        print(f"| {row['prompt_tokens']} | {cells[0]} | {cells[1]} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
