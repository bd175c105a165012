"""Capture q, k, v of chosen self-attention layers at chosen denoising steps, with hooks only.

No model code changes and no processor replacement: while a selected layer runs at a selected step,
a :class:`torch.overrides.TorchFunctionMode` is active around that one attention module and records the
arguments of ``torch.nn.functional.scaled_dot_product_attention``. That is exactly what the attention
kernel sees: q and k after the model's QK-norm and RoPE, ``(B, H, L, D)``. diffusers' default
("native") attention backend ends in that function for every model. A layer that already runs SLA
(:func:`sla.apply_sla` installs ``attn.sla``, a :class:`~sla.SparseLinearAttention`) is captured from a
forward pre-hook on that submodule instead, together with its trained projection and settings.

"Step" means the n-th forward call of the model the capture is attached to (0-based). A pipeline that
runs classifier-free guidance as two separate calls per denoising step therefore counts two calls per
step; the ``sla analyze`` driver makes one call per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..integrations.sdpa import bind_sdpa_arguments
from .layer import OwnProjection



@dataclass
class CapturedAttention:
    """q, k, v of one self-attention call, reduced to one batch element and the sampled heads.

    Attributes:
        layer_name: module name in the model, e.g. ``blocks.3.attn1``.
        layer_index: position among the model's self-attention layers.
        step: forward call of the model (0-based) during which it was recorded.
        q, k, v: ``(H_sampled, L, D)``, in the model's dtype, on the capture's storage device.
        heads: the original head indices of the rows of q, k, v.
        num_heads: heads the layer has.
        scale: softmax scale passed to the kernel (``None`` = ``D ** -0.5``).
        source: ``"sdpa"`` (dense attention) or ``"sla"`` (the layer runs SLA).
        own_projection: the layer's SLA settings and projection when ``source == "sla"``.
    """

    layer_name: str
    layer_index: int
    step: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: list
    num_heads: int
    scale: float | None
    source: str
    own_projection: OwnProjection | None = None


def find_self_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of the model's self-attention layers, in model order.

    Uses the diffusers integration's detection (Wan ``blocks[i].attn1``, CogVideoX joint attention; it
    also lists layers already running SLA). For other diffusers models, a self-attention layer is an
    attention module (it has a ``processor``) whose ``is_cross_attention`` is False, i.e. whose keys and
    values come from the same hidden states as its queries.
    """
    model = getattr(model, "_orig_mod", model)
    try:
        from ..integrations.diffusers import find_self_attention_layers as integration_find
        found = [(name, module) for name, module, _ in integration_find(model)]
    except ImportError:
        found = []
    if found:
        return found
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "processor") and getattr(module, "is_cross_attention", None) is False]


def resolve_layers(model: nn.Module, selection="auto") -> list[tuple[int, str, nn.Module]]:
    """Turn a layer selection into ``[(index, name, module)]``.

    ``selection``: ``"auto"`` (first, middle and last self-attention layer), ``"all"``, or a list whose
    items are indices into the self-attention layers (negative counts from the end) or module names
    (``"blocks.3.attn1"``). Raises ``ValueError`` naming the valid choices.
    """
    layers = find_self_attention_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no self-attention layer that sla.analysis recognises (diffusers attention "
            f"modules with is_cross_attention=False); pass a diffusers transformer such as WanTransformer3DModel")
    n = len(layers)
    names = [name for name, _ in layers]
    if selection is None or selection == "auto":
        indices = sorted({0, n // 2, n - 1})
    elif selection == "all":
        indices = list(range(n))
    else:
        if isinstance(selection, (str, int)):
            selection = [selection]
        indices = []
        all_modules = dict(model.named_modules())
        for item in selection:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise TypeError(f"layers must hold ints or module names, got {item!r}")
            if isinstance(item, str) and item.lstrip("-").isdigit():
                item = int(item)
            if isinstance(item, int):
                if not -n <= item < n:
                    raise ValueError(f"layer index {item} is out of range: the model has {n} self-attention layers, "
                                     f"so use 0..{n - 1} (or -{n}..-1 from the end)")
                indices.append(item % n)
            elif item in names:
                indices.append(names.index(item))
            elif item in all_modules:
                raise ValueError(f"layer {item!r} is not a self-attention layer (cross-attention or another module); "
                                 f"self-attention layers are e.g. {names[:3]} ... ({n} in all)")
            else:
                raise ValueError(f"layer {item!r} does not exist; self-attention layers are {_short_list(names)}")
        indices = sorted(set(indices))
        if not indices:
            raise ValueError("layers selects nothing; give at least one index or name, or 'all'")
    return [(i, layers[i][0], layers[i][1]) for i in indices]


def resolve_steps(selection, num_steps: int) -> list[int]:
    """Turn a step selection into sorted step indices in ``[0, num_steps)``.

    ``selection``: ``"auto"`` (first, middle and last), ``"all"``, or a list of ints (negative counts from
    the end). Raises ``ValueError`` for an index outside the run.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if selection is None or selection == "auto":
        return sorted({0, num_steps // 2, num_steps - 1})
    if selection == "all":
        return list(range(num_steps))
    if isinstance(selection, (int, str)):
        selection = [selection]
    steps = []
    for item in selection:
        if isinstance(item, str):
            try:
                item = int(item)
            except ValueError:
                raise ValueError(f"steps must be integers, 'auto' or 'all', got {item!r}") from None
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"steps must hold ints, got {item!r}")
        if not -num_steps <= item < num_steps:
            raise ValueError(f"step {item} is out of range: the run has {num_steps} denoising steps, so use "
                             f"0..{num_steps - 1} (or -{num_steps}..-1 from the end)")
        steps.append(item % num_steps)
    if not steps:
        raise ValueError("steps selects nothing; give at least one step index, or 'all'")
    return sorted(set(steps))


def _short_list(names: list[str]) -> str:
    return str(names) if len(names) <= 6 else f"{names[:3]} ... {names[-2:]} ({len(names)} in all)"


def _sla_child(module: nn.Module):
    """The :class:`~sla.SparseLinearAttention` that sla's integrations attach as ``module.sla``, if any."""
    from ..layers.sla import SparseLinearAttention

    sla = getattr(module, "sla", None)
    return sla if isinstance(sla, SparseLinearAttention) else None


def _own_projection(sla) -> OwnProjection:
    """A layer's SLA settings and parameters; ``mass_offset`` holds all of the layer's heads (``_record`` keeps
    the captured ones)."""
    combine = getattr(sla, "combine", "paper")
    offset = getattr(sla, "mass_offset", None)
    return OwnProjection(
        weight=sla.proj.weight.detach().float().cpu(),
        bias=None if sla.proj.bias is None else sla.proj.bias.detach().float().cpu(),
        critical=sla.critical, negligible=sla.negligible, block_q=sla.block_q, block_k=sla.block_k,
        feature_map=sla.feature_map, linear_scope=sla.linear_scope, combine=combine,
        mass_offset=None if offset is None else offset.detach().float().cpu())


class _SDPARecorder(TorchFunctionMode):
    """Calls ``on_call(bound_arguments)`` for every scaled_dot_product_attention call, then runs it unchanged."""

    def __init__(self, on_call):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.on_call(bind_sdpa_arguments(args, kwargs))
        return func(*args, **kwargs)


class AttentionCapture:
    """Context manager that records q, k, v of ``layers`` at ``steps`` while the model runs.

    Args:
        model: a diffusers transformer (any ``nn.Module`` whose attention modules use diffusers processors).
        layers: see :func:`resolve_layers`.
        steps: step indices (forward calls of ``model``, 0-based, non-negative) to record; ``None`` = every call.
        heads: ``None`` (all), an int ``n`` (``n`` heads evenly spread over the layer's heads) or a list of
            head indices.
        batch_index: which batch element to keep.
        store_device: where captured tensors are kept (default CPU, so long runs do not fill the GPU).

    Example::

        with AttentionCapture(transformer, layers=[0, -1], steps=[0, 9], heads=4) as cap:
            pipe(prompt, num_inference_steps=10)
        cap.check_complete()
        for c in cap.captures: ...
    """

    def __init__(self, model: nn.Module, layers="auto", steps=None, heads=None, batch_index: int = 0,
                 store_device: torch.device | str = "cpu"):
        self.model = model
        self.layers = resolve_layers(model, layers)
        if steps is not None:
            steps = [steps] if isinstance(steps, int) else list(steps)
            for s in steps:
                if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                    raise ValueError(f"steps must be non-negative ints (forward calls of the model), got {s!r}; "
                                     f"use resolve_steps(selection, num_steps) to turn negative indices into these")
        self.steps = None if steps is None else sorted(set(steps))
        if heads is not None and not isinstance(heads, int):
            heads = list(heads)
        if isinstance(heads, bool) or (isinstance(heads, int) and heads < 1):
            raise ValueError(f"heads must be None (all), a positive count or a list of head indices, got {heads!r}")
        self.heads = heads
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
            raise ValueError(f"batch_index must be a non-negative int, got {batch_index!r}")
        self.batch_index = batch_index
        self.store_device = torch.device(store_device)
        self.captures: list[CapturedAttention] = []
        self.num_calls = 0
        self._handles = []
        self._active_modes: dict[int, _SDPARecorder] = {}
        self._recorded_this_call: dict[int, CapturedAttention] = {}

    # -- hooks ---------------------------------------------------------------------------------------------
    def _step(self) -> int:
        return self.num_calls - 1

    def _wanted(self) -> bool:
        return self.num_calls > 0 and (self.steps is None or self._step() in self.steps)

    def _model_pre_hook(self, module, args):
        self.num_calls += 1
        self._recorded_this_call.clear()

    def _select_heads(self, num_heads: int) -> list[int]:
        if self.heads is None:
            return list(range(num_heads))
        if isinstance(self.heads, int):
            n = min(self.heads, num_heads)
            return sorted({round(i * (num_heads - 1) / max(n - 1, 1)) for i in range(n)})
        bad = [h for h in self.heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"heads {bad} do not exist: the layer has {num_heads} heads (0..{num_heads - 1})")
        return sorted(set(self.heads))

    def _record(self, index: int, name: str, q, k, v, scale, source: str, own=None) -> None:
        if index in self._recorded_this_call:
            # The layer's first self-attention call of this step is the one analysed, except that an SLA
            # record replaces an SDPA record of the same call: a layer wrapped with
            # sla.integrations.sdpa routes its SDPA call into its SLA module, and only the latter knows
            # the projection.
            previous = self._recorded_this_call[index]
            if not (source == "sla" and previous.source == "sdpa"):
                return
            self.captures = [c for c in self.captures if c is not previous]
        if q.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[2] != v.shape[2]:
            raise ValueError(f"layer {name}: expected (B, H, L, D) q, k, v with the same heads, got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if self.batch_index >= q.shape[0]:
            raise ValueError(f"batch_index={self.batch_index} but layer {name} ran with batch size {q.shape[0]}")
        heads = self._select_heads(q.shape[1])
        idx = torch.tensor(heads, device=q.device)

        def keep(x):
            return x[self.batch_index].index_select(0, idx).detach().to(self.store_device, copy=True)

        if own is not None and own.mass_offset is not None:
            # The offsets of the captured heads, in their order; a shared offset (one for all heads) is repeated.
            full = own.mass_offset if own.mass_offset.numel() > 1 else own.mass_offset.repeat(q.shape[1])
            own = dataclasses.replace(own, mass_offset=full[torch.tensor(heads)])

        record = CapturedAttention(
            layer_name=name, layer_index=index, step=self._step(), q=keep(q), k=keep(k), v=keep(v), heads=heads,
            num_heads=q.shape[1], scale=None if scale is None else float(scale), source=source, own_projection=own)
        self._recorded_this_call[index] = record
        self.captures.append(record)

    def _attention_pre_hook(self, index: int, name: str):
        def hook(module, args):
            if not self._wanted():
                return

            def on_sdpa(bound):
                q, k = bound["query"], bound["key"]
                if k.shape[-2] != q.shape[-2]:
                    return  # an extra cross-attention inside this module (e.g. Wan I2V image tokens)
                if bound.get("attn_mask") is not None or bound.get("is_causal"):
                    raise ValueError(f"layer {name} calls attention with a mask or is_causal=True; sla.analysis "
                                     f"measures unmasked self-attention only")
                # A module wrapped with sla.integrations.sdpa routes this very call into SLA with the
                # parameters of its `sla` submodule: record it as an SLA call with that projection.
                router = getattr(module, "_sla_sdpa_router", None)
                if router is not None and getattr(router, "enabled", False) and _sla_child(module) is not None:
                    self._record(index, name, q, k, bound["value"], bound.get("scale"), "sla",
                                 _own_projection(_sla_child(module)))
                else:
                    self._record(index, name, q, k, bound["value"], bound.get("scale"), "sdpa")

            mode = _SDPARecorder(on_sdpa)
            mode.__enter__()
            self._active_modes[index] = mode
        return hook

    def _attention_post_hook(self, index: int):
        def hook(module, args, output):
            mode = self._active_modes.pop(index, None)
            if mode is not None:
                mode.__exit__(None, None, None)
        return hook

    def _sla_pre_hook(self, index: int, name: str):
        def hook(module, args, kwargs):
            if not self._wanted():
                return
            q, k, v = (list(args) + [kwargs.get(n) for n in ("q", "k", "v")[len(args):]])[:3]
            self._record(index, name, q, k, v, None, "sla", _own_projection(module))
        return hook

    # -- context -------------------------------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook))
        for index, name, module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._attention_pre_hook(index, name)))
            self._handles.append(module.register_forward_hook(self._attention_post_hook(index), always_call=True))
            sla = _sla_child(module)
            if sla is not None:
                self._handles.append(sla.register_forward_pre_hook(self._sla_pre_hook(index, name),
                                                                   with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for mode in self._active_modes.values():
            mode.__exit__(None, None, None)
        self._active_modes.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_complete(self) -> None:
        """Raise ``ValueError`` if a requested (layer, step) was not recorded, saying why."""
        if self.num_calls == 0:
            raise ValueError("the model was never called inside the capture; run the model (or pipeline) inside "
                             "`with AttentionCapture(...)`")
        if self.steps is not None and self.steps[-1] >= self.num_calls:
            missing = [s for s in self.steps if s >= self.num_calls]
            raise ValueError(f"steps {missing} were requested but the model was called only {self.num_calls} times "
                             f"(valid steps: 0..{self.num_calls - 1})")
        got = {(c.layer_index, c.step) for c in self.captures}
        steps = self.steps if self.steps is not None else list(range(self.num_calls))
        for index, name, _ in self.layers:
            for s in steps:
                if (index, s) not in got:
                    raise ValueError(
                        f"layer {name} ran at step {s} without a self-attention call that sla.analysis can see: it "
                        f"did not call torch.nn.functional.scaled_dot_product_attention (nor an SLA module). Use "
                        f"diffusers' native attention backend while analysing (model.set_attention_backend('native') "
                        f"or DIFFUSERS_ATTN_BACKEND=native)")
