"""What only a GPU runs: CUDA graphs replayed against the eager step, a request that never makes the
engine thread wait for the GPU, the pinned attention kernels. Skipped without CUDA; scripts/gpu_check.sh
runs this file first. The tiny model, in $NOTUS_DTYPE (the check runs float32) except where bf16 is the point.
"""

from __future__ import annotations

import pytest
import torch

from logit_parity import attention_kernels
from notus.engine import Engine
from notus.loading import load_model
from notus.sampling import RaceNoise, RowSettings, draw_key
from test_sampling import DrawCase, started
from test_scheduler import engine_ids, long_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETTINGS = [RowSettings(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=1), RowSettings(),
            RowSettings(temperature=1.3, presence_penalty=0.5, frequency_penalty=0.3, seed=2),
            RowSettings(temperature=0.5, top_p=0.5, min_tokens=3, seed=3)]


@pytest.fixture(scope="module")
def graphed(tiny_weights) -> Engine:
    """An engine of 4 slots with every decode graph captured, as setup leaves it."""
    engine = Engine.load(tiny_weights, device="cuda", admitted=4)
    assert engine.scheduler.capture_graphs() == len(engine.scheduler.batch_buckets) * len(engine.scheduler.length_buckets)
    yield engine
    engine.scheduler.close()


PROMPT = 50  # replay_against_eager's prompts' length


def replay_against_eager(scheduler) -> int:
    """For each graph: from one state (random cache, tokens, positions below its length bucket, four
    sampling settings), the eager step of the graph's shape, then the replay; both must leave the same
    tokens, logits, cache and sampler state. Runs on the engine thread; how many graphs it compared."""
    sampler, vocab = scheduler.sampler, scheduler.sampler.vocab_size
    for slot in range(scheduler.slots):
        sampler.start(slot, SETTINGS[slot % len(SETTINGS)], torch.randint(0, vocab, (PROMPT,), device=scheduler.device))
    scheduler.cache.k.normal_()
    scheduler.cache.v.normal_()
    state = {"tokens": scheduler.tokens, "positions": scheduler.positions, "k": scheduler.cache.k,
             "v": scheduler.cache.v, "counts": sampler.counts, "seen": sampler.seen, "used": scheduler.used}
    try:
        for (batch, length), graph in scheduler.graphs.items():
            scheduler.tokens.random_(0, vocab)
            # From the prompts' last position: a request's draws begin there (below it, its slot's keys are not its own).
            scheduler.positions.random_(PROMPT - 1, length if length < scheduler.window else 2 * scheduler.window)
            scheduler.active.fill_(True)
            scheduler.write_slots.copy_(torch.arange(scheduler.slots))
            scheduler.used.copy_((scheduler.positions + 1).clamp(max=scheduler.window))
            scheduler.grow.copy_(scheduler.used < scheduler.window)
            before = {name: t.clone() for name, t in state.items()}
            eager_logits = scheduler._step(batch, length).clone()
            eager = {name: t.clone() for name, t in state.items()}
            for name, t in state.items():
                t.copy_(before[name])
            graph.replay()
            torch.testing.assert_close(scheduler.graph_logits[batch, length], eager_logits,
                                       msg=lambda m: f"graph ({batch}, {length}), logits: {m}")
            for name, t in state.items():
                assert torch.equal(t, eager[name]), f"graph ({batch}, {length}): {name} differs from the eager step's"
        return len(scheduler.graphs)
    finally:
        scheduler.active.fill_(False)  # no request holds these slots
        scheduler.write_slots.fill_(scheduler.cache.scratch)
        scheduler.used.fill_(1)
        scheduler.grow.fill_(0)


def test_every_captured_graph_replays_the_eager_step_of_its_shape(graphed):
    scheduler = graphed.scheduler
    assert scheduler.call(lambda: replay_against_eager(scheduler)) == len(scheduler.graphs) > 0


def test_a_request_never_makes_the_engine_thread_wait_for_the_gpu(graphed):
    """torch's sync debug mode raises on every synchronising call (a copy from pageable memory, .item(),
    .tolist() of a device tensor, nonzero): a request of two prefill chunks and sampled decode steps
    through the captured graphs must make none. The engine waits only on its CUDA events."""
    prompt = long_prompt(graphed, 3000)
    graphed.scheduler.call(lambda: torch.cuda.set_sync_debug_mode("error"))
    try:
        ids = engine_ids(graphed, prompt, 5, max_tokens=8, min_tokens=8, temperature=0.7, top_k=50,
                         presence_penalty=0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(ids) == 8


def test_the_pinned_attention_kernels_take_each_shape_in_bf16(tiny_weights, monkeypatch):
    """Each use runs its pinned kernel (one that could not take the shapes would raise: the math
    kernel is not allowed); the profiler names them, and no softmax kernel (the math kernel's) ran."""
    monkeypatch.setenv("NOTUS_DTYPE", "bfloat16")
    model = load_model(tiny_weights, "cuda")
    found = attention_kernels(model)
    kernels = {use: k["ran"] for use, k in found.items()}
    assert any("flash" in name.lower() for name in kernels["prefill, first chunk (causal)"]), kernels
    assert any("fmha" in name.lower() or "efficient" in name.lower()
               for name in kernels["prefill, later chunk (masked)"]), kernels
    # Decode: FlashAttention's variable-length kernel, which passed its check against SDPA on this GPU.
    assert "varlen" in found["decode"]["pinned"]
    assert any("flash" in name.lower() for name in kernels["decode"]), kernels
    assert not any("softmax" in name.lower() for names in kernels.values() for name in names), kernels


@pytest.mark.parametrize("name", ["reported", "penalties"])
def test_the_samplers_draws_on_the_gpu_follow_the_processed_distribution(name):
    """The sampler's GPU shape with CUDA's own kernels (block weights summed in token-id order, the
    scatter and the gathers): 10^5 draws checked as tests/test_sampling.py checks the CPU's."""
    case, cuda = DrawCase.of(name), torch.device("cuda")
    sampler, row = started(1, case.settings, case.prompt, case.reply, cuda), torch.tensor([0], device=cuda)
    distribution = sampler.distribution(sampler.scores(case.logits.to(cuda), row), row)
    case.check(case.draws(distribution), f"cuda, {name}")


def test_the_race_hash_gives_the_cpus_bits_on_the_gpu():
    """The noise's hash relies on int64 products wrapping mod 2^64 and arithmetic right shifts
    (tests/test_sampling.py checks the CPU's against Python's integers): CUDA's must be the same,
    bit for bit (its log may differ in the last bit: the draws need the distribution, not the bits)."""
    keys = draw_key(torch.full((4096,), 7), torch.arange(4096))[:, None]
    on_cpu, on_gpu = RaceNoise(32000, torch.device("cpu")), RaceNoise(32000, torch.device("cuda"))
    assert torch.equal(on_gpu.bits(keys.cuda()).cpu(), on_cpu.bits(keys))
    noise = on_gpu(keys.cuda())
    assert torch.isfinite(noise).all() and (noise < 0).all()
