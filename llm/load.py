"""A trained LLM run as scripts use it: config, tokenizer and weights from a run or checkpoint folder.

A run keeps its tokenizer as `tokenizer.json` and that tokenizer's identity (size and fingerprint)
as `tokenizer_id.json`; every load checks the tokenizer against both the identity and the model's
vocabulary, so a tokenizer.json copied over from another run is refused instead of decoding
garbage. Runs from before the identity was recorded are checked by size only (`LLMRun.tokenizer_check`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint import EMA_FILE, load_weights, resolve_checkpoint, write_file_atomic
from shared.errors import UserError
from shared.run import find_run_dir, load_run_config

from .config import LLMRunConfig, padded_vocab
from .model import Decoder
from .tokenizer import TextTokenizer, load_tokenizer

TOKENIZER_FILE, TOKENIZER_ID = "tokenizer.json", "tokenizer_id.json"


@dataclass
class LLMRun:
    model: Decoder
    cfg: LLMRunConfig
    tokenizer: TextTokenizer
    ckpt: Path
    ema: bool  # the weights loaded are the EMA's
    tokenizer_check: str = "size and fingerprint"  # what the tokenizer was checked by

    @property
    def tokenizer_note(self) -> str:
        """What the scripts add to their header when the check was weaker than usual."""
        return "" if self.tokenizer_check == "size and fingerprint" else f", tokenizer checked by {self.tokenizer_check}"


def save_run_tokenizer(tok: TextTokenizer, run_dir: Path) -> None:
    """tokenizer.json and its identity, each written atomically."""
    write_file_atomic(run_dir / TOKENIZER_FILE, lambda p: p.write_text(tok.tok.to_str(pretty=True)), "the tokenizer")
    identity = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "spec": tok.spec}
    write_file_atomic(run_dir / TOKENIZER_ID, lambda p: p.write_text(json.dumps(identity, indent=2) + "\n"),
                      "the tokenizer identity")


def recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the tokenizer the run was trained with, or None for a run from before it was recorded."""
    path = run_dir / TOKENIZER_ID
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["fingerprint"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt: {type(e).__name__}: {e}") from None


def check_tokenizer(tok: TextTokenizer, model_vocab: int, run_dir: Path, what: str) -> str:
    """Refuse a tokenizer that does not fit the model's (padded) vocabulary or is not the one the run
    recorded; returns what it was checked by."""
    if padded_vocab(tok.vocab_size) != model_vocab:
        raise UserError(f"{what} has {tok.vocab_size:,} tokens but the model of {run_dir} has {model_vocab:,} "
                        f"embedding rows (a tokenizer of {model_vocab - 63:,} to {model_vocab:,} tokens): it is "
                        "another run's tokenizer")
    expected = recorded_fingerprint(run_dir)
    if expected is None:
        return "size only (the run predates tokenizer fingerprints)"
    if tok.fingerprint != expected:
        raise UserError(f"{what} (fingerprint {tok.fingerprint}) is not the tokenizer {run_dir} was trained with "
                        f"({expected}): its ids mean other text")
    return "size and fingerprint"


def check_resumed_tokenizer(tok: TextTokenizer, run_dir: Path) -> None:
    """A resumed run reads its data with the tokenizer it was trained with (a Hub tokenizer can
    change upstream, a cache can be rebuilt): checked before anything is written."""
    expected = recorded_fingerprint(run_dir)
    if expected is None and (run_dir / TOKENIZER_FILE).is_file():
        expected = load_tokenizer(str(run_dir / TOKENIZER_FILE)).fingerprint
    if expected is not None and tok.fingerprint != expected:
        raise UserError(f"the tokenizer {tok.spec} (fingerprint {tok.fingerprint}) is not the one {run_dir} was "
                        f"trained with ({expected}): a resumed run keeps its tokenizer")


def load_llm_run(checkpoint: str | Path, use_ema: bool = True) -> LLMRun:
    """The model on the CPU in eval mode, with the EMA weights when the run kept them and
    `use_ema` (what the run's own evaluations used)."""
    ckpt = resolve_checkpoint(checkpoint)
    run_dir = find_run_dir(ckpt)
    cfg = load_run_config(run_dir, LLMRunConfig, "llm")
    path = run_dir / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the run's tokenizer is needed to read and write its token ids")
    tok = load_tokenizer(str(path))
    checked = check_tokenizer(tok, cfg.model.vocab_size, run_dir, str(path))
    model = Decoder(cfg.model, cfg.data.seq_len)
    ema = use_ema and (ckpt / EMA_FILE).is_file()
    load_weights(model, ckpt, ema=ema)
    return LLMRun(model.eval(), cfg, tok, ckpt, ema, checked)
