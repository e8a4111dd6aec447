"""notus's forward pass over a KV cache this project owns: many sequences per step, chunked prefill.

The weights are transformers' (MistralForCausalLM, loaded as usual); only the loop over its
modules is ours, so the cache is plain tensors:

- One ring of `window` (4,096) entries per slot and layer, keys and values side by side: [layers,
  2, slots + 1, window, kv_heads, head_dim] (FlashAttention's layout). Position p lives at p % window,
  so the ring always holds exactly notus's sliding window: nothing rolls, nothing is allocated per
  step. The extra last slot is scratch: rows of a batch bucket that are not decoding write there, so
  they never touch a live sequence.
- Decode: one token for each of the first `batch` slots at their own positions (device tensors).
  On the GPU in bf16 each row reads just its own ring entries, even in a CUDA graph's fixed shape
  (FlashAttention's variable-length kernel: notus/decode_attention.py). Through SDPA (the CPU, float32
  on a GPU, or where that kernel fails its check) a graph's rows all read the first `length` entries
  (a bucket covering every decoding sequence, masked per row); eager, each row reads its own (the
  scheduler gives rows of similar lengths one masked call instead; rows of one length take one
  call, unmasked). Grouped-query attention reads each K/V once, in place, never repeated.
- Prefill: chunks of several sequences (segments) in one forward, so the weights are read once for
  all of them: the matrix products run over their tokens together, and each chunk attends over its
  own ring plus itself, with a mask of chunk x (ring + chunk): bounded by the chunk size, whatever
  the prompt's length (a first chunk needs no mask at all: SDPA's causal kernel).
- Attention kernels are pinned on CUDA in bf16 (`ATTENTION_KERNELS`): a kernel that cannot take these shapes
  fails loudly instead of SDPA falling back to its math kernel, which materialises the scores.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from notus.decode_attention import VarlenDecode, sdpa_rows
from notus.layers import RotaryTable, layer_weights, rest_of_layer, rotated_qkv


# SDPA's kernel for each use on CUDA. FlashAttention takes grouped-query heads but no mask; the
# memory-efficient kernel takes a mask but not grouped heads (decode folds them into the query axis,
# masked prefill repeats them).
CAUSAL, MASKED = "prefill, first chunk (causal)", "prefill, later chunk (masked)"
ATTENTION_KERNELS = {
    CAUSAL: SDPBackend.FLASH_ATTENTION,
    MASKED: SDPBackend.EFFICIENT_ATTENTION,
    "decode": SDPBackend.EFFICIENT_ATTENTION,
}

COLUMN_MAJOR_ROWS = 32  # decode batches from which the CPU's greedy logits may come column-major (_packed_lm_head)


def one_length(lengths: list[int]) -> bool:
    """Whether every row of an eager decode step reads as many ring entries: then one attention call
    over all of them needs no mask (Forward.decode), and the scheduler keeps their lengths a list."""
    return lengths.count(lengths[0]) == len(lengths)


def attention_kernel(use: str, cache: KVCache):
    """SDPA limited to the one kernel pinned for `use` on CUDA in bf16 (how notus runs). Elsewhere SDPA
    chooses: the CPU has its own kernels, and FlashAttention takes no float32 (the GPU exactness tests)."""
    backend = ATTENTION_KERNELS[use]
    pinned = cache.k.is_cuda and cache.k.dtype in (torch.bfloat16, torch.float16)
    return sdpa_kernel([backend]) if pinned else contextlib.nullcontext()


class Segment(NamedTuple):
    """One sequence's chunk in a prefill: token `ids` [chunk] at positions start.. in slot `slot`."""

    slot: int
    ids: torch.Tensor
    start: int


@dataclass(frozen=True)
class _Span:
    """A segment as the layers see it: its rows in the packed forward, the ring entries it reads
    (positions before its start) and its mask (None: plainly causal)."""

    slot: int
    rows: slice
    held: int
    visible: torch.Tensor | None


class KVCache:
    def __init__(self, config, slots: int, device: torch.device, dtype: torch.dtype):
        layers, kv_heads, self.window, self.head_dim = self.slot_shape(config)
        # Keys and values in one tensor, side by side per layer, so a decode step writes both in one op.
        self.kv = torch.zeros((layers, 2, slots + 1, self.window, kv_heads, self.head_dim), device=device, dtype=dtype)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # views: [layers, slots + 1, window, kv_heads, head_dim]
        self.scratch = slots

    def copy_prefix(self, source: int, slot: int, n: int) -> None:
        """Ring entries 0..n-1 of every layer, keys and values, from slot `source` to `slot` (on the
        device, after the work already queued)."""
        self.kv[:, :, slot, :n] = self.kv[:, :, source, :n]

    def swap(self, a: int, b: int, n: int) -> None:
        """Ring entries 0..n-1 of slots `a` and `b` exchanged, every layer (on the device, after the
        work already queued; one layer at a time, so the temporary copy stays small)."""
        for layer in self.kv:
            held = layer[:, a, :n].clone()
            layer[:, a, :n] = layer[:, b, :n]
            layer[:, b, :n] = held

    @property
    def bytes_per_entry(self) -> int:
        """One ring entry's keys and values, every layer: what attention reads per entry per step."""
        layers, _, _, _, kv_heads, head_dim = self.kv.shape
        return layers * 2 * kv_heads * head_dim * self.kv.element_size()

    @staticmethod
    def slot_shape(config) -> tuple[int, int, int, int]:
        """One slot's K (or V): layers, KV heads, the sliding window, head dim."""
        window = config.sliding_window or config.max_position_embeddings
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers, config.num_key_value_heads, window, head_dim

    @classmethod
    def bytes_per_slot(cls, config, dtype: torch.dtype) -> int:
        """One sequence's K and V over the sliding window, every layer: what each slot allocates."""
        return 2 * math.prod(cls.slot_shape(config)) * torch.empty((), dtype=dtype).element_size()


class Forward:
    """Packed prefill chunks and batched decode steps of `model` over `cache` (the layers: notus/layers.py)."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = cache.head_dim
        self.scale = model.model.layers[0].self_attn.scaling
        self.weights = [layer_weights(layer) for layer in model.model.layers]
        self.rotary = RotaryTable(model)
        self.embedding = model.model.embed_tokens.weight
        self.final_norm, self.eps = model.model.norm.weight, model.model.norm.variance_epsilon
        self.packed_lm_head = _packed_lm_head(model, cache.scratch)  # None where it does not apply
        device = cache.kv.device
        self.rows = torch.arange(cache.scratch, device=device)  # a decode step's row r is slot r
        self.entries = torch.arange(cache.window, device=device)
        # Each row reading its own entries (the GPU in bf16), else None: SDPA.
        self.varlen = VarlenDecode.for_cache(cache.kv, self.heads, cache.scratch)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor, used: torch.Tensor,
               lengths: int | list[int], column_major: bool = False) -> torch.Tensor:
        """Logits [batch, vocab] of `tokens` [batch] at `positions` [batch] in slots 0..batch-1.

        `lengths`: the ring entries attention reads, one bucket for every row (an int: the shape a
        CUDA graph needs, or the CPU's one masked call for rows of different lengths; every decoding
        row's position below it, or past the window and it is the window), or each row's own (a list:
        its position + 1, at most the window; no mask needed, and rows of one length attend in one call).
        With the variable-length kernel (`self.varlen`, the GPU) each row reads its own whatever it is:
        `used` [batch] (int32), its position + 1 up to the window, 1 for a row not decoding. Rows not
        decoding (a batch bucket's padding) compute too but write their K/V where `write_slots` [batch]
        says: the scratch slot (each decoding row's is its own). The caller keeps both per slot.
        `column_major`: the caller reads the logits fast in either memory layout (the sampler's greedy
        pass): they may come as a view of [vocab, batch] memory (see _packed_lm_head), the same values.
        """
        batch = tokens.shape[0]
        cache = self.cache
        write_at = positions % cache.window
        if self.varlen is None and isinstance(lengths, int):
            visible = (self.entries[:lengths] <= positions[:, None])[:, None, None, :]
        equal = isinstance(lengths, list) and one_length(lengths)
        x = F.embedding(tokens, self.embedding)
        rotation = self.rotary.at(positions)
        with attention_kernel("decode", cache):
            for i, w in enumerate(self.weights):
                qkv = rotated_qkv(w, x, rotation, self.head_dim)
                # k and v side by side: one write for both, at each row's slot and ring entry.
                cache.kv[i][:, write_slots, write_at] = qkv[:, self.heads :].view(batch, 2, self.kv_heads, -1).transpose(0, 1)
                q = qkv[:, : self.heads]
                if self.varlen is not None:
                    out = self.varlen(q, cache.k[i], cache.v[i], used, self.scale)
                elif isinstance(lengths, int):
                    out = sdpa_rows(q, cache.k[i][:batch, :lengths], cache.v[i][:batch, :lengths], self.scale, visible)
                elif equal:  # every row reads as many entries: one call, and no mask to build or read
                    n = lengths[0]
                    out = sdpa_rows(q, cache.k[i][:batch, :n], cache.v[i][:batch, :n], self.scale)
                else:
                    out = torch.cat([sdpa_rows(q[r : r + 1], cache.k[i][r : r + 1, :n], cache.v[i][r : r + 1, :n],
                                               self.scale) for r, n in enumerate(lengths)])
                x = rest_of_layer(w, x, out)
        return self.logits(x, column_major)

    @torch.inference_mode()
    def prefill(self, segments: list[Segment]) -> torch.Tensor:
        """Runs every segment's chunk in one forward; the logits of each one's last token [segments, vocab].

        The matrix products run once over all the segments' tokens, so the weights are read once
        for all of them; attention and the cache writes are each segment's own: it attends to its
        slot's ring (positions before `start`) and its own chunk, causal, within the window. Each
        chunk is at most the window long, earlier chunks of its sequence went first, and no two
        segments share a slot.
        """
        ids = torch.cat([s.ids for s in segments])
        positions = torch.cat([self._positions(s) for s in segments])
        spans = self._spans(segments, positions)
        # Every token's slot and ring entry: the keys and values of all the chunks written in one op.
        write_slot = torch.cat([self.rows[s.slot : s.slot + 1].expand(s.ids.shape[0]) for s in segments])
        write_at = positions % self.cache.window
        # Grouped by attention kernel: one pinning (a context to enter) per group and layer, not per segment.
        groups = [(CAUSAL, [s for s in spans if s.visible is None]), (MASKED, [s for s in spans if s.visible is not None])]
        x = F.embedding(ids, self.embedding)
        rotation = self.rotary.at(positions)
        for i, w in enumerate(self.weights):
            qkv = rotated_qkv(w, x, rotation, self.head_dim)
            out = x.new_empty(x.shape[0], self.heads * self.head_dim)
            for use, group in groups:
                if group:
                    with attention_kernel(use, self.cache):
                        for span in group:
                            out[span.rows] = self._prefill_attention(i, qkv[span.rows], span)
            # After every segment's attention: a chunk that wraps the ring overwrites entries it reads.
            self.cache.kv[i][:, write_slot, write_at] = qkv[:, self.heads :].view(x.shape[0], 2, self.kv_heads, -1).transpose(0, 1)
            x = rest_of_layer(w, x, out)
        return self.logits(torch.cat([x[span.rows.stop - 1 : span.rows.stop] for span in spans]))

    def logits(self, x: torch.Tensor, column_major: bool = False) -> torch.Tensor:
        """The vocabulary's logits [n, vocab] of the last layer's output x [n, hidden] (final norm,
        projection); with `column_major`, possibly a view of [vocab, n] memory (_packed_lm_head)."""
        x = F.rms_norm(x, x.shape[-1:], self.final_norm, self.eps)
        return self.model.lm_head(x) if self.packed_lm_head is None else self.packed_lm_head(x, column_major)

    @staticmethod
    def _positions(segment: Segment) -> torch.Tensor:
        return torch.arange(segment.start, segment.start + segment.ids.shape[0], device=segment.ids.device)

    def _spans(self, segments: list[Segment], positions: torch.Tensor) -> list[_Span]:
        """Each segment's rows in the packed forward, the ring entries it reads and its mask."""
        window, spans, row = self.cache.window, [], 0
        for s in segments:
            n = s.ids.shape[0]
            held = min(s.start, window)  # ring entries holding earlier positions
            if held:
                ring = torch.arange(held, device=positions.device)
                # The position each ring entry holds: the latest p < start with p % window == entry.
                ring_positions = s.start - 1 - (s.start - 1 - ring) % window
                own = positions[row : row + n]
                distance = own[:, None] - torch.cat([ring_positions, own])[None, :]
                visible = ((distance >= 0) & (distance < window))[None, None]  # causal, within the window
            else:
                visible = None  # a first chunk (no longer than the window): plainly causal, no mask to build
            spans.append(_Span(s.slot, slice(row, row + n), held, visible))
            row += n
        return spans

    def _prefill_attention(self, i: int, qkv: torch.Tensor, span: _Span) -> torch.Tensor:
        """One segment's attention in layer i: its q/k/v [chunk, heads + 2 kv_heads, d] over its
        slot's held ring entries and itself. Returns [chunk, heads x d]."""
        cache, chunk = self.cache, qkv.shape[0]
        q = qkv[:, : self.heads].transpose(0, 1)[None]  # [1, heads, chunk, d]
        kv = qkv[:, self.heads :].view(chunk, 2, self.kv_heads, -1).transpose(0, 1)  # [2, chunk, kv_heads, d]
        keys = torch.cat([cache.k[i][span.slot, : span.held], kv[0]]).transpose(0, 1)[None]  # [1, kv_heads, held + chunk, d]
        values = torch.cat([cache.v[i][span.slot, : span.held], kv[1]]).transpose(0, 1)[None]
        # Prefill is compute-bound: a fused SDPA kernel. Unmasked (a first chunk), the causal kernel
        # reads each KV head once for its query heads (enable_gqa). With a mask, the fused kernel that
        # takes it does not take grouped heads: the KV heads are repeated, as transformers' SDPA
        # attention does (a copy of the keys and values, small beside the chunk's matmuls).
        if span.visible is not None:
            keys = keys.repeat_interleave(self.groups, dim=1)
            values = values.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=span.visible, is_causal=span.visible is None,
                                             scale=self.scale, enable_gqa=span.visible is None)
        return out[0].transpose(0, 1).reshape(chunk, -1)


def _packed_lm_head(model, batch: int):
    """On the CPU (float32): the vocabulary projection through oneDNN, its weight packed once.

    What torch.compile's CPU backend does for a frozen linear layer (the same op). For 8 rows it
    was 2.4x to 3x faster than torch's default matmul (MKL) on the development CPU, and each row's
    logits are the same alone or in a batch (MKL's differ in the last bits with the batch size; so
    do torch 2.11's oneDNN kernels: tests/test_scheduler.py checks the pinned torch's).

    With `column_major` and at least COLUMN_MAJOR_ROWS rows, the logits are computed transposed,
    W x^T: [vocab, rows], the rows as oneDNN's weight, returned as a [rows, vocab] view: the same
    bits (tested), faster for many rows where the hidden size is small. On the development CPU,
    the tiny model (64 wide): 2.5 against 4.1 ms for 32 rows, 4.6 against 7.0 ms for 64, 2.8
    against 3.1 for 16 (where reading the logits across 16 rows costs the greedy pass more than
    that: first_max); 4,096 wide (notus in float32): alike (204 against 210 ms for 32 rows, 333
    against 323 for 64). None where it does not apply.
    """
    weight = model.lm_head.weight.detach()
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or model.lm_head.bias is not None:
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)

    def lm_head(x: torch.Tensor, column_major: bool = False) -> torch.Tensor:
        if column_major and x.shape[0] >= COLUMN_MAJOR_ROWS:
            # x as oneDNN's weight, unpacked: oneDNN packs it itself (packing it here first cost 0.35 ms
            # a step in torch's reorder call, its own work 0.01 ms).
            return torch.ops.mkldnn._linear_pointwise(weight, x, None, "none", [], "").t()
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    return lm_head
