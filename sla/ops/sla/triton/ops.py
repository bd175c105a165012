"""Host side of the SLA Triton kernels: launchers, ``torch.library`` custom ops and autograd.

What runs where, per SLA call (layout ``(B, H, L, D)``; the variant is chosen by ``linear_scope``):

1. ``sla_linear_state_kernel``: per key block ``h_j = phi(K_j)^T V_j`` and ``z_j`` (phi applied in the kernel).
2. ``H = M @ h``, ``Z = M @ z`` with ``M`` the ``(T_m, T_n)`` 0/1 matrix of key blocks in scope: one
   tensor-core matmul (cuBLAS) builds every query block's state at once. ``linear_scope="all"`` needs
   no ``M``: every query block shares the total, passed with a zero stride.
3. ``sla_fwd_kernel``: sparse branch over the critical LUT, then ``o_l = phi(Q_i) H_i / (phi(Q_i) . Z_i)``,
   ``Proj`` and the sum, in one pass over each query block. ``o_s``, ``o_l`` and the LSE are written only
   when autograd will need them.

Backward: ``sla_bwd_dq_kernel`` (delta and the sparse dq over the LUT), ``sla_bwd_linear_q_kernel`` (adds
the linear branch's dq through phi's backward; dH_i, dZ_i; the bias gradient's per-block sums), ``dh =
M^T dH``, then ``sla_bwd_dkdv_kernel`` over the LUT's CSR transpose (deterministic, no atomics), which
also adds the linear branch's dk and dv. ``H_i`` is recomputed: nothing of size ``T_m x D x D`` is saved
between forward and backward, and no ``phi(q)``/``phi(k)`` tensor exists at all.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from ..backend import grad_will_flow
from ..blockmap import BlockMap, in_linear_scope
from ..feature_maps import FEATURE_MAP_FNS
from .kernels import (
    sla_bwd_dkdv_kernel,
    sla_bwd_dq_kernel,
    sla_bwd_linear_q_kernel,
    sla_fwd_kernel,
    sla_linear_state_kernel,
)
from .limits import check_triton_inputs, interpreting

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from ._interpreter_compat import patch_interpreter_index

    patch_interpreter_index()

def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-block states ``h`` and ``H``: bf16 for bf16 inputs (tensor-core matmul, same range as
    fp32), fp32 otherwise (fp16 could overflow: ``H_i`` sums thousands of tokens' ``phi(k) v``)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: "tf32x3" (three tf32 tensor-core products, close to fp32 accuracy). With plain "ieee" dots
    # the first fp32 GPU test at head dim 128 did not finish within 200 s on an H200.
    # Half inputs use tf32 where an fp32 operand meets the tensor cores (projection, fp32 states), whose
    # rounding is below that of the half inputs themselves.
    return "tf32x3" if dtype == torch.float32 else "tf32"


LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the forward kernel takes scale * log2(e)

# kernel name -> {"num_warps": .., "num_stages": ..}; set only by the benchmark's launch-config sweep.
LAUNCH_CONFIG_OVERRIDES: dict = {}


def _launch_config(kernel: str, block_q: int, block_k: int, head_dim: int) -> dict:
    """num_warps / num_stages per kernel (one table; no autotuning, so runs are reproducible)."""
    if interpreting():
        return {}
    if kernel in LAUNCH_CONFIG_OVERRIDES:
        return dict(LAUNCH_CONFIG_OVERRIDES[kernel])
    # Chosen from the launch-config sweep of bench/bench_kernels.py on an H200 (bench/RESULTS.md), shape
    # (1, 12, 32760, 128) bf16: for 64x64 blocks (4 warps, 3 stages) forward and (4, 2) backward were best
    # or within noise; for 128x64, (8, 3) forward (1.44 vs 1.54 ms for (8, 2)) and (4, 2) for dK/dV
    # (4.45 vs 4.85 ms for the whole backward with (8, 2)).
    if kernel == "fwd":
        return {"num_warps": 8 if block_q >= 128 else 4, "num_stages": 3}
    if kernel == "state":  # 8 warps: 0.366 vs 0.423 ms for its two launches per step (H200, bench/RESULTS.md)
        return {"num_warps": 8, "num_stages": 1}
    if kernel == "dkdv":
        return {"num_warps": 4, "num_stages": 2}
    if kernel == "linear_q":
        return {"num_warps": 8 if block_q >= 128 else 4, "num_stages": 1}
    return {"num_warps": 8 if block_q >= 128 else 4, "num_stages": 2}


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels address (batch, head, token) through strides; only the head dim must be contiguous.
    # A (B, L, H, D) tensor viewed as (B, H, L, D) already is, so it passes through untouched.
    return x if x.stride(-1) == 1 else x.contiguous()


def _linear_states(k: torch.Tensor, v: torch.Tensor, block_k: int, feature_map: str):
    """Per key block ``h_j = phi(K_j)^T V_j`` ``(B, H, T_n, D, D)`` and ``z_j`` ``(B, H, T_n, D)`` fp32."""
    B, H, Lk, D = k.shape
    Tn = triton.cdiv(Lk, block_k)
    hs = torch.empty(B, H, Tn, D, D, dtype=_state_dtype(v.dtype), device=v.device)
    zs = torch.empty(B, H, Tn, D, dtype=torch.float32, device=v.device)
    sla_linear_state_kernel[(Tn, B * H)](
        k, v, hs, zs, *_strides(k), *_strides(v), Lk, Tn,
        H=H, D=D, BN=block_k, FEATURE=feature_map, PREC=_dot_precision(v.dtype),
        **_launch_config("state", block_k, block_k, D))
    return hs, zs


def _aggregate_states(hs: torch.Tensor, zs: torch.Tensor, scope_mask: Optional[torch.Tensor]):
    """Per query block ``H_i = sum_j M_ij h_j`` and ``Z_i``: ``(B, H, T_m, D, D)`` and ``(B, H, T_m, D)``, or
    ``(B, H, 1, D, D)`` totals when every key is in scope (``scope_mask is None``)."""
    B, H, Tn, D, _ = hs.shape
    if scope_mask is None:
        return hs.sum(dim=2, keepdim=True, dtype=torch.float32).to(hs.dtype), zs.sum(dim=2, keepdim=True)
    Tm = scope_mask.shape[2]
    big = torch.matmul(scope_mask.to(hs.dtype), hs.reshape(B, H, Tn, D * D)).reshape(B, H, Tm, D, D)
    return big, torch.matmul(scope_mask.to(torch.float32), zs)


def _state_strides(big_h: torch.Tensor, big_z: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch*head, query block) strides of the aggregated states; a single shared total gets stride 0."""
    D = big_h.shape[-1]
    shared = big_h.shape[2] == 1
    return (big_h.shape[2] * D * D, 0 if shared else big_h.stride(2),
            big_z.shape[2] * D, 0 if shared else big_z.stride(2))


def _aux_outputs(q: torch.Tensor, store_aux: bool, mass: bool):
    """``o_s``, ``o_l`` (q's shape, dtype and memory layout), the LSE and (``combine="mass"``) the mixing weight
    ``a``, both ``(B, H, Lq)`` fp32, kept for backward; size-0 placeholders for what will not be kept."""
    def none(*shape_tail, dtype=None):
        return q.new_empty(0, 0, 0, *shape_tail, dtype=dtype)

    if not store_aux:
        return none(q.shape[-1]), none(q.shape[-1]), none(dtype=torch.float32), none(dtype=torch.float32)
    a = q.new_empty(q.shape[:3], dtype=torch.float32) if mass else none(dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32), a


def _token_rows(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``(tokens, D)`` views of same-shape ``(B, H, L, D)`` tensors, rows in the same token order for all, without
    a copy when they are all contiguous or all ``(B, L, H, D)`` tensors viewed as ``(B, H, L, D)``."""
    D = xs[0].shape[-1]
    if not all(x.is_contiguous() for x in xs) and all(x.transpose(1, 2).is_contiguous() for x in xs):
        return [x.transpose(1, 2).reshape(-1, D) for x in xs]
    return [x.reshape(-1, D) for x in xs]


def _fwd_impl(q, k, v, critical_lut, scope_mask, proj_weight, proj_bias, mass_offset, scale, block_q, block_k,
              feature_map, combine, store_aux):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Tm = triton.cdiv(Lq, block_q)
    mass = combine == "mass"
    hs, zs = _linear_states(k, v, block_k, feature_map)
    big_h, big_z = _aggregate_states(hs, zs, scope_mask)
    o = torch.empty_like(q)
    o_s, o_l, lse, a = _aux_outputs(q, store_aux, mass)
    n_crit = critical_lut.shape[-1]
    w = proj_weight if proj_weight is not None else big_z  # placeholder pointer, never read
    bias = proj_bias if proj_bias is not None else big_z
    offsets = mass_offset if mass else big_z
    sla_fwd_kernel[(Tm, B * H)](
        q, k, v, critical_lut, big_h, big_z, w, bias, offsets, o, o_s, o_l, lse, a,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(o_s), *_state_strides(big_h, big_z),
        scale * LOG2_E, math.log(D), Lq, Lk, Tm, n_crit,
        H=H, D=D, BM=block_q, BN=block_k, FEATURE=feature_map, HAS_PROJ=proj_weight is not None,
        HAS_BIAS=proj_bias is not None, STORE_AUX=store_aux, MASS=mass, PREC=_dot_precision(q.dtype),
        **_launch_config("fwd", block_q, block_k, D))
    return o, o_s, o_l, lse, a


@torch.library.custom_op("sla::triton_fwd", mutates_args=())
def sla_triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    critical_lut: torch.Tensor, critical_lut_t_offsets: torch.Tensor, critical_lut_t: torch.Tensor,
    scope_mask: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
    mass_offset: Optional[torch.Tensor], scale: float, block_q: int, block_k: int, feature_map: str, combine: str,
    store_aux: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused SLA forward. Returns ``(o, o_s, o_l, lse, a)``: the output (q's dtype and memory layout), the sparse
    branch and the linear branch before ``Proj`` (``(B, H, Lq, D)`` contiguous, q's dtype), the base-2
    log-sum-exp ``(B, H, Lq)`` fp32 and, for ``combine="mass"``, the mixing weight ``a`` ``(B, H, Lq)`` fp32. The
    last four are what backward needs; with ``store_aux=False`` (inference) they are not written and come back
    with a leading size of 0 (``a`` also for ``combine="paper"``). ``mass_offset`` ``(H,)`` fp32 is required for
    ``combine="mass"``. The transposed LUT is an input only so that autograd can hand it to backward."""
    # The launchers pick every dtype themselves; an enclosing autocast would turn the fp32 state matmuls to bf16.
    with torch.autocast(q.device.type, enabled=False):
        return _fwd_impl(q, k, v, critical_lut, scope_mask, proj_weight, proj_bias, mass_offset, scale, block_q,
                         block_k, feature_map, combine, store_aux)


@sla_triton_fwd.register_fake
def _(q, k, v, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight, proj_bias, mass_offset,
      scale, block_q, block_k, feature_map, combine, store_aux):
    return (torch.empty_like(q), *_aux_outputs(q, store_aux, combine == "mass"))


def _bwd_impl(do, q, k, v, o_s, o_l, lse, a, critical_lut, lut_t_offsets, lut_t, scope_mask, proj_weight, proj_bias,
              scale, block_q, block_k, feature_map, combine):
    """dq, dk, dv through both branches and the feature map, the bias gradient (None without a bias) and, for
    ``combine="mass"``, the per-row gradient ``g`` of the mixing weight's logit (None otherwise): the sparse dQ
    kernel (+ delta, + g), the linear per-query-block kernel (adds its dq, writes dH_i, dZ_i), ``dh = M^T dH``,
    then the per-key-block dK/dV kernel."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Tm, Tn = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    n_crit = critical_lut.shape[-1]
    prec = _dot_precision(q.dtype)
    sdt = _state_dtype(v.dtype)
    mass = combine == "mass"
    dq = torch.empty_like(q)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    g = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if mass else delta  # placeholder when unused
    w_ptr = proj_weight if proj_weight is not None else delta
    b_ptr = proj_bias if proj_bias is not None else delta
    a_ptr = a if mass else delta
    sla_bwd_dq_kernel[(Tm, B * H)](
        q, k, v, do, o_s, o_l, w_ptr, b_ptr, a_ptr, lse, critical_lut, delta, g, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(o_s), *_strides(dq),
        scale, Lq, Lk, Tm, n_crit,
        H=H, D=D, BM=block_q, BN=block_k, HAS_PROJ=proj_weight is not None, HAS_BIAS=proj_bias is not None,
        MASS=mass, PREC=prec, **_launch_config("dq", block_q, block_k, D))

    hs, zs = _linear_states(k, v, block_k, feature_map)
    big_h, big_z = _aggregate_states(hs, zs, scope_mask)
    d_big_h = torch.empty(B, H, Tm, D, D, dtype=sdt, device=q.device)
    d_big_z = torch.empty(B, H, Tm, D, dtype=torch.float32, device=q.device)
    # Per query block partial sums of dO: the bias gradient without a slow column reduction over every token.
    db_part = torch.empty(B * H * Tm, D, dtype=torch.float32, device=q.device) if proj_bias is not None else big_z
    sla_bwd_linear_q_kernel[(Tm, B * H)](
        q, do, proj_weight if proj_weight is not None else big_z, o_l, a_ptr, g, big_h, big_z, dq, d_big_h, d_big_z,
        db_part,
        *_strides(q), *_strides(do), *_strides(o_l), *_strides(dq), *_state_strides(big_h, big_z),
        Lq, Tm,
        H=H, D=D, BM=block_q, FEATURE=feature_map, HAS_PROJ=proj_weight is not None,
        HAS_BIAS=proj_bias is not None, MASS=mass, PREC=prec, **_launch_config("linear_q", block_q, block_k, D))
    # Per key block: the sum of dH_i over the query blocks that have it in scope (fp32 accumulation).
    if scope_mask is None:
        d_hs = d_big_h.sum(dim=2, keepdim=True, dtype=torch.float32).to(sdt)
        d_zs = d_big_z.sum(dim=2, keepdim=True)
    else:
        m_t = scope_mask.transpose(-1, -2)
        d_hs = torch.matmul(m_t.to(sdt), d_big_h.reshape(B, H, Tm, D * D)).reshape(B, H, Tn, D, D)
        d_zs = torch.matmul(m_t.to(torch.float32), d_big_z)

    dk = torch.empty_like(k)
    dv = torch.empty_like(k)  # the kernel writes dk and dv with the same strides
    sla_bwd_dkdv_kernel[(Tn, B * H)](
        q, k, v, do, a_ptr, lse, delta, lut_t_offsets, lut_t, d_hs, d_zs, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_state_strides(d_hs, d_zs),
        scale, Lq, Lk, Tm, Tn, n_crit,
        H=H, D=D, BM=block_q, BN=block_k, FEATURE=feature_map, MASS=mass, PREC=prec,
        **_launch_config("dkdv", block_q, block_k, D))
    d_bias = db_part.sum(0).to(proj_bias.dtype) if proj_bias is not None else None
    return dq, dk, dv, d_bias, (g if mass else None)


@torch.library.custom_op("sla::triton_bwd", mutates_args=())
def sla_triton_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o_s: torch.Tensor, o_l: torch.Tensor, lse: torch.Tensor, a: torch.Tensor,
    critical_lut: torch.Tensor, critical_lut_t_offsets: torch.Tensor, critical_lut_t: torch.Tensor,
    scope_mask: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
    mass_offset: Optional[torch.Tensor], scale: float, block_q: int, block_k: int, feature_map: str, combine: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA backward. Returns ``(dq, dk, dv, d_proj_weight, d_proj_bias, d_mass_offset)``: ``dq``, ``dk``, ``dv``
    through both branches (the feature map's backward included); projection and offset grads are empty tensors
    when there is none."""
    with torch.autocast(q.device.type, enabled=False):  # as in sla_triton_fwd
        return _bwd(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask,
                    proj_weight, proj_bias, mass_offset, scale, block_q, block_k, feature_map, combine)


def _bwd(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight,
         proj_bias, mass_offset, scale, block_q, block_k, feature_map, combine):
    do = _last_dim_contiguous(do)
    dq, dk, dv, d_b, g = _bwd_impl(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets,
                                   critical_lut_t, scope_mask, proj_weight, proj_bias, scale, block_q, block_k,
                                   feature_map, combine)
    if proj_weight is not None:
        # One GEMM over all tokens in the input dtype (fp32 accumulation inside cuBLAS, one rounding of the
        # D x D result), as autocast's Linear backward does; no fp32 copies of dO and o_l (measured 0.3 ms of
        # copies at (1, 12, 32760, 128) on an H200).
        do_l = do if g is None else (do * (1 - a).unsqueeze(-1)).to(do.dtype)  # the projection's share of dO
        do2, ol2 = _token_rows(do_l, o_l)
        d_w = (do2.transpose(0, 1) @ ol2).to(proj_weight.dtype)
    else:
        d_w = do.new_empty(0)
    if d_b is None:
        d_b = do.new_empty(0)
    # a = sigmoid(... - mass_offset[h]): its gradient is minus the sum of g over the head's rows.
    d_off = -g.sum(dim=(0, 2)).to(mass_offset.dtype) if g is not None else do.new_empty(0)
    return dq, dk, dv, d_w, d_b, d_off


@sla_triton_bwd.register_fake
def _(do, q, k, v, o_s, o_l, lse, a, critical_lut, critical_lut_t_offsets, critical_lut_t, scope_mask, proj_weight,
      proj_bias, mass_offset, scale, block_q, block_k, feature_map, combine):
    d_w = torch.empty_like(proj_weight) if proj_weight is not None else do.new_empty(0)
    d_b = torch.empty_like(proj_bias) if proj_bias is not None else do.new_empty(0)
    d_off = torch.empty_like(mass_offset) if combine == "mass" else do.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k), d_w, d_b, d_off


def _setup_context(ctx, inputs, output):
    (q, k, v, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias, mass_offset, scale, block_q, block_k,
     feature_map, combine, store_aux) = inputs
    _, o_s, o_l, lse, a = output
    if not store_aux:
        raise RuntimeError("sla::triton_fwd ran with store_aux=False but autograd needs its backward; call it "
                           "through triton_sparse_linear_attention, which sets store_aux when gradients are needed")
    ctx.mark_non_differentiable(o_s, o_l, lse, a)
    # Backward reads only dO: without this autograd would fill zero gradients for o_s, o_l and the LSE first
    # (a 0.06 ms bf16 fill per step at (1, 12, 32760, 128) on an H200, bench/RESULTS.md).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias,
                          mass_offset)
    ctx.args = (scale, block_q, block_k, feature_map, combine)


def _backward(ctx, do, _d_os, _d_ol, _d_lse, _d_a):
    if do is None:  # grads are not materialised (see _setup_context); o is the only differentiable output
        return (None,) * 16
    (q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask, proj_weight, proj_bias,
     mass_offset) = ctx.saved_tensors
    dq, dk, dv, d_w, d_b, d_off = sla_triton_bwd(do, q, k, v, o_s, o_l, lse, a, lut, lut_t_off, lut_t, scope_mask,
                                                 proj_weight, proj_bias, mass_offset, *ctx.args)
    return (dq, dk, dv, None, None, None, None, d_w if proj_weight is not None else None,
            d_b if proj_bias is not None else None, d_off if ctx.args[-1] == "mass" else None,
            None, None, None, None, None, None)


sla_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def scope_mask_for(block_map: BlockMap, linear_scope: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The 0/1 ``(B, H, T_m, T_n)`` matrix of key blocks in the linear scope, or None for ``"all"``."""
    return None if linear_scope == "all" else in_linear_scope(block_map.class_map, linear_scope).to(dtype)


def triton_sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    proj_weight: Optional[torch.Tensor] = None,
    proj_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    combine: str = "mass",
    mass_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SLA through the fused Triton kernels, differentiable in q, k, v, ``proj_weight``, ``proj_bias`` and
    ``mass_offset``.

    Args:
        q (torch.Tensor): ``[B, H, Lq, D]`` float16, bfloat16 or float32 on CUDA (or CPU under
            ``TRITON_INTERPRET=1``); any strides with a contiguous last dim (e.g. a ``[B, L, H, D]`` tensor
            viewed as ``[B, H, L, D]``, read without a copy). ``D`` in 16, 32, 64, 128.
        k, v (torch.Tensor): ``[B, H, Lk, D]``, same dtype and device.
        block_map (BlockMap): the classification (``sla.build_block_map``); ``block_q``/``block_k`` in 16..128.
        feature_map, linear_scope, proj_weight, proj_bias, scale, combine, mass_offset: as in
            :func:`sla.sparse_linear_attention`.

    Returns:
        ``o`` ``[B, H, Lq, D]`` in q's dtype, with q's memory layout.
    """
    check_triton_inputs(q, block_map.block_q, block_map.block_k)
    block_map.validate_for(q, k)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    if not scale > 0:  # also rejects NaN
        # The kernels fold the scale into the running maximum (max(s) * scale), which needs scale > 0.
        raise ValueError(f"backend='triton' needs a positive softmax scale, got scale={scale}; use backend='torch'")
    if proj_weight is not None:
        proj_weight = proj_weight.to(torch.float32)
    if proj_bias is not None:
        proj_bias = proj_bias.to(torch.float32)
    if combine == "mass":
        mass_offset = (torch.zeros(q.shape[1], dtype=torch.float32, device=q.device) if mass_offset is None
                       else mass_offset.to(torch.float32))
    elif combine != "paper":
        raise ValueError(f"combine must be 'paper' or 'mass', got {combine!r}")
    else:
        mass_offset = None
    if feature_map not in FEATURE_MAP_FNS:  # the kernels implement each map by name (kernels.py)
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAP_FNS)}, got {feature_map!r}")
    scope_mask = scope_mask_for(block_map, linear_scope, _state_dtype(q.dtype))
    # Inference writes only o; the tensors backward needs (o_s, o_l, LSE) only when a gradient can flow.
    store_aux = grad_will_flow(q, k, v, proj_weight, proj_bias, mass_offset)
    if store_aux and block_map.critical_lut_t.numel() == 0 and block_map.critical_lut.numel() > 0:
        raise ValueError("block_map was built with transposes='none' (inference only) but a gradient will flow; "
                         "build it with build_block_map_triton(..., transposes='critical') or 'all', or let "
                         "sla.sparse_linear_attention build it")
    o, _, _, _, _ = sla_triton_fwd(
        q, k, v, block_map.critical_lut, block_map.critical_lut_t_offsets, block_map.critical_lut_t, scope_mask,
        proj_weight, proj_bias, mass_offset, scale, block_map.block_q, block_map.block_k, feature_map, combine,
        store_aux)
    return o
