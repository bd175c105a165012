"""Integrations of SLA into model libraries.

* :mod:`sla.integrations.diffusers`: :func:`apply_sla` / :func:`remove_sla` / :func:`save_sla` / :func:`load_sla`
  for diffusers video DiTs (Wan2.1/2.2 T2V and I2V, CogVideoX).
* :mod:`sla.integrations.sdpa`: :func:`wrap_sdpa_self_attention` for any module that computes its
  self-attention with ``torch.nn.functional.scaled_dot_product_attention``.

Nothing here imports diffusers until one of the diffusers functions is called, so ``import sla`` stays light.
"""

from __future__ import annotations

_DIFFUSERS_NAMES = (
    "apply_sla",
    "remove_sla",
    "save_sla",
    "load_sla",
    "is_sla_applied",
    "sla_modules",
    "set_sla_enabled",
    "sla_disabled",
    "find_self_attention_layers",
    "SLAConfig",
    "WanSLAAttnProcessor",
    "CogVideoXSLAAttnProcessor",
)
_SDPA_NAMES = ("wrap_sdpa_self_attention", "unwrap_sdpa_self_attention")

__all__ = list(_DIFFUSERS_NAMES + _SDPA_NAMES)


def __getattr__(name: str):
    # Lazy: the submodules import diffusers/torch internals only when a name is first used.
    if name in _DIFFUSERS_NAMES:
        from . import diffusers as _diffusers

        return getattr(_diffusers, name)
    if name in _SDPA_NAMES:
        from . import sdpa as _sdpa

        return getattr(_sdpa, name)
    if name in ("diffusers", "sdpa"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sla.integrations' has no attribute {name!r}")
