"""SLA: Sparse-Linear Attention for diffusion transformers (arXiv 2509.24006).

Public names (each imported on first use, see below):

* :func:`sparse_linear_attention`: the operator, ``o = o_s + Proj(o_l)``;
* :class:`SparseLinearAttention`: the operator as an ``nn.Module`` owning its projection;
* :func:`build_block_map`, :class:`BlockMap`, :class:`SLAInfo`: the block classification and what a call did;
* :func:`naive_sparse_linear_attention`: the dense reference (the specification);
* :func:`apply_sla`, :func:`remove_sla`, :func:`save_sla`, :func:`load_sla`: the diffusers integration.

Importing this package imports neither torch nor any optional dependency, and never touches a GPU: every
name above is resolved on first attribute access (PEP 562 ``__getattr__``), so ``import sla; sla.apply_sla``
works as usual while ``sla --help`` starts in a fraction of a second. Kernels compile on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_LAZY_NAMES = {
    "SparseLinearAttention": ".layers",
    "BlockMap": ".ops.sla",
    "SLAInfo": ".ops.sla",
    "SLASettings": ".settings",
    "build_block_map": ".ops.sla",
    "naive_sparse_linear_attention": ".ops.sla",
    "sparse_linear_attention": ".ops.sla",
    # the diffusers integration; importing it still does not import diffusers until a function runs
    "apply_sla": ".integrations.diffusers",
    "remove_sla": ".integrations.diffusers",
    "save_sla": ".integrations.diffusers",
    "load_sla": ".integrations.diffusers",
}
# Subpackages reachable as attributes (``sla.integrations.diffusers``, ``sla.ops.sla``) after ``import sla``.
_SUBMODULES = ("analysis", "cli", "commands", "data", "eval", "integrations", "layers", "models", "ops", "settings",
               "training")

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these are imported lazily
    from .integrations.diffusers import apply_sla, load_sla, remove_sla, save_sla
    from .layers import SparseLinearAttention
    from .ops.sla import BlockMap, SLAInfo, build_block_map, naive_sparse_linear_attention, sparse_linear_attention
    from .settings import SLASettings


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
        globals()[name] = value  # later lookups find it directly
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sla' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


__all__ = [
    "BlockMap",
    "SLAInfo",
    "SLASettings",
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
