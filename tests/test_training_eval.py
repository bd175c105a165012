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
                          tmp_path / "eval", clips=2, samples=2, steps=2, progress=False,
                          data=SyntheticVideoConfig(frames=2, height=16, width=16))
    assert [r["name"] for r in res] == ["tuned", "base"]
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert np.isfinite(data["results"][0]["quality"]["frechet_distance"])
    assert data["results"][1]["rel_error_vs_dense"] == 0.0
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| tuned | sla |" in md and "tuned_samples.gif" in md
    # Forward times come from one interleaved timing of both models, which records whether the machine was busy.
    timing = data["meta"]["forward_timing"]
    assert timing["interleaved"] and sorted(timing["seconds"]) == ["0", "1"]
    assert all(r["forward_seconds_batch1"] > 0 for r in data["results"])
    assert ("**Warning (forward s column):**" in md) == bool(timing["warnings"])
    for f in ("tuned_samples.png", "tuned_samples.gif", "real_samples.png"):
        assert (tmp_path / "eval" / f).stat().st_size > 0


def test_finetune_cli_rejects_bad_values(model_dir, tmp_path, capsys):
    # One line naming the flag, exit status 2, no traceback; --debug re-raises with the traceback.
    out = str(tmp_path / "x")
    assert main(["finetune", "--model", str(model_dir), "--attention", "dense", "--output-dir", out]) == 2
    assert capsys.readouterr().err.strip() == ("sla finetune: error: --attention must be one of ('full', 'sla', "
                                               "'sparse_only', 'sum_no_proj', 'linear_only'), got 'dense'")
    assert main(["finetune", "--model", str(model_dir), "--steps", "0", "--output-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "sla finetune: error: --steps must be a positive int, got 0"
    with pytest.raises(ValueError, match="--steps must be a positive int"):
        main(["finetune", "--model", str(model_dir), "--steps", "0", "--output-dir", str(tmp_path / "x"), "--debug"])


def test_safe_filenames():
    from sla._paths import safe_filename, unique_filenames

    assert safe_filename("../escaped") == "escaped"
    assert safe_filename("..") == "model" and safe_filename("") == "model"
    assert safe_filename("a/b\\c\nd") == "a_b_c_d"
    assert safe_filename(".hidden") == "hidden"
    assert safe_filename("SLA (95%)") == "SLA_95"
    assert len(safe_filename("x" * 500)) == 100
    assert unique_filenames(["a/b", "a_b", "real", "A_B"], reserved=("real",)) == ["a_b", "a_b_2", "real_2", "A_B_3"]


def test_eval_names_cannot_write_outside_out(model_dir, tmp_path):
    # `sla eval --name ../escaped --out DIR` used to write DIR/../escaped_samples.png.
    out = tmp_path / "box" / "out"
    rc = main(["eval", "--model", str(model_dir), str(model_dir), "--name", "../escaped", "real", "--out", str(out),
               "--clips", "1", "--samples", "2", "--steps", "1", "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert outside == []
    files = sorted(p.name for p in out.iterdir())
    assert {"escaped_samples.png", "escaped_samples.gif", "real_2_samples.png", "real_samples.png"} <= set(files)
    md = (out / "eval.md").read_text()
    assert "| ../escaped |" in md and "(escaped_samples.png)" in md  # the report shows the name as given


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "MISSING", "--out", "FILE"],
    ["sample", "--model", "MISSING", "--out", "FILE"],
    ["finetune", "--model", "MISSING", "--output-dir", "FILE"],
    ["demo", "--out", "FILE/sub"],
    ["analyze", "--model", "MISSING", "--out", "FILE"],
])
def test_output_folders_are_checked_before_the_work(tmp_path, capsys, argv):
    # The model does not exist either: the error must be about the output folder, found first.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = [a.replace("FILE", str(blocker)).replace("MISSING", str(tmp_path / "no_model")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    flag = "output_dir (--output-dir)" if argv[0] == "finetune" else "--out"
    assert err.startswith(f"sla {argv[0]}: error: {flag} "), err
    assert ("is a file, not a folder" in err) or ("cannot be created" in err)


def test_sample_grid_is_labelled_inside_the_image(tmp_path):
    # Row = caption, column = frame: the PNG says so itself, without the report around it.
    pytest.importorskip("PIL")
    from PIL import Image

    from sla.eval.media import save_grid_png

    clips = torch.zeros(2, 3, 8, 16, 16)  # mid-grey clips: text is the only black on the canvas
    captions = ["large red ring bounces ; small blue square drifts left", "x " * 200]
    save_grid_png(clips, tmp_path / "g.png", frames=4, scale=2, row_labels=captions, label_width=120)
    img = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    cell = (16 + 2) * 2
    header = img.shape[0] - (2 * cell - 2 * 2)
    assert img.shape[1] == 120 + 4 * cell - 2 * 2 and header > 0  # a label column and a header row were added
    assert (img[:header, :120] < 100).any()  # the corner says what rows and columns are
    for j in range(4):  # a frame number over every column
        x0 = 120 + j * cell
        assert (img[:header, x0:x0 + 32] < 100).any(), j
    for i in range(2):  # a caption next to every row, the long one cut to the row's height
        y0 = header + i * cell
        assert (img[y0:y0 + 32, :120] < 100).any(), i
    assert not (img[header:, 120:] < 100).any()  # the clips themselves are untouched
    with pytest.raises(ValueError, match="one per clip"):
        save_grid_png(clips, tmp_path / "h.png", row_labels=["only one"])


def test_training_curve_shows_raw_points_and_a_moving_average(tmp_path):
    from sla.commands.quickstart import _curve_series, _moving_average, _plot_curves

    assert _moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert _moving_average([2.0, 4.0], 5) == [2.0, 3.0]
    log = tmp_path / "train_log.csv"
    losses = [1.0, 0.5] * 30  # alternating noise around 0.75
    log.write_text("step,loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(losses)))
    steps, raw, smooth, window = _curve_series(str(log))
    assert steps == list(range(1, 61)) and raw == losses and window == 5
    assert all(abs(s - 0.75) <= 0.051 for s in smooth[window:])  # 0.7 or 0.8 (odd window) where raw is 0.5 or 1
    pytest.importorskip("matplotlib")
    assert _plot_curves({"sla": str(log)}, str(tmp_path / "curve.png")) == str(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_cli_sample_small_model_mode(model_dir, tmp_path, capsys):
    """`sla sample --model` (no --pipeline): synthetic captions to a PNG grid and a GIF, as before --pipeline."""
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(model_dir), "--count", "1", "--steps", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"samples.png", "samples.gif", "captions.txt"}
    assert "attention: full" in capsys.readouterr().out


def test_quickstart_summary_sentence_is_computed_from_the_numbers():
    from sla.commands.quickstart import _experiment_sentence, _gap_sentence

    rows = {"full": 0.05, "sparse": 0.09, "paper": 0.088, "mass": 0.07, "worse": 0.10}
    text = _gap_sentence(rows, "full", "sparse", [("paper", "SLA with the paper's rule"),
                                                   ("mass", "SLA with the mass rule"), ("worse", "W")], 8)
    assert "on 8 held-out clips" in text and "full attention 0.0500" in text and "sparse-only at 95% sparsity 0.0900" in text
    assert "SLA with the paper's rule 0.0880: it closes 5% of the sparse-only-to-full gap" in text
    assert "SLA with the mass rule 0.0700: it closes 50% of the sparse-only-to-full gap" in text
    assert "W 0.1000: it is 25% of that gap worse than sparse-only" in text
    # no gap: no percentage is claimed
    assert "no gap to close" in _gap_sentence({"full": 0.1, "sparse": 0.09, "mass": 0.08}, "full", "sparse",
                                              [("mass", "M")], 8)
    assert _gap_sentence({"full": 0.1}, "full", "sparse", [], 8) == ""
    # the quoted experiment is the one shipped with the fine-tuned models
    from sla.models.small_wan import shipped_experiment_results

    res = shipped_experiment_results()
    quoted = _experiment_sentence()
    mass = next(r for r in res["rows"] if r["arm"] == "sla_mass")
    assert f"SLA mass rule {mass['heldout_loss']:.4f}" in quoted
    assert f"({100 * res['verdicts']['sla_mass']['gap_closed']:.0f}%" in quoted
    # and the wan8k testbed's, from its shipped summary, which is the committed experiment's
    import json
    from pathlib import Path

    wan8k = shipped_experiment_results("wan8k")
    bench = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results_quality_wan8k.json").read_text())
    assert wan8k["rows"] == bench["rows"] and wan8k["verdicts"] == bench["verdicts"]
    cov = next(r for r in wan8k["rows"] if r["arm"] == "sla_pooled_cov_tile")
    assert f"SLA pooled_cov rule {cov['heldout_loss']:.4f} (52% of the gap)" in quoted
    assert "meets the target of half the gap" in quoted


def test_shipped_finetuned_models_load_with_their_rules():
    from sla.integrations.diffusers import sla_modules
    from sla.models.small_wan import SHIPPED_FINETUNED, shipped_finetuned_path
    from sla.training.checkpoint import load_finetuned

    for arm in SHIPPED_FINETUNED["small"]:
        model, info = load_finetuned(shipped_finetuned_path(arm, "small"))
        modules = sla_modules(model)
        assert len(modules) == 4
        expected = "mass" if arm == "sla_mass" else "paper"
        assert all(m.combine == expected for m in modules.values()), arm
        if arm == "sparse_only":
            assert all(not m.proj.weight.any() for m in modules.values())  # frozen at zero: o = o_s
    assert SHIPPED_FINETUNED["wan8k"] == ("sparse_only", "sla_pooled_cov")
    for arm in SHIPPED_FINETUNED["wan8k"]:  # int8 deltas from the built-in wan8k, over 4x4x4 token tiles
        model, info = load_finetuned(shipped_finetuned_path(arm, "wan8k"))
        modules = sla_modules(model)
        assert len(modules) == 6 and info["sla"]["token_tile"] == [4, 4, 4] and info["base_model"] == "wan8k"
        assert info["attention"] == ("sparse_only" if arm == "sparse_only" else "sla")
        assert info["sla"]["combine"] == "pooled_cov"
        assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="no shipped fine-tuned model 'sla_mass' of 'wan8k'"):
        shipped_finetuned_path("sla_mass", "wan8k")


def test_finetune_notes_the_token_tiles_wan8k_was_measured_with():
    from sla.commands.finetune import layout_hint
    from sla.training.config import make_config

    assert "--token-tile 4,4,4" in layout_hint(make_config(model="wan8k"))  # the default model, raster order
    assert layout_hint(make_config(model="wan8k", token_tile=(4, 4, 4))) == ""
    assert layout_hint(make_config(model="wan8k", attention="full")) == ""
    assert layout_hint(make_config(model="small")) == ""
