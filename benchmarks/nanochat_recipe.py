"""nanochat's recipe at a Blueberry preset's shape, data and token budget: the bar a default recipe
has to beat (issue 25), recorded as a speedrun record that scripts/speedrun.py compares.

nanochat (karpathy/nanochat at 92d63d4: nanochat/gpt.py, nanochat/optim.py, scripts/base_train.py)
written again here, not imported and not a dependency, as its base_train.py would train with
`--depth=L --aspect-ratio=d_model/L --max-seq-len=T --total-batch-size=B*T --num-iterations=S` and
the preset's heads: untied embeddings, a weight-free RMSNorm after the embedding and before the
head, RoPE base 100,000, QK-norm then q, k x 1.2, sliding windows "SSSL" (short = a quarter of the
context rounded up to 128), squared-ReLU MLP 4x, per-layer residual and x0 scalars, value
embeddings on alternate layers with a gate, the previous-token smear, the mid-network backout,
logit soft-cap 15, its initialisation; AdamW for embeddings, head and scalars at its rates
(x (d_model/768)^-0.5 and x sqrt(batch/2^19), as its script scales them) and NorMuon for the
matrices (Nesterov momentum, row equilibration, Polar Express, Frobenius renormalisation,
second-moment normalisation, cautious weight decay scaled as its script scales it); its schedules
(40 warm-up steps, warm-down over the last 65% to 5%, Muon momentum 0.85 -> 0.97 over 400 steps,
weight decay cosine to zero). Not reproduced: its data loader (the preset's rows are used, the same
rows for the same seed as a Blueberry run) and its bf16 storage (fp32 on the CPU, as nanochat runs
there). Evaluation is Blueberry's, on the preset's fixed validation rows.

    export BLUEBERRY_DATA_DIR=<data>
    python benchmarks/nanochat_recipe.py --preset cpu-16m --budget 1M --runs 3 \\
        --compare benchmarks/records/cpu-16m-1M-baseline-20261202-022258.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, ahead of any installed copy

from llm.config import LLMRunConfig, padded_vocab
from llm.data import open_text_data
from llm.speedrun import (build_record, check_comparable, format_budget, git_state, load_record, parse_budget,
                          planned_data, read_run, resolve_preset, summary_lines, write_leaderboard, write_record)
from llm.speedrun_plot import plot_records
from llm.speedrun_screen import judge, picture_title
from llm.task import LanguageModelTask
from shared.config import dump_toml, load_config, to_dict
from shared.cpumem import keep_freed_memory
from shared.errors import UserError, run_main
from shared.muon import normalise_second_moment, orthogonalize
from shared.trainer import hardware_info

ROOT = Path(__file__).resolve().parent.parent
# what this benchmark takes from a preset (its own recipe is fixed): the data, the shape, the batch
TAKEN = ("data.", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "train.batch_size",
         "train.eval_every")
REF_WIDTH, REF_BATCH = 768, 2**19  # where nanochat's rates were tuned (d12), and its reference batch in tokens
# its defaults (scripts/base_train.py): rates, weight decay, schedule
RATES = dict(embedding=0.3, unembedding=0.008, matrix=0.02, scalar=0.5, weight_decay=0.28)
WARMUP, WARMDOWN, FINAL_FRAC = 40, 0.65, 0.05
PARAM_DATA_RATIO = 12  # its --target-param-data-ratio: the horizon its weight-decay scaling assumes


def rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, T, H, D] with halves paired (nanochat's sign convention; only relative angles matter)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)


class Attention(nn.Module):
    GATE_CHANNELS = 12

    def __init__(self, dim: int, heads: int, kv_heads: int, value_embed: bool):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.hd, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ve_gate = nn.Linear(self.GATE_CHANNELS, kv_heads, bias=False) if value_embed else None

    def forward(self, x, ve, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd)
        k = self.k(x).view(b, t, self.kv_heads, self.hd)
        v = self.v(x).view(b, t, self.kv_heads, self.hd)
        if ve is not None:  # value embedding through a per-KV-head gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(b, t, self.kv_heads, self.hd)
        q, k = rms(rotate(q, cos, sin)) * 1.2, rms(rotate(k, cos, sin)) * 1.2
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=self.heads != self.kv_heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, value_embed: bool):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, value_embed)
        self.fc, self.out = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x, ve, cos, sin, mask):
        x = x + self.attn(rms(x), ve, cos, sin, mask)
        return x + self.out(F.relu(self.fc(rms(x))).square())


class NanochatGPT(nn.Module):
    """nanochat's GPT; hidden() and logits() are what Blueberry's evaluation calls."""

    SMEAR_CHANNELS, SOFTCAP, ROPE_BASE = 24, 15.0, 100_000

    def __init__(self, vocab: int, real_vocab: int, dim: int, layers: int, heads: int, kv_heads: int, seq_len: int):
        super().__init__()
        self.real_vocab, self.layers = real_vocab, layers
        self.shape = {"aspect": dim // layers, "head_dim": dim // heads, "vocab": vocab}  # what base_train.py scales by
        ve_layers = [i for i in range(layers) if i % 2 == (layers - 1) % 2]  # alternate layers, the last one included
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, i in ve_layers) for i in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_heads * (dim // heads)) for i in ve_layers})
        self.resid = nn.Parameter(torch.tensor([1.15 - 0.10 * i / max(layers - 1, 1) for i in range(layers)]))
        self.x0 = nn.Parameter(torch.tensor([0.20 - 0.15 * i / max(layers - 1, 1) for i in range(layers)]))
        self.smear_gate = nn.Linear(self.SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        hd = dim // heads
        freqs = torch.outer(torch.arange(seq_len).float(), self.ROPE_BASE ** (-torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("cos", freqs.cos()[None, :, None], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None], persistent=False)
        short = -(-seq_len // 4 // 128) * 128  # "SSSL": a quarter of the context, rounded up to 128; the last layer full
        pos = torch.arange(seq_len)
        window = (pos[:, None] >= pos[None]) & (pos[:, None] - pos[None] <= short)
        self.masks = [None if (i % 4 == 3 or i == layers - 1 or short >= seq_len) else window for i in range(layers)]
        self._init(dim)

    @torch.no_grad()
    def _init(self, dim: int) -> None:
        s = 3 ** 0.5 * dim ** -0.5  # uniform with the std of N(0, 1/dim)
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.head.weight, std=0.001)
        for blk in self.blocks:
            for w in (blk.attn.q.weight, blk.attn.k.weight, blk.attn.v.weight):
                nn.init.uniform_(w, -s, s)
            nn.init.uniform_(blk.fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.out.weight)
            if blk.attn.ve_gate is not None:
                nn.init.uniform_(blk.attn.ve_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -s, s)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)

    def hidden(self, idx: torch.Tensor, doc_ids=None) -> torch.Tensor:
        t = idx.shape[1]
        cos, sin = self.cos[:, :t], self.sin[:, :t]
        x = rms(self.wte(idx))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :self.SMEAR_CHANNELS]))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)  # the previous token's embedding, gated
        x0, mid = x, None
        for i, blk in enumerate(self.blocks):
            x = self.resid[i] * x + self.x0[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            mask = self.masks[i][:t, :t] if self.masks[i] is not None else None
            x = blk(x, ve, cos, sin, mask)
            if i == self.layers // 2:
                mid = x
        return rms(x - self.backout_lambda * mid)  # the backout: part of the mid-network residual taken away

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h)[..., :self.real_vocab].float()
        return self.SOFTCAP * torch.tanh(z / self.SOFTCAP)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = self.logits(self.hidden(idx))
        return F.cross_entropy(z.flatten(0, 1), targets.flatten())


class NorMuon(torch.optim.Optimizer):
    """nanochat's Muon for same-shape matrices, stacked: Nesterov momentum, each row rescaled to the
    mean row norm, Polar Express (shared.muon.orthogonalize), the Frobenius norm set to sqrt(min(m, n)),
    a per-row (wide: per-column) second moment (beta2) normalising the update at its norm, then a
    step of lr sqrt(max(1, m/n)) with weight decay only where update and weight agree in sign."""

    def __init__(self, params, lr: float, momentum: float = 0.95, beta2: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            m, n = params[0].shape
            st = self.state[params[0]]
            if not st:
                st["buf"] = torch.zeros(len(params), m, n)
                st["v"] = torch.zeros(len(params), m, 1) if m >= n else torch.zeros(len(params), 1, n)
            g = torch.stack([p.grad for p in params])
            st["buf"].lerp_(g, 1 - group["momentum"])
            x = g.lerp_(st["buf"], group["momentum"])
            rows = x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            x = x * (x.norm(dim=(-2, -1), keepdim=True) / m ** 0.5 / rows)
            x = orthogonalize(x, 5, eps=1e-6, method="polar_express")
            x = x * (min(m, n) ** 0.5 / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
            x = normalise_second_moment(x, st["v"], group["beta2"])
            lr, wd = group["lr"] * max(1.0, m / n) ** 0.5, group["weight_decay"]
            for p, u in zip(params, x.unbind(0)):
                p.sub_(lr * u + lr * wd * p * ((u * p) >= 0))


def optimisers(model: NanochatGPT, dim: int, batch_tokens: int, target_tokens: float,
               scaled: bool = True) -> tuple[list, float]:
    """AdamW groups and NorMuon groups at nanochat's rates, scaled as its base_train.py scales them
    to this width and batch; also the Muon weight decay it starts from (scaled to the horizon).
    `scaled=False`: its d12 rates and weight decay as tuned (the AdamW width scaling is its model's
    own and stays)."""
    width, batch = (dim / REF_WIDTH) ** -0.5, (batch_tokens / REF_BATCH) ** 0.5 if scaled else 1.0
    r = {k: v * batch for k, v in RATES.items() if k != "weight_decay"}
    adam = torch.optim.AdamW([
        dict(params=[model.head.weight], lr=r["unembedding"] * width, betas=(0.8, 0.96), weight_decay=0.01),
        dict(params=[model.wte.weight], lr=r["embedding"] * width, betas=(0.8, 0.995), weight_decay=0.001),
        dict(params=list(model.value_embeds.parameters()), lr=r["embedding"] * width * 0.5, betas=(0.8, 0.995),
             weight_decay=0.01),
        dict(params=[model.resid], lr=r["scalar"] * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        dict(params=[model.x0], lr=r["scalar"], betas=(0.96, 0.95), weight_decay=0.0),
        dict(params=[model.smear_gate.weight, model.smear_lambda, model.backout_lambda], lr=0.2, betas=(0.8, 0.95),
             weight_decay=0.0),
    ], eps=1e-10, fused=True)
    matrices = list(model.blocks.parameters())
    cfg = model.shape
    reference = PARAM_DATA_RATIO * scaling_params(reference_model(cfg["aspect"], cfg["head_dim"], cfg["vocab"]))
    wd = RATES["weight_decay"] * (batch * (reference / target_tokens) if scaled else 1.0)
    muon = NorMuon([dict(params=[p for p in matrices if p.shape == s]) for s in sorted({p.shape for p in matrices})],
                   lr=r["matrix"], weight_decay=wd)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return [adam, muon], wd


def scaling_params(model: NanochatGPT) -> int:
    """What nanochat's horizon counts: the transformer blocks' matrices and the head."""
    return sum(p.numel() for p in model.blocks.parameters()) + model.head.weight.numel()


def reference_model(aspect: int, head_dim: int, vocab: int) -> NanochatGPT:
    """d12, where nanochat's rates were tuned, as its base_train.py builds it for a run: 12 layers
    of 12 x aspect (rounded up to whole heads), all heads of head_dim, the run's vocabulary (shapes only)."""
    width = -(-12 * aspect // head_dim) * head_dim
    with torch.device("meta"):
        return NanochatGPT(vocab, vocab, width, 12, width // head_dim, width // head_dim, 2048)


def lr_multiplier(it: int, steps: int) -> float:
    down = round(WARMDOWN * steps)
    if it < WARMUP:
        return (it + 1) / WARMUP
    if it <= steps - down:
        return 1.0
    progress = (steps - it) / down
    return progress + (1 - progress) * FINAL_FRAC


def muon_momentum(it: int, steps: int) -> float:
    down = round(WARMDOWN * steps)
    if it < 400:
        return 0.85 + 0.12 * it / 400
    if it >= steps - down:
        return 0.97 - 0.07 * (it - (steps - down)) / down
    return 0.97


def train_one(cfg: LLMRunConfig, seed: int, run_dir: Path, eval_every: int, rates: str = "scaled") -> None:
    """One nanochat run into run_dir, in the files a Blueberry run folder has (llm.speedrun.read_run)."""
    kept = keep_freed_memory()  # as Blueberry's CPU trainer does: the two recipes' speeds compare
    data = open_text_data(cfg.data, cfg.train.batch_size, seed, cfg.train.budget)
    m, tok = cfg.model, data.tokenizer
    vocab = padded_vocab(tok.vocab_size)
    torch.manual_seed(seed)
    model = NanochatGPT(vocab, tok.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, cfg.data.seq_len)
    batch_tokens = cfg.train.batch_size * cfg.data.seq_len
    steps = math.ceil(cfg.train.budget / batch_tokens)
    opts, wd = optimisers(model, m.d_model, batch_tokens, PARAM_DATA_RATIO * scaling_params(model), rates == "scaled")
    task = LanguageModelTask(data.val, tok)
    params = sum(p.numel() for p in model.parameters())
    run_dir.mkdir(parents=True)
    print(f"  nanochat: {params / 1e6:.1f}M parameters, {steps} steps of {batch_tokens:,} tokens, Muon lr "
          f"{opts[1].param_groups[0]['lr']:.5f}, weight decay {wd:.4f}", flush=True)
    train_time, rows = 0.0, []
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = data.train.next_batch()
        loss = model(x, y)
        loss.backward()
        lrm = lr_multiplier(step, steps)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lrm
        for g in opts[1].param_groups:
            g["momentum"] = muon_momentum(step, steps)
            g["weight_decay"] = wd * 0.5 * (1 + math.cos(math.pi * step / steps))
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        done, value = (step + 1) * batch_tokens, loss.item()
        if not math.isfinite(value):
            raise UserError(f"nanochat run (seed {seed}) diverged at step {step + 1}: loss {value}")
        if (step + 1) % 10 == 0:
            rows.append({"step": step + 1, "split": "train", "units": done, "loss": value})
            print(f"  step {step + 1}/{steps} loss {value:.4f} {done / train_time:,.0f} tokens/s", flush=True)
        if (step + 1) == steps or (eval_every and done // eval_every > (done - batch_tokens) // eval_every):
            model.eval()
            ev = task.evaluate(model)
            model.train()
            rows.append({"step": step + 1, "split": "eval", "units": done, **ev})
            print(f"  eval at {done:,} tokens: loss {ev['loss']:.4f}", flush=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "data.json").write_text(json.dumps(data.identity, indent=2))
    setting = {"data": to_dict(cfg.data), "train": {"seed": seed, "budget": cfg.train.budget,
               "batch_size": cfg.train.batch_size}, "nanochat": {
                   "commit": "92d63d4", "rates": rates, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
                   "n_kv_heads": m.n_kv_heads, "window_pattern": "SSSL", "muon_lr": opts[1].param_groups[0]["initial_lr"],
                   "muon_weight_decay": wd, **{f"{k}_lr": v for k, v in RATES.items() if k != "weight_decay"},
                   "warmup_steps": WARMUP, "warmdown_ratio": WARMDOWN, "final_lr_frac": FINAL_FRAC}}
    (run_dir / "config.toml").write_text(dump_toml(setting))
    summary = {"steps": steps, "unit": "tokens", "tokens": steps * batch_tokens, "params": params,
               "train_time_s": round(train_time, 3), "compile_warmup_s": 0.0,
               "tokens_per_s": round(steps * batch_tokens / train_time, 1),
               "final_eval": {k: rows[-1][k] for k in ("loss", "accuracy", "perplexity")},
               "freed_memory_kept": kept, "precision": "float32", "hardware": hardware_info(torch.device("cpu"))}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-16m", help="the Blueberry preset whose shape, data and batch to take")
    p.add_argument("--budget", default="1M", help="training tokens per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--runs_dir", default="runs")
    p.add_argument("--records_dir", default=str(ROOT / "benchmarks" / "records"))
    p.add_argument("--rates", choices=("scaled", "reference"), default="scaled",
                   help="scaled: its rates and weight decay scaled to this batch and horizon as its base_train.py "
                        "scales them (faithful); reference: as tuned at d12 (batch 2^19)")
    p.add_argument("--compare", metavar="RECORD", help="a record of the preset at this budget to test against")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="preset overrides (data, shape, batch)")
    args = p.parse_args()
    config, budget = resolve_preset(args.preset), parse_budget(args.budget)
    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    if bad := [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith(TAKEN)]:
        raise UserError(f"override {bad[0]!r} is not one this benchmark takes (nanochat's recipe is fixed): only "
                        "data.*, the shape (model.d_model, n_layers, n_heads, n_kv_heads), train.batch_size and "
                        "train.eval_every")
    cfg = load_config(LLMRunConfig, config, [*args.overrides, f"train.budget={budget}"])
    if cfg.data.ids_field:
        raise UserError("this benchmark reads text sources only (the preset has data.ids_field)")
    if cfg.train.grad_accum != 1:
        raise UserError(f"{config.stem} accumulates {cfg.train.grad_accum} micro-batches a step; this benchmark steps "
                        "on every batch: give a preset with train.grad_accum = 1")
    baseline = None
    if args.compare:
        baseline = load_record(args.compare)
        check_comparable(baseline, "nanochat", budget, args.compare, planned_data(config, None, args.overrides))
    commit, dirty = git_state(ROOT)
    created = datetime.now().astimezone()
    label = f"nanochat-92d63d4{'-d12-rates' if args.rates == 'reference' else ''}-at-{config.stem}"
    group = Path(args.runs_dir) / "speedrun" / f"{label}-{format_budget(budget)}-{created:%Y%m%d-%H%M%S}"
    if group.exists():
        raise UserError(f"{group} exists already: start again in a second")
    results = []
    for k in range(args.runs):
        seed = args.seed0 + k
        print(f"run {k + 1}/{args.runs}: nanochat at {config.stem}'s shape, seed {seed} -> {group / f'seed{seed}'}", flush=True)
        train_one(cfg, seed, group / f"seed{seed}", cfg.train.eval_every, args.rates)
        results.append(read_run(group / f"seed{seed}", seed, f"speedrun/{group.name}/seed{seed}"))
    record = build_record(label=label, preset="nanochat", budget=budget,
                          overrides=args.overrides, runs=results, commit=commit, dirty=dirty, created=created)
    print("\n".join(summary_lines(record)))
    if baseline is not None:
        key, result, lines = judge(baseline, record, args.compare)
        record[key] = result
        print("\n" + "\n".join(lines))
    path = write_record(record, Path(args.records_dir), created)
    sides = [(args.compare, baseline)] if baseline is not None else []
    png = plot_records([*sides, (path.name, record)], path.with_suffix(".png"), **picture_title(record))
    print(f"\nrecord: {path}\npicture: {png}\nleaderboard: {write_leaderboard(Path(args.records_dir))}")


if __name__ == "__main__":
    sys.exit(run_main(main))
