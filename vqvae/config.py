"""The VQ-VAE run config: model (with its quantiser), loss, data, training, optimiser and samples,
as one TOML preset (configs/vqvae/*.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.errors import ConfigError
from shared.optim import OptimConfig
from shared.trainer import TrainConfig

from .model import VQVAEConfig


@dataclass
class LossConfig:
    recon: Literal["mse", "l1"] = "mse"
    commitment: float = 0.25  # beta on ||z - sg(q)||^2
    codebook: float = 1.0  # weight of ||sg(z) - q||^2; only trains anything with model.codebook_update = "loss"

    def __post_init__(self):
        if self.commitment < 0 or self.codebook < 0:
            raise ConfigError("loss.commitment and loss.codebook must be non-negative")


@dataclass
class ImageDataConfig:
    source: str = "builtin"  # builtin, cifar10 or an image folder (see shared/images.py)
    hflip: bool = True  # random left-right flips of training images
    eval_images: int = 1000  # test-split images (a fixed random subset) evaluated during training; 0 = all

    def __post_init__(self):
        if self.eval_images < 0:
            raise ConfigError(f"data.eval_images must be >= 0, got {self.eval_images}")


@dataclass
class SampleConfig:
    images: int = 32  # test images shown as original / reconstruction pairs

    def __post_init__(self):
        if self.images <= 0:
            raise ConfigError(f"sample.images must be positive, got {self.images}")


@dataclass
class VQVAERunConfig:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
