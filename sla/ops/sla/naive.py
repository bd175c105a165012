"""Dense reference of SLA: the specification as readable PyTorch. For tests only.

It materialises the full ``(Lq, Lk)`` token maps, so memory is O(Lq * Lk) per head. Every faster
implementation (``torch_impl.py``, the Triton kernels) is tested against it, in float64 as the gold
standard and in the input's low precision (``upcast=False``) to measure how much rounding error that
precision carries on its own.

What it computes, per (batch, head), for a :class:`~sla.ops.sla.blockmap.BlockMap`:

* ``o_s = softmax(q k^T * scale, restricted to the tokens of critical blocks) v``
* ``o_l = (phi(q) phi(k)^T * S) v / rowsum(phi(q) phi(k)^T * S)``, where ``S`` is the 0/1 token mask of
  the key blocks in the linear scope. This equals the paper's ``phi(q) H / (phi(q) . Z)``. A row with
  nothing in scope, or whose normaliser is exactly zero, gets ``o_l = 0``.
* ``o = o_s + o_l W^T + b`` (identity projection when ``proj_weight`` is None).
"""

from __future__ import annotations

import torch

from .blockmap import CRITICAL, BlockMap, in_linear_scope
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
    upcast: bool = True,
    return_branches: bool = False,
):
    """SLA by definition, for q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)``.

    Args:
        block_map: the classification to use (see :func:`sla.build_block_map`).
        upcast: compute in float32 (float64 stays float64). With ``upcast=False`` every operation runs in
            the input dtype, which is how tests measure the rounding error of a low precision.
        return_branches: also return ``(o_s, o_l)`` before projection, in the compute dtype.

    Returns:
        ``o`` with the shape and dtype of q (and ``(o_s, o_l)`` if asked).
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
    out = (o_s + projected).to(out_dtype)
    if return_branches:
        return out, (o_s, o_l)
    return out
