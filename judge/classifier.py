"""A fast ResNet-style image classifier, trained by the project, that scores generated images.

The class accuracy of samples (the fraction a classifier trained on real images assigns to the
class they were conditioned on) complements FID: FID says whether the images look like the data,
accuracy whether the conditioning worked. Two networks: the ResNet-9 of Page's fast CIFAR-10
training (conv-BN-ReLU stages, max pooling, two residual blocks, a scaled linear head) and the
three conv groups of Jordan's airbench94 (`model.arch`).

Trained by scripts/train_classifier.py with the shared trainer (its config and optimiser: config.py);
loaded by `load_classifier`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.checkpoint import load_weights, resolve_checkpoint
from shared.contracts import ModelHooks, Task
from shared.errors import ConfigError
from shared.images import ImageSet, load_classes, to_float
from shared.metrics import MetricsLogger
from shared.run import find_run_dir, load_run_config

from .config import ClassifierModelConfig, ClassifierRunConfig


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PatchWhitening(nn.Module):
    """A frozen 2x2 convolution whose filters whiten the 12 values of a 2x2 pixel patch (the
    eigenvectors of their covariance over training images, scaled by 1/sqrt(eigenvalue)), each
    also negated so that the activation after it keeps both signs: 24 channels. The idea of Page's
    fast CIFAR-10 training and of airbench (Jordan 2024); only the bias is learned."""

    channels = 24

    def __init__(self, activation=F.relu):
        super().__init__()
        self.register_buffer("weight", torch.zeros(self.channels, 3, 2, 2))
        self.bias = nn.Parameter(torch.zeros(self.channels))
        self.activation = activation

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters from images [N, 3, H, W] in [-1, 1]."""
        patches = F.unfold(images.float(), 2).transpose(1, 2).reshape(-1, 12).double()
        mean = patches.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(torch.cov(patches.T))
        filters = eigvecs.T / (eigvals.clamp_min(0) + eps).sqrt()[:, None]
        w = torch.cat([filters, -filters]).float()
        self.weight.copy_(w.view(self.channels, 3, 2, 2))
        self.bias.copy_(-(w @ mean.float()))  # centred: the channels start at mean zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype)))


class Classifier(ModelHooks, nn.Module):
    """What the networks share: a `features` stack ending in a vector, a bias-free linear `head`
    whose logits are scaled by head_scale, test-time augmentation, the whitening stem's fit and
    the optional filter normalisation."""

    features: nn.Sequential
    head: nn.Linear
    ADAM_NAMES = ("head",)  # the head's matrix trains with the rest (AdamW or SGD), not Muon: shared.optim.split_params
    HEAD_NAMES = ("head",)  # and at optim.head_lr when that is set

    def __init__(self, cfg: ClassifierModelConfig):
        super().__init__()
        if cfg.num_classes <= 0:
            raise ConfigError("model.num_classes must be set (it normally comes from the data)")
        self.head_scale, self.flip_tta, self.shift_tta = cfg.head_scale, cfg.flip_tta, cfg.shift_tta
        self.filter_norm = cfg.filter_norm

    def fit_stem(self, images: torch.Tensor, seed: int, n: int = 5000) -> None:
        """Fit a whitening stem to n random training images (uint8 [N, 3, H, W]); nothing for a learned stem."""
        if isinstance(self.features[0], PatchWhitening):
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
            self.features[0].fit(to_float(images[pick]))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """With filter_norm, every trained conv filter bank back to norm sqrt(out channels): BatchNorm
        follows each conv, so the scale is free, and fixing it keeps Muon's step a constant fraction
        of the weights instead of shrinking as they grow (airbench renormalises before each step,
        which is the same thing once the weights start normalised). The trainer calls this hook."""
        if not self.filter_norm:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                m.weight.mul_(math.sqrt(m.weight.shape[0]) / m.weight.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for images x in [-1, 1]."""
        return self.head(self.features(x)) * self.head_scale

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: with flip_tta, averaged over the image and its mirror image; with
        shift_tta also over one-pixel diagonal shifts (reflection at the border), at half weight."""
        logits = self._flip_views(x)
        if self.shift_tta:
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            h, w = x.shape[-2:]
            shifted = self._flip_views(padded[..., :h, :w]) + self._flip_views(padded[..., 2:, 2:])
            logits = (logits + shifted / 2) / 2
        return logits

    def _flip_views(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return (logits + self(x.flip(-1))) / 2 if self.flip_tta else logits


class ResNet9(Classifier):
    def __init__(self, cfg: ClassifierModelConfig):
        super().__init__(cfg)
        w = cfg.width
        stem, c_stem = (PatchWhitening(), PatchWhitening.channels) if cfg.whiten else (_conv_bn(3, w), w)
        self.features = nn.Sequential(
            stem,
            _conv_bn(c_stem, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * w, cfg.num_classes, bias=False)
        if self.filter_norm:
            self.after_optimizer_step()


def _airbench_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight.data[:c_in])  # the first c_in filters start as the identity
    return conv


def _airbench_norm(c: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)  # running statistics that follow the last few batches
    norm.weight.requires_grad_(False)  # scales stay at one; only the shifts train
    return norm


class AirbenchNet(Classifier):
    """The network of airbench94 (Jordan 2024): the whitening stem, then three groups of conv, max
    pool, BatchNorm, GELU, conv, BatchNorm, GELU (width, 4x, 4x channels), a final max pool and the
    head, with convs started at the identity where their shape allows and BatchNorm scales frozen."""

    def __init__(self, cfg: ClassifierModelConfig):
        super().__init__(cfg)
        layers: list[nn.Module] = [PatchWhitening(F.gelu)]
        c_in = PatchWhitening.channels
        for c in (cfg.width, 4 * cfg.width, 4 * cfg.width):
            layers += [_airbench_conv(c_in, c), nn.MaxPool2d(2), _airbench_norm(c), nn.GELU(),
                       _airbench_conv(c, c), _airbench_norm(c), nn.GELU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, cfg.num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.div_(self.head.weight.std())  # unit-variance head, its logits scaled by head_scale
        if self.filter_norm:
            self.after_optimizer_step()


def build_classifier(cfg: ClassifierModelConfig) -> Classifier:
    return AirbenchNet(cfg) if cfg.arch == "airbench" else ResNet9(cfg)


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image by up to `pad` pixels (reflection at the border), with the global RNG."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


class ClassifierTask(Task):
    unit = "images"

    def __init__(self, eval_set: ImageSet, crop_pad: int, label_smoothing: float, eval_batch_size: int = 500):
        self.eval_set, self.crop_pad, self.label_smoothing = eval_set, crop_pad, label_smoothing
        self.eval_batch_size = eval_batch_size

    def loss(self, model: Classifier, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        logits = model(random_crop(images, self.crop_pad))
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: Classifier) -> dict[str, float]:
        was_training = model.training
        model.eval()  # BatchNorm running statistics, not the batch's
        logits = predict_logits(model, self.eval_set.images, self.eval_batch_size)
        model.train(was_training)
        labels = self.eval_set.labels
        return {"loss": F.cross_entropy(logits, labels).item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}

    def sample(self, model: Classifier, step: int, run_dir: Path, logger: MetricsLogger) -> None:
        pass  # a classifier has nothing to sample


@torch.no_grad()
def predict_logits(model: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Float logits on the CPU for uint8 images [N, 3, H, W] (Classifier.predict)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model.predict(to_float(images[i:i + batch_size].to(device))).float().cpu())
    return torch.cat(out)


def load_classifier(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> tuple[Classifier, list[str]]:
    """(model in eval mode, class names) from a classifier run folder or checkpoint; EMA weights
    when the run kept them."""
    ckpt = resolve_checkpoint(path)
    run_dir = find_run_dir(ckpt)
    cfg = load_run_config(run_dir, ClassifierRunConfig, "classifier")  # another kind of run: named in one line
    classes = load_classes(run_dir, "scripts/train_classifier.py")
    model = build_classifier(cfg.model)
    load_weights(model, ckpt, ema=ema and cfg.train.ema_decay > 0)
    return model.to(device).eval(), classes


def class_accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict_logits(model, images).argmax(1) == labels).float().mean().item()
