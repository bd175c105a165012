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

# diffusers integration, imported on first use so that `import sla` never imports diffusers.
_LAZY_INTEGRATIONS = ("apply_sla", "remove_sla", "save_sla", "load_sla")


def __getattr__(name):
    if name in _LAZY_INTEGRATIONS:
        from .integrations import diffusers as _diffusers_integration

        return getattr(_diffusers_integration, name)
    if name == "integrations":  # light: its __init__ imports nothing heavy
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module 'sla' has no attribute {name!r}")

__all__ = [
    "BlockMap",
    "SLAInfo",
    "SparseLinearAttention",
    "build_block_map",
    "naive_sparse_linear_attention",
    "sparse_linear_attention",
    "__version__",
    "apply_sla",
    "load_sla",
    "remove_sla",
    "save_sla",
]
