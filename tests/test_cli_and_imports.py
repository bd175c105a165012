"""The CLI entry point, the demo job, and import hygiene (no GPU probing, no heavy optional imports)."""

import json
import subprocess
import sys

import pytest

from sla.cli import main


def test_import_touches_no_gpu_or_optional_dependency():
    code = ("import sys, sla; bad = [m for m in ('triton', 'diffusers', 'matplotlib') if m in sys.modules]; "
            "import torch; assert not torch.cuda.is_initialized(); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import sla pulled in: {out.stdout.strip()}"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_writes_report(tmp_path, capsys):
    assert main(["demo", "--grid", "2", "8", "16", "--heads", "2", "--head-dim", "16", "--critical", "0.1", "0.5",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| critical |" in table
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["critical"] for r in res["rows"]] == [0.1, 0.5]
    assert res["meta"]["reference_max_abs_diff"] < 1e-4  # the PyTorch path agrees with the dense reference
    for r in res["rows"]:
        assert 0 <= r["sparse_only_rel_l1"] < 2 and r["sla_ms"] > 0
    assert (tmp_path / "report.md").read_text().startswith("# SLA demo")
