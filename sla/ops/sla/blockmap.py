"""Block scoring and classification: which key blocks each query block treats as critical,
marginal or negligible.

This is SLA's mask prediction (paper Eq. 2-3, with the smooth-K pooling of the public code). It is
kept apart from the attention implementations so that the reference, the PyTorch path, the Triton
kernels, the analysis tools and the tests all consume one :class:`BlockMap`.

Layout: q ``(B, H, Lq, D)`` and k ``(B, H, Lk, D)``. Query blocks hold ``block_q`` tokens, key blocks
``block_k`` tokens; the last block of either side may be short and is pooled over its real tokens.
``T_m = ceil(Lq / block_q)`` query blocks, ``T_n = ceil(Lk / block_k)`` key blocks. A block size larger than
its sequence gives one block holding the whole sequence; the implementations then size their buffers by the
sequence, not by the block (so ``block_q=10**6`` costs what ``block_q=Lq`` costs and gives the same result).

Tie rule: within a query-block row, key blocks are ranked by score, highest first; equal scores are
ranked by key-block index, lowest first (a stable sort). The first ``n_crit`` of that ranking are
critical and the last ``n_negl`` negligible. A NaN score ranks above every number (torch's sort
order), so NaN inputs stay visible in the output instead of being silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...settings import check_sla_config
from .validation import check_attention_inputs

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1

# Fractions such as 0.29 * 100 evaluate to 28.999999999999996 in binary floating point; without a
# nudge, floor() would give one block fewer than the user asked for.
_FLOOR_SLACK = 1e-9


def num_blocks(seq_len: int, block: int) -> int:
    """Number of blocks of ``block`` tokens needed to cover ``seq_len`` tokens (last one may be short)."""
    return (seq_len + block - 1) // block  # not -(-a // b): symbolic sizes under torch.compile need a >= 0 form


def class_counts(critical: float, negligible: float, num_key_blocks: int) -> tuple[int, int]:
    """Blocks per query-block row: ``n_crit = max(1, floor(critical*T_n))`` and
    ``n_negl = min(floor(negligible*T_n), T_n - n_crit)``."""
    n_crit = max(1, math.floor(critical * num_key_blocks + _FLOOR_SLACK))
    n_crit = min(n_crit, num_key_blocks)
    n_negl = min(math.floor(negligible * num_key_blocks + _FLOOR_SLACK), num_key_blocks - n_crit)
    return n_crit, n_negl


def block_lengths(seq_len: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Real token count of every block, ``(ceil(seq_len / block),)`` int64; only the last may be short."""
    nb = num_blocks(seq_len, block)
    # Computed on the device in one expression: writing a host int into a CUDA tensor would be a
    # host-to-device copy, which CUDA-graph capture rejects.
    starts = torch.arange(nb, dtype=torch.int64, device=device) * block
    return torch.clamp(seq_len - starts, max=block)


def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x`` ``(..., L, D)`` over each block of ``block`` tokens -> ``(..., ceil(L/block), D)``, in x's dtype
    (the block map pools ``(B, H, L, D)`` q and k; the pooled rules pool keys, values and coarse weights).

    The last block is averaged over its real tokens only (zero padding adds nothing to the sum and the
    divisor is the true count).
    """
    L = x.shape[-2]
    block = min(block, L)  # a block longer than the sequence is one block of it: pad nothing, not to `block`
    nb = num_blocks(L, block)
    pad = nb * block - L
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    sums = x.unflatten(-2, (nb, block)).sum(dim=-2)
    return sums / block_lengths(L, block, x.device).to(sums.dtype)[:, None]


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scores of half inputs are formed in float32 so that ranking does not depend on bf16 rounding.
    return torch.float64 if dtype == torch.float64 else torch.float32


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Block scores ``mean_pool(q) @ mean_pool(k - mean_tokens(k))^T`` -> ``(B, H, T_m, T_n)``.

    Softmax and the ``1/sqrt(D)`` scale of the paper's Eq. 2 are monotone within a row, so they are
    skipped: they cannot change which blocks are selected. Computed in float32 (float64 for float64
    inputs).
    """
    dt = _score_dtype(q.dtype)
    # An enclosing autocast would run the score matmul in bf16/fp16 and change which blocks are selected.
    with torch.autocast(q.device.type, enabled=False):
        q = q.to(dt)
        k = k.to(dt)
        k_smooth = k - k.mean(dim=2, keepdim=True)  # smooth-K: removes the shared key offset that biases pooling
        return mean_pool_blocks(q, block_q) @ mean_pool_blocks(k_smooth, block_k).transpose(-1, -2)


def _transpose_lut(lut: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a per-query-block LUT ``(B, H, T_m, n)`` into a per-key-block CSR view.

    Returns ``offsets (B, H, T_n + 1)`` and ``indices (B, H, T_m * n)``, both int32: the query blocks that
    list key block ``j`` are ``indices[b, h, offsets[b, h, j]:offsets[b, h, j + 1]]``, ascending. Everything
    stays on the device (no host synchronisation): the total length is known to be ``T_m * n``.
    """
    B, H, Tm, n = lut.shape
    dev = lut.device
    key = lut.reshape(B, H, Tm * n).to(torch.int64)
    query = torch.arange(Tm, device=dev, dtype=torch.int64).repeat_interleave(n).expand(B, H, Tm * n)
    order = torch.argsort(key * Tm + query, dim=-1)
    indices = torch.gather(query, -1, order).to(torch.int32)
    counts = torch.zeros(B, H, num_key_blocks, dtype=torch.int64, device=dev)
    counts.scatter_add_(-1, key, torch.ones_like(key))
    offsets = torch.nn.functional.pad(torch.cumsum(counts, dim=-1), (1, 0)).to(torch.int32)
    return offsets, indices


@dataclass(frozen=True)
class BlockMap:
    """The classification of every (query block, key block) pair of one SLA call.

    Attributes:
        class_map: ``(B, H, T_m, T_n)`` int8; 1 critical, 0 marginal, -1 negligible.
        critical_lut: ``(B, H, T_m, n_crit)`` int32, the critical key blocks of each query block, ascending.
        negligible_lut: ``(B, H, T_m, n_negl)`` int32, the negligible key blocks of each query block, ascending.
        critical_lut_t_offsets, critical_lut_t: the transpose of ``critical_lut`` in CSR form, per key block
            (``(B, H, T_n + 1)`` and ``(B, H, T_m * n_crit)`` int32): which query blocks treat key block ``j``
            as critical. Backward kernels iterate it for dK/dV.
        negligible_lut_t_offsets, negligible_lut_t: the same for ``negligible_lut``.
        seq_len_q, seq_len_k, block_q, block_k: the geometry the map was built for.

    Every row has the same ``n_crit`` and ``n_negl``, so the LUTs are dense tensors.
    """

    class_map: torch.Tensor
    critical_lut: torch.Tensor
    negligible_lut: torch.Tensor
    critical_lut_t_offsets: torch.Tensor
    critical_lut_t: torch.Tensor
    negligible_lut_t_offsets: torch.Tensor
    negligible_lut_t: torch.Tensor
    seq_len_q: int
    seq_len_k: int
    block_q: int
    block_k: int

    @property
    def num_query_blocks(self) -> int:
        return self.class_map.shape[2]

    @property
    def num_key_blocks(self) -> int:
        return self.class_map.shape[3]

    @property
    def n_critical(self) -> int:
        return self.critical_lut.shape[3]

    @property
    def n_negligible(self) -> int:
        return self.negligible_lut.shape[3]

    @property
    def n_marginal(self) -> int:
        return self.num_key_blocks - self.n_critical - self.n_negligible

    @property
    def block_sparsity(self) -> float:
        """Fraction of key blocks per row that the exact (sparse) branch skips: ``1 - n_crit / T_n``."""
        return 1.0 - self.n_critical / self.num_key_blocks

    def sparsity(self) -> float:
        """Fraction of (query, key) token pairs that the exact branch does not compute.

        Token-weighted, so a short last block counts for its real size. Synchronises with the device.
        """
        qlen = block_lengths(self.seq_len_q, self.block_q, self.class_map.device).double()
        klen = block_lengths(self.seq_len_k, self.block_k, self.class_map.device).double()
        pair_counts = qlen[:, None] * klen[None, :]
        attended = ((self.class_map == CRITICAL).double() * pair_counts).sum(dim=(-1, -2))
        return float(1.0 - attended.mean() / (self.seq_len_q * self.seq_len_k))

    def to(self, device: torch.device | str) -> "BlockMap":
        moved = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS}
        return BlockMap(**moved, seq_len_q=self.seq_len_q, seq_len_k=self.seq_len_k,
                        block_q=self.block_q, block_k=self.block_k)

    def validate_for(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise a ``ValueError`` if this map does not fit ``q`` ``(B, H, Lq, D)`` and ``k``."""
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        want = (B, H, num_blocks(Lq, self.block_q), num_blocks(Lk, self.block_k))
        if (Lq, Lk) != (self.seq_len_q, self.seq_len_k) or tuple(self.class_map.shape) != want:
            raise ValueError(
                f"block_map was built for Lq={self.seq_len_q}, Lk={self.seq_len_k}, class_map "
                f"{tuple(self.class_map.shape)}, but the inputs need Lq={Lq}, Lk={Lk}, class_map {want}; "
                f"build it from these inputs with sla.build_block_map(q, k, ...)"
            )
        if self.class_map.device != q.device:
            raise ValueError(f"block_map is on {self.class_map.device} but q is on {q.device}; use block_map.to()")

    @classmethod
    def from_luts(
        cls, critical_lut: torch.Tensor, negligible_lut: torch.Tensor, seq_len_q: int, seq_len_k: int,
        block_q: int, block_k: int,
    ) -> "BlockMap":
        """Build a map from per-row index tables ``(B, H, T_m, n)`` of key-block indices: each row's entries
        distinct, critical and negligible disjoint, at least one critical block per row (checked, which
        synchronises with the device). Rows are sorted ascending; the class map and transposes are derived."""
        return cls._from_luts(critical_lut, negligible_lut, seq_len_q, seq_len_k, block_q, block_k, check=True)

    @classmethod
    def _from_luts(cls, critical_lut, negligible_lut, seq_len_q, seq_len_k, block_q, block_k, check):
        Tn = num_blocks(seq_len_k, block_k)
        Tm = num_blocks(seq_len_q, block_q)
        B, H = critical_lut.shape[:2]
        crit = torch.sort(critical_lut.to(torch.int64), dim=-1).values
        negl = torch.sort(negligible_lut.to(torch.int64), dim=-1).values
        if check:
            _check_luts(crit, negl, B, H, Tm, Tn)
        class_map = torch.zeros(B, H, Tm, Tn, dtype=torch.int8, device=crit.device)
        class_map.scatter_(-1, crit, CRITICAL)
        class_map.scatter_(-1, negl, NEGLIGIBLE)
        ct_off, ct = _transpose_lut(crit, Tn)
        nt_off, nt = _transpose_lut(negl, Tn)
        return cls(class_map=class_map, critical_lut=crit.to(torch.int32), negligible_lut=negl.to(torch.int32),
                   critical_lut_t_offsets=ct_off, critical_lut_t=ct,
                   negligible_lut_t_offsets=nt_off, negligible_lut_t=nt,
                   seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_q=block_q, block_k=block_k)

    @classmethod
    def from_class_map(cls, class_map: torch.Tensor, seq_len_q: int, seq_len_k: int, block_q: int,
                       block_k: int) -> "BlockMap":
        """Build a map from an int8 class map whose rows all hold the same number of critical blocks and
        the same number of negligible blocks (checked; this synchronises with the device)."""
        B, H, Tm, Tn = class_map.shape
        if (Tm, Tn) != (num_blocks(seq_len_q, block_q), num_blocks(seq_len_k, block_k)):
            raise ValueError(f"class_map shape {tuple(class_map.shape)} does not match the sequence lengths and blocks")
        n_crit_rows = (class_map == CRITICAL).sum(-1)
        n_negl_rows = (class_map == NEGLIGIBLE).sum(-1)
        n_crit, n_negl = int(n_crit_rows.max()), int(n_negl_rows.max())
        if int(n_crit_rows.min()) != n_crit or int(n_negl_rows.min()) != n_negl or n_crit < 1:
            raise ValueError("class_map rows must all hold the same (>= 1) number of critical blocks and the "
                             "same number of negligible blocks")
        # Stable argsort of the class puts a row's blocks of one class in ascending index order.
        order = torch.argsort(-class_map.to(torch.int64), dim=-1, stable=True)
        return cls._from_luts(order[..., :n_crit], order[..., Tn - n_negl:], seq_len_q, seq_len_k, block_q, block_k,
                              check=False)


def _check_luts(crit: torch.Tensor, negl: torch.Tensor, B: int, H: int, Tm: int, Tn: int) -> None:
    """Validate user-built look-up tables (sorted rows); a bad table would give silently wrong attention."""
    for name, lut in (("critical_lut", crit), ("negligible_lut", negl)):
        if lut.dim() != 4 or tuple(lut.shape[:3]) != (B, H, Tm):
            raise ValueError(f"{name} has shape {tuple(lut.shape)}, expected ({B}, {H}, {Tm}, n) for these lengths")
        if lut.numel() and (int(lut.min()) < 0 or int(lut.max()) >= Tn):
            raise ValueError(f"{name} holds key-block indices outside [0, {Tn}); the keys form {Tn} blocks")
        if lut.shape[-1] > 1 and bool((lut[..., 1:] == lut[..., :-1]).any()):
            raise ValueError(f"{name} lists a key block twice in one row; every entry of a row must be distinct")
    if crit.shape[-1] < 1:
        raise ValueError("critical_lut must list at least one key block per row (the sparse branch needs one)")
    if negl.shape[-1] and bool((crit[..., :, None] == negl[..., None, :]).any()):
        raise ValueError("critical_lut and negligible_lut share a key block in some row; the classes must be disjoint")
    if crit.shape[-1] + negl.shape[-1] > Tn:
        raise ValueError(f"critical_lut and negligible_lut list more than the {Tn} key blocks of a row")


_TENSOR_FIELDS = ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets", "critical_lut_t",
                  "negligible_lut_t_offsets", "negligible_lut_t")


def in_linear_scope(class_map: torch.Tensor, linear_scope: str) -> torch.Tensor:
    """Boolean mask, shaped like ``class_map``, of the key blocks the linear branch sums over:
    ``"marginal"`` (the paper), ``"noncritical"`` (public SLA-1 code) or ``"all"`` (public main branch)."""
    if linear_scope == "marginal":
        return class_map == MARGINAL
    if linear_scope == "noncritical":
        return class_map != CRITICAL
    if linear_scope == "all":
        return torch.ones_like(class_map, dtype=torch.bool)
    raise ValueError(f"linear_scope={linear_scope!r} is unknown; choose 'marginal', 'noncritical' or 'all'")


def select_blocks(scores: torch.Tensor, n_crit: int, n_negl: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores`` ``(..., T_n)``: the ``n_crit`` top and ``n_negl`` bottom key blocks, by the tie
    rule of this module. Returns two int64 index tensors ``(..., n_crit)`` and ``(..., n_negl)``."""
    Tn = scores.shape[-1]
    ranking = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return ranking[..., :n_crit], ranking[..., Tn - n_negl:]


@torch.no_grad()
def build_block_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
) -> BlockMap:
    """Score pooled blocks of ``q`` ``(B, H, Lq, D)`` and ``k`` ``(B, H, Lk, D)`` and classify them.

    ``n_crit = max(1, floor(critical*T_n))`` highest-scoring key blocks of each query-block row are critical,
    ``n_negl = min(floor(negligible*T_n), T_n - n_crit)`` lowest-scoring are negligible, the rest marginal.
    No host-device synchronisation; no gradient flows through the selection.
    """
    check_attention_inputs(q, k, k)
    check_sla_config(critical, negligible, block_q, block_k, "softmax", "marginal")
    Lq, Lk = q.shape[2], k.shape[2]
    n_crit, n_negl = class_counts(critical, negligible, num_blocks(Lk, block_k))
    crit, negl = select_blocks(pooled_block_scores(q, k, block_q, block_k), n_crit, n_negl)
    return BlockMap._from_luts(crit, negl, Lq, Lk, block_q, block_k, check=False)
