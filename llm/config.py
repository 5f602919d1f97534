"""The LLM run config: model, data, training, optimiser and samples, as one TOML preset."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import from_dict, load_toml, renamed, to_dict
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

    def __post_init__(self):
        if self.optim.head_lr and self.model.tie_embeddings:
            raise ConfigError("optim.head_lr is the rate of an untied output head; this model's head is tied to the "
                              "embedding (optim.embed_lr trains it): set model.tie_embeddings = false or drop head_lr")


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up for fast matmuls (GPT-2's 50,257
    becomes 50,304); the extra rows are never produced by the tokenizer."""
    return -(-n // multiple) * multiple


# [data] keys that are not the data: how attention treats documents (a modelling choice), where the
# cache lives, and what a run derives from its budget
NOT_DATA = ("doc_mask", "cache_dir", "max_tokens")


def data_keys(table: dict) -> dict:
    """A [data] table resolved (defaults filled in) without NOT_DATA: what two runs must share to
    train and evaluate on the same data."""
    cfg = to_dict(from_dict(TextDataConfig, renamed(TextDataConfig, dict(table)), "data."))
    return {k: v for k, v in cfg.items() if k not in NOT_DATA}


def data_table(preset: str) -> dict:
    """A preset's data (data_keys of its [data] table): what `--data_from` puts in place of a run's
    own, so that two recipes train and evaluate on the same data."""
    try:
        return data_keys(renamed(LLMRunConfig, load_toml(preset)).get("data", {}))
    except ConfigError as e:
        raise ConfigError(f"{preset}: {e}") from None
