"""The SLA operator: block classification, dense reference, PyTorch path and (on GPU) Triton kernels."""

from .backend import Backend
from .blockmap import BlockMap, build_block_map, class_counts, pooled_block_scores, select_blocks
from .interface import BACKENDS, SLAInfo, sparse_linear_attention
from .naive import naive_sparse_linear_attention
from .torch_impl import torch_sparse_linear_attention

__all__ = [
    "BACKENDS",
    "Backend",
    "BlockMap",
    "SLAInfo",
    "build_block_map",
    "class_counts",
    "naive_sparse_linear_attention",
    "pooled_block_scores",
    "select_blocks",
    "sparse_linear_attention",
    "torch_sparse_linear_attention",
]
