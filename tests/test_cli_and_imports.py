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


def test_import_sla_is_lazy_and_keeps_the_public_names():
    # `import sla` must not import torch (it costs seconds; `sla --help` should not pay it); the public names
    # still resolve on first use, and `from sla import *` gives all of them.
    code = ("import sys, sla; assert 'torch' not in sys.modules, 'import sla imported torch'; "
            "names = {}; exec('from sla import *', names); "
            "missing = [n for n in sla.__all__ if n not in names]; assert not missing, missing; "
            "assert callable(sla.sparse_linear_attention) and callable(sla.load_sla); "
            "assert sla.integrations.diffusers.load_sla is sla.load_sla; "
            "assert 'diffusers' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"], ["demo", "--help"], ["analyze", "--help"]])
def test_cli_help_does_not_import_torch(argv):
    # Runs `python -m sla.cli ARGV` in a fresh interpreter and reports which heavy modules it imported.
    code = ("import runpy, sys\n"
            "sys.argv = ['sla', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('sla.cli', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'triton') if m in sys.modules]\n"
            "sys.stderr.write('HEAVY=' + ','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage: sla" in out.stdout
    assert out.stderr.strip().endswith("HEAVY="), out.stderr[-3000:]


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
