"""Packed prefill (notus/forward.py, notus/scheduler.py): waiting prompts' chunks run in one forward,
each attending only to itself, so a burst of arrivals costs a few forwards, not one each; each
request's tokens are the ones it gets alone, and one that fails fails alone (float32, tiny model)."""

from __future__ import annotations

import torch

from notus.forward import Forward, KVCache, Segment
from test_scheduler import long_prompt


def test_packed_logits_equal_each_segments_logits_alone(engine):
    """Teacher-forced, in float32: first chunks (the causal kernel), a chunk after held ring entries
    (masked), and one after a ring that has wrapped, together in one forward and each alone; their
    logits and the keys and values they leave in the cache."""
    model, device = engine.model, engine.device
    ids = torch.tensor(long_prompt(engine, 6000), device=device)
    caches = [KVCache(model.config, slots=4, device=device, dtype=model.dtype) for _ in range(2)]
    forwards = [Forward(model, cache) for cache in caches]
    earlier = [Segment(1, ids[:700], 0), Segment(2, ids[:2048], 0), Segment(2, ids[2048:4096], 2048),
               Segment(2, ids[4096:4500], 4096)]
    for forward in forwards:  # slot 1 holds 700 positions; slot 2 4,500, past the 4,096-token window
        for segment in earlier:
            forward.prefill([segment])
    segments = [Segment(0, ids[1000:1300], 0), Segment(1, ids[700:900], 700), Segment(2, ids[4500:4800], 4500),
                Segment(3, ids[5000:5001], 0)]
    packed = forwards[0].prefill(segments)
    each = torch.cat([forwards[1].prefill([segment]) for segment in segments])
    assert packed.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(packed, each, rtol=1e-5, atol=1e-5 * each.std().item())
    torch.testing.assert_close(caches[0].kv, caches[1].kv, rtol=1e-5, atol=1e-6)
