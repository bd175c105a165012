"""Reading clips for ``sla prepare`` and writing mp4 files for ``sla sample``.

Video containers (mp4, mov, mkv, webm, avi, m4v, gif) are decoded with PyAV, which bundles FFmpeg in its wheels
(``pip install av``, part of the ``data`` extra), so no system FFmpeg is needed. A folder of images (png, jpg,
webp, bmp) is read as one clip, frames in natural name order. Pillow resizes and crops.

A clip that cannot be used (unreadable, no video stream, too few frames) raises :class:`ClipError`, which names
the file: ``sla prepare`` reports it and goes on with the next clip.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .._paths import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClipError(ValueError):
    """One clip cannot be used; the message starts with its path and says why."""


def require_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading and writing video files needs PyAV: pip install av (or "
                          "pip install 'sparse-linear-attention[data]')") from e
    return av


def _natural_key(name: str):
    # frame_2.png must come before frame_10.png: compare digit runs as numbers.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    """Frame images of an image-sequence folder, in natural name order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: _natural_key(p.name))


def _decode_container(path: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` frames (fewer if the video is shorter) as ``(H, W, 3)`` uint8 RGB arrays."""
    av = require_av()
    out = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # decode with FFmpeg's threads; the GIL is released meanwhile
            for frame in container.decode(stream):
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) >= count:
                    break
    except ClipError:
        raise
    except Exception as e:  # PyAV raises FFmpegError subclasses, OSError, ValueError... for broken files
        if len(out) >= count:
            return out  # damage after the frames we need does not matter
        raise ClipError(f"{path}: cannot be decoded ({type(e).__name__}: {e})") from e
    return out


def read_frames(path: str | os.PathLike, count: int) -> list[np.ndarray]:
    """Up to ``count`` first frames of a video file or image folder, ``(H, W, 3)`` uint8 RGB."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise ClipError(f"{path}: folder holds no frame images ({', '.join(IMAGE_EXTENSIONS)})")
        frames = []
        for f in files[:count]:
            try:
                with Image.open(f) as img:
                    frames.append(np.asarray(img.convert("RGB")))
            except Exception as e:
                raise ClipError(f"{path}: frame {f.name} cannot be read ({type(e).__name__}: {e})") from e
        return frames
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise ClipError(f"{path}: not a video file ({', '.join(VIDEO_EXTENSIONS)}) or a folder of frames")
    return _decode_container(path, count)


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``frame`` so that it covers ``height x width`` (aspect ratio kept), then cut out the centre."""
    from PIL import Image

    img = Image.fromarray(frame)
    s = max(width / img.width, height / img.height)
    # max(): rounding must never leave the scaled side one pixel short of the target.
    size = (max(width, round(img.width * s)), max(height, round(img.height * s)))
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)  # Pillow filters over the whole footprint: no aliasing on downscale
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def load_clip(path: str | os.PathLike, frames: int, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """Frames ``0, stride, 2*stride, ...`` (``frames`` of them) of a clip, resized and centre-cropped:
    ``(3, frames, height, width)`` float32 in [-1, 1], the VAE's input range."""
    need = (frames - 1) * stride + 1
    raw = read_frames(path, need)
    if len(raw) < need:
        raise ClipError(f"{path}: has {len(raw)} frames, fewer than the {need} needed for --frames {frames}"
                        + (f" at --stride {stride}" if stride > 1 else "")
                        + "; lower --frames (4k+1) or --stride, or drop this clip")
    picked = [resize_center_crop(raw[i], height, width) for i in range(0, need, stride)]
    video = torch.from_numpy(np.stack(picked)).permute(3, 0, 1, 2).float()  # (3, F, H, W)
    return video / 127.5 - 1.0


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 16, crf: int = 18) -> str:
    """Write ``frames`` ``(F, H, W, 3)`` uint8 as an H.264 mp4 (yuv420p, plays everywhere), atomically.

    H.264 in yuv420p needs even sizes; an odd height or width raises ``ValueError``."""
    av = require_av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 takes (frames, height, width, 3) uint8, got {frames.shape} {frames.dtype}")
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"an H.264 mp4 needs an even height and width, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for i in range(f):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush the frames the encoder still holds
                container.mux(packet)
    return str(path)


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames a video file decodes to (every frame is decoded: exact, not the header's estimate)."""
    av = require_av()
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
