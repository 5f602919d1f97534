"""The multimodal run config: model, data (images, VQ-VAE, captions, the training mix), loss
weights, samples, training and optimiser, as one TOML preset (configs/multimodal/*.toml)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.errors import ConfigError
from shared.grid import GridSampleConfig
from shared.optim import OptimConfig
from shared.trainer import TrainConfig

from .captions import DEFAULT_TEMPLATES
from .model import MultimodalModelConfig


@dataclass
class MultimodalDataConfig:
    source: str = "builtin"  # image data: builtin | cifar10 | PATH of an image folder (shared/images.py)
    drop_empty_classes: bool = False  # leave out class folders with no training images (with a note) instead of refusing them
    vqvae: str = ""  # the VQ-VAE run (or checkpoint) whose tokens the model reads and writes (--vqvae)
    tokenizer: str = "bpe:512"  # text tokenizer (llm/tokenizer.py); bpe:N is trained on the captions
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # caption templates: {name} the class, {a} its article
    class_names: tuple[str, ...] = ()  # words for the classes, in class order; () = the folder names
    max_caption_tokens: int = 16
    # share of text-to-image sequences, the rest image-to-text: 0.8 drew the classes better than 0.5
    # (class accuracy 0.44 vs 0.32, zero-shot 0.20 vs 0.24; debug, 2 seeds; benchmarks/results/multimodal.md)
    t2i_fraction: float = 0.8
    empty_caption: float = 0.1  # share of text-to-image sequences trained with <empty> (for guidance)
    input_image_loss: bool = True  # also train the image an image-to-text sequence reads (multimodal/sequences.py)
    hflip: bool = True  # draw each image or its mirror image (both are encoded once)
    eval_images: int = 1000  # test images (a fixed subset) for the validation losses
    zero_shot_images: int = 500  # test images for the zero-shot accuracy at each evaluation; 0 = none

    def __post_init__(self):
        if self.max_caption_tokens < 1:
            raise ConfigError("data.max_caption_tokens must be at least 1")
        for name in ("t2i_fraction", "empty_caption"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1], got {v}")
        if self.eval_images < 2 or self.zero_shot_images < 0:
            raise ConfigError("data.eval_images must be at least 2 (one sequence of each direction) and "
                              "data.zero_shot_images non-negative")


@dataclass
class LossConfig:
    """Per-token weights: the loss is sum(w * cross-entropy) / sum(w) over the trained tokens."""

    text_weight: float = 1.0
    visual_weight: float = 1.0

    def __post_init__(self):
        if not (self.text_weight >= 0 and self.visual_weight >= 0) or self.text_weight + self.visual_weight <= 0:
            raise ConfigError("loss.text_weight and loss.visual_weight must be non-negative and not both 0")


def check_sampling(temperature: float, top_k: int, top_p: float, cfg_scale: float, where: str = "sample.") -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"{where}temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"{where}top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{where}top_p must be in (0, 1], got {top_p}")
    if not math.isfinite(cfg_scale):
        raise ConfigError(f"{where}cfg_scale must be a finite number, got {cfg_scale}")


@dataclass
class SampleConfig(GridSampleConfig):
    """What the trainer's sample hook draws (class grid, captions of test images)."""

    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    captions: int = 10  # test images captioned at each sample hook

    def __post_init__(self):
        super().__post_init__()
        check_sampling(self.temperature, self.top_k, self.top_p, self.cfg_scale)
        if self.captions < 0:
            raise ConfigError(f"sample.captions must be non-negative, got {self.captions}")


@dataclass
class MultimodalRunConfig:
    model: MultimodalModelConfig = field(default_factory=MultimodalModelConfig)
    data: MultimodalDataConfig = field(default_factory=MultimodalDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
