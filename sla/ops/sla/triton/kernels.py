"""Triton kernels of SLA (only ``@triton.jit`` code; launchers live in ``launch.py``).

Layout: q, k, v, o are ``(B, H, L, D)`` addressed through explicit (batch, head, token) strides, the last
dimension contiguous, so a ``(B, L, H, D)`` tensor viewed as ``(B, H, L, D)`` is read without a copy. One
program handles one (batch*head, query block) or (batch*head, key block).

The feature map ``phi`` (softmax over D, elu+1 or relu; ``FEATURE``) is applied inside the kernels to the
q and k tiles they load anyway, and its backward is folded into dq and dk: no ``phi(q)``/``phi(k)`` tensors
are written, saved or differentiated by autograd.

Kernels:

* ``sla_linear_state_kernel``: per key block ``h_j = phi(K_j)^T V_j`` (``D x D``) and ``z_j = sum phi(K_j)``.
* ``sla_fwd_kernel``: per query block, online-softmax attention over its critical key blocks (exp2 with
  ``log2(e)`` folded into the scale, fp32 accumulators, base-2 log-sum-exp), then the linear branch
  ``phi(Q_i) H_i / (phi(Q_i) . Z_i)`` from the block's aggregated state, then ``Proj`` and the combination:
  the sum (``combine="paper"``) or the mass-weighted mix ``a o_s + (1 - a) Proj(o_l)`` (``MASS``), with
  ``a = sigmoid(lse - log(den) - log(D) - mass_offset[h])`` from the two normalisers the kernel already has.
* ``sla_bwd_dq_kernel``: ``delta = rowsum(dO * O_s)`` and dQ of the sparse branch over the critical LUT. For
  ``MASS`` it reads ``delta`` per row and ``a dO`` in place of dO (the linear-q kernel ran first and wrote both)
  and adds into dq.
* ``sla_bwd_linear_q_kernel``: the linear branch's backward per query block (paper Eq. 8): its share of dq
  (through dphi(Q_i)), dH_i, dZ_i, and the block's partial sum of dO for the bias gradient. For ``MASS`` also
  ``g``, the gradient of ``a``'s logit, the sparse branch's ``delta`` (from ``dO W`` it forms anyway) and the
  branches' shares of dO, ``a dO`` and ``(1 - a) dO``.
* ``sla_bwd_dkdv_kernel``: dK and dV of the sparse branch per key block over the transposed (CSR) LUT (from the
  sparse branch's share of dO), plus the linear branch's share of dV_j and dK_j (through dphi(K_j)).

``combine="pooled"`` (``POOLED``, with ``MASS``): the forward reads ``o_c`` and ``log_rest`` from the coarse
kernels below and takes ``a = sigmoid(lse - log_rest - mass_offset[h])``; the linear-q kernel adds ``dO . o_c`` to
``g``, writes ``(1 - a) dO`` (o_c's gradient) and gives ``log(den)`` no share of ``g``; the dK/dV kernel adds what
each token gets through its block's mean key and value in its epilogue.

* ``sla_coarse_fwd_kernel``: per query block, ``o_c`` (softmax over the in-scope key-block logits
  ``scale q . mean(K_j) + log(n_j)`` of the mean values) and ``log_rest`` (log-sum-exp over the non-critical ones).
* ``sla_coarse_bwd_dq_kernel`` / ``sla_coarse_bwd_dkdv_kernel``: their gradients with respect to q (added to the
  dq in memory) and the means.
* ``COV`` (``combine="pooled_cov"``) in all three: the forward also writes the coarse weights' mean over each query
  block's rows (``pbar``, the weights of the covariance state the launcher forms), the backward kernels add the
  state's gradient with respect to those weights.

Launch forms (``launch_config.py`` picks them; the values computed are the same):

* ``TMA``: the forward and dQ loops gather K/V tiles, the dK/dV loop Q/dO tiles, through host-side TMA descriptors
  (``KD``, ``VD``, ``QD``, ``DOD``: one ``(B, H, L, D)`` descriptor each, block ``[1, 1, rows, D]``) instead of
  pointer loads; the pointer arguments stay for everything else.
* ``PART`` of ``sla_fwd_kernel``: 0 the whole forward, or the split forward's two launches, 1 the sparse loop
  alone (o_s and the LSE to memory) and 2 the rest (``_fwd_epilogue``, reading them back).

Sequence lengths and the critical count are runtime integers (``do_not_specialize``; a descriptor's shape is not
specialised either): a new length or top-k count does not compile a new kernel.
"""

import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E) and log(x) = log2(x) * LN2: the kernels work in base 2 (exp2 and log2 are the native
# instructions). The forward receives the product ``scale * LOG2E`` from the launcher (launch.py, in double
# precision) since it needs nothing else; the dQ and dK/dV kernels also scale their results by ``scale`` itself,
# so they take ``scale`` and form the product in-kernel (in fp32). Making them agree would change the backward's
# rounding of qk_scale, hence its results bit for bit, for no gain.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _program_ids(H: tl.constexpr):
    """Every kernel's grid is ``(blocks, B * H)``: this program's block index, its (batch * head) row, batch and head.
    The row is int64 so that ``batch * stride`` offsets of large tensors do not overflow int32."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    return i_blk, i_bh, i_bh // H, i_bh % H


@triton.jit
def _block_rows(i_blk, BLOCK: tl.constexpr, L):
    """Token indices of block ``i_blk`` of ``BLOCK`` tokens, the mask of those below the length ``L``, and that mask
    as a column ``[BLOCK, 1]`` for the block's ``[BLOCK, D]`` tiles. The column is formed here, before any tile's
    pointers, because that is where the inline ``tl.load(ptrs, mask=m[:, None])`` put it (Triton evaluates keyword
    arguments first): the kernels then compile to the same instruction order as before the helpers."""
    o_rows = i_blk * BLOCK + tl.arange(0, BLOCK)
    m_rows = o_rows < L
    return o_rows, m_rows, m_rows[:, None]


@triton.jit
def _tile_ptrs(p0, o_rows, s_l, D: tl.constexpr):
    """Pointers ``[rows, D]`` to rows ``o_rows`` (stride ``s_l``, last dimension contiguous) from ``p0``, the address
    of row 0: a (batch, head) slice of a ``(B, H, L, D)`` tensor, or a ``D x D`` state with ``o_rows = arange(D)`` and
    ``s_l = D``. Built as one chain of pointer additions, as the kernels wrote it inline."""
    return p0 + o_rows[:, None] * s_l + tl.arange(0, D)[None, :]


@triton.jit
def _load_tile(p0, o_rows, s_l, m_tile, D: tl.constexpr):
    """The ``[rows, D]`` tile of ``_tile_ptrs``, zeros in the rows outside ``m_tile`` (``[rows, 1]``: padding past
    the length)."""
    return tl.load(_tile_ptrs(p0, o_rows, s_l, D), mask=m_tile, other=0.)


@triton.jit
def _load_rows(desc, p0, o_rows, s_l, m_tile, i_b, i_h, start, D: tl.constexpr, ROWS: tl.constexpr,
               TMA: tl.constexpr):
    """The ``[ROWS, D]`` tile of rows ``start ..`` of a (batch, head) slice, zeros past the length: through the TMA
    descriptor ``desc`` of the whole ``(B, H, L, D)`` tensor (block ``[1, 1, ROWS, D]``; the hardware zero-fills rows
    past L) when ``TMA``, else with pointer loads from ``p0`` (``o_rows = start + arange(ROWS)``, ``m_tile`` their
    mask as a column)."""
    if TMA:
        return desc.load([i_b.to(tl.int32), i_h.to(tl.int32), start, 0]).reshape(ROWS, D)
    else:
        return _load_tile(p0, o_rows, s_l, m_tile, D)


@triton.jit
def _feature_map(x, FEATURE: tl.constexpr):
    """phi of an fp32 tile ``[rows, D]``, row by row (``sla/ops/sla/feature_maps.py`` is the spec)."""
    if FEATURE == "softmax":
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        return e / tl.sum(e, axis=1)[:, None]
    elif FEATURE == "elu":
        return tl.where(x > 0., x + 1., tl.exp(x))  # elu(x) + 1
    else:
        return tl.maximum(x, 0.)


@triton.jit
def _feature_map_grad(x, phi, d_phi, FEATURE: tl.constexpr):
    """dL/dx from dL/dphi for ``phi = _feature_map(x)`` (all fp32 ``[rows, D]``); at 0 the same one-sided
    derivatives as torch's elu/relu backward."""
    if FEATURE == "softmax":
        return phi * (d_phi - tl.sum(d_phi * phi, axis=1)[:, None])
    elif FEATURE == "elu":
        return d_phi * tl.where(x > 0., 1., phi)
    else:
        return tl.where(x > 0., d_phi, 0.)


@triton.jit(do_not_specialize=["Lk", "Tn"])
def sla_linear_state_kernel(
    K, V, HS, ZS,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    Lk, Tn,
    H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, FEATURE: tl.constexpr, PREC: tl.constexpr,
):
    i_n, i_bh, i_b, i_h = _program_ids(H)
    o_k, m_k, m_kt = _block_rows(i_n, BN, Lk)
    o_d = tl.arange(0, D)
    # _load_key_block's two loads, with each base pointer formed just before its load as the forward's loop has
    # them: passing both to _load_key_block would compute them first and reorder the compiled code.
    b_k = _load_tile(K + i_b * s_k_b + i_h * s_k_h, o_k, s_k_l, m_kt, D)
    b_v = _load_tile(V + i_b * s_v_b + i_h * s_v_h, o_k, s_v_l, m_kt, D)
    # phi rounded to the input dtype once, as the PyTorch paths compute it; padded key rows are zeroed (phi(0) of
    # softmax is 1/D, not 0), so they add nothing to h_j or z_j.
    b_pk = tl.where(m_kt, _feature_map(b_k.to(tl.float32), FEATURE), 0.).to(b_k.dtype)
    b_h = tl.dot(tl.trans(b_pk), b_v, input_precision=PREC)  # [D, D]
    b_z = tl.sum(b_pk.to(tl.float32), axis=0)  # [D]
    i_state = i_bh * Tn + i_n
    tl.store(_tile_ptrs(HS + i_state * D * D, o_d, D, D), b_h.to(HS.dtype.element_ty))
    tl.store(ZS + i_state * D + o_d, b_z)


@triton.jit
def _load_key_block(p_k0, p_v0, KD, VD, i_b, i_h, i_n, s_k_l, s_v_l, Lk, D: tl.constexpr, BN: tl.constexpr,
                    TMA: tl.constexpr):
    """K and V tiles ``[BN, D]`` of key block ``i_n`` (zeros past Lk) and the mask of its real keys; ``p_k0``, ``p_v0``
    address token 0 of this (batch, head), ``KD``, ``VD`` are K's and V's descriptors (read when ``TMA``). The
    forward and dQ loops call it; the state and dK/dV kernels load their one key block with the same helpers inline
    (see sla_linear_state_kernel)."""
    o_k, m_k, m_kt = _block_rows(i_n, BN, Lk)
    b_k = _load_rows(KD, p_k0, o_k, s_k_l, m_kt, i_b, i_h, i_n * BN, D, BN, TMA)
    b_v = _load_rows(VD, p_v0, o_k, s_v_l, m_kt, i_b, i_h, i_n * BN, D, BN, TMA)
    return b_k, b_v, m_k


@triton.jit
def _attend_block(b_q, p_k0, p_v0, KD, VD, i_b, i_h, i_n, b_mx, b_l, b_acc, s_k_l, s_v_l, qk_scale, Lk,
                  D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """One online-softmax step of the sparse branch over key block ``i_n`` (exp2 domain, fp32 state)."""
    b_k, b_v, m_k = _load_key_block(p_k0, p_v0, KD, VD, i_b, i_h, i_n, s_k_l, s_v_l, Lk, D, BN, TMA)
    b_s = tl.where(m_k[None, :], tl.dot(b_q, tl.trans(b_k), input_precision=PREC), float("-inf"))
    b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1) * qk_scale)
    b_p = tl.math.exp2(b_s * qk_scale - b_mx_new[:, None])
    b_alpha = tl.math.exp2(b_mx - b_mx_new)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    # Accumulate into the rescaled accumulator inside the dot (no separate [BM, D] add).
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PREC)
    return b_mx_new, b_l, b_acc


@triton.jit
def _mass_weight(b_lse2, b_den, beta, log_d):
    """``a = sigmoid(lse - log(den) - log(D) - beta)`` per row from the base-2 LSE of the sparse branch and the
    linear branch's normaliser; ``den = 0`` gives ``log = -inf`` and ``a = 1`` (sla/ops/sla/naive.py is the spec)."""
    pos = b_den > 0.
    log_den = tl.where(pos, tl.log(tl.where(pos, b_den, 1.)), float("-inf"))
    x = b_lse2 * LN2 - log_den - log_d - beta
    return 1. / (1. + tl.exp(-x))


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "N_CRIT", "s_hs_m", "s_zs_m"])
def sla_fwd_kernel(
    Q, K, V, LUT, HS, ZS, W, BIAS, MASS_OFF, OC, LOG_REST,
    O, OS, OL, LSE, A, KD, VD,
    s_q_b, s_q_h, s_q_l,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    s_o_b, s_o_h, s_o_l,
    s_aux_b, s_aux_h, s_aux_l,
    s_oc_b, s_oc_h, s_oc_l,
    s_hs_bh, s_hs_m, s_zs_bh, s_zs_m,
    qk_scale, log_d, Lq, Lk, Tm, N_CRIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FEATURE: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, MASS: tl.constexpr,
    POOLED: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, PART: tl.constexpr, DC: tl.constexpr,
):
    # qk_scale = softmax scale * LOG2E (> 0): exp(x) = exp2(x * log2(e)), folded into one multiply-add.
    # PART: 0 = the whole forward in one launch; 1 = the sparse loop alone, writing o_s to OS and the base-2 LSE to
    # LSE; 2 = the rest (linear branch, projection, mix), reading those two back. The split runs the loop without the
    # epilogue's registers (launch_config.fwd_split).
    i_m, i_bh, i_b, i_h = _program_ids(H)
    o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)
    o_d = tl.arange(0, D)

    p_q0 = Q + i_b * s_q_b + i_h * s_q_h
    if PART != 2:
        b_q = _load_tile(p_q0, o_m, s_q_l, m_qt, D)
        p_k0 = K + i_b * s_k_b + i_h * s_k_h
        p_v0 = V + i_b * s_v_b + i_h * s_v_h
        p_lut = LUT + (i_bh * Tm + i_m) * N_CRIT

        b_mx = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        # One loop with the padding mask in every iteration: peeling the last (possibly ragged) block off the loop
        # was slower (bench/RESULTS.md, "Kernels at commit 0f20e68": what was tried on the way).
        for i_c in range(N_CRIT):
            b_mx, b_l, b_acc = _attend_block(b_q, p_k0, p_v0, KD, VD, i_b, i_h, tl.load(p_lut + i_c), b_mx, b_l,
                                             b_acc, s_k_l, s_v_l, qk_scale, Lk, D, BN, PREC, TMA)
        b_os = b_acc / b_l[:, None]
        b_lse2 = b_mx + tl.math.log2(b_l)
    p_aux = i_b * s_aux_b + i_h * s_aux_h + o_m[:, None] * s_aux_l + o_d[None, :]  # OS and OL share strides
    if PART == 1:
        tl.store(OS + p_aux, b_os.to(OS.dtype.element_ty), mask=m_qt)
        tl.store(LSE + i_bh * Lq + o_m, b_lse2, mask=m_q)
    else:
        if PART == 2:  # OS may be O itself: each program reads its rows before it writes them
            b_os = tl.load(OS + p_aux, mask=m_qt, other=0.).to(tl.float32)
            b_lse2 = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=0.)
        _fwd_epilogue(HS, ZS, W, BIAS, MASS_OFF, OC, LOG_REST, O, OS, OL, LSE, A, b_os, b_lse2, p_aux,
                      i_b * s_aux_b + i_h * s_aux_h, s_aux_l, p_q0, o_m, m_q, m_qt, i_bh, i_b, i_h, i_m, s_q_l, s_o_b,
                      s_o_h, s_o_l, s_oc_b, s_oc_h, s_oc_l, s_hs_bh, s_hs_m, s_zs_bh, s_zs_m, log_d, Lq, D, FEATURE,
                      HAS_PROJ, HAS_BIAS, STORE_AUX, MASS, POOLED, PREC, PART, DC)


@triton.jit
def _fwd_epilogue(HS, ZS, W, BIAS, MASS_OFF, OC, LOG_REST, O, OS, OL, LSE, A, b_os, b_lse2, p_aux, p_aux0, s_aux_l,
                  p_q0, o_m, m_q, m_qt, i_bh, i_b, i_h, i_m, s_q_l, s_o_b, s_o_h, s_o_l, s_oc_b, s_oc_h, s_oc_l,
                  s_hs_bh, s_hs_m, s_zs_bh, s_zs_m, log_d, Lq, D: tl.constexpr, FEATURE: tl.constexpr,
                  HAS_PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, MASS: tl.constexpr,
                  POOLED: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr, DC: tl.constexpr):
    """The forward after the sparse loop (``sla_fwd_kernel``'s PART 0 and 2): from o_s and the base-2 LSE
    (``b_os``, ``b_lse2``), the linear branch, ``Proj`` and the combination, then the stores (o_s and the LSE only
    with PART 0: with PART 2 the loop's launch stored them). ``p_aux`` addresses this block's rows of OS and OL,
    ``p_aux0`` their (batch, head) slice (row stride ``s_aux_l``). With a projection, ``o_l`` and ``Proj(o_l)`` are
    formed over ``DC``-column slices of ``H_i`` (``DC``-row slices of ``W^T``)."""
    o_d = tl.arange(0, D)
    # Linear branch: H_i and Z_i are this query block's aggregated states over the key blocks in scope.
    # phi(Q_i) from a second load of the tile (an L2 hit) rather than keeping b_q live past the loop; the two
    # ran at the same speed (bench/RESULTS.md, "Kernels at commit 0f20e68": what was tried on the way).
    b_x = _load_tile(p_q0, o_m, s_q_l, m_qt, D)
    b_pq = _feature_map(b_x.to(tl.float32), FEATURE).to(b_x.dtype).to(tl.float32)
    p_hs0 = HS + i_bh * s_hs_bh + i_m * s_hs_m
    b_zs = tl.load(ZS + i_bh * s_zs_bh + i_m * s_zs_m + o_d)  # [D] fp32
    b_den = tl.sum(b_pq * b_zs[None, :], axis=1)
    # A zero normaliser means nothing in scope (or relu features orthogonal to it): o_l is 0 there.
    b_den_nz = tl.where(b_den == 0., 1., b_den)  # b_den itself goes to the mass weight
    if HAS_PROJ:
        # Slice by slice: H_i (D x D, state dtype) and W^T (D x D, fp32) held whole beside o_s and phi(Q_i) made
        # this kernel spill registers at D = 128 (bench/RESULTS.md, "Register spills and the sliced epilogue").
        # Each slice of o_l is complete (its dot runs over all of D); Proj(o_l) sums the slices' products in fp32.
        b_pq_s = b_pq.to(HS.dtype.element_ty)
        b_proj = tl.zeros_like(b_os)
        for c in tl.range(0, D, DC):
            o_c = c + tl.arange(0, DC)
            b_hs = tl.load(p_hs0 + o_d[:, None] * D + o_c[None, :])  # H_i[:, c]: [D, DC]
            b_ol = tl.dot(b_pq_s, b_hs, input_precision=PREC) / b_den_nz[:, None]
            b_wt = tl.load(W + o_d[None, :] * D + o_c[:, None])  # W^T[c, :]: [DC, D_out], fp32
            b_proj += tl.dot(b_ol, b_wt, input_precision=PREC)
            if STORE_AUX:
                tl.store(OL + p_aux0 + o_m[:, None] * s_aux_l + o_c[None, :], b_ol.to(OL.dtype.element_ty),
                         mask=m_qt)
        if HAS_BIAS:
            b_proj += tl.load(BIAS + o_d)[None, :]
    else:
        b_hs = tl.load(_tile_ptrs(p_hs0, o_d, D, D))  # [D, D]
        b_ol = tl.dot(b_pq.to(b_hs.dtype), b_hs, input_precision=PREC) / b_den_nz[:, None]
        b_proj = b_ol
    if POOLED:
        # combine="pooled" (MASS is set too): a from log_rest, the coarse branch's estimate of the mass outside the
        # critical blocks (a = 1 where it is -inf), and o_c joins the (1 - a) side.
        b_rest = tl.load(LOG_REST + i_bh * Lq + o_m, mask=m_q, other=0.)
        b_fin = b_rest > float("-inf")
        b_logit = b_lse2 * LN2 - tl.where(b_fin, b_rest, 0.) - tl.load(MASS_OFF + i_h)
        b_a = tl.where(b_fin, 1. / (1. + tl.exp(-b_logit)), 1.)
        b_oc = _load_tile(OC + i_b * s_oc_b + i_h * s_oc_h, o_m, s_oc_l, m_qt, D).to(tl.float32)
        b_o = b_a[:, None] * b_os + (1. - b_a[:, None]) * (b_oc + b_proj)
    elif MASS:
        b_a = _mass_weight(b_lse2, b_den, tl.load(MASS_OFF + i_h), log_d)
        b_o = b_a[:, None] * b_os + (1. - b_a[:, None]) * b_proj
    else:
        b_o = b_os + b_proj

    tl.store(_tile_ptrs(O + i_b * s_o_b + i_h * s_o_h, o_m, s_o_l, D), b_o.to(O.dtype.element_ty), mask=m_qt)
    if STORE_AUX:  # only when backward will run: inference writes o alone
        if PART == 0:  # else the sparse part stored them
            tl.store(OS + p_aux, b_os.to(OS.dtype.element_ty), mask=m_qt)
            tl.store(LSE + i_bh * Lq + o_m, b_lse2, mask=m_q)
        if not HAS_PROJ:  # else stored slice by slice above
            tl.store(OL + p_aux, b_ol.to(OL.dtype.element_ty), mask=m_qt)
        if MASS:
            tl.store(A + i_bh * Lq + o_m, b_a, mask=m_q)


@triton.jit
def _dq_block(b_q, b_do, b_lse, b_delta, b_dq, p_k0, p_v0, KD, VD, i_b, i_h, i_n, s_k_l, s_v_l, qk_scale, Lk,
              D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """Adds key block ``i_n``'s ``dS K`` to the (unscaled) dQ accumulator."""
    b_k, b_v, m_k = _load_key_block(p_k0, p_v0, KD, VD, i_b, i_h, i_n, s_k_l, s_v_l, Lk, D, BN, TMA)
    b_p = tl.math.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - b_lse[:, None])
    b_p = tl.where(m_k[None, :], b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=PREC)


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "N_CRIT"])
def sla_bwd_dq_kernel(
    Q, K, V, DO, OS, LSE, LUT, DELTA, DQ, KD, VD,
    s_q_b, s_q_h, s_q_l,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    s_do_b, s_do_h, s_do_l,
    s_aux_b, s_aux_h, s_aux_l,
    s_dq_b, s_dq_h, s_dq_l,
    scale, Lq, Lk, Tm, N_CRIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MASS: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr,
):
    # combine="paper": writes DELTA and DQ. MASS: DO is the sparse branch's share dO_s = a dO and DELTA is
    # already minus g, both written by sla_bwd_linear_q_kernel, which also stored the linear branch's dq in DQ
    # (added here); OS is not read.
    i_m, i_bh, i_b, i_h = _program_ids(H)
    o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)

    b_q = _load_tile(Q + i_b * s_q_b + i_h * s_q_h, o_m, s_q_l, m_qt, D)
    b_do = _load_tile(DO + i_b * s_do_b + i_h * s_do_h, o_m, s_do_l, m_qt, D)
    if MASS:
        # o = a o_s + (1 - a) Proj(o_l): the sparse branch's dO_s = a dO arrives scaled and rounded to the input
        # dtype, the values delta was taken from, so that delta and the loop's dP = dO_s V^T stay consistent.
        # delta - g arrives precomputed: forming g here needed Proj(o_l), i.e. the o_l tile and the D x D
        # projection beside the loop's tiles (bench/RESULTS.md, "What `combine="mass"` costs").
        b_delta = tl.load(DELTA + i_bh * Lq + o_m, mask=m_q, other=0.)
    else:
        # D^s of Algorithm 2, computed here once per query block and reused by the dK/dV kernel.
        b_os = _load_tile(OS + i_b * s_aux_b + i_h * s_aux_h, o_m, s_aux_l, m_qt, D)
        b_delta = tl.sum(b_do.to(tl.float32) * b_os.to(tl.float32), axis=1)
        tl.store(DELTA + i_bh * Lq + o_m, b_delta, mask=m_q)
    b_lse = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=float("inf"))

    p_k0 = K + i_b * s_k_b + i_h * s_k_h
    p_v0 = V + i_b * s_v_b + i_h * s_v_h
    p_lut = LUT + (i_bh * Tm + i_m) * N_CRIT
    qk_scale = scale * LOG2E
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    for i_c in range(N_CRIT):  # one loop, masked every iteration (see sla_fwd_kernel)
        b_dq = _dq_block(b_q, b_do, b_lse, b_delta, b_dq, p_k0, p_v0, KD, VD, i_b, i_h, tl.load(p_lut + i_c), s_k_l,
                         s_v_l, qk_scale, Lk, D, BN, PREC, TMA)
    b_dq = b_dq * scale
    p_dq = _tile_ptrs(DQ + i_b * s_dq_b + i_h * s_dq_h, o_m, s_dq_l, D)
    if MASS:  # read after the loop, so the linear branch's share holds no registers during it
        b_dq += tl.load(p_dq, mask=m_qt, other=0.).to(tl.float32)
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_qt)


@triton.jit(do_not_specialize=["Lq", "Tm", "s_hs_m", "s_zs_m"])
def sla_bwd_linear_q_kernel(
    Q, DO, W, BIAS, OS, OL, OC, A, DELTA, G, HS, ZS, DQ, DHS, DZS, DB_PART, DO_S, DO_L,
    s_q_b, s_q_h, s_q_l,
    s_do_b, s_do_h, s_do_l,
    s_aux_b, s_aux_h, s_aux_l,
    s_oc_b, s_oc_h, s_oc_l,
    s_dq_b, s_dq_h, s_dq_l,
    s_hs_bh, s_hs_m, s_zs_bh, s_zs_m,
    Lq, Tm,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, FEATURE: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASS: tl.constexpr, POOLED: tl.constexpr, PREC: tl.constexpr,
):
    # Linear branch backward per query block (paper Eq. 8) with dO_l = dO W (through Proj) and
    # D^l = rowsum(dO_l * O_l), from recomputed (not saved) H_i, Z_i: dphi(Q_i) = (dO_l H_i^T - D^l Z_i^T) / den,
    # dH_i = (phi(Q_i) / den)^T dO_l, dZ_i = -(phi(Q_i) / den)^T D^l. dphi(Q_i) goes through phi's backward; with
    # combine="paper" it is added to the sparse branch's dq already in DQ, with MASS this kernel runs first and
    # stores it (the dQ kernel adds). Also this block's share of the bias gradient, sum(dO).
    # OS and OL share the strides s_aux_* (the forward allocates both like q). With MASS it also writes the two
    # branches' shares of dO in the input dtype, DO_S = a dO (for the dQ and dK/dV kernels) and, with a projection,
    # DO_L = (1 - a) dO (for its weight gradient), with DO's strides: scaling dO inside the dK/dV loop and in a
    # separate pass for the weight cost more than writing both here (bench/RESULTS.md).
    i_m, i_bh, i_b, i_h = _program_ids(H)
    o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)
    o_d = tl.arange(0, D)
    b_do_in = _load_tile(DO + i_b * s_do_b + i_h * s_do_h, o_m, s_do_l, m_qt, D)
    b_do = b_do_in.to(tl.float32)
    if MASS:
        # o = a o_s + (1 - a) p, p = Proj(o_l), a = sigmoid(x) with x = lse - log(den) - ...: the logit's gradient
        # is g = dO.(o_s - p) a (1 - a). It goes to lse as delta - g (dQ and dK/dV kernels), to log(den) as
        # D^l + g (here) and to mass_offset as -g. Its dO.p part is the row sum this kernel forms anyway from
        # dO W; only dO.o_s needs o_s, read once here (and no longer by the dQ kernel, which gets delta).
        b_a = tl.load(A + i_bh * Lq + o_m, mask=m_q, other=1.)
        b_os = _load_tile(OS + i_b * s_aux_b + i_h * s_aux_h, o_m, s_aux_l, m_qt, D).to(tl.float32)
        b_dot_os = tl.sum(b_do * b_os, axis=1)
        # The sparse branch's D^s from dO_s = a dO rounded to the input dtype, the values the dQ and dK/dV kernels
        # read.
        b_dos = (b_do * b_a[:, None]).to(b_do_in.dtype)
        p_do = _tile_ptrs(i_b * s_do_b + i_h * s_do_h, o_m, s_do_l, D)
        tl.store(DO_S + p_do, b_dos, mask=m_qt)
        b_delta = tl.sum(b_dos.to(tl.float32) * b_os, axis=1)
        b_do = b_do * (1. - b_a)[:, None]  # the projected linear branch enters o as (1 - a) Proj(o_l)
        if HAS_PROJ or POOLED:  # POOLED: (1 - a) dO is also o_c's gradient
            tl.store(DO_L + p_do, b_do.to(b_do_in.dtype), mask=m_qt)
    i_row = i_bh * Tm + i_m
    if HAS_BIAS:
        tl.store(DB_PART + i_row * D + o_d, tl.sum(b_do, axis=0))
    if HAS_PROJ:
        b_w = tl.load(_tile_ptrs(W, o_d, D, D))  # [D_out, D_in]
        b_dol = tl.dot(b_do, b_w, input_precision=PREC)
    else:
        b_dol = b_do
    b_ol = _load_tile(OL + i_b * s_aux_b + i_h * s_aux_h, o_m, s_aux_l, m_qt, D).to(tl.float32)
    b_dl = tl.sum(b_dol * b_ol, axis=1)
    if MASS:
        # (1 - a) dO.p = ((1 - a) dO W).o_l + (1 - a) dO.b = D^l (+ the bias term). Written without dividing by
        # 1 - a, so rows with a = 1 (nothing in scope) get g = 0 exactly.
        b_dot_p = b_dl
        if HAS_BIAS:
            b_dot_p = b_dot_p + tl.sum(b_do * tl.load(BIAS + o_d)[None, :], axis=1)
        if POOLED:  # the (1 - a) side also holds o_c
            b_oc = _load_tile(OC + i_b * s_oc_b + i_h * s_oc_h, o_m, s_oc_l, m_qt, D).to(tl.float32)
            b_dot_p = b_dot_p + tl.sum(b_do * b_oc, axis=1)
        b_g = b_a * ((1. - b_a) * b_dot_os - b_dot_p)
        tl.store(G + i_bh * Lq + o_m, b_g, mask=m_q)
        tl.store(DELTA + i_bh * Lq + o_m, b_delta - b_g, mask=m_q)
        if not POOLED:  # the pooled rule's a does not depend on den: its -g goes to log_rest (the launcher's)
            b_dl += b_g  # log(den) gets -g: D^l - d log(den) = D^l + g
    b_x = _load_tile(Q + i_b * s_q_b + i_h * s_q_h, o_m, s_q_l, m_qt, D)
    b_phi = _feature_map(b_x.to(tl.float32), FEATURE)
    b_pq = b_phi.to(b_x.dtype).to(tl.float32)  # the forward's rounding of phi(q)
    b_hs = tl.load(_tile_ptrs(HS + i_bh * s_hs_bh + i_m * s_hs_m, o_d, D, D))  # [D, D]
    b_zs = tl.load(ZS + i_bh * s_zs_bh + i_m * s_zs_m + o_d)
    b_den = tl.sum(b_pq * b_zs[None, :], axis=1)
    b_den = tl.where(b_den == 0., 1., b_den)  # rows whose o_l is 0 (see sla_fwd_kernel)
    b_dpq = tl.dot(b_dol.to(b_hs.dtype), tl.trans(b_hs), input_precision=PREC) - b_dl[:, None] * b_zs[None, :]
    b_dpq = b_dpq / b_den[:, None]
    p_dq = _tile_ptrs(DQ + i_b * s_dq_b + i_h * s_dq_h, o_m, s_dq_l, D)
    b_dq = _feature_map_grad(b_x.to(tl.float32), b_phi, b_dpq, FEATURE)
    if not MASS:  # the dQ kernel ran first (see above)
        b_dq += tl.load(p_dq, mask=m_qt, other=0.).to(tl.float32)
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_qt)
    b_qn = b_pq / b_den[:, None]
    b_dhs = tl.dot(tl.trans(b_qn.to(b_hs.dtype)), b_dol.to(b_hs.dtype), input_precision=PREC)  # [D, D]
    b_dzs = -tl.sum(b_qn * b_dl[:, None], axis=0)
    tl.store(_tile_ptrs(DHS + i_row * D * D, o_d, D, D), b_dhs.to(DHS.dtype.element_ty))
    tl.store(DZS + i_row * D + o_d, b_dzs)


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "Tn", "N_CRIT", "s_dhs_n", "s_dzs_n"])
def sla_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, LUT_T_OFF, LUT_T, DHS, DZS, DKX, DVX, DK, DV, QD, DOD,
    s_q_b, s_q_h, s_q_l,
    s_k_b, s_k_h, s_k_l,
    s_v_b, s_v_h, s_v_l,
    s_do_b, s_do_h, s_do_l,
    s_dk_b, s_dk_h, s_dk_l,
    s_dhs_bh, s_dhs_n, s_dzs_bh, s_dzs_n,
    scale, Lq, Lk, Tm, Tn, N_CRIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FEATURE: tl.constexpr,
    POOLED: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):
    # Every combination rule: with combine="mass" DO is the sparse branch's share a dO and DELTA is minus g, as
    # sla_bwd_linear_q_kernel wrote them. POOLED: DKX, DVX (B*H, T_n, D) fp32 hold what the coarse branch gives each
    # token of a key block through its mean key and value (the same row for every token of the block).
    i_n, i_bh, i_b, i_h = _program_ids(H)
    o_k, m_k, m_kt = _block_rows(i_n, BN, Lk)
    o_d = tl.arange(0, D)

    b_k = _load_tile(K + i_b * s_k_b + i_h * s_k_h, o_k, s_k_l, m_kt, D)  # as _load_key_block (see the state kernel)
    b_v = _load_tile(V + i_b * s_v_b + i_h * s_v_h, o_k, s_v_l, m_kt, D)
    p_q0 = Q + i_b * s_q_b + i_h * s_q_h
    p_do0 = DO + i_b * s_do_b + i_h * s_do_h
    # Only the query blocks that chose this key block as critical: the CSR transpose of the LUT.
    i_start = tl.load(LUT_T_OFF + i_bh * (Tn + 1) + i_n)
    i_end = tl.load(LUT_T_OFF + i_bh * (Tn + 1) + i_n + 1)
    p_lut_t = LUT_T + i_bh * Tm * N_CRIT
    qk_scale = scale * LOG2E
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    for i_t in range(i_start, i_end):
        i_m = tl.load(p_lut_t + i_t)
        o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)
        b_q = _load_rows(QD, p_q0, o_m, s_q_l, m_qt, i_b, i_h, i_m * BM, D, BM, TMA)  # [BM, D]
        b_do = _load_rows(DOD, p_do0, o_m, s_do_l, m_qt, i_b, i_h, i_m * BM, D, BM, TMA)  # [BM, D]
        b_lse = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=float("inf"))
        b_delta = tl.load(DELTA + i_bh * Lq + o_m, mask=m_q, other=0.)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [BN, BM]
        b_pt = tl.math.exp2(b_st * qk_scale - b_lse[None, :])
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PREC)
    # Linear branch, per key block j: dV_j += phi(K_j) dh_j and dphi(K_j) = V_j dh_j^T + dz_j, where dh_j, dz_j
    # are the sums of dH_i, dZ_i over the query blocks that have j in scope (M^T @ dH, formed beforehand);
    # dphi(K_j) reaches dK_j through phi's backward.
    b_dhs = tl.load(_tile_ptrs(DHS + i_bh * s_dhs_bh + i_n * s_dhs_n, o_d, D, D))  # [D, D]
    b_dzs = tl.load(DZS + i_bh * s_dzs_bh + i_n * s_dzs_n + o_d)
    b_x = b_k.to(tl.float32)
    b_phi = _feature_map(b_x, FEATURE)
    b_dv = tl.dot(b_phi.to(b_k.dtype).to(b_dhs.dtype), b_dhs, b_dv, input_precision=PREC)
    b_dpk = tl.dot(b_v.to(b_dhs.dtype), tl.trans(b_dhs), input_precision=PREC) + b_dzs[None, :]
    b_dk = b_dk * scale + _feature_map_grad(b_x, b_phi, b_dpk, FEATURE)
    if POOLED:  # added before the one rounding to k's dtype, instead of a full-size add afterwards
        b_dk += tl.load(DKX + (i_bh * Tn + i_n) * D + o_d)[None, :]
        b_dv += tl.load(DVX + (i_bh * Tn + i_n) * D + o_d)[None, :]

    p_dk = i_b * s_dk_b + i_h * s_dk_h + o_k[:, None] * s_dk_l + o_d[None, :]  # DV has DK's strides
    tl.store(DK + p_dk, b_dk.to(DK.dtype.element_ty), mask=m_kt)
    tl.store(DV + p_dk, b_dv.to(DV.dtype.element_ty), mask=m_kt)


# ------------------------------------------------------------------------------------------------------------------
# combine="pooled": the coarse branch over the key blocks' mean keys and values (sla/ops/sla/naive.py is the spec)
# ------------------------------------------------------------------------------------------------------------------
# Per query row, key block j enters with the logit l_j = scale * q . mean(K_j) + log(n_j) (kept in base 2 here:
# l_j * LOG2E). CODE (B*H, T_m, T_n) uint8 says per query block which blocks count: bit 0 "outside the critical
# blocks" (log_rest sums over those), bit 1 "in the linear scope" (o_c attends over those). Both are online
# log-sum-exps over chunks of BT blocks, masked to -inf outside their set; a chunk that holds none of a row's set
# keeps its running maximum at -inf, replaced by 0 where it is subtracted so that no -inf - -inf = NaN appears.


@triton.jit
def _coarse_chunk(b_q, KM, VM, LOGN2, p_code, i_t, Tn, qk_scale, D: tl.constexpr, BT: tl.constexpr,
                  PREC: tl.constexpr):
    """Chunk ``i_t`` of ``BT`` key-block means: the base-2 logits ``[BM, BT]``, the mean values ``[BT, D]`` and the
    two set masks ``[BT]`` (outside the critical blocks; in the linear scope), false past ``Tn``."""
    o_t = i_t + tl.arange(0, BT)
    m_t = o_t < Tn
    o_d = tl.arange(0, D)
    b_km = tl.load(KM + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None], other=0.)
    b_vm = tl.load(VM + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None], other=0.)
    b_code = tl.load(p_code + o_t, mask=m_t, other=0)
    b_logn2 = tl.load(LOGN2 + o_t, mask=m_t, other=0.)
    b_s = tl.dot(b_q, tl.trans(b_km), input_precision=PREC) * qk_scale + b_logn2[None, :]
    return b_s, b_km, b_vm, (b_code & 1) != 0, (b_code & 2) != 0


@triton.jit
def _online_lse(b_s, m_set, b_mx, b_l):
    """One chunk of a base-2 online log-sum-exp over the columns in ``m_set``: the new maximum, sum, the chunk's
    probabilities ``exp2(s - max)`` (0 outside the set) and the factor the old sum was rescaled by."""
    b_s = tl.where(m_set[None, :], b_s, float("-inf"))
    b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1))
    b_ref = tl.where(b_mx_new == float("-inf"), 0., b_mx_new)
    b_alpha = tl.math.exp2(b_mx - b_ref)
    b_p = tl.math.exp2(b_s - b_ref[:, None])
    return b_mx_new, b_l * b_alpha + tl.sum(b_p, axis=1), b_p, b_alpha


@triton.jit(do_not_specialize=["Lq", "Tm", "Tn"])
def sla_coarse_fwd_kernel(
    Q, KM, VM, LOGN2, CODE, OC, LSE_C, LOG_REST, PBAR,
    s_q_b, s_q_h, s_q_l,
    s_oc_b, s_oc_h, s_oc_l,
    qk_scale, Lq, Tm, Tn,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, STORE_AUX: tl.constexpr,
    COV: tl.constexpr, PREC: tl.constexpr,
):
    # One program per (query block, batch*head): o_c = softmax over the in-scope block logits of the mean values,
    # and log_rest = natural log-sum-exp of the logits outside the critical blocks (-inf when there are none).
    # KM, VM: (B*H, T_n, D) contiguous in q's dtype; LOGN2: (T_n,) fp32 log2 of each key block's length. With
    # STORE_AUX also the base-2 log-sum-exp of o_c's softmax (LSE_C, -inf for rows with nothing in scope).
    # COV (combine="pooled_cov"): two passes, the log-sum-exps first, then the normalised weights, whose mean over
    # the block's real rows (pbar, the covariance state's weights) goes to PBAR (B*H, T_m, T_n) fp32.
    i_m, i_bh, i_b, i_h = _program_ids(H)
    o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)
    b_q = _load_tile(Q + i_b * s_q_b + i_h * s_q_h, o_m, s_q_l, m_qt, D)
    p_km = KM + i_bh * Tn * D
    p_vm = VM + i_bh * Tn * D
    p_code = CODE + (i_bh * Tm + i_m) * Tn
    b_mr = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_lr = tl.zeros([BM], dtype=tl.float32)
    b_mc = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_lc = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    if COV:
        for i_t in range(0, Tn, BT):
            b_s, b_km, b_vm, m_rest, m_scope = _coarse_chunk(b_q, p_km, p_vm, LOGN2, p_code, i_t, Tn, qk_scale, D,
                                                             BT, PREC)
            b_mr, b_lr, _, _ = _online_lse(b_s, m_rest, b_mr, b_lr)
            b_mc, b_lc, _, _ = _online_lse(b_s, m_scope, b_mc, b_lc)
        # +inf for rows with nothing in scope and rows past Lq: their weights exp2(s - lse) are 0.
        b_lse_c = tl.where(m_q & (b_lc > 0.), b_mc + tl.math.log2(b_lc), float("inf"))
        n_rows = tl.minimum(Lq - i_m * BM, BM).to(tl.float32)
        for i_t in range(0, Tn, BT):
            b_s, b_km, b_vm, m_rest, m_scope = _coarse_chunk(b_q, p_km, p_vm, LOGN2, p_code, i_t, Tn, qk_scale, D,
                                                             BT, PREC)
            b_p = tl.where(m_scope[None, :], tl.math.exp2(b_s - b_lse_c[:, None]), 0.)
            b_acc = tl.dot(b_p.to(b_vm.dtype), b_vm, b_acc, input_precision=PREC)
            o_t = i_t + tl.arange(0, BT)
            tl.store(PBAR + (i_bh * Tm + i_m) * Tn + o_t, tl.sum(b_p, axis=0) / n_rows, mask=o_t < Tn)
        b_oc = b_acc
    else:
        for i_t in range(0, Tn, BT):
            b_s, b_km, b_vm, m_rest, m_scope = _coarse_chunk(b_q, p_km, p_vm, LOGN2, p_code, i_t, Tn, qk_scale, D,
                                                             BT, PREC)
            b_mr, b_lr, _, _ = _online_lse(b_s, m_rest, b_mr, b_lr)
            b_mc, b_lc, b_p, b_alpha = _online_lse(b_s, m_scope, b_mc, b_lc)
            b_acc = tl.dot(b_p.to(b_vm.dtype), b_vm, b_acc * b_alpha[:, None], input_precision=PREC)
        b_oc = b_acc / tl.where(b_lc > 0., b_lc, 1.)[:, None]
    tl.store(_tile_ptrs(OC + i_b * s_oc_b + i_h * s_oc_h, o_m, s_oc_l, D), b_oc.to(OC.dtype.element_ty), mask=m_qt)
    # log2(0) = -inf and the maximum stays -inf for a row with an empty set: its log-sum-exp is -inf, as specified.
    tl.store(LOG_REST + i_bh * Lq + o_m, (b_mr + tl.math.log2(b_lr)) * LN2, mask=m_q)
    if STORE_AUX:
        tl.store(LSE_C + i_bh * Lq + o_m, b_mc + tl.math.log2(b_lc), mask=m_q)


@triton.jit
def _coarse_row_stats(LSE_C, LOG_REST, G, i_bh, Lq, o_m, m_q):
    """Per row: the base-2 LSE of o_c's softmax and of log_rest, each +inf where it is -inf (so that exp2(s - lse)
    is 0, not inf), and log_rest's incoming gradient, -g (a = sigmoid(lse - log_rest - ...)), 0 past Lq."""
    b_lse_c = tl.load(LSE_C + i_bh * Lq + o_m, mask=m_q, other=float("inf"))
    b_lse_c = tl.where(b_lse_c == float("-inf"), float("inf"), b_lse_c)
    b_lse_r = tl.load(LOG_REST + i_bh * Lq + o_m, mask=m_q, other=float("inf")) * LOG2E
    b_lse_r = tl.where(b_lse_r == float("-inf"), float("inf"), b_lse_r)
    return b_lse_c, b_lse_r, -tl.load(G + i_bh * Lq + o_m, mask=m_q, other=0.)


@triton.jit(do_not_specialize=["Lq", "Tm", "Tn"])
def sla_coarse_bwd_dq_kernel(
    Q, KM, VM, LOGN2, CODE, OC, LSE_C, LOG_REST, DOC, G, U, PBAR, DELTA_C, DQ,
    s_q_b, s_q_h, s_q_l,
    s_oc_b, s_oc_h, s_oc_l,
    s_doc_b, s_doc_h, s_doc_l,
    s_dq_b, s_dq_h, s_dq_l,
    qk_scale, scale, Lq, Tm, Tn,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, COV: tl.constexpr, PREC: tl.constexpr,
):
    # dl_j = p_j (dO_c . mean(V_j) - delta_c) [in scope] + d_rest * r_j [outside the critical blocks], with p the
    # softmax of o_c, r_j = exp(l_j - log_rest), d_rest = -g (G: the logit's gradient the linear-q kernel wrote)
    # and delta_c = dO_c . o_c (written here for the dK/dV kernel); dq = scale * sum_j dl_j mean(K_j), added to the
    # main kernels' dq already in DQ (the linear-q kernel ran first).
    # COV (combine="pooled_cov"): p also reaches the output through pbar, the weights of the covariance state, so
    # the gradient of p_j gains u_j, the launcher's (B*H, T_m, T_n) fp32 U of this query block (already divided by
    # its real rows), and delta_c gains d2 = sum_j p_j u_j. A first pass over the chunks forms d2 (and writes the
    # block's pbar, the forward's, recomputed, to PBAR for the launcher's gradient of the per-key-block
    # covariances); the second is the pooled rule's loop with u_j added to dp_j. Forming d2 inside the one loop
    # instead needs a second D-wide fp32 accumulator (sum_j p_j mean(K_j)), which spilled registers at 64x64 and
    # 128x32 (bench/RESULTS.md); the first pass costs the same logits product as that accumulator's.
    i_m, i_bh, i_b, i_h = _program_ids(H)
    o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)
    b_q = _load_tile(Q + i_b * s_q_b + i_h * s_q_h, o_m, s_q_l, m_qt, D)
    b_lse_c, b_lse_r, b_drest = _coarse_row_stats(LSE_C, LOG_REST, G, i_bh, Lq, o_m, m_q)
    # Broadcast once, outside both loops: Triton 3.6 fails to compile the two-pass variant at 128x32 with 4 warps
    # ("operand does not dominate this use") when each loop broadcasts the LSE itself.
    b_lse_c = b_lse_c[:, None]
    b_lse_r = b_lse_r[:, None]
    p_km = KM + i_bh * Tn * D
    p_vm = VM + i_bh * Tn * D
    p_code = CODE + (i_bh * Tm + i_m) * Tn
    p_u = U + (i_bh * Tm + i_m) * Tn
    if COV:
        b_d2 = tl.zeros([BM], dtype=tl.float32)
        n_rows = tl.minimum(Lq - i_m * BM, BM).to(tl.float32)
        for i_t in range(0, Tn, BT):
            b_s, b_km, b_vm, m_rest, m_scope = _coarse_chunk(b_q, p_km, p_vm, LOGN2, p_code, i_t, Tn, qk_scale, D,
                                                             BT, PREC)
            b_p = tl.where(m_scope[None, :], tl.math.exp2(b_s - b_lse_c), 0.)
            o_t = i_t + tl.arange(0, BT)
            b_u = tl.load(p_u + o_t, mask=o_t < Tn, other=0.)
            b_d2 += tl.sum(b_p * b_u[None, :], axis=1)
            tl.store(PBAR + (i_bh * Tm + i_m) * Tn + o_t, tl.sum(b_p, axis=0) / n_rows, mask=o_t < Tn)
    b_do = _load_tile(DOC + i_b * s_doc_b + i_h * s_doc_h, o_m, s_doc_l, m_qt, D)
    b_oc = _load_tile(OC + i_b * s_oc_b + i_h * s_oc_h, o_m, s_oc_l, m_qt, D)
    b_delta = tl.sum(b_do.to(tl.float32) * b_oc.to(tl.float32), axis=1)
    if COV:
        b_delta += b_d2
    tl.store(DELTA_C + i_bh * Lq + o_m, b_delta, mask=m_q)
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    for i_t in range(0, Tn, BT):
        b_s, b_km, b_vm, m_rest, m_scope = _coarse_chunk(b_q, p_km, p_vm, LOGN2, p_code, i_t, Tn, qk_scale, D, BT,
                                                         PREC)
        b_p = tl.where(m_scope[None, :], tl.math.exp2(b_s - b_lse_c), 0.)
        b_r = tl.where(m_rest[None, :], tl.math.exp2(b_s - b_lse_r), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_vm), input_precision=PREC)
        if COV:
            o_t = i_t + tl.arange(0, BT)
            b_dp += tl.load(p_u + o_t, mask=o_t < Tn, other=0.)[None, :]
        b_ds = b_p * (b_dp - b_delta[:, None]) + b_r * b_drest[:, None]
        b_dq = tl.dot(b_ds.to(b_km.dtype), b_km, b_dq, input_precision=PREC)
    p_dq = _tile_ptrs(DQ + i_b * s_dq_b + i_h * s_dq_h, o_m, s_dq_l, D)
    b_dq = b_dq * scale + tl.load(p_dq, mask=m_qt, other=0.).to(tl.float32)
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_qt)


@triton.jit(do_not_specialize=["Lq", "Tm", "Tn", "SPLIT"])
def sla_coarse_bwd_dkdv_kernel(
    Q, KM, VM, LOGN2, CODE, LSE_C, LOG_REST, DOC, G, U, DELTA_C, DKM, DVM,
    s_q_b, s_q_h, s_q_l,
    s_doc_b, s_doc_h, s_doc_l,
    qk_scale, scale, Lq, Tm, Tn, SPLIT,
    H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, COV: tl.constexpr, PREC: tl.constexpr,
):
    # Gradients of BT key-block means from the query blocks i_s, i_s + SPLIT, ... (grid axis 2 is i_s): the
    # launcher sums the SPLIT partial results (DKM, DVM: (SPLIT, B*H, T_n, D) fp32), so that a short T_n still
    # fills the GPU, without atomics. d mean(K_j) = scale * sum_rows dl_j q, d mean(V_j) = sum_rows p_j dO_c.
    # COV: the weights' gradient gains u_j of the row's query block, and DELTA_C holds the whole delta (dq kernel).
    i_t, i_bh, i_b, i_h = _program_ids(H)
    i_s = tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < Tn
    o_d = tl.arange(0, D)
    b_km = tl.load(KM + i_bh * Tn * D + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None], other=0.)
    b_vm = tl.load(VM + i_bh * Tn * D + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None], other=0.)
    b_logn2 = tl.load(LOGN2 + o_t, mask=m_t, other=0.)
    p_q0 = Q + i_b * s_q_b + i_h * s_q_h
    p_do0 = DOC + i_b * s_doc_b + i_h * s_doc_h
    b_dkm = tl.zeros([BT, D], dtype=tl.float32)
    b_dvm = tl.zeros([BT, D], dtype=tl.float32)
    for i_m in range(i_s, Tm, SPLIT):
        o_m, m_q, m_qt = _block_rows(i_m, BM, Lq)
        b_code = tl.load(CODE + (i_bh * Tm + i_m) * Tn + o_t, mask=m_t, other=0)
        b_q = _load_tile(p_q0, o_m, s_q_l, m_qt, D)
        b_do = _load_tile(p_do0, o_m, s_doc_l, m_qt, D)
        b_lse_c, b_lse_r, b_drest = _coarse_row_stats(LSE_C, LOG_REST, G, i_bh, Lq, o_m, m_q)
        b_delta = tl.load(DELTA_C + i_bh * Lq + o_m, mask=m_q, other=0.)
        b_st = tl.dot(b_km, tl.trans(b_q), input_precision=PREC) * qk_scale + b_logn2[:, None]  # [BT, BM]
        b_pt = tl.where(((b_code & 2) != 0)[:, None], tl.math.exp2(b_st - b_lse_c[None, :]), 0.)
        b_rt = tl.where(((b_code & 1) != 0)[:, None], tl.math.exp2(b_st - b_lse_r[None, :]), 0.)
        b_dvm = tl.dot(b_pt.to(b_do.dtype), b_do, b_dvm, input_precision=PREC)
        b_dpt = tl.dot(b_vm, tl.trans(b_do), input_precision=PREC)
        if COV:
            b_dpt += tl.load(U + (i_bh * Tm + i_m) * Tn + o_t, mask=m_t, other=0.)[:, None]
        b_dst = b_pt * (b_dpt - b_delta[None, :]) + b_rt * b_drest[None, :]
        b_dkm = tl.dot(b_dst.to(b_q.dtype), b_q, b_dkm, input_precision=PREC)
    p_out = (i_s * tl.num_programs(1) + i_bh) * Tn * D + o_t[:, None] * D + o_d[None, :]
    tl.store(DKM + p_out, b_dkm * scale, mask=m_t[:, None])
    tl.store(DVM + p_out, b_dvm, mask=m_t[:, None])
