"""What the SLA Triton kernels can run, and the checks that say so. Imports torch only, never Triton.

The one place these limits are written down: the Triton backend checks its inputs with them, and the diffusers
and SDPA integrations (``sla/integrations/_common.py``) check a configuration against them when a model is
patched, usually on the CPU before it moves to a GPU, without importing Triton.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims and block sizes are tile sizes of the kernels: powers of two (``tl.arange``), at least 16 (the smallest
# ``tl.dot`` operand); nothing above 128 has been run.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
# fp32 inputs on a GPU: the fp32 tiles of the dQ kernel need more shared memory than a GPU has above this head
# dim (bench/RESULTS.md, "Measurements behind code choices"); the interpreter has no such limit. Measured, not
# derived from launch_config's estimate, which leaves out the extra copies that tf32x3 dots make; and a constant,
# so the integrations can check a configuration on the CPU before there is a device to ask.
MAX_FP32_HEAD_DIM_ON_GPU = 64


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(device: torch.device) -> None:
    """The kernels run on CUDA devices, or on the CPU under Triton's interpreter; raise ``ValueError`` otherwise."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"backend='triton' needs CUDA tensors, got tensors on {device}; use backend='torch' (or 'auto') on CPU, or "
        f"set TRITON_INTERPRET=1 before importing sla to run the kernels in Triton's interpreter (slow, for tests)"
    )


def check_triton_inputs(q: torch.Tensor, block_q: int, block_k: int) -> None:
    """Raise a clear error for inputs the kernels cannot run: q ``(B, H, L, D)``'s device, dtype and head dim, and
    the block sizes. Never a silent switch to another implementation."""
    check_triton_device(q.device)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports {SUPPORTED_DTYPES}, got {q.dtype}; use backend='torch' for "
                        f"float64, or cast the inputs")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head_dim in {SUPPORTED_HEAD_DIMS}, got {D}; use "
                         f"backend='torch' for other head dims")
    if q.dtype == torch.float32 and D > MAX_FP32_HEAD_DIM_ON_GPU and q.device.type == "cuda":
        raise ValueError(f"backend='triton' supports float32 inputs only up to head_dim {MAX_FP32_HEAD_DIM_ON_GPU} on "
                         f"the GPU (got {D}): the fp32 tiles exceed shared memory. Use bfloat16/float16 inputs, or "
                         f"backend='torch'")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b not in SUPPORTED_BLOCKS:
            raise ValueError(f"backend='triton' supports {name} in {SUPPORTED_BLOCKS} (kernel tile sizes), got {b}")
