"""The shared training loop: exact resume, clean interruption, atomic checkpoints."""

import json

import numpy as np
import pytest
import torch

from llm.data import PackedBatches
from llm.model import Decoder, DecoderConfig
from shared import checkpoint as ckpt_mod
from shared.checkpoint import load_weights, resolve_checkpoint, save_checkpoint
from shared.contracts import Task
from shared.errors import UserError
from shared.optim import OptimConfig
from shared.trainer import TrainConfig, Trainer

TOKENS = np.tile(np.arange(50, dtype=np.uint16), 200) ^ np.random.default_rng(0).integers(0, 2, 10_000).astype(np.uint16)


class TinyLM(Task):
    """A minimal task: next-token loss, evaluation on fixed rows, and noise from the global RNG
    (as flow matching draws it) so that resume must restore the RNG to match."""

    unit = "tokens"

    def loss(self, model, batch):
        x, y = batch
        x = torch.where(torch.rand(x.shape) < 0.1, torch.randint_like(x, 50), x)  # random corruption
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    def evaluate(self, model):
        rows = torch.from_numpy(TOKENS[:33 * 4].astype(np.int64)).view(4, 33)
        return {"loss": torch.nn.functional.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten()).item()}



class InterruptingBatches(PackedBatches):
    """Asks the trainer to stop (as Ctrl-C does) when its `at`-th batch is drawn."""

    def __init__(self, *args, trainer_ref: list, at: int, **kw):
        super().__init__(*args, **kw)
        self.calls, self.trainer_ref, self.at = 0, trainer_ref, at

    def next_batch(self):
        self.calls += 1
        if self.calls == self.at:
            self.trainer_ref[0].stop_requested = True
        return super().next_batch()


def make(run_dir, data=None, ema=0.0):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=64), 32)
    data = data or PackedBatches(TOKENS, 32, 4, seed=0)
    cfg = TrainConfig(budget=32 * 4 * 2 * 12, batch_size=4, grad_accum=2, log_every=1, eval_every=32 * 4 * 2 * 5,
                      ckpt_every=32 * 4 * 2 * 4, ema_decay=ema)
    return Trainer(model, TinyLM(), data, cfg, OptimConfig(warmup_steps=3, schedule="wsd"), run_dir, quiet=True)


def losses(run_dir, split="train"):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, ema=0.9):
    full = make(tmp_path / "full", ema=ema)
    full.fit()
    ref = tmp_path / "ref"
    ref_trainer = [None]
    data = InterruptingBatches(TOKENS, 32, 4, seed=0, trainer_ref=ref_trainer, at=13)  # inside step 7
    first = make(ref, data, ema=ema)
    ref_trainer[0] = first
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert first.step == 7 and (ref / "checkpoints" / "step_000007").is_dir()
    saved = first.timer.others.totals  # what the checkpoint holds of the CPU others took (shared/cpuload.py)
    probe = make(tmp_path / "probe", ema=ema)
    probe._restore(resolve_checkpoint(ref))
    assert saved is not None and probe.timer.others.totals == saved
    second = make(ref, ema=ema)
    second.fit(resume_from=resolve_checkpoint(ref))
    assert len(losses(ref)) == 12
    assert losses(ref) == losses(tmp_path / "full")  # bit-for-bit the same losses
    assert losses(ref, "eval") == losses(tmp_path / "full", "eval")
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 256
    assert summary["cpu_others"] is None or 0 <= summary["cpu_others"] <= 1  # None: too short to tell
    assert summary["freed_memory_kept"] is second.kept_memory
    assert (ref / "loss_curve.png").stat().st_size > 1000


def test_a_crash_mid_checkpoint_leaves_the_previous_one_latest(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    good = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, {"step": 2})
    latest = resolve_checkpoint(tmp_path)
    assert latest.name == "step_000001" and not (tmp_path / "step_000002").exists()
    fresh = torch.nn.Linear(4, 4)
    load_weights(fresh, latest)
    assert torch.equal(fresh.weight, good)


def test_corrupt_weights_are_one_clear_error(tmp_path):
    model = torch.nn.Linear(4, 4)
    path = save_checkpoint(tmp_path, 1, model, {"step": 1})
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_weights(model, path)


def test_old_checkpoints_are_pruned(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]
