"""The weight EMA: its warm-up sized to the run, BatchNorm statistics measured for the averaged
weights, an exact resume, and training left as it is."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch
from torch import nn

from conftest import ROOT
from judge.classifier import ClassifierTask, ResNet9
from judge.config import ClassifierModelConfig
from shared.ema import EMA, warmup_horizon
from shared.images import ImageBatches, ImageSet
from shared.optim import OptimConfig
from shared.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("decay, steps", [(0.9, 12), (0.99, 150), (0.999, 1563), (0.9999, 46_875), (0.999, 19_532)])
def test_the_last_update_uses_the_configured_decay(decay, steps):
    ema = EMA(nn.Linear(1, 1), decay, horizon=warmup_horizon(decay, steps))
    assert ema.decay_at(steps - 1) == decay
    assert ema.decay_at(steps - 2) < decay  # a ramp all the way, not a plateau
    assert ema.decay_at(0) <= 0.5  # the first trained weights count at least as much as the initial ones


def test_a_run_too_short_for_its_decay_averages_uniformly():
    # 5 updates cannot reach 0.99: the horizon stops at 2, a plain mean of the initial and trained weights
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.99, horizon=warmup_horizon(0.99, 5))
    assert ema.horizon == 2.0
    for k in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(k))
        ema.update(model)
    assert ema.shadow.weight.item() == pytest.approx(sum(range(6)) / 6)
    assert ema.last_decay == pytest.approx(5 / 6)


def test_every_preset_with_ema_ends_at_its_configured_decay():
    """What benchmarks/ema_decay.py tabulates: the fixed horizon-10 ramp ended every preset but one
    below its decay (dit-s at 0.99981 for 0.9999)."""
    presets = 0
    for path in sorted(ROOT.glob("configs/*/*.toml")):
        cfg = tomllib.loads(path.read_text())
        train = TrainConfig(**cfg.get("train", {}))
        if train.ema_decay == 0:
            continue
        per_batch = train.batch_size * (cfg["data"]["seq_len"] if path.parent.name == "llm" else 1)
        steps = math.ceil(train.budget / (per_batch * train.grad_accum))
        ema = EMA(nn.Linear(1, 1), train.ema_decay, horizon=warmup_horizon(train.ema_decay, steps))
        assert ema.decay_at(steps - 1) == train.ema_decay, path
        presets += 1
    assert presets >= 5


def test_batchnorm_statistics_are_measured_for_the_averaged_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, 0.5, warmup=False)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    model(torch.randn(16, 3))  # live statistics of the live weights
    ema.update(model)
    assert torch.equal(ema.shadow[1].running_mean, model[1].running_mean)  # copied, until measured
    batches = [torch.randn(32, 3) + i for i in range(4)]
    calls = iter(batches)
    ema.measure_batchnorm(lambda shadow: shadow(next(calls)), batches=4)
    with torch.no_grad():
        outputs = [ema.shadow[0](x) for x in batches]
    bn = ema.shadow[1]
    assert torch.allclose(bn.running_mean, torch.stack([o.mean(0) for o in outputs]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([o.var(0) for o in outputs]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training and not ema.batchnorm_stale
    ema.measure_batchnorm(lambda shadow: pytest.fail("measured twice for the same weights"))
    ema.update(model)
    assert ema.batchnorm_stale and torch.equal(bn.running_mean, model[1].running_mean)


def _images(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 4, (n,), generator=g), tuple("abcd"), "random")


def _fit(run_dir, resume=None, ema=0.9) -> Trainer:
    torch.manual_seed(0)
    model = ResNet9(ClassifierModelConfig(width=8, num_classes=4))
    cfg = TrainConfig(budget=8 * 10, batch_size=8, ckpt_every=8 * 5, ema_decay=ema, log_every=1, device="cpu")
    trainer = Trainer(model, ClassifierTask(_images(8, 1), 2, 0.1), ImageBatches(_images(32, 0), 8, 0), cfg,
                      OptimConfig(warmup_steps=2), run_dir, quiet=True)
    trainer.fit(resume)
    return trainer


def test_ema_of_a_batchnorm_model_resumes_exactly_and_leaves_training_alone(tmp_path):
    full = _fit(tmp_path / "full")
    resumed = _fit(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "step_000005")
    shadow, live = full.ema.shadow.state_dict(), full.model.state_dict()
    means = [n for n in shadow if n.endswith("running_mean")]
    assert means and all(not torch.equal(shadow[n], live[n]) for n in means)  # measured, not copied
    for name, value in resumed.ema.shadow.state_dict().items():
        assert torch.equal(value, shadow[name]), name

    def records(run, key):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r[key] for r in map(json.loads, lines) if r["split"] == "train"]

    # measuring draws batches ahead and puts the data position and the RNG back: the same training
    # losses as without EMA
    _fit(tmp_path / "plain", ema=0.0)
    assert records("full", "loss") == records("plain", "loss")
    assert "ema_decay" not in json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    # the effective decay is logged at every step, ramps up and ends at the configured one
    decays = records("full", "ema_decay")
    assert len(decays) == 10 and decays == sorted(decays) and decays[-1] == 0.9
    assert records("resumed", "ema_decay") == decays[5:]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["ema_decay"] == 0.9
