"""Fused Triton kernels of SLA (forward and backward) for CUDA GPUs.

``limits.py`` (what the kernels run) and ``backend.py`` (the backend object the operator registers) import
neither Triton nor the kernels, so importing this package or those two modules stays light; the names below load
their module, and with it Triton, on first use. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors, which is how CI tests them.
"""

from __future__ import annotations

import importlib

# public name -> module defining it (relative to this package)
_LAZY_NAMES = {
    "build_block_map_triton": ".blockmap",
    "triton_sparse_linear_attention": ".ops",
    "sla_triton_fwd": ".ops",
    "sla_triton_bwd": ".ops",
    "check_triton_inputs": ".limits",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
