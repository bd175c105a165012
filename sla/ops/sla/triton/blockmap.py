"""SLA's block classification on the GPU: pooling, scores, per-row selection and the LUT transposes.

Computes the same :class:`~sla.ops.sla.blockmap.BlockMap` as :func:`sla.build_block_map` (same scores up
to fp32 rounding, same counts, same tie rule) with a handful of launches and no full sort:

* ``sla_mean_pool_kernel`` reads q and k once in their own dtype and writes block means in fp32 (for k also
  the block sums). The smooth-K pooling ``mean_pool(k - mean(k))`` equals ``mean_pool(k) - mean(k)``, and
  ``mean(k)`` is the total of the block sums over ``Lk``, so k is read once.
* Selection: ``sla_select_blocks_bisect_kernel`` finds each row's critical and negligible thresholds by
  bisection on order-preserving integer keys of the scores and writes the class row and both LUT rows in one
  pass, with the tie rule of ``blockmap.py`` (higher score first; equal scores: lower index first; NaN above
  every number). An in-register sort per row (``sla_select_blocks_kernel``) and ``torch.topk`` give the same
  map and remain for the benchmark's A/B (``SELECTION_METHOD_OVERRIDE``).
* ``sla_lut_compact_kernel`` writes each row's (ascending) LUT and each column's CSR transpose by
  compacting the class map with a prefix sum. No host synchronisation anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..blockmap import CRITICAL, NEGLIGIBLE, BlockMap, class_counts, num_blocks
from ..validation import check_attention_inputs, check_sla_config
from .ops import _interpreting, check_triton_inputs


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


@triton.jit(do_not_specialize=["N_LINES", "LINE_LEN", "s_line", "s_elem"])
def sla_lut_compact_kernel(
    CLASS_MAP, OFFSETS, OUT, N_LINES, LINE_LEN, s_line, s_elem, out_stride_bh,
    CLASS: tl.constexpr, CHUNK: tl.constexpr, PER_LINE: tl.constexpr,
):
    # One program per (batch*head, line); a line is a row (query block) or a column (key block) of the class
    # map. Writes the indices along the line whose class is CLASS, ascending, starting at the line's offset.
    i_line = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    p_line = CLASS_MAP + i_bh * N_LINES * LINE_LEN + i_line * s_line
    if PER_LINE:
        i_out = i_line * tl.load(OFFSETS)  # fixed-width rows: OFFSETS holds the count per row
    else:
        i_out = tl.load(OFFSETS + i_bh * (N_LINES + 1) + i_line)
    p_out = OUT + i_bh * out_stride_bh + i_out
    n_done = tl.full([], 0, tl.int32)
    for i_c in range(0, tl.cdiv(LINE_LEN, CHUNK)):
        o_e = i_c * CHUNK + tl.arange(0, CHUNK)
        b_c = tl.load(p_line + o_e * s_elem, mask=o_e < LINE_LEN, other=0)
        m_hit = (b_c == CLASS) & (o_e < LINE_LEN)
        b_pos = tl.cumsum(m_hit.to(tl.int32), axis=0) - 1 + n_done
        tl.store(p_out + b_pos, o_e.to(tl.int32), mask=m_hit)
        n_done += tl.sum(m_hit.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["Tn", "N_CRIT", "N_NEGL"])
def sla_select_blocks_kernel(
    SCORES, CLASS_MAP, CRIT_LUT, NEGL_LUT, Tn, N_CRIT, N_NEGL,
    BT: tl.constexpr,
):
    # One program per (batch*head, query block): rank the row's key blocks with one in-register sort of
    # int64 keys (score in the high half, order-mapped; 2^31-1-index in the low half: equal scores rank by
    # lower index), then write the class row and both LUT rows in ascending index order.
    i_row = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BT)
    m_n = o_n < Tn
    b_s = tl.load(SCORES + i_row * Tn + o_n, mask=m_n, other=0.) + 0.  # +0.0: -0.0 ties with +0.0
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_bits = tl.where(b_s != b_s, 0x7FC00000, b_bits)  # every NaN -> the positive quiet NaN, above +inf
    b_ord = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits).to(tl.int64)
    b_key = (b_ord << 32) | (2147483647 - o_n).to(tl.int64)
    b_key = tl.where(m_n, b_key, -9223372036854775807 - 1)  # padding sorts last
    b_sorted = tl.sort(b_key, descending=True)
    t_crit = tl.sum(tl.where(o_n == N_CRIT - 1, b_sorted, 0), axis=0)
    t_negl = tl.sum(tl.where(o_n == Tn - N_NEGL, b_sorted, 0), axis=0)
    m_crit = (b_key >= t_crit) & m_n
    m_negl = (b_key <= t_negl) & m_n & (N_NEGL > 0)
    b_cls = tl.where(m_crit, 1, tl.where(m_negl, -1, 0))
    tl.store(CLASS_MAP + i_row * Tn + o_n, b_cls.to(tl.int8), mask=m_n)
    b_pos = tl.cumsum(m_crit.to(tl.int32), axis=0) - 1
    tl.store(CRIT_LUT + i_row * N_CRIT + b_pos, o_n, mask=m_crit)
    b_pos = tl.cumsum(m_negl.to(tl.int32), axis=0) - 1
    tl.store(NEGL_LUT + i_row * N_NEGL + b_pos, o_n, mask=m_negl)


@triton.jit(do_not_specialize=["Tn", "N_CRIT", "N_NEGL"])
def sla_select_blocks_bisect_kernel(
    SCORES, CLASS_MAP, CRIT_LUT, NEGL_LUT, Tn, N_CRIT, N_NEGL,
    BT: tl.constexpr,
):
    # Same output and tie rule as sla_select_blocks_kernel, without a sort. Scores become order-preserving
    # int32 keys; a bisection over the row's [min, max] key range finds a critical threshold t_c with
    # count(key >= t_c) = N_CRIT (or, inside a tie, the N_CRIT-th largest key) and a negligible threshold t_g
    # with count(key <= t_g) = N_NEGL, each step one count over the row. A search stops as soon as its count is
    # exact, which takes about log2(T_n) + a few steps for untied scores and at most 32. Ties at a threshold
    # are settled by index afterwards (critical: lower indices first; negligible: higher indices first).
    # Measured on an H100 at T_n = 1182 (bench/RESULTS.md): the sort of 2048 int64 keys spills.
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


# None, or "sort" / "bisect" / "topk" for every row length: set only by bench/bench_blockmap.py's A/B.
SELECTION_METHOD_OVERRIDE = None


def _selection_method(Tn: int) -> str:
    # Measured on an H100 (bench/bench_blockmap.py, bench/RESULTS.md), selection alone: at T_n = 512 the
    # bisection (first version, 2 warps) took 0.129 ms against 0.155 for the sort and 0.78 for topk; at
    # T_n = 1182, 3.1 ms against 10.8 (sort) and 8.7 (topk). The other two stay for the benchmark's A/B.
    return SELECTION_METHOD_OVERRIDE or "bisect"


def _select_blocks(scores: torch.Tensor, n_crit: int, n_negl: int, method: str, num_warps: int = 2):
    """Class map ``(B, H, T_m, T_n)`` int8 and the critical / negligible LUTs (ascending) of each row.
    ``num_warps`` applies to the "sort" and "bisect" kernels (2: best of 2/4/8 for both on an H100)."""
    B, H, Tm, Tn = scores.shape
    if method in ("sort", "bisect"):
        class_map = torch.empty(B, H, Tm, Tn, dtype=torch.int8, device=scores.device)
        crit_lut = torch.empty(B, H, Tm, n_crit, dtype=torch.int32, device=scores.device)
        negl_lut = torch.empty(B, H, Tm, n_negl, dtype=torch.int32, device=scores.device)
        kernel = sla_select_blocks_kernel if method == "sort" else sla_select_blocks_bisect_kernel
        kernel[(B * H * Tm,)](scores, class_map, crit_lut, negl_lut, Tn, n_crit, n_negl,
                              BT=triton.next_power_of_2(Tn), **({} if _interpreting() else {"num_warps": num_warps}))
        return class_map, crit_lut, negl_lut
    if method != "topk":
        raise ValueError(f"unknown selection method {method!r}; expected 'sort', 'bisect' or 'topk'")
    keys = _ranking_keys(scores)
    crit = torch.topk(keys, n_crit, dim=-1, sorted=False).indices
    class_map = torch.zeros(B, H, Tm, Tn, dtype=torch.int8, device=scores.device)
    class_map.scatter_(-1, crit, CRITICAL)
    if n_negl:
        negl = torch.topk(keys, n_negl, dim=-1, largest=False, sorted=False).indices
        class_map.scatter_(-1, negl, NEGLIGIBLE)
    return class_map, _compact(class_map, CRITICAL, True, n_crit), _compact(class_map, NEGLIGIBLE, True, n_negl)


def _mean_pool(x: torch.Tensor, block: int, with_sums: bool = False):
    """Block means ``(B, H, nb, D)`` fp32, and with ``with_sums`` the block sums as well."""
    B, H, L, D = x.shape
    nb = num_blocks(L, block)
    out = torch.empty(B, H, nb, D, dtype=torch.float32, device=x.device)
    sums = torch.empty_like(out) if with_sums else out  # placeholder pointer when not stored
    sla_mean_pool_kernel[(nb, B * H)](x, out, sums, x.stride(0), x.stride(1), x.stride(2), L, H=H, D=D, BT=block,
                                      STORE_SUMS=with_sums)
    return (out, sums) if with_sums else out


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


def _compact(class_map: torch.Tensor, cls: int, by_rows: bool, count: int, offsets=None) -> torch.Tensor:
    """Rows (``by_rows``: each query block's LUT, ``(B, H, T_m, count)``) or columns (each key block's CSR
    segment at ``offsets``, ``(B, H, T_m * count)``) of the indices of class ``cls``. Columns are read with
    stride T_n; compacting a contiguous transposed copy instead was no faster (H100, bench/RESULTS.md)."""
    B, H, Tm, Tn = class_map.shape
    if by_rows:
        out = torch.empty(B, H, Tm, count, dtype=torch.int32, device=class_map.device)
        n_lines, line_len, s_line, s_elem = Tm, Tn, Tn, 1
        offsets = torch.full((1,), count, dtype=torch.int32, device=class_map.device)
        out_stride = Tm * count
    else:
        out = torch.empty(B, H, Tm * count, dtype=torch.int32, device=class_map.device)
        n_lines, line_len, s_line, s_elem = Tn, Tm, 1, Tn
        out_stride = Tm * count
    if count == 0 or out.numel() == 0:
        return out
    chunk = min(1024, triton.next_power_of_2(line_len))
    sla_lut_compact_kernel[(n_lines, B * H)](
        class_map, offsets, out, n_lines if by_rows else Tn, line_len, s_line, s_elem, out_stride,
        CLASS=cls, CHUNK=chunk, PER_LINE=by_rows)
    return out


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
    on CPU under ``TRITON_INTERPRET=1``.

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
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Tm, Tn = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    n_crit, n_negl = class_counts(critical, negligible, Tn)
    pq = _mean_pool(q, block_q)
    pk, k_block_sums = _mean_pool(k, block_k, with_sums=True)
    # smooth-K: pool(k) - mean(k), with mean(k) from the block sums; few launches, as the builder is bound by
    # launch overhead at T_n = 512 (bench/RESULTS.md).
    k_sum = k_block_sums.sum(dim=2, keepdim=True)
    # fp32 scores also under an enclosing autocast: a bf16 matmul would change the ranking, and the selection
    # kernel reads fp32 bit patterns.
    with torch.autocast(q.device.type, enabled=False):
        scores = (pq @ torch.sub(pk, k_sum, alpha=1.0 / Lk).transpose(-1, -2)).contiguous()
    class_map, crit_lut, negl_lut = _select_blocks(scores, n_crit, n_negl, _selection_method(Tn))
    def transpose(cls, count):
        counts = (class_map == cls).sum(dim=2, dtype=torch.int32)
        offsets = torch.nn.functional.pad(torch.cumsum(counts, dim=-1, dtype=torch.int32), (1, 0))
        return offsets, _compact(class_map, cls, False, count, offsets)

    def not_built():
        return torch.empty(B, H, 0, dtype=torch.int32, device=q.device)

    ct_off, ct = transpose(CRITICAL, n_crit) if transposes != "none" else (not_built(), not_built())
    nt_off, nt = transpose(NEGLIGIBLE, n_negl) if transposes == "all" else (not_built(), not_built())
    return BlockMap(class_map=class_map, critical_lut=crit_lut, negligible_lut=negl_lut,
                    critical_lut_t_offsets=ct_off, critical_lut_t=ct, negligible_lut_t_offsets=nt_off,
                    negligible_lut_t=nt, seq_len_q=Lq, seq_len_k=Lk, block_q=block_q, block_k=block_k)
