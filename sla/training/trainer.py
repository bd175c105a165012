"""The fine-tuning loop behind ``sla finetune``.

Objective: rectified-flow velocity matching (as Wan is trained), optionally plus (or replaced by) the
TurboDiffusion-style distillation MSE between the student's and a frozen full-attention teacher's
velocity at the same ``(x_t, t)``. AdamW, linear warm-up then cosine decay to 10%, gradient accumulation,
optional bf16 autocast, gradient checkpointing, EMA.

Determinism, resumption and multiple processes. Optimizer step ``s`` consumes a *global* batch of
``G = batch_size * grad_accum * D`` clips (``D`` data-parallel ranks: the processes divided by ``--context-parallel``)
at global positions ``s*G .. s*G+G-1`` of a seeded per-epoch permutation of the dataset; micro-step ``m`` of
data-parallel rank ``r`` takes the slice ``[(m * D + r) * batch_size, ... + batch_size)``. The noise and timestep of
each clip are drawn from a generator keyed by ``(seed, step, position)``. Each micro-batch loss is its mean divided
by ``grad_accum``, and DDP/FSDP average over ranks, so the update is the mean over the global batch whatever the
split: one process with ``batch_size=4`` equals two processes with ``batch_size=2`` (up to float summation order),
and a run resumed from a checkpoint continues exactly where it stopped.

Multi-GPU and multi-node: launch with ``torchrun --nproc_per_node N [--nnodes M --rdzv-...] -m sla.cli finetune
...``. Without ``--fsdp`` PyTorch DDP (NCCL on CUDA, gloo on CPU) averages the gradients and every rank holds the
whole model; with ``--fsdp`` FSDP2 shards it, and checkpoints are sharded folders that resume on any number of
processes. ``--context-parallel N`` splits each clip's tokens over N ranks (Ulysses); see
:mod:`sla.training.distributed` for the layout, the gradient scaling and the mixed-precision policy.

Interrupts. During the loop, the first SIGINT (Ctrl-C) or SIGTERM lets the current optimizer step finish, saves
a checkpoint of it and raises :class:`TrainingInterrupted` (``--resume auto`` continues exactly there); a
second signal raises it at once, without saving. With several processes the stop request is summed with the
step's loss all-reduce, so every rank stops after the same step. On start, temp files of a save that was
killed are removed, and with ``resume="auto"`` an unreadable newest checkpoint is reported in one line and the
one before it is used.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..settings import resolve_combine
from .checkpoint import (
    export_model,
    list_checkpoints,
    load_base_model,
    load_checkpoint,
    load_latest_checkpoint,
    remove_orphan_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import FinetuneConfig
from .flow_matching import draw_noise_and_sigma, noisy_input_and_target, predict
from .variants import apply_attention_mode

LOG_FIELDS = ["step", "loss", "flow_loss", "distill_loss", "lr", "grad_norm", "seconds", "clips_per_s"]
TENSORBOARD_SCALARS = ("loss", "flow_loss", "distill_loss", "lr", "grad_norm", "clips_per_s")  # under train/


# ------------------------------------------------------------------------------------------------------------
# data order
# ------------------------------------------------------------------------------------------------------------

class GlobalOrder:
    """Position ``p`` of the endless training stream -> dataset index (seeded permutation per epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return int(self._cache[epoch][offset])


def micro_positions(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int) -> list[int]:
    global_batch = batch_size * grad_accum * world
    start = step * global_batch + (micro * world + rank) * batch_size
    return list(range(start, start + batch_size))


class _MicroBatchSampler(torch.utils.data.Sampler):
    """Yields the dataset indices of this rank's micro-batches from ``start_step`` on (for a DataLoader)."""

    def __init__(self, order: GlobalOrder, start_step: int, end_step: int, rank: int, world: int, cfg: FinetuneConfig):
        self.order, self.start, self.end, self.rank, self.world, self.cfg = order, start_step, end_step, rank, world, cfg

    def __iter__(self):
        for step in range(self.start, self.end):
            for m in range(self.cfg.grad_accum):
                pos = micro_positions(step, m, self.rank, self.world, self.cfg.batch_size, self.cfg.grad_accum)
                yield [self.order.index(p) for p in pos]

    def __len__(self):
        return (self.end - self.start) * self.cfg.grad_accum


def build_dataset(cfg: FinetuneConfig, text_dim: int, split: str = "train", size: int | None = None):
    """The configured dataset; ``text_dim`` comes from the model (synthetic captions are embedded to it)."""
    from ..data.latents import LatentsDataset
    from ..data.synthetic import SyntheticVideoDataset

    if cfg.data == "synthetic":
        from dataclasses import replace

        from .checkpoint import synthetic_data_config

        own = synthetic_data_config(cfg.model)  # the clips the model was trained on
        sc = replace(own, text_dim=text_dim, **{k: getattr(cfg, k) for k in ("frames", "height", "width")
                                                 if getattr(cfg, k) is not None})
        return SyntheticVideoDataset(split, size=size or cfg.data_size, config=sc)
    return LatentsDataset(cfg.data)


def check_data_fits_model(dataset, model, cfg: FinetuneConfig) -> None:
    """Refuse data the model cannot train on, naming ``--data``/``--model`` and the fix, before any step runs
    (otherwise the first forward fails deep inside the model with a bare shape error, or, for latents of
    another VAE with the same channel count, trains silently on the wrong latent space)."""
    from ..data.latents import LatentsDataset
    from .checkpoint import pipeline_of

    mc = model.config
    if not isinstance(dataset, LatentsDataset):
        if mc.in_channels != 3:
            raise ValueError(f"--data synthetic is RGB pixels (3 channels), but --model {cfg.model} takes "
                             f"{mc.in_channels} input channels (a latent-space model such as Wan's); encode your "
                             "videos with `sla prepare` and pass that folder as --data")
        return
    c, f, h, w = dataset.latent_shape
    text_len, text_dim = dataset.text_shape
    if c != mc.in_channels:
        raise ValueError(f"--data {cfg.data} holds latents with {c} channels, but --model {cfg.model} takes "
                         f"{mc.in_channels}; encode the videos with the VAE of this model's pipeline "
                         f"(`sla prepare --pipeline ...`)")
    if text_dim != mc.text_dim:
        raise ValueError(f"--data {cfg.data} holds text embeddings of width {text_dim}, but --model {cfg.model} "
                         f"expects text_dim {mc.text_dim}; encode the captions with this model's text encoder "
                         "(`sla prepare --pipeline ...`)")
    pt, ph, pw = mc.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"--data {cfg.data}: latents (frames {f}, height {h}, width {w}) are not divisible by the "
                         f"model's patch size {tuple(mc.patch_size)}; prepare with --height/--width multiples of 16")
    info = dataset.prepare_info
    pipe = pipeline_of(cfg.model)
    if info is not None and pipe is not None and (pipe / "vae" / "config.json").is_file():
        vae = json.loads((pipe / "vae" / "config.json").read_text())
        for key in ("latents_mean", "latents_std"):
            ours, theirs = info.get(key), vae.get(key)
            if ours is not None and theirs is not None and [float(x) for x in ours] != [float(x) for x in theirs]:
                raise ValueError(f"--data {cfg.data} was encoded with a VAE whose {key} differs from that of "
                                 f"--model's pipeline {pipe}: the latents are in another model space; prepare them "
                                 f"again with `sla prepare --pipeline {pipe}`")


# ------------------------------------------------------------------------------------------------------------
# model setup
# ------------------------------------------------------------------------------------------------------------

def sla_settings(cfg: FinetuneConfig) -> dict:
    """The ``"sla"`` record of an exported model's info: the SLA settings, the backend and the token tile."""
    return dict(cfg.sla_settings().to_dict(), backend=cfg.backend, token_tile=cfg.token_tile)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def prepare_student(model, cfg: FinetuneConfig):
    """Install the attention mode and choose the trainable parameters (in place)."""
    apply_attention_mode(model, cfg.attention, cfg.sla_settings(), backend=cfg.backend, token_tile=cfg.token_tile)
    if cfg.trainable == "full":
        for name, p in model.named_parameters():
            # sparse_only keeps its projections frozen at zero (that is what makes it sparse-only).
            p.requires_grad_(not (cfg.attention == "sparse_only" and ".sla." in name))
    else:
        model.requires_grad_(False)
        if cfg.trainable == "lora":
            try:
                from peft import LoraConfig
            except ImportError as e:
                raise ImportError("trainable='lora' needs peft: pip install peft") from e
            model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=LORA_TARGETS,
                                         init_lora_weights=True))
        for name, p in model.named_parameters():
            if "lora_" in name or (cfg.attention == "sla" and ".sla." in name):
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing to train with attention={cfg.attention!r} and trainable={cfg.trainable!r}")
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


# What a checkpoint made before these options existed was trained with.
_RESUME_DEFAULTS = {"mass_lr_scale": 1.0, "sla_weight_decay": 0.01, "combine": "paper"}


def param_groups(named_trainable: list, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups: the model's own weights (``lr``, ``weight_decay``), the SLA projections (``lr *
    proj_lr_scale``) and the per-head mass offsets (``lr * mass_lr_scale``), both with ``sla_weight_decay``.
    Each group carries ``lr_scale`` for the schedule. Empty groups are left out (the optimizer state's layout
    then depends only on which parameters train)."""
    groups = [
        dict(params=[p for n, p in named_trainable if ".sla." not in n], lr_scale=1.0, name="model"),
        dict(params=[p for n, p in named_trainable if ".sla." in n and not n.endswith("mass_offset")],
             lr_scale=cfg.proj_lr_scale, weight_decay=cfg.sla_weight_decay, name="sla_proj"),
        dict(params=[p for n, p in named_trainable if ".sla." in n and n.endswith("mass_offset")],
             lr_scale=cfg.mass_lr_scale, weight_decay=cfg.sla_weight_decay, name="sla_mass_offset"),
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------------------
# interrupts
# ------------------------------------------------------------------------------------------------------------

class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`finetune` when SIGINT/SIGTERM stopped the loop (a ``KeyboardInterrupt``, so that code
    catching ``Exception`` does not swallow it).

    Attributes: ``signum``; ``step`` (optimizer steps done) and ``steps`` (the run's total); ``checkpoint``
    (the checkpoint written for ``step``, or ``None`` when a second signal stopped at once); ``output_dir``.
    """

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path | None, output_dir: str):
        self.signum, self.step, self.steps = signum, step, steps
        self.checkpoint, self.output_dir = checkpoint, output_dir
        name = signal.Signals(signum).name
        if checkpoint is not None:
            text = f"stopped by {name} after step {step} of {steps}; saved {checkpoint}"
        else:
            newest = list_checkpoints(output_dir)
            text = (f"stopped at once by a second {name} during step {step + 1} of {steps}; nothing saved since "
                    + (newest[-1][1].name if newest else "the start (no checkpoint yet)"))
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class _StopOnSignal:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step (``requested`` holds the signal);
    second: raise :class:`TrainingInterrupted` at once. Previous handlers are restored on exit. Signal handlers
    can only be installed from the main thread; elsewhere this does nothing (the default behaviour stays)."""

    def __init__(self, cfg: FinetuneConfig, out: Path, announce: bool):
        self.cfg, self.out, self.announce = cfg, out, announce
        self.requested: int | None = None
        self.step = 0  # steps done, kept current by the loop for the messages
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.requested is not None:
            self.__exit__()  # a third signal gets the default behaviour
            raise TrainingInterrupted(signum, self.step, self.cfg.steps, None, str(self.out))
        self.requested = signum
        if self.announce:
            # os.write, not print: a handler may run in the middle of another write to stderr (tqdm's bar).
            # The leading newline ends tqdm's bar line, if there is one.
            os.write(2, (("\n" if self.cfg.progress else "") + f"sla finetune: {signal.Signals(signum).name} received; "
                         f"finishing step {self.step + 1} and saving a checkpoint (send it again to stop at once)\n"
                         ).encode())


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------

def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> dict:
    """Run fine-tuning as configured; returns a summary dict (rank 0's view).

    ``resume``: ``None`` (start fresh; refuses a non-empty checkpoint folder), ``"auto"`` (latest checkpoint
    in ``output_dir`` if any) or a checkpoint path.
    """
    cfg.validate()
    world, rank, local = _dist_info()
    if rank == 0:  # only rank 0 writes there; checked before any model is loaded
        from .._paths import prepare_output_dir

        prepare_output_dir(cfg.output_dir, "output_dir (--output-dir)")
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    elif cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")
        device = torch.device(f"cuda:{local}")
    else:
        device = torch.device("cpu")
    if world % cfg.context_parallel:
        raise ValueError(f"--context-parallel {cfg.context_parallel} must divide the number of processes ({world}): "
                         f"launch with torchrun --nproc_per_node a multiple of {cfg.context_parallel} (all nodes "
                         f"together: WORLD_SIZE), or change --context-parallel")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialised_here = False
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            initialised_here = True
        elif cfg.fsdp:  # FSDP on one process (e.g. resuming a sharded checkpoint on one GPU) still needs a group
            from .distributed import init_single_process_group

            init_single_process_group(device)
            initialised_here = True
    try:
        from .distributed import make_layout

        layout = make_layout(world, rank, device, cfg.fsdp, cfg.context_parallel)
        return _finetune(cfg, resume, layout)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _resumed_checkpoint(cfg: FinetuneConfig, resume, out: Path, layout) -> dict | None:
    """The checkpoint to resume from (``None``: start fresh), checked against this run's settings."""
    ckpt = None
    if resume == "auto":
        latest = load_latest_checkpoint(out, report=(lambda line: print(line, file=sys.stderr)) if layout.is_main
                                        else None)
        if latest is not None:
            ckpt = latest[0]
    elif resume:
        ckpt = load_checkpoint(resume)
    elif list_checkpoints(out):
        raise ValueError(f"{out} already holds checkpoints; pass --resume auto to continue, or another --output-dir")
    if ckpt is None:
        return None
    if bool(ckpt.get("sharded")) != cfg.fsdp:
        if cfg.fsdp:
            raise ValueError(f"cannot resume with --fsdp from {resume if resume != 'auto' else out}: its checkpoint "
                             "was written without --fsdp (one file per step); resume without --fsdp")
        raise ValueError(f"cannot resume without --fsdp: the checkpoint in {ckpt['sharded']} is sharded (written with "
                         "--fsdp); add --fsdp (it loads on any number of processes)")
    saved = ckpt["config"]
    # Checkpoints from before context parallelism recorded only world_size, which was then the data-parallel size.
    saved_dp = int(ckpt.get("data_parallel", ckpt.get("world_size", 1)))
    for key in ("model", "data", "attention", "trainable", "seed", "batch_size", "grad_accum", "loss", "lr",
                "proj_lr_scale", "mass_lr_scale", "sla_weight_decay", "steps", "critical", "negligible",
                "linear_scope", "feature_map", "combine", "token_tile"):
        if key == "token_tile":  # JSON stores the tuple as a list; older checkpoints used raster order
            old = saved.get(key)
            same = (None if old is None else tuple(old)) == cfg.token_tile
        elif key == "batch_size":
            same = saved["batch_size"] * saved["grad_accum"] * saved_dp == cfg.batch_size * cfg.grad_accum * layout.dp
        elif key == "grad_accum":
            continue
        elif key == "combine":  # the rule itself: "auto" (today's default) resumes a run saved as what it resolves to
            old_rule = resolve_combine(saved.get(key, _RESUME_DEFAULTS[key]), saved.get("token_tile"))
            same = old_rule == resolve_combine(cfg.combine, cfg.token_tile)
        elif key in _RESUME_DEFAULTS and key not in saved:  # checkpoints from before the option existed
            same = _RESUME_DEFAULTS[key] == getattr(cfg, key)
        else:
            same = saved.get(key) == getattr(cfg, key)
        if not same:
            if key == "batch_size":
                raise ValueError(
                    f"cannot resume: the checkpoint's global batch is {saved['batch_size']} x {saved['grad_accum']} "
                    f"(--grad-accum) x {saved_dp} data-parallel ranks = "
                    f"{saved['batch_size'] * saved['grad_accum'] * saved_dp} clips per step, this run's is "
                    f"{cfg.batch_size} x {cfg.grad_accum} x {layout.dp} = {cfg.batch_size * cfg.grad_accum * layout.dp}"
                    "; change --batch-size or --grad-accum to keep it equal")
            raise ValueError(f"cannot resume: checkpoint was made with {key}={saved.get(key)!r} (global batch kept "
                             f"equal), this run has {key}={getattr(cfg, key)!r}")
    return ckpt


def _check_context_parallel_fits(model, dataset, cfg: FinetuneConfig) -> None:
    """Heads and tokens per clip must split evenly over the context-parallel ranks (an error naming the flag)."""
    from ..integrations.context_parallel import check_divisible

    mc = model.config
    _, f, h, w = dataset[0]["video"].shape
    pt, ph, pw = mc.patch_size
    check_divisible(heads=mc.num_attention_heads, tokens=(f // pt) * (h // ph) * (w // pw),
                    degree=cfg.context_parallel, what=f"--model {cfg.model}")


def _build_models(cfg: FinetuneConfig, layout):
    """``(student, teacher or None, dataset, model class)`` on ``layout.device``, parallelised as configured (context
    parallel hooks; FSDP shards or plain modules, DDP is applied by the caller after a resume)."""
    from ..integrations.context_parallel import enable_context_parallel
    from .checkpoint import meta_base_model

    def checked_dataset(model):
        dataset = build_dataset(cfg, model.config.text_dim)
        check_data_fits_model(dataset, model, cfg)
        if cfg.context_parallel > 1:
            _check_context_parallel_fits(model, dataset, cfg)
        return dataset

    torch.manual_seed(cfg.seed)
    if not cfg.fsdp:
        base = load_base_model(cfg.model)
        model_cls = type(base)
        dataset = checked_dataset(base)
        teacher = None
        if cfg.loss != "flow":
            teacher = copy.deepcopy(base).to(layout.device).eval().requires_grad_(False)
        student = prepare_student(base, cfg).to(layout.device).train()
        if cfg.context_parallel > 1:
            for m in (student, teacher):
                if m is not None:
                    enable_context_parallel(m, layout.mesh, layout.device)
        return student, teacher, dataset, model_cls

    # FSDP: every rank builds the model on the meta device and shards it; rank 0 alone reads the weights on the CPU
    # and broadcasts them (distributed.py says why).
    from .distributed import materialize_from_rank0, shard_model

    meta = meta_base_model(cfg.model)
    model_cls = type(meta)
    dataset = checked_dataset(meta)
    cpu_student = full = None
    if layout.is_main:
        cpu_student = prepare_student(load_base_model(cfg.model), cfg)
        full = cpu_student.state_dict()
    teacher = None
    if cfg.loss != "flow":
        teacher = meta_base_model(cfg.model).eval().requires_grad_(False)
        if cfg.context_parallel > 1:
            enable_context_parallel(teacher, layout.mesh, layout.device)
        shard_model(teacher, layout, cfg.bf16)
        # The teacher is the base model: the student's weights before fine-tuning, without SLA's parameters.
        materialize_from_rank0(teacher, layout, None if full is None else
                               {k: v for k, v in full.items() if ".sla." not in k}, cpu_student)
    student = prepare_student(meta, cfg).train()
    if cfg.context_parallel > 1:
        enable_context_parallel(student, layout.mesh, layout.device)
    shard_model(student, layout, cfg.bf16)
    materialize_from_rank0(student, layout, full, cpu_student)
    del cpu_student, full
    return student, teacher, dataset, model_cls


def _finetune(cfg: FinetuneConfig, resume, layout) -> dict:
    out = Path(cfg.output_dir)
    is_main = layout.is_main
    device = layout.device
    if is_main:
        # A save or export killed half-way leaves its temp file behind; it is never read, only in the way.
        removed = remove_orphan_temp_files(out / "checkpoints") + remove_orphan_temp_files(out / "final")
        if removed:
            print(f"sla finetune: removed {len(removed)} temp file(s) of an interrupted save: "
                  + ", ".join(p.name for p in removed), file=sys.stderr)
    if layout.world > 1:
        dist.barrier()  # nobody looks at checkpoints/ while rank 0 cleans it
    ckpt = _resumed_checkpoint(cfg, resume, out, layout)

    student, teacher, dataset, model_cls = _build_models(cfg, layout)
    named_trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params = [p for _, p in named_trainable]
    opt = torch.optim.AdamW(param_groups(named_trainable, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    ema = {n: p.detach().clone() for n, p in named_trainable} if cfg.ema > 0 else None

    start_step = 0
    if ckpt is not None and cfg.fsdp:
        _load_sharded(ckpt, student, named_trainable, opt, ema)
        start_step = int(ckpt["step"])
    elif ckpt is not None:
        missing = [n for n, _ in named_trainable if n not in ckpt["trainable"]]
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters {missing[:3]}...; was it made with other "
                             "settings?")
        with torch.no_grad():
            for n, p in named_trainable:
                p.copy_(ckpt["trainable"][n])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            for n in ema:
                ema[n].copy_(ckpt["ema"][n])
        set_rng_state(ckpt["rng"])
        start_step = int(ckpt["step"])

    model = student
    if layout.world > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)

    end_step = cfg.steps if not cfg.stop_after else min(cfg.steps, cfg.stop_after)
    order = GlobalOrder(len(dataset), cfg.seed)
    from ..data.synthetic import collate

    # The training stream is split over data-parallel ranks; the context-parallel ranks of a group read the same clips.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_MicroBatchSampler(order, start_step, end_step, layout.dp_rank, layout.dp, cfg),
        num_workers=cfg.num_workers, collate_fn=collate)
    batches = iter(loader)

    log_path = out / "train_log.csv"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # A resumed run keeps the rows up to its checkpoint; rows a stopped run logged after it are dropped (they
        # are logged again), so every step appears once.
        kept = []
        if start_step and log_path.is_file():
            with open(log_path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        log_f = open(log_path, "w", newline="")
        log = csv.DictWriter(log_f, fieldnames=LOG_FIELDS)
        log.writeheader()
        log.writerows(kept)
    tb = None
    if is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a stopped run wrote after its last checkpoint, so a resumed run's curves hold
        # every step once, like the CSV.
        tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    bar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"finetune[{cfg.attention}]", unit="step",
                   dynamic_ncols=True)

    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    t_start = time.time()
    last = {}
    step = start_step
    try:
        with _StopOnSignal(cfg, out, announce=is_main) as stop:
            stop.step = start_step
            for step in range(start_step, end_step):
                last = _train_step(cfg, step, model, teacher, opt, ema, params, named_trainable, batches, layout,
                                   autocast, t_start, stop)
                if is_main:
                    if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == end_step):
                        log.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in last.items()
                                      if k in LOG_FIELDS})
                        log_f.flush()
                        if tb is not None:
                            for key in TENSORBOARD_SCALARS:
                                tb.add_scalar(f"train/{key}", last[key], step + 1)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.1e}")
                        bar.update(1)
                done = step + 1
                stop.step = done
                # Every rank must take the same branch below (the save ends in a barrier), so the condition depends
                # only on the step.
                saved = bool(cfg.save_every and done % cfg.save_every == 0 or done == end_step)
                if saved:
                    _save(cfg, out, done, student, named_trainable, opt, ema, layout)
                if last["stop_signal"] and done < end_step:
                    # Every rank saw the same summed flag, so all of them stop after this step.
                    if not saved:
                        _save(cfg, out, done, student, named_trainable, opt, ema, layout)
                    raise TrainingInterrupted(last["stop_signal"], done, cfg.steps,
                                              checkpoint_path(out, done, cfg.fsdp), str(out))
    finally:
        if bar is not None:
            bar.close()
        if is_main:
            log_f.close()
        if tb is not None:
            tb.close()
    last.pop("stop_signal", None)
    summary = dict(last, start_step=start_step, end_step=end_step, world_size=layout.world,
                   data_parallel=layout.dp, context_parallel=layout.cp, fsdp=cfg.fsdp,
                   trainable_parameters=sum(p.numel() for p in params), output_dir=str(out))
    if device.type == "cuda":  # the peak of tensor memory on any rank (the caching allocator reserves somewhat more)
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        if layout.world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        summary["peak_memory_gib"] = round(float(peak), 3)
    if end_step == cfg.steps:
        if ema is not None:
            with torch.no_grad():
                for n, p in named_trainable:
                    p.copy_(ema[n])
        info = dict(attention=cfg.attention, sla=sla_settings(cfg), base_model=cfg.model, steps=cfg.steps,
                    weights="ema" if ema is not None else "final", config=cfg.to_dict())
        if cfg.fsdp:
            _export_sharded(cfg, student, model_cls, out / "final", info, layout)
        elif is_main:
            if cfg.trainable == "lora":
                student.fuse_lora()
                student.unload_lora()
            export_model(student, out / "final", info)
        if is_main:
            summary["final"] = str(out / "final")
    if layout.world > 1:
        dist.barrier()
    return summary


def checkpoint_path(out: Path, step: int, sharded: bool) -> Path:
    """Where the checkpoint of ``step`` goes: a file, or a folder when sharded (``--fsdp``)."""
    return out / "checkpoints" / (f"step-{step:07d}" if sharded else f"step-{step:07d}.pt")


def _export_sharded(cfg, student, model_cls, folder: Path, info: dict, layout) -> None:
    """The usual export (diffusers folder + ``save_sla``) of an FSDP model: its full state dict is gathered on rank
    0 and loaded, without a copy, into a model built on the meta device, which :func:`export_model` writes."""
    from .distributed import gather_full_state_dict

    full = gather_full_state_dict(student)  # a collective: every rank takes part, rank 0 receives
    if not layout.is_main:
        return
    with torch.device("meta"):
        export = model_cls.from_config(student.config)
    prepare_student(export, cfg)
    export.load_state_dict(full, strict=True, assign=True)
    export_model(export, folder, info)


def _train_step(cfg, step, model, teacher, opt, ema, params, named_trainable, batches, layout, autocast, t_start,
                stop) -> dict:
    """One optimizer step (all micro-batches); returns the logged values plus ``stop_signal``: the signal that
    asked any rank to stop (0 if none), agreed on by all ranks."""
    t0 = time.time()
    device, world = layout.device, layout.world
    for g in opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg) * g["lr_scale"]
    opt.zero_grad(set_to_none=True)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, flow, distill (sums over this rank's clips), stop signal
    for m in range(cfg.grad_accum):
        batch = next(batches)
        positions = micro_positions(step, m, layout.dp_rank, layout.dp, cfg.batch_size, cfg.grad_accum)
        x0 = batch["video"].to(device)
        te = batch["text_embeds"].to(device)
        pairs = [draw_noise_and_sigma(tuple(x0.shape[1:]), (cfg.seed, step, p), cfg.timestep_sampling,
                                      cfg.timestep_shift) for p in positions]
        noise = torch.stack([a for a, _ in pairs]).to(device)
        sigma = torch.stack([b for _, b in pairs]).to(device)
        x_t, target = noisy_input_and_target(x0, noise, sigma)
        sync = world == 1 or m == cfg.grad_accum - 1
        if cfg.fsdp:
            model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter only after the last micro-step
            ctx = _nullcontext()
        else:
            ctx = model.no_sync() if not sync else _nullcontext()
        with ctx:
            with torch.autocast(**autocast), warnings.catch_warnings():
                # FSDP2 warns that the root returned a view (Wan's unpatchify), which an in-place op would detach from
                # its backward hook; the prediction is only read here, never modified in place.
                warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
                pred = predict(model, x_t, sigma, te).float()
            flow = (pred - target).pow(2).flatten(1).mean(1)
            if teacher is not None:
                with torch.no_grad(), torch.autocast(**autocast):
                    t_pred = predict(teacher, x_t, sigma, te).float()
                distill = (pred - t_pred).pow(2).flatten(1).mean(1)
            else:
                distill = torch.zeros_like(flow)
            if cfg.loss == "flow":
                per = flow
            elif cfg.loss == "distill":
                per = cfg.distill_weight * distill
            else:
                per = flow + cfg.distill_weight * distill
            # Under context parallelism each rank's gradient is its tokens' share of the group's, and DDP/FSDP average
            # over all ranks: times N makes the update the data-parallel mean (distributed.py).
            (per.mean() * (layout.cp / cfg.grad_accum)).backward()
        if layout.cp_rank == 0:  # the ranks of a context-parallel group computed the same losses: count them once
            sums[:3] += torch.stack([per.detach().sum(), flow.detach().sum(), distill.detach().sum()]).double().cpu()
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    elif cfg.fsdp:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None))
    from .distributed import full_value

    grad_norm = full_value(grad_norm)  # FSDP: a DTensor (the norm over every rank's shards)
    opt.step()
    if ema is not None:
        with torch.no_grad():
            for n, p in named_trainable:
                ema[n].lerp_(p.detach(), 1 - cfg.ema)
    # Read the flag after the step's work, so that a signal that arrived during it stops after it. It rides on
    # the loss all-reduce below: with several ranks, any rank's signal stops all of them after this same step.
    sums[3] = float(stop.requested or 0)
    if world > 1:
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        reduced = sums.to(device) if device.type == "cuda" else sums
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    n_clips = cfg.batch_size * cfg.grad_accum * layout.dp
    means = (sums[:3] / n_clips).tolist()
    stop_signal = 0
    if sums[3] > 0:  # a sum of signal numbers over ranks; name one that was really received
        stop_signal = int(stop.requested or signal.SIGTERM)
    dt = time.time() - t0
    return dict(step=step + 1, loss=means[0], flow_loss=means[1], distill_loss=means[2],
                lr=cfg.lr * lr_factor(step, cfg), grad_norm=float(grad_norm), seconds=time.time() - t_start,
                clips_per_s=n_clips / dt, stop_signal=stop_signal)


def _sharded_tensors(student, named_trainable, opt, ema) -> tuple[dict, list]:
    """What a sharded checkpoint holds as tensors: the trainable parameters, the optimizer state (by parameter name)
    and the EMA, as this rank's DTensors. The optimizer's hyper-parameters travel as plain data."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optim = get_optimizer_state_dict(student, opt)
    tensors = {"trainable": dict(named_trainable), "optimizer": optim["state"]}
    if ema is not None:
        tensors["ema"] = ema
    return tensors, optim["param_groups"]


def _load_sharded(ckpt: dict, student, named_trainable, opt, ema) -> None:
    """Restore a sharded checkpoint (any number of processes wrote it) into the sharded model, optimizer and EMA."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from .checkpoint import load_sharded_tensors

    tensors, groups = _sharded_tensors(student, named_trainable, opt, ema)  # initialises the optimizer state
    if ema is None:
        tensors.pop("ema", None)
    load_sharded_tensors(ckpt["sharded"], tensors)
    saved_groups = ckpt["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"checkpoint {ckpt['sharded']} has {len(saved_groups)} optimizer groups, this run "
                         f"{len(groups)}; was it made with other settings?")
    for g in saved_groups:
        g["betas"] = tuple(g["betas"])  # JSON turned the tuple into a list
    set_optimizer_state_dict(student, opt, {"state": tensors["optimizer"], "param_groups": saved_groups})
    set_rng_state(ckpt["rng"])


def _save(cfg, out, step, student, named_trainable, opt, ema, layout) -> None:
    """Checkpoint ``step`` (call it on every rank). Without FSDP rank 0 writes one file and the others wait; with
    FSDP every rank writes its shards (:func:`~sla.training.checkpoint.save_sharded_checkpoint`)."""
    if cfg.fsdp:
        from .checkpoint import _rng_to_json, save_sharded_checkpoint

        tensors, groups = _sharded_tensors(student, named_trainable, opt, ema)
        info = dict(config=cfg.to_dict(), world_size=layout.world, data_parallel=layout.dp,
                    context_parallel=layout.cp, rng=_rng_to_json(rng_state()), param_groups=groups)
        save_sharded_checkpoint(out, step, tensors, info, rank=layout.rank, keep=cfg.keep_checkpoints)
        return
    if layout.is_main:
        payload = dict(trainable={n: p.detach().cpu().clone() for n, p in named_trainable},
                       optimizer=opt.state_dict(), ema=ema, rng=rng_state(), config=cfg.to_dict(),
                       world_size=layout.world, data_parallel=layout.dp, context_parallel=layout.cp)
        save_checkpoint(out, step, payload, keep=cfg.keep_checkpoints)
    if layout.world > 1:
        dist.barrier()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
