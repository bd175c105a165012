"""Fine-tuning configuration: one dataclass, readable from a TOML or YAML file and overridable by flags.

A config file holds the same keys as :class:`FinetuneConfig` (flat, or grouped under any table names: tables
are flattened, so ``[sla] critical = 0.05`` and ``critical = 0.05`` mean the same). Unknown keys are an
error (a typo must not silently train the wrong thing).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from ..settings import BACKEND_NAMES, SLASettings, resolve_combine


@dataclass
class FinetuneConfig:
    # --- model and data -------------------------------------------------------------------------------------
    model: str = "wan8k"  # a built-in model ("wan8k", "small"), or a diffusers folder (save_pretrained layout)
    data: str = "synthetic"  # "synthetic" or a folder of latents (*.safetensors, see sla/data/latents.py)
    data_size: int = 100_000  # clips in the synthetic training split
    frames: int | None = None  # synthetic clip size; None = the model's own (its synthetic_data.json)
    height: int | None = None
    width: int | None = None
    output_dir: str = "runs/finetune"
    # --- attention ------------------------------------------------------------------------------------------
    attention: str = "sla"  # full | sla | sparse_only | sum_no_proj | linear_only (sla/training/variants.py)
    critical: float = 0.05
    negligible: float = 0.10
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    linear_scope: str = "marginal"
    combine: str = "auto"  # auto (pooled_cov with token_tile, else mass) | paper | mass | pooled | pooled_cov
    backend: str = "auto"
    token_tile: tuple | None = None  # None: raster order; (tf, th, tw): SLA's blocks over 3D token tiles (Wan)
    # --- what trains ----------------------------------------------------------------------------------------
    trainable: str = "full"  # full | proj (SLA projections only) | lora (LoRA adapters + SLA projections)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    # --- objective ------------------------------------------------------------------------------------------
    loss: str = "flow"  # flow | distill | flow+distill
    distill_weight: float = 1.0
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    timestep_shift: float = 1.0
    # --- optimisation ---------------------------------------------------------------------------------------
    steps: int = 200
    batch_size: int = 2  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    # The SLA parameters start where they do (Proj at zero or the identity, mass offsets at zero) and must travel
    # O(1) within a short fine-tune; Adam moves a weight by at most ~lr per step, so they get larger learning
    # rates and no weight decay (docs/results.md, "recipe").
    proj_lr_scale: float = 10.0  # learning-rate multiplier for the SLA projections
    mass_lr_scale: float = 100.0  # learning-rate multiplier for the per-head mass offsets (mass, pooled, pooled_cov)
    sla_weight_decay: float = 0.0  # weight decay of the SLA parameters (weight_decay applies to the rest)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 10
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.0  # 0 disables; e.g. 0.999
    bf16: bool = False  # bf16 autocast (CUDA or CPU)
    gradient_checkpointing: bool = False
    seed: int = 0
    # --- several processes (torchrun; sla/training/distributed.py) -------------------------------------------
    fsdp: bool = False  # FSDP2 fully_shard (per block + root) instead of DDP; sharded checkpoints
    context_parallel: int = 1  # Ulysses degree N: N consecutive ranks share each clip's tokens (and one batch)
    # --- bookkeeping ----------------------------------------------------------------------------------------
    log_every: int = 1
    tensorboard: bool = False  # also write the logged scalars as TensorBoard events to output_dir/tensorboard
    save_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    stop_after: int = 0  # >0: stop (as if interrupted) after this many optimizer steps; for tests and budgets

    def sla_settings(self) -> SLASettings:
        """The SLA settings of the flat fields ``critical`` ... ``combine``, as one checked object (``combine="auto"``
        resolved for ``token_tile``, :func:`sla.settings.resolve_combine`)."""
        return SLASettings.of(self, combine=resolve_combine(self.combine, self.token_tile))

    def validate(self) -> "FinetuneConfig":
        from .variants import ATTENTION_MODES

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("attention", ATTENTION_MODES)
        choice("trainable", ("full", "proj", "lora"))
        choice("loss", ("flow", "distill", "flow+distill"))
        choice("timestep_sampling", ("logit_normal", "uniform"))
        choice("device", ("auto", "cpu", "cuda"))
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "context_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "save_every", "log_every", "num_workers", "stop_after", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("proj_lr_scale", "mass_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.sla_weight_decay >= 0:
            raise ValueError(f"sla_weight_decay must be >= 0, got {self.sla_weight_decay!r}")
        self.sla_settings()  # checks critical ... combine, naming the bad one
        choice("backend", BACKEND_NAMES)
        from ..ops.sla.tiles import check_token_tile

        self.token_tile = check_token_tile(self.token_tile)
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None (the model's own clip size), got {v!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1) (0 disables), got {self.ema!r}")
        if self.trainable == "proj" and self.attention != "sla":
            raise ValueError(f"trainable='proj' trains only the SLA projections, which exist only with "
                             f"attention='sla' (got attention={self.attention!r}); use trainable='full'")
        if self.fsdp and self.trainable == "lora":
            raise ValueError("fsdp=True (--fsdp) with trainable='lora' (--trainable lora) is not supported (the "
                             "adapters would be sharded, then fused into sharded weights); LoRA trains few parameters: "
                             "drop --fsdp and use DDP, or use --trainable full/proj")
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                                 "(or pip install 'sparse-linear-attention[train]'), or drop --tensorboard; "
                                 "train_log.csv is always written")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(FinetuneConfig)}


def _flatten(d: dict, out: dict | None = None) -> dict:
    out = {} if out is None else out
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(v, out)
        else:
            out[k.replace("-", "_")] = v
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file into a flat dict of config keys."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if ext == ".toml":
        import tomllib

        data = tomllib.loads(raw.decode())
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML config files need PyYAML (pip install pyyaml); or use a .toml file") from e
        data = yaml.safe_load(raw) or {}
    elif ext == ".json":
        data = json.loads(raw)
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    flat = _flatten(data)
    unknown = sorted(set(flat) - set(_FIELDS))
    if unknown:
        raise ValueError(f"config file {path}: unknown key(s) {unknown}; known keys: {sorted(_FIELDS)}")
    return flat


def make_config(file: str | None = None, **overrides) -> FinetuneConfig:
    """Defaults < config file < ``overrides`` (``None`` values in overrides are ignored)."""
    values = {}
    if file:
        values.update(read_config_file(file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}")
    return FinetuneConfig(**values).validate()
