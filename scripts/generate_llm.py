"""Generate text from a trained Blueberry run, streaming tokens as they are sampled.

    python scripts/generate_llm.py --checkpoint runs/debug --prompt "Once upon a time"
    python scripts/generate_llm.py --checkpoint runs/debug --temperature 0 --max_new_tokens 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.generate import document_prompt, generate, new_token_budget, real_tokens
from llm.load import load_llm_run
from shared.errors import UserError, run_main
from shared.run import finite_float, non_negative_int
from shared.trainer import pick_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=finite_float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=non_negative_int, default=50, help="0 = off")
    p.add_argument("--top_p", type=finite_float, default=0.95, help="1 = off")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence every step (slow; for checking)")
    p.add_argument("--no_ema", action="store_true", help="the trained weights instead of their EMA (default: EMA when the run kept it)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("need 0 < top_p <= 1, temperature >= 0, max_new_tokens >= 1 and num_samples >= 1")

    run = load_llm_run(args.checkpoint, use_ema=not args.no_ema)
    cfg, tok, ckpt, ema = run.cfg, run.tokenizer, run.ckpt, run.ema
    device = pick_device(args.device)
    model = run.model.to(device)
    if not tok.encode(args.prompt):
        raise UserError("the prompt is empty after tokenisation")
    ids = document_prompt(tok, args.prompt)
    if len(ids) >= model.max_seq_len:
        raise UserError(f"the prompt has {len(ids)} tokens; the model's context is {model.max_seq_len}")
    _, note = new_token_budget(args.max_new_tokens, len(ids), model.max_seq_len)
    g = torch.Generator(device=device).manual_seed(args.seed)
    allowed = real_tokens(cfg.model.vocab_size, tok.vocab_size, device)
    print(f"# {ckpt} ({'EMA' if ema else 'trained'} weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {device}{run.tokenizer_note})", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    for n in range(args.num_samples):
        prompt = torch.tensor([ids], device=device)
        sys.stdout.write(args.prompt)
        produced: list[int] = []
        printed = ""
        for t in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          use_cache=not args.no_cache, eos_id=tok.eos_id, generator=g, allowed=allowed):
            if int(t) == tok.eos_id:
                break
            produced.append(int(t))
            text = tok.decode(produced)  # decode the whole tail: a byte-level token may be half a character
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        sys.stdout.write(tok.decode(produced)[len(printed):])  # a last character cut short by the stop
        sys.stdout.write("\n" + ("-" * 40 + "\n" if n + 1 < args.num_samples else ""))


if __name__ == "__main__":
    run_main(main)
