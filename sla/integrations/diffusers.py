"""SLA in diffusers video DiTs: replace the self-attention of every transformer block, keep cross-attention dense.

Supported families (recognised by the attention module and its processor, not by the model class, so the
same call works on the base model, VACE variants and user subclasses):

* **Wan2.1 / Wan2.2** (``WanTransformer3DModel``, T2V, I2V and TI2V; also ``WanVACETransformer3DModel``):
  every ``WanAttention`` with ``is_cross_attention=False`` (``blocks[i].attn1``) gets SLA. ``attn2`` (text
  cross-attention, plus the I2V image tokens through ``add_k_proj``/``add_v_proj``) is not touched.
* **CogVideoX** (``CogVideoXTransformer3DModel``, 2B/5B/1.5, T2V and I2V): each block has one *joint*
  attention over the concatenated ``[text (226 tokens); video]`` sequence, with no separate cross-attention.
  That joint attention is the model's self-attention and SLA runs over the whole joint sequence (text tokens
  are simply the first key/query blocks; the sparse branch keeps them exact whenever their blocks score high).

q and k reach SLA after the model's own QK-norm and RoPE, exactly where the dense kernel would see them,
as ``(B, H, L, D)`` views of diffusers' ``(B, L, H, D)`` tensors (a transpose, no copy).

Each patched attention module owns one :class:`~sla.SparseLinearAttention` as the submodule ``attn.sla``,
with its own float32 zero-initialised ``proj`` (``Linear(head_dim, head_dim)``, shared by the heads of that
layer). Being a submodule, it appears in ``named_parameters()`` / ``state_dict()`` as
``blocks.{i}.attn1.sla.proj.weight`` / ``.bias``, follows ``.to()`` / ``.cuda()``, and is seen by optimizers,
FSDP, PEFT and ``torch.compile``. The attention *processor* holds no parameters; it only routes.

Weights: :func:`save_sla` / :func:`load_sla` write/read ``sla_config.json`` + ``sla_weights.safetensors`` in a
directory (the same one ``save_pretrained`` uses, if you like); see ``docs/integration.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._paths import atomic_path, atomic_write_text
from ._common import check_head_dim, check_integration_config, make_sla_module

SLA_ATTRIBUTE = "sla"  # name of the SLA submodule on each patched attention module
CONFIG_NAME = "sla_config.json"
WEIGHTS_NAME = "sla_weights.safetensors"
_FORMAT = "sla-diffusers"
_FORMAT_VERSION = 1
_CONTROLLER_ATTRIBUTE = "_sla_controller"
_KNOWN_BACKENDS = ("auto", "torch", "triton", "reference")


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sla.apply_sla needs diffusers; install it with `pip install 'sparse-linear-attention[diffusers]'`"
        ) from err


# --------------------------------------------------------------------------------------------------------------
# Configuration and shared state
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SLAConfig:
    """What :func:`apply_sla` installed; written to ``sla_config.json`` by :func:`save_sla`."""

    critical: float = 0.05
    negligible: float = 0.10
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    linear_scope: str = "marginal"
    backend: str = "auto"
    combine: str = "mass"
    keep_proj_fp32: bool = True
    dense_layers: tuple = ()
    dense_timestep_threshold: float | None = None
    token_tile: tuple | None = None  # None: raster token order; (tf, th, tw): blocks over 3D tiles (sla/ops/sla/tiles.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["token_tile"] = None if self.token_tile is None else list(self.token_tile)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SLAConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SLA config keys {sorted(unknown)}; this file was written by a newer version")
        d = dict(d)
        d["dense_layers"] = tuple(d.get("dense_layers", ()))
        if isinstance(d.get("token_tile"), list):  # JSON has no tuples
            d["token_tile"] = tuple(d["token_tile"])
        # Files written before the combine option existed hold the paper's rule, whatever today's default is.
        d.setdefault("combine", "paper")
        return cls(**d)


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
        from ..ops.sla.tiles import tile_permutation

        if self.grid is None or self.grid[0] * self.grid[1] * self.grid[2] != seq_len:
            raise ValueError(
                f"token_tile={self.config.token_tile}: the attention got {seq_len} tokens but the model's latents "
                f"give a grid of {self.grid} tokens; token tiles need the self-attention to see exactly the video "
                f"tokens of the model's input (apply SLA without token_tile otherwise)")
        key = (self.grid, str(device))
        if key not in self._tile_orders:
            self._tile_orders[key] = tile_permutation(self.grid, self.config.token_tile, device=device)
        return self._tile_orders[key]


# --------------------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------------------


class _SLAProcessorBase:
    """Routes one self-attention layer to ``attn.sla``; falls back to the *original* processor only when SLA is
    switched off on purpose (:func:`sla_disabled`, dense denoising steps). It keeps the original processor so
    :func:`remove_sla` can put the very same object back, and forwards diffusers' ``_attention_backend`` /
    ``_parallel_config`` to it (``set_attention_backend`` still controls the dense path, and diffusers' context
    parallelism reaches the dense path through the original processor; the SLA path reads the same config, see
    :mod:`sla.integrations.context_parallel`)."""

    # Whether this processor runs SLA under diffusers' Ulysses context parallelism (Wan: yes; CogVideoX: no).
    supports_context_parallel = False

    def __init__(self, original, controller: _SLAController, layer_index: int):
        self.original = original
        self.controller = controller
        self.layer_index = layer_index

    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.original._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.original._parallel_config = value

    def _check_call(self, attention_mask):
        if attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} (layer {self.layer_index}) got an attention_mask; SLA has no masking. "
                f"Run this call dense with `with sla.integrations.diffusers.sla_disabled(model): ...`"
            )
        if self._parallel_config is not None and not self.supports_context_parallel:
            from .context_parallel import ulysses_group

            if ulysses_group(self._parallel_config, type(self).__name__) is not None:
                raise NotImplementedError(
                    f"{type(self).__name__} (layer {self.layer_index}): context parallelism is not supported with SLA "
                    f"in this model family (its joint text+video sequence is not split the way Ulysses expects); call "
                    f"sla.remove_sla(model) first or run without context parallelism"
                )

    def _attend(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
        """Self-attention core on ``(B, H, L, D)`` tensors: the layer's ``attn.sla`` module. ``kwargs``: ``heads``
        (the slice of the layer's heads that the tensors hold) under context parallelism. With ``token_tile`` the
        tokens are listed tile by tile for SLA (its blocks become 3D tiles) and the output is put back in order."""
        sla = getattr(attn, SLA_ATTRIBUTE)
        if self.controller.config.token_tile is None:
            return sla(query, key, value, **kwargs)
        from ..ops.sla.tiles import permute_tokens

        perm, inv = self.controller.tile_order(query.shape[2], query.device)
        out = sla(*(permute_tokens(t, perm, inv) for t in (query, key, value)), **kwargs)
        return permute_tokens(out, inv, perm)

    def _attend_sequence_shards(self, attn, query, key, value) -> torch.Tensor:
        """Self-attention on diffusers' ``(B, L, H, D)`` tensors; returns ``(B, L, H * D)``.

        Without context parallelism ``L`` is every token: SLA runs on ``(B, H, L, D)`` views. Under diffusers'
        Ulysses context parallelism (``_parallel_config``) ``L`` is this rank's shard of the tokens: one all-to-all
        gives the rank every token of ``H / N`` heads, SLA runs on those (the same computation as one process for
        these heads), and a second all-to-all returns this rank's tokens with every head."""
        group = None
        if self._parallel_config is not None:
            from .context_parallel import ulysses_group

            group = ulysses_group(self._parallel_config, f"{type(self).__name__} (layer {self.layer_index})")
        if group is None:
            out = self._attend(attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            return out.transpose(1, 2).flatten(2, 3)
        import torch.distributed as dist

        from .context_parallel import heads_to_sequence, sequence_to_heads

        rank = dist.get_rank(group)
        q, k, v = sequence_to_heads([query, key, value], group)
        per_rank = q.shape[1]
        out = self._attend(attn, q, k, v, heads=slice(rank * per_rank, (rank + 1) * per_rank))
        return heads_to_sequence(out, group).flatten(2, 3)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_index}, original={type(self.original).__name__})"


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair RoPE, the same arithmetic as diffusers' WanAttnProcessor so that SLA at critical=1
    # reproduces the dense model bit for bit up to the attention kernel.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSLAAttnProcessor(_SLAProcessorBase):
    """SLA processor for the self-attention (``attn1``) of a diffusers ``WanAttention``.

    Same computation as ``WanAttnProcessor`` for self-attention (q/k/v projections, fused or not; RMSNorm over
    all heads; Wan RoPE; output projection), with the attention core replaced by ``attn.sla`` on
    ``(B, H, L, D)`` views. SLA variant: whatever ``attn.sla`` is configured with (default: the paper's, critical
    5%, negligible 10%, softmax feature map, linear branch over marginal blocks).

    Under diffusers' Ulysses context parallelism (``enable_parallelism`` with ``ContextParallelConfig(
    ulysses_degree=N)``, or :func:`sla.integrations.context_parallel.enable_context_parallel`) the layer receives
    this rank's shard of the tokens and exchanges q, k, v with the other ranks of its group so that SLA sees every
    token of ``H / N`` heads (see :mod:`sla.integrations.context_parallel`); ring attention is refused.
    """

    supports_context_parallel = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not self.controller.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None:
            raise ValueError(
                f"WanSLAAttnProcessor (layer {self.layer_index}) is installed on a self-attention layer but received "
                f"encoder_hidden_states; SLA replaces self-attention only, cross-attention must stay on "
                f"WanAttnProcessor"
            )
        self._check_call(attention_mask)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)

        hidden_states = self._attend_sequence_shards(attn, query, key, value).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class CogVideoXSLAAttnProcessor(_SLAProcessorBase):
    """SLA processor for CogVideoX's joint text+video attention (``CogVideoXBlock.attn1``).

    Same computation as ``CogVideoXAttnProcessor2_0`` (and its fused variant): concatenate ``[text; video]``,
    project, per-head LayerNorm on q/k, RoPE on the video part, attention over the *joint* sequence, output
    projection, split back. Only the attention core is SLA, on ``(B, H, L_text + L_video, D)`` views.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if not self.controller.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check_call(attention_mask)
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, L, D) view
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        out = self._attend(attn, query, key, value)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


# --------------------------------------------------------------------------------------------------------------
# Recognising self-attention layers
# --------------------------------------------------------------------------------------------------------------


def _families():
    """``[(family, matches(module) -> bool, accepted original processor types, SLA processor class)]``."""
    _import_diffusers()
    from diffusers.models.attention_processor import (
        Attention,
        CogVideoXAttnProcessor2_0,
        FusedCogVideoXAttnProcessor2_0,
    )
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    def is_wan_self(m):
        return isinstance(m, WanAttention) and not m.is_cross_attention

    def is_cogvideox_joint(m):
        return (isinstance(m, Attention) and not m.is_cross_attention
                and isinstance(m.processor, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0)))

    return [
        ("wan", is_wan_self, (WanAttnProcessor,), WanSLAAttnProcessor),
        ("cogvideox", is_cogvideox_joint, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
         CogVideoXSLAAttnProcessor),
    ]


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile(model) wraps it; patch the real module so parameter names stay those of the model.
    return getattr(model, "_orig_mod", model)


def find_self_attention_layers(model: nn.Module) -> list:
    """``[(module_name, attention_module, family)]`` for every self-attention layer SLA can replace, in model
    order (entry ``i`` is in ``model.blocks[i]`` for Wan, ``model.transformer_blocks[i]`` for CogVideoX).
    Layers already patched by :func:`apply_sla` are listed too."""
    model = _unwrap(model)
    found = []
    families = _families()
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        for family, matches, _, sla_cls in families:
            if isinstance(processor, sla_cls) or matches(module):
                found.append((name, module, family))
                break
    return found


def _head_dim(attn) -> int:
    return attn.to_q.out_features // attn.heads if hasattr(attn, "to_q") else attn.inner_dim // attn.heads


# --------------------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------------------


def apply_sla(
    model: nn.Module,
    critical: float = 0.05,
    negligible: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    *,
    combine: str = "mass",
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
        combine: ``"paper"`` (``o_s + Proj(o_l)``, zero-initialised Proj) or ``"mass"`` (``a o_s + (1 - a)
            Proj(o_l)``, identity-initialised Proj and a per-head ``mass_offset``), see
            :class:`~sla.SparseLinearAttention`.
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
    check_integration_config(critical, negligible, block_q, block_k, feature_map, linear_scope)
    if backend not in _KNOWN_BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {_KNOWN_BACKENDS}")
    from ..ops.sla.validation import COMBINE_RULES

    if combine not in COMBINE_RULES:
        raise ValueError(f"combine={combine!r} is unknown; choose one of {COMBINE_RULES}")
    if dense_timestep_threshold is not None and (
            isinstance(dense_timestep_threshold, bool) or not isinstance(dense_timestep_threshold, (int, float))):
        raise TypeError(f"dense_timestep_threshold must be a number or None, got {dense_timestep_threshold!r}")
    from ..ops.sla.tiles import check_token_tile

    token_tile = check_token_tile(token_tile)
    root = _unwrap(model)
    if getattr(root, _CONTROLLER_ATTRIBUTE, None) is not None:
        raise ValueError("SLA is already applied to this model; call sla.remove_sla(model) first to change settings")

    layers = find_self_attention_layers(root)
    if not layers:
        raise ValueError(
            f"{type(root).__name__} has no self-attention layer that sla.apply_sla recognises (supported: diffusers "
            f"Wan2.1/2.2 WanAttention, CogVideoX joint attention). For other modules that call "
            f"torch.nn.functional.scaled_dot_product_attention use sla.integrations.sdpa.wrap_sdpa_self_attention"
        )
    families = {f: (accepted, cls) for f, _, accepted, cls in _families()}
    kinds = {fam for _, _, fam in layers}
    if len(kinds) > 1:
        raise ValueError(f"model mixes attention families {sorted(kinds)}; apply SLA to each sub-model separately")
    family = kinds.pop()
    if token_tile is not None and family != "wan":
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

    accepted, sla_cls = families[family]
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

    config = SLAConfig(critical=float(critical), negligible=float(negligible), block_q=block_q, block_k=block_k,
                       feature_map=feature_map, linear_scope=linear_scope, backend=backend, combine=combine,
                       keep_proj_fp32=bool(keep_proj_fp32), dense_layers=tuple(sorted(dense)),
                       dense_timestep_threshold=None if dense_timestep_threshold is None
                       else float(dense_timestep_threshold), token_tile=token_tile)
    controller = _SLAController(config=config, family=family)
    for i, (name, attn, _) in enumerate(layers):
        if i in dense:
            continue
        ref = attn.to_q.weight
        sla_module = make_sla_module(
            _head_dim(attn), critical=critical, negligible=negligible, block_q=block_q, block_k=block_k,
            feature_map=feature_map, linear_scope=linear_scope, backend=backend, keep_proj_fp32=keep_proj_fp32,
            combine=combine, num_heads=attn.heads)
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
    object.__setattr__(root, _CONTROLLER_ATTRIBUTE, controller)
    return model


def is_sla_applied(model: nn.Module) -> bool:
    """True if :func:`apply_sla` patched ``model`` (and :func:`remove_sla` has not been called since)."""
    return getattr(_unwrap(model), _CONTROLLER_ATTRIBUTE, None) is not None


def _controller(model: nn.Module) -> _SLAController:
    controller = getattr(_unwrap(model), _CONTROLLER_ATTRIBUTE, None)
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
    object.__delattr__(root, _CONTROLLER_ATTRIBUTE)
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


# --------------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------------


def _sla_state(model: nn.Module) -> dict:
    """``{full parameter name: tensor}`` of every SLA parameter, names as in ``model.state_dict()``."""
    state = {}
    for name, module in sla_modules(model).items():
        for pname, tensor in module.state_dict().items():
            state[f"{name}.{SLA_ATTRIBUTE}.{pname}"] = tensor
    return state


def save_sla(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the SLA settings and weights of ``model`` into directory ``path`` (created if missing):
    ``sla_config.json`` (settings, family, patched layer names) and ``sla_weights.safetensors`` (every
    ``...sla.proj.weight/bias``, in its stored dtype). Both files are written atomically. Only SLA's own
    parameters are saved: save the rest with ``model.save_pretrained(path)`` (same directory is fine)."""
    from safetensors.torch import save_file

    controller = _controller(model)
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"save_sla writes a directory, but {path!r} is a file; pass a directory path")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _sla_state(model).items()}
    from .. import __version__

    meta = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "sla_version": __version__,
        "family": controller.family,
        "model_class": type(_unwrap(model)).__name__,
        "layers": list(controller.layer_names),
        "config": controller.config.to_dict(),
    }
    with atomic_path(os.path.join(path, WEIGHTS_NAME)) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(os.path.join(path, CONFIG_NAME), json.dumps(meta, indent=2) + "\n")


def read_sla_config(path: str | os.PathLike) -> dict:
    """Parse and check ``path/sla_config.json`` written by :func:`save_sla`.

    Raises ``ValueError`` naming the file for anything but a well-formed config of this format: a missing
    file, invalid JSON (with line and column), another format, or a missing or mistyped ``config``, ``family``
    or ``layers`` entry.
    """
    cfg_path = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path!r} does not exist; save_sla(model, {os.fspath(path)!r}) writes it")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); it is "
                         f"damaged or was edited by hand: fix it, or write it again with sla.save_sla") from None
    except UnicodeDecodeError:
        raise ValueError(f"{cfg_path!r} is not UTF-8 text; it is not an SLA config written by sla.save_sla") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{cfg_path!r} is not an SLA config of format {_FORMAT} v{_FORMAT_VERSION}")
    for key, kind in (("config", dict), ("family", str), ("layers", list)):
        if key not in meta:
            raise ValueError(f"{cfg_path!r} lacks {key!r}; it is incomplete: write it again with sla.save_sla")
        if not isinstance(meta[key], kind) or (key == "layers" and not all(isinstance(n, str) for n in meta[key])):
            what = "list of strings" if key == "layers" else kind.__name__
            raise ValueError(f"{cfg_path!r}: {key!r} must be a JSON {what}, got {meta[key]!r}")
    return meta


def _saved_settings(meta: dict, cfg_path: str) -> SLAConfig:
    """The ``config`` entry as an :class:`SLAConfig`, with every value checked as :func:`apply_sla` would."""
    try:
        saved = SLAConfig.from_dict(meta["config"])
        check_integration_config(saved.critical, saved.negligible, saved.block_q, saved.block_k, saved.feature_map,
                                 saved.linear_scope)
        if saved.backend not in _KNOWN_BACKENDS:
            raise ValueError(f"backend={saved.backend!r} is unknown; choose one of {_KNOWN_BACKENDS}")
        for idx in saved.dense_layers:
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise TypeError(f"dense_layers must hold ints (layer indices), got {idx!r}")
        from ..ops.sla.tiles import check_token_tile

        check_token_tile(saved.token_tile)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path!r}: invalid SLA settings: {e}") from None
    return saved


def _plan_load(model: nn.Module, path: str | os.PathLike, meta: dict, saved: SLAConfig) -> dict:
    """Check everything :func:`load_sla` will write, changing nothing: the family, the patched layers, every
    tensor's name, shape, dtype (floating) and values (finite). Returns ``{parameter name: tensor}``."""
    from safetensors.torch import load_file

    folder = os.fspath(path)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    root = _unwrap(model)
    layers = find_self_attention_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no self-attention layer that SLA recognises (Wan, CogVideoX), "
                         f"but {cfg_path!r} was saved from a {meta['family']!r} model; load it into that model")
    families = {family for _, _, family in layers}
    if families != {meta["family"]}:
        raise ValueError(f"{cfg_path!r} was saved from a {meta['family']!r} model, but {type(root).__name__} is a "
                         f"{'/'.join(sorted(families))!r} model; load it into the kind of model it was saved from")
    n = len(layers)
    if is_sla_applied(root):
        names = list(_controller(root).layer_names)
    else:
        for idx in saved.dense_layers:
            if not -n <= idx < n:
                raise ValueError(f"{cfg_path!r}: dense_layers index {idx} is out of range for this model's {n} "
                                 f"self-attention layers; was it saved from another architecture?")
        dense = {idx % n for idx in saved.dense_layers}
        names = [name for i, (name, _, _) in enumerate(layers) if i not in dense]
    if names != list(meta["layers"]):
        raise ValueError(f"the model's SLA layers {names[:3]}... differ from the saved ones {meta['layers'][:3]}... in "
                         f"{cfg_path!r}; was it saved from another architecture?")

    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise ValueError(f"{weights_path!r} does not exist; save_sla writes it next to {CONFIG_NAME}")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # noqa: BLE001 - whatever safetensors raises, the file cannot be used
        raise ValueError(f"{weights_path!r} is not a readable safetensors file ({e}); write it again with "
                         f"sla.save_sla") from None

    # What each layer holds: its SLA module's state_dict (a template of the layer's head_dim, built on the meta
    # device so that nothing is allocated), named as in model.state_dict().
    attn_by_name = {name: attn for name, attn, _ in layers}
    expected = {}
    for name in names:
        template = make_sla_module(
            _head_dim(attn_by_name[name]), critical=saved.critical, negligible=saved.negligible,
            block_q=saved.block_q, block_k=saved.block_k, feature_map=saved.feature_map,
            linear_scope=saved.linear_scope, backend=saved.backend, keep_proj_fp32=saved.keep_proj_fp32,
            combine=saved.combine, num_heads=attn_by_name[name].heads, device="meta")
        for pname, tensor in template.state_dict().items():
            expected[f"{name}.{SLA_ATTRIBUTE}.{pname}"] = tuple(tensor.shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"SLA weights in {weights_path!r} do not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, shape in expected.items():
        src = tensors[name]
        if tuple(src.shape) != shape:
            raise ValueError(f"{name} in {weights_path!r}: saved shape {tuple(src.shape)} != model shape {shape}")
        if not src.is_floating_point():
            raise ValueError(f"{name} in {weights_path!r} has dtype {src.dtype}; SLA projections are floating point, "
                             f"so this file was not written by sla.save_sla or is damaged")
        bad = int((~torch.isfinite(src)).sum())
        if bad:
            raise ValueError(f"{name} in {weights_path!r} holds {bad} NaN/Inf value(s); loading them would make every "
                             f"output NaN. Re-export the weights from a healthy run")
    return {name: tensors[name] for name in expected}


def load_sla(model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Restore SLA from a directory written by :func:`save_sla`.

    Everything is checked before anything is written: the config (valid JSON, this format, valid settings,
    the model's family), the patched layers, and every tensor's name, shape, dtype (floating point) and
    values (no NaN/Inf). Any problem raises ``ValueError`` naming the file, and the model is left exactly as
    it came in, whether or not it already had SLA: there is no partial load.

    If ``model`` has no SLA yet, :func:`apply_sla` is called with the saved settings; if it has, the settings
    must match the saved ones. Then every saved ``proj`` tensor is copied into the model (into the parameter's
    dtype and device). ``backend`` (default: the saved one) picks the implementation; it is a run-time choice,
    not part of the weights, so it is not compared with an SLA already applied. Returns ``model``.
    """
    meta = read_sla_config(path)
    cfg_path = os.path.join(os.fspath(path), CONFIG_NAME)
    saved = _saved_settings(meta, cfg_path)
    if backend is not None and backend not in _KNOWN_BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {_KNOWN_BACKENDS}")
    if is_sla_applied(model):
        current = _controller(model).config
        if asdict(current) | {"backend": None} != asdict(saved) | {"backend": None}:
            raise ValueError(f"model already has SLA with settings {current} but {os.fspath(path)!r} holds {saved}; "
                             f"call sla.remove_sla(model) before load_sla")
    tensors = _plan_load(model, path, meta, saved)
    if is_sla_applied(model):
        _write_sla_weights(model, tensors)
        return model
    apply_sla(model, saved.critical, saved.negligible, saved.block_q, saved.block_k, saved.feature_map,
              saved.linear_scope, combine=saved.combine, dense_layers=saved.dense_layers,
              dense_timestep_threshold=saved.dense_timestep_threshold, keep_proj_fp32=saved.keep_proj_fp32,
              backend=saved.backend if backend is None else backend, token_tile=saved.token_tile)
    try:
        _write_sla_weights(model, tensors)
    except BaseException:
        remove_sla(model)  # leave the model as it came in, not patched with zero projections
        raise
    return model


def _write_sla_weights(model: nn.Module, tensors: dict) -> None:
    """Copy checked tensors (see :func:`_plan_load`) into the model's SLA parameters."""
    root = _unwrap(model)
    with torch.no_grad():
        for name, src in tensors.items():
            root.get_parameter(name).copy_(src)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CogVideoXSLAAttnProcessor",
    "SLAConfig",
    "WanSLAAttnProcessor",
    "apply_sla",
    "find_self_attention_layers",
    "is_sla_applied",
    "load_sla",
    "read_sla_config",
    "remove_sla",
    "save_sla",
    "set_sla_enabled",
    "sla_disabled",
    "sla_modules",
]
