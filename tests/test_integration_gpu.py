"""GPU checks of the diffusers integration (marked ``gpu``; skipped without CUDA): a bf16 Wan model with SLA on the
Triton kernels against dense attention and against the reference, forward and backward, under the kernel tests'
rule (``sla/ops/sla/triton/testing.py``) applied to the whole model:

    max|kernel run - gold| <= factor * max|pt run - gold| + ulp floor

* kernel run: the bf16 model with SLA on the Triton kernels;
* pt run: the same bf16 model with the attention computed in bf16 by a reference (dense SDPA, or the dense SLA
  reference with ``upcast=False``): what the model's precision gives without the kernels;
* gold: the same weights and inputs in float64 with the reference attention.

Every run of one check uses the block maps the kernel run built (recorded per layer and replayed), so the runs
differ in rounding only, never in which blocks were chosen. The model's own bf16 layers dominate both errors,
so a kernel that is worse than bf16 attention shows up as a ratio above the factor.
"""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():  # skip before importing diffusers (seconds) on CPU CI
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
pytest.importorskip("diffusers")

import sla  # noqa: E402
from sla.integrations.diffusers import sla_modules  # noqa: E402
from sla.ops.sla.naive import naive_sparse_linear_attention  # noqa: E402
from sla.ops.sla.triton.testing import RULE_FACTORS, assert_within_rule  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = "cuda"
# head_dim 64 and 3,072 tokens (48 blocks of 64): the kernels' real tile sizes.
CFG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=512, num_layers=2, cross_attn_norm=True)
# Gradients checked: SLA's projection and offsets, and the q/k projections that reach SLA through q and k.
CHECKED_GRADS = {"blocks.0.attn1.sla.proj.weight": "dW", "blocks.1.attn1.sla.mass_offset": "d_mass_offset",
                 "blocks.0.attn1.to_q.weight": "dq", "blocks.1.attn1.to_k.weight": "dk"}


def _model_and_inputs(device=DEV):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**CFG).to(device, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 6, 32, 64, device=device, generator=g).bfloat16(),
                  timestep=torch.tensor([500.0], device=device),
                  encoder_hidden_states=torch.randn(1, 32, 64, device=device, generator=g).bfloat16())
    return model, inputs


def _in_float64(model, inputs):
    """A float64 copy of ``model`` (the same weights, exactly) and of the float inputs."""
    twin = copy.deepcopy(model).double()
    return twin, {k: (v.double() if k != "timestep" else v) for k, v in inputs.items()}


class _ReplayedMaps:
    """Routes every SLA layer of a model through ``attend(module, q, k, v, block_map)`` with the block map recorded
    for that layer, or records the map on the first call (``record=True``: the layer runs its own forward)."""

    def __init__(self):
        self.maps = {}

    def install(self, model, *, record=False, reference_upcast=True):
        for name, module in sla_modules(model).items():
            module.forward = self._forward(name, module, record, reference_upcast)

    def _forward(self, name, module, record, upcast):
        cls_forward = type(module).forward

        def forward(q, k, v, **kwargs):
            if record:
                out, info = cls_forward(module, q, k, v, return_info=True, **kwargs)
                self.maps[name] = info.block_map
                return out
            offset = module.mass_offset
            if offset is not None and module.num_heads is None:
                offset = offset.repeat(q.shape[1])  # one shared offset, as SparseLinearAttention.forward does
            return naive_sparse_linear_attention(
                q, k, v, self.maps[name], feature_map=module.feature_map, linear_scope=module.linear_scope,
                proj_weight=module.proj.weight, proj_bias=module.proj.bias, combine=module.combine,
                mass_offset=offset, upcast=upcast)

        return forward


def _forward_backward(model, inputs):
    """Output and parameter gradients for a fixed random cotangent (gradients of order one, so that the ulp floor
    does not swamp them, as a mean-square loss over 100k outputs would)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    g = torch.Generator(device=out.device).manual_seed(2)
    out.backward(torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32).to(out.dtype))
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_critical_one_matches_dense_attention_within_the_rule():
    # SLA at critical=1 is dense attention: against the same bf16 model on dense SDPA (pt) and in float64 (gold).
    model, inputs = _model_and_inputs()
    gold_model, gold_inputs = _in_float64(model, inputs)
    with torch.no_grad():
        gold = gold_model(**gold_inputs, return_dict=False)[0]
        pt = model(**inputs, return_dict=False)[0]
        sla.apply_sla(model, critical=1.0, negligible=0.0)
        out = model(**inputs, return_dict=False)[0]
    assert_within_rule("model output", out, gold, pt, RULE_FACTORS["o"])


def test_triton_forward_and_backward_within_the_rule():
    model, inputs = _model_and_inputs()
    sla.apply_sla(model)  # backend="auto" -> Triton on CUDA, combine="mass"
    with torch.no_grad():  # stands in for fine-tuning: the linear branch and the offsets matter
        for m in sla_modules(model).values():
            m.proj.weight.add_(0.1 * torch.randn_like(m.proj.weight))
            m.mass_offset.normal_()
    gold_model, gold_inputs = _in_float64(model, inputs)
    pt_model = copy.deepcopy(model)
    maps = _ReplayedMaps()
    maps.install(model, record=True)
    out, grads = _forward_backward(model, inputs)
    assert len(maps.maps) == CFG["num_layers"]
    maps.install(pt_model, reference_upcast=False)
    pt, pt_grads = _forward_backward(pt_model, inputs)
    maps.install(gold_model)
    gold, gold_grads = _forward_backward(gold_model, gold_inputs)
    assert_within_rule("model output", out, gold, pt, RULE_FACTORS["o"])
    for name, kind in CHECKED_GRADS.items():
        assert_within_rule(name, grads[name], gold_grads[name], pt_grads[name], RULE_FACTORS[kind])
