"""Train a Blueberry text LLM.

    python scripts/train_llm.py --config configs/llm/debug.toml
    python scripts/train_llm.py --config configs/llm/blueberry-88m.toml --train_tokens 20_000_000
    python scripts/train_llm.py --experiment_name debug --resume          # continue an interrupted run
"""

from __future__ import annotations

import argparse

import torch

from llm.config import LLMRunConfig, padded_vocab
from llm.data import PackedBatches, prepare_data, validation_rows
from llm.load import check_resumed_tokenizer, save_run_tokenizer
from llm.model import Decoder, active_params
from llm.task import LanguageModelTask
from shared.distributed import main_first
from shared.errors import UserError, run_main
from shared.run import add_common_args, describe_training, report, resolve_run, save_config
from shared.trainer import Trainer, count_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--train_tokens", type=int, help="token budget (overrides train.budget), e.g. 20000000")
    p.add_argument("--tokenizer", help="Hub name, tokenizer.json, vocab.json+merges.txt folder, or bpe:N")
    args = p.parse_intermixed_args()  # overrides may sit before or after the flags
    cfg, run_dir, resume = resolve_run(args, LLMRunConfig, {
        "data.source": args.data, "data.tokenizer": args.tokenizer, "train.budget": args.train_tokens}, package="llm")
    if cfg.data.source.startswith("hf:") and cfg.data.max_tokens == 0:
        cfg.data.max_tokens = int(cfg.train.budget * 1.05)  # stream what the budget needs, not the whole corpus

    with main_first():  # rank 0 tokenises into the cache, the other processes then read it
        cache = prepare_data(cfg.data)
    tok = cache.tokenizer
    if resume is not None:
        check_resumed_tokenizer(tok, run_dir)
    print(f"data: {cache.description}")
    train_tokens, val_tokens = len(cache.tokens("train")), len(cache.tokens("val"))
    print(f"tokens: {train_tokens:,} train / {val_tokens:,} validation "
          f"({cache.meta['train_docs']:,} / {cache.meta['val_docs']:,} documents in the cache)")
    if val_tokens < 16 * (cfg.data.seq_len + 1):
        print(f"warning: only {val_tokens:,} validation tokens, a noisy estimate; raise data.val_fraction")
    if cfg.model.vocab_size not in (0, padded_vocab(tok.vocab_size)):
        raise UserError(f"model.vocab_size = {cfg.model.vocab_size} but the tokenizer needs {padded_vocab(tok.vocab_size)} "
                        "(leave it 0 to follow the tokenizer)")
    cfg.model.vocab_size = padded_vocab(tok.vocab_size)
    print(f"tokenizer: {tok.spec} ({tok.vocab_size:,} tokens, model vocabulary {cfg.model.vocab_size:,})")
    epochs = cfg.train.budget / max(1, train_tokens)
    if epochs > 1:
        print(f"note: the budget is {epochs:.1f} passes over the training tokens")

    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model, cfg.data.seq_len)
    m = cfg.model
    mlp = (f"{m.mlp} MLP" if not m.moe_experts else
           f"{m.mlp} mixture of {m.moe_experts} experts, top-{m.moe_top_k}, {active_params(model) / 1e6:.1f}M active")
    print(f"model: {count_params(model) / 1e6:.1f}M parameters ({m.n_layers} layers, width {m.d_model}, "
          f"{m.n_heads}/{m.n_kv_heads} query/KV heads, {mlp}, {'tied' if m.tie_embeddings else 'untied'} embeddings)")

    data = PackedBatches(cache.tokens("train"), cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    val = validation_rows(cache.tokens("val"), cfg.data.seq_len, cfg.data.val_tokens)
    task = LanguageModelTask(val, tok, eval_batch_size=cfg.train.batch_size, sample_prompts=cfg.sample.prompts,
                             sample_tokens=cfg.sample.max_new_tokens, doc_mask=cfg.data.doc_mask)
    trainer = Trainer(model, task, data, cfg.train, cfg.optim, run_dir)
    describe_training(trainer, run_dir, resume)
    summary = trainer.fit(resume, on_start=lambda: (save_config(cfg, run_dir, resume), save_run_tokenizer(tok, run_dir)))
    ev = summary["final_eval"]
    report(summary, run_dir, [
        ("validation loss", f"{ev['loss']:.4f}"),
        ("validation accuracy", f"{ev['accuracy']:.4f}"),
        ("validation perplexity", f"{ev['perplexity']:.2f}"),
    ])
    latest = sorted((run_dir / "samples").glob("*.txt"))
    if latest:
        print("\nsample:\n" + latest[-1].read_text().strip())


if __name__ == "__main__":
    run_main(main)
