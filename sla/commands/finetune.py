"""``sla finetune``: fine-tune a diffusers video DiT into SLA (or an ablation) with flow matching.

Settings come from defaults < a TOML/YAML config file (``--config``) < flags. Every key of the config file
is also a flag (``critical`` <-> ``--critical``). See docs/finetuning.md for the recipe and the latents
format.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  # the embedded default: shipped small Wan, synthetic videos, SLA at 95% sparsity, 200 steps on CPU
  sla finetune --output-dir runs/sla
  # the paper's ablations, same budget
  sla finetune --attention sparse_only --output-dir runs/sparse_only
  sla finetune --attention linear_only --output-dir runs/linear_only
  # TurboDiffusion-style distillation from the frozen full-attention model
  sla finetune --loss distill --lr 1e-5 --output-dir runs/distill
  # your own videos: encode them once with the pipeline, then fine-tune its transformer on 8 GPUs
  sla prepare --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --videos /data/clips --out /data/latents
  torchrun --nproc_per_node 8 -m sla.cli finetune --model /ckpt/Wan2.1-T2V-1.3B-Diffusers \\
      --data /data/latents --bf16 --gradient-checkpointing --batch-size 1 --grad-accum 8 --lr 1e-5 \\
      --output-dir runs/wan_sla
  # then generate with it (sla sample --help)
  sla sample --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --sla runs/wan_sla/final --prompt "..." --out out.mp4
  # continue an interrupted run exactly where it stopped
  sla finetune --output-dir runs/sla --resume auto
"""

HELP = {
    "model": "'small' (the shipped pretrained small Wan), a diffusers transformer folder (save_pretrained "
             "layout), or a Wan pipeline folder (its transformer/; for Wan2.2 A14B name transformer/ or "
             "transformer_2/)",
    "data": "'synthetic' (built-in RGB clips, for the small model) or a folder of latents *.safetensors "
            "(`sla prepare`, with the same pipeline as --model)",
    "data_size": "clips in the synthetic training split",
    "output_dir": "where checkpoints/, train_log.csv and final/ go",
    "attention": "full (control) | sla | sparse_only (Proj frozen at 0) | sum_no_proj (o_s + o_l) | "
                 "linear_only",
    "critical": "fraction of key blocks per query block computed exactly (0.05 = 95%% sparsity)",
    "negligible": "fraction of key blocks skipped entirely (the paper's 10%%)",
    "linear_scope": "marginal (paper) | noncritical (public SLA-1 code) | all (public main code)",
    "feature_map": "softmax | elu | relu (the linear branch's phi)",
    "backend": "auto (Triton on CUDA, PyTorch on CPU) | torch | triton | reference",
    "trainable": "full (all weights, the paper's recipe) | proj (SLA projections only) | lora (peft LoRA "
                 "adapters + SLA projections; fused into the exported weights)",
    "loss": "flow (rectified-flow velocity, as Wan) | distill (MSE to the frozen full-attention teacher) | "
            "flow+distill",
    "steps": "optimizer steps",
    "proj_lr_scale": "learning-rate multiplier for the zero-initialised SLA projections (1 = same lr as the rest)",
    "batch_size": "clips per process per micro-step; global batch = batch_size * grad_accum * processes",
    "ema": "EMA decay of the weights (0 = off); the exported model then holds the EMA weights",
    "bf16": "bf16 autocast (the SLA projections stay float32)",
    "tensorboard": "also write the logged scalars as TensorBoard events to OUTPUT_DIR/tensorboard "
                   "(needs the tensorboard package; train_log.csv is always written)",
    "stop_after": "stop after this many steps as if interrupted (resume later with --resume auto)",
    "device": "auto | cpu | cuda (under torchrun each process takes cuda:LOCAL_RANK)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dataclasses import MISSING, fields

    from sla.training.config import FinetuneConfig

    p.epilog = EPILOG
    p.description = __doc__
    p.add_argument("--config", help="TOML/YAML/JSON file with any of the keys below (flags override it)")
    p.add_argument("--resume", help="'auto' (latest checkpoint in --output-dir) or a checkpoint file")
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = HELP.get(f.name, "") + f" (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=f.name, type=type(default), default=None, help=text)


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import fields

    from sla.training.config import FinetuneConfig, make_config
    from sla.training.trainer import finetune

    overrides = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    cfg = make_config(args.config, **overrides)
    summary = finetune(cfg, resume=args.resume)
    if int(summary.get("world_size", 1)) == 1 or __import__("os").environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0
