"""Triton kernels of SLA (only ``@triton.jit`` code; launchers live in ``ops.py``).

Layout: q, k, v, phi(q), phi(k) are ``(B, H, L, D)`` addressed through explicit (batch, head, token)
strides, the last dimension contiguous, so a ``(B, L, H, D)`` tensor viewed as ``(B, H, L, D)`` is read
without a copy. One program handles one (batch*head, query block) or (batch*head, key block).

Kernels:

* ``sla_linear_state_kernel``: per key block ``h_j = phi(K_j)^T V_j`` (``D x D``) and ``z_j = sum phi(K_j)``.
* ``sla_fwd_kernel``: per query block, online-softmax attention over its critical key blocks (exp2 with
  ``log2(e)`` folded into the scale, fp32 accumulators, base-2 log-sum-exp saved), then the linear branch
  ``phi(Q_i) H_i / (phi(Q_i) . Z_i)`` from the block's aggregated state, then ``Proj`` and the sum.
* ``sla_bwd_dq_kernel``: ``delta = rowsum(dO * O_s)`` and dQ of the sparse branch over the critical LUT.
* ``sla_bwd_linear_q_kernel``: the linear branch's dphi(Q_i), dH_i, dZ_i per query block.
* ``sla_bwd_dkdv_kernel``: dK and dV of the sparse branch per key block over the transposed (CSR) LUT, plus
  the linear branch's dphi(K_j) and its share of dV_j.

Sequence lengths and the critical count are runtime integers (``do_not_specialize``): a new length or
top-k count does not compile a new kernel.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["Lk", "Tn"])
def sla_linear_state_kernel(
    PHIK, V, HS, ZS,
    s_pk_b, s_pk_h, s_pk_l,
    s_v_b, s_v_h, s_v_l,
    Lk, Tn,
    H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_k = o_k < Lk
    # Padded key rows load as zero, so they add nothing to h_j or z_j.
    b_pk = tl.load(PHIK + i_b * s_pk_b + i_h * s_pk_h + o_k[:, None] * s_pk_l + o_d[None, :], mask=m_k[:, None],
                   other=0.)
    b_v = tl.load(V + i_b * s_v_b + i_h * s_v_h + o_k[:, None] * s_v_l + o_d[None, :], mask=m_k[:, None], other=0.)
    b_h = tl.dot(tl.trans(b_pk), b_v, input_precision=PREC)  # [D, D]
    b_z = tl.sum(b_pk.to(tl.float32), axis=0)  # [D]
    i_state = i_bh * Tn + i_n
    tl.store(HS + i_state * D * D + o_d[:, None] * D + o_d[None, :], b_h.to(HS.dtype.element_ty))
    tl.store(ZS + i_state * D + o_d, b_z)


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "N_CRIT", "s_hs_m", "s_zs_m"])
def sla_fwd_kernel(
    Q, K, V, PHIQ, LUT, HS, ZS, W, BIAS,
    O, OS, OL, LSE,
    s_q_b, s_q_h, s_q_l,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    s_pq_b, s_pq_h, s_pq_l,
    s_o_b, s_o_h, s_o_l,
    s_hs_bh, s_hs_m, s_zs_bh, s_zs_m,
    scale, Lq, Lk, Tm, N_CRIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_q = o_m < Lq

    b_q = tl.load(Q + i_b * s_q_b + i_h * s_q_h + o_m[:, None] * s_q_l + o_d[None, :], mask=m_q[:, None], other=0.)
    p_k0 = K + i_b * s_k_b + i_h * s_k_h
    p_v0 = V + i_b * s_v_b + i_h * s_v_h
    p_lut = LUT + (i_bh * Tm + i_m) * N_CRIT
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e)): fold log2(e) into the scale once

    b_mx = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for i_c in range(N_CRIT):
        i_n = tl.load(p_lut + i_c)
        o_k = i_n * BN + o_n
        m_k = o_k < Lk
        b_kt = tl.load(p_k0 + o_k[None, :] * s_k_l + o_d[:, None], mask=m_k[None, :], other=0.)  # [D, BN]
        b_v = tl.load(p_v0 + o_k[:, None] * s_v_l + o_d[None, :], mask=m_k[:, None], other=0.)  # [BN, D]
        b_s = tl.dot(b_q, b_kt, input_precision=PREC) * qk_scale
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1))
        b_p = tl.math.exp2(b_s - b_mx_new[:, None])
        b_alpha = tl.math.exp2(b_mx - b_mx_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_mx = b_mx_new
    b_os = b_acc / b_l[:, None]
    b_lse = b_mx + tl.math.log2(b_l)

    # Linear branch: H_i and Z_i are this query block's aggregated states over the key blocks in scope.
    b_pq = tl.load(PHIQ + i_b * s_pq_b + i_h * s_pq_h + o_m[:, None] * s_pq_l + o_d[None, :], mask=m_q[:, None],
                   other=0.)
    b_hs = tl.load(HS + i_bh * s_hs_bh + i_m * s_hs_m + o_d[:, None] * D + o_d[None, :])  # [D, D]
    b_zs = tl.load(ZS + i_bh * s_zs_bh + i_m * s_zs_m + o_d)  # [D] fp32
    b_num = tl.dot(b_pq.to(b_hs.dtype), b_hs, input_precision=PREC)
    b_den = tl.sum(b_pq.to(tl.float32) * b_zs[None, :], axis=1)
    # A zero normaliser means nothing in scope (or relu features orthogonal to it): o_l is 0 there.
    b_ol = b_num / tl.where(b_den == 0., 1., b_den)[:, None]

    if HAS_PROJ:
        b_wt = tl.load(W + o_d[None, :] * D + o_d[:, None])  # W^T: [D_in, D_out], fp32
        b_proj = tl.dot(b_ol, b_wt, input_precision=PREC)
        if HAS_BIAS:
            b_proj += tl.load(BIAS + o_d)[None, :]
    else:
        b_proj = b_ol
    b_o = b_os + b_proj

    p_o = i_b * s_o_b + i_h * s_o_h + o_m[:, None] * s_o_l + o_d[None, :]
    tl.store(O + p_o, b_o.to(O.dtype.element_ty), mask=m_q[:, None])
    tl.store(OS + p_o, b_os.to(OS.dtype.element_ty), mask=m_q[:, None])
    tl.store(OL + p_o, b_ol.to(OL.dtype.element_ty), mask=m_q[:, None])
    tl.store(LSE + i_bh * Lq + o_m, b_lse, mask=m_q)


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "N_CRIT"])
def sla_bwd_dq_kernel(
    Q, K, V, DO, OS, LSE, LUT, DELTA, DQ,
    s_q_b, s_q_h, s_q_l,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    s_do_b, s_do_h, s_do_l,
    s_os_b, s_os_h, s_os_l,
    s_dq_b, s_dq_h, s_dq_l,
    scale, Lq, Lk, Tm, N_CRIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_q = o_m < Lq

    b_q = tl.load(Q + i_b * s_q_b + i_h * s_q_h + o_m[:, None] * s_q_l + o_d[None, :], mask=m_q[:, None], other=0.)
    b_do = tl.load(DO + i_b * s_do_b + i_h * s_do_h + o_m[:, None] * s_do_l + o_d[None, :], mask=m_q[:, None],
                   other=0.)
    b_os = tl.load(OS + i_b * s_os_b + i_h * s_os_h + o_m[:, None] * s_os_l + o_d[None, :], mask=m_q[:, None],
                   other=0.)
    # D^s of Algorithm 2, computed here once per query block and reused by the dK/dV kernel.
    b_delta = tl.sum(b_do.to(tl.float32) * b_os.to(tl.float32), axis=1)
    tl.store(DELTA + i_bh * Lq + o_m, b_delta, mask=m_q)
    b_lse = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=float("inf"))

    p_k0 = K + i_b * s_k_b + i_h * s_k_h
    p_v0 = V + i_b * s_v_b + i_h * s_v_h
    p_lut = LUT + (i_bh * Tm + i_m) * N_CRIT
    qk_scale = scale * 1.4426950408889634
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    for i_c in range(N_CRIT):
        i_n = tl.load(p_lut + i_c)
        o_k = i_n * BN + o_n
        m_k = o_k < Lk
        b_kt = tl.load(p_k0 + o_k[None, :] * s_k_l + o_d[:, None], mask=m_k[None, :], other=0.)  # [D, BN]
        b_vt = tl.load(p_v0 + o_k[None, :] * s_v_l + o_d[:, None], mask=m_k[None, :], other=0.)  # [D, BN]
        b_s = tl.dot(b_q, b_kt, input_precision=PREC) * qk_scale
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        b_p = tl.where(m_k[None, :], b_p, 0.)
        b_dp = tl.dot(b_do, b_vt, input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PREC)
    p_dq = DQ + i_b * s_dq_b + i_h * s_dq_h + o_m[:, None] * s_dq_l + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_q[:, None])


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "Tn", "N_CRIT", "s_dhs_n", "s_dzs_n"])
def sla_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, LUT_T_OFF, LUT_T, PHIK, DHS, DZS, DK, DV, DPHIK,
    s_q_b, s_q_h, s_q_l,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    s_do_b, s_do_h, s_do_l,
    s_pk_b, s_pk_h, s_pk_l,
    s_dk_b, s_dk_h, s_dk_l,
    s_dpk_b, s_dpk_h, s_dpk_l,
    s_dhs_bh, s_dhs_n, s_dzs_bh, s_dzs_n,
    scale, Lq, Lk, Tm, Tn, N_CRIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_n * BN + tl.arange(0, BN)
    o_mb = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_k = o_k < Lk

    b_k = tl.load(K + i_b * s_k_b + i_h * s_k_h + o_k[:, None] * s_k_l + o_d[None, :], mask=m_k[:, None], other=0.)
    b_v = tl.load(V + i_b * s_v_b + i_h * s_v_h + o_k[:, None] * s_v_l + o_d[None, :], mask=m_k[:, None], other=0.)
    p_q0 = Q + i_b * s_q_b + i_h * s_q_h
    p_do0 = DO + i_b * s_do_b + i_h * s_do_h
    # Only the query blocks that chose this key block as critical: the CSR transpose of the LUT.
    i_start = tl.load(LUT_T_OFF + i_bh * (Tn + 1) + i_n)
    i_end = tl.load(LUT_T_OFF + i_bh * (Tn + 1) + i_n + 1)
    p_lut_t = LUT_T + i_bh * Tm * N_CRIT
    qk_scale = scale * 1.4426950408889634
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    for i_t in range(i_start, i_end):
        i_m = tl.load(p_lut_t + i_t)
        o_m = i_m * BM + o_mb
        m_q = o_m < Lq
        b_qt = tl.load(p_q0 + o_m[None, :] * s_q_l + o_d[:, None], mask=m_q[None, :], other=0.)  # [D, BM]
        b_do = tl.load(p_do0 + o_m[:, None] * s_do_l + o_d[None, :], mask=m_q[:, None], other=0.)  # [BM, D]
        b_lse = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=float("inf"))
        b_delta = tl.load(DELTA + i_bh * Lq + o_m, mask=m_q, other=0.)
        b_st = tl.dot(b_k, b_qt, input_precision=PREC) * qk_scale  # [BN, BM]
        b_pt = tl.math.exp2(b_st - b_lse[None, :])
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PREC)
    # Linear branch, per key block j: dV_j += phi(K_j) dh_j and dphi(K_j) = V_j dh_j^T + dz_j, where dh_j, dz_j
    # are the sums of dH_i, dZ_i over the query blocks that have j in scope (M^T @ dH, formed beforehand).
    b_dhs = tl.load(DHS + i_bh * s_dhs_bh + i_n * s_dhs_n + o_d[:, None] * D + o_d[None, :])  # [D, D]
    b_dzs = tl.load(DZS + i_bh * s_dzs_bh + i_n * s_dzs_n + o_d)
    b_pk = tl.load(PHIK + i_b * s_pk_b + i_h * s_pk_h + o_k[:, None] * s_pk_l + o_d[None, :], mask=m_k[:, None],
                   other=0.)
    b_dv += tl.dot(b_pk.to(b_dhs.dtype), b_dhs, input_precision=PREC)
    b_dpk = tl.dot(b_v.to(b_dhs.dtype), tl.trans(b_dhs), input_precision=PREC) + b_dzs[None, :]

    p_dk = i_b * s_dk_b + i_h * s_dk_h + o_k[:, None] * s_dk_l + o_d[None, :]
    tl.store(DK + p_dk, (b_dk * scale).to(DK.dtype.element_ty), mask=m_k[:, None])
    tl.store(DV + p_dk, b_dv.to(DV.dtype.element_ty), mask=m_k[:, None])
    p_dpk = DPHIK + i_b * s_dpk_b + i_h * s_dpk_h + o_k[:, None] * s_dpk_l + o_d[None, :]
    tl.store(p_dpk, b_dpk.to(DPHIK.dtype.element_ty), mask=m_k[:, None])


@triton.jit(do_not_specialize=["Lq", "Tm", "s_hs_m", "s_zs_m"])
def sla_bwd_linear_q_kernel(
    DO, W, OL, PHIQ, HS, ZS, DPHIQ, DHS, DZS,
    s_do_b, s_do_h, s_do_l,
    s_ol_b, s_ol_h, s_ol_l,
    s_pq_b, s_pq_h, s_pq_l,
    s_dpq_b, s_dpq_h, s_dpq_l,
    s_hs_bh, s_hs_m, s_zs_bh, s_zs_m,
    Lq, Tm,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, HAS_PROJ: tl.constexpr, PREC: tl.constexpr,
):
    # Linear branch backward per query block (paper Eq. 8): dphi(Q_i), dH_i and dZ_i, with dO_l = dO W (through
    # Proj) and D^l = rowsum(dO_l * O_l). H_i, Z_i are recomputed states, not saved ones.
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_q = o_m < Lq
    b_do = tl.load(DO + i_b * s_do_b + i_h * s_do_h + o_m[:, None] * s_do_l + o_d[None, :], mask=m_q[:, None],
                   other=0.).to(tl.float32)
    if HAS_PROJ:
        b_w = tl.load(W + o_d[:, None] * D + o_d[None, :])  # [D_out, D_in]
        b_dol = tl.dot(b_do, b_w, input_precision=PREC)
    else:
        b_dol = b_do
    b_ol = tl.load(OL + i_b * s_ol_b + i_h * s_ol_h + o_m[:, None] * s_ol_l + o_d[None, :], mask=m_q[:, None],
                   other=0.).to(tl.float32)
    b_dl = tl.sum(b_dol * b_ol, axis=1)
    b_pq = tl.load(PHIQ + i_b * s_pq_b + i_h * s_pq_h + o_m[:, None] * s_pq_l + o_d[None, :], mask=m_q[:, None],
                   other=0.).to(tl.float32)
    b_hs = tl.load(HS + i_bh * s_hs_bh + i_m * s_hs_m + o_d[:, None] * D + o_d[None, :])  # [D, D]
    b_zs = tl.load(ZS + i_bh * s_zs_bh + i_m * s_zs_m + o_d)
    b_den = tl.sum(b_pq * b_zs[None, :], axis=1)
    b_den = tl.where(b_den == 0., 1., b_den)  # rows whose o_l is 0 (see sla_fwd_kernel)
    b_dpq = tl.dot(b_dol.to(b_hs.dtype), tl.trans(b_hs), input_precision=PREC) - b_dl[:, None] * b_zs[None, :]
    b_dpq = b_dpq / b_den[:, None]
    p_dpq = DPHIQ + i_b * s_dpq_b + i_h * s_dpq_h + o_m[:, None] * s_dpq_l + o_d[None, :]
    tl.store(p_dpq, b_dpq.to(DPHIQ.dtype.element_ty), mask=m_q[:, None])
    b_qn = b_pq / b_den[:, None]
    b_dhs = tl.dot(tl.trans(b_qn.to(b_hs.dtype)), b_dol.to(b_hs.dtype), input_precision=PREC)  # [D, D]
    b_dzs = -tl.sum(b_qn * b_dl[:, None], axis=0)
    i_row = i_bh * Tm + i_m
    tl.store(DHS + i_row * D * D + o_d[:, None] * D + o_d[None, :], b_dhs.to(DHS.dtype.element_ty))
    tl.store(DZS + i_row * D + o_d, b_dzs)
