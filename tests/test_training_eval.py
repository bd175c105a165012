"""`sla eval` / `sla sample` / `sla finetune` CLI and the metrics behind them, on a tiny Wan."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(__file__))
from _training_utils import save_tiny_model  # noqa: E402

from sla.cli import main  # noqa: E402
from sla.eval.features import frechet_distance  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_eval") / "model")


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, 4I) in 3-D: |m|^2 + 3 * (1 + 4 - 2 * 2) = |m|^2 + 3
    b = 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_cli_finetune_then_eval_and_sample(model_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--frames", "2", "--height", "16", "--width", "16", "--block-q", "16", "--block-k", "16"]
    rc = main(["finetune", "--model", str(model_dir), "--output-dir", str(out), "--steps", "2", "--batch-size", "1",
               "--critical", "1.0", "--negligible", "0.0", "--no-progress", "--save-every", "0", *common])
    assert rc == 0 and (out / "final" / "finetune_info.json").is_file()

    from sla.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
    from sla.eval.evaluate import attention_error, evaluate_models, heldout_loss
    from sla.training.checkpoint import load_finetuned

    model, info = load_finetuned(out / "final")
    val = SyntheticVideoDataset("val", 4, SyntheticVideoConfig(frames=2, height=16, width=16, text_dim=16))
    # deterministic held-out loss
    assert heldout_loss(model, val, n=2)["loss"] == heldout_loss(model, val, n=2)["loss"]
    # critical=1: every block is exact; the error against dense comes only from the (trained) projection
    base, _ = load_finetuned(model_dir)
    import sla

    sla.apply_sla(base, critical=1.0, negligible=0.0, block_q=16, block_k=16)
    from sla.data.synthetic import collate

    rows = attention_error(base, collate([val[0], val[1]]))
    assert len(rows) == 2 and all(r["rel_error_vs_dense"] < 1e-5 and r["sparsity"] == 0.0 for r in rows)

    res = evaluate_models([("tuned", model, info), ("base", load_finetuned(model_dir)[0], {"attention": "full"})],
                          tmp_path / "eval", clips=2, samples=2, steps=2, frames=2, height=16, width=16, progress=False)
    assert [r["name"] for r in res] == ["tuned", "base"]
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert np.isfinite(data["results"][0]["quality"]["frechet_distance"])
    assert data["results"][1]["rel_error_vs_dense"] == 0.0
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| tuned | sla |" in md and "tuned_samples.gif" in md
    for f in ("tuned_samples.png", "tuned_samples.gif", "real_samples.png"):
        assert (tmp_path / "eval" / f).stat().st_size > 0


def test_finetune_cli_rejects_bad_values(model_dir, tmp_path):
    with pytest.raises(ValueError, match="attention must be one of"):
        main(["finetune", "--model", str(model_dir), "--attention", "dense", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        main(["finetune", "--model", str(model_dir), "--steps", "0", "--output-dir", str(tmp_path / "x")])


def test_cli_sample_small_model_mode(model_dir, tmp_path, capsys):
    """`sla sample --model` (no --pipeline): synthetic captions to a PNG grid and a GIF, as before --pipeline."""
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(model_dir), "--count", "1", "--steps", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"samples.png", "samples.gif", "captions.txt"}
    assert "attention: full" in capsys.readouterr().out
