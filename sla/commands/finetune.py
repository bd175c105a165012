"""``sla finetune``: fine-tune a diffusers video DiT into SLA (or an ablation) with flow matching.

Settings come from defaults < a TOML/YAML config file (``--config``) < flags. Every key of the config file
is also a flag (``critical`` <-> ``--critical``). See docs/finetuning.md for the recipe and the latents
format.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._argtypes import token_tile

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
  # Wan2.1-14B on 8 GPUs: FSDP2 shards weights and optimizer, Ulysses splits each clip's tokens over 2 GPUs
  torchrun --nproc_per_node 8 -m sla.cli finetune --fsdp --context-parallel 2 --model /ckpt/Wan2.1-T2V-14B-Diffusers \
      --data /data/latents --bf16 --gradient-checkpointing --batch-size 1 --lr 1e-5 --output-dir runs/wan14b_sla
  # two nodes of 8 GPUs (run on each node; --output-dir on a filesystem both nodes see)
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id sla14b \
      -m sla.cli finetune --fsdp --context-parallel 2 ... --output-dir /shared/runs/wan14b_sla
"""

HELP = {
    "model": "a built-in model, 'wan8k' (8,192 tokens a clip; fine-tune it with --token-tile 4,4,4, as its "
             "experiments did) or 'small' (4,096 tokens, flat attention), a diffusers transformer folder "
             "(save_pretrained layout), or a Wan pipeline folder (its transformer/; for Wan2.2 A14B name transformer/ or "
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
    "proj_lr_scale": "learning-rate multiplier for the SLA projections (they must move O(1) from their start in a "
                     "short fine-tune; 1 = same lr as the rest)",
    "mass_lr_scale": "learning-rate multiplier for the per-head mass offsets of --combine mass, pooled and "
                     "pooled_cov",
    "sla_weight_decay": "weight decay of the SLA parameters (--weight-decay applies to the rest)",
    "combine": "auto (pooled_cov with --token-tile, mass without: what the experiments support, docs/results.md) | "
               "paper (o_s + Proj(o_l), Proj from zero) | mass (a*o_s + (1-a)*Proj(o_l), a = the critical blocks' "
               "estimated attention mass; Proj from the identity) | pooled (experimental: a*o_s + (1-a)*(o_c + "
               "Proj(o_l)), a and the coarse attention o_c from the key blocks' means; Proj from zero) | pooled_cov "
               "(pooled with o_c corrected for the spread of each block's keys)",
    "token_tile": "F,H,W (e.g. 4,4,4): SLA's blocks cover 3D tiles of F frames x H rows x W columns of tokens "
                  "instead of runs of tokens in raster order (Wan models; default: raster order)",
    "frames": "synthetic clip frames (default: the model's own, from its synthetic_data.json)",
    "height": "synthetic clip height in pixels (default: the model's own)",
    "width": "synthetic clip width in pixels (default: the model's own)",
    "batch_size": "clips per data-parallel rank per micro-step; global batch = batch_size * grad_accum * processes / "
                  "context_parallel",
    "ema": "EMA decay of the weights (0 = off); the exported model then holds the EMA weights",
    "bf16": "bf16 autocast (the SLA projections stay float32)",
    "tensorboard": "also write the logged scalars as TensorBoard events to OUTPUT_DIR/tensorboard "
                   "(needs the tensorboard package; train_log.csv is always written)",
    "fsdp": "shard weights, gradients and optimizer state over all processes with FSDP2 (one unit per transformer "
            "block, plus the root; with --bf16 bf16 compute, float32 SLA parameters and reductions) instead of "
            "replicating them with DDP; checkpoints become sharded folders that resume on any number of processes",
    "context_parallel": "Ulysses context parallelism: N consecutive processes share each clip, each holding 1/N of its "
                        "tokens (all-to-all to heads around attention); N must divide the processes, the heads and "
                        "the tokens per clip. --batch-size stays per data-parallel group of N processes",
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
            p.add_argument(flag, dest=f.name, type=_FLAG_TYPES.get(f.name, type(default)), default=None, help=text)


# Fields whose default is None (meaning "the model's own") still take a number on the command line.
_FLAG_TYPES = {"frames": int, "height": int, "width": int, "token_tile": token_tile}


def _as_flag(message: str, keys: list[str]) -> str:
    """Config errors name the key ("steps must be ..."); on the command line, name the flag ("--steps must be
    ..."), which is what the user typed (keys and flags correspond one to one)."""
    head, sep, rest = message.partition(" must ")
    if sep and head in keys:
        return f"--{head.replace('_', '-')} must {rest}"
    return message


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import fields

    from sla.training.config import FinetuneConfig, make_config
    from sla.training.trainer import TrainingInterrupted, finetune

    overrides = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    try:
        cfg = make_config(args.config, **overrides)
    except (ValueError, TypeError) as err:
        raise type(err)(_as_flag(str(err), [f.name for f in fields(FinetuneConfig)])) from err
    hint = layout_hint(cfg)
    if hint and os.environ.get("RANK", "0") == "0":
        print(f"sla finetune: note: {hint}", file=sys.stderr)
    try:
        summary = finetune(cfg, resume=args.resume)
    except TrainingInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":
            # The one line a user needs: what happened, and the command that continues the run exactly.
            print(f"sla finetune: {stop}. Resume with: {resume_command(getattr(args, '_argv', None), cfg)}",
                  file=sys.stderr)
        return stop.exit_code
    if int(summary.get("world_size", 1)) == 1 or os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0


def layout_hint(cfg) -> str:
    """A one-line note when the built-in wan8k is fine-tuned with SLA in raster order: its experiments measured the
    most quality with token tiles (docs/results.md), which a run keeps to what its flags say."""
    if cfg.model == "wan8k" and cfg.token_tile is None and cfg.attention in ("sla", "sparse_only"):
        return ("wan8k's quality experiments used --token-tile 4,4,4 (with tiles --combine auto is pooled_cov: 52% of "
                "the sparse-only gap closed, against 20% for the mass rule in raster order, docs/results.md); this run "
                "uses raster order as given")
    return ""


def resume_command(argv: list[str] | None, cfg) -> str:
    """The command line that continues this run: the same arguments with ``--resume auto`` (any earlier
    ``--resume`` dropped), under ``torchrun`` when the run had several processes."""
    import shlex

    if argv is None:  # not started from the command line: name the one flag that matters
        argv = ["finetune", "--output-dir", cfg.output_dir]
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    args += ["--resume", "auto"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world == 1:
        return shlex.join(["sla"] + args)
    nodes = ["--nnodes", str(world // per_node)] if world > per_node else []
    command = shlex.join(["torchrun", *nodes, "--nproc_per_node", str(per_node), "-m", "sla.cli"] + args)
    if nodes:  # the rendezvous flags are not visible to the processes; the user has them
        command += " (on every node, with the launch's --rdzv-* flags)"
    return command
