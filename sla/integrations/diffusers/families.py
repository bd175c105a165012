"""Which diffusers attention modules are self-attention layers SLA replaces, by family (Wan, CogVideoX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .processors import CogVideoXSLAAttnProcessor, WanSLAAttnProcessor


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sla.apply_sla needs diffusers; install it with `pip install 'sparse-linear-attention[diffusers]'`"
        ) from err


@dataclass(frozen=True)
class Family:
    """One kind of diffusers attention SLA replaces.

    ``name``: saved in ``sla_config.json`` (a config loads only into a model of its family). ``matches(module)``:
    is ``module`` a self-attention layer of this family. ``accepted``: the original processor types
    :func:`~sla.integrations.diffusers.apply_sla` replaces (any other processor is refused, never bypassed).
    ``processor``: the SLA processor class installed instead. ``token_tiles``: whether the layer's sequence is
    exactly the video grid of the model's input (then ``token_tile`` can reorder it).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    accepted: tuple
    processor: type
    token_tiles: bool


def _families() -> list[Family]:
    """The registry, built on first use (it names diffusers classes, and importing diffusers is slow)."""
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
        Family("wan", is_wan_self, (WanAttnProcessor,), WanSLAAttnProcessor, token_tiles=True),
        # CogVideoX's joint sequence is [text; video]: no single video grid to tile.
        Family("cogvideox", is_cogvideox_joint, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
               CogVideoXSLAAttnProcessor, token_tiles=False),
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
        for family in families:
            if isinstance(processor, family.processor) or family.matches(module):
                found.append((name, module, family.name))
                break
    return found


def _head_dim(attn) -> int:
    return attn.to_q.out_features // attn.heads if hasattr(attn, "to_q") else attn.inner_dim // attn.heads
