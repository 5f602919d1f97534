"""The flow-matching task for the shared trainer: the training loss, a held-out evaluation loss,
and labelled class grids of samples (the trainer hands the EMA weights to both hooks)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from shared.contracts import Task
from shared.grid import class_grid
from shared.images import ImageSet, save_png, to_float, to_uint8
from shared.metrics import MetricsLogger

from .config import FlowConfig, SampleConfig
from .dit import DiT2D
from .path import StraightPath, drop_labels, time_sampler
from .sampling import sample


class FlowMatchingTask(Task):
    unit = "images"

    def __init__(self, flow: FlowConfig, sample_cfg: SampleConfig, eval_set: ImageSet, classes: tuple[str, ...],
                 eval_batch_size: int = 256):
        self.path = StraightPath()
        self.times = time_sampler(flow.time_sampling, flow.logit_mean, flow.logit_std, flow.uniform_mix)
        self.label_dropout = flow.label_dropout
        self.sample_cfg, self.classes = sample_cfg, classes
        self.eval_set, self.eval_batch_size = eval_set, eval_batch_size

    def loss(self, model: DiT2D, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # noise, times and dropped labels come from torch's global RNG, which the trainer seeds from
        # (seed, step, micro-batch): a resumed or multi-process run draws what one uninterrupted process would
        data, labels = batch
        noise = torch.randn_like(data)
        t = self.times.sample(len(data), device=data.device)
        labels = drop_labels(labels, self.label_dropout, model.null_class)
        x_t = self.path.sample(noise, data, t)
        return F.mse_loss(model(x_t, t, labels).float(), self.path.velocity(noise, data))

    @torch.no_grad()
    def evaluate(self, model: DiT2D) -> dict[str, float]:
        """Conditional MSE on the held-out images at evenly spaced times (the same noise every
        call, from a private generator), so evaluations are comparable across the run."""
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(1234)
        n = len(self.eval_set)
        times = (torch.arange(n) + 0.5) / n  # stratified over [0, 1]: t ~ U[0, 1] without the variance
        times = times[torch.randperm(n, generator=g)]
        total = 0.0
        for i in range(0, n, self.eval_batch_size):
            data = to_float(self.eval_set.images[i:i + self.eval_batch_size])
            noise = torch.randn(data.shape, generator=g)
            data, noise = data.to(device), noise.to(device)
            t = times[i:i + len(data)].to(device)
            labels = self.eval_set.labels[i:i + len(data)].to(device)
            pred = model(self.path.sample(noise, data, t), t, labels).float()
            total += F.mse_loss(pred, self.path.velocity(noise, data), reduction="sum").item()
        return {"loss": total / (n * self.eval_set.images[0].numel())}

    @torch.no_grad()
    def sample(self, model: DiT2D, step: int, run_dir: Path, logger: MetricsLogger) -> None:
        s = self.sample_cfg
        device = next(model.parameters()).device
        labels = torch.arange(len(self.classes), device=device).repeat_interleave(s.per_class)
        g = torch.Generator().manual_seed(s.seed)  # the same noise at every step: grids are comparable
        images = sample(model, labels, num_steps=s.num_steps, cfg_scale=s.cfg_scale, sampler=s.sampler,
                        grid=s.time_grid, generator=g)
        grid = class_grid(to_uint8(images.float()).cpu(), self.classes, s.per_class)
        save_png(grid, run_dir / "samples" / f"step_{step:06d}.png")
        logger.add_image("samples", grid, step)
