"""``sla quickstart``: the whole SLA story on a built-in model, end to end, with a report you can open.

1. Load the built-in Wan transformer (``--model``, default ``wan8k``: 8,192 tokens a clip, pretrained with full
   attention on the synthetic videos).
2. CPU preset: take the models fine-tuned from it on a GPU at 95% sparsity and shipped with the package (wan8k:
   sparse-only attention and SLA with the ``pooled_cov`` rule, both over 4x4x4 token tiles; small: sparse-only and
   SLA with the paper's and the mass rule), and fine-tune SLA live for a few steps to show the pipeline. GPU preset:
   fine-tune full attention, sparse-only and SLA live, with the experiment's budget.
3. Evaluate them beside full attention on held-out clips: held-out loss, samples (PNG grid + GIF), Frechet
   distance in a small video network's feature space, caption attribute agreement, per-layer attention
   error against dense attention, achieved sparsity, attention FLOPs, forward time.
4. Write ``report.md`` (+ ``eval.json``, images, GIFs, training curve) into ``--out``; its summary sentences
   are computed from the table's numbers, beside the controlled GPU experiment's (quoted from the package).

On a CPU the default preset ("cpu") is sized to finish in about 10 minutes on 2 cores. ``--preset``
overrides the automatic choice (gpu if CUDA is available).
"""

from __future__ import annotations

import argparse

# Per built-in model: run sizes, the shipped GPU-fine-tuned arms (name, label in the summary), the live run of the
# CPU preset, the GPU preset's live runs, and SLA's block layout (the one its experiments measured).
MODELS = {
    "wan8k": dict(
        presets={
            # One wan8k forward on 2 CPU cores takes ~4 s with full attention, ~2 s with SLA (batch 1): a few clips,
            # two short samplings and a handful of live steps fit 10 minutes.
            "cpu": dict(steps=4, batch_size=1, lr=2e-4, clips=4, samples=2, sample_steps=8, controls=False),
            "gpu": dict(steps=400, batch_size=8, lr=2e-4, clips=64, samples=64, sample_steps=20, controls=True),
        },
        token_tile=(4, 4, 4),
        shipped=(("sparse_only", "sparse-only"), ("sla_pooled_cov", "SLA with the pooled_cov rule")),
        live=("sla_pooled_cov_live", dict(attention="sla", combine="pooled_cov")),
        controls=(("full_finetuned", dict(attention="full")), ("sparse_only", dict(attention="sparse_only")),
                  ("sla_pooled_cov", dict(attention="sla", combine="pooled_cov"))),
        card="an NVIDIA H100"),
    "small": dict(
        presets={
            "cpu": dict(steps=20, batch_size=2, lr=3e-4, clips=8, samples=8, sample_steps=12, controls=False),
            "gpu": dict(steps=400, batch_size=8, lr=2e-4, clips=64, samples=64, sample_steps=25, controls=True),
        },
        token_tile=None,
        shipped=(("sparse_only", "sparse-only"), ("sla_paper", "SLA with the paper's rule"),
                 ("sla_mass", "SLA with the mass rule")),
        live=("sla_mass_live", dict(attention="sla", combine="mass")),
        controls=(("full_finetuned", dict(attention="full")), ("sparse_only", dict(attention="sparse_only")),
                  ("sla_paper", dict(attention="sla", combine="paper")),
                  ("sla_mass", dict(attention="sla", combine="mass"))),
        card="an NVIDIA H200"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sla.models.small_wan import DEFAULT_MODEL

    p.description = __doc__
    p.epilog = "examples:\n  sla quickstart                 # CPU: ~10 min on 2 cores, the 8,192-token wan8k\n" \
               "  sla quickstart --model small   # the first, 4,096-token testbed (flat attention)\n" \
               "  sla quickstart --preset gpu --out runs/quickstart_gpu\n"
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                   help=f"built-in model (default: {DEFAULT_MODEL}; `sla analyze --help` describes both)")
    p.add_argument("--preset", choices=("cpu", "gpu"), help="size of the run (default: gpu if CUDA is available)")
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


def _gap_sentence(rows: dict, dense: str, sparse: str, rules: list[tuple[str, str]], clips: int) -> str:
    """One sentence per comparison, computed from held-out losses ``rows[name]`` (lower is better)."""
    if dense not in rows or sparse not in rows:
        return ""
    ld, ls = rows[dense], rows[sparse]
    parts = [f"Held-out flow-matching loss on {clips} held-out clips x 5 noise levels (lower is better): full "
             f"attention {ld:.4f}, sparse-only at 95% sparsity {ls:.4f}"]
    gap = ls - ld
    for name, label in rules:
        if name not in rows:
            continue
        lr = rows[name]
        if gap > 0:
            share = (ls - lr) / gap
            if share >= 0:
                how = f"closes {100 * share:.0f}% of the sparse-only-to-full gap"
            else:
                how = f"is {100 * -share:.0f}% of that gap worse than sparse-only"
        else:
            how = "(sparse-only is not worse than full attention here, so there is no gap to close)"
        parts.append(f"{label} {lr:.4f}: it {how}" if gap > 0 else f"{label} {lr:.4f} {how}")
    return "; ".join(parts) + "."


def _experiment_sentence(model: str = "small") -> str:
    """What the controlled GPU experiment behind ``model``'s shipped checkpoints measured, quoted from the results
    shipped with the package."""
    from sla.models.small_wan import shipped_experiment_results

    if model == "wan8k":
        return "The controlled experiments behind these checkpoints: " + _wan8k_sentence()
    res = shipped_experiment_results()
    rows = {r["arm"]: r for r in res["rows"]}
    v = res["verdicts"]
    m = res["meta"]
    if not {"full", "sparse_only", "sla_mass", "sla_paper"} <= set(rows) or "sla_mass" not in v:
        return ""
    return (f"The controlled experiment behind these checkpoints ({len(m['seeds'])} seeds, {m['eval']['clips']} "
            f"held-out clips, {m['steps']} steps, {m['device']}; docs/results.md): full {rows['full']['heldout_loss']:.4f}, "
            f"sparse-only {rows['sparse_only']['heldout_loss']:.4f}, SLA paper rule "
            f"{rows['sla_paper']['heldout_loss']:.4f} ({100 * v['sla_paper']['gap_closed']:.0f}% of the gap closed), "
            f"SLA mass rule {rows['sla_mass']['heldout_loss']:.4f} ({100 * v['sla_mass']['gap_closed']:.0f}%, better "
            f"than sparse-only in {'every' if v['sla_mass']['beats_sparse_only_every_seed'] else 'not every'} seed). "
            f"So at 95% sparsity on this model SLA beats sparse-only attention but does not reach full attention: "
            f"its attention is flat (the critical blocks hold about a quarter of the mass), the case the mass rule "
            f"helps most and the premise of SLA fits least. " + _wan8k_sentence())


def _wan8k_sentence() -> str:
    """What the experiments on the 8,192-token testbed measured, quoted from the results shipped with the package."""
    from sla.models.small_wan import shipped_experiment_results

    res = shipped_experiment_results("wan8k")
    rows = {r["arm"]: r for r in res["rows"]}
    v = res["verdicts"]
    rules = [(arm, label) for arm, label in (("sla_mass_tile", "mass rule"), ("sla_pooled_tile", "pooled rule"),
                                             ("sla_pooled_cov_tile", "pooled_cov rule")) if arm in v]
    if not {"full", "sparse_only_tile"} <= set(rows) or not rules:
        return ""
    best = max(rules, key=lambda r: v[r[0]]["gap_closed"])[0]
    every = "every" if v[best]["beats_sparse_only_every_seed"] else "not every"
    return (f"On the 8,192-token testbed `wan8k` (attention local in 4 of 6 layers, blocks over 4x4x4 token "
            f"tiles; {len(res['meta']['seeds'])} seeds, {res['meta']['eval']['clips']} held-out clips; "
            f"docs/results.md): "
            f"full {rows['full']['heldout_loss']:.4f}, sparse-only {rows['sparse_only_tile']['heldout_loss']:.4f}, "
            + ", ".join(f"SLA {label} {rows[arm]['heldout_loss']:.4f} ({100 * v[arm]['gap_closed']:.0f}% of the gap)"
                        for arm, label in rules)
            + f"; the best rule beats sparse-only in {every} seed"
            + (" and meets the target of half the gap." if v[best]["criterion_met"] else "."))


def run(args: argparse.Namespace) -> int:
    import copy
    import os
    import shutil
    import time

    import torch

    from sla.eval.evaluate import evaluate_models
    from sla.models.small_wan import embedded_model, load_small_model, shipped_finetuned_path
    from sla.training.checkpoint import apply_saved_attention, load_finetuned, synthetic_data_config
    from sla.training.config import make_config
    from sla.training.trainer import finetune

    t_start = time.time()
    spec = MODELS[args.model]
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = dict(spec["presets"][preset_name])
    if args.steps:
        preset["steps"] = args.steps
    if args.samples:
        preset["samples"] = args.samples
    device = torch.device("cuda" if preset_name == "gpu" and torch.cuda.is_available() else "cpu")
    shipped = not preset["controls"]
    if shipped and (args.critical, args.negligible) != (0.05, 0.10):
        raise ValueError("--critical/--negligible: the CPU preset evaluates models fine-tuned at critical=0.05, "
                         "negligible=0.10; use those values, or --preset gpu to fine-tune at your own")
    if os.path.exists(args.out):
        if not args.overwrite and os.listdir(args.out):
            raise ValueError(f"{args.out} exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    print(f"[quickstart] {args.model}, preset {preset_name} on {device}: fine-tune {preset['steps']} steps x batch "
          f"{preset['batch_size']}, evaluate {preset['clips']} held-out clips and {preset['samples']} samples",
          flush=True)

    sla_kw = dict(critical=args.critical, negligible=args.negligible, token_tile=spec["token_tile"])
    runs = list(spec["controls"]) if preset["controls"] else [spec["live"]]
    train_time, logs = {}, {}
    for name, kw in runs:
        cfg = make_config(model=args.model, output_dir=os.path.join(args.out, "train", name), steps=preset["steps"],
                          batch_size=preset["batch_size"], lr=preset["lr"], warmup_steps=max(1, preset["steps"] // 20),
                          save_every=0, seed=args.seed, device=device.type, bf16=device.type == "cuda", **sla_kw, **kw)
        t0 = time.time()
        finetune(cfg)
        train_time[name] = time.time() - t0
        logs[name] = os.path.join(cfg.output_dir, "train_log.csv")

    entries = [("full_pretrained", load_small_model(args.model), {"attention": "full"})]
    if shipped:  # the GPU-fine-tuned models shipped with the package
        for arm, _ in spec["shipped"]:
            model, info = load_finetuned(shipped_finetuned_path(arm, args.model))
            entries.append((f"{arm}_gpu", model, info))
    live = {}
    for name, _ in runs:
        model, info = load_finetuned(os.path.join(args.out, "train", name, "final"))
        live[name] = (model, info)
    # The same SLA before any fine-tuning: what fine-tuning has to recover (and the live run's starting point).
    sla_run = spec["live"][0] if shipped else runs[-1][0]
    untrained_name = sla_run.removesuffix("_live") + "_untrained"
    info = live[sla_run][1]
    untrained = apply_saved_attention(copy.deepcopy(entries[0][1]), info)
    entries.append((untrained_name, untrained, {k: info[k] for k in ("attention", "sla")}))
    entries += [(name, model, info) for name, (model, info) in live.items()]
    curve = _plot_curves(logs, os.path.join(args.out, "training_curve.png"))
    rows = evaluate_models(entries, args.out, clips=preset["clips"], samples=preset["samples"],
                           steps=preset["sample_steps"], batch_size=4, device=device, title="SLA quickstart report",
                           notes="", data=synthetic_data_config(args.model))
    losses = {r["name"]: r["heldout"]["loss"] for r in rows}
    suffix = "_gpu" if shipped else ""
    compared = [(f"{arm}{suffix}", label) for arm, label in spec["shipped"] if arm != "sparse_only"]
    summary = _gap_sentence(losses, "full_pretrained" if shipped else "full_finetuned", f"sparse_only{suffix}",
                            compared, preset["clips"])
    live_name = spec["live"][0]
    if shipped and summary:
        summary += (f" Row `{untrained_name}`, the same SLA with no fine-tuning: {losses[untrained_name]:.4f}; after "
                    f"the {preset['steps']} live steps here (`{live_name}`): {losses[live_name]:.4f}.")
    layout = "4x4x4 token tiles" if spec["token_tile"] else "runs of tokens in raster order"
    setup = (f"`sla quickstart --model {args.model} --preset {preset_name}`: the built-in `{args.model}`, "
             f"{embedded_model(args.model).description}, pretrained with full attention. SLA's 64-token blocks are "
             f"{layout}. ")
    if shipped:
        setup += (f"Rows `*_gpu`: fine-tuned from it on {spec['card']} for 400 steps x batch 8 at critical 0.05 / "
                  "negligible 0.10 (95% sparsity) and shipped with the package (seed 0 of the experiment below; "
                  "each folder's finetune_info.json says where it came from). "
                  f"Row `{live_name}`: the same SLA fine-tuned here, on this machine, for "
                  f"{preset['steps']} steps x batch {preset['batch_size']} ({train_time[live_name]:.0f} s): it "
                  f"shows the pipeline, not the result (a few noisy steps at batch {preset['batch_size']} are not a "
                  "fine-tune). ")
    else:
        setup += (f"Every other row was fine-tuned here for {preset['steps']} steps x batch {preset['batch_size']} "
                  f"(AdamW lr {preset['lr']}, flow-matching loss) at critical={args.critical}, negligible="
                  f"{args.negligible}; fine-tuning time: " + ", ".join(f"{k} {v:.0f} s" for k, v in train_time.items())
                  + ". ")
    setup += f"Row `{untrained_name}`: the same SLA installed in the pretrained model, with no fine-tuning."
    notes = "\n\n".join(x for x in (
        setup, "**Result.** " + summary if summary else "",
        (f"With {preset['clips']} clips and {preset['samples']} samples these numbers are noisy (the FD of {preset['samples']} "
         f"samples especially). " + _experiment_sentence(args.model)) if shipped else "",
        "![training curve](training_curve.png)" if curve else "") if x)
    import json

    from sla.eval.evaluate import write_markdown

    # The summary needs the evaluated numbers, so the report is written again with it (same rows, same meta).
    with open(os.path.join(args.out, "eval.json")) as f:
        evaluated = json.load(f)
    write_markdown(evaluated["results"], evaluated["meta"], os.path.join(args.out, "report.md"),
                   title="SLA quickstart report", notes=notes)
    os.remove(os.path.join(args.out, "eval.md"))
    total = time.time() - t_start
    with open(os.path.join(args.out, "report.md"), "a") as f:
        f.write(f"\nTotal wall time of this quickstart: {total:.0f} s.\n")
    if summary:
        print(f"[quickstart] {summary}", flush=True)
    print(f"[quickstart] done in {total:.0f} s; open {os.path.join(args.out, 'report.md')}", flush=True)
    return 0
