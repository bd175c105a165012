"""A patched diffusers Wan model running the SLA Triton kernels (Triton's CPU interpreter), forward and backward.

Checks the integration's hand-off to the kernels: strided ``(B, L, H, D) -> (B, H, L, D)`` views of q/k/v, the
float32 projection, gradients into every parameter. Runs in a subprocess because ``TRITON_INTERPRET=1`` must be
set before the kernels are first imported. On CUDA machines the kernels are tested by tests/gpu instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter test is for CPU CI", allow_module_level=True)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, sla
from sla.ops.sla.triton.testing import patch_triton_interpreter
patch_triton_interpreter()  # what tests/conftest.py does for the in-process tests
sys.path.insert(0, "tests")
import test_integration_diffusers as t
from sla.integrations.diffusers import sla_modules

model = t._wan(dict(t.WAN_T2V, num_layers=1))
inputs = t._wan_inputs()
inputs["hidden_states"] = inputs["hidden_states"][:, :, :2]  # 128 tokens, 8 blocks of 16
sla.apply_sla(model, backend="triton", **t.SMALL_BLOCKS)
t._perturb_projections(model)
model.train()
out = model(**inputs, return_dict=False)[0]
out.square().mean().backward()
grads = {n: p.grad.clone() for n, p in model.named_parameters()}
assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if not g.abs().sum() > 0]

model.zero_grad()
for module in sla_modules(model).values():
    module.backend = "torch"  # same block map rule, PyTorch implementation
ref = model(**inputs, return_dict=False)[0]
ref.square().mean().backward()
torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
for n, p in model.named_parameters():
    torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
print("OK")
"""


def test_wan_forward_backward_on_triton_kernels_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK")
