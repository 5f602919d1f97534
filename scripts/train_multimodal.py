"""Train the multimodal transformer: text-to-image and image-to-text over one vocabulary of text
tokens and VQ-VAE visual tokens.

    python scripts/train_vqvae.py --config configs/vqvae/debug.toml --experiment_name vq-debug
    python scripts/train_multimodal.py --config configs/multimodal/debug.toml --vqvae runs/vq-debug
    python scripts/train_multimodal.py --config configs/multimodal/cifar10.toml --vqvae runs/vq-cifar10 --data /path/to/cifar10-jpeg
    python scripts/train_multimodal.py --experiment_name debug --resume        # continue an interrupted run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.config import padded_vocab
from llm.tokenizer import load_tokenizer
from multimodal.captions import CaptionTable, display_names, render
from multimodal.config import MultimodalRunConfig
from multimodal.data import SequenceBatches, encode_images
from multimodal.load import VQ_COPY, run_vqvae
from multimodal.model import MultimodalDecoder
from multimodal.sampling import clamp_top_k
from multimodal.sequences import SequenceLayout
from multimodal.task import MultimodalTask
from multimodal.vocab import Vocabulary
from shared.cache import cache_root
from shared import distributed
from shared.errors import ConfigError, UserError, run_main
from shared.images import load_train_test, save_classes
from shared.run import add_common_args, describe_training, load_run_config, report, resolve_run, same_setting, save_config
from shared.trainer import Trainer, count_params, pick_device, refuse_finished
from vqvae.tokenizer import VQTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--vqvae", help="VQ-VAE run folder or checkpoint (scripts/train_vqvae.py); overrides data.vqvae")
    p.add_argument("--train_images", type=int, help="image budget (overrides train.budget): sequences, one image each")
    args = p.parse_intermixed_args()  # overrides may sit before or after the flags
    # data.vqvae is where the VQ-VAE is, not which one: a resume may give its new location, and the
    # fingerprint in vocab.json says whether it is the one trained on
    cfg, run_dir, resume = resolve_run(args, MultimodalRunConfig, {
        "data.source": args.data, "data.vqvae": args.vqvae, "train.budget": args.train_images}, package="multimodal",
        free=("data.vqvae",))
    if not cfg.data.vqvae:
        raise UserError("no VQ-VAE given: pass --vqvae RUN (a run of scripts/train_vqvae.py) or set data.vqvae")
    cfg.data.vqvae = str(Path(cfg.data.vqvae).resolve())  # the run is read later from other folders
    refuse_finished(resume, run_dir, cfg.train.budget, "images")
    local = distributed.setup()
    device = pick_device(cfg.train.device, local.local_rank if local.active else None)
    if resume is not None:  # the VQ-VAE trained on: the run's own copy unless a new location is given
        vocab = Vocabulary.load(run_dir)
        recorded = load_run_config(run_dir, MultimodalRunConfig, "multimodal").data.vqvae
        moved = None if same_setting(recorded, cfg.data.vqvae) else cfg.data.vqvae
        vq = run_vqvae(run_dir, vocab, recorded, moved, device)
    else:
        vq = VQTokenizer.from_run(cfg.data.vqvae, device=device)

    s = vq.image_size  # both splits checked against what the VQ-VAE encodes, before any work
    train, test = load_train_test(cfg.data.source, shape=(3, s, s), drop_empty_classes=cfg.data.drop_empty_classes)
    names = display_names(train.classes, cfg.data.class_names)

    if resume is not None:  # the run's own tokenizer (resolve_run kept its layout: data.* is fixed on resume)
        text = load_tokenizer(str(run_dir / "tokenizer.json"))
        vocab.check_text(text.fingerprint, str(run_dir / "tokenizer.json"))
    else:
        texts = [render(t, n) for n in names for t in cfg.data.templates]
        key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]
        with distributed.main_first():
            text = load_tokenizer(cfg.data.tokenizer, train_texts=lambda: texts, cache_dir=cache_root() / "tokenizers",
                                  corpus_key=f"captions-{key}")
        vocab = Vocabulary(text.vocab_size, vq.codebook_size, vq.grid_shape, text.fingerprint, vq.fingerprint, vq.source)
    captions = CaptionTable(names, cfg.data.templates, text.encode, cfg.data.max_caption_tokens)
    layout = SequenceLayout(vocab, cfg.data.max_caption_tokens, cfg.data.input_image_loss)
    if cfg.model.vocab_size not in (0, padded_vocab(vocab.size)):
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} but the joint vocabulary needs {padded_vocab(vocab.size)} "
                          "(leave it 0)")
    cfg.model.vocab_size = padded_vocab(vocab.size)
    cfg.sample.top_k, note = clamp_top_k(cfg.sample.top_k, vocab.codebook_size)
    if note:
        print(note.replace("top_k", "sample.top_k"))
    print(f"tokenizers: text {text.spec} ({vocab.text_size:,} tokens), VQ-VAE {vq.source} (fingerprint {vq.fingerprint}, "
          f"{vq.codebook_size:,} codes, {vq.grid_shape[0]}x{vq.grid_shape[1]} tokens per image); joint vocabulary "
          f"{vocab.size:,} (model {cfg.model.vocab_size:,}), sequences of {layout.length} tokens")
    print(f"captions: {len(cfg.data.templates)} templates x {len(names)} classes, e.g. {captions.texts[0][0]!r}, "
          f"{captions.texts[-1][-1]!r} (longest {captions.longest} tokens)")

    with distributed.main_first():
        train_tokens = encode_images(train, "train", vq)
        test_tokens = encode_images(test, "test", vq)
    print(f"data: {train.description}; evaluation on {min(cfg.data.eval_images, len(test)):,} of the {test.description}")

    torch.manual_seed(cfg.train.seed)
    model = MultimodalDecoder(cfg.model, layout.length, vocab)
    m = cfg.model
    print(f"model: {count_params(model) / 1e6:.1f}M parameters ({m.n_layers} layers, width {m.d_model}, "
          f"{m.n_heads}/{m.n_kv_heads} query/KV heads, {m.mlp} MLP, {'2-D' if m.rope_2d else '1-D'} rotary positions "
          f"for visual tokens)")

    data = SequenceBatches(train_tokens, captions, layout, cfg.train.batch_size, cfg.train.seed,
                           cfg.data.t2i_fraction, cfg.data.empty_caption, cfg.data.hflip)
    zero_shot = test_tokens.subset(cfg.data.zero_shot_images) if cfg.data.zero_shot_images else test_tokens.first(0)
    task = MultimodalTask(layout, captions, test_tokens.subset(cfg.data.eval_images), zero_shot, vq, cfg.loss, cfg.sample,
                          banned_text=(text.eos_id,), decode_text=text.decode, eval_batch_size=min(cfg.train.batch_size, 64))
    trainer = Trainer(model, task, data, cfg.train, cfg.optim, run_dir)
    describe_training(trainer, run_dir, resume, f", text-to-image share {cfg.data.t2i_fraction}, empty caption "
                      f"{cfg.data.empty_caption}, EMA {cfg.train.ema_decay or 'off'}")

    def on_start():
        save_config(cfg, run_dir, resume)
        text.save(run_dir / "tokenizer.json")
        vocab.save(run_dir)
        save_classes(train.classes, run_dir)
        if not (run_dir / VQ_COPY).is_dir():  # the run holds the VQ-VAE it trains on (older runs get it now)
            vq.save_copy(run_dir / VQ_COPY)

    summary = trainer.fit(resume, on_start=on_start)
    ev = summary["final_eval"]
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    lines = [("validation loss", f"{ev['loss']:.4f} (text {ev['text_loss']:.4f}, visual {ev['visual_loss']:.4f})")]
    if "zero_shot_accuracy" in ev:
        lines.append(("zero-shot accuracy", f"{ev['zero_shot_accuracy']:.3f} on {len(zero_shot):,} test images "
                                            f"(chance {1 / len(names):.3f})"))
    lines.append(("class grid", f"{grids[-1]} (guidance {cfg.sample.cfg_scale})" if grids else "none"))
    report(summary, run_dir, lines)


if __name__ == "__main__":
    run_main(main)
