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


def test_the_operator_on_cpu_never_imports_triton():
    # The backend table, the Triton backend object and the kernels' limits are Triton-free; only a call that runs
    # the kernels imports Triton.
    code = ("import sys, torch, sla; from sla.ops.sla import interface; from sla.integrations import _common; "
            "from sla.ops.sla.triton import limits, backend; q = torch.randn(1, 2, 64, 16); "
            "sla.sparse_linear_attention(q, q, q, block_q=16, block_k=16); "
            "sla.SparseLinearAttention(16, block_q=16, block_k=16)(q, q, q); "
            "assert interface.BACKENDS['triton'] is backend.TRITON_BACKEND; "
            "assert 'triton' not in sys.modules, [m for m in sys.modules if 'triton' in m]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


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
    _check_demo_errors(res["rows"], grid=(2, 8, 16), heads=2, head_dim=16)
    for r in res["rows"]:
        assert r["sla_ms"] > 0 and r["speedup"] == pytest.approx(r["sdpa_ms"] / r["sla_ms"])
    timing = res["meta"]["timing"]  # one interleaved timing of SDPA and every level, with the machine's state
    assert timing["interleaved"] and sorted(timing["seconds"]) == ["SDPA", "SLA critical=0.1", "SLA critical=0.5"]
    assert all(len(ts) == 1 for ts in timing["seconds"].values())
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# SLA demo")
    # Whether this machine is busy right now is not up to the test; the report must say so exactly when it was.
    assert ("timings are not trustworthy" in report) == bool(timing["warnings"]) == bool(timing["warning"])


def _check_demo_errors(rows, grid, heads, head_dim):
    """The demo's error columns are what they claim: recomputed here from the dense reference's branches on the
    same generated inputs (held-out = odd query blocks of 64 tokens)."""
    import torch

    import sla
    from sla.commands.demo import video_like_qkv
    from sla.ops.sla.naive import naive_sparse_linear_attention

    q, k, v = video_like_qkv(grid, heads, head_dim, seed=0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    held = (torch.arange(q.shape[2]) // 64) % 2 == 1

    def rel_l1(x):
        return float((x[..., held, :] - dense[..., held, :]).abs().sum() / dense[..., held, :].abs().sum())

    for r in rows:
        bm = sla.build_block_map(q, k, critical=r["critical"], negligible=r["negligible"])
        _, (o_s, _, _) = naive_sparse_linear_attention(q, k, v, bm, return_branches=True)
        mass = naive_sparse_linear_attention(q, k, v, bm, proj_weight=torch.eye(head_dim), combine="mass")
        assert r["sparse_only_rel_l1"] == pytest.approx(rel_l1(o_s), rel=1e-4)
        assert r["sla_mass_untrained_rel_l1"] == pytest.approx(rel_l1(mass), rel=1e-4)
        assert r["sla_fitted_proj_rel_l1"] > 0  # its output is checked against the reference (meta)
    errors = [r["sparse_only_rel_l1"] for r in sorted(rows, key=lambda r: r["critical"])]
    assert errors == sorted(errors, reverse=True)  # more critical blocks, less error


@pytest.mark.parametrize("argv, message", [
    (["--critical", "2"], "argument --critical: must be a fraction of key blocks in [0, 1]"),
    (["--critical", "0.95", "--negligible", "0.1"], "--critical 0.95 + --negligible 0.1 = 1.05 > 1; lower "
                                                    "--critical or --negligible"),
    (["--heads", "0"], "argument --heads: must be an integer >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["--grid", "4", "0", "4"], "argument --grid: must be an integer >= 1, got 0"),
    (["--head-dim", "x"], "argument --head-dim: must be an integer >= 1, got 'x'"),
])
def test_demo_bad_flags_give_a_short_error_naming_the_flag(tmp_path, capsys, argv, message):
    try:
        rc = main(["demo", "--out", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse refuses at parse time
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert not (tmp_path / "report.md").exists()


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sla eval: error: model ") and len(err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(argv + ["--debug"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(["--debug"] + argv)
    monkeypatch.setenv("SLA_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(argv)


def test_unexpected_errors_say_how_to_get_the_traceback():
    from sla.cli import format_error

    text = format_error("demo", RuntimeError("shape mismatch\nlong torch details"))
    assert text.splitlines() == ["sla demo: unexpected RuntimeError: shape mismatch",
                                 "(run again with --debug, or SLA_DEBUG=1, for the traceback)"]
    assert format_error("eval", KeyError("config")).startswith("sla eval: unexpected KeyError: missing key 'config'")


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sla.cli", "finetune", "--model", str(tmp_path / "none"),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sla finetune: error: model ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_interleaved_timing_rotates_the_order_and_warms_up():
    from sla._timing import time_interleaved

    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    timing = time_interleaved(fns, repeats=4, warmup=1)
    # warm-up a b c; then each repeat starts one further along: abc, bca, cab, abc
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"
    assert {k: len(v) for k, v in timing.seconds.items()} == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_interleaved(fns, repeats=0)


def test_timing_warns_about_a_spread_of_the_repeats():
    import time

    from sla._timing import time_interleaved

    durations = iter([0.0, 0.01, 0.01, 0.08])  # warm-up, then three runs: the last one eight times longer
    timing = time_interleaved({"jumpy": lambda: time.sleep(next(durations))}, repeats=3, check_cpu=False)
    assert timing.spread["jumpy"] > 3
    assert any("the 3 runs of jumpy spread by" in w for w in timing.warnings)
    assert "not trustworthy" in timing.warning_text() and not timing.trustworthy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures other processes through /proc/stat")
def test_timing_warns_when_another_process_takes_the_cpus():
    # A real busy process next to the timed work: the warning must name it. The timed work sleeps, so nearly
    # all the busy CPU time seen in the window belongs to the other process.
    import time

    from sla._timing import time_interleaved, usable_cpus

    cpus = len(usable_cpus())
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        timing = time_interleaved({"sleep": lambda: time.sleep(0.1)}, repeats=5, warmup=0, threads=cpus)
    finally:
        spinner.kill()
        spinner.wait()
    assert timing.other_cpus is not None and timing.other_cpus > 0.5
    assert any(w.startswith("other processes kept") for w in timing.warnings), timing.warnings
