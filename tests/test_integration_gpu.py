"""GPU checks of the diffusers integration (marked ``gpu``; skipped without CUDA): a bf16 Wan model with SLA on
the Triton kernels against the PyTorch path and against dense attention, forward and backward."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():  # skip before importing diffusers (seconds) on CPU CI
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
pytest.importorskip("diffusers")

import sla  # noqa: E402
from sla.integrations.diffusers import sla_modules  # noqa: E402

pytestmark = pytest.mark.gpu

# head_dim 64 and 3,072 tokens (48 blocks of 64): the kernels' real tile sizes.
CFG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=512, num_layers=2, cross_attn_norm=True)


def _model_and_inputs():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**CFG).to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 6, 32, 64, device="cuda", generator=g).bfloat16(),
                  timestep=torch.tensor([500.0], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 32, 64, device="cuda", generator=g).bfloat16())
    return model, inputs


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_critical_one_matches_dense_flash():
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
        sla.apply_sla(model, critical=1.0, negligible=0.0)
        out = model(**inputs, return_dict=False)[0]
    assert _rel(out, dense) < 3e-2


def test_triton_matches_torch_path_forward_and_backward():
    model, inputs = _model_and_inputs()
    sla.apply_sla(model)  # backend="auto" -> Triton on CUDA
    with torch.no_grad():
        for m in sla_modules(model).values():
            m.proj.weight.normal_(0, 0.1)
    results = {}
    for backend in ("triton", "torch"):
        for m in sla_modules(model).values():
            m.backend = backend
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    (out_t, g_t), (out_p, g_p) = results["triton"], results["torch"]
    assert torch.isfinite(out_t).all() and _rel(out_t, out_p) < 3e-2
    for name in ("blocks.0.attn1.sla.proj.weight", "blocks.0.attn1.to_q.weight", "blocks.1.attn1.to_k.weight"):
        assert _rel(g_t[name], g_p[name]) < 5e-2, name
