"""Every trainer assembled as its script assembles it, small enough for seconds on a CPU: the
host-sync, compile, precision and GPU smoke tests build them here. Each takes config overrides
(`train.device="cuda"`, `train.compile=true`, `train.precision="bf16"`, ...)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from conftest import ROOT
from shared.config import load_config
from shared.images import BUILTIN_CLASSES, ImageBatches, ImageSet, generate_shapes
from shared.trainer import Trainer

# a learnable stream (a repeating ramp with sparse noise) with an end-of-text id for document masks
LLM_TOKENS = np.tile(np.arange(60, dtype=np.uint16), 400) ^ np.random.default_rng(0).integers(0, 2, 24_000).astype(np.uint16)
LLM_EOS = 0


def llm_trainer(run_dir: Path, *overrides: str, preset: str = "debug") -> Trainer:
    """The LLM preset on LLM_TOKENS at width 64, 2 layers, 32-token rows (no tokenizer: no samples)."""
    from llm.config import LLMRunConfig
    from llm.data import PackedBatches
    from llm.model import Decoder
    from llm.task import LanguageModelTask

    cfg = load_config(LLMRunConfig, ROOT / "configs" / "llm" / f"{preset}.toml",
                      ["model.d_model=64", "model.n_layers=2", "model.mlp_hidden=128", "model.vocab_size=64",
                       "data.seq_len=32", "train.batch_size=4", "train.grad_accum=2", "optim.warmup_steps=2", *overrides])
    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model, cfg.data.seq_len)
    data = PackedBatches(LLM_TOKENS[:20_000], cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    val = torch.from_numpy(LLM_TOKENS[20_000:20_000 + 8 * 33].astype(np.int64)).view(8, 33)
    task = LanguageModelTask(val, None, eval_batch_size=4, doc_mask=cfg.data.doc_mask, eos_id=LLM_EOS)
    return Trainer(model, task, data, cfg.train, cfg.optim, run_dir, quiet=True)


MOE = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.hidden=64", "model.moe.dense_layers=1"]
# the nanochat options of benchmarks/results/llm_recipe.md, the trainable ones all on
NANOCHAT = ["model.tie_embeddings=false", "model.embed_norm=true", 'model.init="nanochat"', "model.value_embeds=1",
            "model.value_gate=true", "model.residual_scalars=true", 'model.residual_init="nanochat"', "model.smear=true",
            "model.logit_softcap=15", "model.qk_scale=1.2", "optim.embed_lr=0.52", "optim.head_lr=0.0139",
            "optim.muon_beta2=0.9", "optim.muon_cautious_wd=true", "optim.muon_weight_decay=0.28",
            "optim.muon_momentum_warmup=4"]


def shapes(n_per_class: int, seed: int) -> ImageSet:
    """A small built-in set (the real one has 500 images per class, seconds to draw)."""
    images, labels = generate_shapes(n_per_class, seed)
    return ImageSet(images, labels, BUILTIN_CLASSES, f"built-in shapes, {len(labels)} images")


def vqvae_trainer(run_dir: Path, *overrides: str) -> Trainer:
    from vqvae.config import VQVAERunConfig
    from vqvae.model import VQVAE
    from vqvae.task import VQVAETask

    cfg = load_config(VQVAERunConfig, ROOT / "configs" / "vqvae" / "debug.toml", ["train.batch_size=8", *overrides])
    train, test = shapes(4, 0), shapes(1, 1)
    torch.manual_seed(cfg.train.seed)
    model = VQVAE(cfg.model, cfg.discriminator())
    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip)
    task = VQVAETask(test.images, cfg.loss, sample_images=cfg.sample.images, gan=cfg.gan)
    return Trainer(model, task, data, cfg.train, cfg.optim, run_dir, quiet=True)


def multimodal_trainer(run_dir: Path, *overrides: str) -> Trainer:
    """scripts/train_multimodal.py's assembly, over an untrained debug VQ-VAE (its codebook
    initialised by one training forward) instead of a trained run."""
    from llm.config import padded_vocab
    from llm.tokenizer import load_tokenizer
    from multimodal.captions import CaptionTable, display_names, render
    from multimodal.config import MultimodalRunConfig
    from multimodal.data import SequenceBatches, encode_images
    from multimodal.model import MultimodalDecoder
    from multimodal.sequences import SequenceLayout
    from multimodal.task import MultimodalTask
    from multimodal.vocab import Vocabulary
    from shared.cache import cache_root
    from shared.images import to_float
    from vqvae.config import VQVAERunConfig
    from vqvae.model import VQVAE
    from vqvae.tokenizer import VQTokenizer

    cfg = load_config(MultimodalRunConfig, ROOT / "configs" / "multimodal" / "debug.toml",
                      ["train.batch_size=8", "data.eval_images=10", "data.zero_shot_images=0", *overrides])
    train, test = shapes(2, 0), shapes(1, 1)
    vq_cfg = load_config(VQVAERunConfig, ROOT / "configs" / "vqvae" / "debug.toml")
    torch.manual_seed(0)
    vq_model = VQVAE(vq_cfg.model)
    vq_model.train()(to_float(train.images[:16]))
    vq = VQTokenizer(vq_model)

    names = display_names(train.classes, cfg.data.class_names)
    texts = [render(t, n) for n in names for t in cfg.data.templates]
    key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]
    text = load_tokenizer(cfg.data.tokenizer, train_texts=lambda: texts, cache_dir=cache_root() / "tokenizers",
                          corpus_key=f"captions-{key}")
    vocab = Vocabulary(text.vocab_size, vq.codebook_size, vq.grid_shape, text.fingerprint, vq.fingerprint, vq.source)
    captions = CaptionTable(names, cfg.data.templates, text.encode, cfg.data.max_caption_tokens)
    layout = SequenceLayout(vocab, cfg.data.max_caption_tokens, cfg.data.input_image_loss)
    cfg.model.vocab_size = padded_vocab(vocab.size)
    train_tokens = encode_images(train, "train", vq, progress=False)
    test_tokens = encode_images(test, "test", vq, progress=False)

    torch.manual_seed(cfg.train.seed)
    model = MultimodalDecoder(cfg.model, layout.length, vocab)
    data = SequenceBatches(train_tokens, captions, layout, cfg.train.batch_size, cfg.train.seed,
                           cfg.data.t2i_fraction, cfg.data.empty_caption, cfg.data.hflip)
    task = MultimodalTask(layout, captions, test_tokens.subset(cfg.data.eval_images), test_tokens.first(0), vq, cfg.loss,
                          cfg.sample, banned_text=(text.eos_id,), decode_text=text.decode)
    return Trainer(model, task, data, cfg.train, cfg.optim, run_dir, quiet=True)


def flow_matching_trainer(run_dir: Path, *overrides: str) -> Trainer:
    from flow_matching.config import FlowMatchingRunConfig
    from flow_matching.dit import DiT2D
    from flow_matching.task import FlowMatchingTask

    cfg = load_config(FlowMatchingRunConfig, ROOT / "configs" / "flow_matching" / "debug.toml",
                      ["train.batch_size=8", *overrides])
    train, test = shapes(2, 0), shapes(1, 1)
    cfg.model.num_classes = len(train.classes)
    torch.manual_seed(cfg.train.seed)
    model = DiT2D(cfg.model)
    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip)
    task = FlowMatchingTask(cfg.flow, cfg.sample, test, train.classes, eval_batch_size=cfg.train.batch_size)
    return Trainer(model, task, data, cfg.train, cfg.optim, run_dir, quiet=True)


def classifier_trainer(run_dir: Path, preset: str, *overrides: str) -> Trainer:
    from judge.classifier import ClassifierTask, build_classifier
    from judge.config import ClassifierRunConfig

    cfg = load_config(ClassifierRunConfig, ROOT / "configs" / "classifier" / f"{preset}.toml",
                      ["train.batch_size=16", *overrides])
    train, test = shapes(4, 0), shapes(1, 1)
    cfg.model.num_classes = len(train.classes)
    torch.manual_seed(cfg.train.seed)
    model = build_classifier(cfg.model)
    model.fit_stem(train.images, cfg.train.seed)
    model = model.to(memory_format=torch.channels_last)
    data = ImageBatches(train, cfg.train.batch_size, cfg.train.seed, hflip=cfg.data.hflip, alternate=cfg.data.alternate_flip)
    task = ClassifierTask(test, cfg.data.crop_pad, cfg.label_smoothing)
    return Trainer(model, task, data, cfg.train, cfg.optim, run_dir, quiet=True)
