"""Fine-tuning pipeline: exact resume, DDP (gloo, 2 processes) == 1 process, trainable modes, ablation
variants, clear errors. Tiny shapes: a 2-layer Wan with 32 tokens per clip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(__file__))
from _training_utils import same_training_atol, save_tiny_model, tiny_config  # noqa: E402

from sla.training.checkpoint import load_checkpoint, load_finetuned  # noqa: E402
from sla.training.trainer import finetune  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _final_state(out_dir):
    from safetensors.torch import load_file

    state = load_file(str(Path(out_dir) / "final" / "diffusion_pytorch_model.safetensors"))
    sla_path = Path(out_dir) / "final" / "sla_weights.safetensors"
    if sla_path.is_file():
        state.update(load_file(str(sla_path)))
    return state


def test_stop_and_resume_equals_uninterrupted(model_dir, tmp_path):
    kw = dict(steps=4, save_every=1, ema=0.5, grad_accum=2, batch_size=1)
    finetune(tiny_config(model_dir, tmp_path / "a", **kw))
    finetune(tiny_config(model_dir, tmp_path / "b", stop_after=2, **kw))
    assert not (tmp_path / "b" / "final").exists()  # interrupted: no export yet
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "step-0000002.pt")["step"] == 2
    summary = finetune(tiny_config(model_dir, tmp_path / "b", **kw), resume="auto")
    assert summary["start_step"] == 2
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the CSV log of the resumed run holds every step once
    rows = (tmp_path / "b" / "train_log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_tensorboard_events_match_csv_after_resume(model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = dict(steps=4, save_every=2, tensorboard=True)
    finetune(tiny_config(model_dir, tmp_path / "tb", stop_after=3, **kw))  # step 3 is logged, not checkpointed
    finetune(tiny_config(model_dir, tmp_path / "tb", **kw), resume="auto")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    rows = (tmp_path / "tb" / "train_log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # the CSV too holds every step once
    csv_loss = {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows[1:]}
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb_loss) == [1, 2, 3, 4]  # the stopped run's step 3 was replaced by the resumed run's
    for step, value in tb_loss.items():
        assert value == pytest.approx(csv_loss[step], rel=1e-5)


def test_refuses_to_overwrite_checkpoints_without_resume(model_dir, tmp_path):
    finetune(tiny_config(model_dir, tmp_path / "o", steps=2))
    with pytest.raises(ValueError, match="--resume auto"):
        finetune(tiny_config(model_dir, tmp_path / "o", steps=2))


def test_default_combine_auto_resumes_a_run_saved_with_the_rule_it_resolves_to(model_dir, tmp_path):
    # Runs started before combine="auto" became the default saved combine="mass" (then the default, raster order):
    # resuming them with today's default is the same rule; another rule is refused, naming it.
    out = tmp_path / "o"
    finetune(tiny_config(model_dir, out, steps=2, stop_after=1, save_every=1, combine="mass"))
    default = tiny_config(model_dir, out)
    assert default.combine == "auto" and default.sla_settings().combine == "mass"
    with pytest.raises(ValueError, match="cannot resume: checkpoint was made with combine='mass'"):
        finetune(tiny_config(model_dir, out, steps=2, combine="pooled"), resume="auto")
    assert finetune(tiny_config(model_dir, out, steps=2), resume="auto")["start_step"] == 1


def test_corrupt_checkpoint_and_missing_data_errors(model_dir, tmp_path):
    out = tmp_path / "o"
    finetune(tiny_config(model_dir, out, steps=2, stop_after=1, save_every=1))
    ckpt = out / "checkpoints" / "step-0000001.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match="no usable checkpoint .* is corrupt or truncated .* To start over, delete"):
        finetune(tiny_config(model_dir, out, steps=2), resume="auto")
    with pytest.raises(FileNotFoundError, match="latents folder"):
        finetune(tiny_config(model_dir, tmp_path / "p", data=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        finetune(tiny_config(tmp_path / "no_model", tmp_path / "q"))


class _Payload:
    """Unpickling this with full pickle runs os.mkdir(marker): what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoints_hold_only_tensors_and_plain_data(model_dir, tmp_path):
    finetune(tiny_config(model_dir, tmp_path / "o", steps=2, stop_after=1, save_every=1))
    path = tmp_path / "o" / "checkpoints" / "step-0000001.pt"
    # The strict loader with no extra allowed globals reads it: nothing in it can run code.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "sla-finetune-checkpoint-v2"
    assert isinstance(ckpt["rng"]["numpy"]["keys"], torch.Tensor)
    assert isinstance(ckpt["rng"]["python"]["words"], torch.Tensor)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle is not torch.save's protocol
@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_crafted_checkpoint_is_refused_without_running_its_payload(model_dir, tmp_path, kind):
    import pickle

    out = tmp_path / "o"
    marker = tmp_path / "payload_ran"
    crafted = out / "checkpoints" / "step-0000009.pt"
    crafted.parent.mkdir(parents=True)
    if kind == "torch_save":  # the zip layout torch.save writes, with the right format tag
        torch.save({"format": "sla-finetune-checkpoint-v2", "step": 9, "x": _Payload(marker)}, crafted)
    else:
        with open(crafted, "wb") as f:
            pickle.dump({"format": "sla-finetune-checkpoint-v2", "x": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="was not opened"):
        load_checkpoint(crafted)
    with pytest.raises(ValueError, match="was not opened"):
        finetune(tiny_config(model_dir, out, steps=2), resume="auto")
    with pytest.raises(ValueError, match="was not opened"):
        finetune(tiny_config(model_dir, tmp_path / "p", steps=2), resume=str(crafted))
    assert not marker.exists(), "the crafted checkpoint's payload ran"


def test_v1_checkpoint_with_numpy_rng_state_still_resumes_exactly(model_dir, tmp_path):
    # v1 checkpoints stored Python's and NumPy's RNG states as their native tuples (an ndarray inside); they
    # load through the weights-only unpickler with NumPy arrays allowed, and resume exactly.
    import random

    import numpy as np

    kw = dict(steps=3, save_every=1)
    finetune(tiny_config(model_dir, tmp_path / "a", **kw))
    finetune(tiny_config(model_dir, tmp_path / "b", stop_after=2, **kw))
    path = tmp_path / "b" / "checkpoints" / "step-0000002.pt"
    ckpt = torch.load(path, weights_only=True)
    from sla.training.checkpoint import set_rng_state

    set_rng_state(ckpt["rng"])  # the v1 file gets the very same states, in v1's layout
    ckpt["rng"]["python"], ckpt["rng"]["numpy"] = random.getstate(), np.random.get_state()
    ckpt["format"] = "sla-finetune-checkpoint-v1"
    torch.save(ckpt, path)
    assert load_checkpoint(path)["format"] == "sla-finetune-checkpoint-v1"
    assert finetune(tiny_config(model_dir, tmp_path / "b", **kw), resume="auto")["start_step"] == 2
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact resume, as in test_stop_and_resume_equals_uninterrupted


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(model_dir, tmp_path, capsys):
    kw = dict(steps=4, save_every=1)
    finetune(tiny_config(model_dir, tmp_path / "a", **kw))
    finetune(tiny_config(model_dir, tmp_path / "b", stop_after=3, **kw))  # keeps step 2 and step 3
    newest = tmp_path / "b" / "checkpoints" / "step-0000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a kill in the middle of a copy, a full disk, ...
    capsys.readouterr()
    assert finetune(tiny_config(model_dir, tmp_path / "b", **kw), resume="auto")["start_step"] == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "step-0000003.pt" in line]
    assert len(said) == 1 and "corrupt or truncated" in said[0] and "resuming from step-0000002.pt instead" in said[0]
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact resume, as in test_stop_and_resume_equals_uninterrupted


def test_second_signal_stops_at_once_and_handlers_are_restored(tmp_path):
    import signal

    from sla.training.config import make_config
    from sla.training.trainer import TrainingInterrupted, _StopOnSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = make_config(steps=10, output_dir=str(tmp_path), progress=False)
    with _StopOnSignal(cfg, tmp_path, announce=False) as stop:
        stop.step = 3
        signal.raise_signal(signal.SIGINT)  # the first one only asks the loop to stop after the step
        assert stop.requested == signal.SIGINT
        with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGTERM during step 4 of 10; "
                                                      "nothing saved since the start") as info:
            signal.raise_signal(signal.SIGTERM)
        assert info.value.checkpoint is None and info.value.exit_code == 143
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def _wait_for_log_rows(log: Path, rows: int, proc, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if log.is_file() and len(log.read_text().splitlines()) > rows:  # header + rows
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{log} did not reach {rows} rows in {timeout} s")


def test_sigint_and_sigterm_save_a_checkpoint_and_the_printed_command_resumes_exactly(model_dir, tmp_path):
    import re
    import shlex
    import signal

    args = ["--model", str(model_dir), "--frames", "2", "--height", "16", "--width", "16", "--block-q", "16",
            "--block-k", "16", "--critical", "0.5", "--negligible", "0.0", "--data-size", "64", "--steps", "1000",
            "--batch-size", "2", "--lr", "1e-3", "--save-every", "0", "--no-progress"]
    cli = [sys.executable, "-m", "sla.cli", "finetune"]
    # One thread in every process: the three runs then take the same kernels, and their weights compare exactly.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    log = out / "train_log.csv"

    first = subprocess.Popen(cli + args + ["--output-dir", str(out)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_log_rows(log, 3, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 130 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(r"sla finetune: stopped by SIGINT after step (\d+) of 1000; saved (\S+)\. Resume with: (.+)",
                     err.strip().splitlines()[-1])
    assert m, err[-3000:]
    k1 = int(m[1])
    assert Path(m[2]) == out / "checkpoints" / f"step-{k1:07d}.pt" and Path(m[2]).is_file()
    resume = shlex.split(m[3])
    assert resume[:2] == ["sla", "finetune"] and resume[-2:] == ["--resume", "auto"]

    # A save killed half-way leaves a temp file; the next start removes it (and says so).
    junk = out / "checkpoints" / ".tmp-4242-step-0000999.pt"
    junk.write_bytes(b"half a checkpoint")
    second = subprocess.Popen([sys.executable, "-m", "sla.cli", *resume[1:]], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_log_rows(log, k1 + 2, second)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=180)
    assert second.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert "removed 1 temp file(s) of an interrupted save: .tmp-4242-step-0000999.pt" in err and not junk.exists()
    m = re.search(r"stopped by SIGTERM after step (\d+) of 1000; saved ", err)
    k2 = int(m[1])
    assert k2 > k1
    rows = [r.split(",")[0] for r in log.read_text().strip().splitlines()[1:]]
    assert rows == [str(i) for i in range(1, k2 + 1)]  # every step logged once across the three processes

    ref = subprocess.run(cli + args + ["--output-dir", str(tmp_path / "ref"), "--stop-after", str(k2)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got = torch.load(out / "checkpoints" / f"step-{k2:07d}.pt", weights_only=True)
    want = torch.load(tmp_path / "ref" / "checkpoints" / f"step-{k2:07d}.pt", weights_only=True)
    for name, value in want["trainable"].items():
        assert torch.equal(got["trainable"][name], value), name
    for key, state in want["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(got["optimizer"]["state"][key][field], value), (key, field)


def test_trainable_modes(model_dir, tmp_path):
    base = load_finetuned(model_dir)[0].state_dict()
    # projection-only: only ...sla.proj changes
    finetune(tiny_config(model_dir, tmp_path / "proj", trainable="proj", steps=2))
    st = _final_state(tmp_path / "proj")
    for k, v in base.items():
        assert torch.equal(st[k], v), k
    assert any(".sla.proj" in k and v.abs().sum() > 0 for k, v in st.items())
    # LoRA: adapters are fused into the exported base weights, which change
    finetune(tiny_config(model_dir, tmp_path / "lora", trainable="lora", lora_rank=2, steps=3, lr=1e-2))
    st = _final_state(tmp_path / "lora")
    assert not any("lora" in k for k in st)
    assert not torch.equal(st["blocks.0.attn1.to_q.weight"], base["blocks.0.attn1.to_q.weight"])
    assert torch.equal(st["patch_embedding.weight"], base["patch_embedding.weight"])  # not a LoRA target


@pytest.mark.parametrize("mode", ["sparse_only", "sum_no_proj", "linear_only", "full"])
def test_ablation_modes_train_and_reload(model_dir, tmp_path, mode):
    finetune(tiny_config(model_dir, tmp_path / mode, attention=mode, steps=2))
    model, info = load_finetuned(tmp_path / mode / "final")
    assert info["attention"] == mode
    if mode == "sparse_only":  # projection stays exactly zero: output is the sparse branch alone
        projs = [p for n, p in model.named_parameters() if ".sla.proj" in n]
        assert projs and all(torch.count_nonzero(p) == 0 for p in projs)
    x = torch.randn(1, 3, 2, 16, 16)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 32, 16), return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_linear_only_matches_formula():
    from sla.training.variants import LinearOnlyAttention

    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64) for _ in range(3))
    out = LinearOnlyAttention("elu", eps=0.0)(q, k, v)
    pq, pk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    attn = pq @ pk.transpose(-1, -2)
    ref = (attn / attn.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(out, ref)


def test_config_file_and_errors(tmp_path):
    from sla.training.config import make_config

    f = tmp_path / "c.toml"
    f.write_text('[sla]\ncritical = 0.1\n[train]\nsteps = 7\nlr = 3e-4\n')
    cfg = make_config(str(f), steps=9)
    assert (cfg.critical, cfg.steps, cfg.lr) == (0.1, 9, 3e-4)
    f.write_text("critcal = 0.1\n")
    with pytest.raises(ValueError, match="unknown key"):
        make_config(str(f))
    pytest.importorskip("yaml")
    y = tmp_path / "c.yaml"
    y.write_text("attention: sparse_only\nbatch_size: 3\n")
    assert make_config(str(y)).attention == "sparse_only"
    with pytest.raises(ValueError, match="trainable='proj'"):
        make_config(attention="full", trainable="proj")
    with pytest.raises(ValueError, match="attention must be one of"):
        make_config(attention="dense")


_DDP_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from _training_utils import tiny_config
    from sla.training.trainer import finetune
    finetune(tiny_config({model!r}, {out!r}, steps=3, batch_size=1, grad_accum=1, save_every=0))
""")


_DDP_STOP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from _training_utils import tiny_config
    from sla.training.trainer import TrainingInterrupted, finetune
    rank = os.environ["RANK"]
    open(os.path.join({out!r}, "pid" + rank), "w").write(str(os.getpid()))
    try:
        finetune(tiny_config({model!r}, {run!r}, steps=100000, batch_size=1, save_every=0))
    except TrainingInterrupted as stop:
        json.dump(dict(step=stop.step, signum=stop.signum), open(os.path.join({out!r}, "stopped" + rank), "w"))
""")


def test_ddp_a_signal_to_one_rank_stops_all_after_the_same_step(model_dir, tmp_path):
    # Ctrl-C reaches every process of the group, SIGTERM may reach one: either way all ranks must stop after the
    # same step (the request rides on the loss all-reduce), and rank 0 must have saved that step.
    import json
    import signal

    script = tmp_path / "ddp_stop.py"
    run = tmp_path / "run"
    script.write_text(_DDP_STOP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), model=str(model_dir),
                                              out=str(tmp_path), run=str(run)))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_log_rows(run / "train_log.csv", 2, proc)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)  # rank 1 only
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-4000:]
    stopped = [json.loads((tmp_path / f"stopped{r}").read_text()) for r in (0, 1)]
    assert stopped[0]["step"] == stopped[1]["step"] >= 2
    assert stopped[1]["signum"] == signal.SIGTERM
    step = stopped[0]["step"]
    assert load_checkpoint(run / "checkpoints" / f"step-{step:07d}.pt")["step"] == step


def test_ddp_gloo_two_processes_equals_one(model_dir, tmp_path):
    # One process with batch 2 vs two processes (gloo) with batch 1 each: same global batch, same clips,
    # same noise; only the float summation order of the gradient average differs.
    finetune(tiny_config(model_dir, tmp_path / "one", steps=3, batch_size=2, save_every=0))
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), model=str(model_dir),
                                         out=str(tmp_path / "two")))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-12000:]
    one, two = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=same_training_atol(k),
                                   msg=lambda m, k=k: f"{k}: {m}")
    base = load_finetuned(model_dir)[0].state_dict()
    moved = sum(not torch.equal(one[k], base[k]) for k in base)
    assert moved > len(base) // 2  # the runs did train


def test_ship_finetuned_rounds_the_transformer_to_bf16_and_keeps_the_sla_parameters(model_dir, tmp_path):
    import importlib.util
    import json

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location(
        "ship_finetuned", Path(__file__).resolve().parent.parent / "scripts" / "ship_finetuned.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    finetune(tiny_config(model_dir, tmp_path / "o", steps=2, combine="pooled_cov"))
    src, dest = tmp_path / "o" / "final", tmp_path / "assets" / "sla_pooled_cov"
    done = ship.ship(src, dest, "a test run")
    assert done["bytes_after"] < 0.6 * done["bytes_before"]
    weights = load_file(str(dest / ship.WEIGHTS))
    original = load_file(str(src / ship.WEIGHTS))
    assert all(w.dtype == torch.bfloat16 for w in weights.values() if w.is_floating_point())
    assert all(torch.equal(weights[k], original[k].to(torch.bfloat16)) for k in original)
    for name in ("sla_weights.safetensors", "sla_config.json"):  # float32 SLA parameters, as written
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    config = json.loads((src / "config.json").read_text())
    assert "_name_or_path" in config  # the training machine's path: dropped, the rest as written
    assert json.loads((dest / "config.json").read_text()) == {k: v for k, v in config.items() if k != "_name_or_path"}
    info = json.loads((dest / "finetune_info.json").read_text())
    assert info["shipped"].startswith("a test run;") and info["sla"]["combine"] == "pooled_cov"
    model, loaded = load_finetuned(dest)
    assert loaded["attention"] == "sla" and next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        ship.ship(src, dest, "again")
    with pytest.raises(ValueError, match="--note must say"):
        ship.ship(src, tmp_path / "other", "  ")
    with pytest.raises(ValueError, match="is not an `sla finetune` final folder"):
        ship.ship(tmp_path, tmp_path / "other", "x")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["sla_pooled_cov"]  # no temporary folder left


def test_ship_finetuned_as_an_int8_delta_from_a_built_in_model(model_dir, tmp_path, monkeypatch):
    # The delta format (sla.models.weight_delta) names its base as a built-in model; the tiny model stands in for one.
    import importlib.util
    import json

    from safetensors.torch import load_file

    from sla.models import small_wan
    from sla.models.weight_delta import DELTA_WEIGHTS_NAME, quantize_delta

    monkeypatch.setitem(small_wan.EMBEDDED_MODELS, "tiny", small_wan.EMBEDDED_MODELS["small"])
    built_in = small_wan.small_model_path
    monkeypatch.setattr(small_wan, "small_model_path", lambda name: model_dir if name == "tiny" else built_in(name))
    spec = importlib.util.spec_from_file_location(
        "ship_finetuned", Path(__file__).resolve().parent.parent / "scripts" / "ship_finetuned.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    finetune(tiny_config(model_dir, tmp_path / "o", steps=2, lr=1e-3, combine="pooled_cov"))
    src, dest = tmp_path / "o" / "final", tmp_path / "assets" / "sla_pooled_cov"
    done = ship.ship(src, dest, "a test run", delta_from="tiny")
    assert done["weights"] == DELTA_WEIGHTS_NAME and not (dest / ship.WEIGHTS).exists()
    assert done["bytes_after"] < 0.4 * done["bytes_before"]  # int8 against float32; the tiny model has many vectors
    assert "int8 difference from the built-in model 'tiny'" in json.loads((dest / "finetune_info.json").read_text())[
        "shipped"]
    assert "_name_or_path" not in json.loads((dest / "config.json").read_text())
    original = load_file(str(src / ship.WEIGHTS))
    base = load_file(str(model_dir / ship.WEIGHTS))
    model, loaded = load_finetuned(dest)
    assert loaded["attention"] == "sla"
    state = model.state_dict()
    moved = 0
    for k, w in original.items():
        delta = (w.double() - base[k].double()).abs()
        bound = delta.flatten(1).amax(1).view(-1, *[1] * (w.dim() - 1)) / 254 if w.dim() >= 2 else 0 * delta
        # Each weight within half a quantisation step of its row (float32 rounding of base + delta on top).
        slack = 1e-6 * (w.double().abs() + base[k].double().abs()) + 1e-12
        assert ((state[k].double() - w.double()).abs() <= bound + slack).all(), k
        moved += bool(delta.max() > 0)
    assert moved > len(original) // 2  # the fine-tune moved most weights, so the delta is not trivially zero
    with pytest.raises(ValueError, match="base must be a built-in model"):
        ship.ship(src, tmp_path / "other", "x", delta_from=str(model_dir))
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="differ in names"):
        quantize_delta({"a": torch.zeros(2, 2)}, {"b": torch.zeros(2, 2)})
    (dest / "config.json").write_text(json.dumps({**json.loads((dest / "config.json").read_text()), "num_layers": 9}))
    with pytest.raises(ValueError, match="differs from the base model's .* in \\['num_layers'\\]"):
        load_finetuned(dest)
