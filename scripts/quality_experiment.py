"""The decisive quality experiment of issue 12: does a branch combination that can recover the attention mass
outside the critical blocks let SLA keep quality where sparse-only attention loses it?

Written down before it ran (docs/results.md, "Decisive experiment"): every arm fine-tunes the same pretrained
checkpoint with the same data, steps, batch and learning rate, with seeds paired across arms (seed s gives
every arm the same data order, noise and timesteps); evaluation uses fixed noise and held-out clips only.

    python scripts/quality_experiment.py run --out runs/quality --seeds 0 1 2 --gpus 0,1 --jobs-per-gpu 3
    python scripts/quality_experiment.py report runs/quality        # results.json + results.md

``run`` starts one worker process per job slot (``CUDA_VISIBLE_DEVICES`` per GPU); each job fine-tunes one
(arm, seed) and evaluates it, writing ``<out>/<arm>/seed<s>/result.json`` as soon as it is done, so a run cut
short keeps every finished job. ``report`` needs only those files. On a CPU, ``--smoke`` shrinks everything
to seconds (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Arm name -> `sla finetune` settings on top of the shared recipe. "Recipe" = the SLA parameters' learning-rate
# multipliers and no weight decay on them (FinetuneConfig defaults); "plain" = the same learning rate and
# weight decay as the rest of the model (the setting every earlier run of this project used).
PLAIN = dict(proj_lr_scale=1.0, mass_lr_scale=1.0, sla_weight_decay=0.01)
ARMS = {
    "full": dict(attention="full"),
    "sparse_only": dict(attention="sparse_only"),
    "sparse_only_flops": dict(attention="sparse_only", critical="FLOPS"),  # critical resolved per model below
    "sla_paper_plain": dict(attention="sla", combine="paper", **PLAIN),
    "sla_paper": dict(attention="sla", combine="paper"),
    "sla_mass": dict(attention="sla", combine="mass"),
    "sla_mass_plain": dict(attention="sla", combine="mass", **PLAIN),
    # Blocks over 4x4x4 token tiles instead of raster runs (apply_sla(token_tile=...)); the wan8k experiment.
    "sparse_only_tile": dict(attention="sparse_only", token_tile=(4, 4, 4)),
    "sla_mass_tile": dict(attention="sla", combine="mass", token_tile=(4, 4, 4)),
    # Block shapes (issue 12's secondary table; the fastest GPU kernels prefer 128-wide blocks): the same tiled SLA
    # with 128-token query blocks, and with 128-token key blocks too. Same token budget: 5% of 64 key blocks of
    # 128 tokens is 3 blocks = 384 keys, as 6 blocks of 64.
    "sla_mass_tile_128x64": dict(attention="sla", combine="mass", token_tile=(4, 4, 4), block_q=128, block_k=64),
    "sla_mass_tile_128x128": dict(attention="sla", combine="mass", token_tile=(4, 4, 4), block_q=128, block_k=128),
    # combine="pooled" (a and a coarse attention from the key blocks' means, docs/semantics.md). Its third-experiment
    # arm ran the PyTorch path (the rule had no Triton kernels then) and keeps it, whatever --backend says (recorded
    # in result.json); "_triton" is the same recipe on the kernels that came later, its backend control.
    "sla_pooled_tile": dict(attention="sla", combine="pooled", token_tile=(4, 4, 4), backend="torch"),
    "sla_pooled_tile_triton": dict(attention="sla", combine="pooled", token_tile=(4, 4, 4)),
    # The control of the third experiment: the mass rule on the PyTorch path too, separating rule from backend.
    "sla_mass_tile_torch": dict(attention="sla", combine="mass", token_tile=(4, 4, 4), backend="torch"),
    # combine="pooled_cov": the pooled rule with each block's key-value covariance (first order in the spread of its
    # keys). Its fourth-experiment arm ran the PyTorch path (no kernels then) and keeps it; "_triton" is its backend
    # control on the kernels that came after.
    "sla_pooled_cov_tile": dict(attention="sla", combine="pooled_cov", token_tile=(4, 4, 4), backend="torch"),
    "sla_pooled_cov_tile_triton": dict(attention="sla", combine="pooled_cov", token_tile=(4, 4, 4)),
}
# Arms that differ from "sla_mass_tile" only in their block shape (the report's block table).
BLOCK_ARMS = ("sla_mass_tile", "sla_mass_tile_128x64", "sla_mass_tile_128x128")
# Which sparse-only arm a rule's share of the gap is measured against (same block layout).
BASELINE = {"sla_mass_tile": "sparse_only_tile", "sla_pooled_tile": "sparse_only_tile",
            "sla_pooled_cov_tile": "sparse_only_tile"}
# A new rule is also compared, seed by seed, with the rule it means to replace.
RIVAL = {"sla_pooled_tile": "sla_mass_tile", "sla_pooled_cov_tile": "sla_pooled_tile"}
# Arm -> the same recipe on the other backend (the report's backend-control table).
BACKEND_CONTROL = {"sla_mass_tile_torch": "sla_mass_tile", "sla_pooled_tile_triton": "sla_pooled_tile",
                   "sla_pooled_cov_tile_triton": "sla_pooled_cov_tile"}
SHARED = dict(steps=400, batch_size=8, lr=2e-4, warmup_steps=20, critical=0.05, negligible=0.10)
EVAL = dict(clips=256, samples=256, sample_steps=20, batch_size=32)
SAVE_EVERY = 100
SMOKE = dict(steps=2, batch_size=1, warmup_steps=1), dict(clips=2, samples=2, sample_steps=1, batch_size=2)


def flops_matched_critical(model_spec: str, critical: float, negligible: float) -> float:
    """The largest critical fraction whose sparse-only attention FLOPs do not exceed SLA's at ``critical``
    (SLA also pays its linear branch and Proj), on the model's own sequence length and head size."""
    from sla.models.small_wan import data_config_for
    from sla.training.checkpoint import resolve_model_folder
    from sla.training.variants import attention_flops

    folder = resolve_model_folder(model_spec)
    cfg = json.loads((folder / "config.json").read_text())
    data = data_config_for(folder)
    pt, ph, pw = cfg["patch_size"]
    seq = (data.frames // pt) * (data.height // ph) * (data.width // pw)
    shape = dict(seq_len=seq, head_dim=cfg["attention_head_dim"], heads=cfg["num_attention_heads"],
                 layers=cfg["num_layers"])
    budget = attention_flops("sla", **shape, critical=critical, negligible=negligible)
    tn = -(-seq // 64)
    best = critical
    for n in range(1, tn + 1):
        c = n / tn
        if attention_flops("sparse_only", **shape, critical=c, negligible=0.0) <= budget:
            best = max(best, c)
    return best


def evaluation_backend(model, backend: str, device: str) -> str:
    """The backend the float32 evaluation runs SLA on (:func:`sla.eval.evaluate.evaluation_backend`: the PyTorch
    path on CUDA for head dims the Triton kernels do not run in float32). Recorded in each result.json as
    ``eval_backend``."""
    from sla.eval.evaluate import evaluation_backend as rule

    return rule(model, backend, device)


def run_job(arm: str, seed: int, out: Path, model: str, smoke: bool, backend: str, threads: int = 0,
            steps: int = 0, stop_after: int = 0) -> dict:
    import torch

    if threads:
        # Several jobs share the machine's cores: torch's default (one thread per core in every process) made
        # six concurrent jobs on 32 cores run ~100x slower than one alone (the synthetic clips are rendered
        # with CPU ops in the training process).
        torch.set_num_threads(threads)

    from sla.data.synthetic import SyntheticVideoDataset, collate
    from sla.eval.evaluate import attention_error, generate, heldout_loss, sample_quality
    from sla.eval.features import load_feature_net
    from sla.training.checkpoint import load_finetuned, synthetic_data_config
    from sla.training.config import make_config
    from sla.training.trainer import finetune

    train_kw, eval_kw = (SMOKE if smoke else (SHARED, EVAL))
    settings = {**SHARED, **train_kw, **ARMS[arm]}
    backend = settings.pop("backend", backend)  # an arm that names its backend runs there
    if steps:  # a longer (or shorter) run than the pre-registered one, reported as such
        settings["steps"] = steps
    if settings.get("critical") == "FLOPS":
        settings["critical"] = flops_matched_critical(model, SHARED["critical"], SHARED["negligible"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    job_dir = out / arm / f"seed{seed}"
    t0 = time.time()
    # Checkpoints every SAVE_EVERY steps, and on SIGINT (``run --time-limit``): a job stopped during training
    # resumes from its newest checkpoint when run again (exact resume: the same losses as an unbroken run).
    cfg = make_config(model=model, output_dir=str(job_dir / "train"), seed=seed, save_every=SAVE_EVERY,
                      device=device, bf16=device == "cuda", progress=False, backend=backend, stop_after=stop_after,
                      **settings)
    # A job cut off during its evaluation (a time-limited GPU call) keeps its training: the marker is written
    # only after the final model is exported, and a re-run of the job evaluates that model again.
    trained = job_dir / "trained.json"
    from sla._paths import atomic_write_text

    if trained.is_file():
        done = json.loads(trained.read_text())
        summary, train_seconds = done["summary"], done["train_seconds"]
    else:
        # Training time summed over the segments of a job stopped and resumed.
        spent_file = job_dir / "train_seconds_before_resume.json"
        spent = json.loads(spent_file.read_text())["seconds"] if spent_file.is_file() else 0.0

        def keep_time():  # a stopped segment's time, for the run that resumes it
            atomic_write_text(spent_file, json.dumps(dict(seconds=spent + time.time() - t0)) + "\n")

        try:
            summary = finetune(cfg, resume="auto")
        except BaseException:  # SIGINT (TrainingInterrupted) or an error: the checkpoints stay
            keep_time()
            raise
        if "final" not in summary:  # stop_after ended training early: a checkpoint, no model to evaluate yet
            keep_time()
            return dict(arm=arm, seed=seed, stopped_after=summary["end_step"])
        train_seconds = spent + time.time() - t0
        atomic_write_text(trained, json.dumps(dict(summary=summary, train_seconds=round(train_seconds, 1)),
                                              default=str) + "\n")
    ft, info = load_finetuned(job_dir / "train" / "final")
    ft.to(device).eval()
    from sla.integrations.diffusers import is_sla_applied, sla_modules

    # `full` has no SLA modules: its attention is the model's own, whatever the backend.
    eval_backend = evaluation_backend(ft, backend, device) if is_sla_applied(ft) else backend
    if eval_backend != backend:
        for module in sla_modules(ft).values():
            module.backend = eval_backend
    t_eval = time.time()
    data = synthetic_data_config(model, ft)
    n = max(eval_kw["clips"], eval_kw["samples"], 2)
    val = SyntheticVideoDataset("val", size=n, config=data)
    loss = heldout_loss(ft, val, n=eval_kw["clips"], batch_size=eval_kw["batch_size"], device=device)
    real = collate([val[i] for i in range(eval_kw["samples"])])
    gen = generate(ft, val, range(eval_kw["samples"]), steps=eval_kw["sample_steps"], batch_size=eval_kw["batch_size"],
                   device=device)
    from sla.models.small_wan import feature_net_for

    net = load_feature_net(feature_net_for(data), device=device)
    quality = sample_quality(gen, real["video"], real["labels"], net)
    layers = attention_error(ft, collate([val[i] for i in range(2)]), device=device)
    sla_params = {n_: p.detach().float().cpu() for n_, p in ft.named_parameters() if ".sla." in n_}
    result = dict(
        arm=arm, seed=seed, model=model, settings={k: v for k, v in settings.items()}, backend=backend,
        heldout_loss=loss["loss"], heldout_per_sigma=loss["per_sigma"], heldout_clips=loss["clips"],
        frechet_distance=quality["frechet_distance"], attribute_agreement=quality["attribute_agreement"],
        samples=quality["samples"], layers=layers,
        rel_error_vs_dense=(sum(r["rel_error_vs_dense"] for r in layers) / len(layers)) if layers else 0.0,
        sparsity=(sum(r["sparsity"] for r in layers) / len(layers)) if layers else 0.0,
        final_train_loss=summary.get("loss"), train_seconds=round(train_seconds, 1), eval_backend=eval_backend,
        eval_seconds=round(time.time() - t_eval, 1),
        total_seconds=round(time.time() - t0, 1),
        proj_weight_max_abs_change={n_: float((p - (torch.eye(p.shape[0]) if settings.get("combine") == "mass"
                                                     else 0)).abs().max())
                                    for n_, p in sla_params.items() if n_.endswith("proj.weight")},
        mass_offsets={n_: p.tolist() for n_, p in sla_params.items() if n_.endswith("mass_offset")},
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)
    atomic_write_text(job_dir / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def _unfinished(out: Path, args) -> list[tuple[str, int]]:
    """The (arm, seed) jobs of this command with no result.json yet."""
    return [(arm, s) for s in args.seeds for arm in (args.arms or list(ARMS))
            if not (out / arm / f"seed{s}" / "result.json").is_file()]


def cmd_run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _unfinished(out, args)
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else [""]
    slots = [g for g in gpus for _ in range(args.jobs_per_gpu)]
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    log = open(out / "run.log", "a")
    t0 = time.time()
    stopping = False
    while jobs or running:
        if args.time_limit and not stopping and time.time() - t0 > args.time_limit:
            # SIGINT: a training job finishes its step, saves a checkpoint and exits; an evaluating one stops at
            # once (its training is kept). A later run with the same --out resumes both.
            print(f"[{time.time() - t0:6.0f} s] --time-limit {args.time_limit:.0f} s reached: stopping "
                  f"{len(running)} job(s) (SIGINT), {len(jobs)} not started", file=log, flush=True)
            for proc, _, _ in running:
                proc.send_signal(signal.SIGINT)
            jobs, stopping = [], True
        if jobs and args.start_before and time.time() - t0 > args.start_before:
            print(f"[{time.time() - t0:6.0f} s] --start-before {args.start_before:.0f} s passed: {len(jobs)} job(s) "
                  f"left for the next run", file=log, flush=True)
            jobs = []
        while jobs and len(running) < len(slots):
            busy = [r[1][0] for r in running]
            free = [g for g in slots]
            for g in busy:
                free.remove(g)
            gpu = free[0]
            arm, seed = jobs.pop(0)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if gpu:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            threads = max(1, (os.cpu_count() or 1) // len(slots))
            env["OMP_NUM_THREADS"] = str(threads)
            cmd = [sys.executable, __file__, "job", "--arm", arm, "--seed", str(seed), "--out", str(out),
                   "--model", args.model, "--backend", args.backend, "--threads", str(threads),
                   "--steps", str(args.steps)] + \
                (["--smoke"] if args.smoke else [])
            (out / arm / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            f = open(out / arm / f"seed{seed}" / "job.log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), (gpu, arm, seed),
                            time.time()))
            print(f"[{time.time() - t0:6.0f} s] start {arm} seed {seed} on GPU {gpu or 'cpu'}", file=log, flush=True)
        time.sleep(1.0)
        for proc, (gpu, arm, seed), started in list(running):
            if proc.poll() is not None:
                running.remove((proc, (gpu, arm, seed), started))
                print(f"[{time.time() - t0:6.0f} s] done {arm} seed {seed}: exit {proc.returncode} after "
                      f"{time.time() - started:.0f} s", file=log, flush=True)
    left = [f"{arm} seed {s}" for arm, s in _unfinished(out, args)]
    if left:
        print(f"{len(left)} job(s) not finished ({', '.join(left)}); run the same command again to continue them "
              f"(logs: {out}/<arm>/seed<s>/job.log)", file=sys.stderr)
        return 3
    return 0


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _lower_per_seed(by: dict, seeds, arm: str, other: str) -> list[bool]:
    """Per seed: does ``arm`` have a lower held-out loss than ``other``?"""
    return [by[(arm, s)]["heldout_loss"] < by[(other, s)]["heldout_loss"] for s in seeds]


def _paired_difference(by: dict, seeds, arm: str, other: str) -> tuple[list[int], list[float]]:
    """The seeds both arms ran, and ``arm``'s held-out loss minus ``other``'s on each."""
    paired = [s for s in seeds if (arm, s) in by and (other, s) in by]
    return paired, [by[(arm, s)]["heldout_loss"] - by[(other, s)]["heldout_loss"] for s in paired]


def cmd_report(args) -> int:
    out = Path(args.out)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*/result.json"))]
    for path in args.include:
        # Jobs of an earlier run (its results.json keeps every job's result.json under "jobs"), for the arms
        # and seeds this run did not redo.
        try:
            earlier = json.loads(Path(path).read_text())["jobs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"--include {path}: not a results.json written by this script's report ({e})", file=sys.stderr)
            return 2
        have = {(r["arm"], r["seed"]) for r in results}
        results += [r for r in earlier if (r["arm"], r["seed"]) not in have]
    if not results:
        print(f"no result.json under {out}", file=sys.stderr)
        return 2
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    seeds = sorted({r["seed"] for r in results})
    by = {(r["arm"], r["seed"]): r for r in results}
    rows = []
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        rows.append(dict(arm=arm, seeds=[r["seed"] for r in rs], heldout_loss=_mean([r["heldout_loss"] for r in rs]),
                         heldout_loss_per_seed=[r["heldout_loss"] for r in rs],
                         frechet_distance=_mean([r["frechet_distance"] for r in rs]),
                         fd_per_seed=[r["frechet_distance"] for r in rs],
                         rel_error_vs_dense=_mean([r["rel_error_vs_dense"] for r in rs]),
                         sparsity=_mean([r["sparsity"] for r in rs]), critical=rs[0]["settings"].get("critical"),
                         blocks=f"{rs[0]['settings'].get('block_q', 64)}x{rs[0]['settings'].get('block_k', 64)}"))
    verdicts = {}
    for new in ("sla_mass", "sla_paper", "sla_mass_plain", "sla_paper_plain", "sla_mass_tile", "sla_pooled_tile",
                "sla_pooled_cov_tile"):
        base = BASELINE.get(new, "sparse_only")
        if not all((a, s) in by for a in (new, base, "full") for s in seeds):
            continue
        beats = _lower_per_seed(by, seeds, new, base)
        gap = _mean([by[(base, s)]["heldout_loss"] - by[("full", s)]["heldout_loss"] for s in seeds])
        closed = _mean([by[(base, s)]["heldout_loss"] - by[(new, s)]["heldout_loss"] for s in seeds])
        verdicts[new] = dict(baseline=base, beats_sparse_only_every_seed=all(beats), beats_per_seed=beats,
                             gap_closed=closed / gap if gap > 0 else float("nan"),
                             criterion_met=all(beats) and gap > 0 and closed / gap >= 0.5)
        rival = RIVAL.get(new)
        if rival and all((rival, s) in by for s in seeds):
            better = _lower_per_seed(by, seeds, new, rival)
            verdicts[new].update(rival=rival, beats_rival_every_seed=all(better), beats_rival_per_seed=better)
    tiles = {}
    for tiled, raster in (("sparse_only_tile", "sparse_only"), ("sla_mass_tile", "sla_mass")):
        if all((a, s) in by for a in (tiled, raster) for s in seeds):
            better = _lower_per_seed(by, seeds, tiled, raster)
            tiles[tiled] = dict(against=raster, better_every_seed=all(better), better_per_seed=better)
    blocks = {}
    ref = BLOCK_ARMS[0]
    for arm in BLOCK_ARMS[1:]:
        paired, diff = _paired_difference(by, seeds, arm, ref)
        if paired:
            blocks[arm] = dict(against=ref, seeds=paired, loss_minus_64x64_per_seed=diff, mean_difference=_mean(diff))
    controls = {}
    for arm, other in BACKEND_CONTROL.items():
        paired, diff = _paired_difference(by, seeds, arm, other)
        if paired:
            controls[arm] = dict(against=other, seeds=paired, loss_difference_per_seed=diff,
                                 mean_difference=_mean(diff))
            if ARMS[arm].get("combine") == "mass" and all(("sla_pooled_tile", s) in by for s in paired):
                better = _lower_per_seed(by, paired, "sla_pooled_tile", arm)
                controls[arm].update(pooled_beats_it_every_seed=all(better), pooled_beats_it_per_seed=better)
    st = results[0]["settings"]
    ev = dict(clips=results[0]["heldout_clips"], samples=results[0]["samples"])
    # Jobs kept from earlier runs may come from another card or torch: name every one (the per-job records say
    # which job ran where).
    devices = sorted({r["device"] for r in results})
    torches = sorted({r["torch"] for r in results})
    meta = dict(model=results[0]["model"], device=" / ".join(devices), torch=" / ".join(torches),
                steps=st["steps"], batch_size=st["batch_size"], lr=st["lr"], eval=ev, seeds=seeds)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, verdicts=verdicts, token_tiles=tiles,
                                                      block_shapes=blocks, backend_controls=controls, jobs=sorted(
                                                          results, key=lambda r: (r["arm"], r["seed"]))),
                                                 indent=1) + "\n")
    lines = [f"Model `{meta['model']}`, {meta['device']}, torch {meta['torch']}; seeds {seeds}; "
             f"{st['steps']} steps x batch {st['batch_size']}, lr {st['lr']}; held-out loss on "
             f"{ev['clips']} clips x 5 sigmas (fixed noise), FD on {ev['samples']} samples.", "",
             "| arm | blocks | critical | held-out loss (mean) | per seed | FD (mean) | FD per seed | "
             "rel. error vs dense | sparsity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['blocks']} | {r['critical']} | {r['heldout_loss']:.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in r['heldout_loss_per_seed'])} | {r['frechet_distance']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['fd_per_seed'])} | {r['rel_error_vs_dense']:.3f} | "
                     f"{r['sparsity']:.3f} |")
    lines += ["", "| rule | against | beats it in every seed | share of its gap to full closed | "
                  "criterion met |", "|---|---|---|---|---|"]
    for k, v in verdicts.items():
        lines.append(f"| {k} | {v['baseline']} | {v['beats_sparse_only_every_seed']} ({v['beats_per_seed']}) | "
                     f"{100 * v['gap_closed']:.0f}% | {v['criterion_met']} |")
    rivals = {k: v for k, v in verdicts.items() if "rival" in v}
    if rivals:
        lines += ["", "| rule | against the rule it would replace | lower held-out loss in every seed |",
                  "|---|---|---|"]
        for k, v in rivals.items():
            lines.append(f"| {k} | {v['rival']} | {v['beats_rival_every_seed']} ({v['beats_rival_per_seed']}) |")
    if tiles:
        lines += ["", "| token tiles | against raster arm | lower held-out loss in every seed |", "|---|---|---|"]
        for k, v in tiles.items():
            lines.append(f"| {k} | {v['against']} | {v['better_every_seed']} ({v['better_per_seed']}) |")
    if blocks:
        lines += ["", "| block shape arm | against | held-out loss minus the 64x64 arm's, per seed | mean |",
                  "|---|---|---|---|"]
        for k, v in blocks.items():
            lines.append(f"| {k} | {v['against']} | {', '.join(f'{x:+.4f}' for x in v['loss_minus_64x64_per_seed'])} "
                         f"| {v['mean_difference']:+.4f} |")
    if controls:
        lines += ["", "| backend control | against | held-out loss minus it, per seed | mean | "
                      "pooled rule lower in every seed |", "|---|---|---|---|---|"]
        for k, v in controls.items():
            lines.append(f"| {k} | {v['against']} | {', '.join(f'{x:+.4f}' for x in v['loss_difference_per_seed'])} "
                         f"| {v['mean_difference']:+.4f} | {v.get('pooled_beats_it_every_seed', 'n/a')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if getattr(args, "ship", None):  # callers that build their own args (tests) may leave it out
        # The compact form the package ships beside its models (the quickstart quotes it): no per-job records.
        Path(args.ship).write_text(json.dumps(dict(meta=meta, rows=rows, verdicts=verdicts), indent=1) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every (arm, seed) job not finished yet")
    r.add_argument("--out", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--arms", nargs="*", choices=list(ARMS), help="default: all")
    r.add_argument("--gpus", default="", help="comma list of GPU ids (default: none, run on CPU one at a time)")
    r.add_argument("--jobs-per-gpu", type=int, default=1)
    r.add_argument("--model", default="small")
    r.add_argument("--backend", default="auto")
    r.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU check of the pipeline")
    r.add_argument("--steps", type=int, default=0, help="fine-tuning steps (default: the pre-registered 400)")
    r.add_argument("--start-before", type=float, default=0.0,
                   help="start no job after this many seconds (0 = no limit): lets a time-limited call end with "
                        "every started job finished; a later run with the same --out does the rest")
    r.add_argument("--time-limit", type=float, default=0.0,
                   help="after this many seconds (0 = none) stop every running job with SIGINT: training saves a "
                        "checkpoint, and the same command run again resumes it exactly; exit status 3 while jobs "
                        "are left")
    j = sub.add_parser("job", help="one (arm, seed): fine-tune, evaluate, write result.json")
    j.add_argument("--arm", required=True, choices=list(ARMS))
    j.add_argument("--seed", type=int, required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--model", default="small")
    j.add_argument("--backend", default="auto")
    j.add_argument("--smoke", action="store_true")
    j.add_argument("--threads", type=int, default=0, help="CPU threads of this job (0 = torch's default)")
    j.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0 = the pre-registered 400)")
    p = sub.add_parser("report", help="aggregate result.json files into results.json and results.md")
    p.add_argument("out")
    p.add_argument("--include", nargs="*", default=[], metavar="RESULTS_JSON",
                   help="also use the jobs kept in earlier results.json files (for arms and seeds not under OUT): "
                        "e.g. bench/results_quality_wan8k.json to compare a new arm with the committed ones")
    p.add_argument("--ship", metavar="JSON", help="also write the summary (meta, rows, verdicts) the package ships, "
                   "e.g. sla/assets/wan8k/experiment_results.json")
    args = ap.parse_args()
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "job":
        from sla.training.trainer import TrainingInterrupted

        try:
            run_job(args.arm, args.seed, Path(args.out), args.model, args.smoke, args.backend, args.threads,
                    args.steps)
        except TrainingInterrupted as e:
            print(f"quality_experiment job {args.arm} seed {args.seed}: {e}; run it again to resume", file=sys.stderr)
            return e.exit_code
        return 0
    return cmd_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
