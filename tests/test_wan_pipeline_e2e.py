"""The real-data path end to end on CPU, on tiny random Wan pipelines (``sla.testing.make_tiny_wan_pipeline``):
mp4 files written here -> ``sla prepare`` -> ``sla finetune --model <pipeline>`` -> ``sla sample --pipeline
--sla`` -> an mp4 whose frames are decoded back and counted. Also Wan2.2's two-transformer layout, the decode
against WanPipeline's own output, and the errors for layouts and flags that do not fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sla.cli import main
from sla.testing import make_tiny_wan_pipeline

TRAIN = dict(frames=5, height=64, width=64)  # latents (4, 2, 8, 8): 32 tokens = 2 SLA blocks of 16
SAMPLE_FRAMES = 9  # 3 latent frames: 48 tokens = 3 blocks
SLA_FLAGS = ["--block-q", "16", "--block-k", "16", "--critical", "0.34", "--negligible", "0.0"]


@pytest.fixture(autouse=True)
def _exceptions_propagate(monkeypatch):
    # SLA_DEBUG=1: the CLI lets exceptions propagate instead of printing one line, so these tests can match the
    # whole message with pytest.raises (the one-line format itself is tested in test_cli_and_imports.py).
    monkeypatch.setenv("SLA_DEBUG", "1")


def _clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A moving gradient, so consecutive frames differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        for c in range(3):
            out[t, :, :, c] = (base[c] + 2 * x + 3 * y + 20 * t * (c + 1)) % 256
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sla.data.video import write_mp4

    root = tmp_path_factory.mktemp("e2e")
    pipe = make_tiny_wan_pipeline(root / "wan21")
    videos = root / "videos"
    videos.mkdir()
    # sizes differ from the target: resized and centre-cropped by prepare
    write_mp4(_clip(7, 64, 96, 0), videos / "waves.mp4", fps=8)
    (videos / "waves.txt").write_text("waves roll in")
    write_mp4(_clip(6, 80, 64, 1), videos / "tower.mp4", fps=8)
    (videos / "tower.txt").write_text("a tall tower")
    # a truncated download: the header says mp4, the rest is missing
    (videos / "broken.mp4").write_bytes((videos / "waves.mp4").read_bytes()[:200])
    (videos / "broken.txt").write_text("never encoded")
    write_mp4(_clip(7, 64, 64, 2), videos / "silent.mp4", fps=8)  # no caption
    return dict(root=root, pipe=pipe, videos=videos)


def test_videos_to_finetune_to_sampled_mp4(world, capsys):
    from sla.data.video import count_frames

    root, pipe = world["root"], world["pipe"]
    latents = root / "latents"
    rc = main(["prepare", "--pipeline", str(pipe), "--videos", str(world["videos"]), "--out", str(latents),
               "--frames", str(TRAIN["frames"]), "--height", str(TRAIN["height"]), "--width", str(TRAIN["width"]),
               "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr()
    report = json.loads((latents / "prepare_report.json").read_text())
    assert sorted(report["encoded"]) == ["tower", "waves"]
    skipped = {s["clip"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"broken.mp4", "silent.mp4"}
    assert "cannot be decoded" in skipped["broken.mp4"] and "no caption" in skipped["silent.mp4"]
    assert "skipped broken.mp4" in printed.out and "skipped silent.mp4" in printed.out

    run = root / "run"
    rc = main(["finetune", "--model", str(pipe), "--data", str(latents), "--output-dir", str(run), "--steps", "2",
               "--batch-size", "2", "--save-every", "0", "--warmup-steps", "1", "--no-progress", *SLA_FLAGS])
    assert rc == 0
    info = json.loads((run / "final" / "finetune_info.json").read_text())
    assert info["attention"] == "sla" and info["base_model"] == str(pipe)

    out = root / "samples" / "tower.mp4"
    rc = main(["sample", "--pipeline", str(pipe), "--sla", str(run / "final"), "--prompt", "a tall tower",
               "--frames", str(SAMPLE_FRAMES), "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    assert count_frames(out) == SAMPLE_FRAMES
    assert out.with_suffix(".png").stat().st_size > 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["attention"]["transformer"].startswith("fine-tuned (sla)")
    assert rep["frames"] == SAMPLE_FRAMES and len(rep["step_seconds"]) == 2
    assert all(s > 0 for s in rep["step_seconds"]) and rep["vae_decode_seconds"] > 0
    assert rep["text_encoding_seconds"] > 0 and rep["transformer_calls_per_step"] == 2
    sp = rep["sparsity"]["transformer"]
    # 3 key blocks per row, 1 critical (floor(0.34 * 3)) -> 2/3 of the pairs skipped in every layer
    assert sp["sla_layers"] == 2 and sp["mean"] == pytest.approx(2 / 3)
    text = capsys.readouterr().out
    assert "s/step" in text and "VAE decode" in text and "sparsity" in text


def test_generation_decodes_like_wan_pipeline(world):
    """generate_video times the stages separately; the video must still be the pipeline's own output."""
    from sla.integrations.wan_pipeline import generate_video, load_pipeline

    pipe, attention = load_pipeline(world["pipe"])
    assert attention == {"transformer": "dense"}
    kw = dict(height=64, width=64, num_frames=5, guidance_scale=4.0)
    res = generate_video(pipe, "waves", steps=2, seed=3, progress=False, sparsity=False, **kw)
    ref = pipe("waves", negative_prompt="", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
               output_type="np", **kw).frames[0]
    assert res["frames"].shape == ref.shape == (5, 64, 64, 3)
    assert np.abs(res["frames"].astype(np.float32) - ref * 255).max() <= 0.51  # uint8 rounding only
    assert "sparsity" not in res


def test_two_transformer_pipeline_patches_both(world, tmp_path):
    from sla.integrations.diffusers import is_sla_applied
    from sla.integrations.wan_pipeline import load_pipeline

    pipe22 = make_tiny_wan_pipeline(tmp_path / "wan22", two_transformers=True)
    index = json.loads((pipe22 / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    out = tmp_path / "v.mp4"
    # UniPC with shift 3 over 3 steps: timesteps 999 (transformer), 857 and 600 (transformer_2: below 875)
    assert main(["sample", "--pipeline", str(pipe22), "--sla-untrained", *SLA_FLAGS, "--prompt", "two experts",
                 "--frames", "5", "--height", "64", "--width", "64", "--steps", "3", "--guidance-scale", "1.0",
                 "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert set(rep["attention"]) == {"transformer", "transformer_2"}
    assert all(v.startswith("sla, untrained") for v in rep["attention"].values())
    assert set(rep["sparsity"]) == {"transformer", "transformer_2"}  # both ran, both with SLA
    assert rep["transformer_calls_per_step"] == 1

    # SLA weights for both, saved with sla.save_sla and loaded with sla.load_sla onto each transformer
    import sla

    pipe, _ = load_pipeline(pipe22, untrained_sla=dict(critical=0.34, negligible=0.0, block_q=16, block_k=16))
    with torch.no_grad():
        pipe.transformer.blocks[0].attn1.sla.proj.bias.fill_(0.5)
    sla.save_sla(pipe.transformer, tmp_path / "sla_hi")
    sla.save_sla(pipe.transformer_2, tmp_path / "sla_lo")
    loaded, attention = load_pipeline(pipe22, sla=str(tmp_path / "sla_hi"), sla_2=str(tmp_path / "sla_lo"))
    assert is_sla_applied(loaded.transformer) and is_sla_applied(loaded.transformer_2)
    assert float(loaded.transformer.blocks[0].attn1.sla.proj.bias.detach()[0]) == 0.5
    assert attention["transformer_2"].startswith("sla from")

    with pytest.raises(ValueError, match="has two transformers .* pass --sla-2 for the second"):
        load_pipeline(pipe22, sla=str(tmp_path / "sla_hi"))
    with pytest.raises(ValueError, match="is a pipeline with two transformers .* fine-tune one at a time"):
        main(["finetune", "--model", str(pipe22), "--output-dir", str(tmp_path / "r"), "--steps", "1"])


def test_sample_clear_errors(world, tmp_path):
    pipe = world["pipe"]
    base = ["sample", "--pipeline", str(pipe), "--prompt", "x", "--frames", "5", "--height", "64", "--width", "64"]
    with pytest.raises(ValueError, match="--out must name the .mp4 file"):
        main([*base, "--out", str(tmp_path / "folder")])
    with pytest.raises(ValueError, match="--prompt is required with --pipeline"):
        main(["sample", "--pipeline", str(pipe), "--out", str(tmp_path / "a.mp4")])
    with pytest.raises(ValueError, match="--count belong to the --model mode"):
        main([*base, "--count", "2", "--out", str(tmp_path / "a.mp4")])
    with pytest.raises(ValueError, match="--prompt need --pipeline DIR"):
        main(["sample", "--prompt", "x"])
    with pytest.raises(ValueError, match="--critical set the settings of --sla-untrained"):
        main([*base, "--critical", "0.1", "--out", str(tmp_path / "a.mp4")])
    with pytest.raises(ValueError, match="--sla-2 .* has one transformer"):
        main([*base, "--sla-2", str(tmp_path), "--out", str(tmp_path / "a.mp4")])
    # an `sla finetune` output folder instead of its final/
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"output folder: pass .*final"):
        main([*base, "--sla", str(run), "--out", str(tmp_path / "a.mp4")])
    with pytest.raises(ValueError, match=r"--frames must be 4k\+1"):
        main([*base[:-6], "--frames", "6", "--height", "64", "--width", "64", "--steps", "1",
              "--out", str(tmp_path / "a.mp4")])
    # unknown layouts
    with pytest.raises(FileNotFoundError, match="has no model_index.json.*one model's folder"):
        main(["sample", "--pipeline", str(pipe / "transformer"), "--prompt", "x", "--out", str(tmp_path / "a.mp4")])
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        main(["sample", "--pipeline", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "a.mp4")])


def test_importing_sla_testing_imports_no_diffusers():
    code = ("import sys, sla.testing; bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == ""


def test_make_tiny_wan_pipeline_refuses_a_used_folder(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        make_tiny_wan_pipeline(tmp_path / "used")
