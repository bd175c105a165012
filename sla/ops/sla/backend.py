"""The backend interface of the SLA operator.

A backend is one implementation of SLA: a small object with a ``name`` and four methods, which
:func:`sla.sparse_linear_attention` (``interface.py``) looks up by name in its ``BACKENDS`` table and calls in
this order, with no code of its own for any particular backend:

1. ``check_device(device)``: can this backend run tensors on this device at all (installed, CUDA, ...)?
2. ``check_inputs(q, block_q, block_k)``: can it run these inputs (dtype, head dim, block sizes)? Called after the
   operator's own argument checks (``validation.py``), which every backend shares.
3. ``build_block_map(q, k, ..., needs=...)``: the block classification (``blockmap.py`` defines it; a backend may
   compute the same map its own way, e.g. with GPU kernels). Skipped when the caller passes a map.
4. ``attend(q, k, v, block_map, ...)``: the attention output for that map, differentiable.

Each method raises ``ValueError``/``TypeError`` with a message that names the argument and the fix; a backend
never hands a call to another backend on its own (the user picks, or ``backend="auto"`` picks by device and says
so in its errors). The built-in backends sit next to their implementations: ``naive.REFERENCE_BACKEND``,
``torch_impl.TORCH_BACKEND`` and ``triton.backend.TRITON_BACKEND``; this module imports none of them.

Layout everywhere: q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)``, one float dtype (float16, bfloat16, float32,
float64; a backend may accept fewer); the output has q's shape and dtype.
"""

from __future__ import annotations

import torch

from .blockmap import BlockMap, build_block_map

# What the caller will do with a block map it asks a backend to build (the ``needs`` argument):
# "forward": only compute an output without gradients; "backward": compute an output that gradients will flow
# through; "complete": the map goes back to the caller (return_info=True), so every field must be filled in.
# A backend may skip parts of the map that the stated use does not read (the Triton builder skips the CSR
# transposes for inference); maps built for "forward" or "backward" stay inside the operator.
MAP_NEEDS = ("forward", "backward", "complete")


def grad_will_flow(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def map_needs(*tensors: torch.Tensor | None, complete: bool = False) -> str:
    """``needs`` for a call on these inputs: ``"complete"`` when the map is returned, else ``"backward"`` when a
    gradient will flow through any of ``tensors``, else ``"forward"``."""
    if complete:
        return "complete"
    return "backward" if grad_will_flow(*tensors) else "forward"


class Backend:
    """Base class of the SLA backends (see the module docstring for the call order).

    Subclasses set ``name`` and implement :meth:`attend`; the defaults accept every device and input and build the
    block map with the PyTorch builder :func:`sla.build_block_map`.
    """

    name: str = ""

    def check_device(self, device: torch.device) -> None:
        """Raise ``ValueError`` if this backend cannot run tensors on ``device`` here (say what to install or
        which backend to pick instead)."""

    def check_inputs(self, q: torch.Tensor, block_q: int, block_k: int) -> None:
        """Raise ``ValueError``/``TypeError`` for inputs this backend cannot run. ``q`` has passed the operator's
        checks; ``block_q``/``block_k`` are the block sizes the map has or will have."""

    def build_block_map(self, q: torch.Tensor, k: torch.Tensor, *, critical: float, negligible: float, block_q: int,
                        block_k: int, needs: str = "complete") -> BlockMap:
        """The :class:`BlockMap` of q ``(B, H, Lq, D)`` and k ``(B, H, Lk, D)`` (same dtype and device), built
        for ``needs`` (one of :data:`MAP_NEEDS`). Default: the PyTorch builder, which always builds every field."""
        return build_block_map(q, k, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: BlockMap, *, feature_map: str,
               linear_scope: str, proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
               scale: float | None, combine: str, mass_offset: torch.Tensor | None) -> torch.Tensor:
        """SLA's output ``(B, H, Lq, D)`` in q's dtype for ``block_map``, differentiable in q, k, v, ``proj_weight``,
        ``proj_bias`` and ``mass_offset``. Arguments as in :func:`sla.sparse_linear_attention`, already checked."""
        raise NotImplementedError(f"backend {self.name!r} does not implement attend()")

    def __call__(self, q, k, v, block_map, **kwargs) -> torch.Tensor:
        # ``BACKENDS[name](q, k, v, block_map, ...)`` keeps working as when the table held plain functions.
        return self.attend(q, k, v, block_map, **kwargs)

    def __repr__(self) -> str:
        return f"<SLA backend {self.name!r}>"
