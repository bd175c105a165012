"""``sla analyze``: measure SLA's premise on a model's own self-attention, with pictures.

Runs a short flow-matching denoising loop on a diffusers video transformer, captures q, k, v of chosen
self-attention layers at chosen steps (hooks only), and writes to ``--out``:

* ``report.md``: tables and pictures, readable on GitHub;
* ``summary.json``: every number, per capture and per head;
* ``weight_histogram.png``, ``error_vs_sparsity.png``, ``stable_rank.png``, ``class_map_<layer>_step<s>.png``.

Examples::

    sla analyze                                    # the built-in wan8k, CPU, about a minute
    sla analyze --model small                      # the first, 4,096-token testbed
    sla analyze --model tiny-random                # a seeded random Wan transformer
    sla analyze --model ./my_wan_transformer --layers 0,14,-1 --steps 0,-1 --num-steps 10 --device cuda
    sla analyze --model ./finetuned --sla ./finetuned/sla   # a fine-tuned SLA model: its own projections
"""

from __future__ import annotations

import argparse

from ..settings import FEATURE_MAPS, LINEAR_SCOPES
from ._argtypes import token_tile

_EPILOG = """\
selections:
  --layers   auto = first, middle and last self-attention layer; all; or a comma list of indices into the
             self-attention layers (negative from the end) and/or module names such as blocks.3.attn1
  --steps    auto = first, middle and last of --num-steps; all; or a comma list (negative from the end)
  --heads    a count of heads spread evenly over the layer's heads, 'all', or explicit ids: ids:0,5,7

what the numbers mean: see docs/analysis.md (and report.md in the output folder).
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    import textwrap

    p.description = textwrap.fill(
        "Measure SLA's premise on a model's own self-attention (paper §3): how skewed the attention weights are, "
        "how much output error sparse-only attention and SLA make at each sparsity, the stable rank of the "
        "large and the small weights, and whether SLA's pooled block scores find the blocks that hold the "
        "attention mass. Writes report.md, summary.json and PNGs to --out.", width=100)
    p.epilog = _EPILOG
    g = p.add_argument_group("model and run")
    g.add_argument("--model", default="wan8k",
                   help="built-in model: small (the shipped pretrained small Wan DiT), wan8k (the 8,192-token one, "
                        "local attention in most layers; try it with --token-tile 4,4,4) or tiny-random (a seeded "
                        "random Wan); or a folder: a diffusers transformer saved with save_pretrained, or a "
                        "pipeline folder with a transformer/ subfolder (default: wan8k)")
    g.add_argument("--sla", metavar="DIR", default=None,
                   help="apply SLA from a folder written by sla.save_sla (settings + trained projections); "
                        "the report then shows SLA with each layer's own projection. A --model folder holding "
                        "sla_config.json is picked up automatically")
    g.add_argument("--num-steps", type=int, default=4, help="denoising steps of the driver loop (default: 4)")
    g.add_argument("--latent-size", type=int, nargs=3, metavar=("F", "H", "W"), default=None,
                   help="input size (frames, height, width) in the model's input units; default: the built-in "
                        "model's, else 4x32x32 patches (4096 tokens)")
    g.add_argument("--text-len", type=int, default=None, help="conditioning length when --prompt-embeds is not given "
                                                              "(default: the built-in model's, else 64)")
    g.add_argument("--prompt-embeds", metavar="FILE", default=None,
                   help="a torch.save'd tensor (1, text_len, text_dim) of real prompt embeddings; default: seeded "
                        "random vectors")
    g.add_argument("--shift", type=float, default=None,
                   help="flow-matching sigma shift; default: the built-in model's (small: 1.0), else 3.0 (Wan 480p)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (analysis always runs in float32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model (tiny-random), latents and sampling")

    g = p.add_argument_group("what to capture")
    g.add_argument("--layers", default="auto", help="auto, all, or a comma list (see below)")
    g.add_argument("--steps", default="auto", help="auto, all, or a comma list (see below)")
    g.add_argument("--heads", default="4", help="heads per layer: a count, 'all' or ids:0,3 (default: 4)")
    g.add_argument("--query-blocks", default="8",
                   help="query blocks (of --block-q rows) sampled per head, or 'all' (default: 8 = 512 rows); "
                        "memory is about rows x sequence length x 4 bytes per head")

    g = p.add_argument_group("what to measure")
    g.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.92,0.95,0.97",
                   help="comma list of sparsities for the error and recall curves; 1 - critical is added "
                        "(default: 0.5,0.7,0.8,0.9,0.92,0.95,0.97)")
    g.add_argument("--critical", type=float, default=0.05, help="SLA critical fraction for the class map (paper: 0.05)")
    g.add_argument("--negligible", type=float, default=0.10, help="SLA negligible fraction (paper: 0.10)")
    g.add_argument("--block-q", type=int, default=64, help="query block size (default: 64)")
    g.add_argument("--block-k", type=int, default=64, help="key block size (default: 64)")
    g.add_argument("--token-tile", metavar="F,H,W", type=token_tile, default=None,
                   help="measure SLA with its blocks over 3D token tiles (as apply_sla(token_tile=...)), e.g. 4,4,4; "
                        "default: the model's raster token order")
    g.add_argument("--feature-map", default="softmax", choices=FEATURE_MAPS,
                   help="phi of SLA's linear branch (default: softmax)")
    g.add_argument("--linear-scope", default="marginal", choices=LINEAR_SCOPES,
                   help="key blocks of SLA's linear branch (default: marginal, the paper's)")
    g.add_argument("--rank-top", type=float, default=0.08,
                   help="the top-x%% part for stable ranks, per row (paper: 0.08)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/analysis", help="output folder (default: out/analysis)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNGs (summary.json and report.md only)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_heads(text: str):
    text = text.strip()
    if text == "all":
        return None
    if text.startswith("ids:"):
        try:
            return [int(t) for t in _csv(text[4:])]
        except ValueError:
            raise ValueError(f"--heads ids:... must list integers, got {text!r}") from None
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--heads must be a count, 'all' or ids:0,3, got {text!r}") from None
    if n < 1:
        raise ValueError(f"--heads count must be >= 1, got {n}")
    return n


def _parse_selection(text: str, what: str):
    text = text.strip()
    if text in ("auto", "all"):
        return text
    items = _csv(text)
    if not items:
        raise ValueError(f"--{what} is empty; use auto, all or a comma list")
    return items


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def run(args: argparse.Namespace) -> int:
    import os
    import time

    from .._paths import prepare_output_dir

    prepare_output_dir(args.out, "--out")  # before loading the model and capturing

    import torch

    from ..analysis import AnalysisConfig, analyze_model, write_outputs
    from ..analysis.models import check_drivable, load_transformer, run_flow_matching, token_count

    # Errors reach sla.cli.main, which prints them in one line (with --debug: the traceback).
    heads = _parse_heads(args.heads)
    layers = _parse_selection(args.layers, "layers")
    steps = _parse_selection(args.steps, "steps")
    if args.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {args.num_steps}")
    try:
        qb = None if args.query_blocks.strip() == "all" else int(args.query_blocks)
    except ValueError:
        raise ValueError(f"--query-blocks must be a positive count or 'all', got {args.query_blocks!r}") from None
    try:
        sparsities = tuple(float(s) for s in _csv(args.sparsities))
    except ValueError:
        raise ValueError(f"--sparsities must be a comma list of numbers, got {args.sparsities!r}") from None
    config = AnalysisConfig(sparsities=sparsities, critical=args.critical, negligible=args.negligible,
                            block_q=args.block_q, block_k=args.block_k, feature_map=args.feature_map,
                            linear_scope=args.linear_scope, rank_top=args.rank_top, query_blocks=qb,
                            seed=args.seed, token_tile=args.token_tile)
    config.validate()
    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, builtin = load_transformer(args.model, seed=args.seed, dtype=dtype, device=device)
    check_drivable(model)
    sla_dir = args.sla
    if sla_dir is None and builtin is None and os.path.isfile(os.path.join(args.model, "sla_config.json")):
        sla_dir = args.model
    if sla_dir is not None:
        from ..integrations.diffusers import load_sla

        load_sla(model, sla_dir)
    latent_size = tuple(args.latent_size) if args.latent_size else (
        builtin.latent_size if builtin else tuple(4 * p if i == 0 else 32 * p
                                                  for i, p in enumerate(model.config["patch_size"])))
    tokens = token_count(model, latent_size)
    text_len = args.text_len or (builtin.text_len if builtin else 64)
    prompt_embeds = None
    if args.prompt_embeds:
        if not os.path.isfile(args.prompt_embeds):
            raise ValueError(f"--prompt-embeds {args.prompt_embeds!r} does not exist; save one with "
                             f"torch.save(prompt_embeds, path)")
        prompt_embeds = torch.load(args.prompt_embeds, map_location="cpu", weights_only=True)
        if not isinstance(prompt_embeds, torch.Tensor):
            raise ValueError(f"--prompt-embeds {args.prompt_embeds!r} must hold one tensor (1, text_len, text_dim)")
    elif builtin is not None and builtin.prompt_embeds is not None:
        prompt_embeds = builtin.prompt_embeds()
    shift = args.shift if args.shift is not None else (builtin.shift if builtin else 3.0)
    load_seconds = time.perf_counter() - t0

    def drive():
        run_flow_matching(model, num_steps=args.num_steps, latent_size=latent_size, text_len=text_len,
                          seed=args.seed, shift=shift, prompt_embeds=prompt_embeds,
                          progress=not args.quiet)

    grid = tuple(n // p for n, p in zip(latent_size, model.config["patch_size"]))
    result = analyze_model(model, drive, layers=layers, steps=steps, num_steps=args.num_steps, heads=heads,
                           config=config, device=device, progress=not args.quiet, token_grid=grid)
    result.meta.update({
        "model": args.model, "model_description": builtin.description if builtin else "",
        "sla_applied_from": sla_dir, "tokens": tokens, "latent_size": list(latent_size),
        "num_steps": args.num_steps, "shift": shift,
        "conditioning": "prompt_embeds file" if args.prompt_embeds else (
            "built-in" if prompt_embeds is not None else "seeded random vectors"),
        "load_seconds": round(load_seconds, 3), "dtype": args.dtype, "device": str(device),
        "torch": torch.__version__,
    })
    paths = write_outputs(result, args.out, plots=not args.no_plots)
    print(f"analysed {len(result.entries)} capture(s) of {args.model} ({tokens} tokens) in "
          f"{result.meta['capture_seconds'] + result.meta['analysis_seconds']:.1f} s")
    for e in result.entries:
        d, sr, rc = e["distribution"], e["stable_rank"], e["recall"]["at_critical"]
        print(f"  {e['layer']} @ step {e['step']}: >1/N {100 * d['frac_above_mean']:.1f}%, "
              f"<1/(100N) {100 * d['frac_below_mean_over_100']:.1f}%, stable rank full/top/rest "
              f"{sr['full']:.1f}/{sr['top']:.1f}/{sr['rest']:.1f}, recall@critical {100 * rc['recall']:.0f}%")
    from ..analysis.gate import gate_summary_line, premise_gate

    print(gate_summary_line(premise_gate(result.entries)))
    print(f"wrote {paths['report']}, {paths['summary']} and {len(paths['plots'])} PNG(s)")
    return 0
