"""Fused Triton kernels of SLA (forward and backward) for CUDA GPUs.

Modules, by responsibility: ``kernels.py`` (the attention kernels, ``@triton.jit`` only), ``blockmap.py`` (the block
classification's kernels and builder), ``launch_config.py`` (``num_warps``/``num_stages`` per launch: the table,
the shared-memory check, the benchmarks' overrides), ``launch.py`` (buffers, strides, the forward's and the
backward's launch sequences), ``custom_ops.py`` (``torch.library`` ops, fake implementations, autograd), ``api.py``
(the entry point for a given block map), ``limits.py`` (what the kernels run, and the checks), ``backend.py`` (the
``"triton"`` backend object), ``testing.py`` (helpers shared by the CPU and GPU test suites).

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
    "triton_sparse_linear_attention": ".api",
    "sla_triton_fwd": ".custom_ops",
    "sla_triton_bwd": ".custom_ops",
    "check_triton_inputs": ".limits",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
