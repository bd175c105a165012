"""``sla prepare`` on CPU against a tiny random Wan pipeline folder (``sla.testing.make_tiny_wan_pipeline``).

The clips are designed so that the expected pixels after resize + centre crop are known exactly (a solid colour
per frame inside the crop window, differently coloured strips outside it), so the stored latents are checked
against an encoding made here from those expected pixels, not against the tool's own frame reader. GIF and PNG
frames are lossless; the mp4 path (lossy H.264) is checked for shape and in the end-to-end test.

Nothing is skipped when a dependency is missing: diffusers, transformers, pillow and av are in the ``test`` extra.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sla.cli import main
from sla.testing import TINY_LATENTS_MEAN, TINY_LATENTS_STD, TINY_TEXT_DIM, TINY_Z_DIM, make_tiny_wan_pipeline

ROOT = Path(__file__).resolve().parent.parent
FRAMES, HEIGHT, WIDTH, TEXT_LEN = 5, 64, 64, 16

# Per-frame colours inside the crop window; the strips outside it use BORDER. 6 (gif) and 7 (png) source frames:
# the tool keeps the first FRAMES (stride 1).
GIF_COLOURS = [(200, 30, 30), (180, 60, 40), (160, 90, 50), (140, 120, 60), (120, 150, 70), (100, 180, 80)]
PNG_COLOURS = [(20, 40, 220), (40, 60, 200), (60, 80, 180), (80, 100, 160), (100, 120, 140), (120, 140, 120),
               (140, 160, 100)]
BORDER = (0, 255, 0)
# "ball": 9 tokens with </s> (fits TEXT_LEN); "spin" is longer than TEXT_LEN tokens (truncated)
CAPTIONS = {"ball": "a red ball", "spin": "a blue square spins slowly and then fast and then slowly"}


@pytest.fixture(autouse=True)
def _exceptions_propagate(monkeypatch):
    # SLA_DEBUG=1: the CLI lets exceptions propagate instead of printing one line, so these tests can match the
    # whole message with pytest.raises (the one-line format itself is tested in test_cli_and_imports.py).
    monkeypatch.setenv("SLA_DEBUG", "1")


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
    # Portrait PNG frames 80 x 128 -> 64 x 102 -> 19 px cropped from top and bottom; names sort naturally
    # (f2 before f10), which plain string order would get wrong.
    (folder / "spin").mkdir()
    for i, c in enumerate(PNG_COLOURS):
        _frame((80, 128), c, "tb").save(folder / "spin" / f"f{i * 5}.png")
    (folder / "spin.txt").write_text(CAPTIONS["spin"])
    # Not encoded: a clip without caption (reported), a caption without clip and a stray file (ignored).
    frames[0].save(folder / "orphan.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    (folder / "notes.txt").write_text("not a caption of any clip")
    (folder / "readme.json").write_text("{}")
    return folder


def _expected_video(colours) -> torch.Tensor:
    """(1, 3, FRAMES, HEIGHT, WIDTH) in [-1, 1]: each kept frame is its solid colour."""
    c = torch.tensor(colours[:FRAMES], dtype=torch.float32) / 127.5 - 1.0  # (F, 3)
    return c.t()[None, :, :, None, None].expand(1, 3, FRAMES, HEIGHT, WIDTH).contiguous()


def _prepare(pipe, videos, out, *extra):
    # --debug: a refused input raises its exception here (the CLI would print one line and return 2), so the
    # tests can match the whole message.
    return main(["prepare", "--pipeline", str(pipe), "--videos", str(videos), "--out", str(out),
                 "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--text-len", str(TEXT_LEN),
                 "--device", "cpu", "--no-progress", "--debug", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    pipe = make_tiny_wan_pipeline(root / "pipe")
    clips = _write_clips(root / "clips")
    out = root / "latents"
    assert _prepare(pipe, clips, out) == 0
    return dict(root=root, pipe=pipe, clips=clips, out=out)


def test_frame_reader_resizes_crops_and_keeps_first_frames(prepared):
    from sla.data.video import load_clip

    clips = prepared["clips"]
    for name, colours in (("ball.gif", GIF_COLOURS), ("spin", PNG_COLOURS)):
        video = load_clip(clips / name, FRAMES, HEIGHT, WIDTH)
        assert video.shape == (3, FRAMES, HEIGHT, WIDTH) and video.dtype == torch.float32
        # Inside the crop window every pixel is the frame's colour (to one 8-bit step: resampling rounds);
        # the BORDER strips are cropped away, so the crop is centred and keeps the aspect ratio.
        torch.testing.assert_close(video, _expected_video(colours)[0], atol=1.01 / 127.5, rtol=0)
    # --stride 2 takes source frames 0, 2, 4 (3 frames from the 6 of the gif)
    strided = load_clip(clips / "ball.gif", 3, HEIGHT, WIDTH, stride=2)
    expected = torch.tensor([GIF_COLOURS[i] for i in (0, 2, 4)], dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(strided[:, :, 32, 32].t(), expected, atol=1.01 / 127.5, rtol=0)


def test_writes_one_normalised_latent_per_captioned_clip(prepared):
    from diffusers import AutoencoderKLWan

    from sla.data import LatentsDataset

    out, pipe = prepared["out"], prepared["pipe"]
    # no temp files; the report beside the latents
    assert sorted(p.name for p in out.iterdir()) == ["ball.safetensors", "prepare_report.json", "spin.safetensors"]
    report = json.loads((out / "prepare_report.json").read_text())
    assert sorted(report["encoded"]) == ["ball", "spin"]
    assert [s["clip"] for s in report["skipped"]] == ["orphan.gif"]
    assert "expected orphan.txt" in report["skipped"][0]["reason"]
    assert sorted(i["entry"] for i in report["ignored"]) == ["notes.txt", "readme.json"]
    ds = LatentsDataset(out)
    assert len(ds) == 2
    cfg = json.loads((pipe / "vae" / "config.json").read_text())
    spatial, temporal = 2 ** (len(cfg["dim_mult"]) - 1), 2 ** sum(cfg["temperal_downsample"])
    assert (spatial, temporal) == (8, 4)
    assert ds.latent_shape == (TINY_Z_DIM, 1 + (FRAMES - 1) // temporal, HEIGHT // spatial, WIDTH // spatial)
    assert ds.text_shape == (TEXT_LEN, TINY_TEXT_DIM)
    info = ds.prepare_info
    assert info["latents_mean"] == TINY_LATENTS_MEAN and info["latents_std"] == TINY_LATENTS_STD
    assert (info["frames"], info["height"], info["width"], info["text_len"]) == (FRAMES, HEIGHT, WIDTH, TEXT_LEN)

    vae = AutoencoderKLWan.from_pretrained(str(pipe / "vae")).eval()
    mean = torch.tensor(TINY_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY_LATENTS_STD).view(1, -1, 1, 1, 1)
    for i, (name, colours) in enumerate((("ball", GIF_COLOURS), ("spin", PNG_COLOURS))):
        item = ds[i]
        assert item["caption"] == CAPTIONS[name]
        with torch.no_grad():
            mode = vae.encode(_expected_video(colours)).latent_dist.mode()
        # Model space is what WanPipeline decodes with z * std + mean: (z - mean) / std.
        expected = ((mode - mean) / std)[0]
        torch.testing.assert_close(item["video"], expected, atol=2e-3, rtol=1e-3)
        assert not torch.allclose(item["video"], mode[0], atol=0.05)


def test_text_embeddings_match_the_encoder_and_are_zero_after_the_caption(prepared):
    from transformers import AutoTokenizer, UMT5EncoderModel

    from sla.data import LatentsDataset

    pipe = prepared["pipe"]
    ds = LatentsDataset(prepared["out"])
    tok = AutoTokenizer.from_pretrained(str(pipe / "tokenizer"))
    enc = UMT5EncoderModel.from_pretrained(str(pipe / "text_encoder")).eval()
    for i, name in enumerate(("ball", "spin")):
        t = tok([CAPTIONS[name]], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
        n = int(t.attention_mask.sum())
        assert n == (9 if name == "ball" else TEXT_LEN)
        with torch.no_grad():
            ref = enc(t.input_ids, t.attention_mask).last_hidden_state[0]
        if n < TEXT_LEN:  # the encoder's output at padding positions is not zero by itself: the pipeline zeroes it
            assert torch.count_nonzero(ref[n:]) > 0
        emb = ds[i]["text_embeds"]
        torch.testing.assert_close(emb[:n], ref[:n], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(emb[n:]) == 0


def test_resume_skips_done_clips_and_reencodes_a_changed_caption(prepared, tmp_path):
    clips = tmp_path / "clips"
    shutil.copytree(prepared["clips"], clips)
    out = tmp_path / "latents"
    shutil.copytree(prepared["out"], out)
    before = (out / "ball.safetensors").stat().st_mtime_ns
    (out / "stale.safetensors.tmp").write_bytes(b"half a file from a killed run")
    (clips / "spin.txt").write_text("a blue square")
    assert _prepare(prepared["pipe"], clips, out) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["already_done"] == ["ball"] and report["encoded"] == ["spin"]
    assert (out / "ball.safetensors").stat().st_mtime_ns == before
    assert not (out / "stale.safetensors.tmp").exists()
    from sla.data import LatentsDataset

    assert LatentsDataset(out)[1]["caption"] == "a blue square"
    # --strict: the uncaptioned clip makes the (otherwise finished) run fail
    assert _prepare(prepared["pipe"], clips, out, "--strict") == 1
    # other settings into the same folder would mix two sizes: refused before any work
    # (--debug: the ValueError itself propagates instead of the one-line CLI message)
    with pytest.raises(ValueError, match=r"--out .* holds latents made with frames=5 .* this run has frames=9"):
        main(["prepare", "--pipeline", str(prepared["pipe"]), "--videos", str(clips), "--out", str(out),
              "--frames", "9", "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu", "--no-progress",
              "--debug"])


def test_captions_from_csv_and_jsonl(prepared, tmp_path):
    from sla.data.prepare import find_clips, read_captions_file

    clips = prepared["clips"]
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text("\ufeffFile,Caption\nball.gif,a ball from csv\nspin,\"a spin, from csv\"\nghost.mp4,nobody\n")
    found, _, unused = find_clips(clips, str(csv_path))
    caps = {c.name: c.caption for c in found}
    assert caps == {"ball": "a ball from csv", "orphan": None, "spin": "a spin, from csv"}
    assert unused == ["ghost.mp4"]
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"video": "dir/orphan.gif", "text": "now captioned"}\n\n{"video": "ball", "text": "b"}\n')
    assert read_captions_file(jsonl) == {"orphan.gif": "now captioned", "ball": "b"}
    dup = tmp_path / "dup.csv"
    dup.write_text("file,caption\na.mp4,x\na.mp4,y\n")
    with pytest.raises(ValueError, match=r"'a.mp4' appears twice \(lines 2 and 3\)"):
        read_captions_file(dup)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("clip,words\na.mp4,x\n")
    with pytest.raises(ValueError, match="has no file column: name one of file, video, path, name"):
        read_captions_file(nocol)


def test_clear_errors(prepared, tmp_path):
    pipe, clips = prepared["pipe"], prepared["clips"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--frames must be 4k\+1"):
        _prepare(pipe, clips, out, "--frames", "6")
    with pytest.raises(ValueError, match="--height must be a positive multiple of 16"):
        _prepare(pipe, clips, out, "--height", "60")
    with pytest.raises(FileNotFoundError, match="--videos .* is not a folder"):
        _prepare(pipe, tmp_path / "nowhere", out)
    # unknown pipeline layouts
    with pytest.raises(FileNotFoundError, match="has no model_index.json.*one model's folder"):
        _prepare(pipe / "vae", clips, out)
    no_vae = tmp_path / "no_vae"
    shutil.copytree(pipe, no_vae)
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(FileNotFoundError, match=r"model_index.json names vae but the folder vae/ is missing"):
        _prepare(no_vae, clips, out)
    other = tmp_path / "cogvideox"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    with pytest.raises(ValueError, match="holds a 'CogVideoXPipeline' pipeline; this tool runs the text-to-video"):
        _prepare(other, clips, out)
    # two clips that would write the same file
    clash = tmp_path / "clash"
    shutil.copytree(clips, clash)
    shutil.copy(clash / "ball.gif", clash / "ball.mp4")
    with pytest.raises(ValueError, match="ball.gif and ball.mp4 would both be written as ball.safetensors"):
        _prepare(pipe, clash, out)
    # no clip usable at all: exit status 1, nothing written
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(clips / "orphan.gif", lonely / "orphan.gif")
    assert _prepare(pipe, lonely, out) == 1
    assert not list(out.glob("*.safetensors"))


def test_prepare_latents_script_is_a_wrapper(prepared, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_latents", ROOT / "scripts" / "prepare_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "lat"
    # the old spelling --input still works and reaches `sla prepare`
    assert script.main(["videos", "--pipeline", str(prepared["pipe"]), "--input", str(prepared["clips"]),
                        "--out", str(out), "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
                        "--text-len", str(TEXT_LEN), "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ball.safetensors", "spin.safetensors"]


def test_finetune_two_steps_on_the_encoded_folder(prepared, tmp_path):
    """``sla finetune --model <pipeline folder> --data <latents>``: the pipeline's own transformer trains on it."""
    import math

    rc = main(["finetune", "--model", str(prepared["pipe"]), "--data", str(prepared["out"]), "--output-dir",
               str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--block-q", "16", "--block-k", "16",
               "--critical", "0.5", "--negligible", "0.0", "--save-every", "0", "--warmup-steps", "1",
               "--no-progress"])
    assert rc == 0
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 3 and all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])
    assert (tmp_path / "run" / "final" / "sla_weights.safetensors").is_file()


def test_finetune_refuses_latents_of_another_model_space(prepared, tmp_path):
    # Same channel count, different VAE statistics: shapes would fit, the training would silently be wrong.
    other = tmp_path / "pipe_other_vae"
    shutil.copytree(prepared["pipe"], other)
    cfg = json.loads((other / "vae" / "config.json").read_text())
    cfg["latents_std"] = [1.0] * len(cfg["latents_std"])
    (other / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoded with a VAE whose latents_std differs"):
        main(["finetune", "--model", str(other), "--data", str(prepared["out"]), "--output-dir",
              str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    # the synthetic RGB set does not fit a latent-space model
    with pytest.raises(ValueError, match="--data synthetic is RGB pixels .* takes 4 input channels"):
        main(["finetune", "--model", str(prepared["pipe"]), "--output-dir", str(tmp_path / "run2"), "--steps", "1",
              "--no-progress"])


def test_write_mp4_and_read_back(tmp_path):
    from sla.data.video import ClipError, count_frames, load_clip, write_mp4

    frames = np.zeros((9, 48, 80, 3), np.uint8)
    for i in range(9):
        frames[i] = (20 * i, 100, 200 - 20 * i)
    path = tmp_path / "v.mp4"
    write_mp4(frames, path, fps=8)
    assert count_frames(path) == 9 and not list(tmp_path.glob(".tmp-*"))
    clip = load_clip(path, 5, 32, 32, stride=2)  # frames 0, 2, 4, 6, 8
    centre = (clip[:, :, 16, 16].t() + 1) * 127.5
    expected = torch.tensor([[20.0 * i, 100, 200 - 20 * i] for i in (0, 2, 4, 6, 8)])
    torch.testing.assert_close(centre, expected, atol=6, rtol=0)  # H.264 + yuv420p: a few levels off
    with pytest.raises(ClipError, match="has 9 frames, fewer than the 13 needed for --frames 13"):
        load_clip(path, 13, 32, 32)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 500)
    with pytest.raises(ClipError, match="bad.mp4: cannot be decoded"):
        load_clip(tmp_path / "bad.mp4", 5, 32, 32)
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(np.zeros((2, 33, 32, 3), np.uint8), tmp_path / "odd.mp4")
