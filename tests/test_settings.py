"""One settings object (``sla.SLASettings``) from the operator up: checked once, the same everywhere."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import sla
from sla.settings import BACKEND_NAMES, SLASettings


def test_settings_are_frozen_checked_and_normalised():
    s = SLASettings(critical=1, negligible=0)
    assert s.critical == 1.0 and isinstance(s.critical, float) and s == SLASettings(critical=1.0, negligible=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.critical = 0.5
    assert s.replace(block_k=128).block_k == 128 and s.block_k == 64
    with pytest.raises(ValueError, match="critical \\+ negligible"):
        s.replace(critical=0.95, negligible=0.1)
    with pytest.raises(ValueError, match="combine='sum' is unknown"):
        SLASettings(combine="sum")
    with pytest.raises(TypeError, match="block_q must be an int"):
        SLASettings(block_q=64.0)
    assert SLASettings.names() == ("critical", "negligible", "block_q", "block_k", "feature_map", "linear_scope",
                                   "combine")


def test_of_reads_flat_configs_and_dicts():
    from sla.training.config import FinetuneConfig

    cfg = FinetuneConfig(critical=0.2, negligible=0.3, combine="paper", linear_scope="all")
    assert cfg.sla_settings() == SLASettings(critical=0.2, negligible=0.3, combine="paper", linear_scope="all")
    assert SLASettings.of({"block_q": 32}, block_k=16) == SLASettings(block_q=32, block_k=16)
    with pytest.raises(ValueError, match="feature_map='tanh' is unknown"):
        FinetuneConfig(feature_map="tanh").validate()


def test_backend_names_are_the_operator_table_plus_auto():
    from sla.ops.sla.interface import BACKENDS

    assert set(BACKEND_NAMES) == {"auto"} | set(BACKENDS)


def test_the_module_holds_one_settings_object_and_passes_it_to_the_operator():
    s = SLASettings(critical=0.25, negligible=0.25, block_q=16, block_k=16, linear_scope="noncritical")
    m = sla.SparseLinearAttention.from_settings(8, s, num_heads=2)
    assert m.settings == s and m.critical == 0.25 and m.linear_scope == "noncritical"
    with pytest.raises(AttributeError):
        m.critical = 0.5  # the parameters were made for these settings: build a new module instead
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out = m(q, k, v)
        direct = sla.sparse_linear_attention(q, k, v, **s.to_dict(), proj_weight=m.proj.weight.double(),
                                             proj_bias=m.proj.bias.double(), mass_offset=m.mass_offset.double())
    # The same backend (PyTorch, CPU) on the same inputs: only the projection's float32 -> float64 cast differs.
    torch.testing.assert_close(out, direct, rtol=1e-12, atol=1e-12)


diffusers = pytest.importorskip("diffusers")


def test_apply_sla_config_holds_the_settings_and_its_json_stays_flat(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_integration_diffusers import SMALL_BLOCKS, _wan

    from sla.integrations.diffusers import SLAConfig
    from sla.integrations.diffusers.apply import _controller

    model = _wan()
    sla.apply_sla(model, critical=0.25, negligible=0.25, combine="paper", **SMALL_BLOCKS)
    config = _controller(model).config
    assert config.sla == SLASettings(critical=0.25, negligible=0.25, combine="paper", **SMALL_BLOCKS)
    assert all(m.settings == config.sla for m in sla.integrations.diffusers.sla_modules(model).values())
    sla.save_sla(model, tmp_path)
    saved = json.loads((tmp_path / "sla_config.json").read_text())["config"]
    assert saved["critical"] == 0.25 and saved["combine"] == "paper" and "sla" not in saved
    assert SLAConfig.from_dict(saved) == config
    legacy = {k: v for k, v in saved.items() if k != "combine"}  # written before the option existed
    assert SLAConfig.from_dict(legacy).sla.combine == "paper"
    with pytest.raises(ValueError, match="unknown SLA config keys \\['colour'\\]"):
        SLAConfig.from_dict(dict(saved, colour=1))
