"""Token order for SLA's blocks: video tokens grouped into 3D tiles before blocking.

SLA's blocks are runs of ``block`` consecutive tokens. A video DiT lists its tokens frame by frame, row by row
(raster order), so a block of 64 tokens is a strip of one or a few rows of one frame, and a query's
neighbourhood (a few rows and columns around it, in this frame and the next) spreads over many blocks. Listing
the tokens tile by tile instead (a tile is ``tf x th x tw`` tokens: ``tf`` frames, ``th`` rows, ``tw`` columns,
raster order inside the tile) makes a block a compact 3D patch, so a local head's attention mass falls into few
blocks and the critical blocks can hold more of it at the same sparsity (measurements in docs/results.md,
"Token tiles"). Sliding-tile and video sparse attention group tokens the same way.

Attention itself does not depend on the order of the tokens: permuting q, k and v by the same permutation and
the output back gives dense attention's result exactly. What changes is which tokens share a block.
"""

from __future__ import annotations

import torch


def check_token_tile(token_tile, name: str = "token_tile") -> tuple[int, int, int] | None:
    """``None`` (raster order) or a tile ``(frames, rows, columns)`` of positive ints; returns it as a tuple.
    Raises ``ValueError`` naming ``name`` otherwise."""
    if token_tile is None:
        return None
    if isinstance(token_tile, str):
        raise ValueError(f"{name} must be None or three positive ints (frames, rows, columns), e.g. (4, 4, 4); "
                         f"got the string {token_tile!r}")
    try:
        tile = tuple(token_tile)
    except TypeError:
        raise ValueError(f"{name} must be None or three positive ints (frames, rows, columns), e.g. (4, 4, 4); "
                         f"got {token_tile!r}") from None
    if len(tile) != 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile):
        raise ValueError(f"{name} must be None or three positive ints (frames, rows, columns), e.g. (4, 4, 4); "
                         f"got {token_tile!r}")
    return tile


def tile_permutation(grid, token_tile, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token permutation that lists a ``grid`` of video tokens tile by tile.

    Args:
        grid: ``(F, H, W)`` tokens per frame axis, row axis and column axis (after patching), raster order
            ``index = (f * H + h) * W + w``.
        token_tile: ``(tf, th, tw)``. Tiles at the far edges hold fewer tokens when the grid does not divide
            (``grid`` need not be a multiple of the tile).
        device: where the index tensors live.

    Returns:
        ``(perm, inv)``, int64 of length ``F * H * W``: ``x[..., perm, :]`` lists the tokens tile by tile (tiles in
        raster order of tiles, tokens in raster order inside a tile) and ``y[..., inv, :]`` undoes it.
    """
    tile = check_token_tile(token_tile)
    if tile is None:
        raise ValueError("tile_permutation needs a tile (tf, th, tw), got None")
    grid = check_token_tile(grid, "grid")
    F, H, W = grid
    tf, th, tw = (min(t, g) for t, g in zip(tile, grid))
    idx = torch.arange(F * H * W, device=device)
    f, h, w = idx // (H * W), (idx // W) % H, idx % W
    tiles_h, tiles_w = -(-H // th), -(-W // tw)
    tile_id = ((f // tf) * tiles_h + h // th) * tiles_w + w // tw
    inside = ((f % tf) * th + h % th) * tw + w % tw
    perm = torch.argsort(tile_id * (tf * th * tw) + inside)  # keys are distinct: any sort gives the same order
    inv = torch.empty_like(perm)
    inv[perm] = idx
    return perm, inv
