"""The SLA Triton kernels as ``torch.library`` custom ops: ``sla::triton_fwd`` and ``sla::triton_bwd``, their fake
(meta) implementations for ``torch.compile``, and the forward's autograd formula.

The backward of one call reads, top to bottom: ``_backward`` (the autograd formula) calls the op
``sla::triton_bwd`` on what ``_setup_context`` saved; the op runs :func:`launch.backward` with autocast off, which
launches the kernels step by step. Being an op of its own, the backward is traceable and checkable with
``torch.library.opcheck`` like the forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ....settings import MIXING_RULES, POOLED_RULES
from . import launch


@torch.library.custom_op("sla::triton_fwd", mutates_args=())
def sla_triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    critical_lut: torch.Tensor, critical_lut_t_offsets: torch.Tensor, critical_lut_t: torch.Tensor,
    scope_mask: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
    mass_offset: Optional[torch.Tensor], codes: Optional[torch.Tensor], scale: float, block_q: int, block_k: int,
    feature_map: str, combine: str, store_aux: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Fused SLA forward. Returns ``(o, o_s, o_l, lse, a, o_c, rows, means)``: the output (q's dtype and memory
    layout), the sparse branch and the linear branch before ``Proj`` (``(B, H, Lq, D)`` contiguous, q's dtype), the
    base-2 log-sum-exp ``(B, H, Lq)`` fp32, for ``combine="mass"`` and ``"pooled"`` the mixing weight ``a``
    ``(B, H, Lq)`` fp32, and for ``"pooled"`` its coarse branch's ``o_c``, ``rows`` and ``means``
    (:func:`launch.pooled_outputs`). All but ``o`` are what backward needs; with ``store_aux=False`` (inference)
    they are not kept and come back with a leading size of 0, as do those a rule does not have. ``mass_offset``
    ``(H,)`` fp32 is required for ``combine="mass"`` and ``"pooled"``; ``codes`` ``(B, H, T_m, T_n)`` uint8 (bit 0:
    key block outside the critical ones, bit 1: in the linear scope; ``api.coarse_codes``) for ``"pooled"`` only.
    The transposed LUT is an input only so that autograd can hand it to backward."""
    # The launchers pick every dtype themselves; an enclosing autocast would turn the fp32 state matmuls to bf16.
    with torch.autocast(q.device.type, enabled=False):
        return launch.forward(q, k, v, critical_lut, scope_mask, proj_weight, proj_bias, mass_offset, codes, scale,
                              block_q, block_k, feature_map, combine, store_aux)


@sla_triton_fwd.register_fake
def _(q, k, v, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight, proj_bias, mass_offset,
      codes, scale, block_q, block_k, feature_map, combine, store_aux):
    pooled = combine in POOLED_RULES and store_aux
    return (torch.empty_like(q), *launch.aux_outputs(q, store_aux, combine in MIXING_RULES),
            *launch.pooled_outputs(q, codes.shape[-1] if pooled else 0, pooled, combine == "pooled_cov"))


@torch.library.custom_op("sla::triton_bwd", mutates_args=())
def sla_triton_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o_s: torch.Tensor, o_l: torch.Tensor, lse: torch.Tensor, a: torch.Tensor,
    critical_lut: torch.Tensor, critical_lut_t_offsets: torch.Tensor, critical_lut_t: torch.Tensor,
    scope_mask: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
    mass_offset: Optional[torch.Tensor], codes: Optional[torch.Tensor], o_c: torch.Tensor, rows: torch.Tensor,
    means: torch.Tensor, scale: float, block_q: int, block_k: int, feature_map: str, combine: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA backward. Returns ``(dq, dk, dv, d_proj_weight, d_proj_bias, d_mass_offset)``: ``dq``, ``dk``, ``dv``
    through every branch (the feature map's backward and, for ``combine="pooled"``, the coarse branch and the key
    blocks' means included); the other gradients are empty tensors where their input is absent."""
    with torch.autocast(q.device.type, enabled=False):  # as in sla_triton_fwd
        return launch.backward(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t,
                               scope_mask, proj_weight, proj_bias, mass_offset, codes, o_c, rows, means, scale,
                               block_q, block_k, feature_map, combine)


@sla_triton_bwd.register_fake
def _(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight,
      proj_bias, mass_offset, codes, o_c, rows, means, scale, block_q, block_k, feature_map, combine):
    d_w = torch.empty_like(proj_weight) if proj_weight is not None else do.new_empty(0)
    d_b = torch.empty_like(proj_bias) if proj_bias is not None else do.new_empty(0)
    d_off = torch.empty_like(mass_offset) if combine in MIXING_RULES else do.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k), d_w, d_b, d_off


def _setup_context(ctx, inputs, output):
    """Autograd of ``sla::triton_fwd``: keeps what :func:`launch.backward` reads."""
    (q, k, v, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias, mass_offset, codes, scale, block_q, block_k,
     feature_map, combine, store_aux) = inputs
    _, o_s, o_l, lse, a, o_c, rows, means = output
    if not store_aux:
        raise RuntimeError("sla::triton_fwd ran with store_aux=False but autograd needs its backward; call it "
                           "through triton_sparse_linear_attention, which sets store_aux when gradients are needed")
    ctx.mark_non_differentiable(o_s, o_l, lse, a, o_c, rows, means)
    # Backward reads only dO: without this autograd would first fill zero gradients for o_s, o_l, the LSE (and o_c),
    # full-size writes that nothing reads (bench/RESULTS.md, "Backward experiments").
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias,
                          mass_offset, codes, o_c, rows, means)
    ctx.args = (scale, block_q, block_k, feature_map, combine)


def _backward(ctx, do, *_d_aux):
    """Autograd of ``sla::triton_fwd``: ``sla::triton_bwd`` on what ``_setup_context`` kept; gradients for the
    differentiable inputs (q, k, v, the projection, the offsets), None for the rest."""
    if do is None:  # grads are not materialised (see _setup_context); o is the only differentiable output
        return (None,) * 17
    (q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias, mass_offset, codes, o_c,
     rows, means) = ctx.saved_tensors
    dq, dk, dv, d_w, d_b, d_off = sla_triton_bwd(do, q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask,
                                                 proj_weight, proj_bias, mass_offset, codes, o_c, rows, means,
                                                 *ctx.args)
    combine = ctx.args[-1]
    return (dq, dk, dv, None, None, None, None, d_w if proj_weight is not None else None,
            d_b if proj_bias is not None else None, d_off if combine in MIXING_RULES else None,
            None, None, None, None, None, None, None)


sla_triton_fwd.register_autograd(_backward, setup_context=_setup_context)
