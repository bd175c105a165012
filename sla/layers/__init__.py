from .sla import SparseLinearAttention

__all__ = ["SparseLinearAttention"]
