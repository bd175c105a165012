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


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # A (B, H, L, D) tensor that is a transposed view of a (B, L, H, D) one (how diffusers' processors hold q, k
    # and v) is gathered along its own contiguous token axis: whole H * D rows per token, a plain copy's speed.
    # Indexing the strided view instead (x[:, :, index]) copies D-wide pieces, several times slower on a GPU
    # (bench/RESULTS.md, "Token tiles").
    if x.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2).index_select(1, index).transpose(1, 2)
    return x.index_select(2, index)


class _PermuteTokens(torch.autograd.Function):
    # The gradient of a permutation is the inverse permutation: a second gather, where autograd's default for
    # index_select / advanced indexing scatters with index_add / index_put(accumulate=True).
    @staticmethod
    def forward(x, index, inverse):
        return _gather_tokens(x, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_tokens(grad, inverse), None, None


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[:, :, index]`` for ``x`` of layout ``(B, H, L, D)`` (any strides), with ``inverse`` the inverse
    permutation of ``index`` (int64, length ``L``, on ``x``'s device; :func:`tile_permutation` returns both).
    The result keeps ``x``'s memory layout when ``x`` is a transposed ``(B, L, H, D)`` tensor; its gradient is the
    gather by ``inverse``."""
    return _PermuteTokens.apply(x, index, inverse)
