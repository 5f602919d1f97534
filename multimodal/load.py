"""Rebuild a trained multimodal run for generation and evaluation: the model, its vocabulary, the
text tokenizer and the VQ-VAE it was trained with (both checked against the saved fingerprints)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llm.tokenizer import TextTokenizer, load_tokenizer
from shared.checkpoint import load_weights, resolve_checkpoint
from shared.config import from_dict, load_toml
from shared.errors import UserError
from shared.images import load_classes
from shared.run import find_run_dir
from vqvae.tokenizer import VQTokenizer

from .captions import CaptionTable, display_names
from .config import MultimodalRunConfig
from .model import MultimodalDecoder
from .sequences import SequenceLayout
from .vocab import VOCAB_FILE, Vocabulary


@dataclass
class MultimodalRun:
    model: MultimodalDecoder  # eval mode, gradients off
    cfg: MultimodalRunConfig
    vocab: Vocabulary
    layout: SequenceLayout
    captions: CaptionTable
    text: TextTokenizer
    vq: VQTokenizer
    classes: list[str]
    ckpt: Path
    ema: bool

    @property
    def banned_text(self) -> tuple[int, ...]:
        return (self.text.eos_id,)  # captions end with the joint <eos>, never the text tokenizer's own

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.text.encode(text)
        if not ids:
            raise UserError("the prompt is empty")
        if len(ids) > self.layout.max_caption:
            raise UserError(f"the prompt {text!r} takes {len(ids)} text tokens; this model reads at most {self.layout.max_caption}")
        return ids


def is_multimodal_run(path: str | Path) -> bool:
    try:
        return (find_run_dir(path) / VOCAB_FILE).is_file()
    except UserError:
        return False


def load_run(path: str | Path, device: str | torch.device = "cpu", ema: bool = True, vqvae: str | None = None) -> MultimodalRun:
    """A run folder or checkpoint; the EMA weights when asked and kept. `vqvae` overrides where the
    VQ-VAE is read from (the run's data.vqvae by default); it must be the very one trained with."""
    ckpt = resolve_checkpoint(path)
    run_dir = find_run_dir(ckpt)
    cfg = from_dict(MultimodalRunConfig, load_toml(run_dir / "config.toml"))
    vocab = Vocabulary.load(run_dir)
    text = load_tokenizer(str(run_dir / "tokenizer.json"))
    vocab.check_text(text.fingerprint, str(run_dir / "tokenizer.json"))
    source = vqvae or cfg.data.vqvae
    if vqvae is None and not Path(source).exists():
        raise UserError(f"the run's VQ-VAE {source} is not there any more: pass --vqvae with its new location")
    vq = VQTokenizer.from_run(source, device=device)
    vocab.check_vq(vq.fingerprint, source)
    classes = load_classes(run_dir, "scripts/train_multimodal.py")
    captions = CaptionTable(display_names(tuple(classes), cfg.data.class_names), cfg.data.templates, text.encode,
                            cfg.data.max_caption_tokens)
    layout = SequenceLayout(vocab, cfg.data.max_caption_tokens, cfg.data.input_image_loss)
    model = MultimodalDecoder(cfg.model, layout.length, vocab)
    ema = ema and cfg.train.ema_decay > 0
    load_weights(model, ckpt, ema=ema)
    return MultimodalRun(model.to(device).eval().requires_grad_(False), cfg, vocab, layout, captions, text, vq,
                         classes, ckpt, ema)
