"""``backend="triton"``: the fused kernels as an SLA backend object (``sla/ops/sla/backend.py``).

This module imports neither Triton nor the kernels: the operator's interface registers this object at import time
(so ``import sla`` stays light), and the kernel modules are imported on the first call that needs them.
"""

from __future__ import annotations

import importlib.util

import torch

from ..backend import Backend
from .limits import check_triton_device, check_triton_inputs

# What the Triton block-map builder must build for each use of the map (``needs``): the forward kernels read only
# the per-row LUT, the backward's dK/dV kernel also the critical transpose; a map returned to the caller is
# complete. Skipping the transposes is worth it: bench/RESULTS.md ("Block classification on the GPU").
_TRANSPOSES = {"forward": "none", "backward": "critical", "complete": "all"}


_INSTALLED: dict[str, bool] = {}


def _triton_installed() -> bool:
    # Looked up once, outside any compiled region: dynamo refuses to trace importlib's find_spec, so under
    # torch.compile the answer must already be known (a traced call into the kernels needs triton anyway).
    if "triton" not in _INSTALLED:
        if torch.compiler.is_compiling():
            return True
        _INSTALLED["triton"] = importlib.util.find_spec("triton") is not None
    return _INSTALLED["triton"]


class TritonBackend(Backend):
    """The Triton kernels (``sla/ops/sla/triton``) with the Triton block-map builder: CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``; float16, bfloat16, float32 (limits in ``limits.py``)."""

    name = "triton"

    def check_device(self, device: torch.device) -> None:
        if not _triton_installed():
            raise ValueError("backend='triton' needs the triton package, which is not installed; install it (pip "
                             "install 'sparse-linear-attention[gpu]') or pass backend='torch' for the PyTorch path")
        check_triton_device(device)

    def check_inputs(self, q, block_q, block_k) -> None:
        check_triton_inputs(q, block_q, block_k)

    def build_block_map(self, q, k, *, critical, negligible, block_q, block_k, needs="complete"):
        # One builder for eager and compiled runs: under torch.compile the builder is the opaque op
        # sla::triton_block_map, so both pick the same blocks.
        from .blockmap import build_block_map_triton

        return build_block_map_triton(q.detach(), k.detach(), critical=critical, negligible=negligible,
                                      block_q=block_q, block_k=block_k, transposes=_TRANSPOSES[needs])

    def attend(self, q, k, v, block_map, *, feature_map, linear_scope, proj_weight, proj_bias, scale, combine,
               mass_offset):
        from .api import triton_sparse_linear_attention

        return triton_sparse_linear_attention(q, k, v, block_map, feature_map=feature_map, linear_scope=linear_scope,
                                              proj_weight=proj_weight, proj_bias=proj_bias, scale=scale,
                                              combine=combine, mass_offset=mass_offset)


TRITON_BACKEND = TritonBackend()
