"""Checks benchmarks/nanochat_recipe.py against nanochat's own code: the same weights give the same
loss, and four optimiser steps (its parameter groups, AdamW settings, NorMuon, cautious weight
decay, at the recipe's rates and schedule values given to both) the same weights. The schedules
and the rate scaling are read against scripts/base_train.py, not run here (tests/test_nanochat_benchmark.py).
It needs a checkout of karpathy/nanochat (92d63d4); nothing of it is copied here.

    python benchmarks/nanochat_check.py --nanochat <nanochat checkout>
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nanochat_recipe as ours  # noqa: E402

from shared.errors import UserError, run_main  # noqa: E402

RENAMED = {"wte.weight": "transformer.wte.weight", "head.weight": "lm_head.weight", "resid": "resid_lambdas",
           "x0": "x0_lambdas"}
IN_BLOCK = {"attn.q.weight": "attn.c_q.weight", "attn.k.weight": "attn.c_k.weight", "attn.v.weight": "attn.c_v.weight",
            "attn.proj.weight": "attn.c_proj.weight", "fc.weight": "mlp.c_fc.weight", "out.weight": "mlp.c_proj.weight",
            "attn.ve_gate.weight": "attn.ve_gate.weight"}


def their_name(name: str) -> str:
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        return f"transformer.h.{i}.{IN_BLOCK[rest]}"
    return RENAMED.get(name, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat", required=True, help="a checkout of karpathy/nanochat (the folder holding nanochat/)")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    if not (Path(args.nanochat) / "nanochat" / "gpt.py").is_file():
        raise UserError(f"{args.nanochat} holds no nanochat/gpt.py: pass a checkout of karpathy/nanochat")
    sys.path.insert(0, str(Path(args.nanochat).resolve()))
    from nanochat.gpt import GPT, GPTConfig

    vocab, real, dim, layers, heads, kv, seq, batch, total = 50304, 50257, 256, 4, 4, 2, 256, 4096, 245  # cpu-16m
    torch.manual_seed(0)
    ref = GPT(GPTConfig(sequence_len=seq, vocab_size=real, n_layer=layers, n_head=heads, n_kv_head=kv, n_embd=dim,
                        window_pattern="SSSL"))
    ref.init_weights()
    model = ours.NanochatGPT(vocab, real, dim, layers, heads, kv, seq)
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(theirs[their_name(name)])
            if not param.any():  # zero-initialised: give every path a signal
                param.normal_(0, 0.02)
                theirs[their_name(name)].copy_(param)
    opts, wd = ours.optimisers(model, dim, batch, ours.PARAM_DATA_RATIO * ours.scaling_params(model))
    s = (batch / ours.REF_BATCH) ** 0.5
    r = ours.RATES
    ref_opt = ref.setup_optimizer(unembedding_lr=r["unembedding"] * s, embedding_lr=r["embedding"] * s,
                                  scalar_lr=r["scalar"] * s, matrix_lr=r["matrix"] * s, weight_decay=wd)
    worst_loss = worst_param = 0.0
    for it in range(args.steps):
        x, y = torch.randint(0, real, (2, seq)), torch.randint(0, real, (2, seq))
        a, b = model(x, y), ref(x, y)
        a.backward()
        b.backward()
        lrm, mom = ours.lr_multiplier(it, total), ours.muon_momentum(it, total)
        decay = wd * 0.5 * (1 + math.cos(math.pi * it / total))
        for g in [*ref_opt.param_groups, *(g for o in opts for g in o.param_groups)]:
            g["lr"] = g["initial_lr"] * lrm
        for g in [*(g for g in ref_opt.param_groups if g["kind"] == "muon"), *opts[1].param_groups]:
            g["momentum"], g["weight_decay"] = mom, decay
        for o in (*opts, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
        diff = max((q - theirs[their_name(n)]).abs().max().item() for n, q in model.named_parameters())
        worst_loss, worst_param = max(worst_loss, abs(a.item() - b.item())), max(worst_param, diff)
        print(f"step {it}: loss {a.item():.6f} (nanochat {b.item():.6f}), largest weight difference {diff:.2e}")
    ok = worst_loss < 1e-5 and worst_param < 1e-4
    print(f"{'same' if ok else 'DIFFERENT'}: largest loss difference {worst_loss:.1e}, weight difference {worst_param:.1e}")
    if not ok:
        raise UserError("the reimplementation differs from nanochat's code")


if __name__ == "__main__":
    sys.exit(run_main(main))
