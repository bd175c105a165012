"""Comparing computed values across code paths that may run different CPU kernels.

Why not ``torch.equal``: the same model run on the same parameters can round differently when its tensors
come from another allocation (``from_pretrained`` loads through safetensors, ``deepcopy`` allocates anew):
oneDNN/MKL pick kernels by CPU model (AVX-512 on Intel, AVX2 on AMD EPYC) and by memory alignment, and the
kernels sum in different orders. A plain diffusers ``save_pretrained``/``from_pretrained`` round trip of a
tiny Wan, without SLA, differed by 4.8e-7 on an AMD EPYC while its parameters were bit-identical. So:
parameters are compared exactly (they are copied, never computed), and outputs within a few units in the
last place of their dtype, scaled by their magnitude.
"""

from __future__ import annotations

import torch


def rounding_tolerance(expected: torch.Tensor, ulps: int = 64) -> float:
    """``ulps`` units in the last place of ``expected``'s dtype at the magnitude of its largest element.

    64 ulps: a 2-3 layer tiny transformer chains a few dozen reductions, each of which may round by an ulp
    or two differently on another kernel; a real error (a wrong or missing projection, a dense layer that
    should be sparse) is orders of magnitude larger than this.
    """
    eps = torch.finfo(expected.dtype).eps
    return ulps * eps * max(float(expected.detach().abs().max()), 1.0)


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 64) -> None:
    """``actual`` equals ``expected`` up to floating-point rounding (see the module docstring)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=rounding_tolerance(expected, ulps))
