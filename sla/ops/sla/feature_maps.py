"""Feature maps ``phi`` of SLA's linear branch, applied token-wise to q and k (the same map for both).

* ``softmax``: softmax over the head dimension (the paper's choice; strictly positive).
* ``elu``: ``elu(x) + 1`` (strictly positive).
* ``relu``: ``relu(x)``; can be exactly zero, so a row's normaliser can be zero (see docs/semantics.md).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


FEATURE_MAP_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax,
    "elu": _elu_plus_one,
    "relu": _relu,
}


def apply_feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the feature map ``name`` to ``x`` ``(..., D)``, keeping dtype and shape."""
    return FEATURE_MAP_FNS[name](x)
