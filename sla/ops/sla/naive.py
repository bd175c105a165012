"""Dense reference of SLA: the specification as readable PyTorch, and the ``"reference"`` backend.

It materialises the full ``(Lq, Lk)`` token maps, so memory and time are O(Lq * Lk) per head: use it to check
results or to read what SLA computes, on inputs of a few thousand tokens. Every faster implementation
(``torch_impl.py``, the Triton kernels) is tested against it, in float64 as the gold standard and in the input's
low precision (``upcast=False``) to measure how much rounding error that precision carries on its own. It runs
any device, dtype, head dim and block size, and is differentiable through plain autograd.

What it computes, per (batch, head), for a :class:`~sla.ops.sla.blockmap.BlockMap`:

* ``o_s = softmax(q k^T * scale, restricted to the tokens of critical blocks) v``
* ``o_l = (phi(q) phi(k)^T * S) v / rowsum(phi(q) phi(k)^T * S)``, where ``S`` is the 0/1 token mask of
  the key blocks in the linear scope. This equals the paper's ``phi(q) H / (phi(q) . Z)``. A row with
  nothing in scope, or whose normaliser is exactly zero, gets ``o_l = 0``.
* ``combine="paper"`` (the paper's Eq. 6): ``o = o_s + o_l W^T + b`` (identity projection when
  ``proj_weight`` is None).
* ``combine="mass"``: ``o = a * o_s + (1 - a) * (o_l W^T + b)`` with, per query row and head ``h``,
  ``a = S / (S + R)``: ``S = sum over critical keys of exp(scale * q.k)`` (the sparse branch's own
  normaliser, ``exp(lse)``) and ``R = D * exp(mass_offset[h]) * sum over keys in scope of phi(q).phi(k)`` (the
  linear branch's normaliser, rescaled: for flat attention and a softmax feature map, ``phi(q).phi(k) ~ 1/D``
  while ``exp(q.k) ~ 1``). Written as ``a = sigmoid(lse - log(den) - log(D) - mass_offset[h])``. With nothing
  in the linear scope (``den = 0``) ``a = 1``, so ``critical=1`` gives dense attention.
* ``combine="pooled"``: ``o = a * o_s + (1 - a) * (o_c + o_l W^T + b)``. Each key block ``j`` stands in for its
  ``n_j`` keys at its mean key and mean value: per row, ``l_j = scale * q . mean(K_j) + log(n_j)``. The coarse
  attention ``o_c = sum_j softmax(l)_j mean(V_j)`` runs over the key blocks in the linear scope (0 with none), and
  ``a = S / (S + R)`` with ``R = exp(mass_offset[h]) * sum_j exp(l_j)`` over every non-critical block (the
  estimated mass outside the critical blocks), i.e. ``a = sigmoid(lse - logsumexp(l) - mass_offset[h])``; ``a = 1``
  when every block is critical. Zero-initialise ``W`` to start from sparse + coarse attention alone.
* ``combine="pooled_cov"`` (experimental): ``"pooled"`` with ``o_c`` corrected to first order for the spread of
  each block's keys. Over block ``j``, ``exp(scale q.k) ~ exp(scale q.mean(K_j)) (1 + scale q.(k - mean(K_j)))``,
  so its values average to ``mean(V_j) + scale q C_j`` with ``C_j = mean over the block of (k - mean(K_j)) v^T``
  (``D x D``). The coarse weights are averaged over each query block's rows (one state ``G_i = sum_j pbar_ij C_j``
  per query block, the form a kernel can afford, as the linear branch's ``H_i``): ``o_c' = o_c + scale q G_i``.
"""

from __future__ import annotations

import math

import torch

from ...settings import POOLED_RULES
from .backend import Backend
from .blockmap import CRITICAL, BlockMap, block_lengths, in_linear_scope, mean_pool_blocks
from .feature_maps import apply_feature_map


def expand_block_mask(block_mask: torch.Tensor, seq_len_q: int, seq_len_k: int, block_q: int,
                      block_k: int) -> torch.Tensor:
    """Blow a ``(..., T_m, T_n)`` block mask up to ``(..., Lq, Lk)`` token resolution."""
    tok = block_mask.repeat_interleave(block_q, dim=-2).repeat_interleave(block_k, dim=-1)
    return tok[..., :seq_len_q, :seq_len_k]


def scope_block_mask(block_map: BlockMap, linear_scope: str) -> torch.Tensor:
    """Boolean ``(B, H, T_m, T_n)``: the key blocks the linear branch sums over for each query block."""
    return in_linear_scope(block_map.class_map, linear_scope)


def naive_sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    scale: float | None = None,
    combine: str = "mass",
    mass_offset: torch.Tensor | None = None,
    upcast: bool = True,
    return_branches: bool = False,
):
    """SLA by definition, for q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)``.

    Args:
        block_map: the classification to use (see :func:`sla.build_block_map`).
        upcast: compute in float32 (float64 stays float64). With ``upcast=False`` every operation runs in
            the input dtype, which is how tests measure the rounding error of a low precision.
        combine, mass_offset: the branch combination (see the module docstring); ``mass_offset`` ``(H,)``
            defaults to zeros.
        return_branches: also return ``(o_s, o_l, a)`` in the compute dtype: the branches before projection and
            the mixing weight ``a`` ``(B, H, Lq, 1)`` (ones for ``combine="paper"``, where nothing is mixed).

    Returns:
        ``o`` with the shape and dtype of q (and ``(o_s, o_l, a)`` if asked).
    """
    out_dtype = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    # A block longer than its sequence is one block holding the whole sequence; sizing by the sequence keeps
    # memory proportional to it (block_q=10**6 must not expand the masks to 10**6 rows).
    bq, bk = min(block_map.block_q, Lq), min(block_map.block_k, Lk)

    critical = expand_block_mask(block_map.class_map == CRITICAL, Lq, Lk, bq, bk)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~critical, float("-inf"))
    o_s = torch.softmax(scores, dim=-1) @ v
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # every row has >= 1 critical block: finite

    in_scope = expand_block_mask(scope_block_mask(block_map, linear_scope), Lq, Lk, bq, bk)
    phi_q = apply_feature_map(q, feature_map)
    phi_k = apply_feature_map(k, feature_map)
    weights = (phi_q @ phi_k.transpose(-1, -2)) * in_scope.to(q.dtype)
    normaliser = weights.sum(dim=-1, keepdim=True)
    o_l = (weights @ v) / torch.where(normaliser == 0, torch.ones_like(normaliser), normaliser)

    if proj_weight is None:
        projected = o_l
    else:
        projected = torch.nn.functional.linear(o_l, proj_weight.to(o_l.dtype),
                                               None if proj_bias is None else proj_bias.to(o_l.dtype))
    if combine == "mass":
        a = mass_weight(lse, normaliser, D, mass_offset)
        out = a * o_s + (1 - a) * projected
    elif combine in POOLED_RULES:
        o_c, log_rest = coarse_branch(q, k, v, block_map.class_map, bq, bk, scale, linear_scope,
                                      covariance=combine == "pooled_cov")
        a = pooled_weight(lse, log_rest, mass_offset)
        out = a * o_s + (1 - a) * (o_c + projected)
    elif combine == "paper":
        a = torch.ones_like(lse)
        out = o_s + projected
    else:
        raise ValueError(f"combine={combine!r} is unknown; choose 'paper', 'mass', 'pooled' or 'pooled_cov'")
    out = out.to(out_dtype)
    if return_branches:
        return out, (o_s, o_l, a)
    return out


def mass_weight(lse: torch.Tensor, den: torch.Tensor, head_dim: int, mass_offset: torch.Tensor | None) -> torch.Tensor:
    """``a = sigmoid(lse - log(den) - log(head_dim) - mass_offset[h])`` for ``(B, H, L, 1)`` ``lse`` (natural log of
    the sparse branch's normaliser) and ``den`` (the linear branch's normaliser); ``a = 1`` where ``den = 0``.
    Shared by the reference and the PyTorch path so both state the rule once."""
    positive = den > 0
    # log of a substituted 1 where den = 0: no inf * 0 = NaN in the gradient of the unused branch.
    log_den = torch.where(positive, torch.log(torch.where(positive, den, torch.ones_like(den))),
                          torch.full_like(den, float("-inf")))
    x = lse - log_den - math.log(head_dim)
    if mass_offset is not None:
        x = x - mass_offset.to(x.dtype).view(1, -1, 1, 1)
    return torch.sigmoid(x)


def coarse_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_map: torch.Tensor, block_q: int,
                  block_k: int, scale: float, linear_scope: str,
                  covariance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine="pooled"``'s estimates from the key blocks' means, for q ``(B, H, Lq, D)``, k and v
    ``(B, H, Lk, D)`` in the compute dtype and the block map's ``class_map`` ``(B, H, T_m, T_n)``.

    Returns ``o_c`` ``(B, H, Lq, D)``, the coarse attention over the key blocks in the linear scope (0 for rows
    with none), and ``log_rest`` ``(B, H, Lq, 1)``, the log of the estimated attention mass outside the critical
    blocks (``-inf`` when every block is critical). With ``covariance`` (``combine="pooled_cov"``) ``o_c`` gains
    :func:`covariance_correction`. Memory O(Lq * T_n) per head; shared by the reference and the PyTorch path so
    both state the rule once."""
    lengths = block_lengths(k.shape[2], block_k, q.device).to(q.dtype)
    k_means = mean_pool_blocks(k, block_k)
    logits = (q @ k_means.transpose(-1, -2)) * scale + torch.log(lengths)  # (B, H, Lq, T_n)
    p, log_rest = coarse_probabilities(logits, class_map, block_q, linear_scope)
    o_c = p @ mean_pool_blocks(v, block_k)
    if covariance:
        o_c = o_c + covariance_correction(q, k, v, k_means, p, block_q, block_k, scale)
    return o_c, log_rest


def coarse_attention(logits: torch.Tensor, v_means: torch.Tensor, class_map: torch.Tensor, block_q: int,
                     linear_scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of :func:`coarse_branch` from the per-row logits of the key blocks ``(..., Lq, T_n)``, their mean
    values ``(..., T_n, D)`` and the class map ``(..., T_m, T_n)``: ``(o_c, log_rest)``. Any leading dims (the
    analysis passes one head's ``(Lq, T_n)``, and logits of its own candidates)."""
    p, log_rest = coarse_probabilities(logits, class_map, block_q, linear_scope)
    return p @ v_means, log_rest


def coarse_probabilities(logits: torch.Tensor, class_map: torch.Tensor, block_q: int,
                         linear_scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse attention's weights ``(..., Lq, T_n)`` (softmax over the key blocks in the linear scope, rows with
    none all zero) and ``log_rest`` ``(..., Lq, 1)``, from the per-row block logits and the class map."""
    rows = class_map.repeat_interleave(block_q, dim=-2)[..., :logits.shape[-2], :]
    log_rest = torch.logsumexp(logits.masked_fill(rows == CRITICAL, float("-inf")), dim=-1, keepdim=True)
    in_scope = in_linear_scope(rows, linear_scope)
    # A row with nothing in scope gets o_c = 0: its softmax over no block is replaced, not NaN-masked, so that no
    # NaN reaches the gradient either.
    has_scope = in_scope.any(dim=-1, keepdim=True)
    masked = logits.masked_fill(~in_scope, float("-inf")).masked_fill(~has_scope, 0.0)
    return torch.softmax(masked, dim=-1) * has_scope.to(logits.dtype), log_rest


def covariance_correction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_means: torch.Tensor, p: torch.Tensor,
                          block_q: int, block_k: int, scale: float) -> torch.Tensor:
    """``combine="pooled_cov"``'s correction of ``o_c``, ``scale q G_i`` ``(B, H, Lq, D)``: ``G_i = sum_j pbar_ij
    C_j`` per query block, with ``pbar`` the coarse weights ``p`` ``(B, H, Lq, T_n)`` averaged over the block's real
    rows and ``C_j = mean over key block j of (k - mean(K_j)) v^T`` ``(D, D)`` (``k_means`` ``(B, H, T_n, D)``, as
    :func:`coarse_branch` pooled them). Memory O(T_n D^2 + T_m D^2) per head."""
    Lq = q.shape[-2]
    tm = -(-Lq // block_q)
    cov = block_covariances(k, v, k_means, block_k)
    state = torch.einsum("...mt,...tde->...mde", mean_pool_blocks(p, block_q), cov)
    pad_q = tm * block_q - Lq
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, pad_q)).unflatten(-2, (tm, block_q))
    corr = torch.einsum("...mrd,...mde->...mre", q_blocks, state) * scale
    return corr.flatten(-3, -2)[..., :Lq, :]


def block_covariances(k: torch.Tensor, v: torch.Tensor, k_means: torch.Tensor, block_k: int) -> torch.Tensor:
    """``C_j = mean over key block j of (k - mean(K_j)) v^T``: ``(..., T_n, D, D)`` from k and v ``(..., Lk, D)``
    and the blocks' mean keys ``k_means`` ``(..., T_n, D)``; the last block, if short, over its real tokens."""
    Lk = k.shape[-2]
    tn = -(-Lk // block_k)
    pad = tn * block_k - Lk
    k_centred = k - k_means.repeat_interleave(block_k, dim=-2)[..., :Lk, :]
    k_blocks = torch.nn.functional.pad(k_centred, (0, 0, 0, pad)).unflatten(-2, (tn, block_k))
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).unflatten(-2, (tn, block_k))
    lengths = block_lengths(Lk, block_k, k.device).to(k.dtype)
    return torch.einsum("...tjd,...tje->...tde", k_blocks, v_blocks) / lengths[:, None, None]


def pooled_weight(lse: torch.Tensor, log_rest: torch.Tensor, mass_offset: torch.Tensor | None) -> torch.Tensor:
    """``a = sigmoid(lse - log_rest - mass_offset[h])`` for ``(B, H, L, 1)`` tensors; ``a = 1`` where ``log_rest``
    is ``-inf`` (every block critical)."""
    finite = torch.isfinite(log_rest)
    x = lse - torch.where(finite, log_rest, torch.zeros_like(log_rest))
    if mass_offset is not None:
        x = x - mass_offset.to(x.dtype).view(1, -1, 1, 1)
    return torch.where(finite, torch.sigmoid(x), torch.ones_like(x))


class ReferenceBackend(Backend):
    """``backend="reference"``: :func:`naive_sparse_linear_attention` (computes half inputs in float32), with the
    PyTorch block map. Any device, dtype, head dim and block size; O(Lq * Lk) memory."""

    name = "reference"

    def attend(self, q, k, v, block_map, *, feature_map, linear_scope, proj_weight, proj_bias, scale, combine,
               mass_offset):
        return naive_sparse_linear_attention(q, k, v, block_map, feature_map=feature_map, linear_scope=linear_scope,
                                             proj_weight=proj_weight, proj_bias=proj_bias, scale=scale, combine=combine,
                                             mass_offset=mass_offset)


REFERENCE_BACKEND = ReferenceBackend()
