"""Argument checks shared by every SLA implementation.

Every public entry point calls :func:`check_attention_inputs` and makes a (checked) :class:`sla.settings.SLASettings`
before any work, so a bad call fails with a message that names the argument and the fix instead of failing
deep inside a matmul or, worse, returning a wrong result.
"""

from __future__ import annotations

import math

import torch

from ...settings import MIXING_RULES, check_combine_rule

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check that q, k, v are ``(B, H, L, D)`` float tensors with data (not on the meta device), every
    dimension >= 1, that agree with each other; raise ``TypeError``/``ValueError`` naming the fix otherwise."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions laid out as (batch, heads, seq_len, head_dim), got shape "
                f"{tuple(t.shape)}; diffusers-style (B, L, H, D) tensors can be passed as x.transpose(1, 2)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; SLA needs float16, bfloat16, float32 or float64 inputs "
                f"(convert with {name}.float() or {name}.to(torch.bfloat16))"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them with .to()")
    if q.device.type == "meta":
        # Meta tensors carry shapes but no data; the block selection reads values, so there is nothing to
        # compute (torch would fail deep inside with "unsupported scalarType").
        raise ValueError(
            "q, k, v are on the meta device (shapes only, no data); SLA needs real tensors: materialise the "
            "model first (e.g. model.to_empty(device='cpu') and load its weights) before calling it"
        )
    B, H, _, D = q.shape
    if B < 1 or H < 1:
        # An empty batch or head dimension would reach a reshape deep inside the implementations; refusing it
        # here names the cause. (Dense attention would return an empty tensor; an empty call is almost always
        # a bug upstream, e.g. a split that left one part empty.)
        raise ValueError(
            f"q has shape {tuple(q.shape)}: batch size {B} and {H} heads; SLA needs at least one batch element "
            f"and one head (skip the call when there is nothing to attend)"
        )
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B or t.shape[1] != H:
            raise ValueError(
                f"{name} has batch/heads {tuple(t.shape[:2])} but q has {(B, H)}; SLA needs the same batch and "
                f"head count for q, k, v (repeat k/v heads for grouped-query attention)"
            )
        if t.shape[3] != D:
            raise ValueError(f"{name} has head_dim {t.shape[3]} but q has {D}; q, k, v must share head_dim")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v has length {v.shape[2]} but k has {k.shape[2]}; every key needs exactly one value")
    if q.shape[2] < 1 or k.shape[2] < 1 or D < 1:
        raise ValueError(f"q and k need at least one token and head_dim >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def check_scale(scale) -> None:
    """Check the softmax scale of the sparse branch: ``None`` (meaning ``head_dim ** -0.5``) or a finite
    number > 0. The block selection ranks blocks by ``q k^T`` without the scale, which is only the same
    ranking as the softmax's when the scale is positive; 0 would make the softmax uniform, NaN or Inf would
    poison every output."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (None means head_dim ** -0.5), got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"scale={scale} is not a finite number > 0; pass the softmax scale, e.g. head_dim ** -0.5 (the "
            f"default when scale=None)"
        )


def check_combine(combine: str, mass_offset: torch.Tensor | None, num_heads: int, device: torch.device) -> None:
    """Check the branch-combination rule and its per-head offset ``mass_offset`` (``(H,)``, ``"mass"`` and
    ``"pooled"`` only)."""
    check_combine_rule(combine)
    if mass_offset is None:
        return
    if combine not in MIXING_RULES:
        raise ValueError(f"mass_offset was given with combine={combine!r}; it is the per-head offset of the rules "
                         f"{MIXING_RULES} only: pass one of them or drop mass_offset")
    if not isinstance(mass_offset, torch.Tensor) or not mass_offset.is_floating_point():
        raise TypeError(f"mass_offset must be a float tensor of shape (num_heads,) = ({num_heads},)")
    if tuple(mass_offset.shape) != (num_heads,):
        raise ValueError(f"mass_offset has shape {tuple(mass_offset.shape)}, expected ({num_heads},): one offset per "
                         f"head of q")
    if mass_offset.device != device:
        raise ValueError(f"mass_offset is on {mass_offset.device} but q is on {device}; move it with .to()")


def check_projection(
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None, head_dim: int, device: torch.device
) -> None:
    """Check the ``Linear(D, D)`` projection applied to the linear branch."""
    if proj_weight is None and proj_bias is not None:
        raise ValueError("proj_bias was given without proj_weight; pass both, or proj_weight alone")
    if proj_weight is not None:
        if not isinstance(proj_weight, torch.Tensor) or not proj_weight.is_floating_point():
            raise TypeError("proj_weight must be a float tensor of shape (head_dim, head_dim)")
        if tuple(proj_weight.shape) != (head_dim, head_dim):
            raise ValueError(
                f"proj_weight has shape {tuple(proj_weight.shape)}, expected ({head_dim}, {head_dim}) "
                f"(a Linear(head_dim, head_dim) weight, shared by all heads)"
            )
        if proj_weight.device != device:
            raise ValueError(f"proj_weight is on {proj_weight.device} but q is on {device}; move it with .to()")
    if proj_bias is not None:
        if not isinstance(proj_bias, torch.Tensor) or not proj_bias.is_floating_point():
            raise TypeError("proj_bias must be a float tensor of shape (head_dim,)")
        if tuple(proj_bias.shape) != (head_dim,):
            raise ValueError(f"proj_bias has shape {tuple(proj_bias.shape)}, expected ({head_dim},)")
        if proj_bias.device != device:
            raise ValueError(f"proj_bias is on {proj_bias.device} but q is on {device}; move it with .to()")
