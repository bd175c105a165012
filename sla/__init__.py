"""SLA: Sparse-Linear Attention for diffusion transformers (arXiv 2509.24006).

Importing this package never touches a GPU; kernels compile on first use.
"""

from .layers import SparseLinearAttention
from .ops.sla import (
    BlockMap,
    SLAInfo,
    build_block_map,
    naive_sparse_linear_attention,
    sparse_linear_attention,
)

__version__ = "0.1.0"

__all__ = [
    "BlockMap",
    "SLAInfo",
    "SparseLinearAttention",
    "build_block_map",
    "naive_sparse_linear_attention",
    "sparse_linear_attention",
    "__version__",
]
