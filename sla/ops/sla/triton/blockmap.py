"""SLA's block classification on the GPU: pooling, scores, per-row selection and the LUT transposes.

Computes the same :class:`~sla.ops.sla.blockmap.BlockMap` as :func:`sla.build_block_map` (same scores up
to fp32 rounding, same counts, same tie rule) with a handful of launches and no full sort:

* ``sla_mean_pool_kernel`` reads q and k once in their own dtype and writes block means in fp32 (for k also
  the block sums). The smooth-K pooling ``mean_pool(k - mean(k))`` equals ``mean_pool(k) - mean(k)``, and
  ``mean(k)`` is the total of the block sums over ``Lk``, so k is read once.
* Selection: ``sla_select_blocks_bisect_kernel`` finds each row's critical and negligible thresholds by
  bisection on order-preserving integer keys of the scores and writes the class row and both LUT rows in one
  pass, with the tie rule of ``blockmap.py`` (higher score first; equal scores: lower index first; NaN above
  every number). It replaced an in-register sort per row and ``torch.topk``, both measured slower
  (bench/RESULTS.md, "Block classification on the GPU").
* Transposes, both classes at once in two launches: ``sla_lut_column_counts_kernel`` counts each key block's
  critical and negligible query blocks; ``sla_lut_transpose_kernel`` then writes each column's CSR offset (the sum
  of the counts before it; the column-0 program writes the whole offsets row) and compacts the column with a
  prefix sum. No host synchronisation anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blockmap import CRITICAL, NEGLIGIBLE, BlockMap, class_counts, num_blocks
from ....settings import check_sla_config
from ..validation import check_attention_inputs
from .limits import check_triton_inputs, interpreting

# The class codes of blockmap.py, as compile-time constants of the kernels.
_CRIT = tl.constexpr(CRITICAL)
_NEGL = tl.constexpr(NEGLIGIBLE)


@triton.jit(do_not_specialize=["L"])
def sla_mean_pool_kernel(
    X, OUT, SUMS, s_x_b, s_x_h, s_x_l, L,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, STORE_SUMS: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, D)
    m_t = o_t < L
    b_x = tl.load(X + i_b * s_x_b + i_h * s_x_h + o_t[:, None] * s_x_l + o_d[None, :], mask=m_t[:, None], other=0.)
    n_real = tl.minimum(L - i_t * BT, BT).to(tl.float32)  # the last block is averaged over its real tokens
    b_sum = tl.sum(b_x.to(tl.float32), axis=0)
    tl.store(OUT + (i_bh * tl.num_programs(0) + i_t) * D + o_d, b_sum / n_real)
    if STORE_SUMS:  # block sums too: their total is k's token sum, for smooth-K without another pass
        tl.store(SUMS + (i_bh * tl.num_programs(0) + i_t) * D + o_d, b_sum)


@triton.jit(do_not_specialize=["Tm", "Tn"])
def sla_lut_column_counts_kernel(
    CLASS_MAP, COUNTS, Tm, Tn,
    BM: tl.constexpr, BN: tl.constexpr, CRIT: tl.constexpr, NEGL: tl.constexpr,
):
    # One program per (BN key blocks, batch*head): how many query blocks classed each key block critical and
    # negligible, into COUNTS (2, B*H, T_n) int32 (rows 0 and 1).
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < Tn
    n_crit = tl.zeros([BN], dtype=tl.int32)
    n_negl = tl.zeros([BN], dtype=tl.int32)
    for i_m in range(0, Tm, BM):
        o_m = i_m + tl.arange(0, BM)
        b_c = tl.load(CLASS_MAP + i_bh * Tm * Tn + o_m[:, None] * Tn + o_n[None, :],
                      mask=(o_m < Tm)[:, None] & m_n[None, :], other=0)
        if CRIT:
            n_crit += tl.sum((b_c == _CRIT).to(tl.int32), axis=0)
        if NEGL:
            n_negl += tl.sum((b_c == _NEGL).to(tl.int32), axis=0)
    if CRIT:
        tl.store(COUNTS + i_bh * Tn + o_n, n_crit, mask=m_n)
    if NEGL:
        tl.store(COUNTS + (tl.num_programs(1) + i_bh) * Tn + o_n, n_negl, mask=m_n)


@triton.jit
def _column_offset(COUNTS, OFFSETS, i_n, i_bh, Tn, BT: tl.constexpr):
    """This column's CSR offset: the sum of the counts of the columns before it. The column-0 program also writes
    the whole offsets row (``T_n + 1`` entries, from 0)."""
    o_t = tl.arange(0, BT)
    b_n = tl.load(COUNTS + i_bh * Tn + o_t, mask=o_t < Tn, other=0)
    if i_n == 0:
        tl.store(OFFSETS + i_bh * (Tn + 1) + o_t + 1, tl.cumsum(b_n, axis=0), mask=o_t < Tn)
        tl.store(OFFSETS + i_bh * (Tn + 1), 0)
    return tl.sum(tl.where(o_t < i_n, b_n, 0), axis=0)


@triton.jit
def _compact_column(b_c, o_m, m_m, cls: tl.constexpr, p_out, n_done):
    """Appends the query blocks of this chunk whose class is ``cls`` at ``p_out + n_done``; the new count."""
    m_hit = (b_c == cls) & m_m
    b_pos = tl.cumsum(m_hit.to(tl.int32), axis=0) - 1 + n_done
    tl.store(p_out + b_pos, o_m.to(tl.int32), mask=m_hit)
    return n_done + tl.sum(m_hit.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["Tm", "Tn", "crit_stride_bh", "negl_stride_bh"])
def sla_lut_transpose_kernel(
    CLASS_MAP, COUNTS, CRIT_OFF, CRIT_OUT, NEGL_OFF, NEGL_OUT, Tm, Tn, crit_stride_bh, negl_stride_bh,
    CHUNK: tl.constexpr, BT: tl.constexpr, CRIT: tl.constexpr, NEGL: tl.constexpr,
):
    # One program per (key block, batch*head): the query blocks that classed this key block critical (negligible),
    # ascending, from the column's CSR offset, by a prefix-sum compaction of the class-map column; one read of the
    # column serves both classes.
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    p_col = CLASS_MAP + i_bh * Tm * Tn + i_n
    n_bh = tl.num_programs(1)
    if CRIT:
        p_crit = CRIT_OUT + i_bh * crit_stride_bh + _column_offset(COUNTS, CRIT_OFF, i_n, i_bh, Tn, BT)
    if NEGL:
        p_negl = NEGL_OUT + i_bh * negl_stride_bh + _column_offset(COUNTS + n_bh * Tn, NEGL_OFF, i_n, i_bh, Tn, BT)
    n_crit = tl.full([], 0, tl.int32)
    n_negl = tl.full([], 0, tl.int32)
    for i_c in range(0, tl.cdiv(Tm, CHUNK)):
        o_m = i_c * CHUNK + tl.arange(0, CHUNK)
        m_m = o_m < Tm
        b_c = tl.load(p_col + o_m * Tn, mask=m_m, other=0)
        if CRIT:
            n_crit = _compact_column(b_c, o_m, m_m, _CRIT, p_crit, n_crit)
        if NEGL:
            n_negl = _compact_column(b_c, o_m, m_m, _NEGL, p_negl, n_negl)


@triton.jit(do_not_specialize=["Tn", "N_CRIT", "N_NEGL"])
def sla_select_blocks_bisect_kernel(
    SCORES, CLASS_MAP, CRIT_LUT, NEGL_LUT, Tn, N_CRIT, N_NEGL,
    BT: tl.constexpr,
):
    # One program per (batch*head, query block); the tie rule of blockmap.py. Scores become order-preserving
    # int32 keys; a bisection over the row's [min, max] key range finds a critical threshold t_c with
    # count(key >= t_c) = N_CRIT (or, inside a tie, the N_CRIT-th largest key) and a negligible threshold t_g
    # with count(key <= t_g) = N_NEGL, each step one count over the row. A search stops as soon as its count is
    # exact, which takes about log2(T_n) + a few steps for untied scores and at most 32. Ties at a threshold
    # are settled by index afterwards (critical: lower indices first; negligible: higher indices first).
    # It replaced an in-register sort of int64 (score, index) keys, which spills at T_n = 1182 (2048 keys) and
    # was slower at every size measured (bench/RESULTS.md, "Block classification on the GPU").
    i_row = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BT)
    m_n = o_n < Tn
    b_s = tl.load(SCORES + i_row * Tn + o_n, mask=m_n, other=0.) + 0.  # +0.0: -0.0 ties with +0.0
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_bits = tl.where(b_s != b_s, 0x7FC00000, b_bits)  # every NaN -> the positive quiet NaN, above +inf
    b_key = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)  # int32, ordered as the scores
    # Padding lanes get keys that no threshold counts: below every key for ">=", above for "<=".
    b_key_c = tl.where(m_n, b_key, -2147483648)
    b_key_g = tl.where(m_n, b_key, 2147483647)
    row_min = tl.min(b_key_g, axis=0).to(tl.int64)
    row_max = tl.max(b_key_c, axis=0).to(tl.int64)
    # Invariants (int64 scalars, so midpoints never overflow): count(key >= lo_c) >= N_CRIT > count(key >= hi_c + 1)
    # and count(key <= hi_g) >= N_NEGL > count(key <= lo_g - 1). No negligible blocks: nothing to search.
    lo_c, hi_c = row_min, row_max
    lo_g, hi_g = row_min, tl.where(N_NEGL > 0, row_max, row_min)
    while (lo_c < hi_c) | (lo_g < hi_g):
        mid_c = (lo_c + hi_c + 1) >> 1
        n_c = tl.sum((b_key_c >= mid_c.to(tl.int32)).to(tl.int32), axis=0)
        hi_c = tl.where(n_c > N_CRIT, hi_c, tl.where(n_c == N_CRIT, mid_c, mid_c - 1))
        lo_c = tl.where(n_c >= N_CRIT, mid_c, lo_c)
        mid_g = (lo_g + hi_g) >> 1
        n_g = tl.sum((b_key_g <= mid_g.to(tl.int32)).to(tl.int32), axis=0)
        lo_g = tl.where(n_g < N_NEGL, mid_g + 1, tl.where(n_g == N_NEGL, mid_g, lo_g))
        hi_g = tl.where(n_g >= N_NEGL, mid_g, hi_g)
    t_c = lo_c.to(tl.int32)
    t_g = lo_g.to(tl.int32)
    # count(key > t) <= N_CRIT <= count(key >= t): the keys above t, then the lowest-index ties at t.
    m_tie = b_key_c == t_c
    n_tie_needed = N_CRIT - tl.sum((b_key_c > t_c).to(tl.int32), axis=0)
    m_crit = (b_key_c > t_c) | (m_tie & (tl.cumsum(m_tie.to(tl.int32), axis=0) <= n_tie_needed))
    m_tie = b_key_g == t_g
    n_tie_needed = N_NEGL - tl.sum((b_key_g < t_g).to(tl.int32), axis=0)
    rank_from_top = tl.sum(m_tie.to(tl.int32), axis=0) - tl.cumsum(m_tie.to(tl.int32), axis=0) + m_tie.to(tl.int32)
    m_negl = (N_NEGL > 0) & ((b_key_g < t_g) | (m_tie & (rank_from_top <= n_tie_needed)))
    b_cls = tl.where(m_crit, 1, tl.where(m_negl, -1, 0))
    tl.store(CLASS_MAP + i_row * Tn + o_n, b_cls.to(tl.int8), mask=m_n)
    b_pos = tl.cumsum(m_crit.to(tl.int32), axis=0) - 1
    tl.store(CRIT_LUT + i_row * N_CRIT + b_pos, o_n, mask=m_crit)
    b_pos = tl.cumsum(m_negl.to(tl.int32), axis=0) - 1
    tl.store(NEGL_LUT + i_row * N_NEGL + b_pos, o_n, mask=m_negl)


def _select_blocks(scores: torch.Tensor, n_crit: int, n_negl: int, num_warps: int = 2):
    """Class map ``(B, H, T_m, T_n)`` int8 and the critical / negligible LUTs (ascending) of each row.
    ``num_warps``: 2, the best of 2/4/8 in the measurements (bench/RESULTS.md, "Measurements behind code
    choices")."""
    B, H, Tm, Tn = scores.shape
    class_map = torch.empty(B, H, Tm, Tn, dtype=torch.int8, device=scores.device)
    crit_lut = torch.empty(B, H, Tm, n_crit, dtype=torch.int32, device=scores.device)
    negl_lut = torch.empty(B, H, Tm, n_negl, dtype=torch.int32, device=scores.device)
    sla_select_blocks_bisect_kernel[(B * H * Tm,)](
        scores, class_map, crit_lut, negl_lut, Tn, n_crit, n_negl, BT=triton.next_power_of_2(Tn),
        **({} if interpreting() else {"num_warps": num_warps}))
    return class_map, crit_lut, negl_lut


def _mean_pool(x: torch.Tensor, block: int, with_sums: bool = False):
    """Block means ``(B, H, nb, D)`` fp32, and with ``with_sums`` the block sums as well."""
    B, H, L, D = x.shape
    nb = num_blocks(L, block)
    out = torch.empty(B, H, nb, D, dtype=torch.float32, device=x.device)
    sums = torch.empty_like(out) if with_sums else out  # placeholder pointer when not stored
    sla_mean_pool_kernel[(nb, B * H)](x, out, sums, x.stride(0), x.stride(1), x.stride(2), L, H=H, D=D, BT=block,
                                      STORE_SUMS=with_sums)
    return (out, sums) if with_sums else out


def _block_scores(pq: torch.Tensor, pk: torch.Tensor, k_block_sums: torch.Tensor, Lk: int) -> torch.Tensor:
    """fp32 scores ``pool(q) @ (pool(k) - mean(k))^T`` ``(B, H, T_m, T_n)``, contiguous, with smooth-K's mean(k)
    from k's block sums: two launches besides the matmul, as the builder is bound by launch overhead at
    T_n = 512 (bench/RESULTS.md)."""
    k_sum = k_block_sums.sum(dim=2, keepdim=True)
    # fp32 also under an enclosing autocast: a bf16 matmul would change the ranking, and the selection kernel
    # reads fp32 bit patterns.
    with torch.autocast(pq.device.type, enabled=False):
        return (pq @ torch.sub(pk, k_sum, alpha=1.0 / Lk).transpose(-1, -2)).contiguous()


def _lut_transposes(class_map: torch.Tensor, n_crit: int, n_negl: int, crit: bool, negl: bool):
    """CSR transposes of the critical and negligible LUTs, each as offsets ``(B, H, T_n + 1)`` and query-block
    indices ``(B, H, T_m * count)`` int32, in two launches for both (the class map read twice); a transpose not asked
    for is a pair of size-0 tensors. Columns are read with stride T_n; compacting a contiguous transposed copy
    instead was no faster (bench/RESULTS.md, "Block classification on the GPU")."""
    B, H, Tm, Tn = class_map.shape
    dev = class_map.device

    def pair(count, built):  # two distinct tensors: a custom op's outputs must not alias each other
        if not built:
            return torch.empty(B, H, 0, dtype=torch.int32, device=dev), torch.empty(B, H, 0, dtype=torch.int32,
                                                                                   device=dev)
        return (torch.empty(B, H, Tn + 1, dtype=torch.int32, device=dev),
                torch.empty(B, H, Tm * count, dtype=torch.int32, device=dev))

    ct_off, ct = pair(n_crit, crit)
    nt_off, nt = pair(n_negl, negl)
    # A class with no blocks (count 0) still gets its offsets (all zero) from the kernels; nothing to compact.
    if crit or negl:
        counts = torch.empty(2, B * H, Tn, dtype=torch.int32, device=dev)
        BN = min(128, triton.next_power_of_2(Tn))
        sla_lut_column_counts_kernel[(triton.cdiv(Tn, BN), B * H)](class_map, counts, Tm, Tn, BM=32, BN=BN, CRIT=crit,
                                                                   NEGL=negl)
        sla_lut_transpose_kernel[(Tn, B * H)](class_map, counts, ct_off, ct, nt_off, nt, Tm, Tn, Tm * n_crit,
                                              Tm * n_negl, CHUNK=min(1024, triton.next_power_of_2(Tm)),
                                              BT=triton.next_power_of_2(Tn), CRIT=crit, NEGL=negl)
    return ct_off, ct, nt_off, nt


@torch.library.custom_op("sla::triton_block_map", mutates_args=())
def sla_triton_block_map(
    q: torch.Tensor, k: torch.Tensor, critical: float, negligible: float, block_q: int, block_k: int, transposes: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The builder's launches as one op, so that eager and ``torch.compile`` runs use the same kernels (a compiled
    run once traced the PyTorch builder, which agrees only up to fp32 rounding). Returns the :class:`BlockMap`'s
    tensors in field order: class map, critical LUT, negligible LUT, the critical transpose's offsets and indices,
    the negligible transpose's offsets and indices (size-0 int32 where ``transposes`` skips them). Inputs are
    checked by :func:`build_block_map_triton`."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    n_crit, n_negl = class_counts(critical, negligible, num_blocks(Lk, block_k))
    scores = _block_scores(_mean_pool(q, block_q), *_mean_pool(k, block_k, with_sums=True), Lk)
    class_map, crit_lut, negl_lut = _select_blocks(scores, n_crit, n_negl)

    ct_off, ct, nt_off, nt = _lut_transposes(class_map, n_crit, n_negl, transposes != "none", transposes == "all")
    return class_map, crit_lut, negl_lut, ct_off, ct, nt_off, nt


@sla_triton_block_map.register_fake
def _(q, k, critical, negligible, block_q, block_k, transposes):
    B, H, Lq, _ = q.shape
    Tm, Tn = num_blocks(Lq, block_q), num_blocks(k.shape[2], block_k)
    n_crit, n_negl = class_counts(critical, negligible, Tn)

    def int32(*shape):
        return q.new_empty(shape, dtype=torch.int32)

    def transpose(count, built):  # CSR offsets and indices, or two size-0 tensors
        return (int32(B, H, Tn + 1), int32(B, H, Tm * count)) if built else (int32(B, H, 0), int32(B, H, 0))

    return (q.new_empty(B, H, Tm, Tn, dtype=torch.int8), int32(B, H, Tm, n_crit), int32(B, H, Tm, n_negl),
            *transpose(n_crit, transposes != "none"), *transpose(n_negl, transposes == "all"))


@torch.no_grad()
def build_block_map_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    transposes: str = "all",
) -> BlockMap:
    """GPU version of :func:`sla.build_block_map` (same arguments, same result up to fp32 score rounding).

    q ``(B, H, Lq, D)`` and k ``(B, H, Lk, D)`` with a contiguous last dim (other strides free), on CUDA or
    on CPU under ``TRITON_INTERPRET=1``. Runs the op ``sla::triton_block_map``, in eager mode and under
    ``torch.compile`` alike (the same kernels, so the same map).

    ``transposes``: which CSR transposes (per key block) to build. ``"all"`` (default) gives the complete map;
    ``"critical"`` only the critical one, all that the backward kernels read; ``"none"`` neither, all that
    the forward kernels need (inference). Transposes not built are size-0 int32 tensors: such a map is for the
    SLA op's own use and must not reach a backward pass (the Triton op raises if it would).
    """
    if transposes not in ("all", "critical", "none"):
        raise ValueError(f"transposes must be 'all', 'critical' or 'none', got {transposes!r}")
    check_attention_inputs(q, k, k)
    check_sla_config(critical, negligible, block_q, block_k, "softmax", "marginal")
    check_triton_inputs(q, block_q, block_k)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    fields = sla_triton_block_map(q, k, float(critical), float(negligible), block_q, block_k, transposes)
    class_map, crit_lut, negl_lut, ct_off, ct, nt_off, nt = fields
    return BlockMap(class_map=class_map, critical_lut=crit_lut, negligible_lut=negl_lut,
                    critical_lut_t_offsets=ct_off, critical_lut_t=ct, negligible_lut_t_offsets=nt_off,
                    negligible_lut_t=nt, seq_len_q=q.shape[2], seq_len_k=k.shape[2], block_q=block_q,
                    block_k=block_k)
