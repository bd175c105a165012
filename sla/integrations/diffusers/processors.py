"""The attention processors that route a diffusers self-attention layer to its ``attn.sla`` module (Wan,
CogVideoX). They hold no parameters; the per-model state is the :class:`~.config._SLAController` they share."""

from __future__ import annotations

import torch

from .._common import SLA_ATTRIBUTE


class _SLAProcessorBase:
    """Routes one self-attention layer to ``attn.sla``; falls back to the *original* processor only when SLA is
    switched off on purpose (:func:`sla_disabled`, dense denoising steps). It keeps the original processor so
    :func:`remove_sla` can put the very same object back, and forwards diffusers' ``_attention_backend`` /
    ``_parallel_config`` to it (``set_attention_backend`` still controls the dense path, and diffusers' context
    parallelism reaches the dense path through the original processor; the SLA path reads the same config, see
    :mod:`sla.integrations.context_parallel`)."""

    # Whether this processor runs SLA under diffusers' Ulysses context parallelism (Wan: yes; CogVideoX: no).
    supports_context_parallel = False

    def __init__(self, original, controller, layer_index: int):
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
            from ..context_parallel import ulysses_group

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
        from ...ops.sla.tiles import permute_tokens

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
            from ..context_parallel import ulysses_group

            group = ulysses_group(self._parallel_config, f"{type(self).__name__} (layer {self.layer_index})")
        if group is None:
            out = self._attend(attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            return out.transpose(1, 2).flatten(2, 3)
        import torch.distributed as dist

        from ..context_parallel import heads_to_sequence, sequence_to_heads

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
