"""notus/layers.py: merged weights that share transformers' memory, and a layer equal to transformers'."""

from __future__ import annotations

import gc
import weakref

import torch
from transformers import AutoModelForCausalLM
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

from notus.forward import Forward, KVCache
from notus.layers import RotaryTable, layer_weights, rest_of_layer, rotated_qkv


def fresh_model(tiny_weights):
    return AutoModelForCausalLM.from_pretrained(tiny_weights, dtype=torch.float32).eval()


def test_merged_weights_are_the_modules_own_memory_not_a_second_copy(tiny_weights):
    model = fresh_model(tiny_weights)
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    originals = [weakref.ref(m.weight) for m in (attention.q_proj, attention.k_proj, attention.v_proj,
                                                  mlp.gate_proj, mlp.up_proj)]
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    w = layer_weights(layer)
    gc.collect()
    assert all(ref() is None for ref in originals)  # the unmerged weights are freed
    for m in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert m.weight.untyped_storage().data_ptr() == w.qkv.untyped_storage().data_ptr()
    for m in (mlp.gate_proj, mlp.up_proj):
        assert m.weight.untyped_storage().data_ptr() == w.gate_up.untyped_storage().data_ptr()
    assert all(torch.equal(before[name], p) for name, p in layer.named_parameters())  # same values
    assert layer_weights(layer) is w  # merged once


def test_a_layer_gives_transformers_outputs(tiny_weights):
    """One decoder layer, first chunk, against transformers' own layer on the same (merged) weights."""
    model = fresh_model(tiny_weights)
    config = model.config
    torch.manual_seed(0)
    n = 37
    x = torch.randn(n, config.hidden_size)
    positions = torch.arange(n)
    forward = Forward(model, KVCache(config, slots=1, device=torch.device("cpu"), dtype=torch.float32))
    layer = model.model.layers[0]
    with torch.inference_mode():
        cos, sin = model.model.rotary_emb(x[None], positions[None])
        mask = torch.full((n, n), -torch.inf).triu(1)[None, None]
        expected = layer(x[None], attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
        expected = expected[0] if isinstance(expected, tuple) else expected
        # The project's pieces of the same layer.
        w = layer_weights(layer)
        heads, d = config.num_attention_heads, forward.head_dim
        qkv = rotated_qkv(w, x, RotaryTable(model).at(positions), d)
        q = qkv[:, :heads].transpose(0, 1)
        k, v = qkv[:, heads:].view(n, 2, config.num_key_value_heads, d).permute(1, 2, 0, 3)
        out = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                               enable_gqa=True)
        got = rest_of_layer(w, x, out[0].transpose(0, 1).reshape(n, -1))
    torch.testing.assert_close(got, expected[0], rtol=1e-5, atol=1e-5)


def test_q_and_k_are_rotated_as_transformers_rotates_them_and_v_is_left_as_projected(tiny_weights):
    """To the last bit (float32), at the first positions, either side of 4,096 and the last: the
    table holds transformers' cos and sin, and rotated_qkv's q and k are apply_rotary_pos_emb's,
    rotated in place beside an untouched v."""
    model = fresh_model(tiny_weights)
    config = model.config
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    positions = torch.tensor([0, 1, 4095, 4096, 32767])
    cos, sin = model.model.rotary_emb(torch.zeros(1), positions[None])
    x = torch.randn(len(positions), config.hidden_size, generator=torch.Generator().manual_seed(0))
    w = layer_weights(model.model.layers[0])
    with torch.inference_mode():
        qkv = rotated_qkv(w, x, RotaryTable(model).at(positions), d)
        projected = torch.nn.functional.linear(
            torch.nn.functional.rms_norm(x, x.shape[-1:], w.input_norm, w.eps), w.qkv).view(len(positions), -1, d)
    q, k, v = projected.split([heads, kv_heads, kv_heads], dim=1)
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.equal(qkv[:, :heads], expected_q[0].transpose(0, 1))
    assert torch.equal(qkv[:, heads : heads + kv_heads], expected_k[0].transpose(0, 1))
    assert torch.equal(qkv[:, heads + kv_heads :], v)
