"""Public entry point of the SLA operator: argument checks, backend lookup, block classification, attention.

Every implementation is a backend object (``backend.py`` describes the interface) registered in :data:`BACKENDS`;
this module has no code for any particular one. ``backend="auto"`` picks the Triton kernels for CUDA tensors and
the PyTorch path elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .backend import Backend, map_needs
from .blockmap import BlockMap
from .naive import REFERENCE_BACKEND
from ...settings import SLASettings
from .torch_impl import TORCH_BACKEND
from .triton.backend import TRITON_BACKEND
from .validation import check_attention_inputs, check_combine, check_projection, check_scale

# backend name -> backend object (sla/ops/sla/backend.py). The values are also callable as
# ``BACKENDS[name](q, k, v, block_map, feature_map=..., ...)``, i.e. ``attend``.
BACKENDS: dict[str, Backend] = {b.name: b for b in (TORCH_BACKEND, REFERENCE_BACKEND, TRITON_BACKEND)}


def _auto_choice(device: torch.device) -> str:
    # The kernels where they run; the PyTorch path elsewhere. Never a fallback: on CUDA without Triton, 'auto'
    # raises and says how to choose.
    return "triton" if device.type == "cuda" else "torch"


@contextlib.contextmanager
def _explain_auto(backend: str, name: str, device: torch.device):
    """Errors of a backend that ``backend="auto"`` chose say that auto chose it and how to run the call anyway."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if backend != "auto":
            raise
        raise type(err)(f"backend='auto' chose '{name}' for {device.type} tensors: {err} "
                        f"(pass backend='torch' to run this configuration on the PyTorch path)") from err


def resolve_backend(backend: str, device: torch.device) -> str:
    """The name of the backend that ``backend`` means on ``device``, after checking that it can run there.

    ``"auto"`` means the Triton kernels on CUDA and the PyTorch path elsewhere; with ``TRITON_INTERPRET=1`` the
    kernels can also be asked for explicitly on CPU (that is how CI tests them). An explicit backend is never
    replaced by another. Raises ``ValueError`` naming the fix for an unknown name or a backend that cannot run here.
    """
    if backend != "auto" and backend not in BACKENDS:
        known = ("auto",) + tuple(BACKENDS)
        raise ValueError(f"backend={backend!r} is unknown; choose one of {known}")
    name = _auto_choice(device) if backend == "auto" else backend
    with _explain_auto(backend, name, device):
        BACKENDS[name].check_device(device)
    return name


@dataclass
class SLAInfo:
    """What one SLA call did.

    Attributes:
        block_map: the full :class:`~sla.ops.sla.blockmap.BlockMap` used.
        class_map: ``(B, H, T_m, T_n)`` int8, 1 critical, 0 marginal, -1 negligible.
        sparsity: fraction of (query, key) token pairs not computed exactly (token-weighted).
        block_sparsity: ``1 - n_critical / T_n``.
        n_critical, n_negligible, n_marginal: key blocks per query-block row in each class.
        backend: the implementation that ran.
    """

    block_map: BlockMap
    class_map: torch.Tensor
    sparsity: float
    block_sparsity: float
    n_critical: int
    n_negligible: int
    n_marginal: int
    backend: str


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    scale: float | None = None,
    combine: str = "mass",
    mass_offset: torch.Tensor | None = None,
    return_info: bool = False,
    block_map: BlockMap | None = None,
    backend: str = "auto",
):
    """Sparse-Linear Attention (SLA, arXiv 2509.24006) with the mass-consistent combination
    ``o = a * o_s + (1 - a) * Proj(o_l)`` (default), or the paper's ``o = o_s + Proj(o_l)`` with ``combine="paper"``.

    Args:
        q (torch.Tensor): ``(B, H, Lq, D)``, float16, bfloat16, float32 or float64.
        k (torch.Tensor): ``(B, H, Lk, D)``, same dtype and device; ``Lk`` may differ from ``Lq``.
        v (torch.Tensor): ``(B, H, Lk, D)``.
        critical (float): fraction of key blocks per query-block row computed exactly
            (``n_crit = max(1, floor(critical * T_n))``). Default: 0.05 (the paper).
        negligible (float): fraction of lowest-scoring key blocks skipped entirely
            (``n_negl = min(floor(negligible * T_n), T_n - n_crit)``); only used by ``linear_scope="marginal"``.
            Default: 0.10 (the paper).
        block_q (int): query tokens per block. Default: 64.
        block_k (int): key tokens per block. Default: 64.
        feature_map (str): ``phi`` of the linear branch: ``"softmax"`` (over D), ``"elu"`` (elu+1) or ``"relu"``.
        linear_scope (str): key blocks the linear branch covers. ``"marginal"``: marginal only, negligible
            skipped (the paper). ``"noncritical"``: every non-critical block (public SLA-1 code).
            ``"all"``: every key (public main-branch code). Default: ``"marginal"``.
        proj_weight (torch.Tensor, optional): ``(D, D)`` weight of ``Proj``, shared by all heads. ``None`` means
            no projection: the branches are summed as they are (``o_s + o_l``). Pass zeros for sparse-only.
        proj_bias (torch.Tensor, optional): ``(D,)`` bias of ``Proj``.
        scale (float, optional): softmax scale of the sparse branch, a finite number > 0. Default: ``D ** -0.5``.
        combine (str): how the branches are combined. ``"paper"``: ``o_s + Proj(o_l)`` (Eq. 6 of the paper).
            ``"mass"``: ``a * o_s + (1 - a) * Proj(o_l)``, where ``a`` estimates, per query row, the share of
            the attention mass inside the critical blocks: ``o_s`` is normalised over the critical blocks only,
            so the true output is ``a * o_s + (1 - a) * o_rest``, which ``o_s + Proj(o_l)`` cannot express.
            ``a = sigmoid(lse - log(den) - log(D) - mass_offset[h])`` from the sparse branch's log-sum-exp and
            the linear branch's normaliser ``den`` (docs/semantics.md). Default: ``"mass"``: it beat the paper's
            rule in the project's controlled fine-tuning experiment (docs/results.md). ``"pooled"`` (experimental,
            every backend): ``a * o_s + (1 - a) * (o_c + Proj(o_l))`` with ``a`` and a
            coarse attention ``o_c`` over the key blocks' mean keys and values (docs/semantics.md).
            ``"pooled_cov"`` (experimental, every backend; the Triton kernels not yet run on a GPU): ``"pooled"``
            with ``o_c`` corrected to first order for the spread of each block's keys (one ``D x D`` state per
            query block); 52% of the sparse-only-to-full gap closed on the wan8k testbed (docs/results.md).
        mass_offset (torch.Tensor, optional): ``(H,)`` float, the learned per-head log-scale of the estimated mass
            outside the critical blocks (``combine="mass"``, ``"pooled"`` and ``"pooled_cov"``). Default: zeros.
        return_info (bool): also return an :class:`SLAInfo` (class map, sparsity, ...).
        block_map (BlockMap, optional): use this classification instead of predicting one; ``critical``,
            ``negligible``, ``block_q`` and ``block_k`` are then taken from it.
        backend (str): ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere), ``"torch"`` (memory-efficient
            PyTorch, any device), ``"triton"`` (fused kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            ``"reference"`` (the dense specification: O(Lq * Lk) memory, for checking and small inputs).

    Returns:
        ``o`` with the shape and dtype of ``q``, or ``(o, info)`` with ``return_info=True``.

    NaN or Inf in the inputs propagate to the output as they would through dense attention. A block size larger
    than its sequence makes one block of the whole sequence. Empty batch or head dimensions and meta tensors
    raise ``ValueError`` (see ``docs/semantics.md``).
    """
    check_attention_inputs(q, k, v)
    SLASettings(critical, negligible, block_q, block_k, feature_map, linear_scope, combine)  # checks them
    check_projection(proj_weight, proj_bias, q.shape[-1], q.device)
    check_combine(combine, mass_offset, q.shape[1], q.device)
    check_scale(scale)
    name = resolve_backend(backend, q.device)
    impl = BACKENDS[name]
    blocks = (block_q, block_k) if block_map is None else (block_map.block_q, block_map.block_k)
    with _explain_auto(backend, name, q.device):
        impl.check_inputs(q, *blocks)
    if block_map is None:
        block_map = impl.build_block_map(q, k, critical=critical, negligible=negligible, block_q=block_q,
                                         block_k=block_k,
                                         needs=map_needs(q, k, v, proj_weight, proj_bias, mass_offset,
                                                         complete=return_info))
    else:
        block_map.validate_for(q, k)
    with _explain_auto(backend, name, q.device):
        out = impl.attend(q, k, v, block_map, feature_map=feature_map, linear_scope=linear_scope,
                          proj_weight=proj_weight, proj_bias=proj_bias, scale=scale, combine=combine,
                          mass_offset=mass_offset)
    if not return_info:
        return out
    info = SLAInfo(block_map=block_map, class_map=block_map.class_map, sparsity=block_map.sparsity(),
                   block_sparsity=block_map.block_sparsity, n_critical=block_map.n_critical,
                   n_negligible=block_map.n_negligible, n_marginal=block_map.n_marginal, backend=name)
    return out, info
