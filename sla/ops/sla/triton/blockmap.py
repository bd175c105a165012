"""SLA's block classification on the GPU: pooling, scores, per-row selection and the LUT transposes.

Computes the same :class:`~sla.ops.sla.blockmap.BlockMap` as :func:`sla.build_block_map` (same scores up
to fp32 rounding, same counts, same tie rule) in three launches, with no host synchronisation and no
atomics (the result is bitwise reproducible and the builder can be captured in a CUDA graph):

1. ``sla_block_pool_kernel`` (one program per query block and per key block): reads q and k once in their
   own dtype and writes the fp32 block means ``pool(q)`` ``(B*H, T_m, D)`` and ``pool(k)`` ``(B*H, T_n, D)``.
   A short last block is averaged over its real tokens.
2. ``sla_score_select_kernel`` (one program per ``R`` query-block rows of one head):

   * smooth-K scores ``pool(q) . (pool(k) - mean(k))`` in fp32. ``mean_pool(k - mean(k))`` equals
     ``pool(k) - mean(k)``, and ``mean(k)`` is the token-count-weighted mean of the block means, so every
     program derives it from the ``(DK, T_n)`` slices of ``pool(k)`` it loads for the ``tl.dot`` anyway
     (``input_precision="ieee"``: fp32 FMA, no tf32). The ``R x T_n`` scores stay in registers.
   * selection without sorting: each score is mapped to an int32 whose order is the float order (NaN above
     +inf, -0.0 equal to +0.0), and two 32-step bisections (packed into one row sum per step) find the
     ``n_crit``-th largest and the ``n_negl``-th smallest value of each row. Blocks strictly beyond a
     threshold are in; among blocks equal to it, a prefix sum admits the lowest indices (critical) or the
     highest (negligible): the tie rule of ``blockmap.py`` (higher score first, equal scores lower index
     first), with counts exactly ``class_counts``.
   * writes the class row, both LUT rows (ascending, by a prefix sum over the row) and, for the
     transposes, how many critical/negligible entries each key block has within these ``R`` rows.

   Launch shapes per padded row length: :func:`select_config`. Rows of more than ``MAX_SORT_BLOCKS`` key
   blocks (too long for registers) are scored in PyTorch and ranked with ``torch.topk`` instead, on int64
   keys with the same order (score, then lower index); the transpose kernel is shared.
3. ``sla_lut_transpose_kernel`` (one program per chunk of key blocks and group of query-block rows):
   both classes' CSR transposes. The offsets of a key block come from the per-row-group counts of step 2
   (sum over groups, prefix over key blocks); each column's entries are then placed by a prefix sum down
   the class map, so they come out in ascending query-block order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..blockmap import CRITICAL, NEGLIGIBLE, BlockMap, class_counts, num_blocks
from ..validation import check_attention_inputs, check_sla_config
from .ops import check_triton_inputs

# Rows longer than this are ranked with torch.topk: the fused kernel holds a row-block's R x T_n scores
# (padded to a power of two) in registers and a (16, T_n) fp32 tile of pool(k) in shared memory.
MAX_SORT_BLOCKS = 2048

# Key blocks per program of the transpose kernel, and query-block rows per program (a multiple of every R
# of the select kernel and of the topk path's row grouping).
_TRANSPOSE_COLS = 64
_TRANSPOSE_ROWS = 256
_TRANSPOSE_TILE_ROWS = 64
_TOPK_PARTIAL_ROWS = 64
_TRANSPOSE_COUNT_TILE = 32  # row groups of partial counts summed per step by the transpose kernel


@triton.jit
def _pool_one_block(X, s_x_l, L, i_blk, OUT, D: tl.constexpr, BLOCK: tl.constexpr, TOK: tl.constexpr):
    o_d = tl.arange(0, D)
    b_sum = tl.zeros([D], dtype=tl.float32)
    for i_c in tl.static_range(BLOCK // TOK):
        o_t = i_blk * BLOCK + i_c * TOK + tl.arange(0, TOK)
        b_x = tl.load(X + o_t[:, None].to(tl.int64) * s_x_l + o_d[None, :], mask=(o_t < L)[:, None], other=0.)
        b_sum += tl.sum(b_x.to(tl.float32), axis=0)
    n_real = tl.minimum(L - i_blk * BLOCK, BLOCK).to(tl.float32)  # a short last block: its real tokens only
    tl.store(OUT + o_d, b_sum / n_real)


@triton.jit(do_not_specialize=["Lq", "Lk", "Tm", "Tn", "H"])
def sla_block_pool_kernel(
    Q, K, PQ, PK, s_q_b, s_q_h, s_q_l, s_k_b, s_k_h, s_k_l, Lq, Lk, Tm, Tn, H,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, TOK: tl.constexpr,
):
    # Programs [0, Tm) pool query blocks, [Tm, Tm + Tn) key blocks: one launch for both tensors.
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    if i_t < Tm:
        _pool_one_block(Q + i_b * s_q_b + i_h * s_q_h, s_q_l, Lq, i_t, PQ + (i_bh * Tm + i_t) * D, D, BQ, TOK)
    else:
        i_k = i_t - Tm
        _pool_one_block(K + i_b * s_k_b + i_h * s_k_h, s_k_l, Lk, i_k, PK + (i_bh * Tn + i_k) * D, D, BK, TOK)


@triton.jit(do_not_specialize=["Tm", "Tn", "Lk", "N_CRIT", "N_NEGL", "P", "NCH"])
def sla_score_select_kernel(
    PQ, PK, CLASS_MAP, CRIT_LUT, NEGL_LUT, COL_COUNTS, CHUNK_COUNTS,
    Tm, Tn, Lk, N_CRIT, N_NEGL, P, NCH,
    D: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, DK: tl.constexpr,
    CJ: tl.constexpr, PRECISION: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_r = i_p * R + tl.arange(0, R)
    m_r = o_r < Tm
    o_n = tl.arange(0, BT)
    m_n = o_n < Tn
    n_tok = tl.where(m_n, tl.minimum(Lk - o_n * BK, BK), 0).to(tl.float32)  # real tokens per key block

    # Scores [R, BT] = pool(q) . (pool(k) - mean(k)), accumulated over slices of the head dim. Each slice's
    # mean(k) comes from the same (DK, BT) tile of pool(k) the dot consumes, so k is never re-read.
    b_s = tl.zeros([R, BT], dtype=tl.float32)
    for i_d in range(0, D // DK):
        o_d = i_d * DK + tl.arange(0, DK)
        b_k = tl.load(PK + (i_bh * Tn + o_n[None, :]) * D + o_d[:, None], mask=m_n[None, :], other=0.)  # [DK, BT]
        b_mean = tl.sum(b_k * n_tok[None, :], axis=1) / Lk
        b_k = tl.where(m_n[None, :], b_k - b_mean[:, None], 0.)
        b_q = tl.load(PQ + (i_bh * Tm + o_r[:, None]) * D + o_d[None, :], mask=m_r[:, None], other=0.)  # [R, DK]
        b_s = tl.dot(b_q, b_k, b_s, input_precision=PRECISION)

    # int32 with the order of the floats: -0.0 -> +0.0 (they tie in the reference), every NaN -> the positive
    # quiet NaN, which lands above +inf (torch's descending sort puts NaN first). Padding sits below -inf.
    b_s = b_s + 0.
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_bits = tl.where(b_s != b_s, 0x7FC00000, b_bits)
    b_ord = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)
    b_ord = tl.where(m_n[None, :], b_ord, -2147483647)

    # Bisection for t_c = the N_CRIT-th largest value (largest v with #(ord >= v) >= N_CRIT) and t_n = the
    # N_NEGL-th smallest (the (Tn - N_NEGL + 1)-th largest), both counts packed into one int32 row sum
    # (each count <= BT < 2^16). Alongside: #(ord >= lo) and #(ord > hi), so no recount is needed after.
    tgt_c = N_CRIT
    tgt_n = Tn - N_NEGL + 1
    lo_c = tl.full([R], -2147483648, tl.int64)
    hi_c = tl.full([R], 2147483647, tl.int64)
    lo_n = tl.full([R], -2147483648, tl.int64)
    hi_n = tl.full([R], 2147483647, tl.int64)
    above_c = tl.zeros([R], dtype=tl.int32)  # #(ord > hi_c)
    above_n = tl.zeros([R], dtype=tl.int32)
    at_lo_n = tl.zeros([R], dtype=tl.int32) + Tn  # #(ord >= lo_n) once lo_n has moved
    for _ in range(32):
        mid_c = (lo_c + hi_c + 1) >> 1
        mid_n = (lo_n + hi_n + 1) >> 1
        b_ge = (b_ord >= mid_c.to(tl.int32)[:, None]).to(tl.int32) \
            + ((b_ord >= mid_n.to(tl.int32)[:, None]).to(tl.int32) << 16)
        b_cnt = tl.sum(b_ge, axis=1)
        cnt_c = b_cnt & 0xFFFF
        cnt_n = b_cnt >> 16
        ok_c = cnt_c >= tgt_c
        ok_n = cnt_n >= tgt_n
        lo_c = tl.where(ok_c, mid_c, lo_c)
        hi_c = tl.where(ok_c, hi_c, mid_c - 1)
        above_c = tl.where(ok_c, above_c, cnt_c)
        lo_n = tl.where(ok_n, mid_n, lo_n)
        hi_n = tl.where(ok_n, hi_n, mid_n - 1)
        above_n = tl.where(ok_n, above_n, cnt_n)
        at_lo_n = tl.where(ok_n, cnt_n, at_lo_n)
    t_c = lo_c.to(tl.int32)[:, None]
    t_n = lo_n.to(tl.int32)[:, None]
    need_c = (N_CRIT - above_c)[:, None]  # how many of the blocks equal to t_c are critical
    n_eq_n = (at_lo_n - above_n)[:, None]
    need_n = (N_NEGL - (Tn - at_lo_n))[:, None]  # how many of the blocks equal to t_n are negligible

    # Ties at a threshold: lowest indices are critical, highest negligible (rank among equals, one scan). From
    # here on one packed tile (critical | negligible << 16) carries both classes, so at most two [R, BT] tiles are
    # live at a time (register pressure at long rows).
    m_eq_c = b_ord == t_c
    m_eq_n = (b_ord == t_n) & m_n[None, :]
    b_rank = tl.cumsum(m_eq_c.to(tl.int32) + (m_eq_n.to(tl.int32) << 16), axis=1)
    m_crit = (b_ord > t_c) | (m_eq_c & ((b_rank & 0xFFFF) <= need_c))
    m_negl = ((b_ord < t_n) & m_n[None, :]) | (m_eq_n & ((b_rank >> 16) > n_eq_n - need_n))
    b_both = tl.where(m_r[:, None], m_crit.to(tl.int32) + ((m_negl & (N_NEGL > 0)).to(tl.int32) << 16), 0)

    b_cls = tl.where((b_both & 0xFFFF) != 0, 1, tl.where(b_both != 0, -1, 0)).to(tl.int8)
    tl.store(CLASS_MAP + (i_bh * Tm + o_r[:, None]) * Tn + o_n[None, :], b_cls, mask=m_r[:, None] & m_n[None, :])
    b_pos = tl.cumsum(b_both, axis=1)  # LUT slot + 1 of each critical (low half) and negligible (high) block
    b_idx = tl.broadcast_to(o_n[None, :], [R, BT])
    tl.store(CRIT_LUT + (i_bh * Tm + o_r[:, None]) * N_CRIT + (b_pos & 0xFFFF) - 1, b_idx,
             mask=(b_both & 0xFFFF) != 0)
    tl.store(NEGL_LUT + (i_bh * Tm + o_r[:, None]) * N_NEGL + (b_pos >> 16) - 1, b_idx, mask=(b_both >> 16) != 0)

    # Per key block: critical (low 16 bits) and negligible (high) entries within these R rows, and the same
    # summed over chunks of CJ key blocks; the transpose kernel turns them into CSR offsets.
    b_col = tl.sum(b_both, axis=0)  # [BT]
    tl.store(COL_COUNTS + (i_bh * P + i_p) * Tn + o_n, b_col, mask=m_n)
    b_chunk = tl.sum(tl.reshape(b_col, [BT // CJ, CJ]), axis=1)
    o_ch = tl.arange(0, BT // CJ)
    tl.store(CHUNK_COUNTS + (i_bh * P + i_p) * NCH + o_ch, b_chunk, mask=o_ch < NCH)


@triton.jit(do_not_specialize=["Tm", "Tn", "N_CRIT", "N_NEGL", "P", "NCH"])
def sla_lut_transpose_kernel(
    CLASS_MAP, COL_COUNTS, CHUNK_COUNTS, CRIT_OFF, CRIT_T, NEGL_OFF, NEGL_T,
    Tm, Tn, N_CRIT, N_NEGL, P, NCH,
    PR: tl.constexpr, CJ: tl.constexpr, GR: tl.constexpr, RB: tl.constexpr, PB: tl.constexpr,
    NCH_PAD: tl.constexpr,
):
    # Program (c, g, bh): key blocks [c*CJ, (c+1)*CJ) of query-block rows [g*GR, (g+1)*GR). COL_COUNTS and
    # CHUNK_COUNTS hold packed (critical | negligible << 16) counts per group of PR rows.
    i_c = tl.program_id(0)
    i_g = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    o_j = i_c * CJ + tl.arange(0, CJ)
    m_j = o_j < Tn
    o_ch = tl.arange(0, NCH_PAD)

    base_c = tl.full([], 0, tl.int32)  # entries of all key blocks before this chunk
    base_n = tl.full([], 0, tl.int32)
    tot_c = tl.zeros([CJ], dtype=tl.int32)  # entries per key block of this chunk
    tot_n = tl.zeros([CJ], dtype=tl.int32)
    pre_c = tl.zeros([CJ], dtype=tl.int32)  # of which in rows before this program's group
    pre_n = tl.zeros([CJ], dtype=tl.int32)
    for i_p0 in range(0, P, PB):
        o_p = i_p0 + tl.arange(0, PB)
        m_p = o_p < P
        b_ch = tl.load(CHUNK_COUNTS + (i_bh * P + o_p[:, None]) * NCH + o_ch[None, :],
                       mask=m_p[:, None] & (o_ch < i_c)[None, :], other=0)
        base_c += tl.sum(tl.sum(b_ch & 0xFFFF, axis=1), axis=0)
        base_n += tl.sum(tl.sum(b_ch >> 16, axis=1), axis=0)
        b_col = tl.load(COL_COUNTS + (i_bh * P + o_p[:, None]) * Tn + o_j[None, :],
                        mask=m_p[:, None] & m_j[None, :], other=0)
        b_lo, b_hi = b_col & 0xFFFF, b_col >> 16
        tot_c += tl.sum(b_lo, axis=0)
        tot_n += tl.sum(b_hi, axis=0)
        m_before = (o_p < i_g * (GR // PR))[:, None]
        pre_c += tl.sum(tl.where(m_before, b_lo, 0), axis=0)
        pre_n += tl.sum(tl.where(m_before, b_hi, 0), axis=0)
    end_c = base_c + tl.cumsum(tot_c, axis=0)  # CSR offset of key block j + 1
    end_n = base_n + tl.cumsum(tot_n, axis=0)
    if i_g == 0:
        tl.store(CRIT_OFF + i_bh * (Tn + 1) + 1 + o_j, end_c, mask=m_j)
        tl.store(NEGL_OFF + i_bh * (Tn + 1) + 1 + o_j, end_n, mask=m_j)
        if i_c == 0:
            tl.store(CRIT_OFF + i_bh * (Tn + 1), 0)
            tl.store(NEGL_OFF + i_bh * (Tn + 1), 0)

    # Place this group's entries: next free slot of each key block, advanced by a prefix sum down the rows.
    b_next_c = end_c - tot_c + pre_c
    b_next_n = end_n - tot_n + pre_n
    for i_r in tl.static_range(GR // RB):
        o_i = i_g * GR + i_r * RB + tl.arange(0, RB)
        m_i = o_i < Tm
        b_cls = tl.load(CLASS_MAP + (i_bh * Tm + o_i[:, None]) * Tn + o_j[None, :],
                        mask=m_i[:, None] & m_j[None, :], other=0)
        m_crit = b_cls == 1
        m_negl = b_cls == -1
        b_rank = tl.cumsum(m_crit.to(tl.int32) + (m_negl.to(tl.int32) << 16), axis=0)
        b_row = tl.broadcast_to(o_i[:, None], [RB, CJ])
        tl.store(CRIT_T + i_bh * Tm * N_CRIT + b_next_c[None, :] + (b_rank & 0xFFFF) - 1, b_row, mask=m_crit)
        tl.store(NEGL_T + i_bh * Tm * N_NEGL + b_next_n[None, :] + (b_rank >> 16) - 1, b_row, mask=m_negl)
        b_next_c += tl.sum(m_crit.to(tl.int32), axis=0)
        b_next_n += tl.sum(m_negl.to(tl.int32), axis=0)


@dataclass(frozen=True)
class SelectConfig:
    """Launch shape of ``sla_score_select_kernel`` for rows padded to ``BT`` key blocks.

    ``rows``: query-block rows per program (a power of two, 8 to 256); ``dk``: head-dim slice per dot step
    (the ``(dk, BT)`` fp32 tile of ``pool(k)`` is the kernel's shared-memory footprint);
    ``precision``: ``tl.dot`` input precision (``"ieee"`` = fp32 FMA, the reference's arithmetic).
    """

    rows: int
    dk: int
    num_warps: int
    num_stages: int = 1
    precision: str = "ieee"


def select_config(bt: int) -> SelectConfig:
    """Default :class:`SelectConfig` per padded row length (bench/bench_blockmap.py sweeps alternatives)."""
    if bt <= 256:
        return SelectConfig(rows=32, dk=32, num_warps=4)
    if bt <= 512:
        return SelectConfig(rows=32, dk=32, num_warps=8)
    if bt <= 1024:
        return SelectConfig(rows=16, dk=16, num_warps=8)
    return SelectConfig(rows=16, dk=16, num_warps=16)


def _ranking_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is ``blockmap.py``'s ranking: score, then lower index first."""
    Tn = scores.shape[-1]
    # +0.0 turns -0.0 into +0.0 (they tie in the reference); every NaN becomes the positive quiet NaN, which
    # the mapping below puts above +inf, as torch's descending sort does.
    s = torch.where(torch.isnan(scores), torch.full_like(scores, float("nan")), scores + 0.0)
    bits = s.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    idx = torch.arange(Tn, device=scores.device, dtype=torch.int64)
    return (ordered << 32) | (Tn - 1 - idx)


def _select_with_topk(pq, pk, Lk, block_k, n_crit, n_negl, Tm, Tn, NCH):
    """Rows too long for the fused kernel: PyTorch scores and ``torch.topk`` on the ranking keys, plus the
    per-row-group counts the transpose kernel needs. Returns class map, LUTs and counts, all on the device."""
    BH = pq.shape[0]
    dev = pq.device
    lengths = torch.clamp(Lk - block_k * torch.arange(Tn, device=dev, dtype=torch.float32), max=float(block_k))
    k_mean = (pk * lengths[:, None]).sum(dim=1, keepdim=True) / Lk
    keys = _ranking_keys(torch.bmm(pq, (pk - k_mean).transpose(1, 2)))
    crit = torch.topk(keys, n_crit, dim=-1, sorted=False).indices
    class_map = torch.zeros(BH, Tm, Tn, dtype=torch.int8, device=dev)
    class_map.scatter_(-1, crit, CRITICAL)
    crit_lut = torch.sort(crit, dim=-1).values.to(torch.int32)
    if n_negl:
        negl = torch.topk(keys, n_negl, dim=-1, largest=False, sorted=False).indices
        class_map.scatter_(-1, negl, NEGLIGIBLE)
        negl_lut = torch.sort(negl, dim=-1).values.to(torch.int32)
    else:
        negl_lut = torch.empty(BH, Tm, 0, dtype=torch.int32, device=dev)
    PR = _TOPK_PARTIAL_ROWS
    P = num_blocks(Tm, PR)
    padded = torch.nn.functional.pad(class_map, (0, 0, 0, P * PR - Tm)).view(BH, P, PR, Tn)
    col_counts = (padded == CRITICAL).sum(2, dtype=torch.int32) \
        + ((padded == NEGLIGIBLE).sum(2, dtype=torch.int32) << 16)  # packed like the select kernel's counts
    cj = _TRANSPOSE_COLS
    chunk_counts = torch.nn.functional.pad(col_counts, (0, NCH * cj - Tn)).view(BH, P, NCH, cj)
    chunk_counts = chunk_counts.sum(-1, dtype=torch.int32)
    return class_map, crit_lut, negl_lut, col_counts, chunk_counts, PR, P


def _build_block_map(q, k, critical, negligible, block_q, block_k, config: SelectConfig | None = None) -> BlockMap:
    """The builder behind :func:`build_block_map_triton`; ``config`` overrides the select kernel's launch
    shape (used by the benchmark's sweep)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BH = B * H
    dev = q.device
    Tm, Tn = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    n_crit, n_negl = class_counts(critical, negligible, Tn)
    interpreting = dev.type == "cpu"

    pq = torch.empty(BH, Tm, D, dtype=torch.float32, device=dev)
    pk = torch.empty(BH, Tn, D, dtype=torch.float32, device=dev)
    tok = min(64, block_q, block_k)
    sla_block_pool_kernel[(Tm + Tn, BH)](
        q, k, pq, pk, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), Lq, Lk, Tm, Tn, H,
        D=D, BQ=block_q, BK=block_k, TOK=tok, **({} if interpreting else {"num_warps": 4}))

    if Tn <= MAX_SORT_BLOCKS:
        bt = max(16, triton.next_power_of_2(Tn))
        cfg = config or select_config(bt)
        if cfg.rows < 8 or _TRANSPOSE_ROWS % cfg.rows:
            raise ValueError(f"SelectConfig.rows={cfg.rows}: rows per program must be a power of two >= 8 that divides "
                             f"{_TRANSPOSE_ROWS} (the transpose kernel's row group); use 8, 16, 32, 64, 128 or 256")
        cj = min(_TRANSPOSE_COLS, bt)
        NCH = num_blocks(Tn, cj)
        PR = cfg.rows
        P = num_blocks(Tm, PR)
        class_map = torch.empty(BH, Tm, Tn, dtype=torch.int8, device=dev)
        crit_lut = torch.empty(BH, Tm, n_crit, dtype=torch.int32, device=dev)
        negl_lut = torch.empty(BH, Tm, n_negl, dtype=torch.int32, device=dev)
        col_counts = torch.empty(BH, P, Tn, dtype=torch.int32, device=dev)
        chunk_counts = torch.empty(BH, P, NCH, dtype=torch.int32, device=dev)
        launch = {} if interpreting else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        sla_score_select_kernel[(P, BH)](
            pq, pk, class_map, crit_lut, negl_lut, col_counts, chunk_counts,
            Tm, Tn, Lk, n_crit, n_negl, P, NCH,
            D=D, BK=block_k, R=cfg.rows, BT=bt, DK=min(cfg.dk, D), CJ=cj, PRECISION=cfg.precision, **launch)
    else:
        cj = _TRANSPOSE_COLS
        NCH = num_blocks(Tn, cj)
        class_map, crit_lut, negl_lut, col_counts, chunk_counts, PR, P = _select_with_topk(
            pq, pk, Lk, block_k, n_crit, n_negl, Tm, Tn, NCH)

    ct_off = torch.empty(BH, Tn + 1, dtype=torch.int32, device=dev)
    ct = torch.empty(BH, Tm * n_crit, dtype=torch.int32, device=dev)
    nt_off = torch.empty(BH, Tn + 1, dtype=torch.int32, device=dev)
    nt = torch.empty(BH, Tm * n_negl, dtype=torch.int32, device=dev)
    sla_lut_transpose_kernel[(NCH, num_blocks(Tm, _TRANSPOSE_ROWS), BH)](
        class_map, col_counts, chunk_counts, ct_off, ct, nt_off, nt, Tm, Tn, n_crit, n_negl, P, NCH,
        PR=PR, CJ=cj, GR=_TRANSPOSE_ROWS, RB=_TRANSPOSE_TILE_ROWS, PB=_TRANSPOSE_COUNT_TILE,
        NCH_PAD=triton.next_power_of_2(NCH),
        **({} if interpreting else {"num_warps": 4}))

    return BlockMap(class_map=class_map.view(B, H, Tm, Tn), critical_lut=crit_lut.view(B, H, Tm, n_crit),
                    negligible_lut=negl_lut.view(B, H, Tm, n_negl), critical_lut_t_offsets=ct_off.view(B, H, Tn + 1),
                    critical_lut_t=ct.view(B, H, Tm * n_crit), negligible_lut_t_offsets=nt_off.view(B, H, Tn + 1),
                    negligible_lut_t=nt.view(B, H, Tm * n_negl), seq_len_q=Lq, seq_len_k=Lk, block_q=block_q,
                    block_k=block_k)


@torch.no_grad()
def build_block_map_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
) -> BlockMap:
    """GPU version of :func:`sla.build_block_map` (same arguments, same result up to fp32 score rounding).

    q ``(B, H, Lq, D)`` and k ``(B, H, Lk, D)`` with a contiguous last dim (other strides free, e.g. a
    ``(B, L, H, D)`` tensor viewed as ``(B, H, L, D)``), on CUDA or on CPU under ``TRITON_INTERPRET=1``.
    Three kernel launches, no host synchronisation, deterministic. (Rows of more than ``MAX_SORT_BLOCKS`` key
    blocks are scored and ranked with PyTorch ops and ``torch.topk`` instead of the fused kernel: more launches,
    same map.)
    """
    check_attention_inputs(q, k, k)
    check_sla_config(critical, negligible, block_q, block_k, "softmax", "marginal")
    check_triton_inputs(q, block_q, block_k)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return _build_block_map(q, k, critical, negligible, block_q, block_k)
