"""Attention variants for fine-tuning and the paper's ablations (Table 1/2 of arXiv 2509.24006).

All variants except ``full`` go through :func:`sla.apply_sla`, which gives each self-attention layer of the
model an ``attn.sla`` module (its processor calls ``attn.sla(q, k, v)`` on ``(B, H, L, D)`` tensors after
QK-norm and RoPE). The ablations keep that wiring and change only what ``attn.sla`` computes:

========================  ===============================================================================
``full``                  dense softmax attention; the model is left untouched (the control).
``sla``                   ``o_s + Proj(o_l)``, Proj trainable, zero-initialised (the paper's SLA), or with
                          ``combine="mass"`` ``a o_s + (1 - a) Proj(o_l)`` (identity-initialised Proj).
``sparse_only``           ``o_s``: SLA with Proj frozen at zero (``o_s + 0``). The linear branch is still
                          evaluated by the operator but contributes exactly nothing, so the result is the
                          sparse branch alone; the FLOPs table counts the sparse branch only.
``sum_no_proj``           ``o_s + o_l``: the operator with ``proj_weight=None`` (identity), no Proj
                          parameters (the paper's "L+S" ablation when ``linear_scope="all"``).
``linear_only``           ``phi(q) (sum_j phi(k_j)^T v_j) / (phi(q) . sum_j phi(k_j))`` over all keys; no
                          softmax attention at all (the paper's "Linear Only").
========================  ===============================================================================
"""

from __future__ import annotations

import torch
from torch import nn

from ..integrations._common import SLA_ATTRIBUTE
from ..settings import SLASettings

ATTENTION_MODES = ("full", "sla", "sparse_only", "sum_no_proj", "linear_only")


class SumNoProjAttention(nn.Module):
    """``o_s + o_l`` (identity in place of Proj) through :func:`sla.sparse_linear_attention`."""

    def __init__(self, base):
        super().__init__()
        self.cfg = dict(critical=base.critical, negligible=base.negligible, block_q=base.block_q,
                        block_k=base.block_k, feature_map=base.feature_map, linear_scope=base.linear_scope,
                        backend=base.backend)
        # Same attribute names as SparseLinearAttention, so tools that read the block settings (sla eval's
        # sparsity report) treat both alike.
        for key, value in self.cfg.items():
            setattr(self, key, value)

    def forward(self, q, k, v, *, return_info: bool = False, block_map=None, heads=None):
        # heads (which of the layer's heads q holds, under context parallelism) changes nothing: no per-head state.
        from ..ops.sla.interface import sparse_linear_attention

        return sparse_linear_attention(q, k, v, proj_weight=None, proj_bias=None, return_info=return_info,
                                       block_map=block_map, **self.cfg)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.cfg.items()) + ", proj=identity"


class LinearOnlyAttention(nn.Module):
    """Pure linear attention over all keys with SLA's feature map (no sparse branch, no Proj).

    Computed in float32 for the sums (as the operator's linear branch): ``O(L D^2)`` memory and time.
    """

    def __init__(self, feature_map: str = "softmax", eps: float = 1e-6):
        super().__init__()
        self.feature_map = feature_map
        self.eps = eps

    def forward(self, q, k, v, **_unused):
        from ..ops.sla.feature_maps import apply_feature_map

        dtype = q.dtype
        pq = apply_feature_map(q.float(), self.feature_map)
        pk = apply_feature_map(k.float(), self.feature_map)
        kv = torch.einsum("bhld,bhle->bhde", pk, v.float())
        z = pk.sum(dim=2)  # (B, H, D)
        num = torch.einsum("bhld,bhde->bhle", pq, kv)
        den = torch.einsum("bhld,bhd->bhl", pq, z).unsqueeze(-1)
        return (num / (den + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map!r}"


def apply_attention_mode(model: nn.Module, mode: str, settings: SLASettings | None = None, *, backend: str = "auto",
                         token_tile=None) -> nn.Module:
    """Install attention ``mode`` (see the module docstring) in every self-attention layer, in place, with
    ``settings`` (default: :class:`~sla.settings.SLASettings`'s defaults). ``settings.combine`` applies to
    ``sla`` only: the ablations are defined with the paper's sum (``sparse_only`` is the paper's rule with Proj
    frozen at zero, ``sum_no_proj`` its rule with the identity)."""
    settings = SLASettings() if settings is None else settings
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if mode == "full":
        return model
    from ..integrations.diffusers import apply_sla, sla_modules

    if mode != "sla":
        settings = settings.replace(combine="paper")
    apply_sla(model, **settings.to_dict(), backend=backend, token_tile=token_tile)
    if mode == "sla":
        return model
    root = model.module if hasattr(model, "module") else model
    for name, module in sla_modules(model).items():
        attn = root.get_submodule(name)
        if mode == "sparse_only":
            module.proj.requires_grad_(False)  # stays exactly zero: o = o_s
        elif mode == "sum_no_proj":
            attn.add_module(SLA_ATTRIBUTE, SumNoProjAttention(module))
        elif mode == "linear_only":
            attn.add_module(SLA_ATTRIBUTE, LinearOnlyAttention(settings.feature_map))
    return model


def attention_flops(mode: str, seq_len: int, head_dim: int, heads: int, layers: int, *, critical: float = 0.05,
                    negligible: float = 0.10, block_q: int = 64, block_k: int = 64,
                    linear_scope: str = "marginal") -> float:
    """Forward self-attention FLOPs of one sample (multiply-add = 2 FLOPs), the paper's convention.

    Dense: ``4 L^2 D`` per head (QK^T and PV). Sparse branch: ``4 L (n_crit * block_k) D``. Linear branch:
    ``4 L D^2`` (``phi(K)^T V`` and ``phi(Q) H``) when it runs, plus its ``D x D`` Proj (``2 L D^2``) for ``sla``.
    Block-score prediction (pooled ``QK^T``) is included: ``2 (L/bq) (L/bk) D``.
    """
    import math

    L, D = seq_len, head_dim
    from ..ops.sla.blockmap import class_counts

    tn = math.ceil(L / block_k)
    n_crit, _ = class_counts(critical, negligible, tn)  # the operator's own counting rule
    keys_crit = min(L, n_crit * block_k)
    predict = 2 * math.ceil(L / block_q) * tn * D
    if mode == "full":
        per_head = 4 * L * L * D
    elif mode == "linear_only":
        per_head = 4 * L * D * D
    elif mode == "sparse_only":
        per_head = 4 * L * keys_crit * D + predict
    elif mode in ("sla", "sum_no_proj"):
        per_head = 4 * L * keys_crit * D + 4 * L * D * D + predict + (2 * L * D * D if mode == "sla" else 0)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return float(per_head * heads * layers)
