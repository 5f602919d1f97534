"""Flow matching: the model's adaLN-Zero start, guidance, label dropout, solvers, EMA, exact
resume, a short debug training run, the generate script's class grid, and one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_one_line_error, run_script
from flow_matching.config import FlowConfig, FlowMatchingRunConfig, SampleConfig
from flow_matching.dit import DiT2D, DiTConfig, TimestepEmbedder
from flow_matching.path import LogitNormalTime, StraightPath, UniformTime, drop_labels
from flow_matching.sampling import euler, guided_velocity, heun, time_grid
from flow_matching.task import FlowMatchingTask
from shared.config import load_config
from shared.ema import EMA
from shared.errors import ConfigError
from shared.images import ImageBatches, ImageSet
from shared.optim import OptimConfig
from shared.trainer import TrainConfig, Trainer

TINY = DiTConfig(patch=4, hidden=32, depth=2, n_heads=2, mlp_hidden=64, freq_dim=32, num_classes=10)


def tiny_model(seed: int = 0, perturb: bool = False) -> DiT2D:
    torch.manual_seed(seed)
    model = DiT2D(TINY)
    if perturb:  # leave the zero init so that every path through the network matters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_untrained_model_predicts_zero_velocity():
    model = tiny_model()
    x, t, y = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 3, 9, model.null_class])
    v = model(x, t, y)
    assert v.shape == x.shape and torch.count_nonzero(v) == 0


def test_patchify_round_trip():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_guidance():
    model = tiny_model(perturb=True)
    x, t, y = torch.randn(3, 3, 32, 32), 0.3, torch.tensor([1, 4, 7])
    tt = torch.full((3,), t)
    with torch.no_grad():
        cond, uncond = model(x, tt, y), model(x, tt, torch.full_like(y, model.null_class))
        assert not torch.allclose(cond, uncond)
        assert torch.allclose(guided_velocity(model, y, 1.0, model.null_class)(x, t), cond, atol=1e-6)
        # the batched cond/uncond path: scale 0 is the unconditional field, 1 + eps is ~conditional
        assert torch.allclose(guided_velocity(model, y, 0.0, model.null_class)(x, t), uncond, atol=1e-5)
        assert torch.allclose(guided_velocity(model, y, 1.0 + 1e-6, model.null_class)(x, t), cond, atol=1e-4)
        assert torch.allclose(guided_velocity(model, y, 3.0, model.null_class)(x, t), uncond + 3 * (cond - uncond), atol=1e-4)


def test_label_dropout_uses_only_the_null_class():
    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    changed = dropped != labels
    assert torch.all(dropped[changed] == 10)
    assert abs(changed.float().mean().item() - 0.1) < 0.02
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


class Spy(torch.nn.Module):
    """Predicts zero velocity and records the times and labels it is given."""

    null_class = 10

    def __init__(self):
        super().__init__()
        self.times, self.labels = [], []

    def forward(self, x, t, y):
        self.times.append(t.clone())
        self.labels.append(y.clone())
        return torch.zeros_like(x)


def spy_task(flow: FlowConfig) -> FlowMatchingTask:
    eval_set = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), tuple("abcdefghij"), "")
    return FlowMatchingTask(flow, SampleConfig(), eval_set, eval_set.classes)


def test_training_loss_sees_real_labels_or_null():
    labels = torch.arange(10).repeat(20)
    torch.manual_seed(0)
    spy = Spy()
    loss = spy_task(FlowConfig(label_dropout=0.5)).loss(spy, (torch.zeros(200, 3, 32, 32), labels))
    assert math.isclose(loss.item(), 1.0, rel_tol=0.05)  # zero prediction vs data - noise = -noise
    y = spy.labels[0]
    assert torch.all((y == labels) | (y == 10)) and 60 < (y == 10).sum() < 140


def test_straight_path_and_time_samplers():
    noise, data = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    path = StraightPath()
    t = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75])
    x = path.sample(noise, data, t)
    assert torch.allclose(x[0], noise[0]) and torch.allclose(x[1], data[1])
    assert torch.allclose(x[2], (noise[2] + data[2]) / 2)
    assert torch.allclose(path.velocity(noise, data), data - noise)
    g = torch.Generator().manual_seed(0)
    for sampler in (UniformTime(), LogitNormalTime(0.0, 1.0)):
        s = sampler.sample(10_000, generator=g)
        assert s.min() >= 0 and s.max() <= 1 and abs(s.mean().item() - 0.5) < 0.02
    # logit-normal concentrates in the middle
    assert (LogitNormalTime().sample(10_000, generator=g) - 0.5).abs().mean() < (UniformTime().sample(10_000, generator=g) - 0.5).abs().mean()



def _fraction_in(t: torch.Tensor, lo: float, hi: float) -> float:
    return ((t >= lo) & (t <= hi)).float().mean().item()


def test_uniform_mix_covers_the_ends():
    n = 200_000
    # P(sigmoid(N(0, 1)) <= 0.02) = Phi(logit(0.02)): 5e-5, so 10 of 200,000 draws
    p_ends = 0.5 * math.erfc(-math.log(0.02 / 0.98) / math.sqrt(2))
    pure = LogitNormalTime().sample(n, generator=torch.Generator().manual_seed(0))
    mixed = LogitNormalTime(uniform_mix=0.1).sample(n, generator=torch.Generator().manual_seed(0))
    for lo, hi in ((0.0, 0.02), (0.98, 1.0)):
        expected = 0.1 * 0.02 + 0.9 * p_ends  # 2.0e-3, about 410 draws: the binomial sd is 5%
        assert _fraction_in(mixed, lo, hi) == pytest.approx(expected, rel=0.2)
        assert _fraction_in(pure, lo, hi) < 2e-4
    assert mixed.min() >= 0 and mixed.max() <= 1
    everywhere = LogitNormalTime(uniform_mix=1.0).sample(n, generator=torch.Generator().manual_seed(0))
    assert _fraction_in(everywhere, 0.0, 0.02) == pytest.approx(0.02, rel=0.1)


def test_uniform_mix_of_zero_draws_exactly_the_logit_normal_stream():
    # a run with the mix off trains (and resumes) on the same times as before the option existed
    g_old, g_new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = torch.sigmoid(0.5 + 1.2 * torch.randn(1000, generator=g_old))
    assert torch.equal(LogitNormalTime(0.5, 1.2, 0.0).sample(1000, generator=g_new), expected)
    assert torch.equal(g_new.get_state(), g_old.get_state())  # and no extra draws shift the later noise


def test_training_uses_the_configured_uniform_mix():
    torch.manual_seed(0)
    spy = Spy()
    spy_task(FlowConfig(uniform_mix=0.5)).loss(spy, (torch.zeros(20_000, 1, 1, 1), torch.zeros(20_000, dtype=torch.long)))
    assert 0.007 < _fraction_in(spy.times[0], 0.0, 0.02) < 0.013  # 0.5 * 0.02 = 1%; without the mix 0.005%


@pytest.mark.parametrize("freq_dim", [TINY.freq_dim, 256])
def test_time_embedding_resolves_neighbouring_times(freq_dim):
    """DiT2D multiplies t in [0, 1] by TIME_SCALE before the sinusoidal features. Measured on
    this embedder: at scale <= 100 (t fed unscaled, say) times 1e-3 apart embed almost alike (and
    exactly alike at scale 1 under bf16 autocast); at scale >= 3000 (t scaled twice, say) near and
    far times look alike, so the embedding no longer varies smoothly with t."""
    torch.manual_seed(0)
    embed = TimestepEmbedder(64, freq_dim)  # the DiT's module, random as at initialisation
    ts = torch.linspace(0, 1, 1001)  # steps of 1e-3
    for autocast in (False, True):  # fp32 and bf16, as training on a GPU runs it
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            e = embed(ts).float()
        spread = torch.cdist(e, e).mean()  # the typical distance between two times
        near = (e[1:] - e[:-1]).norm(dim=-1)  # t and t + 1e-3
        far = (e[100:] - e[:-100]).norm(dim=-1)  # t and t + 0.1
        assert near.min() > 0.05 * spread, (near.min() / spread).item()  # at scale 1000: 0.12-0.18
        assert near.mean() < 0.5 * far.mean(), (near.mean() / far.mean()).item()  # at scale 1000: 0.24-0.35


@pytest.mark.parametrize("kind", ["uniform", "cosine"])
def test_time_grids(kind):
    ts = time_grid(7, kind)
    assert len(ts) == 8 and ts[0] == 0.0 and ts[-1] == 1.0 and all(a < b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("kind", ["uniform", "cosine"])
def test_solvers_reach_the_target_of_known_fields(kind):
    # the marginal velocity of the straight path when all data is one point: x(1) = target exactly
    target = torch.tensor([[2.0, -1.0, 0.5]])
    to_point = lambda x, t: (target - x) / (1 - t)
    x0 = torch.randn(4, 3)
    # (Euler only: Heun evaluates the field at t = 1, where this one is undefined)
    assert torch.allclose(euler(to_point, x0, time_grid(5, kind)), target.expand(4, 3), atol=1e-5)
    # dx/dt = x: x(1) = e * x(0); Euler is first order, Heun second order
    grow = lambda x, t: x
    x0 = torch.ones(1)
    err = {(s.__name__, n): abs(s(grow, x0, time_grid(n, kind)).item() - math.e) for s in (euler, heun) for n in (20, 40)}
    assert err["euler", 40] < 0.06 and err["heun", 40] < 2e-3
    assert 1.6 < err["euler", 20] / err["euler", 40] < 2.4  # halves with twice the steps
    assert 3.0 < err["heun", 20] / err["heun", 40] < 5.0  # quarters


def test_ema_arithmetic():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.shadow.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    warm = EMA(torch.nn.Linear(2, 1, bias=False), decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): follows the model at first
    with torch.no_grad():
        warm.shadow.weight.fill_(1.0)
    warm.update(model)
    assert torch.allclose(warm.shadow.weight, torch.full((1, 2), 0.1 * 1 + 0.9 * 3))
    assert warm.current_decay() == pytest.approx(2 / 11)


def test_config_validation():
    cfg = load_config(FlowMatchingRunConfig, ROOT / "configs/flow_matching/debug.toml")
    assert cfg.data.source == "builtin" and cfg.train.ema_decay > 0
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(FlowMatchingRunConfig, ROOT / "configs/flow_matching/debug.toml", ["model.bogus=1"])
    with pytest.raises(ConfigError, match="n_heads"):
        load_config(FlowMatchingRunConfig, None, ["model.hidden=100", "model.n_heads=3"])
    with pytest.raises(ConfigError, match="sampler"):
        load_config(FlowMatchingRunConfig, None, ["sample.sampler=rk4"])
    with pytest.raises(ConfigError, match="sample.per_class must be positive"):
        load_config(FlowMatchingRunConfig, None, ["sample.per_class=0"])
    assert load_config(FlowMatchingRunConfig, None, ["data.eval_images=0"]).data.eval_images == 0  # all, as the VQ-VAE's
    for bad in ("-0.1", "1.5", "nan"):
        with pytest.raises(ConfigError, match="flow.uniform_mix must be in"):
            load_config(FlowMatchingRunConfig, None, [f"flow.uniform_mix={bad}"])
    for key, bad in (("logit_std", "nan"), ("logit_std", "0"), ("logit_mean", "inf")):
        with pytest.raises(ConfigError, match=f"flow.{key} must be"):
            load_config(FlowMatchingRunConfig, None, [f"flow.{key}={bad}"])


@pytest.mark.parametrize("preset, low, high", [("dit-s", 25e6, 40e6), ("dit-b", 115e6, 145e6)])
def test_preset_sizes(preset, low, high):
    cfg = load_config(FlowMatchingRunConfig, ROOT / f"configs/flow_matching/{preset}.toml")
    cfg.model.num_classes = 10
    with torch.device("meta"):
        n = sum(p.numel() for p in DiT2D(cfg.model).parameters())
    assert low < n < high


def _random_images(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), tuple("abcdefghij"), "random")


def _fit(run_dir, resume=None):
    torch.manual_seed(0)
    model = DiT2D(TINY)
    data = ImageBatches(_random_images(96, 0), 16, seed=0, hflip=True)
    task = FlowMatchingTask(FlowConfig(label_dropout=0.2), SampleConfig(per_class=1, num_steps=2), _random_images(16, 1), tuple("abcdefghij"))
    cfg = TrainConfig(budget=16 * 8, batch_size=16, ckpt_every=16 * 4, keep_checkpoints=3, ema_decay=0.9, log_every=1)
    trainer = Trainer(model, task, data, cfg, OptimConfig(warmup_steps=2), run_dir, quiet=True)
    trainer.fit(resume)
    return trainer


def test_resume_continues_exactly(tmp_path):
    full = _fit(tmp_path / "full")
    resumed = _fit(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "step_000004")
    for a, b in ((full.model, resumed.model), (full.ema.shadow, resumed.ema.shadow)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    assert full.ema.updates == resumed.ema.updates == 8


# ------------------------------------------------------------------ scripts (one short run shared)

DEBUG = str(ROOT / "configs/flow_matching/debug.toml")
SHORT = ["train.budget=2560", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0", "optim.warmup_steps=5",
         "data.eval_images=128", "sample.per_class=2", "sample.num_steps=2"]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fm")
    proc = run_script("train_flow_matching.py", "--config", DEBUG, "--experiment_name", "dbg", *SHORT, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd, cwd / "runs" / "dbg"


def test_debug_preset_beats_its_initial_loss(debug_run):
    _, run = debug_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in records if r["split"] == "train")
    final_eval = [r["loss"] for r in records if r["split"] == "eval"][-1]
    assert first > 1.0  # the zero-velocity start: E|data - noise|^2 = 1 + Var(data)
    assert final_eval < 0.75 * first, (first, final_eval)
    assert (run / "samples" / "step_000040.png").is_file() and (run / "checkpoints" / "latest").is_file()


def test_generate_class_grid(debug_run, tmp_path):
    cwd, run = debug_run
    proc = run_script("generate_flow_matching.py", "--checkpoint", str(run), "--class_grid", "--samples_per_class", "3",
                      "--num_steps", "2", "--cfg_scale", "2", "--sampler", "heun", "--output_dir", str(tmp_path), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "class_grid.png").convert("RGB")).astype(int)
    rows, cell = 10, 32 + 2
    assert grid.shape[0] == rows * cell + 2
    label_w = grid.shape[1] - (3 * cell + 2)
    assert label_w > 10
    # one row per class: white separators every `cell` pixels, and ink in the label column of each row
    for k in range(rows + 1):
        assert (grid[k * cell:k * cell + 2, label_w:] == 255).all()
    for k in range(rows):
        assert (grid[k * cell + 2:(k + 1) * cell, :label_w] < 128).any(), f"no label drawn for row {k}"


def test_generate_samples_and_save_images(debug_run, tmp_path):
    cwd, run = debug_run
    proc = run_script("generate_flow_matching.py", "--checkpoint", str(run), "--num_samples", "5", "--class_label", "ring",
                      "--num_steps", "2", "--save_images", "--no_ema", "--output_dir", str(tmp_path), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["generation.json", "ring"]
    assert len(list((tmp_path / "images" / "ring").glob("*.png"))) == 5
    assert Image.open(tmp_path / "samples.png").size == (3 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
def test_bad_input_is_one_error_line(debug_run, tmp_path):
    cwd, run = debug_run
    proc = run_script("train_flow_matching.py", "--config", DEBUG, "--experiment_name", "x", "--data", str(tmp_path / "missing"), cwd=tmp_path)
    assert_one_line_error(proc, "image data not found")
    proc = run_script("train_flow_matching.py", "--config", DEBUG, "--experiment_name", "x", "flow.bogus=1", cwd=tmp_path)
    assert_one_line_error(proc, "unknown config key", "bogus")
    proc = run_script("train_flow_matching.py", "--config", DEBUG, "--experiment_name", "x", "flow.uniform_mix=nan", cwd=tmp_path)
    assert_one_line_error(proc, "flow.uniform_mix must be in [0, 1], got nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.toml").write_bytes((run / "config.toml").read_bytes())
    (bad / "classes.json").write_bytes((run / "classes.json").read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a checkpoint")
    (bad / "ema.safetensors").write_bytes(b"not a checkpoint")
    proc = run_script("generate_flow_matching.py", "--checkpoint", str(bad), "--num_steps", "1", cwd=tmp_path)
    assert_one_line_error(proc, "corrupt")


@pytest.mark.slow
def test_trains_on_a_real_image_folder(data_dir, tmp_path):
    # the CIFAR-10 test folder used as a one-split image folder (10,000 images decode in seconds)
    folder = data_dir / "cifar10-jpeg" / "test"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    proc = run_script("train_flow_matching.py", "--config", DEBUG, "--experiment_name", "real", "--data", str(folder),
                      "train.budget=256", "data.eval_images=64", "sample.per_class=1", "sample.num_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "real"
    assert json.loads((run / "classes.json").read_text())[:3] == ["airplane", "automobile", "bird"]
    assert "train: nine tenths" in proc.stdout and "test: held-out tenth" in proc.stdout
    assert Image.open(run / "samples" / "step_000004.png").height == 10 * 34 + 2


@pytest.mark.parametrize("name,millions", [("dit-s", 32.4), ("dit-b", 129.5)])
def test_preset_sizes_match_their_labels(name, millions):
    from flow_matching.config import FlowMatchingRunConfig
    from flow_matching.dit import DiT2D
    from shared.config import load_config
    from shared.trainer import count_params

    cfg = load_config(FlowMatchingRunConfig, ROOT / "configs" / "flow_matching" / f"{name}.toml", ["model.num_classes=10"])
    with torch.device("meta"):
        model = DiT2D(cfg.model)
    assert round(count_params(model) / 1e6, 1) == millions
    label = (ROOT / "configs" / "flow_matching" / f"{name}.toml").read_text().splitlines()[0]
    assert f"{millions}M" in label or f"{millions:.0f}M" in label, label
