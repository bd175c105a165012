"""scripts/quality_experiment.py: one job end to end at smoke size on CPU, the report, the evaluation backend."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("quality_experiment", ROOT / "scripts" / "quality_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_jobs_and_report_with_token_tiles(tmp_path):
    qe = _script()
    for arm in ("full", "sparse_only_tile", "sla_mass_tile", "sla_mass_tile_128x128"):
        r = qe.run_job(arm, 0, tmp_path, "small", smoke=True, backend="auto", threads=1)
        assert r["heldout_loss"] > 0 and r["eval_backend"] == "auto"
    saved = json.loads((tmp_path / "sla_mass_tile" / "seed0" / "result.json").read_text())
    assert saved["settings"]["token_tile"] == [4, 4, 4] and saved["sparsity"] > 0.9
    final = tmp_path / "sla_mass_tile" / "seed0" / "train" / "final" / "sla_config.json"
    assert json.loads(final.read_text())["config"]["token_tile"] == [4, 4, 4]
    # A job cut off after training re-runs only its evaluation.
    (tmp_path / "sla_mass_tile" / "seed0" / "result.json").unlink()
    again = qe.run_job("sla_mass_tile", 0, tmp_path, "small", smoke=True, backend="auto", threads=1)
    assert again["train_seconds"] == saved["train_seconds"] and again["heldout_loss"] == saved["heldout_loss"]

    class Args:
        out = str(tmp_path)
        include = []

    assert qe.cmd_report(Args()) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["verdicts"]["sla_mass_tile"]["baseline"] == "sparse_only_tile"
    assert set(report["verdicts"]["sla_mass_tile"]) >= {"gap_closed", "criterion_met", "beats_per_seed"}
    assert "| sla_mass_tile | sparse_only_tile |" in (tmp_path / "results.md").read_text()
    block = report["block_shapes"]["sla_mass_tile_128x128"]
    assert block["against"] == "sla_mass_tile" and block["seeds"] == [0]
    assert [r["blocks"] for r in report["rows"] if r["arm"] == "sla_mass_tile_128x128"] == ["128x128"]
    # The pooled rule's arm names its backend (the PyTorch path it ran on) and is compared with the mass rule too.
    r = qe.run_job("sla_pooled_tile", 0, tmp_path, "small", smoke=True, backend="auto", threads=1)
    assert r["backend"] == "torch" and r["eval_backend"] == "torch" and r["settings"]["combine"] == "pooled"
    assert qe.cmd_report(Args()) == 0
    verdict = json.loads((tmp_path / "results.json").read_text())["verdicts"]["sla_pooled_tile"]
    assert verdict["baseline"] == "sparse_only_tile" and verdict["rival"] == "sla_mass_tile"
    assert len(verdict["beats_rival_per_seed"]) == 1
    assert "| sla_pooled_tile | sla_mass_tile |" in (tmp_path / "results.md").read_text()
    # The backend control: the mass rule on the PyTorch path, against its Triton-path arm and the pooled rule.
    r = qe.run_job("sla_mass_tile_torch", 0, tmp_path, "small", smoke=True, backend="auto", threads=1)
    assert r["backend"] == "torch" and r["settings"]["combine"] == "mass"
    assert qe.cmd_report(Args()) == 0
    control = json.loads((tmp_path / "results.json").read_text())["backend_controls"]["sla_mass_tile_torch"]
    assert control["against"] == "sla_mass_tile" and len(control["pooled_beats_it_per_seed"]) == 1
    assert "| sla_mass_tile_torch | sla_mass_tile |" in (tmp_path / "results.md").read_text()
    # The covariance rule runs the PyTorch path and is compared with the pooled rule it would replace.
    r = qe.run_job("sla_pooled_cov_tile", 0, tmp_path, "small", smoke=True, backend="auto", threads=1)
    assert r["backend"] == "torch" and r["settings"]["combine"] == "pooled_cov"
    assert qe.cmd_report(Args()) == 0
    verdict = json.loads((tmp_path / "results.json").read_text())["verdicts"]["sla_pooled_cov_tile"]
    assert verdict["baseline"] == "sparse_only_tile" and verdict["rival"] == "sla_pooled_tile"
    assert "| sla_pooled_cov_tile | sla_pooled_tile |" in (tmp_path / "results.md").read_text()
    # --ship: the compact summary the package ships (the quickstart quotes it), the report's rows and verdicts.
    Args.ship = str(tmp_path / "shipped.json")
    assert qe.cmd_report(Args()) == 0
    shipped, full = (json.loads((tmp_path / n).read_text()) for n in ("shipped.json", "results.json"))
    assert set(shipped) == {"meta", "rows", "verdicts"}
    assert shipped["rows"] == full["rows"] and shipped["verdicts"] == full["verdicts"]


def test_a_job_stopped_during_training_resumes_exactly_and_report_includes_earlier_jobs(tmp_path, monkeypatch):
    qe = _script()
    monkeypatch.setitem(qe.SMOKE[0], "steps", 3)
    whole = qe.run_job("sla_mass_tile", 0, tmp_path / "whole", "small", smoke=True, backend="auto", threads=1)
    part = qe.run_job("sla_mass_tile", 0, tmp_path / "split", "small", smoke=True, backend="auto", threads=1,
                      stop_after=2)
    job = tmp_path / "split" / "sla_mass_tile" / "seed0"
    assert part == dict(arm="sla_mass_tile", seed=0, stopped_after=2)
    assert not (job / "trained.json").exists() and (job / "train_seconds_before_resume.json").is_file()
    rest = qe.run_job("sla_mass_tile", 0, tmp_path / "split", "small", smoke=True, backend="auto", threads=1)
    # Same code path, same machine: the resumed run reproduces the unbroken one.
    assert rest["final_train_loss"] == whole["final_train_loss"] and rest["heldout_loss"] == whole["heldout_loss"]
    assert rest["train_seconds"] >= json.loads((job / "train_seconds_before_resume.json").read_text())["seconds"]

    class Args:
        out = str(tmp_path / "whole")
        include = []

    assert qe.cmd_report(Args()) == 0
    # A new arm's run compared with the arms of an earlier one, through that run's results.json.
    for arm in ("full", "sparse_only_tile"):
        qe.run_job(arm, 0, tmp_path / "earlier", "small", smoke=True, backend="auto", threads=1)
    Args.out = str(tmp_path / "earlier")
    assert qe.cmd_report(Args()) == 0
    Args.out, Args.include = str(tmp_path / "whole"), [str(tmp_path / "earlier" / "results.json")]
    assert qe.cmd_report(Args()) == 0
    report = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert sorted(j["arm"] for j in report["jobs"]) == ["full", "sla_mass_tile", "sparse_only_tile"]
    assert report["verdicts"]["sla_mass_tile"]["baseline"] == "sparse_only_tile"
    Args.include = [str(tmp_path / "whole" / "sla_mass_tile" / "seed0" / "result.json")]  # not a results.json
    assert qe.cmd_report(Args()) == 2


def test_float32_evaluation_of_wide_heads_runs_on_the_pytorch_path_on_cuda():
    qe = _script()

    class Config:
        attention_head_dim = 128

    class Model:
        config = Config()

    assert qe.evaluation_backend(Model(), "auto", "cuda") == "torch"
    assert qe.evaluation_backend(Model(), "auto", "cpu") == "auto"
    Config.attention_head_dim = 64
    assert qe.evaluation_backend(Model(), "triton", "cuda") == "triton"
    from sla.eval.evaluate import evaluation_backend  # the rule sla eval and the quickstart apply too

    Config.attention_head_dim = 128
    assert evaluation_backend(Model(), "auto", "cuda:0") == "torch"
    assert evaluation_backend(Model(), "torch", "cuda") == "torch"


def test_the_evaluation_backend_switch_leaves_a_model_without_sla_alone(tmp_path, monkeypatch):
    # On CUDA with 128-wide heads every SLA arm switches to the PyTorch path; `full` has nothing to switch.
    qe = _script()
    monkeypatch.setattr(qe, "evaluation_backend", lambda model, backend, device: "torch")
    assert qe.run_job("full", 0, tmp_path, "small", smoke=True, backend="auto", threads=1)["eval_backend"] == "auto"
    assert qe.run_job("sparse_only", 0, tmp_path, "small", smoke=True, backend="auto",
                      threads=1)["eval_backend"] == "torch"
