"""``scripts/prepare_latents.py videos`` end to end on CPU, with a tiny random Wan pipeline folder.

No weights are downloaded: the pipeline folder is built here from tiny configs of the same classes the Wan
2.1 pipeline ships (``diffusers.AutoencoderKLWan``, ``transformers.UMT5EncoderModel``, a fast tokenizer
loaded by ``AutoTokenizer``), saved with ``save_pretrained`` and read back by the script. The clips are
designed so that the expected pixels after resize + centre crop are known exactly (a solid colour per frame
inside the crop window, differently coloured strips outside it), so the stored latents are checked against
an encoding made here, not against the script's own frame reader.

Nothing is skipped when a dependency is missing: diffusers and pillow are in the ``test`` extra, and
transformers (with tokenizers) is installed by peft, which is in it too.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

Z_DIM = 4
TEXT_DIM = 16  # the tiny UMT5's d_model (= the tiny Wan's text_dim in tests/_training_utils.py)
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [0.5, 2.0, 1.5, 1.0]
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "ball", "moves", "left", "blue", "square", "spins", "slowly", "and",
         "then", "fast"]
FRAMES, HEIGHT, WIDTH, TEXT_LEN = 5, 64, 64, 8

# Per-frame colours inside the crop window; the strips outside it use BORDER. 6 (gif) and 7 (png) source frames:
# the script keeps the first FRAMES.
GIF_COLOURS = [(200, 30, 30), (180, 60, 40), (160, 90, 50), (140, 120, 60), (120, 150, 70), (100, 180, 80)]
PNG_COLOURS = [(20, 40, 220), (40, 60, 200), (60, 80, 180), (80, 100, 160), (100, 120, 140), (120, 140, 120),
               (140, 160, 100)]
BORDER = (0, 255, 0)
CAPTIONS = {"ball": "a red ball moves left", "spin": "a blue square spins slowly and then fast and then slowly"}


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_latents", ROOT / "scripts" / "prepare_latents.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_pipeline(folder: Path) -> Path:
    """A tiny random Wan pipeline folder: vae/, text_encoder/, tokenizer/ (each via save_pretrained)."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    # Wan 2.1's layout (3 spatial down-samplings, 2 temporal), at base_dim 8 and one res block per level.
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                           latents_std=LATENTS_STD)
    vae.save_pretrained(str(folder / "vae"))
    enc = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8,
                                      relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0))
    enc.save_pretrained(str(folder / "text_encoder"))
    # Word-level vocabulary; like the UMT5 tokenizer it appends </s> and pads with <pad> (id 0).
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder / "tokenizer"))
    return folder


def _frame(size_wh, colour, strips: str):
    """Solid ``colour`` with BORDER strips (10 source px) on the sides the centre crop removes."""
    img = Image.new("RGB", size_wh, colour)
    w, h = size_wh
    box = [(0, 0, 10, h), (w - 10, 0, w, h)] if strips == "lr" else [(0, 0, w, 10), (0, h - 10, w, h)]
    for b in box:
        img.paste(BORDER, b)
    return img


def _write_clips(folder: Path) -> Path:
    folder.mkdir()
    # Landscape gif 128 x 80 (W x H) -> scaled by 0.8 to 102 x 64 -> 19 px cropped from left and right.
    frames = [_frame((128, 80), c, "lr") for c in GIF_COLOURS]
    frames[0].save(folder / "ball.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    (folder / "ball.txt").write_text(CAPTIONS["ball"] + "\n")
    # Portrait PNG frames 80 x 128 -> 64 x 102 -> 19 px cropped from top and bottom.
    (folder / "spin").mkdir()
    for i, c in enumerate(PNG_COLOURS):
        _frame((80, 128), c, "tb").save(folder / "spin" / f"{i:03d}.png")
    (folder / "spin.txt").write_text(CAPTIONS["spin"])
    # Not encoded: a clip without caption and a caption without clip.
    frames[0].save(folder / "orphan.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    (folder / "notes.txt").write_text("not a caption of any clip")
    return folder


def _expected_video(colours) -> torch.Tensor:
    """(1, 3, FRAMES, HEIGHT, WIDTH) in [-1, 1]: each kept frame is its solid colour."""
    c = torch.tensor(colours[:FRAMES], dtype=torch.float32) / 127.5 - 1.0  # (F, 3)
    return c.t()[None, :, :, None, None].expand(1, 3, FRAMES, HEIGHT, WIDTH).contiguous()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    pipe = _build_pipeline(root / "pipe")
    clips = _write_clips(root / "clips")
    out = root / "latents"
    script = _load_script()
    rc = script.main(["videos", "--pipeline", str(pipe), "--input", str(clips), "--out", str(out),
                      "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
                      "--text-len", str(TEXT_LEN), "--device", "cpu"])
    assert rc == 0
    return dict(root=root, pipe=pipe, clips=clips, out=out, script=script)


def test_frame_reader_resizes_crops_and_keeps_first_frames(prepared):
    script, clips = prepared["script"], prepared["clips"]
    for name, colours in (("ball.gif", GIF_COLOURS), ("spin", PNG_COLOURS)):
        video = script._read_clip(clips / name, FRAMES, HEIGHT, WIDTH)
        assert video.shape == (3, FRAMES, HEIGHT, WIDTH) and video.dtype == torch.float32
        # Inside the crop window every pixel is the frame's colour (to one 8-bit step: resampling rounds);
        # the BORDER strips are cropped away, so the crop is centred and keeps the aspect ratio.
        torch.testing.assert_close(video, _expected_video(colours)[0], atol=1.01 / 127.5, rtol=0)


def test_videos_writes_one_normalised_latent_per_captioned_clip(prepared):
    from diffusers import AutoencoderKLWan

    from sla.data import LatentsDataset

    out, pipe = prepared["out"], prepared["pipe"]
    assert sorted(p.name for p in out.iterdir()) == ["ball.safetensors", "spin.safetensors"]  # no temp files
    ds = LatentsDataset(out)
    assert len(ds) == 2
    # The compression follows from the VAE's config: one 2x spatial down-sampling between dim_mult levels,
    # one 2x temporal down-sampling per True in temperal_downsample (the first frame is encoded alone).
    cfg = json.loads((pipe / "vae" / "config.json").read_text())
    spatial = 2 ** (len(cfg["dim_mult"]) - 1)
    temporal = 2 ** sum(cfg["temperal_downsample"])
    assert (spatial, temporal) == (8, 4)
    assert ds.latent_shape == (cfg["z_dim"], 1 + (FRAMES - 1) // temporal, HEIGHT // spatial, WIDTH // spatial)
    assert ds.text_shape == (TEXT_LEN, TEXT_DIM)

    vae = AutoencoderKLWan.from_pretrained(str(pipe / "vae")).eval()
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    for i, (name, colours) in enumerate((("ball", GIF_COLOURS), ("spin", PNG_COLOURS))):
        item = ds[i]
        assert item["caption"] == CAPTIONS[name]
        with torch.no_grad():
            mode = vae.encode(_expected_video(colours)).latent_dist.mode()
        expected = ((mode - mean) / std)[0]
        # One 8-bit step of resampling rounding in the input moves the latent by far less than this tolerance;
        # a missing or wrong normalisation (std up to 2, mean up to 0.3) moves it by far more.
        torch.testing.assert_close(item["video"], expected, atol=2e-3, rtol=1e-3)
        assert not torch.allclose(item["video"], mode[0], atol=0.05)


def test_videos_text_embeddings_zero_after_the_caption(prepared):
    from transformers import AutoTokenizer, UMT5EncoderModel

    from sla.data import LatentsDataset

    pipe = prepared["pipe"]
    ds = LatentsDataset(prepared["out"])
    tok = AutoTokenizer.from_pretrained(str(pipe / "tokenizer"))
    enc = UMT5EncoderModel.from_pretrained(str(pipe / "text_encoder")).eval()
    for i, name in enumerate(("ball", "spin")):
        t = tok([CAPTIONS[name]], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
        n = int(t.attention_mask.sum())
        # "ball": 5 words + </s> = 6 < TEXT_LEN; "spin" (11 words) is truncated to TEXT_LEN
        assert n == (6 if name == "ball" else TEXT_LEN)
        with torch.no_grad():
            ref = enc(t.input_ids, t.attention_mask).last_hidden_state[0]
        if n < TEXT_LEN:  # the encoder's output at padding positions is not zero by itself: the script zeroes it
            assert torch.count_nonzero(ref[n:]) > 0
        emb = ds[i]["text_embeds"]
        torch.testing.assert_close(emb[:n], ref[:n], atol=1e-5, rtol=1e-5)
        assert (emb[:n].abs().sum(1) > 0).all()
        assert torch.count_nonzero(emb[n:]) == 0


def test_videos_clear_errors(prepared, tmp_path):
    import shutil

    script, pipe, clips = prepared["script"], prepared["pipe"], prepared["clips"]

    def run(**kw):
        args = dict(pipeline=pipe, input=clips, out=tmp_path / "out", frames=FRAMES, height=HEIGHT, width=WIDTH)
        args.update(kw)
        argv = ["videos", "--text-len", str(TEXT_LEN), "--device", "cpu"]
        for k, v in args.items():
            argv += [f"--{k}", str(v)]
        return script.main(argv)

    with pytest.raises(ValueError, match=r"--frames must be 4k\+1"):
        run(frames=6)
    no_vae = tmp_path / "no_vae"
    no_vae.mkdir()
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(pipe / sub, no_vae / sub)
    with pytest.raises(FileNotFoundError, match=r"vae missing: --pipeline must be a diffusers Wan pipeline"):
        run(pipeline=no_vae)
    with pytest.raises(FileNotFoundError, match="--input .* is not a folder"):
        run(input=tmp_path / "nowhere")
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    shutil.copy(clips / "orphan.gif", uncaptioned / "orphan.gif")
    with pytest.raises(ValueError, match="no clips with captions"):
        run(input=uncaptioned)
    with pytest.raises(ValueError, match="--height must be a multiple of the VAE's spatial factor 8"):
        run(height=60)
    # ball.gif has 6 frames: 9 (= 4*2 + 1) is too many
    with pytest.raises(ValueError, match=r"ball.gif has 6 frames, fewer than --frames 9"):
        run(frames=9)


def test_finetune_two_steps_on_the_encoded_folder(prepared, tmp_path):
    """The folder feeds ``sla finetune --data FOLDER``: a tiny Wan whose channels are the VAE's z_dim and whose
    text_dim is the text encoder's d_model trains on it."""
    from _training_utils import TINY_WAN, tiny_config

    from sla.models.small_wan import build_small_model
    from sla.training.trainer import finetune

    # latents (4, 2, 8, 8) with Wan's (1, 2, 2) patches -> 2 * 4 * 4 = 32 tokens = 2 blocks of 16
    model_dir = tmp_path / "tiny_wan"
    build_small_model(seed=0, **{**TINY_WAN, "patch_size": (1, 2, 2), "in_channels": Z_DIM, "out_channels": Z_DIM,
                                 "text_dim": TEXT_DIM}).save_pretrained(str(model_dir))
    summary = finetune(tiny_config(model_dir, tmp_path / "run", data=str(prepared["out"]), steps=2, batch_size=2,
                                   save_every=0))
    assert summary["end_step"] == 2 and math.isfinite(summary["loss"]) and summary["loss"] > 0
    assert math.isfinite(summary["grad_norm"])
    assert (Path(summary["final"]) / "config.json").is_file()
