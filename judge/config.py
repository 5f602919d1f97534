"""The classifier's run config, and its optimiser: shared's Muon + AdamW split, with Nesterov SGD
(airbench's CIFAR-10 recipe) and a head rate as options for what Muon does not train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from shared.errors import ConfigError
from shared.optim import OptimConfig, adamw
from shared.trainer import TrainConfig


@dataclass
class ClassifierModelConfig:
    arch: Literal["resnet9", "airbench"] = "resnet9"
    width: int = 64  # channels of the first stage; ResNet-9's later stages use 2x, 4x, 8x, airbench's 4x, 4x
    num_classes: int = 0  # 0: taken from the data
    head_scale: float = 0.125  # logits are scaled down, which trains faster (Page; airbench: 1 / channels)
    flip_tta: bool = True  # predictions average the logits of each image and its mirror image
    shift_tta: bool = False  # ... and, at half weight, of the image moved one pixel up-left and down-right
    whiten: bool = False  # stem: a frozen 2x2 conv that whitens pixel patches (PatchWhitening), not a learned conv
    filter_norm: bool = False  # rescale each conv's filters to norm sqrt(out channels) after every step (airbench)

    def __post_init__(self):
        if self.width <= 0:
            raise ConfigError("model.width must be positive")
        if self.arch not in ("resnet9", "airbench"):
            raise ConfigError(f"model.arch must be \"resnet9\" or \"airbench\", got {self.arch!r}")
        if self.arch == "airbench" and not self.whiten:
            raise ConfigError("model.arch = \"airbench\" needs model.whiten = true (its stem is the whitening conv)")


@dataclass
class ClassifierDataConfig:
    source: str = "cifar10"
    drop_empty_classes: bool = False  # leave out class folders with no training images (with a note) instead of refusing them
    crop_pad: int = 4  # random translations of up to this many pixels (reflection padding)
    hflip: bool = True
    eval_images: int = 10_000  # test images scored at each evaluation (the whole CIFAR-10 test split)
    alternate_flip: bool = False  # mirror each image in every other epoch instead of at random


@dataclass
class ClassifierOptimConfig(OptimConfig):
    # what trains the rest: AdamW, or SGD with Nesterov momentum (airbench's CIFAR-10 recipe) at
    # adam_lr, whose weight decay then shrinks every group by adam_lr * adam_weight_decay per step
    other_optimizer: Literal["adamw", "sgd"] = "adamw"
    sgd_momentum: float = 0.0  # that SGD's Nesterov momentum, in (0, 1) (airbench: 0.85); only with "sgd"

    def __post_init__(self):
        super().__post_init__()
        if self.other_optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optim.other_optimizer must be \"adamw\" or \"sgd\", got {self.other_optimizer!r}")
        sgd = self.other_optimizer == "sgd"
        if not (0.0 < self.sgd_momentum < 1.0 if sgd else self.sgd_momentum == 0.0):
            raise ConfigError(f"optim.sgd_momentum must be in (0, 1) with other_optimizer = \"sgd\" and unset "
                              f"otherwise, got {self.sgd_momentum} with {self.other_optimizer!r}")

    def rest_optimizer(self, model: nn.Module, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW or Nesterov SGD for `params`; the classifier's head (its HEAD_NAMES) at head_lr when it is set."""
        groups = self.lr_groups(model, params)
        if self.other_optimizer == "sgd":
            for g in groups:  # torch's decay is lr * weight_decay per step: the same fraction in every group
                g["weight_decay"] = self.adam_lr * self.adam_weight_decay / g["lr"]
            return torch.optim.SGD(groups, momentum=self.sgd_momentum, nesterov=True, fused=True)  # fused: see adamw
        return adamw(groups, self)


@dataclass
class ClassifierRunConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: ClassifierOptimConfig = field(default_factory=ClassifierOptimConfig)
    label_smoothing: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.model.flip_tta and not self.data.hflip:
            raise ConfigError("model.flip_tta needs data.hflip: mirror images are only fair to a model trained on them")
        if self.data.alternate_flip and not self.data.hflip:
            raise ConfigError("data.alternate_flip needs data.hflip")
