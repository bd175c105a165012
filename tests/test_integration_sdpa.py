"""sla.integrations.sdpa.wrap_sdpa_self_attention on small modules that call scaled_dot_product_attention (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as imported_sdpa

import sla
from sla.integrations.sdpa import unwrap_sdpa_self_attention, wrap_sdpa_self_attention


class ToySelfAttention(nn.Module):
    """A ViT-style attention layer; ``style`` picks how it reaches SDPA."""

    def __init__(self, dim=32, heads=2, style="F", cross_dim=None, mask=False):
        super().__init__()
        self.heads, self.style, self.mask = heads, style, mask
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(cross_dim, 2 * dim) if cross_dim else None

    def _split(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, D) view

    def forward(self, x, context=None):
        q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool) if self.mask else None
        if self.style == "F":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        elif self.style == "imported":
            o = imported_sdpa(q, k, v, attn_mask=mask, scale=0.3)
        else:  # computes attention without SDPA
            o = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
        if self.cross_kv is not None:
            ck, cv = (self._split(t) for t in self.cross_kv(context).chunk(2, dim=-1))
            o = o + F.scaled_dot_product_attention(q, ck, cv)
        return self.out(o.transpose(1, 2).flatten(2))


def _x(L=70, seed=0):
    return torch.randn(2, L, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("style", ["F", "imported"])
def test_critical_one_equals_sdpa_and_sla_is_a_submodule(style):
    torch.manual_seed(0)
    layer = ToySelfAttention(style=style)
    x = _x()
    dense = layer(x)
    wrap_sdpa_self_attention(layer, head_dim=16, critical=1.0, negligible=0.0, block_q=16, block_k=16)
    assert {"sla.proj.weight", "sla.proj.bias"} <= set(layer.state_dict())
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)  # the call's scale=0.3 is honoured
    # calls outside the wrapped module stay plain SDPA
    q = torch.randn(1, 2, 8, 16)
    assert torch.equal(F.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))


def test_defaults_sparse_gradients_and_matches_functional():
    torch.manual_seed(0)
    layer = ToySelfAttention()
    wrap_sdpa_self_attention(layer, head_dim=16, block_q=16, block_k=16)
    with torch.no_grad():
        layer.sla.proj.weight.normal_(0, 0.1)
    x = _x()
    out = layer(x)
    q, k, v = (layer._split(t) for t in layer.qkv(x).chunk(3, dim=-1))
    ref = sla.sparse_linear_attention(q, k, v, block_q=16, block_k=16, scale=0.3, proj_weight=layer.sla.proj.weight,
                                      proj_bias=layer.sla.proj.bias)
    torch.testing.assert_close(out, layer.out(ref.transpose(1, 2).flatten(2)))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_unsupported_calls_raise_instead_of_falling_back():
    layer = wrap_sdpa_self_attention(ToySelfAttention(mask=True), head_dim=16, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(_x())
    layer = wrap_sdpa_self_attention(ToySelfAttention(style="manual"), head_dim=16, block_q=16, block_k=16)
    with pytest.raises(RuntimeError, match="no scaled_dot_product_attention call"):
        layer(_x())
    # the mode was popped despite the error: SDPA outside works as before
    q = torch.randn(1, 2, 8, 16)
    F.scaled_dot_product_attention(q, q, q)


def test_cross_attention_policy_and_unwrap():
    torch.manual_seed(0)
    layer = ToySelfAttention(cross_dim=8)
    x, ctx = _x(), torch.randn(2, 5, 8)
    dense = layer(x, ctx)
    wrap_sdpa_self_attention(layer, head_dim=16, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="cross-attention"):
        layer(x, ctx)
    unwrap_sdpa_self_attention(layer)
    wrap_sdpa_self_attention(layer, head_dim=16, critical=1.0, negligible=0.0, block_q=16, block_k=16,
                             on_cross_attention="dense")
    torch.testing.assert_close(layer(x, ctx), dense, rtol=1e-5, atol=1e-5)
    unwrap_sdpa_self_attention(layer)
    assert not hasattr(layer, "sla") and torch.equal(layer(x, ctx), dense)
    with pytest.raises(ValueError, match="not wrapped"):
        unwrap_sdpa_self_attention(layer)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_k=100"):
        wrap_sdpa_self_attention(ToySelfAttention(), head_dim=16, block_k=100)
    with pytest.raises(ValueError, match="on_cross_attention"):
        wrap_sdpa_self_attention(ToySelfAttention(), head_dim=16, on_cross_attention="skip")
    with pytest.raises(ValueError, match="head_dim"):
        wrap_sdpa_self_attention(ToySelfAttention(), head_dim=0)
    layer = wrap_sdpa_self_attention(ToySelfAttention(), head_dim=16)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_sdpa_self_attention(layer, head_dim=16)


def test_wraps_a_diffusers_flux_model_through_the_native_backend():
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"),
                          -1).reshape(64, 3)
    inputs = dict(hidden_states=torch.randn(1, 64, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=img_ids, txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        dense = flux(**inputs)[0]
    # joint text+image attention of the double-stream block and the single-stream block: 72 tokens each
    for block in list(flux.transformer_blocks) + list(flux.single_transformer_blocks):
        wrap_sdpa_self_attention(block.attn, head_dim=16, critical=1.0, negligible=0.0, block_q=16, block_k=16)
    with torch.no_grad():
        torch.testing.assert_close(flux(**inputs)[0], dense, rtol=1e-5, atol=1e-5)
    assert sum(".sla.proj.weight" in n for n in flux.state_dict()) == 2
