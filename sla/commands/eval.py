"""``sla eval``: held-out loss, sample quality, attention error and sparsity of fine-tuned models.

Each ``--model`` is a folder written by ``sla finetune`` (``<output_dir>/final``; its attention mode and
SLA weights are restored), a plain diffusers transformer folder, or ``small`` (the shipped model with
full attention). Writes ``eval.json``, ``eval.md``, PNG grids and GIFs into ``--out``.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  sla eval --model small runs/sla/final runs/sparse_only/final --out runs/eval
  sla eval --model runs/sla/final --samples 64 --steps 30 --device cuda --out runs/eval_big
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._argtypes import finite_float, positive_int

    p.description = __doc__
    p.epilog = EPILOG
    p.add_argument("--model", nargs="+", required=True, help="folders from `sla finetune` (final/), or 'small'")
    p.add_argument("--name", nargs="*", help="names for the report rows (default: folder names); file names use "
                                             "them made safe (letters, digits, . _ -)")
    p.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    p.add_argument("--clips", type=positive_int, default=16, help="held-out clips for the loss (default: 16)")
    p.add_argument("--samples", type=positive_int, default=8, help="generated clips per model (default: 8)")
    p.add_argument("--steps", type=positive_int, default=20, help="Euler sampling steps (default: 20)")
    p.add_argument("--shift", type=finite_float, default=1.0, help="sampling timestep shift (default: 1.0)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="clips per model call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def resolve_device(name: str):
    """``--device``: auto (cuda if available), cpu, cuda, cuda:N; a ValueError naming the flag otherwise."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def run(args: argparse.Namespace) -> int:
    import os

    from sla._paths import prepare_output_dir

    names = args.name or []
    if names and len(names) != len(args.model):
        raise ValueError(f"--name got {len(names)} names for {len(args.model)} models; give one per model or none")
    prepare_output_dir(args.out, "--out")  # before loading any model

    from sla.eval.evaluate import evaluate_models
    from sla.models.small_wan import EMBEDDED_MODELS
    from sla.training.checkpoint import load_finetuned, synthetic_data_config

    entries, datas = [], []
    for i, spec in enumerate(args.model):
        model, info = load_finetuned(spec)
        datas.append(synthetic_data_config(spec))
        name = names[i] if names else (f"{spec}_full" if spec in EMBEDDED_MODELS else
                                       os.path.basename(os.path.dirname(os.path.abspath(spec)))
                                       if os.path.basename(os.path.abspath(spec)) == "final"
                                       else os.path.basename(os.path.abspath(spec)))
        entries.append((name, model, info))
    if any(d != datas[0] for d in datas[1:]):
        raise ValueError("--model: these models were trained on different synthetic clips (their "
                         "synthetic_data.json differ); evaluate each family of models in its own `sla eval` run")
    evaluate_models(entries, args.out, clips=args.clips, samples=args.samples, steps=args.steps, shift=args.shift,
                    batch_size=args.batch_size, device=resolve_device(args.device), data=datas[0])
    print(f"wrote {os.path.join(args.out, 'eval.md')}")
    return 0
