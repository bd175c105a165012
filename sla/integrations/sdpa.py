"""SLA for any module whose self-attention calls ``torch.nn.functional.scaled_dot_product_attention``.

For models without a dedicated integration (a custom DiT, a diffusers model whose attention goes through the
``native`` SDPA backend, a timm/transformers block...), :func:`wrap_sdpa_self_attention` routes the SDPA calls
*made inside one module's forward* to SLA::

    from sla.integrations.sdpa import wrap_sdpa_self_attention

    for block in model.blocks:
        wrap_sdpa_self_attention(block.attn, head_dim=64)      # one SLA module (and proj) per layer

How it works: the wrapper registers ``module.sla`` (a :class:`~sla.SparseLinearAttention` with its float32
zero-initialised ``proj``; a real submodule, so it is in ``state_dict()``, follows ``.to()`` and is trained) and
installs forward hooks that push a ``TorchFunctionMode`` for the duration of ``module.forward``. The mode sees
every ``scaled_dot_product_attention`` call however it was imported (``F.scaled_dot_product_attention``,
``from torch.nn.functional import ...``, ``torch._C._nn...``) and computes SLA on the same ``(B, H, L, D)``
tensors, with the call's ``scale``. Calls outside the wrapped module are untouched.

Rules, so that nothing turns dense without you knowing:

* A call with ``attn_mask``, ``is_causal=True``, ``dropout_p > 0`` (in training) or ``enable_gqa=True``
  raises ``ValueError``: SLA computes none of these.
* A call whose key length differs from its query length is cross-attention. ``on_cross_attention="error"``
  (default) raises; ``"dense"`` runs it through SDPA unchanged (for modules that do both, like a block with
  self- and cross-attention). Equal lengths are always treated as self-attention, so wrap only modules whose
  equal-length calls *are* self-attention.
* A forward of the wrapped module that makes no SDPA call at all raises ``RuntimeError`` (the module computes
  attention some other way, e.g. flash-attn directly or a diffusers backend other than ``native``), instead of
  silently running without SLA.

Limits: eager mode is what is tested; ``torch.compile`` traces torch-function modes on recent PyTorch but the
dedicated diffusers processors (:func:`sla.apply_sla`) are the better choice there. Each intercepted call
costs a few microseconds of Python for every torch op inside the wrapped forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..settings import SLASettings, check_backend_name
from ._common import SLA_ATTRIBUTE, check_head_dim, check_integration_config, make_sla_module

_ROUTER_ATTRIBUTE = "_sla_sdpa_router"
_SDPA = torch._C._nn.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def bind_sdpa_arguments(args, kwargs) -> dict:
    """The arguments of one ``scaled_dot_product_attention(*args, **kwargs)`` call by name, defaults filled in."""
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return bound


class _SDPAToSLA(TorchFunctionMode):
    """Active during one forward of the wrapped module: SDPA calls -> ``module.sla``."""

    def __init__(self, router: "_SDPARouter", module: nn.Module):
        super().__init__()
        self.router = router
        self.module = module
        self.sdpa_calls = 0  # every SDPA call seen, including ones that raise
        self.sla_calls = 0
        self.dense_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention and func is not _SDPA:
            return func(*args, **kwargs)
        self.sdpa_calls += 1
        call = bind_sdpa_arguments(args, kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        if q.dim() == 4 and k.dim() == 4 and q.shape[-2] != k.shape[-2]:
            if self.router.on_cross_attention == "dense":
                self.dense_calls += 1
                return func(*args, **kwargs)
            raise ValueError(
                f"scaled_dot_product_attention inside {type(self.module).__name__} got query length {q.shape[-2]} "
                f"and key length {k.shape[-2]} (cross-attention); wrap_sdpa_self_attention replaces self-attention "
                f"only. Pass on_cross_attention='dense' to keep such calls on SDPA"
            )
        unsupported = []
        if call["attn_mask"] is not None:
            unsupported.append("attn_mask")
        if call["is_causal"]:
            unsupported.append("is_causal=True")
        if call["dropout_p"] and self.module.training:
            unsupported.append(f"dropout_p={call['dropout_p']}")
        if call["enable_gqa"]:
            unsupported.append("enable_gqa=True")
        if unsupported:
            raise ValueError(
                f"scaled_dot_product_attention inside {type(self.module).__name__} was called with "
                f"{', '.join(unsupported)}, which SLA does not compute; remove them or unwrap this module "
                f"(sla.integrations.sdpa.unwrap_sdpa_self_attention)"
            )
        sla = getattr(self.module, SLA_ATTRIBUTE)
        self.sla_calls += 1
        return sla(q, k, v, scale=call["scale"])


class _SDPARouter:
    """Hooks of one wrapped module; keeps the stack of active modes (re-entrant forwards nest)."""

    def __init__(self, on_cross_attention: str):
        self.on_cross_attention = on_cross_attention
        self.enabled = True
        self.stack = []
        self.handles = []

    def pre_hook(self, module, args):
        if not self.enabled:
            return
        mode = _SDPAToSLA(self, module)
        mode.__enter__()
        self.stack.append(mode)

    def post_hook(self, module, args, output):
        if not self.enabled or not self.stack:
            return
        mode = self.stack.pop()
        mode.__exit__(None, None, None)
        if mode.sdpa_calls == 0:
            raise RuntimeError(
                f"{type(module).__name__}.forward made no scaled_dot_product_attention call, so SLA did not run. "
                f"The module computes attention another way (flash-attn directly, a diffusers backend other than "
                f"'native', ...); use sla.apply_sla for diffusers Wan/CogVideoX or unwrap this module"
            )


def wrap_sdpa_self_attention(
    module: nn.Module,
    head_dim: int,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    *,
    on_cross_attention: str = "error",
    keep_proj_fp32: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """Make ``module``'s own SDPA self-attention calls compute SLA (in place; returns ``module``).

    Args:
        module: the attention layer (or block) whose forward calls ``scaled_dot_product_attention`` with
            ``(B, H, L, D)`` tensors.
        head_dim: D of those calls (the SLA ``proj`` is ``Linear(head_dim, head_dim)``, shared by the heads).
        critical, negligible, block_q, block_k, feature_map, linear_scope, backend: the operator's settings,
            see :func:`sla.sparse_linear_attention`; block sizes as in :func:`sla.apply_sla`.
        on_cross_attention: ``"error"`` (default) or ``"dense"``: what to do with calls whose key length
            differs from the query length.
        keep_proj_fp32: keep ``module.sla.proj`` in float32 through half-precision casts (see
            :func:`sla.apply_sla`).
    """
    settings = SLASettings(critical, negligible, block_q, block_k, feature_map, linear_scope)
    check_integration_config(settings)
    check_backend_name(backend)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    check_head_dim(head_dim, backend, type(module).__name__)
    if on_cross_attention not in ("error", "dense"):
        raise ValueError(f"on_cross_attention must be 'error' or 'dense', got {on_cross_attention!r}")
    if getattr(module, _ROUTER_ATTRIBUTE, None) is not None:
        raise ValueError(f"{type(module).__name__} is already wrapped; unwrap_sdpa_self_attention(module) first")
    if hasattr(module, SLA_ATTRIBUTE):
        raise ValueError(f"{type(module).__name__} already has an attribute {SLA_ATTRIBUTE!r}")
    ref = next(module.parameters(), None)
    sla_module = make_sla_module(head_dim, settings, backend=backend, keep_proj_fp32=keep_proj_fp32)
    if ref is not None:
        sla_module.to(device=ref.device, dtype=None if keep_proj_fp32 else ref.dtype)
    module.add_module(SLA_ATTRIBUTE, sla_module)
    router = _SDPARouter(on_cross_attention)
    router.handles = [module.register_forward_pre_hook(router.pre_hook),
                      module.register_forward_hook(router.post_hook, always_call=True)]
    object.__setattr__(module, _ROUTER_ATTRIBUTE, router)
    return module


def unwrap_sdpa_self_attention(module: nn.Module) -> nn.Module:
    """Undo :func:`wrap_sdpa_self_attention`: remove the hooks and the ``sla`` submodule."""
    router = getattr(module, _ROUTER_ATTRIBUTE, None)
    if router is None:
        raise ValueError(f"{type(module).__name__} is not wrapped by wrap_sdpa_self_attention")
    for handle in router.handles:
        handle.remove()
    delattr(module, SLA_ATTRIBUTE)
    object.__delattr__(module, _ROUTER_ATTRIBUTE)
    return module


__all__ = ["unwrap_sdpa_self_attention", "wrap_sdpa_self_attention"]
