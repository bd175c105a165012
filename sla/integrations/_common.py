"""Pieces shared by the integrations: the per-layer SLA module and configuration checks."""

from __future__ import annotations

import torch

from ..layers.sla import SparseLinearAttention
from ..ops.sla.triton.limits import SUPPORTED_BLOCKS, SUPPORTED_HEAD_DIMS
from ..settings import SLASettings

_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Every integration installs its SLA module under this attribute of the attention module it patches, so
# ``attn.sla`` (and the state_dict names ``...attn1.sla.proj.weight``) mean the same everywhere.
SLA_ATTRIBUTE = "sla"

# The PyTorch path runs any block size and head dim, but a model is usually patched on the CPU and moved to a GPU
# later, so the integration refuses at apply time what the GPU kernels would refuse at the first forward (their
# limits come from a module that does not import Triton).


def check_integration_config(settings: SLASettings) -> None:
    """The block sizes the GPU kernels accept (``settings`` is checked already); raises ValueError naming the fix."""
    for name in ("block_q", "block_k"):
        val = getattr(settings, name)
        if val not in SUPPORTED_BLOCKS:
            raise ValueError(
                f"{name}={val} cannot run on the SLA GPU kernels, which take block sizes {SUPPORTED_BLOCKS} "
                f"(the paper uses block_q=64, block_k=64; TurboDiffusion inference uses 128/64)"
            )


def check_head_dim(head_dim: int, backend: str, where: str) -> None:
    """Kernels run head_dim in SUPPORTED_HEAD_DIMS; other sizes need the PyTorch path, chosen explicitly."""
    if backend in ("auto", "triton") and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{where} has head_dim {head_dim}, which the SLA GPU kernels do not run (they take {SUPPORTED_HEAD_DIMS}); "
            f"pass backend='torch' to use the PyTorch implementation for this model"
        )


class SparseLinearAttentionFP32Proj(SparseLinearAttention):
    """:class:`~sla.SparseLinearAttention` whose ``proj`` stays float32 when the model is cast to half precision.

    ``model.to(torch.bfloat16)`` / ``model.half()`` cast every floating parameter; this module turns a cast to
    float16/bfloat16 of its own parameters into float32 instead (device moves and casts to float64 pass through).
    Reason: ``proj`` starts at zero and learns a small correction to the linear branch; bf16 parameters lose
    such updates (an AdamW step of 1e-5 on a weight of 0.1 is below bf16's resolution), which is why the
    paper's code and SimpleTuner keep it in float32. The operator casts ``proj`` to its compute dtype, and under
    ``torch.autocast`` the matmul itself runs in the autocast dtype, so speed is unaffected.

    Set ``keep_proj_fp32=False`` in :func:`sla.apply_sla` to get a plain :class:`~sla.SparseLinearAttention`
    instead (needed e.g. by FSDP1, which flattens the parameters of one unit into a single dtype).
    """

    def _apply(self, fn, recurse=True):
        def keep_fp32(t):
            out = fn(t)
            if isinstance(out, torch.Tensor) and out.dtype in _HALF_DTYPES:
                out = out.float()
            return out

        return super()._apply(keep_fp32, recurse)


def make_sla_module(head_dim: int, settings: SLASettings, *, backend: str, keep_proj_fp32: bool, device=None,
                    num_heads: int | None = None) -> SparseLinearAttention:
    """One SLA module for ``settings`` with its fp32 ``proj`` (identity for ``combine="mass"``, zero otherwise;
    ``"mass"`` and ``"pooled"`` also get their ``mass_offset``), placed on ``device``."""
    cls = SparseLinearAttentionFP32Proj if keep_proj_fp32 else SparseLinearAttention
    module = cls.from_settings(head_dim, settings, backend=backend, num_heads=num_heads)
    if device is not None:
        module.to(device)
    return module
