"""notus/decode_attention.py: each row reads its own ring entries on the GPU.

FlashAttention's variable-length kernel runs only on CUDA. Here it is replaced by what its documentation defines, written
out plainly, to check that the engine's call means what decode needs (the cache's layout, each row's
offset and count, the grouped heads), and that the check run at setup on the GPU catches a kernel
that fails or disagrees.
"""

from __future__ import annotations

import pytest
import torch

from notus import decode_attention
from notus.decode_attention import VarlenDecode
from notus.forward import Forward, KVCache


def documented_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, seqused_k=None):
    """The kernel as torch's varlen_attn documents it (no window, not causal): sequence i's queries are
    query[cu_seq_q[i]:cu_seq_q[i + 1]], its keys the first seqused_k[i] of those from cu_seq_k[i];
    query head h uses KV head h // (H_q / H_kv)."""
    out = torch.empty_like(query)
    groups = query.shape[1] // key.shape[1]
    for i in range(len(cu_seq_q) - 1):
        queries = slice(int(cu_seq_q[i]), int(cu_seq_q[i + 1]))
        start = int(cu_seq_k[i])
        n = int(seqused_k[i]) if seqused_k is not None else int(cu_seq_k[i + 1]) - start
        k = key[start : start + n].repeat_interleave(groups, dim=1).transpose(0, 1).float()  # [heads, n, d]
        v = value[start : start + n].repeat_interleave(groups, dim=1).transpose(0, 1).float()
        q = query[queries].transpose(0, 1).float()  # [heads, queries, d]
        weights = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
        out[queries] = (weights @ v).transpose(0, 1).to(query.dtype)
    return out


def test_the_varlen_call_gives_each_row_the_attention_over_its_own_entries(engine, monkeypatch):
    """Rows at positions 5, 300 and 5,000 (a ring past the window) and a padding row: the decode
    step's logits through the varlen call equal those of SDPA reading each row's own entries."""
    model = engine.model
    cache = KVCache(model.config, slots=4, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    cache.kv.normal_()
    forward = Forward(model, cache)
    assert forward.varlen is None  # the CPU: SDPA
    tokens = torch.tensor([100, 200, 300, 400])
    positions = torch.tensor([5, 300, 5000, 17])
    write_slots = torch.tensor([0, 1, 2, cache.scratch])  # the last row pads the batch
    own = [min(int(p) + 1, cache.window) for p in positions[:3]] + [1]
    used = torch.tensor(own, dtype=torch.int32)
    want = forward.decode(tokens, positions, write_slots, used, own)[:3]

    monkeypatch.setattr(decode_attention, "flash_varlen", documented_varlen)
    forward.varlen = VarlenDecode(cache.scratch, cache.window, cache.kv.device)
    got = forward.decode(tokens, positions, write_slots, used, cache.window)[:3]  # a graph's shape: lengths unused
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_engine_through_the_varlen_call_replies_as_through_sdpa(engine, tiny_weights, monkeypatch):
    """The scheduler keeps each row's count of entries for the varlen call (`used`, grown by one a
    step until the window): through it, greedy replies to prompts before, across and past the
    4,096-token window, one ending early so that a later one moves down into its slot, are the same
    as the SDPA engine's (the rows of one batch, as the GPU runs them)."""
    import asyncio

    from notus.engine import Engine
    from test_scheduler import ids_of, long_prompt

    async def replies(e: Engine) -> list[list[int]]:
        jobs = [(long_prompt(e, n), tokens) for n, tokens in [(5, 3), (4090, 14), (4200, 6), (30, 10)]]
        return await asyncio.gather(*(ids_of(e, ids, temperature=0, max_tokens=t, min_tokens=t) for ids, t in jobs))

    expected = asyncio.run(replies(engine))
    monkeypatch.setattr(decode_attention, "flash_varlen", documented_varlen)
    varlen = Engine.load(tiny_weights, device="cpu", admitted=4)
    try:
        scheduler = varlen.scheduler
        forward = scheduler.forward
        forward.varlen = VarlenDecode(scheduler.cache.scratch, scheduler.window, scheduler.device)
        decode, steps = forward.decode, []

        def recorded(tokens, positions, write_slots, used, lengths, **kwargs):
            # What each row reads: a decoding row (its own slot) its position + 1 up to the window, a padding row 1.
            wanted = [min(p + 1, scheduler.window) if slot == row else 1
                      for row, (p, slot) in enumerate(zip(positions.tolist(), write_slots.tolist()))]
            steps.append((used.tolist(), wanted))
            return decode(tokens, positions, write_slots, used, lengths, **kwargs)

        monkeypatch.setattr(forward, "decode", recorded)
        assert asyncio.run(replies(varlen)) == expected
        assert len(steps) >= 13 and all(used == wanted for used, wanted in steps), steps
    finally:
        varlen.scheduler.close()


def test_the_setup_check_accepts_the_documented_kernel_and_refuses_a_failing_or_wrong_one(monkeypatch):
    decode = VarlenDecode(slots=4, window=256, device=torch.device("cpu"))
    check = dict(heads=8, kv_heads=2, head_dim=32, dtype=torch.float32)
    monkeypatch.setattr(decode_attention, "flash_varlen", documented_varlen)
    assert decode.disagreement(**check) is None

    def failing(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")

    monkeypatch.setattr(decode_attention, "flash_varlen", failing)
    assert "RuntimeError: FlashAttention only supports" in decode.disagreement(**check)

    def reads_every_entry(*args, seqused_k=None, **kwargs):  # ignores each row's count
        return documented_varlen(*args, **kwargs)


    monkeypatch.setattr(decode_attention, "flash_varlen", reads_every_entry)
    assert "differs from SDPA" in decode.disagreement(**check)


def test_the_kernel_call_binds_to_torchs_op():
    """The real op's signature and output shape, on the meta device (its shape rules, no GPU needed)."""
    meta = torch.device("meta")
    decode = VarlenDecode(slots=4, window=4096, device=meta)
    q = torch.empty(3, 32, 128, dtype=torch.bfloat16, device=meta)
    cache = torch.empty(5, 4096, 8, 128, dtype=torch.bfloat16, device=meta)
    used = torch.empty(3, dtype=torch.int32, device=meta)
    assert decode(q, cache, cache, used, 128**-0.5).shape == (3, 32 * 128)


@pytest.mark.parametrize("slots", [1, 2, 32])
def test_the_setup_check_covers_few_rows_and_every_slot_whatever_the_slots(monkeypatch, slots):
    """One slot (COG_MAX_CONCURRENCY=1) too: the check's rows must have their offsets."""
    monkeypatch.setattr(decode_attention, "flash_varlen", documented_varlen)
    decode = VarlenDecode(slots=slots, window=256, device=torch.device("cpu"))
    check = dict(heads=8, kv_heads=2, head_dim=32, dtype=torch.float32)
    assert decode.disagreement(**check, rows=3) is None and decode.disagreement(**check, rows=slots) is None
