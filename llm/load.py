"""A trained LLM run as scripts use it: config, tokenizer and weights from a run or checkpoint folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint import EMA_FILE, load_weights, resolve_checkpoint
from shared.config import from_dict, load_toml
from shared.errors import ConfigError, UserError
from shared.run import find_run_dir

from .config import LLMRunConfig
from .model import Decoder
from .tokenizer import TextTokenizer, load_tokenizer


@dataclass
class LLMRun:
    model: Decoder
    cfg: LLMRunConfig
    tokenizer: TextTokenizer
    ckpt: Path
    ema: bool  # the weights loaded are the EMA's


def load_llm_run(checkpoint: str | Path, use_ema: bool = True) -> LLMRun:
    """The model on the CPU in eval mode, with the EMA weights when the run kept them and
    `use_ema` (what the run's own evaluations used)."""
    ckpt = resolve_checkpoint(checkpoint)
    run_dir = find_run_dir(ckpt)
    try:
        cfg = from_dict(LLMRunConfig, load_toml(run_dir / "config.toml"))
    except ConfigError as e:  # another package's run
        raise UserError(f"{run_dir} is not a text LLM run of scripts/train_llm.py ({e})") from None
    tok = load_tokenizer(str(run_dir / "tokenizer.json"))
    model = Decoder(cfg.model, cfg.data.seq_len)
    ema = use_ema and (ckpt / EMA_FILE).is_file()
    load_weights(model, ckpt, ema=ema)
    return LLMRun(model.eval(), cfg, tok, ckpt, ema)
