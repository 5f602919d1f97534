"""Rebuild a trained multimodal run for generation and evaluation: the model, its vocabulary, the
text tokenizer and the VQ-VAE it was trained with (both checked against the saved fingerprints).

A run keeps a copy of its VQ-VAE in `RUN/vqvae/` (config and the weights it was trained on), so
resuming, pruning, moving or deleting the VQ-VAE run never makes it unusable. Runs from before the
copy read the VQ-VAE from the checkpoint they recorded, then from data.vqvae."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llm.config import padded_vocab
from llm.tokenizer import TextTokenizer, load_tokenizer
from shared.checkpoint import load_weights, resolve_checkpoint
from shared.errors import UserError
from shared.images import load_classes
from shared.run import find_run_dir, load_run_config
from vqvae.tokenizer import VQTokenizer

from .captions import CaptionTable, display_names
from .config import MultimodalRunConfig
from .model import MultimodalDecoder
from .sequences import SequenceLayout
from .vocab import VOCAB_FILE, Vocabulary

VQ_COPY = "vqvae"  # the run's own copy of the VQ-VAE it was trained on


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


def run_vqvae(run_dir: Path, vocab: Vocabulary, recorded: str, moved: str | None = None,
              device: str | torch.device = "cpu") -> VQTokenizer:
    """The VQ-VAE a run was trained on, checked by fingerprint: from `moved` when given (where it is
    now), else the run's own copy, else (older runs) the checkpoint the vocabulary recorded, then
    `recorded` (data.vqvae)."""
    if moved is not None:
        candidates = [moved]
    elif (run_dir / VQ_COPY).is_dir():
        candidates = [str(run_dir / VQ_COPY)]
    else:
        candidates = [c for c in dict.fromkeys((vocab.vq_source, recorded)) if c and Path(c).exists()]
        if not candidates:
            raise UserError(f"the run's VQ-VAE {recorded} is not there any more: pass --vqvae with its new location")
    for source in candidates[:-1]:
        vq = VQTokenizer.from_run(source, device=device)
        if vq.fingerprint == vocab.vq_fingerprint:
            return vq
    vq = VQTokenizer.from_run(candidates[-1], device=device)
    vocab.check_vq(vq.fingerprint, candidates[-1])
    return vq


def load_run(path: str | Path, device: str | torch.device = "cpu", ema: bool = True, vqvae: str | None = None) -> MultimodalRun:
    """A run folder or checkpoint; the EMA weights when asked and kept. `vqvae` overrides where the
    VQ-VAE is read from (run_vqvae); it must be the very one trained with."""
    ckpt = resolve_checkpoint(path)
    run_dir = find_run_dir(ckpt)
    cfg = load_run_config(run_dir, MultimodalRunConfig, "multimodal")
    vocab = Vocabulary.load(run_dir)
    text = load_tokenizer(str(run_dir / "tokenizer.json"))
    vocab.check_text(text.fingerprint, str(run_dir / "tokenizer.json"))
    if text.vocab_size != vocab.text_size or padded_vocab(vocab.size) != cfg.model.vocab_size:
        raise UserError(f"{run_dir}: the text tokenizer has {text.vocab_size:,} tokens and the vocabulary {vocab.size:,} "
                        f"ids, but the model was built for {vocab.text_size:,} text tokens and {cfg.model.vocab_size:,} "
                        "embedding rows")
    vq = run_vqvae(run_dir, vocab, cfg.data.vqvae, vqvae, device)
    classes = load_classes(run_dir, "scripts/train_multimodal.py")
    captions = CaptionTable(display_names(tuple(classes), cfg.data.class_names), cfg.data.templates, text.encode,
                            cfg.data.max_caption_tokens)
    layout = SequenceLayout(vocab, cfg.data.max_caption_tokens, cfg.data.input_image_loss)
    model = MultimodalDecoder(cfg.model, layout.length, vocab)
    ema = ema and cfg.train.ema_decay > 0
    load_weights(model, ckpt, ema=ema)
    return MultimodalRun(model.to(device).eval().requires_grad_(False), cfg, vocab, layout, captions, text, vq,
                         classes, ckpt, ema)
