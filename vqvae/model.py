"""The VQ-VAE: a convolutional encoder and decoder with residual blocks around a vector quantiser.

Works at the data's native resolution (CIFAR-10's 32x32). Each entry of `channels` is one
resolution level; every level after the first halves the resolution, so channels of length 3
downsample by 4 (32x32 -> an 8x8 grid of 64 tokens) and length 2 by 2 (16x16, 256 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shared.contracts import ModelHooks
from shared.errors import ConfigError

from .quantizer import QuantizerOutput, VectorQuantizer


@dataclass
class VQVAEConfig:
    image_size: int = 32  # side of the square images it is trained on (the data is checked against it)
    downsample: int = 4  # image side / token-grid side
    channels: tuple[int, ...] = (64, 128, 256)  # one per resolution level, log2(downsample) + 1 of them
    res_blocks: int = 2  # residual blocks per level
    code_dim: int = 64  # dimension of a code vector
    codebook_size: int = 1024
    codebook_update: Literal["ema", "loss"] = "ema"
    ema_decay: float = 0.99  # codebook EMA (not the trainer's weight EMA)
    dead_threshold: float = 1.0  # a code used less than this many times per batch (EMA) is replaced
    dead_reseed: Literal["random", "farthest"] = "random"  # ... by random batch vectors or those farthest from every code
    kmeans_iters: int = 10  # k-means iterations for the data-dependent init; 0 = sampled encoder outputs
    l2_codes: bool = False  # l2-normalise codes and encoder outputs (cosine lookup)
    gradient: Literal["ste", "rotation"] = "ste"  # straight-through or the rotation trick

    def __post_init__(self):
        levels = math.log2(self.downsample) if self.downsample > 0 else -1
        if levels < 1 or levels != int(levels):
            raise ConfigError(f"model.downsample must be a power of two >= 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ConfigError(f"model.image_size {self.image_size} is not divisible by model.downsample {self.downsample}")
        if len(self.channels) != int(levels) + 1:
            raise ConfigError(f"model.channels needs log2(downsample) + 1 = {int(levels) + 1} entries for "
                              f"downsample {self.downsample}, got {len(self.channels)}")
        if min(self.channels) <= 0 or any(c % 8 for c in self.channels):
            raise ConfigError(f"model.channels must be positive multiples of 8 (GroupNorm groups), got {list(self.channels)}")
        if self.codebook_size < 2 or self.codebook_size > 65536:
            raise ConfigError(f"model.codebook_size must be in [2, 65536] (tokens are stored as uint16), got {self.codebook_size}")
        if self.code_dim <= 0 or self.res_blocks < 0 or self.kmeans_iters < 0 or self.dead_threshold < 0:
            raise ConfigError("model: code_dim must be positive; res_blocks, kmeans_iters and dead_threshold non-negative")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in (0, 1), got {self.ema_decay}")


def norm(ch: int) -> nn.GroupNorm:
    # 32 groups for wide layers; never under 4 channels a group (narrower groups measured slower to train)
    return nn.GroupNorm(math.gcd(32, ch // 4), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            c_in = ch[i - 1] if i else ch[0]
            if i:
                layers.append(nn.Conv2d(c_in, c_in, 4, stride=2, padding=1))  # halve the resolution
            for j in range(cfg.res_blocks):
                layers.append(ResBlock(c_in if j == 0 else c, c))
            if cfg.res_blocks == 0 and c_in != c:
                layers.append(nn.Conv2d(c_in, c, 1))
        layers += [norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            c_in = ch[i - 1] if i else ch[0]
            if i:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_in, 3, padding=1)]
            for j in range(cfg.res_blocks):
                layers.append(ResBlock(c_in if j == 0 else c, c))
            if cfg.res_blocks == 0 and c_in != c:
                layers.append(nn.Conv2d(c_in, c, 1))
        layers += [norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # [B, 3, H, W], unclamped, in the images' [-1, 1] scale
    quant: QuantizerOutput


class VQVAE(ModelHooks, nn.Module):
    # the codebook (a parameter only when trained by its loss) belongs with AdamW, never Muon
    # (shared.optim.split_params)
    ADAM_NAMES = ("quantizer",)

    def __init__(self, cfg: VQVAEConfig, discriminator: nn.Module | None = None):
        """`discriminator`: the optional adversarial loss's (vqvae/discriminator.py), kept here so
        checkpoints hold it and the run's optimisers train it; the tokenizer drops it."""
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, update=cfg.codebook_update,
                                         decay=cfg.ema_decay, dead_threshold=cfg.dead_threshold,
                                         kmeans_iters=cfg.kmeans_iters, l2_normalize=cfg.l2_codes,
                                         gradient=cfg.gradient, reseed=cfg.dead_reseed)
        self.decoder = Decoder(cfg)
        self.discriminator = discriminator

    def after_optimizer_step(self) -> None:
        """Called by the trainer after each optimiser step: counts the steps the discriminator's start waits for."""
        if self.discriminator is not None:
            self.discriminator.count_step()

    @property
    def grid_shape(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.downsample
        return side, side

    @torch.no_grad()
    def initialise_codebook(self, images: torch.Tensor) -> None:
        """Before the first training step, in eager mode: k-means on these images' encodings."""
        if not self.quantizer.ready:
            self.quantizer.initialise_from(self.encoder(images))

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        quant = self.quantizer(self.encoder(images))
        return VQVAEOutput(self.decoder(quant.quantized), quant)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B, 3, H, W] in [-1, 1] -> token grid int64 [B, H/f, W/f]."""
        z = self.quantizer._prepare(self.encoder(images).float())
        b, d, h, w = z.shape
        return self.quantizer.lookup(z.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, h, w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grid [B, h, w] -> float images [B, 3, H, W] (unclamped, [-1, 1] scale)."""
        q = self.quantizer.embed(tokens.long()).permute(0, 3, 1, 2)
        return self.decoder(q)
