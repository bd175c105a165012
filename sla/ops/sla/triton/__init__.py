"""Fused Triton kernels of SLA (forward and backward) for CUDA GPUs.

Importing this package imports Triton; ``import sla`` does not (the ``"triton"`` backend loads it on
first use). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how CI tests them.
"""

from .blockmap import build_block_map_triton
from .ops import (
    check_triton_inputs,
    sla_triton_bwd,
    sla_triton_fwd,
    sparse_linear_attention_triton,
    transposes_needed,
    triton_sparse_linear_attention,
)

__all__ = [
    "build_block_map_triton",
    "check_triton_inputs",
    "sla_triton_bwd",
    "sla_triton_fwd",
    "sparse_linear_attention_triton",
    "transposes_needed",
    "triton_sparse_linear_attention",
]
