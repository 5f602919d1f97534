"""Train a Blueberry text LLM.

    python scripts/train_llm.py --config configs/llm/debug.toml
    python scripts/train_llm.py --config configs/llm/blueberry-88m.toml --train_tokens 20_000_000
    python scripts/train_llm.py --experiment_name debug --resume          # continue an interrupted run
    python scripts/train_llm.py --config blueberry-88m --data_from 5dollar-88m   # Blueberry's recipe on 5-dollar-llm's data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.config import LLMRunConfig, data_table, padded_vocab
from llm.data import open_text_data
from llm.load import check_resumed_tokenizer, save_run_tokenizer
from llm.model import Decoder, active_params
from llm.task import LanguageModelTask
from shared.checkpoint import write_file_atomic
from shared.distributed import main_first
from shared.errors import UserError, run_main
from shared.run import add_common_args, describe_training, find_preset, report, resolve_run, save_config
from shared.trainer import Trainer, count_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--train_tokens", type=int, help="token budget (overrides train.budget), e.g. 20000000")
    p.add_argument("--tokenizer", help="Hub name, tokenizer.json, vocab.json+merges.txt folder, or bpe:N")
    p.add_argument("--data_from", metavar="PRESET", help="train on another preset's data: its whole [data] table "
                   "(e.g. 5dollar-88m); --data, --tokenizer and data.* overrides still apply on top")
    args = p.parse_intermixed_args()  # overrides may sit before or after the flags
    borrowed = data_table(find_preset(args.data_from, "llm", flag="--data_from")) if args.data_from else {}
    cfg, run_dir, resume = resolve_run(args, LLMRunConfig, {
        **{f"data.{k}": v for k, v in borrowed.items()},
        "data.source": args.data, "data.tokenizer": args.tokenizer, "train.budget": args.train_tokens}, package="llm")
    if cfg.data.source.startswith("hf:") and cfg.data.max_tokens == 0 and not cfg.data.ids_field:
        cfg.data.max_tokens = int(cfg.train.budget * 1.05)  # stream what the budget needs, not the whole corpus

    with main_first():  # rank 0 tokenises into the cache, the other processes then read it
        data = open_text_data(cfg.data, cfg.train.batch_size, cfg.train.seed, cfg.train.budget)
    tok = data.tokenizer
    if resume is not None:
        check_resumed_tokenizer(tok, run_dir)
    print("\n".join(data.lines))
    if cfg.model.vocab_size not in (0, padded_vocab(tok.vocab_size)):
        raise UserError(f"model.vocab_size = {cfg.model.vocab_size} but the tokenizer needs {padded_vocab(tok.vocab_size)} "
                        "(leave it 0 to follow the tokenizer)")
    cfg.model.vocab_size = padded_vocab(tok.vocab_size)
    print(f"tokenizer: {tok.spec} ({tok.vocab_size:,} tokens, model vocabulary {cfg.model.vocab_size:,})")
    epochs = cfg.train.budget / max(1, data.identity["train_tokens"])
    if epochs > 1:
        print(f"note: the budget is {epochs:.1f} passes over the training tokens")

    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model, cfg.data.seq_len)
    m = cfg.model
    mlp = (f"{m.mlp} MLP" if m.moe is None else
           f"{m.mlp} mixture of {m.moe.experts} experts, top-{m.moe.top_k}, {active_params(model) / 1e6:.1f}M active")
    print(f"model: {count_params(model) / 1e6:.1f}M parameters ({m.n_layers} layers, width {m.d_model}, "
          f"{m.n_heads}/{m.n_kv_heads} query/KV heads, {mlp}, {'tied' if m.tie_embeddings else 'untied'} embeddings)")

    task = LanguageModelTask(data.val, tok, eval_batch_size=cfg.train.batch_size, sample_prompts=cfg.sample.prompts,
                             sample_tokens=cfg.sample.max_new_tokens, doc_mask=cfg.data.doc_mask)
    trainer = Trainer(model, task, data.train, cfg.train, cfg.optim, run_dir)
    describe_training(trainer, run_dir, resume)

    def on_start() -> None:  # the resolved config, the tokenizer, and what the data was (a speedrun record names it)
        save_config(cfg, run_dir, resume)
        save_run_tokenizer(tok, run_dir)
        write_file_atomic(run_dir / "data.json", lambda p: p.write_text(json.dumps(data.identity, indent=2) + "\n"),
                          "the data description")

    summary = trainer.fit(resume, on_start=on_start)
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
