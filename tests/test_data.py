"""Synthetic video set and latents folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sla.data import LatentsDataset, SyntheticVideoConfig, SyntheticVideoDataset, collate, write_latents_example
from sla.data.synthetic import ATTRIBUTE_NAMES, MOTIONS, SHAPES, VOCAB, caption_token_ids, sample_scene

ROOT = Path(__file__).resolve().parent.parent


def test_clip_layout_and_token_count():
    ds = SyntheticVideoDataset("train", size=10)
    item = ds[3]
    assert item["video"].shape == (3, 16, 64, 64) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["text_embeds"].shape == (32, 64)
    # patch (1, 4, 4): 16 * 16 * 16 = 4096 tokens = 64 key blocks of 64
    assert (16 // 1) * (64 // 4) * (64 // 4) == 4096
    assert item["labels"].shape == (len(ATTRIBUTE_NAMES),)


def test_deterministic_and_splits_differ():
    a, b = SyntheticVideoDataset("train", 5), SyntheticVideoDataset("train", 5)
    assert torch.equal(a[2]["video"], b[2]["video"]) and a[2]["caption"] == b[2]["caption"]
    assert torch.equal(a[2]["text_embeds"], b[2]["text_embeds"])
    v = SyntheticVideoDataset("val", 5)
    assert not torch.equal(a[2]["video"], v[2]["video"])
    other_seed = SyntheticVideoDataset("train", 5, SyntheticVideoConfig(seed=1))
    assert not torch.equal(a[2]["video"], other_seed[2]["video"])


def test_variety_and_motion():
    cfg = SyntheticVideoConfig()
    scenes = [sample_scene(cfg, "train", i) for i in range(200)]
    objs = [o for s in scenes for o in s[1:]]
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["motion"] for o in objs} == set(MOTIONS)
    assert {len(s) - 1 for s in scenes} == {2, 3, 4}
    # a crossing object travels across the whole frame (long-range motion)
    cross = next(o for o in objs if o["motion"] == "crosses")
    travel = max(abs(cross["cx"][-1] - cross["cx"][0]), abs(cross["cy"][-1] - cross["cy"][0]))
    assert travel > 64
    # frames change over time
    video = SyntheticVideoDataset("train", 1)[0]["video"]
    assert (video[:, 1:] - video[:, :-1]).abs().mean() > 1e-3


def test_caption_tokens_slots_and_padding():
    scene = sample_scene(SyntheticVideoConfig(), "train", 0)
    ids = caption_token_ids(scene)
    n = len(scene) - 1
    assert (ids[: 8 * n].view(n, 8)[:, 0] != VOCAB["<pad>"]).all()  # each object's slot starts with a word
    assert (ids[8 * n:] == VOCAB["<pad>"]).all()
    emb = SyntheticVideoDataset("train", 1)[0]["text_embeds"]
    assert torch.count_nonzero(emb[8 * n:]) == 0  # empty slots carry no signal


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticVideoDataset("test")
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticVideoConfig(min_objects=3, max_objects=2)
    with pytest.raises(IndexError):
        SyntheticVideoDataset("train", 3)[3]


def test_latents_folder_roundtrip_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentsDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LatentsDataset(tmp_path / "empty")
    folder = tmp_path / "lat"
    folder.mkdir()
    for i in range(3):
        write_latents_example(folder / f"c{i}.safetensors", torch.randn(4, 2, 3, 3), torch.randn(5, 8), f"cap {i}")
    ds = LatentsDataset(folder)
    b = collate([ds[i] for i in range(3)])
    assert b["video"].shape == (3, 4, 2, 3, 3) and b["text_embeds"].shape == (3, 5, 8) and b["caption"][1] == "cap 1"
    write_latents_example(folder / "c3.safetensors", torch.randn(4, 2, 3, 4), torch.randn(5, 8))
    with pytest.raises(ValueError, match="differ"):
        LatentsDataset(folder)[3]
    (folder / "c4.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        LatentsDataset(folder)[4]
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(1)}, str(tmp_path / "only.safetensors"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "only.safetensors").rename(tmp_path / "bad" / "x.safetensors")
    with pytest.raises(ValueError, match="lacks the tensor"):
        LatentsDataset(tmp_path / "bad")


def test_prepare_latents_synthetic_export(tmp_path):
    out = tmp_path / "lat"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_latents.py"), "synthetic", "--count", "2",
                           "--out", str(out), "--frames", "2", "--height", "16", "--width", "16", "--text-dim", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = LatentsDataset(out)
    ref = SyntheticVideoDataset("train", 2, SyntheticVideoConfig(frames=2, height=16, width=16, text_dim=8))
    assert len(ds) == 2
    assert torch.equal(ds[1]["video"], ref[1]["video"]) and ds[1]["caption"] == ref[1]["caption"]
