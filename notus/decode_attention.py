"""Decode attention on the GPU that reads each row's own ring entries, in a CUDA graph's fixed shape.

SDPA takes one key length for the whole batch: in a graph every row reads up to the bucket of the
longest row (31 short rows beside one 4,096-token row read 32 x 4,096 entries: 16 GiB a step for
notus in bf16, more than the weights). FlashAttention's variable-length kernel, as torch ships it,
takes each row's count of keys as a device tensor (`seqused_k`), so one captured graph serves every
mix of lengths and reads just what is live.

Row r's query is token r; its keys are slot r's ring, entries r x window .. r x window + used[r] of
the layer's cache seen as [(slots + 1) x window, kv_heads, head_dim] (the cache's layout, notus/forward.py).
The ring's order does not matter to a single query: keys were rotated when written.

It needs CUDA and fp16/bf16 (how notus runs on the GPU). `for_cache` checks it once against SDPA on
this very GPU and falls back to SDPA, loudly, if it fails or disagrees: a kernel nothing here could
try must not be what breaks setup.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("notus")


def flash_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *, scale: float,
                 seqused_k: torch.Tensor) -> torch.Tensor:
    """FlashAttention's variable-length forward, not causal, no window: sequence i's queries are
    query[cu_seq_q[i]:cu_seq_q[i + 1]] ([tokens, heads, d]), its keys and values the first
    seqused_k[i] rows from cu_seq_k[i] ([tokens, kv_heads, d]); query head h uses KV head
    h // (heads / kv_heads). The op torch 2.13's `torch.nn.attention.varlen.varlen_attn(seqused_k=...)`
    calls; called directly, it also runs on torch 2.11 (the GPU check machine's), whose varlen_attn
    has no seqused_k."""
    return torch.ops.aten._flash_attention_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0,
                                                   False, False, scale=scale, seqused_k=seqused_k)[0]


class VarlenDecode:
    """One decode step's attention for rows 0..batch-1 over their own slots' rings."""

    def __init__(self, slots: int, window: int, device: torch.device):
        self.window, self.slots = window, slots
        rows = torch.arange(max(slots, 3) + 2, dtype=torch.int32, device=device)  # the setup check's 3 rows too
        self.query_starts = rows  # row r's one query is token r
        self.key_starts = rows * window  # row r's keys begin at slot r's ring

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q [batch, heads, d]; keys/values [slots + 1, window, kv_heads, d] (a layer's cache); used
        [batch] int32: the entries each row reads. Returns [batch, heads x d]."""
        batch = q.shape[0]
        out = flash_varlen(q, keys.flatten(0, 1), values.flatten(0, 1), self.query_starts[: batch + 1],
                           self.key_starts[: batch + 1], 1, self.window, scale=scale, seqused_k=used)
        return out.reshape(batch, -1)

    @classmethod
    def for_cache(cls, kv: torch.Tensor, heads: int, slots: int) -> VarlenDecode | None:
        """The variable-length kernel for a cache `kv` ([layers, 2, slots + 1, window, kv_heads, d]) when it
        runs on this device and dtype and matches SDPA; None (SDPA's masked buckets) otherwise."""
        if not kv.is_cuda or kv.dtype not in (torch.bfloat16, torch.float16):
            return None
        window, kv_heads, head_dim = kv.shape[3:]
        decode = cls(slots, window, kv.device)
        # Few rows and every slot: the kernel splits a row's keys over blocks when rows are few, not
        # when they are many; each way is checked.
        problem = decode.disagreement(heads, kv_heads, head_dim, kv.dtype, rows=3) or \
            decode.disagreement(heads, kv_heads, head_dim, kv.dtype, rows=slots)
        if problem:
            log.warning("decode attention falls back to SDPA over masked length buckets (every row reads the "
                        "longest row's bucket): FlashAttention's variable-length kernel %s", problem)
            return None
        return decode

    def disagreement(self, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, rows: int = 3) -> str | None:
        """None when the kernel gives SDPA's output on this device for `rows` rows of different lengths
        (1, 7, the whole window, then lengths spread over the window), else what went wrong."""
        device = self.key_starts.device
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (rows + 1, self.window, kv_heads, head_dim)
        keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)  # 277 MB in bf16 for 32 slots
        values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        q = torch.randn(rows, heads, head_dim, generator=generator, device=device, dtype=dtype)
        lengths = [1, 7, self.window] + [(r * 997) % self.window + 1 for r in range(3, rows)]
        used = torch.tensor(lengths[:rows], dtype=torch.int32, device=device)
        scale = head_dim**-0.5
        try:
            got = self(q, keys, values, used, scale).float()
        except Exception as e:  # noqa: BLE001 - reported, and SDPA serves instead
            return f"raised {type(e).__name__}: {e}"
        want = torch.cat([sdpa_rows(q[r : r + 1], keys[r : r + 1, :n], values[r : r + 1, :n], scale)
                          for r, n in enumerate(used.tolist())]).float()
        difference = (got - want).abs().max().item()
        return None if difference <= 0.02 else f"differs from SDPA by {difference:.3g}"


def sdpa_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
              visible: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row through SDPA: q [b, heads, d] over keys/values [b, length, kv_heads, d] (a
    slice of the cache); visible [b, 1, 1, length], or None when every entry is. Returns [b, heads x d].

    The query heads sharing a KV head go along the query axis ([b, kv_heads, groups, d]), so SDPA
    reads each K/V once, in place, instead of a copy repeated per query head.
    """
    b, heads, d = q.shape
    kv_heads = keys.shape[2]
    folded = q.reshape(b, kv_heads, heads // kv_heads, d)
    out = F.scaled_dot_product_attention(folded, keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible, scale=scale)
    return out.reshape(b, -1)
