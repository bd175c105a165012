"""sla.apply_sla / remove_sla / save_sla / load_sla on tiny random diffusers Wan and CogVideoX models (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

sys.path.insert(0, os.path.dirname(__file__))
from _tolerances import assert_close_to_rounding  # noqa: E402

import sla  # noqa: E402
from sla.integrations.diffusers import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    CogVideoXSLAAttnProcessor,
    WanSLAAttnProcessor,
    find_self_attention_layers,
    is_sla_applied,
    set_sla_enabled,
    sla_disabled,
    sla_modules,
)

WAN_T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)
# I2V: image tokens enter attn2 through add_k_proj/add_v_proj; the processor hard-codes 512 text tokens.
WAN_I2V = dict(WAN_T2V, num_layers=2, image_dim=24, added_kv_proj_dim=32)
COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                 text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                 max_text_seq_length=8, use_rotary_positional_embeddings=True)
SMALL_BLOCKS = dict(block_q=16, block_k=16)  # tiny sequences still get several blocks


def _wan(cfg=WAN_T2V, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**cfg).eval()


def _wan_inputs(image=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    # 3 frames x 8 x 8 patches = 192 tokens = 12 blocks of 16
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 512 if image else 8, 32, generator=g))
    if image:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 7, 24, generator=g)
    return inputs


def _cogvideox(seed=0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**COGVIDEOX).eval()


def _cog_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    frames, h, w = 3, 16, 16  # 3 x 8 x 8 = 192 video tokens after 2x2 patches, plus 8 text tokens
    n = frames * (h // 2) * (w // 2)
    angles = torch.rand(n, 8, generator=g) * 6.28
    rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))  # (L_video, head_dim)
    return dict(hidden_states=torch.randn(1, frames, 4, h, w, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=torch.tensor([500]),
                image_rotary_emb=rope)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _perturb_projections(model, seed=3):
    # Stands in for fine-tuning: non-zero projections make the linear branch matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in sla_modules(model).values():
            module.proj.weight.copy_(torch.randn(module.proj.weight.shape, generator=g) * 0.1)
            module.proj.bias.copy_(torch.randn(module.proj.bias.shape, generator=g) * 0.1)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------------


def test_import_sla_does_not_import_diffusers():
    code = "import sys, sla; assert 'diffusers' not in sys.modules, 'diffusers imported'; print(sla.apply_sla)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "apply_sla" in out.stdout


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_wan_critical_one_equals_dense(image):
    model = _wan(WAN_I2V if image else WAN_T2V)
    inputs = _wan_inputs(image=image)
    dense = _run(model, inputs)
    sla.apply_sla(model, critical=1.0, negligible=0.0, **SMALL_BLOCKS)
    patched = _run(model, inputs)
    # All key blocks critical + zero-initialised proj: SLA is exact softmax attention.
    torch.testing.assert_close(patched, dense, rtol=1e-5, atol=1e-5)


def test_wan_defaults_finite_and_close():
    model = _wan()
    inputs = _wan_inputs()
    dense = _run(model, inputs)
    sla.apply_sla(model, **SMALL_BLOCKS)  # paper defaults: 5% critical (1 of 12 blocks here), 10% negligible
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    assert out.shape == dense.shape
    assert _rel(out, dense) < 0.1
    assert not torch.equal(out, dense)  # SLA really ran


def test_wan_layers_processors_and_parameters():
    model = _wan(WAN_I2V)
    cross_before = {n: a.processor for n, a in model.named_modules() if n.endswith("attn2")}
    self_before = {n: a.processor for n, a in model.named_modules() if n.endswith("attn1")}
    sla.apply_sla(model, **SMALL_BLOCKS)
    # one SLA module per self-attention layer, none on cross-attention
    assert list(sla_modules(model)) == [f"blocks.{i}.attn1" for i in range(2)]
    for name, attn in model.named_modules():
        if name.endswith("attn2"):
            assert attn.processor is cross_before[name] and not hasattr(attn, "sla")
        if name.endswith("attn1"):
            assert isinstance(attn.processor, WanSLAAttnProcessor) and attn.processor.original is self_before[name]
    sla_params = {n: p for n, p in model.named_parameters() if ".sla." in n}
    # the default combine="mass": Proj from the identity, one zero mass offset per head (2 heads)
    assert sorted(sla_params) == sorted(f"blocks.{i}.attn1.sla.{w}" for i in range(2)
                                        for w in ("proj.weight", "proj.bias", "mass_offset"))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in sla_params.values())
    for name, p in sla_params.items():
        expected = torch.eye(16) if name.endswith("proj.weight") else torch.zeros(2 if "offset" in name else 16)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0, msg=name)
    assert set(sla_params) <= set(model.state_dict())
    # distinct modules and parameters per layer
    assert len({id(m) for m in sla_modules(model).values()}) == 2


def test_wan_gradients_reach_every_parameter():
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    model.train()
    out = model(**_wan_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    for module in sla_modules(model).values():
        assert module.proj.weight.grad.abs().sum() > 0 and module.proj.bias.grad.abs().sum() > 0


def test_wan_remove_restores_outputs_and_processors():
    model = _wan()
    inputs = _wan_inputs()
    dense = _run(model, inputs)
    originals = {n: p for n, p in model.attn_processors.items()}
    keys_before = set(model.state_dict())
    sla.apply_sla(model, **SMALL_BLOCKS)
    _perturb_projections(model)
    assert not torch.equal(_run(model, inputs), dense)
    sla.remove_sla(model)
    assert not is_sla_applied(model)
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert set(model.state_dict()) == keys_before
    assert torch.equal(_run(model, inputs), dense)
    with pytest.raises(ValueError, match="not applied"):
        sla.remove_sla(model)


def test_wan_save_pretrained_and_sla_round_trip(tmp_path):
    from diffusers import WanTransformer3DModel

    model = _wan()
    inputs = _wan_inputs()
    sla.apply_sla(model, critical=0.1, negligible=0.2, feature_map="elu", dense_layers=[-1], **SMALL_BLOCKS)
    _perturb_projections(model)
    expected = _run(model, inputs)

    model.save_pretrained(tmp_path)  # the diffusers way: config.json + diffusion_pytorch_model.safetensors
    sla.save_sla(model, tmp_path)  # + sla_config.json + sla_weights.safetensors
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["family"] == "wan" and meta["config"]["feature_map"] == "elu"
    assert meta["config"]["dense_layers"] == [2] and meta["layers"] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic writes leave no temp files

    loaded = WanTransformer3DModel.from_pretrained(tmp_path).eval()  # a local folder, loaded the standard way
    assert not is_sla_applied(loaded)
    sla.load_sla(loaded, tmp_path)  # applies the saved settings, then the weights
    # Parameters come back bit for bit; outputs to rounding, since the loaded tensors may take other CPU kernels.
    assert_close_to_rounding(_run(loaded, inputs), expected)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, model.get_parameter(name)), name
    for name, module in sla_modules(loaded).items():
        ref = sla_modules(model)[name]
        assert torch.equal(module.proj.weight, ref.proj.weight) and torch.equal(module.proj.bias, ref.proj.bias)

    # Loaded in bf16 the diffusers way, the projections still come back in float32, bit for bit.
    half = sla.load_sla(WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16), tmp_path)
    for name, module in sla_modules(half).items():
        assert module.proj.weight.dtype == torch.float32
        assert torch.equal(module.proj.weight, sla_modules(model)[name].proj.weight)

    # Loading into a model that already has SLA with the same settings works; with other settings it refuses.
    sla.load_sla(loaded, tmp_path)
    other = _wan()
    sla.apply_sla(other, **SMALL_BLOCKS)
    with pytest.raises(ValueError, match="remove_sla"):
        sla.load_sla(other, tmp_path)


def test_load_sla_rejects_mismatched_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    sla.save_sla(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors.pop("blocks.0.attn1.sla.proj.bias")
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    fresh = _wan()
    with pytest.raises(ValueError, match="missing"):
        sla.load_sla(fresh, tmp_path)
    assert not sla.integrations.diffusers.is_sla_applied(fresh)  # a failed load leaves no SLA behind
    with pytest.raises(ValueError, match="does not exist"):
        sla.load_sla(_wan(), tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        sla.save_sla(model, tmp_path / "file")


def _sla_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".sla." in n}


def _saved_model(tmp_path):
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    _perturb_projections(model)
    sla.save_sla(model, tmp_path)
    return model


def _edit_weights(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, tmp_path / WEIGHTS_NAME)


def _edit_config(tmp_path, edit):
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    edit(meta)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))


def _assert_refused_and_untouched(tmp_path, match):
    """load_sla refuses, and neither a plain model nor one that already has SLA changes at all."""
    fresh = _wan()
    with pytest.raises(ValueError, match=match):
        sla.load_sla(fresh, tmp_path)
    assert not is_sla_applied(fresh) and not any(".sla." in n for n, _ in fresh.named_parameters())
    patched = _wan()
    sla.apply_sla(patched, **SMALL_BLOCKS)
    _perturb_projections(patched, seed=7)
    before = _sla_params(patched)
    with pytest.raises(ValueError, match=match):
        sla.load_sla(patched, tmp_path)
    after = _sla_params(patched)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_load_sla_checks_every_layer_before_writing_any(tmp_path):
    # A wrong shape in the last layer used to be found after layers 0..k-1 had been overwritten.
    _saved_model(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"blocks.2.attn1.sla.proj.weight": torch.zeros(16, 8)}))
    _assert_refused_and_untouched(tmp_path, r"blocks\.2\.attn1\.sla\.proj\.weight .* saved shape \(16, 8\)")


@pytest.mark.parametrize("bad, match", [
    (torch.ones(16, 16, dtype=torch.int64), "has dtype torch.int64; SLA projections are floating point"),
    (torch.full((16, 16), float("nan")), "holds 256 NaN/Inf value"),
    (torch.zeros(16, 16).index_fill_(0, torch.tensor([3]), float("inf")), "holds 16 NaN/Inf value"),
])
def test_load_sla_refuses_non_float_and_non_finite_weights(tmp_path, bad, match):
    _saved_model(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"blocks.1.attn1.sla.proj.weight": bad}))
    _assert_refused_and_untouched(tmp_path, match)


def test_load_sla_config_errors_name_the_file(tmp_path):
    _saved_model(tmp_path)
    good = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(good[:-20])  # truncated JSON
    _assert_refused_and_untouched(tmp_path, rf"{CONFIG_NAME}' is not valid JSON \(.* at line \d+, column \d+\)")
    assert str(tmp_path) in _error(lambda: sla.load_sla(_wan(), tmp_path))
    for key in ("config", "family", "layers"):
        (tmp_path / CONFIG_NAME).write_text(good)
        _edit_config(tmp_path, lambda m: m.pop(key))
        _assert_refused_and_untouched(tmp_path, f"lacks '{key}'")
    (tmp_path / CONFIG_NAME).write_text(good)
    _edit_config(tmp_path, lambda m: m["config"].update(critical=2.0))
    _assert_refused_and_untouched(tmp_path, "invalid SLA settings: critical=2.0 is outside")
    (tmp_path / CONFIG_NAME).write_text(good)
    _edit_config(tmp_path, lambda m: m.update(family="cogvideox"))
    _assert_refused_and_untouched(tmp_path,
                                  "saved from a 'cogvideox' model, but WanTransformer3DModel is a 'wan' model")
    (tmp_path / CONFIG_NAME).write_text(good)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not safetensors")
    _assert_refused_and_untouched(tmp_path, "is not a readable safetensors file")


def test_load_sla_refuses_weights_of_another_family(tmp_path):
    _saved_model(tmp_path)  # saved from a Wan
    cog = _cogvideox()
    with pytest.raises(ValueError, match="saved from a 'wan' model, but CogVideoXTransformer3DModel is a 'cogvideox'"):
        sla.load_sla(cog, tmp_path)
    assert not is_sla_applied(cog)


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    raise AssertionError("no ValueError")


def test_wan_dense_layers_and_dense_steps():
    model = _wan()
    inputs = _wan_inputs()
    early = dict(inputs, timestep=torch.tensor([950]))
    dense, dense_early = _run(model, inputs), _run(model, early)
    original0 = model.blocks[0].attn1.processor
    sla.apply_sla(model, dense_layers=(0,), dense_timestep_threshold=900, **SMALL_BLOCKS)
    assert model.blocks[0].attn1.processor is original0 and not hasattr(model.blocks[0].attn1, "sla")
    assert list(sla_modules(model)) == ["blocks.1.attn1", "blocks.2.attn1"]
    sparse = _run(model, inputs)  # timestep 500 < 900: SLA
    assert not torch.equal(sparse, dense)
    assert torch.equal(_run(model, early), dense_early)  # timestep >= 900: a dense step
    with sla_disabled(model):
        assert torch.equal(_run(model, inputs), dense)
    assert torch.equal(_run(model, inputs), sparse)
    set_sla_enabled(model, False)
    assert torch.equal(_run(model, inputs), dense)
    set_sla_enabled(model, True)
    assert torch.equal(_run(model, inputs), sparse)


def test_wan_fused_projections_and_backend_passthrough():
    model = _wan()
    inputs = _wan_inputs()
    dense = _run(model, inputs)
    model.fuse_qkv_projections()
    sla.apply_sla(model, critical=1.0, negligible=0.0, **SMALL_BLOCKS)
    torch.testing.assert_close(_run(model, inputs), dense, rtol=1e-5, atol=1e-5)
    model.set_attention_backend("_native_math")  # reaches the original processors (used for dense steps)
    assert all(p.original._attention_backend == "_native_math" for p in
               (model.blocks[i].attn1.processor for i in range(3)))
    model.reset_attention_backend()


def test_wan_keep_proj_fp32_through_casts():
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    model.to(torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert all(m.proj.weight.dtype == torch.float32 for m in sla_modules(model).values())
    out = _run(model, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _wan_inputs().items()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.to(torch.float64)  # wider casts follow the model
    assert all(m.proj.weight.dtype == torch.float64 for m in sla_modules(model).values())

    plain = _wan()
    sla.apply_sla(plain, keep_proj_fp32=False, **SMALL_BLOCKS)
    plain.half()
    assert all(m.proj.weight.dtype == torch.float16 for m in sla_modules(plain).values())


def test_wan_attention_mask_is_an_error_not_a_fallback():
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    attn = model.blocks[0].attn1
    x = torch.randn(1, 20, 32)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, None, torch.ones(1, 1, 20, 20, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, torch.randn(1, 5, 32), None, None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_q=48), "block_q=48"),
        (dict(block_k=256), "block_k=256"),
        (dict(critical=1.5), "critical"),
        (dict(negligible=-0.1), "negligible"),
        (dict(critical=0.6, negligible=0.6), "critical \\+ negligible"),
        (dict(feature_map="cos"), "feature_map"),
        (dict(linear_scope="some"), "linear_scope"),
        (dict(backend="cuda"), "backend"),
        (dict(dense_layers=[7]), "out of range"),
        (dict(dense_layers=[0, 1, 2]), "every self-attention layer"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    model = _wan()
    with pytest.raises(ValueError, match=match):
        sla.apply_sla(model, **kwargs)
    assert not is_sla_applied(model) and not any(".sla." in n for n, _ in model.named_parameters())


def test_unrecognised_models_and_double_apply_raise():
    with pytest.raises(ValueError, match="no self-attention layer"):
        sla.apply_sla(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="pipe.transformer"):
        sla.apply_sla(object())
    from diffusers import FluxTransformer2DModel  # joint attention through FluxAttention: not handled here

    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="wrap_sdpa_self_attention"):
        sla.apply_sla(flux)
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    with pytest.raises(ValueError, match="already applied"):
        sla.apply_sla(model, **SMALL_BLOCKS)
    # a head_dim the GPU kernels cannot run needs the PyTorch backend chosen explicitly
    odd = _wan(dict(WAN_T2V, attention_head_dim=24))
    with pytest.raises(ValueError, match="backend='torch'"):
        sla.apply_sla(odd)
    sla.apply_sla(odd, backend="torch", **SMALL_BLOCKS)


def test_integration_checks_use_the_kernels_own_limits(monkeypatch):
    # One definition of what the kernels run (sla/ops/sla/triton/limits.py, no Triton import): a block size the
    # kernels refuse is refused at apply time too, and tightening the limits tightens the integration.
    from sla.integrations import _common
    from sla.ops.sla.triton import limits

    assert _common.SUPPORTED_BLOCKS is limits.SUPPORTED_BLOCKS
    assert _common.SUPPORTED_HEAD_DIMS is limits.SUPPORTED_HEAD_DIMS
    with pytest.raises(ValueError, match="block_q=48 cannot run on the SLA GPU kernels"):
        _common.check_integration_config(sla.SLASettings(block_q=48))


# --------------------------------------------------------------------------------------------------- CogVideoX


def test_cogvideox_equivalence_layers_gradients_and_round_trip(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    model = _cogvideox()
    inputs = _cog_inputs()
    dense = _run(model, inputs)
    layers = find_self_attention_layers(model)
    assert [(n, f) for n, _, f in layers] == [(f"transformer_blocks.{i}.attn1", "cogvideox") for i in range(2)]

    sla.apply_sla(model, critical=1.0, negligible=0.0, **SMALL_BLOCKS)
    assert all(isinstance(m.processor, CogVideoXSLAAttnProcessor) for _, m, _ in layers)
    torch.testing.assert_close(_run(model, inputs), dense, rtol=1e-5, atol=1e-5)
    sla.remove_sla(model)
    assert torch.equal(_run(model, inputs), dense)

    sla.apply_sla(model, **SMALL_BLOCKS)
    out = _run(model, inputs)
    assert torch.isfinite(out).all() and _rel(out, dense) < 0.1 and not torch.equal(out, dense)

    model.train()
    model(**inputs, return_dict=False)[0].square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # CogVideoX's last block's text stream (norm2 text gate, ff on text) does not reach the video output.
    assert all(".sla." not in n for n in missing)
    assert all(m.proj.weight.grad.abs().sum() > 0 for m in sla_modules(model).values())
    model.zero_grad(set_to_none=True)
    model.eval()

    _perturb_projections(model)
    expected = _run(model, inputs)
    model.save_pretrained(tmp_path)
    sla.save_sla(model, tmp_path)
    loaded = sla.load_sla(CogVideoXTransformer3DModel.from_pretrained(tmp_path).eval(), tmp_path)
    for name, param in loaded.named_parameters():  # the weights come back bit for bit ...
        assert torch.equal(param, model.get_parameter(name)), name
    assert_close_to_rounding(_run(loaded, inputs), expected)  # ... the outputs to rounding (other allocations)


# ------------------------------------------------------------------------------------------ compile and LoRA


def test_wan_sla_under_torch_compile():
    model = _wan()
    inputs = _wan_inputs()
    sla.apply_sla(model, **SMALL_BLOCKS)
    _perturb_projections(model)
    expected = _run(model, inputs)
    compiled = torch.compile(model, backend="eager")  # dynamo traces the processors; no C++ compiler needed
    torch.testing.assert_close(_run(compiled, inputs), expected, rtol=1e-6, atol=1e-6)
    # ... and backward through the traced graph gives the eager gradients (to rounding: the same ops, run by
    # dynamo's eager backend)
    grads = {}
    for tag, m in (("eager", model), ("compiled", compiled)):
        model.zero_grad(set_to_none=True)
        m(**inputs, return_dict=False)[0].square().mean().backward()
        grads[tag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["compiled"].keys() == grads["eager"].keys() and any(".sla." in n for n in grads["eager"])
    for name, g in grads["eager"].items():
        assert_close_to_rounding(grads["compiled"][name], g)


def test_wan_sla_with_peft_lora_adapters():
    pytest.importorskip("peft")
    from peft import LoraConfig

    model = _wan()
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    sla.apply_sla(model, **SMALL_BLOCKS)
    for name, p in model.named_parameters():  # LoRA fine-tuning: adapters and SLA projections train
        p.requires_grad_(".lora_" in name or ".sla." in name)
    model.train()
    model(**_wan_inputs(), return_dict=False)[0].square().mean().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".sla.proj" in n for n in trained) and any("attn1.to_q.lora_A" in n for n in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_deepcopy_gives_an_independent_patched_model():
    import copy

    model = _wan()
    inputs = _wan_inputs()
    sla.apply_sla(model, dense_timestep_threshold=900, **SMALL_BLOCKS)
    _perturb_projections(model)
    expected = _run(model, inputs)
    ema = copy.deepcopy(model)  # e.g. an EMA copy during fine-tuning
    # New allocations may take other CPU kernels: outputs agree to rounding (the model itself, below, exactly).
    assert_close_to_rounding(_run(ema, inputs), expected)
    assert ema.blocks[0].attn1.sla.proj.weight is not model.blocks[0].attn1.sla.proj.weight
    assert ema.blocks[0].attn1.processor.controller is ema._sla_controller
    _run(ema, dict(inputs, timestep=torch.tensor([950])))  # the copy's hook sets the copy's state only
    assert ema._sla_controller.dense_step and not model._sla_controller.dense_step
    set_sla_enabled(ema, False)
    assert torch.equal(_run(model, inputs), expected)


def test_wan_hands_sla_transposed_views_not_copies():
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    seen = []
    model.blocks[0].attn1.sla.register_forward_pre_hook(lambda module, args: seen.append(args))
    _run(model, _wan_inputs())
    (q, k, v), = seen
    assert q.shape == (1, 2, 192, 16)  # (B, H, L, D)
    for t in (q, k, v):  # a (B, L, H, D) contiguous tensor seen through transpose(1, 2): no copy was made
        assert not t.is_contiguous() and t.transpose(1, 2).is_contiguous()


def test_load_sla_backend_is_a_runtime_choice(tmp_path):
    model = _wan()
    sla.apply_sla(model, **SMALL_BLOCKS)
    _perturb_projections(model)
    sla.save_sla(model, tmp_path)
    inputs = _wan_inputs()
    restored = sla.load_sla(_wan(), tmp_path, backend="reference")
    torch.testing.assert_close(_run(restored, inputs), _run(model, inputs), atol=1e-5, rtol=1e-4)
    again = _wan()
    sla.apply_sla(again, **SMALL_BLOCKS, backend="torch")
    sla.load_sla(again, tmp_path)  # saved with backend="auto": the settings still match
    torch.testing.assert_close(_run(again, inputs), _run(model, inputs))


def test_wan_mass_combine_apply_gradients_and_round_trip(tmp_path):
    model = sla.apply_sla(_wan(), critical=0.25, negligible=0.25, combine="mass", **SMALL_BLOCKS)
    for module in sla_modules(model).values():
        assert module.combine == "mass" and module.mass_offset.shape == (2,)
        assert module.mass_offset.dtype == torch.float32 and not module.mass_offset.any()
        torch.testing.assert_close(module.proj.weight, torch.eye(16), rtol=0, atol=0)  # identity start
    names = [n for n, _ in model.named_parameters() if n.endswith(".sla.mass_offset")]
    assert len(names) == 3
    out = model(**_wan_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if ".sla." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for module in sla_modules(model).values():
            module.mass_offset.normal_()
    sla.save_sla(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"]["combine"] == "mass"
    restored = sla.load_sla(_wan(), tmp_path)
    for (na, a), (nb, b) in zip(sla_modules(model).items(), sla_modules(restored).items()):
        assert na == nb and b.combine == "mass"
        torch.testing.assert_close(a.mass_offset, b.mass_offset, rtol=0, atol=0)


def test_configs_saved_before_combine_load_as_paper(tmp_path):
    model = sla.apply_sla(_wan(), critical=0.25, negligible=0.25, combine="paper", **SMALL_BLOCKS)
    sla.save_sla(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["config"]["combine"]  # what files written before the option look like
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    restored = sla.load_sla(_wan(), tmp_path)
    assert all(m.combine == "paper" and m.mass_offset is None for m in sla_modules(restored).values())


def test_default_combine_is_pooled_cov_with_token_tiles_and_mass_without(tmp_path):
    from sla.settings import resolve_combine

    raster = sla.apply_sla(_wan(), critical=0.25, negligible=0.25, **SMALL_BLOCKS)
    assert {m.combine for m in sla_modules(raster).values()} == {"mass"}
    tiled = sla.apply_sla(_wan(), critical=0.25, negligible=0.25, token_tile=(1, 4, 4), **SMALL_BLOCKS)
    assert {m.combine for m in sla_modules(tiled).values()} == {"pooled_cov"}
    sla.save_sla(tiled, tmp_path)  # the file records the rule, not "auto": it loads the same under a later default
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["combine"] == "pooled_cov"
    explicit = sla.apply_sla(_wan(), critical=0.25, negligible=0.25, token_tile=(1, 4, 4), combine="mass",
                             **SMALL_BLOCKS)
    assert {m.combine for m in sla_modules(explicit).values()} == {"mass"}
    assert resolve_combine("paper", (4, 4, 4)) == "paper"
    with pytest.raises(ValueError, match="combine='sum' is unknown; choose 'auto'"):
        resolve_combine("sum", None)


def test_bad_combine_is_rejected():
    with pytest.raises(ValueError, match="combine='sum' is unknown"):
        sla.apply_sla(_wan(), combine="sum", **SMALL_BLOCKS)


def test_context_parallel_is_refused_where_sla_cannot_run_it():
    """A context-parallel config reaching CogVideoX's SLA processor (joint text+video sequence) or asking Wan's for
    ring attention raises, naming what to use; nothing attends over one rank's shard alone. (The working Ulysses
    path runs with 2 processes in test_parallel_training.py.)"""
    from types import SimpleNamespace

    def config(ring, ulysses):
        mesh = SimpleNamespace(get_group=lambda: "group")  # never used: the processors refuse before any exchange
        return SimpleNamespace(context_parallel_config=SimpleNamespace(
            ring_degree=ring, ulysses_degree=ulysses, ulysses_anything=False, _ulysses_mesh=mesh))

    cog = sla.apply_sla(_cogvideox(), critical=0.25, negligible=0.25, **SMALL_BLOCKS)
    for _, attn, _ in find_self_attention_layers(cog):
        attn.processor._parallel_config = config(1, 2)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="not supported with SLA in this model family"):
        cog(**_cog_inputs(), return_dict=False)
    wan = sla.apply_sla(_wan(), critical=0.25, negligible=0.25, **SMALL_BLOCKS)
    for _, attn, _ in find_self_attention_layers(wan):
        attn.processor._parallel_config = config(2, 1)
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"ring attention .*ulysses_degree=N"):
        wan(**_wan_inputs(), return_dict=False)
