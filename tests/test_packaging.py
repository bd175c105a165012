"""The wheel ships what the library reads at run time, and not the training logs beside it.

Checked against the package-data patterns of pyproject.toml (expanded here the way setuptools expands them,
relative to the ``sla`` package) without building a wheel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sla"


def _shipped() -> set[Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sla"]
    return {p for pattern in patterns for p in PACKAGE.glob(pattern) if p.is_file()}


def test_every_asset_the_code_reads_is_shipped():
    from sla.eval.features import feature_net_path
    from sla.models.small_wan import SHIPPED_FINETUNED, shipped_finetuned_path, small_model_path

    shipped = _shipped()
    needed = {feature_net_path(), PACKAGE / "assets" / "small_wan_finetuned" / "experiment_results.json",
              PACKAGE / "assets" / "wan8k" / "experiment_results.json"}
    for name in ("small", "wan8k"):
        base = small_model_path(name)
        needed |= {base / "config.json", base / "synthetic_data.json", *base.glob("*.safetensors")}
    for model, arms in SHIPPED_FINETUNED.items():  # sla finetune's final/ folders, loaded whole by load_finetuned
        for arm in arms:
            needed |= {p for p in shipped_finetuned_path(arm, model).iterdir() if p.is_file()}
    missing = sorted(str(p.relative_to(PACKAGE)) for p in needed - shipped)
    assert not missing, f"run-time assets missing from pyproject's package-data: {missing}"


def test_training_logs_stay_out_of_the_wheel():
    shipped = {str(p.relative_to(PACKAGE)) for p in _shipped()}
    logs = [p for p in shipped if p.endswith((".log", ".csv")) or "pretrain_info" in p]
    assert not logs, f"training records in the wheel: {logs}"
    assert all(p.startswith("assets/") for p in shipped)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_one_diffusers_range_tested_at_both_ends():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = config["project"]["optional-dependencies"]
    ranges = {r for reqs in extras.values() for r in reqs if r.startswith("diffusers") and "==" not in r}
    assert len(ranges) == 1, f"the extras allow different diffusers versions: {ranges}"
    spec = ranges.pop()
    low = _version(spec.split(">=")[1].split(",")[0])
    high = _version(spec.split("<")[1])
    pinned = [r for r in extras["test"] if r.startswith("diffusers==")]
    assert len(pinned) == 1 and low <= _version(pinned[0].split("==")[1]) < high, (spec, pinned)
    # CI runs the suite with the pinned (newest) release and again with the oldest the range allows
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and "scripts/test_oldest_diffusers.sh" in ci
