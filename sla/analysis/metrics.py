"""The measurements behind SLA's premise (paper §3, Figures 1 and 3), as plain tensor functions.

Everything here works on one attention head at a time: a block of sampled query rows ``q`` ``(R, D)``
against the full keys ``k`` and values ``v`` ``(N, D)``, so memory is O(R * N), never O(N^2). The
sampled rows are whole query blocks (see :func:`sample_query_blocks`), so pooled block scores computed
from them are exactly the scores the operator computes for those blocks on the full sequence.

Functions:

* :func:`attention_distribution`: fractions of weights above ``1/N`` and below ``1/(100 N)`` and a
  histogram of ``log10(N * P)`` (0 = the uniform weight ``1/N``).
* :func:`stable_rank`: ``||A||_F^2 / ||A||_2^2`` (Rudelson and Vershynin), the paper's rank measure.
* :func:`row_topk_mask`: per row, the ``keep`` largest entries (the paper's Fig. 1 sparsification).
* :func:`relative_l1`: ``sum |approx - exact| / sum |exact|``.
* :func:`block_attention_mass`: exact attention mass of every (query block, key block) pair.
* :func:`critical_set_recall`: overlap of a predicted critical set with the true top blocks.
* :func:`fit_shared_projection`: least-squares ``Proj`` (weight and bias, shared by heads), cross-fitted.
"""

from __future__ import annotations

import math

import torch

# Histogram of log10(N * P): from a millionth of the uniform weight to 10^4 times it. Values outside
# are counted in the first/last bin so that every weight is in the histogram (the sums stay exact).
HIST_LOG10_MIN = -6.0
HIST_LOG10_MAX = 4.0
HIST_BINS = 50


def sample_query_blocks(seq_len: int, block_q: int, num_blocks: int | None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose ``num_blocks`` query blocks of ``block_q`` tokens uniformly without replacement.

    Returns the block indices, int64, ascending. ``None`` or a number >= the block count selects every
    block. Ascending order keeps a short last block last, so the gathered rows split into the same
    blocks as on the full sequence.
    """
    total = -(-seq_len // block_q)
    if num_blocks is None or num_blocks >= total:
        return torch.arange(total)
    if num_blocks < 1:
        raise ValueError(f"query_blocks must be >= 1 (or None for all), got {num_blocks}")
    return torch.sort(torch.randperm(total, generator=generator)[:num_blocks]).values


def gather_query_blocks(x: torch.Tensor, block_indices: torch.Tensor, block_q: int) -> torch.Tensor:
    """Rows of ``x`` ``(..., L, D)`` belonging to the given query blocks, in block order -> ``(..., R, D)``."""
    L = x.shape[-2]
    rows = (block_indices[:, None] * block_q + torch.arange(block_q)[None, :]).reshape(-1)
    rows = rows[rows < L]
    return x.index_select(-2, rows.to(x.device))


def attention_distribution(probs: torch.Tensor) -> dict:
    """Distribution of attention weights ``probs`` ``(R, N)`` (rows sum to 1).

    Returns a dict with ``frac_above_mean`` (fraction of weights ``> 1/N``, the paper's 8.1%),
    ``frac_below_mean_over_100`` (``< 1/(100 N)``, the paper's 45%), ``mass_above_mean`` (attention mass
    carried by the weights above ``1/N``) and ``histogram``: ``edges`` and ``counts`` of ``log10(N * P)``
    (bin edges in units of the uniform weight; out-of-range values are counted in the end bins).
    """
    n = probs.shape[-1]
    above = probs > 1.0 / n
    below = probs < 1.0 / (100.0 * n)
    scaled = torch.log10(probs.double().clamp_min(1e-300) * n).clamp(HIST_LOG10_MIN, HIST_LOG10_MAX)
    counts = torch.histc(scaled, bins=HIST_BINS, min=HIST_LOG10_MIN, max=HIST_LOG10_MAX)
    edges = torch.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1, dtype=torch.float64)
    return {
        "frac_above_mean": float(above.double().mean()),
        "frac_below_mean_over_100": float(below.double().mean()),
        "mass_above_mean": float((probs.double() * above).sum() / probs.shape[0]),
        "histogram": {"edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]},
    }


def stable_rank(a: torch.Tensor) -> float:
    """Stable rank ``||A||_F^2 / ||A||_2^2`` of a matrix ``a`` ``(R, N)``; 0.0 for an all-zero matrix.

    Uses the smaller Gram matrix ``G`` (``A A^T`` or ``A^T A``, formed in ``a``'s dtype, at least float32,
    then taken to float64): its trace is ``||A||_F^2`` and its largest eigenvalue is ``||A||_2^2`` (see
    :func:`largest_eigenvalue`). The value lies in ``[1, min(R, N)]`` and equals ``r`` for a rank-``r``
    matrix whose non-zero singular values are all equal.
    """
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    gram = (a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a).double()
    fro2 = float(torch.diagonal(gram).sum())
    if fro2 == 0.0:
        return 0.0
    return fro2 / largest_eigenvalue(gram)


def largest_eigenvalue(gram: torch.Tensor, block: int = 16, max_iter: int = 200, rtol: float = 1e-13) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite float64 matrix ``(n, n)``.

    Block subspace iteration with Rayleigh-Ritz: the top Ritz value rises monotonically to the eigenvalue
    at a rate ``(lambda_{block+1} / lambda_1)^2`` per step; it stops when a step changes it by less than
    ``rtol`` (relative). If the top ``block + 1`` eigenvalues are so close that this is slow, the Ritz value
    is already within their spread of the answer, so the result is accurate to about ``sqrt(rtol)`` in the
    worst case. Small matrices, and runs that do not settle in ``max_iter`` steps, use a full symmetric
    eigensolve instead. (A full eigensolve is exact but can take seconds on the clustered spectra of
    attention remainders at n = 1024; this takes milliseconds.)
    """
    n = gram.shape[0]
    if n <= 4 * block:
        return float(torch.linalg.eigvalsh(gram)[-1])
    gen = torch.Generator(device=gram.device).manual_seed(0)
    x = torch.randn(n, block, dtype=gram.dtype, device=gram.device, generator=gen)
    # The first column starts at sqrt(diag(G)), close to the top eigenvector of a nonnegative map.
    x[:, 0] = torch.sqrt(torch.diagonal(gram).clamp_min(0))
    x = torch.linalg.qr(x).Q
    prev = 0.0
    for _ in range(max_iter):
        y = gram @ x
        ritz = float(torch.linalg.eigvalsh(x.T @ y)[-1])
        if ritz > 0 and abs(ritz - prev) <= rtol * ritz:
            return ritz
        prev = ritz
        x = torch.linalg.qr(y).Q
    return float(torch.linalg.eigvalsh(gram)[-1])


def keep_count(sparsity: float, n: int) -> int:
    """Entries kept per row at ``sparsity``: ``max(1, round((1 - sparsity) * n))``."""
    return max(1, min(n, int(round((1.0 - sparsity) * n))))


def row_topk_mask(probs: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of every row of ``probs`` ``(R, N)`` (exact count;
    ties broken by ``torch.topk``)."""
    idx = torch.topk(probs, keep, dim=-1).indices
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask


def relative_l1(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``sum |approx - exact| / sum |exact|`` (the paper's relative L1 error), in float64."""
    exact = exact.double()
    return float((approx.double() - exact).abs().sum() / exact.abs().sum().clamp_min(1e-300))


def block_attention_mass(probs: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Exact attention mass of every block: ``probs`` ``(R, N)`` summed over the rows of each query
    block and the keys of each key block -> ``(ceil(R/block_q), ceil(N/block_k))``. Short last blocks
    sum over their real entries (zero padding)."""
    R, N = probs.shape
    tm, tn = -(-R // block_q), -(-N // block_k)
    padded = torch.nn.functional.pad(probs, (0, tn * block_k - N, 0, tm * block_q - R))
    return padded.reshape(tm, block_q, tn, block_k).sum(dim=(1, 3))


def critical_set_recall(predicted: torch.Tensor, true_top: torch.Tensor) -> float:
    """Mean over rows of ``|predicted ∩ true_top| / |true_top|`` for index sets ``(T_m, n)`` per row."""
    hits = (predicted[..., :, None] == true_top[..., None, :]).any(-1).double().sum(-1)
    return float((hits / true_top.shape[-1]).mean())


RIDGE_GRID = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0, float("inf"))


def _ridge_solutions(x: torch.Tensor, y: torch.Tensor, ridges) -> list[torch.Tensor]:
    """Ridge solutions ``argmin ||x w - y||^2 + lam * s ||w||^2`` for every ``lam`` in ``ridges`` (``s`` = largest
    eigenvalue of ``x^T x``; ``inf`` gives ``w = 0``), from one eigendecomposition. Directions whose regularised
    eigenvalue is below ``1e-12 s`` are dropped (a pseudo-inverse), so a rank-deficient ``x`` is fine."""
    normal = x.T @ x
    evals, evecs = torch.linalg.eigh(normal)
    top = evals.max().clamp_min(1e-300)
    coef = evecs.T @ (x.T @ y)
    out = []
    for lam in ridges:
        if math.isinf(lam):
            out.append(torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype, device=x.device))
            continue
        denom = evals + lam * top
        inv = torch.where(denom > 1e-12 * top, 1.0 / denom.clamp_min(1e-300), torch.zeros_like(denom))
        out.append(evecs @ (inv[:, None] * coef))
    return out


def _fit_with_chosen_ridge(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, ridges) -> torch.Tensor:
    """Fit on rows ``x`` ``(n, p)`` -> ``y``; the ridge strength is chosen by a 2-fold split of ``groups``
    (minimal L1 error on the held-out half), then the fit is redone on all rows."""
    inner = (groups.unique(sorted=True)[None, :] == groups[:, None]).double().argmax(-1) % 2
    if int(inner.min()) == int(inner.max()):
        lam = ridges[0]
    else:
        errors = torch.zeros(len(ridges), dtype=torch.float64)
        for label in (0, 1):
            test = inner == label
            for i, w in enumerate(_ridge_solutions(x[~test], y[~test], ridges)):
                errors[i] += float((x[test] @ w - y[test]).abs().sum())
        lam = ridges[int(torch.argmin(errors))]
    return _ridge_solutions(x, y, (lam,))[0]


def fit_shared_projection(o_l: torch.Tensor, target: torch.Tensor, groups: torch.Tensor,
                          ridges=RIDGE_GRID) -> torch.Tensor:
    """Least-squares ``Proj`` (``Linear(D, D)`` with bias, shared by all heads) for SLA's linear branch, scored
    out of sample.

    Args:
        o_l: ``(H, R, D)`` linear-branch output before the projection.
        target: ``(H, R, D)`` what ``Proj(o_l)`` should add, i.e. ``dense - o_s``.
        groups: ``(R,)`` int64 group of each row (its sampled query block). Groups alternate between two outer
            folds; each fold's rows are predicted by a projection fitted on the other fold (all heads).
        ridges: candidate ridge strengths (relative to the largest eigenvalue of the normal matrix; ``inf`` =
            the zero projection, i.e. sparse-only). Within each training fold the strength is chosen by an inner
            2-fold split, so an ill-conditioned ``o_l`` cannot make the fit worse than it needs to be.

    Returns:
        ``(H, R, D)`` ``Proj(o_l)`` in float64 with the out-of-fold projections.
    """
    H, R, D = o_l.shape
    if not torch.is_tensor(groups) or groups.shape != (R,):
        raise ValueError(f"groups must be a ({R},) tensor of row groups, got {groups!r}")
    ranks = (groups.unique(sorted=True)[None, :] == groups[:, None].cpu()).double().argmax(-1)
    folds = ranks % 2
    if int(folds.max()) < 1:
        raise ValueError("fit_shared_projection needs at least two groups of query rows to score out of sample")
    x = torch.cat([o_l.double(), torch.ones(H, R, 1, dtype=torch.float64, device=o_l.device)], dim=-1)
    y = target.double()
    out = torch.zeros_like(y)
    for label in (0, 1):
        test = (folds == label).to(o_l.device)
        train_groups = groups.to(o_l.device)[~test].repeat(H)
        w = _fit_with_chosen_ridge(x[:, ~test].reshape(-1, D + 1), y[:, ~test].reshape(-1, D), train_groups, ridges)
        out[:, test] = x[:, test] @ w
    return out
