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

from . import launch


@torch.library.custom_op("sla::triton_fwd", mutates_args=())
def sla_triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    critical_lut: torch.Tensor, critical_lut_t_offsets: torch.Tensor, critical_lut_t: torch.Tensor,
    scope_mask: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
    mass_offset: Optional[torch.Tensor], o_c: Optional[torch.Tensor], log_rest: Optional[torch.Tensor], scale: float,
    block_q: int, block_k: int, feature_map: str, combine: str, store_aux: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused SLA forward. Returns ``(o, o_s, o_l, lse, a)``: the output (q's dtype and memory layout), the sparse
    branch and the linear branch before ``Proj`` (``(B, H, Lq, D)`` contiguous, q's dtype), the base-2
    log-sum-exp ``(B, H, Lq)`` fp32 and, for ``combine="mass"`` and ``"pooled"``, the mixing weight ``a``
    ``(B, H, Lq)`` fp32. The last four are what backward needs; with ``store_aux=False`` (inference) they are not
    written and come back with a leading size of 0 (``a`` also for ``combine="paper"``). ``mass_offset`` ``(H,)``
    fp32 is required for ``combine="mass"`` and ``"pooled"``; ``o_c`` (like q) and ``log_rest`` ``(B, H, Lq)`` fp32,
    the coarse branch's outputs (``sla::triton_coarse_fwd``), for ``"pooled"`` only. The transposed LUT is an input
    only so that autograd can hand it to backward."""
    # The launchers pick every dtype themselves; an enclosing autocast would turn the fp32 state matmuls to bf16.
    with torch.autocast(q.device.type, enabled=False):
        return launch.forward(q, k, v, critical_lut, scope_mask, proj_weight, proj_bias, mass_offset, o_c, log_rest,
                              scale, block_q, block_k, feature_map, combine, store_aux)


@sla_triton_fwd.register_fake
def _(q, k, v, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight, proj_bias, mass_offset,
      o_c, log_rest, scale, block_q, block_k, feature_map, combine, store_aux):
    return (torch.empty_like(q), *launch.aux_outputs(q, store_aux, combine in ("mass", "pooled")))


@torch.library.custom_op("sla::triton_bwd", mutates_args=())
def sla_triton_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o_s: torch.Tensor, o_l: torch.Tensor, lse: torch.Tensor, a: torch.Tensor,
    critical_lut: torch.Tensor, critical_lut_t_offsets: torch.Tensor, critical_lut_t: torch.Tensor,
    scope_mask: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
    mass_offset: Optional[torch.Tensor], o_c: Optional[torch.Tensor], scale: float, block_q: int, block_k: int,
    feature_map: str, combine: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """SLA backward. Returns ``(dq, dk, dv, d_proj_weight, d_proj_bias, d_mass_offset, d_o_c, d_log_rest)``: ``dq``,
    ``dk``, ``dv`` through both branches (the feature map's backward included); the other gradients are empty
    tensors where their input is absent (the last two exist for ``combine="pooled"`` only)."""
    with torch.autocast(q.device.type, enabled=False):  # as in sla_triton_fwd
        return launch.backward(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t,
                               scope_mask, proj_weight, proj_bias, mass_offset, o_c, scale, block_q, block_k,
                               feature_map, combine)


@sla_triton_bwd.register_fake
def _(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight,
      proj_bias, mass_offset, o_c, scale, block_q, block_k, feature_map, combine):
    d_w = torch.empty_like(proj_weight) if proj_weight is not None else do.new_empty(0)
    d_b = torch.empty_like(proj_bias) if proj_bias is not None else do.new_empty(0)
    d_off = torch.empty_like(mass_offset) if combine in ("mass", "pooled") else do.new_empty(0)
    pooled = combine == "pooled"
    d_oc = torch.empty_like(do) if pooled else do.new_empty(0)
    d_rest = do.new_empty(q.shape[:3], dtype=torch.float32) if pooled else do.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k), d_w, d_b, d_off, d_oc, d_rest


def _setup_context(ctx, inputs, output):
    """Autograd of ``sla::triton_fwd``: keeps what :func:`launch.backward` reads."""
    (q, k, v, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias, mass_offset, o_c, _log_rest, scale, block_q,
     block_k, feature_map, combine, store_aux) = inputs
    _, o_s, o_l, lse, a = output
    if not store_aux:
        raise RuntimeError("sla::triton_fwd ran with store_aux=False but autograd needs its backward; call it "
                           "through triton_sparse_linear_attention, which sets store_aux when gradients are needed")
    ctx.mark_non_differentiable(o_s, o_l, lse, a)
    # Backward reads only dO: without this autograd would first fill zero gradients for o_s, o_l and the LSE,
    # full-size writes that nothing reads (bench/RESULTS.md, "Backward experiments").
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias,
                          mass_offset, o_c)
    ctx.args = (scale, block_q, block_k, feature_map, combine)


def _backward(ctx, do, _d_os, _d_ol, _d_lse, _d_a):
    """Autograd of ``sla::triton_fwd``: ``sla::triton_bwd`` on what ``_setup_context`` kept; gradients for the
    differentiable inputs (q, k, v, the projection, the offsets), None for the rest."""
    if do is None:  # grads are not materialised (see _setup_context); o is the only differentiable output
        return (None,) * 18
    (q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias,
     mass_offset, o_c) = ctx.saved_tensors
    dq, dk, dv, d_w, d_b, d_off, d_oc, d_rest = sla_triton_bwd(do, q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t,
                                                               scope_mask, proj_weight, proj_bias, mass_offset, o_c,
                                                               *ctx.args)
    combine = ctx.args[-1]
    pooled = combine == "pooled"
    return (dq, dk, dv, None, None, None, None, d_w if proj_weight is not None else None,
            d_b if proj_bias is not None else None, d_off if combine in ("mass", "pooled") else None,
            d_oc if pooled else None, d_rest if pooled else None, None, None, None, None, None, None)


sla_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sla::triton_coarse_fwd", mutates_args=())
def sla_triton_coarse_fwd(
    q: torch.Tensor, k_means: torch.Tensor, v_means: torch.Tensor, log2_lengths: torch.Tensor, codes: torch.Tensor,
    scale: float, block_q: int, store_aux: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``combine="pooled"``'s coarse branch, ``(o_c, log_rest, lse_c)``: arguments and returns as
    :func:`launch.coarse_forward`. ``lse_c`` (what backward needs) has size 0 with ``store_aux=False``."""
    with torch.autocast(q.device.type, enabled=False):
        return launch.coarse_forward(q, k_means, v_means, log2_lengths, codes, scale, block_q, store_aux)


@sla_triton_coarse_fwd.register_fake
def _(q, k_means, v_means, log2_lengths, codes, scale, block_q, store_aux):
    rows = q.new_empty(q.shape[:3], dtype=torch.float32)
    lse_c = torch.empty_like(rows) if store_aux else q.new_empty(0, 0, 0, dtype=torch.float32)
    return torch.empty_like(q), rows, lse_c


@torch.library.custom_op("sla::triton_coarse_bwd", mutates_args=())
def sla_triton_coarse_bwd(
    d_o_c: torch.Tensor, d_log_rest: torch.Tensor, q: torch.Tensor, k_means: torch.Tensor, v_means: torch.Tensor,
    log2_lengths: torch.Tensor, codes: torch.Tensor, o_c: torch.Tensor, lse_c: torch.Tensor, log_rest: torch.Tensor,
    scale: float, block_q: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``sla::triton_coarse_fwd``: ``(dq, d_k_means, d_v_means)`` (:func:`launch.coarse_backward`)."""
    with torch.autocast(q.device.type, enabled=False):
        return launch.coarse_backward(d_o_c, d_log_rest, q, k_means, v_means, log2_lengths, codes, o_c, lse_c,
                                      log_rest, scale, block_q)


@sla_triton_coarse_bwd.register_fake
def _(d_o_c, d_log_rest, q, k_means, v_means, log2_lengths, codes, o_c, lse_c, log_rest, scale, block_q):
    return torch.empty_like(q), torch.empty_like(k_means), torch.empty_like(v_means)


def _coarse_setup_context(ctx, inputs, output):
    q, k_means, v_means, log2_lengths, codes, scale, block_q, store_aux = inputs
    o_c, log_rest, lse_c = output
    if not store_aux:
        raise RuntimeError("sla::triton_coarse_fwd ran with store_aux=False but autograd needs its backward; call it "
                           "through triton_sparse_linear_attention, which sets store_aux when gradients are needed")
    ctx.mark_non_differentiable(lse_c)
    ctx.save_for_backward(q, k_means, v_means, log2_lengths, codes, o_c, lse_c, log_rest)
    ctx.args = (scale, block_q)


def _coarse_backward(ctx, d_o_c, d_log_rest, _d_lse_c):
    q, k_means, v_means, log2_lengths, codes, o_c, lse_c, log_rest = ctx.saved_tensors
    # Autograd fills an unused output's gradient with zeros (materialised grads), so both arrive as tensors.
    dq, d_km, d_vm = sla_triton_coarse_bwd(d_o_c, d_log_rest, q, k_means, v_means, log2_lengths, codes, o_c, lse_c,
                                           log_rest, *ctx.args)
    return dq, d_km, d_vm, None, None, None, None, None


sla_triton_coarse_fwd.register_autograd(_coarse_backward, setup_context=_coarse_setup_context)
