"""What :func:`~sla.integrations.diffusers.apply_sla` installed (:class:`SLAConfig`, saved in ``sla_config.json``)
and the per-model state its processors share (:class:`_SLAController`, stored on the model)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ...settings import SLASettings

CONFIG_NAME = "sla_config.json"
WEIGHTS_NAME = "sla_weights.safetensors"
FORMAT = "sla-diffusers"
FORMAT_VERSION = 1
CONTROLLER_ATTRIBUTE = "_sla_controller"


@dataclass(frozen=True)
class SLAConfig:
    """What :func:`apply_sla` installed; written to ``sla_config.json`` by :func:`save_sla`.

    ``sla``: the operator's settings (:class:`~sla.settings.SLASettings`); the other fields are the
    integration's own. The JSON form is flat (``{"critical": ..., "backend": ..., ...}``), as it always was.
    """

    sla: SLASettings = field(default_factory=SLASettings)
    backend: str = "auto"
    keep_proj_fp32: bool = True
    dense_layers: tuple = ()
    dense_timestep_threshold: float | None = None
    token_tile: tuple | None = None  # None: raster token order; (tf, th, tw): blocks over 3D tiles (sla/ops/sla/tiles.py)

    def to_dict(self) -> dict:
        return {**self.sla.to_dict(), "backend": self.backend, "keep_proj_fp32": self.keep_proj_fp32,
                "dense_layers": list(self.dense_layers), "dense_timestep_threshold": self.dense_timestep_threshold,
                "token_tile": None if self.token_tile is None else list(self.token_tile)}

    @classmethod
    def from_dict(cls, d: dict) -> "SLAConfig":
        """The config of a flat dict as :meth:`to_dict` writes it; raises ``TypeError``/``ValueError`` for unknown
        keys or bad SLA settings."""
        own = {f for f in cls.__dataclass_fields__ if f != "sla"}
        unknown = set(d) - own - set(SLASettings.names())
        if unknown:
            raise ValueError(f"unknown SLA config keys {sorted(unknown)}; this file was written by a newer version")
        d = dict(d)
        # Files written before the combine option existed hold the paper's rule, whatever today's default is.
        d.setdefault("combine", "paper")
        settings = SLASettings.of(d)  # reads only its own keys
        rest = {k: v for k, v in d.items() if k in own}
        rest["dense_layers"] = tuple(rest.get("dense_layers", ()))
        if isinstance(rest.get("token_tile"), list):  # JSON has no tuples
            rest["token_tile"] = tuple(rest["token_tile"])
        return cls(sla=settings, **rest)


@dataclass
class _SLAController:
    """Per-model state shared by its SLA processors (stored on the model as ``_sla_controller``)."""

    config: SLAConfig
    family: str
    layer_names: list = field(default_factory=list)  # patched attention modules, in model order
    enabled: bool = True  # set_sla_enabled / sla_disabled
    dense_step: bool = False  # set per forward by the timestep hook
    hook_handle: object = None
    grid: tuple | None = None  # (F, H, W) tokens of the current forward, set by the grid hook (token_tile only)
    grid_hook_handle: object = None
    _tile_orders: dict = field(default_factory=dict)  # (grid, device) -> (perm, inv)

    @property
    def active(self) -> bool:
        return self.enabled and not self.dense_step

    def timestep_hook(self, module, args, kwargs):
        """Forward pre-hook of the model: dense step iff max(timestep) >= dense_timestep_threshold."""
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        timestep = bound.get("timestep")
        if timestep is None:
            raise ValueError("apply_sla(dense_timestep_threshold=...) needs the model to be called with a "
                             "`timestep` argument; pass it, or use sla_disabled(model) to choose dense steps")
        t = torch.as_tensor(timestep)
        # One host sync per model call (not per layer): the choice must be a Python bool to pick a code path.
        self.dense_step = bool((t.float().max() >= self.config.dense_timestep_threshold).item())

    def grid_hook(self, module, args, kwargs):
        """Forward pre-hook of the model (``token_tile`` only): the token grid ``(F, H, W)`` of this call, from
        the latents ``(B, C, F, H, W)`` and the model's patch size."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        patch = tuple(getattr(module.config, "patch_size", ()) or ())
        if hidden is None or hidden.dim() != 5 or len(patch) != 3:
            raise ValueError(
                f"apply_sla(token_tile=...) needs a video model called with latents (B, C, F, H, W) and a 3D "
                f"patch_size in its config; {type(module).__name__} got "
                f"{None if hidden is None else tuple(hidden.shape)} with patch_size {patch or None}. Apply SLA "
                f"without token_tile for this model")
        self.grid = tuple(int(n) // int(p) for n, p in zip(hidden.shape[2:], patch))

    def tile_order(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm, inv)`` of :func:`sla.ops.sla.tiles.tile_permutation` for this call's grid (cached)."""
        from ...ops.sla.tiles import tile_permutation

        if self.grid is None or self.grid[0] * self.grid[1] * self.grid[2] != seq_len:
            raise ValueError(
                f"token_tile={self.config.token_tile}: the attention got {seq_len} tokens but the model's latents "
                f"give a grid of {self.grid} tokens; token tiles need the self-attention to see exactly the video "
                f"tokens of the model's input (apply SLA without token_tile otherwise)")
        key = (self.grid, str(device))
        if key not in self._tile_orders:
            self._tile_orders[key] = tile_permutation(self.grid, self.config.token_tile, device=device)
        return self._tile_orders[key]
