"""What the commands need besides the core install, and what they say when it is missing.

diffusers loads a Wan transformer from a folder only through accelerate (it keeps some modules in float32, which
its plain loader refuses: "`low_cpu_mem_usage` cannot be False when `keep_in_fp32_modules` is True"). So every
extra that brings diffusers for loading models brings accelerate, and loading checks for it first. Without
uninstalling anything from the shared environment, a fresh interpreter is told that accelerate (and peft, which
cannot be installed without it) is absent: ``sys.modules[name] = None`` makes both ``import`` and
``importlib.util.find_spec`` report the module missing, which is how diffusers looks for it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def test_every_extra_with_diffusers_brings_accelerate():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, requirements in extras.items():
        names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}
        if "diffusers" in names:
            assert "accelerate" in names, f"extra [{name}] brings diffusers without accelerate"


def test_the_check_names_what_is_missing(monkeypatch):
    import importlib.util

    from sla.models import small_wan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ImportError, match=r"^--model 'x' needs accelerate, which is not installed .* install it with "
                                          r"pip install 'sparse-linear-attention\[diffusers\]'$"):
        small_wan.require_pretrained_loading("--model 'x'")


def test_sla_analyze_without_accelerate_says_what_to_install(tmp_path):
    pytest.importorskip("diffusers")
    code = ("import sys; sys.modules['accelerate'] = None; sys.modules['peft'] = None; "
            "from sla.cli import main; sys.exit(main(['analyze', '--model', 'small', '--out', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("sla analyze: error: loading a diffusers model folder needs "
                                               "accelerate"), err
    assert "pip install 'sparse-linear-attention[diffusers]'" in err[0]
