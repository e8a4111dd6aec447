"""notus's decoder layer as the engine runs it: few operations per token, on transformers' weights.

Each decode step launches every operation of every layer once, and on a GPU each launch costs
about as much as a small kernel's work, so the layer is written as few operations (14; counted by
scripts/op_count.py, capped by a test):

- q/k/v and gate/up are merged once at load into single weights (one matrix product each). The
  modules' own weights become views into the merged ones, so transformers' forward (the tests'
  reference) runs on the same memory: no second copy.
- RMSNorm is `F.rms_norm`: one fused kernel on CUDA (the CPU's composite is transformers' math).
- Rotary embeddings come from a table indexed by position, built once with transformers' own
  rotary module (the same bits): q and k are rotated in one pass, in place in the merged q/k/v, so
  k and v stay side by side in one tensor and are written to the cache in one op.
- The residual adds ride on the output projections (`addmm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) x head_dim, hidden]: q, then k, then v
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 x intermediate, hidden]: gate, then up
    down: torch.Tensor
    eps: float
    rotated_heads: int  # q's and k's heads, the first of qkv's: rotary applies to them, not to v's


def layer_weights(layer) -> LayerWeights:
    """`layer`'s weights with q/k/v and gate/up merged (done once per layer: later calls reuse it)."""
    weights = getattr(layer, "_notus_weights", None)
    if weights is None:
        attention, mlp = layer.self_attn, layer.mlp
        weights = LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=_merge(attention.q_proj, attention.k_proj, attention.v_proj),
            o=attention.o_proj.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=_merge(mlp.gate_proj, mlp.up_proj),
            down=mlp.down_proj.weight.detach(),
            eps=layer.input_layernorm.variance_epsilon,
            rotated_heads=(attention.q_proj.out_features + attention.k_proj.out_features) // attention.head_dim,
        )
        layer._notus_weights = weights
    return weights


def _merge(*linears: nn.Linear) -> torch.Tensor:
    """The linears' weights stacked into one; each linear keeps a view of its rows (no second copy)."""
    if any(linear.bias is not None for linear in linears):
        raise ValueError("merging projections with a bias is not supported (notus has none)")
    merged = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(merged[start : start + rows], requires_grad=False)
        start += rows
    return merged


class RotaryTable:
    """cos and signed sin for every position, from transformers' rotary module (the same values).

    With sin's first half negated, rotate_half(x) * sin = roll(x, d/2) * signed_sin exactly (a sign
    flip rounds the same), so a rotation is x * cos + roll(x) * signed_sin: four operations.
    """

    def __init__(self, model):
        positions = model.config.max_position_embeddings
        device, dtype = model.device, model.dtype
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = model.model.rotary_emb(probe, torch.arange(positions, device=device)[None])
        cos, sin = cos[0], sin[0]  # [positions, head_dim], in the model's dtype
        half = sin.shape[-1] // 2
        signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.table = torch.stack([cos, signed_sin], dim=1)  # [positions, 2, head_dim]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """[n, 2, 1, head_dim]: cos and signed sin at `positions` [n], for every head alike."""
        return self.table[positions][:, :, None, :]


def rotated_qkv(w: LayerWeights, x: torch.Tensor, rotation: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q, k and v of tokens `x` [n, hidden], q and k rotated: [n, heads + 2 kv_heads, head_dim]."""
    h = F.rms_norm(x, x.shape[-1:], w.input_norm, w.eps)
    qkv = F.linear(h, w.qkv).view(x.shape[0], -1, head_dim)
    qk = qkv[:, : w.rotated_heads]
    # qkv rolled whole (contiguous): CUDA's roll copies a strided input to a contiguous one first, a
    # second kernel. Rotated in place: v stays beside k.
    rolled = qkv.roll(head_dim // 2, dims=-1)[:, : w.rotated_heads]
    torch.add(qk * rotation[:, 0], rolled * rotation[:, 1], out=qk)
    return qkv


def rest_of_layer(w: LayerWeights, x: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
    """The residual stream after the output projection and the MLP: x [n, hidden], attention_out [n, heads x head_dim]."""
    x = torch.addmm(x, attention_out, w.o.t())
    gate, up = F.linear(F.rms_norm(x, x.shape[-1:], w.post_norm, w.eps), w.gate_up).chunk(2, dim=-1)
    return torch.addmm(x, F.silu(gate) * up, w.down.t())
