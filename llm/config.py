"""The LLM run config: model, data, training, optimiser and samples, as one TOML preset."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import ConfigError
from shared.optim import OptimConfig
from shared.trainer import TrainConfig

from .data import TextDataConfig
from .model import DecoderConfig


@dataclass
class SampleConfig:
    prompts: tuple[str, ...] = ("Once upon a time",)
    max_new_tokens: int = 64

    def __post_init__(self):
        if any(not p.strip() for p in self.prompts):
            raise ConfigError("sample.prompts must not contain empty prompts")
        if self.max_new_tokens < 1:
            raise ConfigError("sample.max_new_tokens must be at least 1")


@dataclass
class LLMRunConfig:
    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up for fast matmuls (GPT-2's 50,257
    becomes 50,304); the extra rows are never produced by the tokenizer."""
    return -(-n // multiple) * multiple
