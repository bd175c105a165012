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

from .apply import apply_sla, is_sla_applied, remove_sla, set_sla_enabled, sla_disabled, sla_modules
from .._common import SLA_ATTRIBUTE
from .config import CONFIG_NAME, WEIGHTS_NAME, SLAConfig
from .families import find_self_attention_layers
from .processors import CogVideoXSLAAttnProcessor, WanSLAAttnProcessor
from .saving import load_sla, read_sla_config, save_sla

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CogVideoXSLAAttnProcessor",
    "SLA_ATTRIBUTE",
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
