"""Entry point of the SLA Triton kernels for a given block map: :func:`triton_sparse_linear_attention`, which the
``"triton"`` backend (``backend.py``) calls. It checks what the kernels cannot run, brings the arguments into the
form the custom ops take (fp32 parameters, default offsets, the scope matrix) and decides what the forward keeps
for backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backend import grad_will_flow
from ....settings import COMBINE_RULES, MIXING_RULES, POOLED_RULES
from ..blockmap import CRITICAL, BlockMap, in_linear_scope
from ..feature_maps import FEATURE_MAP_FNS
from .custom_ops import sla_triton_fwd
from .launch import last_dim_contiguous, state_dtype
from .limits import check_triton_inputs


def scope_mask_for(block_map: BlockMap, linear_scope: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The 0/1 ``(B, H, T_m, T_n)`` matrix of key blocks in the linear scope, or None for ``"all"``."""
    return None if linear_scope == "all" else in_linear_scope(block_map.class_map, linear_scope).to(dtype)


def coarse_codes(block_map: BlockMap, linear_scope: str) -> torch.Tensor:
    """``(B, H, T_m, T_n)`` uint8 for the coarse kernels: bit 0 set for key blocks outside the critical ones (the
    mass estimate sums over them), bit 1 for those in the linear scope (the coarse attention runs over them)."""
    class_map = block_map.class_map
    rest = (class_map != CRITICAL).to(torch.uint8)
    return (rest + 2 * in_linear_scope(class_map, linear_scope).to(torch.uint8)).contiguous()


def triton_sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    proj_weight: Optional[torch.Tensor] = None,
    proj_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    combine: str = "mass",
    mass_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SLA through the fused Triton kernels, differentiable in q, k, v, ``proj_weight``, ``proj_bias`` and
    ``mass_offset``.

    Args:
        q (torch.Tensor): ``[B, H, Lq, D]`` float16, bfloat16 or float32 on CUDA (or CPU under
            ``TRITON_INTERPRET=1``); any strides with a contiguous last dim (e.g. a ``[B, L, H, D]`` tensor
            viewed as ``[B, H, L, D]``, read without a copy). ``D`` in 16, 32, 64, 128.
        k, v (torch.Tensor): ``[B, H, Lk, D]``, same dtype and device.
        block_map (BlockMap): the classification (``sla.build_block_map``); ``block_q``/``block_k`` in 16..128.
        feature_map, linear_scope, proj_weight, proj_bias, scale, combine, mass_offset: as in
            :func:`sla.sparse_linear_attention`.

    Returns:
        ``o`` ``[B, H, Lq, D]`` in q's dtype, with q's memory layout.
    """
    check_triton_inputs(q, block_map.block_q, block_map.block_k)
    block_map.validate_for(q, k)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    if not scale > 0:  # also rejects NaN
        # The kernels fold the scale into the running maximum (max(s) * scale), which needs scale > 0.
        raise ValueError(f"backend='triton' needs a positive softmax scale, got scale={scale}; use backend='torch'")
    if proj_weight is not None:
        proj_weight = proj_weight.to(torch.float32)
    if proj_bias is not None:
        proj_bias = proj_bias.to(torch.float32)
    if combine in MIXING_RULES:
        mass_offset = (torch.zeros(q.shape[1], dtype=torch.float32, device=q.device) if mass_offset is None
                       else mass_offset.to(torch.float32))
    elif combine != "paper":
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    else:
        mass_offset = None
    if feature_map not in FEATURE_MAP_FNS:  # the kernels implement each map by name (kernels.py)
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAP_FNS)}, got {feature_map!r}")
    scope_mask = scope_mask_for(block_map, linear_scope, state_dtype(q.dtype))
    # Inference writes only o; the tensors backward needs (o_s, o_l, LSE) only when a gradient can flow.
    store_aux = grad_will_flow(q, k, v, proj_weight, proj_bias, mass_offset)
    if store_aux and block_map.critical_lut_t.numel() == 0 and block_map.critical_lut.numel() > 0:
        raise ValueError("block_map was built with transposes='none' (inference only) but a gradient will flow; "
                         "build it with build_block_map_triton(..., transposes='critical') or 'all', or let "
                         "sla.sparse_linear_attention build it")
    # combine="pooled"/"pooled_cov": the op forms the key blocks' means and runs the coarse kernel (and the covariance
    # state) before the fused forward.
    codes = coarse_codes(block_map, linear_scope) if combine in POOLED_RULES else None
    o = sla_triton_fwd(
        q, k, v, block_map.critical_lut, block_map.critical_lut_t_offsets, block_map.critical_lut_t, scope_mask,
        proj_weight, proj_bias, mass_offset, codes, scale, block_map.block_q, block_map.block_k, feature_map, combine,
        store_aux)[0]
    return o
