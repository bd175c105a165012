"""Install, inspect, switch off and remove SLA in a diffusers model."""

from __future__ import annotations

import contextlib

from torch import nn

from ...settings import SLASettings, check_backend_name, resolve_combine
from .._common import SLA_ATTRIBUTE, check_head_dim, check_integration_config, make_sla_module
from .config import CONTROLLER_ATTRIBUTE, SLAConfig, _SLAController
from .families import _families, _head_dim, _unwrap, find_self_attention_layers


def apply_sla(
    model: nn.Module,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    *,
    combine: str = "auto",
    dense_layers=(),
    dense_timestep_threshold: float | None = None,
    keep_proj_fp32: bool = True,
    backend: str = "auto",
    token_tile=None,
) -> nn.Module:
    """Install SLA in every self-attention layer of a diffusers video DiT (Wan2.1/2.2, CogVideoX); in place.

    Args:
        model: a diffusers transformer, e.g. ``WanTransformer3DModel`` (or ``pipe.transformer``; for Wan2.2 A14B
            call it on ``pipe.transformer`` and ``pipe.transformer_2``).
        critical, negligible, block_q, block_k, feature_map, linear_scope: the SLA operator's settings, see
            :func:`sla.sparse_linear_attention`. Defaults are the paper's. Block sizes must be one of 16, 32, 64,
            128 (what the GPU kernels run).
        combine: ``"auto"`` (default: ``"pooled_cov"`` when ``token_tile`` is set, ``"mass"`` otherwise; the rules
            the experiments support, docs/results.md), ``"paper"`` (``o_s + Proj(o_l)``, zero-initialised Proj),
            ``"mass"`` (``a o_s + (1 - a) Proj(o_l)``, identity-initialised Proj and a per-head ``mass_offset``),
            ``"pooled"`` (``a o_s + (1 - a) (o_c + Proj(o_l))``, zero-initialised Proj) or ``"pooled_cov"``
            (``"pooled"`` with the blocks' key-value covariance), see :class:`~sla.SparseLinearAttention`. The
            saved config records the rule ``"auto"`` resolved to.
        dense_layers: indices (into the list of self-attention layers, i.e. the block index; negative counts from
            the end) of layers that keep their original dense processor and get no SLA module.
        dense_timestep_threshold: if set, a forward whose ``timestep`` (max over the batch) is ``>=`` this value
            runs every layer dense; e.g. with diffusers' 0..1000 timesteps, ``900`` keeps the first, noisiest
            steps dense. Reads the ``timestep`` argument of ``model.forward`` through a forward pre-hook.
        keep_proj_fp32: keep each ``proj`` in float32 through ``model.to(torch.bfloat16)`` (default, see
            :class:`~sla.integrations._common.SparseLinearAttentionFP32Proj`); ``False`` lets it follow casts.
        backend: operator implementation, ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"``,
            ``"triton"`` or ``"reference"``.
        token_tile: ``None`` (default: SLA's blocks are runs of tokens in the model's raster order) or
            ``(frames, rows, columns)``, e.g. ``(4, 4, 4)``: the tokens are listed tile by tile before SLA and
            put back after, so each block of 64 tokens is a 4x4x4 patch of the video (:mod:`sla.ops.sla.tiles`).
            Wan only (CogVideoX's joint text+video sequence is refused). Costs one gather of q, k, v and one of
            the output per layer.

    Returns:
        ``model`` itself, patched. New ``proj`` parameters are created on the device of each attention module
        with ``requires_grad=True``; add them to an existing optimizer yourself (or build it after this call).

    Raises:
        ValueError: bad settings, a model without recognised self-attention layers, a layer with a processor this
            integration does not know (it never falls back to dense silently), or SLA already applied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_sla takes the transformer module (e.g. pipe.transformer), got {type(model).__name__}")
    combine = resolve_combine(combine, token_tile)
    settings = SLASettings(critical, negligible, block_q, block_k, feature_map, linear_scope, combine)
    check_integration_config(settings)
    check_backend_name(backend)
    if dense_timestep_threshold is not None and (
            isinstance(dense_timestep_threshold, bool) or not isinstance(dense_timestep_threshold, (int, float))):
        raise TypeError(f"dense_timestep_threshold must be a number or None, got {dense_timestep_threshold!r}")
    from ...ops.sla.tiles import check_token_tile

    token_tile = check_token_tile(token_tile)
    root = _unwrap(model)
    if getattr(root, CONTROLLER_ATTRIBUTE, None) is not None:
        raise ValueError("SLA is already applied to this model; call sla.remove_sla(model) first to change settings")

    layers = find_self_attention_layers(root)
    if not layers:
        raise ValueError(
            f"{type(root).__name__} has no self-attention layer that sla.apply_sla recognises (supported: diffusers "
            f"Wan2.1/2.2 WanAttention, CogVideoX joint attention). For other modules that call "
            f"torch.nn.functional.scaled_dot_product_attention use sla.integrations.sdpa.wrap_sdpa_self_attention"
        )
    families = {f.name: f for f in _families()}
    kinds = {fam for _, _, fam in layers}
    if len(kinds) > 1:
        raise ValueError(f"model mixes attention families {sorted(kinds)}; apply SLA to each sub-model separately")
    family = kinds.pop()
    if token_tile is not None and not families[family].token_tiles:
        raise ValueError(f"token_tile is supported for Wan models only (this is a {family!r} model, whose joint "
                         f"text+video sequence has no single video grid); pass token_tile=None")

    n = len(layers)
    dense = set()
    for idx in dense_layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"dense_layers must hold ints (layer indices), got {idx!r}")
        if not -n <= idx < n:
            raise ValueError(f"dense_layers index {idx} is out of range for {n} self-attention layers")
        dense.add(idx % n)
    if len(dense) == n:
        raise ValueError("dense_layers covers every self-attention layer, so SLA would run nowhere; "
                         "drop some indices or do not call apply_sla")

    accepted, sla_cls = families[family].accepted, families[family].processor
    for name, attn, _ in layers:
        if not isinstance(attn.processor, accepted):
            raise ValueError(
                f"layer {name!r} uses processor {type(attn.processor).__name__}, which apply_sla does not replace "
                f"(it knows {[c.__name__ for c in accepted]}); reset it with "
                f"model.set_attn_processor({accepted[0].__name__}()) first"
            )
        if hasattr(attn, SLA_ATTRIBUTE):
            raise ValueError(f"layer {name!r} already has an attribute {SLA_ATTRIBUTE!r}; cannot install SLA there")
        check_head_dim(_head_dim(attn), backend, f"layer {name!r}")

    config = SLAConfig(sla=settings, backend=backend, keep_proj_fp32=bool(keep_proj_fp32),
                       dense_layers=tuple(sorted(dense)), token_tile=token_tile,
                       dense_timestep_threshold=None if dense_timestep_threshold is None
                       else float(dense_timestep_threshold))
    controller = _SLAController(config=config, family=family)
    for i, (name, attn, _) in enumerate(layers):
        if i in dense:
            continue
        ref = attn.to_q.weight
        sla_module = make_sla_module(_head_dim(attn), settings, backend=backend, keep_proj_fp32=keep_proj_fp32,
                                     num_heads=attn.heads)
        sla_module.to(device=ref.device, dtype=None if keep_proj_fp32 or not ref.is_floating_point() else ref.dtype)
        attn.add_module(SLA_ATTRIBUTE, sla_module)
        attn.set_processor(sla_cls(attn.processor, controller, i))
        controller.layer_names.append(name)

    if config.dense_timestep_threshold is not None:
        # A bound method (not a closure) so that copy.deepcopy(model), e.g. for an EMA copy, hooks the copy's
        # own controller.
        controller.hook_handle = root.register_forward_pre_hook(controller.timestep_hook, with_kwargs=True)
    if token_tile is not None:
        controller.grid_hook_handle = root.register_forward_pre_hook(controller.grid_hook, with_kwargs=True)
    # A plain attribute (not a Module, not a tensor): invisible to state_dict and parameters().
    object.__setattr__(root, CONTROLLER_ATTRIBUTE, controller)
    return model


def is_sla_applied(model: nn.Module) -> bool:
    """True if :func:`apply_sla` patched ``model`` (and :func:`remove_sla` has not been called since)."""
    return getattr(_unwrap(model), CONTROLLER_ATTRIBUTE, None) is not None


def _controller(model: nn.Module) -> _SLAController:
    controller = getattr(_unwrap(model), CONTROLLER_ATTRIBUTE, None)
    if controller is None:
        raise ValueError("SLA is not applied to this model; call sla.apply_sla(model, ...) first")
    return controller


def sla_modules(model: nn.Module) -> dict:
    """``{attention module name: SparseLinearAttention}`` for every layer running SLA, in model order."""
    controller = _controller(model)
    root = _unwrap(model)
    return {name: getattr(root.get_submodule(name), SLA_ATTRIBUTE) for name in controller.layer_names}


def remove_sla(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_sla`: put each layer's original processor object back and delete the ``sla``
    submodules (their parameters leave ``state_dict()``; save them first with :func:`save_sla` if trained)."""
    controller = _controller(model)
    root = _unwrap(model)
    for name in controller.layer_names:
        attn = root.get_submodule(name)
        attn.set_processor(attn.processor.original)
        delattr(attn, SLA_ATTRIBUTE)
    for handle in (controller.hook_handle, controller.grid_hook_handle):
        if handle is not None:
            handle.remove()
    object.__delattr__(root, CONTROLLER_ATTRIBUTE)
    return model


def set_sla_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every SLA layer of ``model`` between SLA (``True``) and its original dense processor (``False``)
    without removing anything; parameters stay in place. Use it to run chosen denoising steps dense."""
    _controller(model).enabled = bool(enabled)


@contextlib.contextmanager
def sla_disabled(model: nn.Module):
    """``with sla_disabled(model): ...`` runs the block dense (original processors), then restores the state.

    For per-step control inside a diffusers pipeline, toggle from ``callback_on_step_end``, e.g. dense for the
    first two steps: ``def cb(pipe, i, t, kw): set_sla_enabled(pipe.transformer, i + 1 >= 2); return kw``
    together with ``set_sla_enabled(pipe.transformer, False)`` before the call."""
    controller = _controller(model)
    previous = controller.enabled
    controller.enabled = False
    try:
        yield model
    finally:
        controller.enabled = previous
