"""``sla quickstart``: the whole SLA story on the embedded default, end to end, with a report you can open.

1. Load the shipped small Wan transformer (pretrained with full attention on the synthetic videos).
2. Apply SLA (critical 5%, negligible 10%: 95% sparsity over 64 key blocks per row) and fine-tune it
   briefly with the flow-matching loss.
3. Evaluate against full attention on held-out clips: held-out loss, samples (PNG grid + GIF), Frechet
   distance in a small video network's feature space, caption attribute agreement, per-layer attention
   error against dense attention, achieved sparsity, attention FLOPs, forward time.
4. Write ``report.md`` (+ ``eval.json``, images, GIFs, training curve) into ``--out``.

On a CPU the default preset ("cpu") is sized to finish in about 10 minutes on 2 cores; on a GPU the
"gpu" preset also fine-tunes full attention (the control) and sparse-only with the same budget, with more
steps and samples. ``--preset`` overrides the automatic choice.
"""

from __future__ import annotations

import argparse

PRESETS = {
    "cpu": dict(steps=30, batch_size=2, lr=3e-4, clips=8, samples=8, sample_steps=12, controls=False),
    "gpu": dict(steps=600, batch_size=8, lr=2e-4, clips=64, samples=64, sample_steps=25, controls=True),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.epilog = "examples:\n  sla quickstart                 # CPU: ~10 min on 2 cores\n" \
               "  sla quickstart --preset gpu --out runs/quickstart_gpu\n"
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="size of the run (default: gpu if CUDA is available)")
    p.add_argument("--steps", type=int, help="override the preset's fine-tuning steps")
    p.add_argument("--samples", type=int, help="override the preset's generated clips per model")
    p.add_argument("--critical", type=float, default=0.05, help="SLA critical fraction (default: 0.05)")
    p.add_argument("--negligible", type=float, default=0.10, help="SLA negligible fraction (default: 0.10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out folder first")


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values at each point (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _curve_series(log: str) -> tuple[list[int], list[float], list[float], int]:
    """Steps, raw per-step losses, their moving average and its window, from a ``train_log.csv``.

    Per-step losses at small batch are noisy (each step draws other clips, noise and timesteps); the window,
    a twentieth of the run but at least 5 steps, shows the trend while the raw points stay visible."""
    import csv

    with open(log) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    window = max(1, min(len(loss), max(5, len(loss) // 20)))
    return steps, loss, _moving_average(loss, window), window


def _plot_curves(runs: dict, path: str) -> str | None:
    """Training loss of each run: the raw per-step points, faint, and their moving average as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, log in runs.items():
        steps, loss, smooth, window = _curve_series(log)
        (line,) = ax.plot(steps, smooth, label=f"{name} (mean of last {window} steps)")
        ax.scatter(steps, loss, s=10, alpha=0.45, color=line.get_color(), linewidths=0,
                   label=f"{name} (each step)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("flow-matching loss (train)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import os
    import shutil
    import time

    import torch

    import sla
    from sla.eval.evaluate import evaluate_models
    from sla.models.small_wan import load_small_model
    from sla.training.checkpoint import load_finetuned
    from sla.training.config import make_config
    from sla.training.trainer import finetune

    t_start = time.time()
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = dict(PRESETS[preset_name])
    if args.steps:
        preset["steps"] = args.steps
    if args.samples:
        preset["samples"] = args.samples
    device = torch.device("cuda" if preset_name == "gpu" and torch.cuda.is_available() else "cpu")
    if os.path.exists(args.out):
        if not args.overwrite and os.listdir(args.out):
            raise ValueError(f"{args.out} exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    print(f"[quickstart] preset {preset_name} on {device}: fine-tune {preset['steps']} steps x batch "
          f"{preset['batch_size']}, evaluate {preset['samples']} samples", flush=True)

    sla_kw = dict(critical=args.critical, negligible=args.negligible)
    runs = [("sla", dict(attention="sla"))]
    if preset["controls"]:
        runs = [("full_finetuned", dict(attention="full")), ("sla", dict(attention="sla")),
                ("sparse_only", dict(attention="sparse_only"))]
    train_time, logs = {}, {}
    for name, kw in runs:
        cfg = make_config(model="small", output_dir=os.path.join(args.out, "train", name), steps=preset["steps"],
                          batch_size=preset["batch_size"], lr=preset["lr"], warmup_steps=max(1, preset["steps"] // 20),
                          save_every=0, seed=args.seed, device=device.type, bf16=device.type == "cuda", **sla_kw, **kw)
        t0 = time.time()
        finetune(cfg)
        train_time[name] = time.time() - t0
        logs[name] = os.path.join(cfg.output_dir, "train_log.csv")

    entries = [("full_pretrained", load_small_model(), {"attention": "full"})]
    untuned = sla.apply_sla(load_small_model(), **sla_kw)
    entries.append(("sla_before_finetune", untuned, {"attention": "sla", "sla": dict(
        sla_kw, block_q=64, block_k=64, feature_map="softmax", linear_scope="marginal", backend="auto")}))
    for name, _ in runs:
        model, info = load_finetuned(os.path.join(args.out, "train", name, "final"))
        entries.append((name if name != "sla" else "sla_finetuned", model, info))
    curve = _plot_curves(logs, os.path.join(args.out, "training_curve.png"))
    notes = (f"`sla quickstart --preset {preset_name}`: the shipped small Wan (4 layers, width 128, 2 heads of 64; "
             f"16x64x64 RGB clips = 4096 tokens, 64 key blocks per row) pretrained with full attention, then "
             f"fine-tuned for {preset['steps']} steps (batch {preset['batch_size']}, AdamW lr {preset['lr']}, "
             f"flow-matching loss) with SLA at critical={args.critical}, negligible={args.negligible}. Fine-tuning "
             f"time: " + ", ".join(f"{k} {v:.0f} s" for k, v in train_time.items()) + ". Rows: `full_pretrained` = the "
             "starting point with dense attention; `sla_before_finetune` = SLA installed with its zero-initialised "
             "projection (i.e. sparse-only attention, no training); `sla_finetuned` = after fine-tuning."
             + (" `full_finetuned` and `sparse_only` got the same fine-tuning budget (the paper's controls)."
                if preset["controls"] else " A brief CPU run: differences between rows at this budget are small "
                "and noisy; the GPU preset runs the controls with more steps and samples."))
    if curve:
        notes += "\n\n![training curve](training_curve.png)"
    evaluate_models(entries, args.out, clips=preset["clips"], samples=preset["samples"], steps=preset["sample_steps"],
                    batch_size=4, device=device, title="SLA quickstart report", notes=notes)
    os.replace(os.path.join(args.out, "eval.md"), os.path.join(args.out, "report.md"))
    total = time.time() - t_start
    with open(os.path.join(args.out, "report.md"), "a") as f:
        f.write(f"\nTotal wall time of this quickstart: {total:.0f} s.\n")
    print(f"[quickstart] done in {total:.0f} s; open {os.path.join(args.out, 'report.md')}", flush=True)
    return 0
