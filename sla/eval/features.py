"""A small video network trained on the synthetic set, used as the feature space of a Frechet distance.

FVD uses an I3D network trained on Kinetics; that network knows nothing of our synthetic clips and cannot
be downloaded here. Instead ``scripts/train_feature_net.py`` trains this small 3D CNN to recognise which
shapes, colours, textures, motions and sizes are present in a clip (multi-label), and its 64-wide
penultimate layer is the feature space. The weights ship in ``sla/assets/feature_net.safetensors``.

Metrics (all on clips ``(B, 3, F, H, W)`` in [-1, 1]):

- :func:`frechet_distance` between the Gaussian fits of two feature sets (lower is better).
- attribute agreement: how often the network's presence predictions on a generated clip match the
  caption's attributes (1.0 = everything the caption asks for, and nothing else, is recognised).
- :func:`temporal_consistency`: mean absolute frame-to-frame change, reported next to that of real clips
  (generated clips that flicker show a larger value; frozen ones a smaller one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURE_DIM = 64


def feature_net_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "feature_net.safetensors"


class VideoFeatureNet(nn.Module):
    """3D CNN: ``(B, 3, F, H, W)`` -> features ``(B, 64)`` and attribute logits ``(B, n_attributes)``."""

    def __init__(self, n_attributes: int = 22, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.body = nn.Sequential(block(3, w, (1, 2, 2)), block(w, 2 * w, (2, 2, 2)),
                                  block(2 * w, 4 * w, (2, 2, 2)), block(4 * w, 4 * w, (1, 2, 2)))
        self.embed = nn.Linear(4 * w, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, n_attributes)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        h = self.body(video).mean(dim=(2, 3, 4))
        return self.embed(h)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(video)
        return f, self.head(torch.nn.functional.silu(f))


def load_feature_net(path: str | os.PathLike | None = None, device=None) -> VideoFeatureNet:
    from safetensors.torch import load_file

    path = Path(path) if path is not None else feature_net_path()
    if not path.is_file():
        raise FileNotFoundError(f"feature network weights not found at {path}; train them with "
                                "scripts/train_feature_net.py")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"feature network weights at {path} are unreadable ({e}); re-run "
                         "scripts/train_feature_net.py") from e
    net = VideoFeatureNet(n_attributes=state["head.weight"].shape[0])
    net.load_state_dict(state)
    return net.eval().to(device)


@torch.no_grad()
def extract(net: VideoFeatureNet, videos: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, 64)`` float64 and attribute probabilities ``(N, n_attr)`` for clips ``(N, 3, F, H, W)``."""
    dev = next(net.parameters()).device
    feats, probs = [], []
    for i in range(0, videos.shape[0], batch_size):
        f, logits = net(videos[i:i + batch_size].to(dev, torch.float32))
        feats.append(f.double().cpu())
        probs.append(torch.sigmoid(logits).cpu())
    return torch.cat(feats), torch.cat(probs)


def _sqrtm_psd_product_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    # Tr sqrt(S1 S2) via the symmetric form sqrt(S1)^(1/2) S2 sqrt(S1)^(1/2): eigen-decompositions only,
    # stable for the rank-deficient covariances small sample counts give.
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of feature sets ``a`` (N, D) and ``b`` (M, D)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set for a Frechet distance, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_psd_product_trace(s1, s2))


def attribute_agreement(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary accuracy of thresholded presence predictions against the captioned attributes."""
    return float(((probs > 0.5).float() == labels.float()).float().mean())


def temporal_consistency(videos: torch.Tensor) -> float:
    """Mean absolute change between consecutive frames, in [0, 2] units of the [-1, 1] pixel scale."""
    return float((videos[:, :, 1:] - videos[:, :, :-1]).abs().mean())
