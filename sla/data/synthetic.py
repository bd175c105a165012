"""A deterministic synthetic text-to-video dataset, generated on the fly (no downloads).

Each clip shows 2-4 textured objects (shape x colour x texture x size) moving over a dark, softly graded
background, each with its own motion: a straight drift, bouncing off the walls, circling a centre, or a
long-range crossing from one edge of the frame to the other. The crossing and several simultaneous
objects make attention matter: a token must attend to far-away tokens (other frames, the other side of
the frame) to predict where an object goes.

Everything is a pure function of ``(config.seed, split, index)``: clip ``i`` of a split is the same on
every machine, in every process and in every epoch, which is what exact resumption and multi-process
training need. The ``"train"`` and ``"val"`` splits draw from disjoint random streams (held-out clips).

Layout: ``video`` is ``(C, F, H, W)`` float32 in ``[-1, 1]`` (pixel space, no VAE), the layout diffusers'
``WanTransformer3DModel`` takes per sample. With the defaults (3 x 16 x 64 x 64) and the small model's
patch ``(1, 4, 4)`` a clip is ``16 * 16 * 16 = 4096`` tokens, i.e. 64 key blocks of 64 tokens, enough for
95% block sparsity to mean something (3 critical blocks of 64 per row).

Conditioning: a caption such as ``"large red striped circle bounces ; small blue plain square crosses
left to right"`` is tokenised over a fixed small vocabulary into one slot of ``SLOT_LEN`` tokens per
object, and embedded with a fixed random token table plus a fixed random position table (seeded, so
identical everywhere) into a ``(text_len, text_dim)`` float32 tensor. The position table lets
cross-attention bind each attribute to its object's slot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "ring")
COLOURS = {
    "red": (0.95, 0.20, 0.15),
    "green": (0.20, 0.85, 0.25),
    "blue": (0.20, 0.40, 0.95),
    "yellow": (0.95, 0.90, 0.20),
    "cyan": (0.15, 0.85, 0.90),
    "magenta": (0.90, 0.25, 0.85),
    "white": (0.95, 0.95, 0.95),
    "orange": (0.98, 0.55, 0.10),
}
TEXTURES = ("plain", "striped", "checkered", "dotted")
SIZES = ("small", "large")
# Motion classes; the caption words for each are built in _motion_words.
MOTIONS = ("drifts", "bounces", "circles", "crosses")
DIRECTIONS = ("left", "right", "up", "down")

SLOT_LEN = 8  # tokens per object: size colour texture shape motion [w1 w2 w3]
MAX_OBJECTS = 4

_WORDS = (["<pad>", ";", "to", "clockwise", "counterclockwise", "from"] + list(SIZES) + list(COLOURS)
          + list(TEXTURES) + list(SHAPES) + list(MOTIONS) + list(DIRECTIONS))
VOCAB = {w: i for i, w in enumerate(_WORDS)}

_SPLIT_STREAM = {"train": 0, "val": 1}
BACKGROUNDS = ("gradient", "texture")
# Value-noise grid spacings (pixels) of the "texture" background's two octaves and their weights.
_TEXTURE_CELLS = (9.0, 3.5)
_TEXTURE_WEIGHTS = (0.65, 0.35)


@dataclass(frozen=True)
class SyntheticVideoConfig:
    """Sizes of the synthetic set. Defaults give 4096 tokens per clip at patch (1, 4, 4).

    Attributes:
        frames, height, width: clip size in pixels (``height`` and ``width`` >= 16).
        channels: 3 (RGB).
        min_objects, max_objects: objects per clip (1 <= min <= max <= 4).
        text_dim: width of the conditioning embedding (the model's ``text_dim``).
        seed: base seed; changing it gives a different but equally deterministic dataset.
        background: ``"gradient"`` (a dark, softly graded backdrop: most tokens are smooth and carry little
            information) or ``"texture"`` (a coloured value-noise texture at two scales that persists from
            frame to frame, so every token holds detail that only the same place in other frames and its
            neighbours can tell; this is what gives a trained model local, concentrated attention).
        pan_speed: largest camera pan of a ``"texture"`` background, in pixels per frame (each clip draws its
            own speed in ``[0, pan_speed]`` and a direction); 0 keeps the background still.
    """

    frames: int = 16
    height: int = 64
    width: int = 64
    channels: int = 3
    min_objects: int = 2
    max_objects: int = 4
    text_dim: int = 64
    seed: int = 0
    background: str = "gradient"
    pan_speed: float = 0.0

    def __post_init__(self):
        for name in ("frames", "height", "width", "text_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SyntheticVideoConfig.{name} must be a positive int, got {v!r}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"SyntheticVideoConfig height/width must be >= 16, got {self.height}x{self.width}")
        if self.channels != 3:
            raise ValueError(f"SyntheticVideoConfig.channels must be 3 (RGB), got {self.channels!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"SyntheticVideoConfig.background must be one of {BACKGROUNDS}, got {self.background!r}")
        if isinstance(self.pan_speed, bool) or not isinstance(self.pan_speed, (int, float)) or \
                not 0.0 <= self.pan_speed <= 8.0:
            raise ValueError(f"SyntheticVideoConfig.pan_speed must be in [0, 8] pixels per frame, got {self.pan_speed!r}")
        if self.pan_speed and self.background != "texture":
            raise ValueError("SyntheticVideoConfig.pan_speed moves a textured background; set background='texture' "
                             "or pan_speed=0")
        if not (1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got "
                             f"{self.min_objects}, {self.max_objects}")

    @property
    def text_len(self) -> int:
        return SLOT_LEN * MAX_OBJECTS

    def to_dict(self) -> dict:
        return asdict(self)


def _text_tables(text_dim: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Fixed tables from a dedicated generator: identical on every machine and independent of config.seed,
    # so a model trained on one seed's clips understands captions of another seed's.
    g = torch.Generator().manual_seed(20250924)
    tokens = torch.randn(len(VOCAB), text_dim, generator=g, dtype=torch.float32)
    tokens[VOCAB["<pad>"]] = 0.0
    positions = 0.5 * torch.randn(text_len, text_dim, generator=g, dtype=torch.float32)
    return tokens, positions


_TABLE_CACHE: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def embed_caption_tokens(token_ids: torch.Tensor, text_dim: int) -> torch.Tensor:
    """Token ids ``(text_len,)`` int64 -> embedding ``(text_len, text_dim)`` float32 (deterministic).

    Padding tokens embed to exactly zero (no position term), so empty object slots carry no signal.
    """
    text_len = token_ids.shape[-1]
    key = (text_dim, text_len)
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = _text_tables(text_dim, text_len)
    tokens, positions = _TABLE_CACHE[key]
    emb = tokens[token_ids] + positions
    return emb * (token_ids != VOCAB["<pad>"]).unsqueeze(-1).to(emb.dtype)


def _motion_words(motion: str, direction: str, clockwise: bool) -> list[str]:
    if motion == "drifts":
        return ["drifts", direction]
    if motion == "crosses":
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
        return ["crosses", "from", opposite, "to", direction]
    if motion == "circles":
        return ["circles", "clockwise" if clockwise else "counterclockwise"]
    return ["bounces"]


def sample_scene(config: SyntheticVideoConfig, split: str, index: int) -> list[dict]:
    """The random description of clip ``index`` of ``split``: one dict per object (pure function)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {tuple(_SPLIT_STREAM)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], index])
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    F, H, W = config.frames, config.height, config.width
    objects = []
    for _ in range(n):
        size = SIZES[int(rng.integers(2))]
        r = (rng.uniform(0.08, 0.11) if size == "small" else rng.uniform(0.14, 0.19)) * min(H, W)
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        direction = DIRECTIONS[int(rng.integers(4))]
        clockwise = bool(rng.integers(2))
        t = np.arange(F, dtype=np.float64)
        if motion == "drifts":
            speed = rng.uniform(0.6, 1.4) * min(H, W) / 64
            cx0, cy0 = rng.uniform(0.25, 0.75) * W, rng.uniform(0.25, 0.75) * H
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
            cx, cy = cx0 + dx * speed * t, cy0 + dy * speed * t
        elif motion == "crosses":
            # Long range: from just outside one edge to just outside the opposite edge within the clip.
            lane = rng.uniform(0.2, 0.8)
            if direction in ("left", "right"):
                x = -r + (W + 2 * r) * (t / max(F - 1, 1))
                cx = x if direction == "right" else W - x
                cy = np.full(F, lane * H)
            else:
                y = -r + (H + 2 * r) * (t / max(F - 1, 1))
                cy = y if direction == "down" else H - y
                cx = np.full(F, lane * W)
        elif motion == "circles":
            radius = rng.uniform(0.12, 0.25) * min(H, W)
            ccx, ccy = rng.uniform(0.35, 0.65) * W, rng.uniform(0.35, 0.65) * H
            omega = (1 if clockwise else -1) * rng.uniform(0.6, 1.0) * 2 * math.pi / F
            phase = rng.uniform(0, 2 * math.pi)
            cx, cy = ccx + radius * np.cos(phase + omega * t), ccy + radius * np.sin(phase + omega * t)
        else:  # bounces: reflect off the walls (triangle wave of the unbounded path)
            speed = rng.uniform(2.0, 3.5) * min(H, W) / 64
            ang = rng.uniform(0, 2 * math.pi)
            lo_x, hi_x, lo_y, hi_y = r, W - r, r, H - r
            px = rng.uniform(lo_x, hi_x) + speed * math.cos(ang) * t
            py = rng.uniform(lo_y, hi_y) + speed * math.sin(ang) * t

            def reflect(p, lo, hi):
                span = hi - lo
                q = np.mod(p - lo, 2 * span)
                return lo + np.where(q > span, 2 * span - q, q)

            cx, cy = reflect(px, lo_x, hi_x), reflect(py, lo_y, hi_y)
        objects.append(dict(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
            size=size, radius=float(r), motion=motion, direction=direction, clockwise=clockwise,
            cx=cx.astype(np.float32), cy=cy.astype(np.float32),
            texture_period=float(rng.uniform(3.0, 5.0)), texture_angle=float(rng.uniform(0, math.pi)),
        ))
    background = dict(angle=float(rng.uniform(0, 2 * math.pi)), level=float(rng.uniform(0.05, 0.15)),
                      tint=rng.uniform(0.0, 0.06, size=3).astype(np.float32))
    if config.background == "texture":
        # Drawn after everything above, so the "gradient" stream of a clip is the same as before this option.
        speed = float(rng.uniform(0.0, config.pan_speed)) if config.pan_speed else 0.0
        heading = float(rng.uniform(0, 2 * math.pi))
        margin = int(math.ceil(speed * (F - 1))) + 2
        grids = []
        for cell in _TEXTURE_CELLS:
            gh, gw = int(math.ceil((H + 2 * margin) / cell)) + 2, int(math.ceil((W + 2 * margin) / cell)) + 2
            grids.append(rng.uniform(0.0, 1.0, size=(gh, gw)).astype(np.float32))
        background.update(
            texture=True, grids=grids, margin=margin, pan=(speed * math.cos(heading), speed * math.sin(heading)),
            # One dark and one mid colour, so the texture has contrast but stays darker than most objects.
            colours=np.stack([rng.uniform(0.02, 0.25, size=3), rng.uniform(0.3, 0.6, size=3)]).astype(np.float32))
    return [background] + objects


def caption_words(scene: list[dict]) -> list[list[str]]:
    """Per object, the caption words (without padding)."""
    return [[o["size"], o["colour"], o["texture"], o["shape"]]
            + _motion_words(o["motion"], o["direction"], o["clockwise"]) for o in scene[1:]]


def caption_text(scene: list[dict]) -> str:
    return " ; ".join(" ".join(ws) for ws in caption_words(scene))


def caption_token_ids(scene: list[dict]) -> torch.Tensor:
    """``(SLOT_LEN * MAX_OBJECTS,)`` int64: object ``j`` occupies slot ``j``; empty slots are padding."""
    ids = torch.full((SLOT_LEN * MAX_OBJECTS,), VOCAB["<pad>"], dtype=torch.int64)
    for j, words in enumerate(caption_words(scene)):
        words = words[:SLOT_LEN]
        ids[j * SLOT_LEN:j * SLOT_LEN + len(words)] = torch.tensor([VOCAB[w] for w in words])
    return ids


def _shape_coverage(shape: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from an approximate signed distance (pixels)."""
    if shape == "circle":
        sd = torch.sqrt(u * u + v * v) - r
    elif shape == "square":
        sd = torch.maximum(u.abs(), v.abs()) - 0.85 * r
    elif shape == "ring":
        d = torch.sqrt(u * u + v * v)
        sd = torch.maximum(d - r, 0.55 * r - d)
    elif shape == "triangle":
        # Equilateral triangle pointing up, centroid at the object centre: apex at v = -r, base at v = r/2;
        # the slanted sides have unit normals (+-0.87, -0.5).
        sd = torch.maximum(v - 0.5 * r, 0.87 * u.abs() - 0.5 * v - 0.5 * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return (0.5 - sd).clamp(0.0, 1.0)


def _texture(texture: str, u: torch.Tensor, v: torch.Tensor, period: float, angle: float) -> torch.Tensor:
    if texture == "plain":
        return torch.ones_like(u)
    if texture == "striped":
        s = u * math.cos(angle) + v * math.sin(angle)
        return 0.55 + 0.45 * (torch.sin(2 * math.pi * s / period) > 0).to(u.dtype)
    if texture == "checkered":
        return 0.55 + 0.45 * ((torch.floor(u / period) + torch.floor(v / period)) % 2)
    if texture == "dotted":
        du = torch.remainder(u, period) - period / 2
        dv = torch.remainder(v, period) - period / 2
        return 0.5 + 0.5 * (du * du + dv * dv < (0.3 * period) ** 2).to(u.dtype)
    raise ValueError(f"unknown texture {texture!r}")


def _value_noise(grid: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cell: float) -> torch.Tensor:
    """Smoothly interpolated lattice values (value noise) of ``grid`` ``(gh, gw)`` at pixel coordinates ``x``,
    ``y`` (broadcastable, >= 0) with lattice spacing ``cell`` pixels."""
    gx, gy = x / cell, y / cell
    x0, y0 = gx.floor(), gy.floor()
    fx, fy = gx - x0, gy - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep: no visible lattice creases
    x0, y0 = x0.long(), y0.long()

    def at(dy, dx):
        return grid[y0 + dy, x0 + dx]

    top = at(0, 0) * (1 - fx) + at(0, 1) * fx
    bottom = at(1, 0) * (1 - fx) + at(1, 1) * fx
    return top * (1 - fy) + bottom * fy


def _texture_background(bg: dict, F: int, H: int, W: int) -> torch.Tensor:
    """The ``"texture"`` backdrop ``(3, F, H, W)``: two octaves of value noise in world coordinates, seen
    through a camera that pans ``bg["pan"]`` pixels per frame, coloured between two random colours."""
    t = torch.arange(F, dtype=torch.float32).view(F, 1, 1)
    px, py = bg["pan"]
    x = torch.arange(W, dtype=torch.float32).view(1, 1, W) + 0.5 + bg["margin"] + px * t
    y = torch.arange(H, dtype=torch.float32).view(1, H, 1) + 0.5 + bg["margin"] + py * t
    x, y = x.expand(F, H, W), y.expand(F, H, W)
    value = sum(w * _value_noise(torch.from_numpy(g), x, y, cell)
                for g, cell, w in zip(bg["grids"], _TEXTURE_CELLS, _TEXTURE_WEIGHTS))
    c0, c1 = (torch.from_numpy(c).view(3, 1, 1, 1) for c in bg["colours"])
    return c0 + (c1 - c0) * value.unsqueeze(0)


def render_scene(scene: list[dict], config: SyntheticVideoConfig) -> torch.Tensor:
    """Render to ``(C, F, H, W)`` float32 in ``[-1, 1]``."""
    F, H, W = config.frames, config.height, config.width
    yy = torch.arange(H, dtype=torch.float32).view(1, H, 1) + 0.5
    xx = torch.arange(W, dtype=torch.float32).view(1, 1, W) + 0.5
    bg = scene[0]
    if bg.get("texture"):
        img = _texture_background(bg, F, H, W)
    else:
        grad = (xx * math.cos(bg["angle"]) + yy * math.sin(bg["angle"])) / max(H, W)
        base = bg["level"] + 0.08 * grad  # (1, H, W)
        img = (base.unsqueeze(0) + torch.from_numpy(bg["tint"]).view(3, 1, 1, 1)).expand(3, F, H, W).clone()
    for o in scene[1:]:
        u = xx - torch.from_numpy(o["cx"]).view(F, 1, 1)
        v = yy - torch.from_numpy(o["cy"]).view(F, 1, 1)
        cov = _shape_coverage(o["shape"], u, v, o["radius"])  # (F, H, W)
        tex = _texture(o["texture"], u, v, o["texture_period"], o["texture_angle"])
        colour = torch.tensor(COLOURS[o["colour"]], dtype=torch.float32).view(3, 1, 1, 1)
        img = img * (1 - cov) + (colour * tex) * cov
    return (img.clamp(0, 1) * 2 - 1).contiguous()


# Attribute targets for the evaluation feature network (sla/eval/features.py): multi-hot presence of each
# attribute value in the clip (order-free, so no object-to-slot assignment is needed).
ATTRIBUTE_NAMES = ([f"shape:{v}" for v in SHAPES] + [f"colour:{v}" for v in COLOURS]
                   + [f"texture:{v}" for v in TEXTURES] + [f"motion:{v}" for v in MOTIONS]
                   + [f"size:{v}" for v in SIZES])


def scene_labels(scene: list[dict]) -> torch.Tensor:
    """``(len(ATTRIBUTE_NAMES),)`` float32 multi-hot: 1 where some object in the clip has that value."""
    lab = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float32)
    for o in scene[1:]:
        for key in ("shape", "colour", "texture", "motion", "size"):
            lab[ATTRIBUTE_NAMES.index(f"{key}:{o[key]}")] = 1.0
    return lab


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """Map-style dataset of synthetic clips; item ``i`` is a pure function of ``(config, split, i)``.

    Args:
        split: ``"train"`` or ``"val"`` (held out: a disjoint random stream).
        size: number of clips exposed (the generator itself is unbounded).
        config: :class:`SyntheticVideoConfig`.

    Items are dicts: ``video`` ``(C, F, H, W)`` float32 in [-1, 1]; ``text_embeds`` ``(text_len, text_dim)``
    float32; ``token_ids`` ``(text_len,)`` int64; ``labels`` ``(22,)`` float32 attribute presence
    (see ``ATTRIBUTE_NAMES``); ``index`` int; ``caption`` str.
    """

    def __init__(self, split: str = "train", size: int = 100_000, config: SyntheticVideoConfig | None = None):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {tuple(_SPLIT_STREAM)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.split = split
        self.size = size
        self.config = config or SyntheticVideoConfig()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a {self.split} set of {self.size} clips")
        scene = sample_scene(self.config, self.split, int(index))
        ids = caption_token_ids(scene)
        return dict(
            video=render_scene(scene, self.config),
            text_embeds=embed_caption_tokens(ids, self.config.text_dim),
            token_ids=ids,
            labels=scene_labels(scene),
            index=int(index),
            caption=caption_text(scene),
        )


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep captions as a list."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], int):
            out[key] = torch.tensor(vals, dtype=torch.int64)
        else:
            out[key] = vals
    return out
