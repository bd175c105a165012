"""Launchers of the SLA Triton kernels: buffers, strides, and the launch sequence of one forward (:func:`forward`)
and one backward (:func:`backward`), each launch with its ``num_warps``/``num_stages`` from ``launch_config.py``. No
autograd here (``custom_ops.py``), no argument checks (``api.py`` and ``limits.py``): callers pass checked tensors.

What runs, per SLA call (layout ``(B, H, L, D)``; the variant is chosen by ``linear_scope``):

Forward:

1. ``sla_linear_state_kernel``: per key block ``h_j = phi(K_j)^T V_j`` and ``z_j`` (phi applied in the kernel).
2. ``H = M @ h``, ``Z = M @ z`` with ``M`` the ``(T_m, T_n)`` 0/1 matrix of key blocks in scope: one
   tensor-core matmul (cuBLAS) builds every query block's state at once. ``linear_scope="all"`` needs
   no ``M``: every query block shares the total, passed with a zero stride.
3. ``sla_fwd_kernel``: sparse branch over the critical LUT, then ``o_l = phi(Q_i) H_i / (phi(Q_i) . Z_i)``,
   ``Proj`` and the combination, in one pass over each query block. ``o_s``, ``o_l``, the LSE and ``a`` are
   written only when autograd will need them.

Backward (:func:`backward`, five steps): the sparse dQ kernel (``delta``), the linear per-query-block kernel (adds
its dq through phi's backward, writes dH_i, dZ_i and the bias gradient's per-block sums), ``dh = M^T dH``, the
per-key-block dK/dV kernel over the LUT's CSR transpose (deterministic, no atomics), then the projection's and
offsets' gradients. For ``combine="mass"`` the first two swap: the linear kernel runs first and also writes ``g``
(the gradient of ``a``'s logit, which needs ``dO . Proj(o_l)``, a row sum of the ``dO W`` it forms anyway) and
``delta``; the dQ kernel then reads ``delta`` and ``a`` per row and adds its dq to the linear kernel's. ``H_i`` is
recomputed: nothing of size ``T_m x D x D`` is saved between forward and backward, and no ``phi(q)``/``phi(k)``
tensor exists at all.

``combine="pooled"`` adds its coarse branch to both: the key blocks' means and ``sla_coarse_fwd_kernel`` before the
forward's steps; in backward, after the linear kernel, the coarse dq kernel (adding into dq) and the means'
gradients in partial sums, which the dK/dV kernel's epilogue adds to every token of their block.
``combine="pooled_cov"`` adds the covariance state around those kernels as matmuls (the section at the end of
this file).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ....settings import MIXING_RULES, POOLED_RULES
from ..blockmap import block_lengths
from .kernels import (
    LOG2E,
    sla_bwd_dkdv_kernel,
    sla_coarse_bwd_dkdv_kernel,
    sla_coarse_bwd_dq_kernel,
    sla_coarse_fwd_kernel,
    sla_bwd_dq_kernel,
    sla_bwd_linear_q_kernel,
    sla_fwd_kernel,
    sla_linear_state_kernel,
)
from .launch_config import epilogue_chunk, fwd_split, launch_config, tma_loads


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-block states ``h`` and ``H``: bf16 for bf16 inputs (tensor-core matmul, same range as
    fp32), fp32 otherwise (fp16 could overflow: ``H_i`` sums thousands of tokens' ``phi(k) v``)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: "tf32x3" (three tf32 tensor-core products, close to fp32 accuracy). Plain "ieee" dots made the
    # fp32 GPU tests too slow to finish (bench/RESULTS.md, "Measurements behind code choices").
    # Half inputs use tf32 where an fp32 operand meets the tensor cores (projection, fp32 states), whose
    # rounding is below that of the half inputs themselves.
    return "tf32x3" if dtype == torch.float32 else "tf32"




def _row_descriptors(kernel: str, rows: int, *xs: torch.Tensor) -> tuple:
    """The ``kernel`` launch's TMA descriptors of the ``(B, H, L, D)`` tensors ``xs``, one block ``[1, 1, rows, D]``
    each (the tiles its sparse loop gathers), and whether to use them (:func:`launch_config.tma_loads`); without
    TMA the tensors themselves stand in (the kernel never reads them through that argument)."""
    if not tma_loads(kernel, *xs):
        return False, xs
    from triton.tools.tensor_descriptor import TensorDescriptor

    return True, tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]]) for x in xs)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels address (batch, head, token) through strides; only the head dim must be contiguous.
    # A (B, L, H, D) tensor viewed as (B, H, L, D) already is, so it passes through untouched.
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_states(k: torch.Tensor, v: torch.Tensor, block_k: int, feature_map: str):
    """Per key block ``h_j = phi(K_j)^T V_j`` ``(B, H, T_n, D, D)`` and ``z_j`` ``(B, H, T_n, D)`` fp32."""
    B, H, Lk, D = k.shape
    Tn = triton.cdiv(Lk, block_k)
    hs = torch.empty(B, H, Tn, D, D, dtype=state_dtype(v.dtype), device=v.device)
    zs = torch.empty(B, H, Tn, D, dtype=torch.float32, device=v.device)
    sla_linear_state_kernel[(Tn, B * H)](
        k, v, hs, zs, *_strides(k), *_strides(v), Lk, Tn,
        H=H, D=D, BN=block_k, FEATURE=feature_map, PREC=_dot_precision(v.dtype),
        **launch_config("state", None, block_k, D, k.dtype, k.device))
    return hs, zs


def aggregate_states(hs: torch.Tensor, zs: torch.Tensor, scope_mask: Optional[torch.Tensor]):
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


def aux_outputs(q: torch.Tensor, store_aux: bool, mass: bool):
    """``o_s``, ``o_l`` (q's shape, dtype and memory layout), the LSE and (``combine="mass"``) the mixing weight
    ``a``, both ``(B, H, Lq)`` fp32, kept for backward; size-0 placeholders for what will not be kept."""
    def none(*shape_tail, dtype=None):
        return q.new_empty(0, 0, 0, *shape_tail, dtype=dtype)

    if not store_aux:
        return none(q.shape[-1]), none(q.shape[-1]), none(dtype=torch.float32), none(dtype=torch.float32)
    a = q.new_empty(q.shape[:3], dtype=torch.float32) if mass else none(dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32), a


def pooled_outputs(q: torch.Tensor, Tn: int, store_aux: bool, cov: bool = False):
    """``combine="pooled"``'s tensors kept for backward (their shapes, for the fake implementation), or size-0
    placeholders for every other rule and for inference: ``o_c`` (like q), ``rows`` ``(2, B, H, Lq)`` fp32 (the
    base-2 LSE of o_c's softmax, then log_rest) and ``means`` ``(2, B, H, T_n, D)`` in q's dtype (the key blocks'
    mean keys, then mean values). For ``combine="pooled_cov"`` (``cov``) ``o_c`` is ``(2, B, H, Lq, D)``
    contiguous: the coarse attention, then the same with the covariance correction (what the output mixed in)."""
    B, H, Lq, D = q.shape
    if not store_aux:  # flat: a placeholder of many size-0 dims trips torch.library.opcheck's storage arithmetic
        return q.new_empty(0), q.new_empty(0, dtype=torch.float32), q.new_empty(0)
    o_c = q.new_empty(2, B, H, Lq, D) if cov else torch.empty_like(q)
    return o_c, q.new_empty(2, B, H, Lq, dtype=torch.float32), q.new_empty(2, B, H, Tn, D)


def _token_rows(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``(tokens, D)`` views of same-shape ``(B, H, L, D)`` tensors, rows in the same token order for all, without
    a copy when they are all contiguous or all ``(B, L, H, D)`` tensors viewed as ``(B, H, L, D)``."""
    D = xs[0].shape[-1]
    if not all(x.is_contiguous() for x in xs) and all(x.transpose(1, 2).is_contiguous() for x in xs):
        return [x.transpose(1, 2).reshape(-1, D) for x in xs]
    return [x.reshape(-1, D) for x in xs]


def forward(q, k, v, critical_lut, scope_mask, proj_weight, proj_bias, mass_offset, codes, scale, block_q, block_k,
            feature_map, combine, store_aux):
    """The forward launches: for ``combine="pooled"`` the key blocks' means and the coarse kernel first (for
    ``"pooled_cov"`` also the covariance state's correction of o_c, :func:`covariance_correction`), then the
    linear states, their aggregation per query block, the fused forward kernel. Arguments and returns as
    :func:`sla.ops.sla.triton.custom_ops.sla_triton_fwd` (which runs this with autocast off) without the
    transposed LUT, which only backward reads."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Tm = triton.cdiv(Lq, block_q)
    # combine="pooled" mixes as the mass rule does (a stored, the same backward kernels), with a from log_rest;
    # "pooled_cov" is "pooled" with o_c corrected by the covariance state (o_mix below: what the output mixes in).
    mass = combine in MIXING_RULES
    pooled = combine in POOLED_RULES
    cov = combine == "pooled_cov"
    if pooled:
        lengths = block_lengths(Lk, block_k, q.device).to(torch.float32)
        means = torch.stack((block_means(k, block_k, lengths), block_means(v, block_k, lengths)))  # (2, B, H, T_n, D)
        o_c, rows, _ = pooled_outputs(q, 0, True, cov and store_aux)
        o_coarse = o_c[0] if cov and store_aux else o_c
        pbar = q.new_empty(B, H, Tm, means.shape[3], dtype=torch.float32) if cov else None
        coarse_forward(q, means[0], means[1], torch.log2(lengths), codes, scale, block_q, o_coarse, rows, store_aux,
                       pbar)
        o_mix = o_coarse
        if cov:
            corr = covariance_correction(q, k, v, means[0], pbar, scale, block_q, block_k, lengths)
            o_mix = torch.add(o_coarse, corr, out=o_c[1]) if store_aux else o_coarse.add_(corr)
    hs, zs = linear_states(k, v, block_k, feature_map)
    big_h, big_z = aggregate_states(hs, zs, scope_mask)
    o = torch.empty_like(q)
    o_s, o_l, lse, a = aux_outputs(q, store_aux, mass)
    n_crit = critical_lut.shape[-1]
    w = proj_weight if proj_weight is not None else big_z  # placeholder pointer, never read
    bias = proj_bias if proj_bias is not None else big_z
    offsets = mass_offset if mass else big_z
    tma, (kd, vd) = _row_descriptors("fwd", block_k, k, v)
    split = fwd_split()
    # Split: the loop's launch writes o_s and the LSE where backward keeps them, or (inference) o_s into o itself and
    # the LSE into a scratch row, which the second launch reads back.
    os_buf = o_s if store_aux or not split else o
    lse_buf = lse if store_aux or not split else q.new_empty(B, H, Lq, dtype=torch.float32)
    args = (q, k, v, critical_lut, big_h, big_z, w, bias, offsets, o_mix if pooled else big_z,
            rows[1] if pooled else big_z, o, os_buf, o_l, lse_buf, a, kd, vd,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(os_buf),
            *(_strides(o_mix) if pooled else (0, 0, 0)), *_state_strides(big_h, big_z),
            scale * LOG2E.value, math.log(D), Lq, Lk, Tm, n_crit)  # the forward takes qk_scale (kernels.LOG2E)
    consts = dict(H=H, D=D, BM=block_q, BN=block_k, FEATURE=feature_map, HAS_PROJ=proj_weight is not None,
                  HAS_BIAS=proj_bias is not None, STORE_AUX=store_aux, MASS=mass, POOLED=pooled,
                  PREC=_dot_precision(q.dtype), TMA=tma, DC=epilogue_chunk(D, q.dtype))
    for part in (1, 2) if split else (0,):
        name = "fwd_mix" if part == 2 else "fwd"
        sla_fwd_kernel[(Tm, B * H)](*args, **consts, PART=part,
                                    **launch_config(name, block_q, block_k, D, q.dtype, q.device))
    if not pooled or not store_aux:
        o_c, rows, means = pooled_outputs(q, 0, False)
    return o, o_s, o_l, lse, a, o_c, rows, means


def backward(do, q, k, v, o_s, o_l, lse, a, critical_lut, lut_t_offsets, lut_t, scope_mask, proj_weight, proj_bias,
             mass_offset, codes, o_c, rows, means, scale, block_q, block_k, feature_map, combine):
    """The backward launches of one SLA call. Arguments as :func:`sla.ops.sla.triton.custom_ops.sla_triton_bwd`
    (which runs this with autocast off): ``do`` ``(B, H, Lq, D)`` in q's dtype, what the forward kept (``o_s``,
    ``o_l``, ``lse``, ``a``; for ``combine="pooled"`` also ``o_c``, ``rows``, ``means``), the block map's critical
    LUT and its CSR transpose, and the forward's arguments.

    Returns ``(dq, dk, dv, d_proj_weight, d_proj_bias, d_mass_offset)``: the first three in the inputs' dtype and
    layout, through every branch and the feature map; the others in their parameter's dtype, or size-0 tensors
    where the parameter is absent.
    """
    do = last_dim_contiguous(do)
    mass = combine in MIXING_RULES
    pooled = combine in POOLED_RULES
    cov = combine == "pooled_cov"
    # pooled_cov keeps the coarse attention (its softmax's backward) and what the output mixed in (g's).
    o_coarse, o_mix = (o_c[0], o_c[1]) if cov else (o_c, o_c)
    B, H, Lq, _ = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    g = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if mass else None
    do_s = do_l = do
    if mass:
        # 1-2. The mass rule's g needs dO . Proj(o_l) = (dO W) . o_l + dO . b: the linear kernel forms dO W anyway,
        # so it runs first, writes g, delta and the branches' shares of dO (a dO, (1 - a) dO) and stores its dq;
        # the dQ kernel then reads a dO and delta per row and adds its dq (no o_l tile, no projection beside its
        # loop).
        do_s = torch.empty_like(do)
        do_l = torch.empty_like(do) if proj_weight is not None or pooled else None
        d_big_h, d_big_z, db_part = _linear_dq(do, q, k, v, o_s, o_l, o_mix, a, dq, delta, g, do_s, do_l,
                                               scope_mask, proj_weight, proj_bias, block_q, block_k, feature_map,
                                               mass, pooled)
        if pooled:
            # The coarse branch's gradients: o_c gets (1 - a) dO (do_l) and log_rest -g. Its dq is added to the
            # linear kernel's in dq; the means' gradients go to dK/dV's epilogue, spread over each block's tokens.
            lengths = block_lengths(k.shape[2], block_k, q.device).to(torch.float32)
            cov_grads = covariance_backward(do_l, q, k, v, means[0], scale, block_q, block_k, lengths) if cov else None
            d_means = coarse_backward(do_l, g, q, means[0], means[1], codes, o_coarse, rows, dq, scale, block_q,
                                      lengths, cov_grads=cov_grads)
        _sparse_dq(do_s, q, k, v, o_s, lse, dq, delta, critical_lut, scale, block_q, block_k, mass)
    else:
        # 1. sparse branch, per query block: delta = rowsum(dO * O_s) and its dq
        _sparse_dq(do, q, k, v, o_s, lse, dq, delta, critical_lut, scale, block_q, block_k, mass)
        # 2. linear branch, per query block: adds its dq; dH_i, dZ_i; per-block sums of dO for the bias gradient
        d_big_h, d_big_z, db_part = _linear_dq(do, q, k, v, o_s, o_l, None, a, dq, delta, g, None, None, scope_mask,
                                               proj_weight, proj_bias, block_q, block_k, feature_map, mass, False)
    # 3. each key block's dh_j, dz_j: the sum of dH_i over the query blocks that have it in scope
    d_hs, d_zs = _to_key_blocks(d_big_h, d_big_z, scope_mask)
    # 4. per key block: the sparse dK, dV over the query blocks that chose it, plus the linear branch's share
    dk, dv = _dkdv(do_s, q, k, v, lse, delta, lut_t_offsets, lut_t, d_hs, d_zs, d_means if pooled else None, scale,
                   block_q, block_k, critical_lut.shape[-1], feature_map)
    if cov:
        covariance_token_grads(q, k, v, means, cov_grads, dq, dk, dv, scale, block_q, block_k)
    # 5. the parameters: Proj's weight and bias, the mass offsets
    d_w, d_b, d_off = _parameter_grads(do_l, o_l, g, db_part, proj_weight, proj_bias, mass_offset)
    return dq, dk, dv, d_w, d_b, d_off


def _sparse_dq(do, q, k, v, o_s, lse, dq, delta, critical_lut, scale, block_q, block_k, mass):
    """The sparse branch's dq (q's dtype and layout) into ``dq``. ``combine="paper"``: stores it, and writes
    ``delta = rowsum(dO * o_s)`` ``(B, H, Lq)`` fp32 into ``delta``. Mass rule: ``do`` is the sparse branch's share
    ``a dO`` and ``delta`` is read, both written by :func:`_linear_dq`, which ran first; adds to the linear branch's
    dq already in ``dq``."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Tm = triton.cdiv(Lq, block_q)
    tma, (kd, vd) = _row_descriptors("dq", block_k, k, v)
    sla_bwd_dq_kernel[(Tm, B * H)](
        q, k, v, do, o_s, lse, critical_lut, delta, dq, kd, vd,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(o_s), *_strides(dq),
        scale, Lq, Lk, Tm, critical_lut.shape[-1],
        H=H, D=D, BM=block_q, BN=block_k, MASS=mass, PREC=_dot_precision(q.dtype), TMA=tma,
        **launch_config("dq", block_q, block_k, D, q.dtype, q.device))


def _linear_dq(do, q, k, v, o_s, o_l, o_c, a, dq, delta, g, do_s, do_l, scope_mask, proj_weight, proj_bias, block_q,
               block_k, feature_map, mass, pooled):
    """The linear branch's dq into ``dq``: added to the sparse branch's (``combine="paper"``) or stored (mass rule,
    where this runs first). Mass rule only: writes ``g`` ``(B, H, Lq)`` fp32, the gradient of ``a``'s logit,
    ``delta`` ``(B, H, Lq)`` fp32 (``rowsum(dO_s * o_s) - g``, for the sparse kernels), ``do_s = a dO`` and, with a
    projection, ``do_l = (1 - a) dO`` (both like ``do``, in its dtype); ``o_s``, ``a``, ``g``, ``do_s`` and ``do_l``
    are not read or written otherwise. ``o_s`` and ``o_l`` must have the same strides (the forward allocates both like
    q).
    ``pooled`` (with ``mass``): ``o_c`` joins ``g``, ``do_l`` is always written (o_c's gradient) and log(den) gets no
    share of ``g``.
    Returns ``dH_i`` ``(B, H, T_m, D, D)`` (state dtype), ``dZ_i`` ``(B, H, T_m, D)`` fp32 and the per-query-block
    sums of dO ``(B*H*T_m, D)`` fp32 for the bias gradient (a placeholder without a bias). ``H_i`` and ``Z_i`` are
    recomputed, not saved by the forward."""
    B, H, Lq, D = q.shape
    Tm = triton.cdiv(Lq, block_q)
    big_h, big_z = aggregate_states(*linear_states(k, v, block_k, feature_map), scope_mask)
    d_big_h = torch.empty(B, H, Tm, D, D, dtype=state_dtype(v.dtype), device=q.device)
    d_big_z = torch.empty(B, H, Tm, D, dtype=torch.float32, device=q.device)
    # Per query block partial sums of dO: the bias gradient without a slow column reduction over every token.
    db_part = torch.empty(B * H * Tm, D, dtype=torch.float32, device=q.device) if proj_bias is not None else big_z
    unused = big_z  # placeholder pointer for what this call's constexprs never read or write
    sla_bwd_linear_q_kernel[(Tm, B * H)](
        q, do, proj_weight if proj_weight is not None else unused, proj_bias if proj_bias is not None else unused,
        o_s, o_l, o_c if pooled else unused, a if mass else unused, delta, g if mass else unused, big_h, big_z, dq,
        d_big_h, d_big_z, db_part, do_s if mass else unused, do_l if do_l is not None else unused,
        *_strides(q), *_strides(do), *_strides(o_l), *(_strides(o_c) if pooled else (0, 0, 0)), *_strides(dq),
        *_state_strides(big_h, big_z), Lq, Tm,
        H=H, D=D, BM=block_q, FEATURE=feature_map, HAS_PROJ=proj_weight is not None,
        HAS_BIAS=proj_bias is not None, MASS=mass, POOLED=pooled, PREC=_dot_precision(q.dtype),
        **launch_config("linear_q", block_q, None, D, q.dtype, q.device))
    return d_big_h, d_big_z, db_part


def _to_key_blocks(d_big_h, d_big_z, scope_mask):
    """``dh_j = sum_i M_ij dH_i`` ``(B, H, T_n, D, D)`` and ``dz_j`` ``(B, H, T_n, D)`` (fp32 accumulation), or
    ``(B, H, 1, ...)`` totals when every key is in scope (``scope_mask is None``)."""
    B, H, Tm, D, _ = d_big_h.shape
    sdt = d_big_h.dtype
    if scope_mask is None:
        return d_big_h.sum(dim=2, keepdim=True, dtype=torch.float32).to(sdt), d_big_z.sum(dim=2, keepdim=True)
    m_t = scope_mask.transpose(-1, -2)
    Tn = m_t.shape[2]
    d_hs = torch.matmul(m_t.to(sdt), d_big_h.reshape(B, H, Tm, D * D)).reshape(B, H, Tn, D, D)
    return d_hs, torch.matmul(m_t.to(torch.float32), d_big_z)


def _dkdv(do, q, k, v, lse, delta, lut_t_offsets, lut_t, d_hs, d_zs, d_means, scale, block_q, block_k, n_crit,
          feature_map):
    """dk and dv (k's dtype; written with the same strides): the sparse branch's over the CSR transpose of the
    critical LUT, plus the linear branch's through ``dh_j``, ``dz_j`` and phi's backward, plus (``d_means``, for
    ``combine="pooled"``: ``(2, B*H, T_n, D)`` fp32) what each token gets through its block's mean key and value.
    ``do`` is the sparse branch's share of dO (``a dO`` under the mass rule) and ``delta`` what the dQ or linear-q
    kernel wrote."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Tm, Tn = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    dk = torch.empty_like(k)
    dv = torch.empty_like(k)  # the kernel writes dk and dv with the same strides
    d_km, d_vm = (d_zs, d_zs) if d_means is None else d_means  # placeholders the kernel never reads without POOLED
    tma, (qd, dod) = _row_descriptors("dkdv", block_q, q, do)
    sla_bwd_dkdv_kernel[(Tn, B * H)](
        q, k, v, do, lse, delta, lut_t_offsets, lut_t, d_hs, d_zs, d_km, d_vm, dk, dv, qd, dod,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_state_strides(d_hs, d_zs),
        scale, Lq, Lk, Tm, Tn, n_crit,
        H=H, D=D, BM=block_q, BN=block_k, FEATURE=feature_map, POOLED=d_means is not None,
        PREC=_dot_precision(q.dtype), TMA=tma,
        **launch_config("dkdv", block_q, block_k, D, q.dtype, q.device))
    return dk, dv


def _parameter_grads(do_l, o_l, g, db_part, proj_weight, proj_bias, mass_offset):
    """Gradients of ``proj_weight`` ``(D, D)``, ``proj_bias`` ``(D,)`` and ``mass_offset`` ``(H,)`` in their dtypes;
    size-0 tensors for the absent ones. ``do_l`` is the projection's share of dO (dO itself for
    ``combine="paper"``, ``(1 - a) dO`` from the linear-q kernel for the mass rule); ``g`` is None for "paper"."""
    if proj_weight is not None:
        # One GEMM over all tokens in the input dtype (fp32 accumulation inside cuBLAS, one rounding of the
        # D x D result), as autocast's Linear backward does; no fp32 copies of dO and o_l, whose cost showed in
        # the backward's time (bench/RESULTS.md, "Measurements behind code choices").
        do2, ol2 = _token_rows(do_l, o_l)
        d_w = (do2.transpose(0, 1) @ ol2).to(proj_weight.dtype)
    else:
        d_w = o_l.new_empty(0)
    d_b = db_part.sum(0).to(proj_bias.dtype) if proj_bias is not None else o_l.new_empty(0)
    # a = sigmoid(... - mass_offset[h]): its gradient is minus the sum of g over the head's rows.
    d_off = -g.sum(dim=(0, 2)).to(mass_offset.dtype) if g is not None else o_l.new_empty(0)
    return d_w, d_b, d_off


# ------------------------------------------------------------------------------------------------------------------
# combine="pooled": the coarse branch
# ------------------------------------------------------------------------------------------------------------------

# Key-block means one step of the coarse kernels' loops reads (their "block_k" in launch_config): 64, except in the
# two backward kernels with 128-row query tiles, where 32 measured twice as fast (bench/RESULTS.md, session 12).
COARSE_CHUNK = 64
COARSE_CHUNK_BWD_WIDE = 32


def coarse_chunk(block_q: int, backward: bool) -> int:
    """The chunk of key-block means the coarse kernels read per step, for ``block_q`` and forward or backward."""
    return COARSE_CHUNK_BWD_WIDE if backward and block_q >= 128 else COARSE_CHUNK


# The coarse dK/dV kernel splits the query blocks into partial sums until about this many programs run: T_n / 64
# chunks times B * H alone leaves most of a GPU idle (12 heads of 32k tokens in 64-key blocks: 96 programs).
COARSE_DKDV_PROGRAMS = 1024


def block_means(x: torch.Tensor, block_k: int, lengths: torch.Tensor) -> torch.Tensor:
    """The mean of each key block of ``x`` ``(B, H, Lk, D)`` (any strides), ``(B, H, T_n, D)`` in x's dtype, summed in
    fp32; the last block, if short, over its real tokens (``lengths``, fp32 ``(T_n,)``). Read without a padded copy
    of ``x``; no autograd (the backward spreads the means' gradients itself, :func:`coarse_backward`). Unlike
    ``blockmap.mean_pool_blocks`` (the reference's means) it sums half inputs in fp32 and pads nothing."""
    Lk = x.shape[2]
    full = Lk // block_k
    sums = x[:, :, :full * block_k].unflatten(2, (full, block_k)).sum(3, dtype=torch.float32)
    if Lk % block_k:
        sums = torch.cat([sums, x[:, :, full * block_k:].sum(2, keepdim=True, dtype=torch.float32)], dim=2)
    return (sums / lengths[:, None]).to(x.dtype)


def coarse_forward(q, k_means, v_means, log2_lengths, codes, scale, block_q, o_c, rows, store_aux, pbar=None):
    """``combine="pooled"``'s coarse branch into ``o_c`` (like q) and ``rows`` ``(2, B, H, Lq)`` fp32: ``rows[1]`` is
    log_rest (natural log, -inf with every block critical) and, when ``store_aux``, ``rows[0]`` the base-2 LSE of
    o_c's softmax (what backward needs; not written otherwise). Inputs: q ``(B, H, Lq, D)``; the key blocks' mean
    keys and values ``(B, H, T_n, D)`` contiguous in q's dtype; ``log2_lengths`` ``(T_n,)`` fp32; ``codes``
    ``(B, H, T_m, T_n)`` uint8 contiguous (bit 0: outside the critical blocks, bit 1: in the linear scope). With
    ``pbar`` (``combine="pooled_cov"``, ``(B, H, T_m, T_n)`` fp32) also the coarse weights' mean over each query
    block's real rows."""
    B, H, Lq, D = q.shape
    Tn = k_means.shape[2]
    Tm = triton.cdiv(Lq, block_q)
    sla_coarse_fwd_kernel[(Tm, B * H)](
        q, k_means, v_means, log2_lengths, codes, o_c, rows[0], rows[1], pbar if pbar is not None else rows,
        *_strides(q), *_strides(o_c), scale * LOG2E.value, Lq, Tm, Tn,
        H=H, D=D, BM=block_q, BT=coarse_chunk(block_q, False), STORE_AUX=store_aux, COV=pbar is not None,
        PREC=_dot_precision(q.dtype),
        **launch_config("coarse_fwd", block_q, coarse_chunk(block_q, False), D, q.dtype, q.device))


def coarse_backward(d_o_c, g, q, k_means, v_means, codes, o_c, rows, dq, scale, block_q, lengths, cov_grads=None):
    """The coarse branch's backward: its dq is added into ``dq`` (q's dtype and layout, the main kernels' share
    already there); returns ``(2, B*H, T_n, D)`` fp32, what each token of a key block gets through the block's mean
    key (``[0]``) and mean value (``[1]``), for the dK/dV kernel's epilogue. ``d_o_c`` is o_c's gradient (like q,
    any strides with a contiguous last dim), ``g`` ``(B, H, Lq)`` fp32 the gradient of ``a``'s logit (log_rest's
    gradient is ``-g``), ``lengths`` ``(T_n,)`` fp32 the key blocks' lengths; the rest as :func:`coarse_forward`
    kept them. Two kernels: dq per query block, then the
    means' gradients in partial sums over groups of query blocks, summed here. ``cov_grads`` (``combine="pooled_cov"``,
    from :func:`covariance_backward`): the coarse weights' gradient through the covariance state joins both
    kernels, and the dq kernel writes each query block's ``pbar`` into it."""
    d_o_c = last_dim_contiguous(d_o_c)
    B, H, Lq, D = q.shape
    Tn = k_means.shape[2]
    Tm = triton.cdiv(Lq, block_q)
    lse_c, log_rest = rows[0], rows[1]
    chunk = coarse_chunk(block_q, True)
    delta_c = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    log2_lengths = torch.log2(lengths)
    cov = cov_grads is not None
    u, pbar = (cov_grads["u"], cov_grads["pbar"]) if cov else (g, g)  # placeholders, never read without COV
    sla_coarse_bwd_dq_kernel[(Tm, B * H)](
        q, k_means, v_means, log2_lengths, codes, o_c, lse_c, log_rest, d_o_c, g, u, pbar, delta_c, dq,
        *_strides(q), *_strides(o_c), *_strides(d_o_c), *_strides(dq), scale * LOG2E.value, scale, Lq, Tm, Tn,
        H=H, D=D, BM=block_q, BT=chunk, COV=cov, PREC=_dot_precision(q.dtype),
        **launch_config("coarse_dq", block_q, chunk, D, q.dtype, q.device))
    chunks = triton.cdiv(Tn, chunk)
    split = max(1, min(Tm, COARSE_DKDV_PROGRAMS // (chunks * B * H)))
    d_means = torch.empty(2, split, B * H, Tn, D, dtype=torch.float32, device=q.device)
    sla_coarse_bwd_dkdv_kernel[(chunks, B * H, split)](
        q, k_means, v_means, log2_lengths, codes, lse_c, log_rest, d_o_c, g, u, delta_c, d_means[0], d_means[1],
        *_strides(q), *_strides(d_o_c), scale * LOG2E.value, scale, Lq, Tm, Tn, split,
        H=H, D=D, BM=block_q, BT=chunk, COV=cov, PREC=_dot_precision(q.dtype),
        **launch_config("coarse_dkdv", block_q, chunk, D, q.dtype, q.device))
    # A mean over n_j tokens passes 1 / n_j of its gradient to each of them.
    return d_means.sum(1) / lengths[:, None]


# ------------------------------------------------------------------------------------------------------------------
# combine="pooled_cov": the covariance state (sla/ops/sla/naive.py, covariance_correction, is the spec)
# ------------------------------------------------------------------------------------------------------------------
# Per key block C_j = (K_j - mean(K_j))^T V_j / n_j, per query block G_i = scale * sum_j pbar_ij C_j, per row
# corr = q G_i: the work of the linear branch's states, done the same way, as tensor-core matmuls (cuBLAS) over
# D x D states. Only the coarse weights' block means pbar come from the kernels (the coarse forward writes them; in
# backward the coarse dq kernel recomputes them). Nothing of size T_m x D x D is kept between forward and backward:
# the forward keeps o_c with and without the correction, the backward recomputes the states.


def _blocked(x: torch.Tensor, block: int, dtype: torch.dtype, means: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` ``(B, H, L, D)`` (any strides) as ``(B, H, T, block, D)`` in ``dtype``, minus each block's mean when
    ``means`` ``(B, H, T, D)`` is given, zero past ``L``. A view when nothing changes (``L`` a multiple of ``block``,
    ``x`` already in ``dtype``, no means); otherwise one pass into a new tensor (a zero-padded copy, then the
    subtraction and the cast, would be three)."""
    B, H, L, D = x.shape
    T, full = triton.cdiv(L, block), L // block
    if means is None and full == T and x.dtype == dtype:
        return x.unflatten(2, (T, block))
    out = torch.empty(B, H, T, block, D, dtype=dtype, device=x.device)
    # The means in the output's dtype: the subtraction runs in it (fp32 for half inputs with fp32 states).
    means = None if means is None else means.to(dtype)
    if full:
        head = x[:, :, :full * block].unflatten(2, (full, block))
        if means is None:
            out[:, :, :full].copy_(head)
        else:
            torch.sub(head, means[:, :, :full, None, :], out=out[:, :, :full])
    if full < T:
        rest = L - full * block
        tail = x[:, :, full * block:]
        if means is None:
            out[:, :, full, :rest].copy_(tail)
        else:
            torch.sub(tail, means[:, :, full, None, :], out=out[:, :, full, :rest])
        out[:, :, full, rest:] = 0
    return out


def covariance_states(k: torch.Tensor, v: torch.Tensor, k_means: torch.Tensor, block_k: int) -> tuple:
    """Per key block the unnormalised covariance ``(K_j - mean(K_j))^T V_j`` (``C_j`` times the block's length
    ``n_j``; the callers fold ``1 / n_j`` into the ``(T_m, T_n)`` weights instead of passing over the states or the
    tokens once more): ``(B, H, T_n, D, D)`` in the state dtype, from k and v ``(B, H, Lk, D)`` and the forward's
    mean keys ``(B, H, T_n, D)``. Also returns the centred key blocks ``(B, H, T_n, block_k, D)``, which the
    backward reads again."""
    sdt = state_dtype(v.dtype)
    kc = _blocked(k, block_k, sdt, k_means)
    return torch.matmul(kc.transpose(-1, -2), _blocked(v, block_k, sdt)), kc


def _query_block_states(weights: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``G_i = sum_j weights_ij states_j``: ``(B, H, T_m, D, D)`` from the weights ``(B, H, T_m, T_n)`` fp32 and
    the ``(B, H, T_n, D, D)`` states, in their dtype."""
    B, H, Tn, D, _ = states.shape
    big = torch.matmul(weights.to(states.dtype), states.reshape(B, H, Tn, D * D))
    return big.reshape(B, H, -1, D, D)


def covariance_correction(q, k, v, k_means, pbar, scale, block_q, block_k, lengths) -> torch.Tensor:
    """``combine="pooled_cov"``'s correction of o_c, ``q G_i`` per row with ``G_i = scale sum_j pbar_ij C_j``:
    ``(B, H, Lq, D)`` in q's dtype, from the coarse forward's ``pbar`` ``(B, H, T_m, T_n)`` fp32, the mean keys it
    used and the key blocks' lengths ``(T_n,)`` fp32."""
    states, _ = covariance_states(k, v, k_means, block_k)
    g = _query_block_states(pbar * (scale / lengths), states)
    corr = torch.matmul(_blocked(q, block_q, states.dtype), g)
    return corr.flatten(2, 3)[:, :, :q.shape[2]].to(q.dtype)


def covariance_backward(d_o_c, q, k, v, k_means, scale, block_q, block_k, lengths) -> dict:
    """The first half of ``combine="pooled_cov"``'s state backward, before the coarse kernels: with ``d_o_c`` the
    gradient of what the output mixed in (``(1 - a) dO``), ``dG_i = scale * Q_i^T dO_c,i`` per query block and the
    gradient of the coarse weights' block means ``<dG_i, C_j>``, divided by the block's real rows (``u``
    ``(B, H, T_m, T_n)`` fp32, read by both coarse kernels). Returns those, the recomputed states, the centred key
    blocks and an empty ``pbar`` that the coarse dq kernel fills, for :func:`covariance_token_grads`."""
    B, H, Lq, D = q.shape
    states, kc = covariance_states(k, v, k_means, block_k)
    sdt = states.dtype
    do_blocks = _blocked(d_o_c, block_q, sdt)  # kept for covariance_token_grads
    d_g = torch.matmul(_blocked(q, block_q, sdt).transpose(-1, -2), do_blocks)  # dG / scale
    Tm, Tn = d_g.shape[2], states.shape[2]
    rows_per_block = block_lengths(Lq, block_q, q.device).to(torch.float32)
    u = torch.matmul(d_g.reshape(B, H, Tm, D * D), states.reshape(B, H, Tn, D * D).transpose(-1, -2))
    u = (u.to(torch.float32) * (scale / rows_per_block[:, None] / lengths)).contiguous()
    pbar = torch.empty(B, H, Tm, Tn, dtype=torch.float32, device=q.device)
    return dict(u=u, pbar=pbar, d_g=d_g, states=states, kc=kc, lengths=lengths, do_blocks=do_blocks)


def covariance_token_grads(q, k, v, means, cov_grads, dq, dk, dv, scale, block_q, block_k) -> None:
    """The second half, after the coarse kernels wrote ``pbar``: adds into ``dq`` what flows through ``q G_i``
    (``dO_c G_i^T``), and into ``dk``, ``dv`` what flows through each ``C_j``: with ``dC_j = scale * sum_i pbar_ij
    Q_i^T dO_c,i``, ``dk_t += (v_t - mean(V_j)) dC_j^T / n_j`` and ``dv_t += (k_t - mean(K_j)) dC_j / n_j`` (the
    block mean's own share included: the centred tokens sum to zero)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    states, d_g, pbar, lengths = cov_grads["states"], cov_grads["d_g"], cov_grads["pbar"], cov_grads["lengths"]
    sdt = states.dtype
    weights = pbar * (scale / lengths)  # scale pbar_ij / n_j, the states' weights in G_i
    dq_c = torch.matmul(cov_grads["do_blocks"], _query_block_states(weights, states).transpose(-1, -2))
    dq.add_(dq_c.flatten(2, 3)[:, :, :Lq].to(dq.dtype))
    Tm, Tn = pbar.shape[2], pbar.shape[3]
    d_c = torch.matmul(weights.transpose(-1, -2).to(sdt), d_g.reshape(B, H, Tm, D * D)).reshape(B, H, Tn, D, D)
    dk_c = torch.matmul(_blocked(v, block_k, sdt, means[1]), d_c.transpose(-1, -2))
    dv_c = torch.matmul(cov_grads["kc"], d_c)
    dk.add_(dk_c.flatten(2, 3)[:, :, :Lk].to(dk.dtype))
    dv.add_(dv_c.flatten(2, 3)[:, :, :Lk].to(dv.dtype))
