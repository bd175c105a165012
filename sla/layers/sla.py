"""``SparseLinearAttention``: the SLA operator as an ``nn.Module`` owning its projection."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.sla.interface import sparse_linear_attention
from ..settings import MIXING_RULES, SLASettings, check_backend_name


class SparseLinearAttention(nn.Module):
    """SLA attention with a learnable ``Proj`` on the linear branch.

    ``combine="paper"``: ``o = o_s + Proj(o_l)``. ``Proj`` is a ``Linear(head_dim, head_dim)`` with bias, kept in
    float32 and initialised to zero, so an untrained module computes sparse-only attention and fine-tuning grows
    the linear branch in. One projection per module, shared by all heads (as in the paper's public code).

    ``combine="mass"``: ``o = a * o_s + (1 - a) * Proj(o_l)``, ``a`` the estimated share of the attention mass
    in the critical blocks (:func:`sla.sparse_linear_attention`). ``Proj`` starts at the identity (zero would
    scale the output down by ``a``), and the module owns ``mass_offset`` ``(num_heads,)`` float32, initialised
    to zero: the per-head log-scale of the linear branch's mass estimate (one shared offset, ``(1,)``, when
    ``num_heads`` is not given).

    ``combine="pooled"``: ``o = a * o_s + (1 - a) * (o_c + Proj(o_l))`` with ``a`` and the coarse attention ``o_c``
    estimated from the key blocks' mean keys and values. ``Proj`` starts at zero (the module then computes sparse
    plus coarse attention), with ``mass_offset`` as for ``"mass"``. Runs on every backend.
    ``combine="pooled_cov"`` (experimental, every backend): the same with ``o_c`` corrected for the spread of each
    block's keys (:mod:`sla.ops.sla.naive`), initialised as ``"pooled"``.

    Args:
        head_dim (int): D of q, k, v.
        critical, negligible, block_q, block_k, feature_map, linear_scope: see
            :func:`sla.sparse_linear_attention`. Defaults are the paper's (0.05, 0.10, 64, 64, softmax,
            marginal).
        backend (str): implementation choice, see :func:`sla.sparse_linear_attention`. Default ``"auto"``.
        combine (str): ``"mass"``, ``"paper"``, ``"pooled"`` or ``"pooled_cov"``. Default ``"mass"``
            (docs/results.md has the experiments).
        num_heads (int, optional): heads of q, for one mass offset per head (the mixing rules); ``None`` gives
            one offset shared by all heads. :func:`sla.apply_sla` passes each layer's head count.

    The settings are kept as one frozen :class:`~sla.settings.SLASettings`, ``module.settings`` (its fields
    also read as ``module.critical`` and so on); :meth:`from_settings` builds a module from one.

    ``forward(q, k, v)`` takes ``(B, H, L, D)`` tensors and returns the same layout and dtype as q.
    ``forward(q, k, v, heads=slice(a, b))`` says that q, k, v hold heads ``a .. b-1`` of the layer only (Ulysses
    context parallelism gives each rank a slice of the heads with every token): the per-head mass offsets of those
    heads are used, and the gradient reaches only them.
    """

    def __init__(self, head_dim: int, critical: float = 0.05, negligible: float = 0.10, block_q: int = 64,
                 block_k: int = 64, feature_map: str = "softmax", linear_scope: str = "marginal",
                 backend: str = "auto", combine: str = "mass", num_heads: int | None = None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        settings = SLASettings(critical, negligible, block_q, block_k, feature_map, linear_scope, combine)
        check_backend_name(backend)
        if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"num_heads must be a positive int (the heads of q) or None (one mass offset shared by "
                             f"all heads), got num_heads={num_heads!r}")
        self.head_dim = head_dim
        self.settings = settings  # frozen: the parameters below were made for these settings
        self.backend = backend  # a run-time choice (same result), may be changed on the module
        self.num_heads = num_heads
        self.proj = nn.Linear(head_dim, head_dim, bias=True, dtype=torch.float32)
        if settings.combine in MIXING_RULES:
            self.mass_offset = nn.Parameter(torch.zeros(num_heads or 1, dtype=torch.float32))
        else:
            self.register_parameter("mass_offset", None)
        self.reset_parameters()

    @classmethod
    def from_settings(cls, head_dim: int, settings: SLASettings, *, backend: str = "auto",
                      num_heads: int | None = None) -> "SparseLinearAttention":
        """The module for ``settings`` (an :class:`~sla.settings.SLASettings`)."""
        if not isinstance(settings, SLASettings):
            raise TypeError(f"settings must be an SLASettings, got {type(settings).__name__}")
        return cls(head_dim, **settings.to_dict(), backend=backend, num_heads=num_heads)

    # The settings read as attributes, as before they were one object (read-only: changing one would not change
    # the parameters made for it; build a new module instead).
    critical = property(lambda self: self.settings.critical)
    negligible = property(lambda self: self.settings.negligible)
    block_q = property(lambda self: self.settings.block_q)
    block_k = property(lambda self: self.settings.block_k)
    feature_map = property(lambda self: self.settings.feature_map)
    linear_scope = property(lambda self: self.settings.linear_scope)
    combine = property(lambda self: self.settings.combine)

    def reset_parameters(self) -> None:
        if self.combine == "mass":
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(self.head_dim))
        else:  # "paper" (the paper's zero init) and the pooled rules (start as sparse + coarse attention)
            nn.init.zeros_(self.proj.weight)
        if self.mass_offset is not None:
            nn.init.zeros_(self.mass_offset)
        nn.init.zeros_(self.proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                return_info: bool = False, block_map=None, heads: slice | None = None):
        """q ``(B, H, Lq, head_dim)``, k and v ``(B, H, Lk, head_dim)``; see :func:`sla.sparse_linear_attention`.
        ``heads``: the layer's heads that q holds (a ``slice`` of ``range(num_heads)``), when it holds only some."""
        if q.dim() == 4 and q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head_dim {q.shape[-1]} but this module was built with head_dim={self.head_dim}; "
                             f"build SparseLinearAttention({q.shape[-1]}) for these inputs")
        offset = self.mass_offset
        if offset is not None and q.dim() == 4:
            if self.num_heads is None:
                offset = offset.repeat(q.shape[1])  # one shared offset (a real copy: kernels index it per head)
            else:
                chosen = range(self.num_heads) if heads is None else range(self.num_heads)[heads]
                if q.shape[1] != len(chosen):
                    what = "" if heads is None else f" of which heads={heads} selects {len(chosen)}"
                    raise ValueError(f"q has {q.shape[1]} heads but this module was built with num_heads="
                                     f"{self.num_heads}{what} (one mass offset per head); build it with num_heads="
                                     f"{q.shape[1]}, or pass the heads q holds")
                if heads is not None:
                    offset = offset[heads]
        return sparse_linear_attention(
            q, k, v, **self.settings.to_dict(), proj_weight=self.proj.weight, proj_bias=self.proj.bias, scale=scale,
            mass_offset=offset, return_info=return_info, block_map=block_map, backend=self.backend)

    def extra_repr(self) -> str:
        heads = f", num_heads={self.num_heads}" if self.combine in MIXING_RULES else ""
        return (f"head_dim={self.head_dim}, critical={self.critical}, negligible={self.negligible}, "
                f"block_q={self.block_q}, block_k={self.block_k}, feature_map={self.feature_map!r}, "
                f"linear_scope={self.linear_scope!r}, combine={self.combine!r}{heads}, backend={self.backend!r}")
