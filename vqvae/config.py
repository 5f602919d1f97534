"""The VQ-VAE run config: model (with its quantiser), loss, data, training, optimiser and samples,
as one TOML preset (configs/vqvae/*.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.errors import ConfigError
from shared.images import ImageDataConfig
from shared.optim import OptimConfig
from shared.trainer import TrainConfig

from .discriminator import PatchDiscriminator
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
class GANConfig:
    """An adversarial loss (vqvae/discriminator.py); off unless weight > 0."""

    weight: float = 0.0  # weight of the generator's hinge term; 0 = no discriminator at all
    start: int = 0  # optimiser steps of reconstruction-only training before the discriminator and its term begin
    adaptive: bool = False  # scale the weight by ||grad rec|| / ||grad adv|| at the decoder's last layer (VQGAN)
    channels: int = 64  # the discriminator's first conv width (doubled at each further layer)
    layers: int = 2  # stride-2 conv layers: a logit per 4x4 patch of positions for 2

    def __post_init__(self):
        if self.weight < 0 or self.start < 0:
            raise ConfigError("gan.weight and gan.start must be non-negative")
        if self.channels <= 0 or self.channels % 8 or self.layers < 1:
            raise ConfigError(f"gan.channels must be a positive multiple of 8 and gan.layers >= 1, "
                              f"got {self.channels} and {self.layers}")


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
    gan: GANConfig = field(default_factory=GANConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        # An EMA-updated codebook is a buffer, which the trainer's EMA copies from the live model: the
        # averaged encoder and decoder would look codes up in a codebook fitted to other weights. A
        # "loss" codebook is a parameter and is averaged with them.
        if self.train.ema_decay > 0 and self.model.codebook_update == "ema":
            raise ConfigError(f"train.ema_decay = {self.train.ema_decay} would pair averaged weights with the live "
                              "codebook, which model.codebook_update = \"ema\" keeps: set train.ema_decay = 0 or "
                              "model.codebook_update = \"loss\"")
        if self.model.image_size % 2 ** self.gan.layers:
            raise ConfigError(f"gan.layers = {self.gan.layers} halves the {self.model.image_size}-pixel images too often")

    def discriminator(self) -> PatchDiscriminator | None:
        """The discriminator this run trains (part of the model, so checkpointed), or None."""
        return PatchDiscriminator(self.gan.channels, self.gan.layers) if self.gan.weight > 0 else None
