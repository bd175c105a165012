"""Helpers for tests, yours and ours: a complete, tiny, randomly initialised Wan pipeline folder.

:func:`make_tiny_wan_pipeline` writes a folder laid out exactly like ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), with the
real diffusers and transformers classes at a few thousand parameters each, so that
``diffusers.WanPipeline.from_pretrained(path)`` loads it offline and runs it on a CPU in seconds. Nothing is
downloaded: the tokenizer is built here from a small character vocabulary.

Importing this module imports neither diffusers nor transformers; they are imported when the function runs.

    from sla.testing import make_tiny_wan_pipeline
    folder = make_tiny_wan_pipeline(tmp_path / "tiny-wan")            # Wan2.1 layout
    folder2 = make_tiny_wan_pipeline(tmp_path / "tiny-wan22", two_transformers=True)   # Wan2.2 A14B layout
"""

from __future__ import annotations

import os
import string
from pathlib import Path

# Sizes of the tiny pipeline. The transformer's head_dim (16) is one the SLA GPU kernels run, its patch is Wan's
# (1, 2, 2), and the VAE keeps Wan 2.1's compression (8x in space, 4x in time + 1 frame): only widths shrink.
TINY_Z_DIM = 4
TINY_TEXT_DIM = 32
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=TINY_Z_DIM,
                        out_channels=TINY_Z_DIM, text_dim=TINY_TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
# Latent statistics far from (0, 1), so that a missing or inverted normalisation shows in tests.
TINY_LATENTS_MEAN = [0.25, -0.5, 0.75, -0.1]
TINY_LATENTS_STD = [0.5, 2.0, 1.5, 0.8]
TINY_VAE = dict(base_dim=8, z_dim=TINY_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True], latents_mean=TINY_LATENTS_MEAN, latents_std=TINY_LATENTS_STD)
TINY_TEXT_ENCODER = dict(d_model=TINY_TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32)
# The scheduler settings the Wan2.1 Diffusers folders ship (UniPC over flow-matching sigmas, shift 3 for 480p).
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
                     solver_order=2, final_sigmas_type="zero")
# Wan2.2 A14B: the first transformer denoises timesteps >= 0.875 * 1000, the second the rest.
WAN22_BOUNDARY_RATIO = 0.875

_SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in UMT5's tokenizer


def make_tiny_tokenizer():
    """A sentencepiece-style (unigram, metaspace) tokenizer over a small character vocabulary.

    Like UMT5's, it pads with ``<pad>`` (id 0), ends every text with ``</s>`` (id 1) and maps what it does not
    know to ``<unk>``; words become their characters, so different prompts give different token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    # Unigram scores are log-probabilities; the word-start marker alone and plain characters are both common.
    vocab = [(t, 0.0) for t in _SPECIAL] + [("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    vocab += [("\u2581" + c, -3.5) for c in string.ascii_lowercase]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    # T5TokenizerFast is the class the Wan Diffusers folders name in model_index.json; extra_ids=0: no sentinels.
    return T5TokenizerFast(tokenizer_object=tk, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=512)


def make_tiny_wan_pipeline(path: str | os.PathLike, *, two_transformers: bool = False, seed: int = 0) -> Path:
    """Write a tiny random Wan text-to-video pipeline folder at ``path`` and return it.

    Args:
        path: folder to create; it must not exist yet or be empty (nothing is overwritten).
        two_transformers: also write ``transformer_2/`` and ``boundary_ratio`` = 0.875 in ``model_index.json``,
            the Wan2.2 A14B layout (the first transformer denoises the high-noise steps, the second the rest).
        seed: the random initialisation (the same seed gives the same weights).

    The folder has the real classes: ``WanTransformer3DModel`` (2 layers, 2 heads of 16, patch (1, 2, 2),
    ``in_channels`` = the VAE's ``z_dim`` = 4), ``AutoencoderKLWan`` (Wan 2.1's 8x spatial / 4x temporal layout at
    ``base_dim`` 8, with latent statistics far from 0 and 1), ``UMT5EncoderModel`` (1 layer, ``d_model`` 32 = the
    transformer's ``text_dim``), a ``T5TokenizerFast``, and ``UniPCMultistepScheduler`` configured as Wan2.1 ships it.
    Videos must have ``height`` and ``width`` multiples of 16 and ``4k + 1`` frames, as for the real model.
    """
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"make_tiny_wan_pipeline: {path} exists and is not an empty folder; pass a new path")
    tokenizer = make_tiny_tokenizer()
    vocab_size = len(tokenizer)
    # fork_rng: building the pipeline must not move the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
        transformer_2 = WanTransformer3DModel(**TINY_TRANSFORMER) if two_transformers else None
        vae = AutoencoderKLWan(**TINY_VAE)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1,
                                                   decoder_start_token_id=0, **TINY_TEXT_ENCODER))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER), transformer=transformer.eval(),
                       transformer_2=None if transformer_2 is None else transformer_2.eval(),
                       boundary_ratio=WAN22_BOUNDARY_RATIO if two_transformers else None)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


__all__ = ["make_tiny_tokenizer", "make_tiny_wan_pipeline", "TINY_LATENTS_MEAN", "TINY_LATENTS_STD", "TINY_TEXT_DIM",
           "TINY_Z_DIM"]
