"""PNG grids and GIFs of clips ``(N, C, F, H, W)`` in [-1, 1], and contact sheets of one video (Pillow, imported
lazily).

Grids are labelled inside the image (a caption per row, a frame index per column), so a PNG read on its own,
without the report around it, still says what it shows.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .._paths import atomic_path


def _to_uint8(videos: torch.Tensor) -> np.ndarray:
    """``(N, C, F, H, W)`` in [-1, 1] -> ``(N, F, H, W, C)`` uint8."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("writing PNG/GIF needs Pillow: pip install 'sparse-linear-attention[plots]'") from e
    return Image


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: the fixed bitmap font


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels; at most ``max_lines`` lines, the last one ending in
    "..." when the text does not fit."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + " ...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " ..."
    return lines


def save_grid_png(videos: torch.Tensor, path: str | os.PathLike, frames: int = 6, scale: int = 2,
                  row_labels: list[str] | None = None, label_width: int = 300) -> str:
    """One row per clip, ``frames`` evenly spaced frames per row, labelled inside the image.

    A header above the columns names each column's frame ("frame 0", "frame 3", ...); a column on the left
    holds each row's label: its caption from ``row_labels`` (wrapped, cut with "..." when too long for the
    row), else "clip i". ``label_width`` is that column's width in pixels of the saved image.
    """
    Image = _pil()
    from PIL import ImageDraw

    v = _to_uint8(videos)
    n, f, h, w, _ = v.shape
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels has {len(row_labels)} labels for {n} clips; give one per clip")
    picks = np.linspace(0, f - 1, min(frames, f)).round().astype(int)
    pad = 2
    grid = np.full((n * (h + pad) - pad, len(picks) * (w + pad) - pad, 3), 255, np.uint8)
    for i in range(n):
        for j, fr in enumerate(picks):
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = v[i, fr]
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)

    # Text is drawn at the saved resolution (after the nearest-neighbour upscale), so it stays sharp.
    font = _font(12)
    line_h = 14
    header = line_h + 6
    canvas = Image.new("RGB", (label_width + img.width, header + img.height), (255, 255, 255))
    canvas.paste(img, (label_width, header))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0)
    draw.text((4, 3), "row: caption, column: frame", fill=ink, font=font)
    cell_w, cell_h = (w + pad) * scale, (h + pad) * scale
    for j, fr in enumerate(picks):
        text = f"frame {int(fr)}"
        x = label_width + j * cell_w + (w * scale - draw.textlength(text, font=font)) / 2
        draw.text((x, 3), text, fill=ink, font=font)
    max_lines = max(1, (h * scale - 4) // line_h)
    for i in range(n):
        label = row_labels[i] if row_labels is not None else f"clip {i}"
        top = header + i * cell_h + 2
        for k, line in enumerate(_wrap(draw, str(label), font, label_width - 10, max_lines)):
            draw.text((4, top + k * line_h), line, fill=ink, font=font)
    canvas.save(os.fspath(path))
    return os.fspath(path)


def save_gif(videos: torch.Tensor, path: str | os.PathLike, columns: int = 4, scale: int = 2, fps: int = 8) -> str:
    """All clips tiled side by side in one animated GIF."""
    Image = _pil()
    v = _to_uint8(videos)
    n, f, h, w, _ = v.shape
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    pad = 2
    frames = []
    for t in range(f):
        canvas = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = v[i, t]
        img = Image.fromarray(canvas)
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        frames.append(img)
    frames[0].save(os.fspath(path), save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return os.fspath(path)


def save_contact_sheet(frames: np.ndarray, path: str | os.PathLike, count: int = 8, columns: int = 4,
                       max_width: int = 1664) -> str:
    """``count`` evenly spaced frames of one video ``(F, H, W, 3)`` uint8 (first and last included), in a grid of
    ``columns``, as one PNG, written atomically. Wide frames are scaled down so the sheet is at most ``max_width``
    pixels wide (a full 832-pixel frame per cell makes an unwieldy image)."""
    Image = _pil()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"save_contact_sheet takes (frames, height, width, 3), got {frames.shape}")
    f, h, w, _ = frames.shape
    picks = np.linspace(0, f - 1, min(count, f)).round().astype(int)
    cols = min(columns, len(picks))
    rows = (len(picks) + cols - 1) // cols
    pad = 4
    scale = min(1.0, (max_width - (cols - 1) * pad) / (cols * w))
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    sheet = Image.new("RGB", (cols * cw + (cols - 1) * pad, rows * ch + (rows - 1) * pad), (255, 255, 255))
    for i, fr in enumerate(picks):
        r, c = divmod(i, cols)
        cell = Image.fromarray(frames[fr].astype(np.uint8))
        if (cw, ch) != (w, h):
            cell = cell.resize((cw, ch), Image.BICUBIC)
        sheet.paste(cell, (c * (cw + pad), r * (ch + pad)))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return os.fspath(path)
