"""Rendering of synthetic scenes: coloured shapes on a grid whose cells line up with the vision
tower's merged patches (Qwen2.5-VL: one merged image token per 28x28 px cell), so the image token
that shows each object is known exactly."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND = (40, 40, 40)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its shape, colour and grid cell (row, column)."""

    shape: str
    colour: str
    row: int
    col: int


def cell_index(row: int, col: int, grid: int) -> int:
    """Row-major index of a grid cell: the order of Qwen2.5-VL's merged image tokens."""
    return row * grid + col


def _polygon(cx: float, cy: float, radius: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(phase + 2 * math.pi * k / n),
            cy + radius * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    """Draw one shape of half-width ``size`` centred on ``(cx, cy)``."""
    s = size
    if shape == "circle":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.85 * s, cy - 0.85 * s, cx + 0.85 * s, cy + 0.85 * s], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * s, 1.1 * s, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, 1.05 * s, 4, 0.0), fill=fill)
    elif shape == "cross":
        w = 0.32 * s
        draw.rectangle([cx - s, cy - w, cx + s, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - s, cx + w, cy + s], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], outline=fill, width=max(2, round(0.35 * s)))
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.1 * s if k % 2 == 0 else 0.45 * s
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - s, cy - 0.3 * s, cx + s, cy + 0.3 * s], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render_scene(
    objects: list[SceneObject],
    grid: int,
    cell_px: int = 28,
    *,
    jitter: int = 2,
    seed: int = 0,
    colour_jitter: int = 15,
    size_range: tuple[float, float] = (0.30, 0.38),
    pixel_noise: float = 0.0,
) -> Image.Image:
    """Render a scene as an RGB image of ``grid * cell_px`` pixels a side.

    Each object is drawn inside its own cell, with position jitter (pixels), size (fraction of the
    cell), colour jitter (per channel) and optional Gaussian pixel noise (standard deviation in 0-255
    units), all deterministic in ``seed``, so that the vision tower must learn features, not pixel values.
    """
    rng = random.Random(seed)
    side = grid * cell_px
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        if not (0 <= obj.row < grid and 0 <= obj.col < grid):
            raise ValueError(f"object {obj} lies outside the {grid}x{grid} grid")
        cx = (obj.col + 0.5) * cell_px + rng.uniform(-jitter, jitter)
        cy = (obj.row + 0.5) * cell_px + rng.uniform(-jitter, jitter)
        size = cell_px * rng.uniform(*size_range)
        base = COLOURS[obj.colour]
        fill = tuple(int(min(255, max(0, c + rng.randint(-colour_jitter, colour_jitter)))) for c in base)
        draw_shape(draw, obj.shape, cx, cy, size, fill)
    if pixel_noise > 0:
        import numpy as np

        noise = np.random.default_rng(seed).normal(0.0, pixel_noise, (side, side, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    return image


def blank_like(image: Image.Image) -> Image.Image:
    """A blank image of the same size (the background colour only)."""
    return Image.new("RGB", image.size, BACKGROUND)
