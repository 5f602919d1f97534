"""A labelled class grid: one row per class, the class name written to the left of its row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .images import image_grid

PAD = 2  # image_grid's border


@dataclass
class GridSampleConfig:
    """The `[sample]` settings every class-conditional image model shares: a grid of `per_class`
    images of each class, guided by `cfg_scale`, drawn from `seed`. Each package adds its own."""

    per_class: int = 8
    cfg_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.per_class <= 0:
            raise ConfigError(f"sample.per_class must be positive, got {self.per_class}")


def class_grid(images: torch.Tensor, classes: list[str] | tuple[str, ...], per_class: int) -> torch.Tensor:
    """uint8 [K * per_class, 3, H, W] (class-major) -> uint8 [3, H', W'] with a name column."""
    from PIL import Image, ImageDraw, ImageFont

    grid = image_grid(images, nrow=per_class)  # [3, K*(H+PAD)+PAD, per_class*(W+PAD)+PAD]
    font = ImageFont.load_default(size=11)  # the default size 10 renders spaces 2 pixels wide
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(str(c), font=font) for c in classes)) + 2 * PAD + 4
    row_h = images.shape[-2] + PAD
    canvas = Image.new("RGB", (label_w + grid.shape[2], grid.shape[1]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(classes):
        top, bottom, _, _ = _text_box(draw, str(name), font)
        y = PAD + k * row_h + (row_h - PAD - (bottom - top)) // 2 - top
        draw.text((PAD + 2, y), str(name), fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def _text_box(draw, text: str, font) -> tuple[int, int, int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return top, bottom, left, right
