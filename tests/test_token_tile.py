"""Token tiles (``token_tile``): SLA's blocks over 3D tiles of video tokens instead of raster runs."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tolerances import assert_close_to_rounding  # noqa: E402

import sla  # noqa: E402
from sla.ops.sla.tiles import check_token_tile, tile_permutation  # noqa: E402


def test_tile_permutation_divisible_grid_lists_tiles_in_order():
    F, H, W, tf, th, tw = 4, 6, 8, 2, 3, 4
    perm, inv = tile_permutation((F, H, W), (tf, th, tw))
    # Independent construction: split each axis into (tiles, inside) and move the inside axes last.
    expected = (torch.arange(F * H * W).view(F // tf, tf, H // th, th, W // tw, tw)
                .permute(0, 2, 4, 1, 3, 5).reshape(-1))
    assert torch.equal(perm, expected)
    x = torch.randn(2, F * H * W, 3)
    assert torch.equal(x[:, perm][:, inv], x)


def test_tile_permutation_ragged_grid_is_a_bijection_with_compact_tiles():
    F, H, W = 3, 5, 7
    perm, inv = tile_permutation((F, H, W), (2, 2, 4))
    assert sorted(perm.tolist()) == list(range(F * H * W))
    assert torch.equal(perm[inv], torch.arange(F * H * W))
    # The first 16 tokens of the new order are exactly the full first tile: frames 0-1, rows 0-1, columns 0-3.
    f, h, w = perm[:16] // (H * W), (perm[:16] // W) % H, perm[:16] % W
    assert f.max() == 1 and h.max() == 1 and w.max() == 3


def test_tile_larger_than_grid_keeps_raster_order():
    perm, _ = tile_permutation((2, 3, 4), (8, 8, 8))
    assert torch.equal(perm, torch.arange(24))


@pytest.mark.parametrize("transposed", [True, False])
def test_permute_tokens_gathers_keeps_the_layout_and_its_gradient_is_the_inverse_gather(transposed):
    from sla.ops.sla.tiles import permute_tokens

    perm, inv = tile_permutation((3, 4, 4), (1, 2, 2))
    base = torch.randn(2, 48, 3, 5, dtype=torch.float64)  # (B, L, H, D), as diffusers' processors hold q, k, v
    x = (base.transpose(1, 2) if transposed else base.transpose(1, 2).contiguous()).requires_grad_()
    y = permute_tokens(x, perm, inv)
    assert torch.equal(y, x[:, :, perm])  # a gather: no arithmetic, so bit-exact on any CPU
    assert y.transpose(1, 2).is_contiguous() == transposed
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g[:, :, inv])
    torch.autograd.gradcheck(lambda t: permute_tokens(t, perm, inv), (x.detach().clone().requires_grad_(),))
    compiled = torch.compile(lambda t: permute_tokens(t, perm, inv), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), y)


@pytest.mark.parametrize("bad", ["4,4,4", (4, 4), (4, 0, 4), (4, 4.0, 4), (True, 4, 4), 4])
def test_bad_token_tile_is_refused_with_its_name(bad):
    with pytest.raises(ValueError, match="token_tile must be None or three positive ints"):
        check_token_tile(bad)


# ------------------------------------------------------------------------------------------------------------
# diffusers integration

diffusers = pytest.importorskip("diffusers")
from test_integration_diffusers import SMALL_BLOCKS, _cogvideox, _run, _wan, _wan_inputs  # noqa: E402


def test_wan_token_tile_critical_one_equals_dense():
    model = _wan()
    inputs = _wan_inputs()
    dense = _run(model, inputs)
    sla.apply_sla(model, critical=1.0, negligible=0.0, token_tile=(1, 4, 4), **SMALL_BLOCKS)
    # Every block critical: attention is exact in any token order, so the output is dense attention's.
    torch.testing.assert_close(_run(model, inputs), dense, rtol=1e-5, atol=1e-5)


def test_wan_token_tile_feeds_sla_the_tiled_tokens_and_restores_the_order():
    inputs = _wan_inputs()  # 3 frames x 8 x 8 tokens
    perm, _ = tile_permutation((3, 8, 8), (1, 4, 4))
    seen = {}

    def record(tag):
        def hook(module, args, kwargs):
            seen.setdefault(tag, [t.detach().clone() for t in args[:3]])
        return hook

    raster, tiled = _wan(), _wan()
    sla.apply_sla(raster, critical=0.25, negligible=0.25, **SMALL_BLOCKS)
    sla.apply_sla(tiled, critical=0.25, negligible=0.25, token_tile=(1, 4, 4), **SMALL_BLOCKS)
    first = "blocks.0.attn1"
    raster.get_submodule(first).sla.register_forward_pre_hook(record("raster"), with_kwargs=True)
    tiled.get_submodule(first).sla.register_forward_pre_hook(record("tiled"), with_kwargs=True)
    out_raster, out_tiled = _run(raster, inputs), _run(tiled, inputs)
    for a, b in zip(seen["raster"], seen["tiled"]):
        # The same q, k, v, listed tile by tile (to rounding: two model instances, other allocations).
        assert_close_to_rounding(b, a[:, :, perm])
    # A different grouping of tokens into blocks selects different blocks: the outputs differ, both finite.
    assert torch.isfinite(out_tiled).all() and not torch.allclose(out_raster, out_tiled)
    # The first layer's SLA output, permuted back, is what the layer returns: check one layer by hand.
    attn = tiled.get_submodule(first)
    q, k, v = seen["tiled"]
    o = attn.sla(q, k, v)
    inv = torch.argsort(perm)
    layer_out = attn.to_out[0](o[:, :, inv].transpose(1, 2).flatten(2, 3))
    captured = {}
    attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    _run(tiled, inputs)
    torch.testing.assert_close(captured["out"], layer_out, rtol=1e-5, atol=1e-6)


def test_token_tile_survives_save_and_load(tmp_path):
    model = _wan()
    sla.apply_sla(model, critical=0.25, negligible=0.25, token_tile=(1, 4, 4), **SMALL_BLOCKS)
    sla.save_sla(model, tmp_path)
    saved = json.loads((tmp_path / "sla_config.json").read_text())["config"]
    assert saved["token_tile"] == [1, 4, 4]
    fresh = _wan()
    sla.load_sla(fresh, tmp_path)
    inputs = _wan_inputs()
    assert_close_to_rounding(_run(fresh, inputs), _run(model, inputs))  # another instance: equal to rounding
    # A config written before the option existed has no token_tile: raster order.
    cfg = json.loads((tmp_path / "sla_config.json").read_text())
    del cfg["config"]["token_tile"]
    (tmp_path / "sla_config.json").write_text(json.dumps(cfg))
    older = _wan()
    sla.load_sla(older, tmp_path)
    from sla.integrations.diffusers.apply import _controller

    assert _controller(older).config.token_tile is None


def test_token_tile_refusals():
    with pytest.raises(ValueError, match="Wan models only"):
        sla.apply_sla(_cogvideox(), token_tile=(1, 2, 2), **SMALL_BLOCKS)
    with pytest.raises(ValueError, match="token_tile must be None or three positive ints"):
        sla.apply_sla(_wan(), token_tile=(0, 4, 4), **SMALL_BLOCKS)


def test_finetune_flag_and_config_take_a_tile():
    from sla.commands._argtypes import token_tile as _tile_flag
    from sla.training.config import FinetuneConfig

    assert _tile_flag("4,4,4") == (4, 4, 4)
    with pytest.raises(Exception, match="F,H,W"):
        _tile_flag("4,4")
    assert FinetuneConfig(token_tile=[2, 4, 8]).validate().token_tile == (2, 4, 8)
    with pytest.raises(ValueError, match="token_tile"):
        FinetuneConfig(token_tile=(2, 4)).validate()


def test_analysis_measures_the_tiled_blocks():
    from sla.analysis import AnalysisConfig, analyze_model

    model = _wan()
    inputs = _wan_inputs()

    def drive():
        _run(model, inputs)

    kw = dict(layers=[0], steps=None, heads=None, device="cpu", progress=False)
    base = dict(critical=0.25, negligible=0.25, block_q=16, block_k=16, query_blocks=None)
    raster = analyze_model(model, drive, config=AnalysisConfig(**base), **kw)
    tiled = analyze_model(model, drive, config=AnalysisConfig(**base, token_tile=(1, 4, 4)), token_grid=(3, 8, 8),
                          **kw)
    r, t = raster.entries[0]["recall"]["at_critical"], tiled.entries[0]["recall"]["at_critical"]
    assert 0 < r["mass_pooled"] <= 1 and 0 < t["mass_pooled"] <= 1 and r["mass_pooled"] != t["mass_pooled"]
    # The weight distribution does not depend on the token order.
    assert tiled.entries[0]["distribution"]["frac_above_mean"] == pytest.approx(
        raster.entries[0]["distribution"]["frac_above_mean"], abs=1e-6)
    with pytest.raises(ValueError, match="token_grid"):
        analyze_model(model, drive, config=AnalysisConfig(**base, token_tile=(1, 4, 4)), **kw)
