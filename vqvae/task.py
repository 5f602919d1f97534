"""The VQ-VAE task for the shared trainer: loss, reconstruction metrics, and sample grids of
originals beside their reconstructions."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.images import image_grid, save_png, to_float, to_uint8
from shared.metrics import MetricsLogger

from .config import LossConfig
from .model import VQVAE, VQVAEOutput


def vq_loss(out: VQVAEOutput, images: torch.Tensor, cfg: LossConfig, codebook_trained: bool) -> torch.Tensor:
    recon = out.reconstruction.float()
    rec = F.mse_loss(recon, images) if cfg.recon == "mse" else F.l1_loss(recon, images)
    loss = rec + cfg.commitment * out.quant.commitment
    if codebook_trained:  # under EMA updates the codebook term has no gradient: leave it out of the number
        loss = loss + cfg.codebook * out.quant.codebook
    return loss


@torch.no_grad()
def reconstruction_metrics(model: VQVAE, images: torch.Tensor, batch_size: int = 256,
                           loss_cfg: LossConfig | None = None, progress: bool = False) -> dict[str, float]:
    """Metrics over uint8 images [N, 3, H, W], in the model's current mode (use eval()).

    mse is per pixel on the [0, 1] scale of the clamped reconstruction; psnr = 10 log10(1 / mse)
    of that dataset-wide mse. codes_used counts distinct codes over all N images; perplexity is
    exp(entropy) of their frequency (equal to codebook_size when every code is used equally).
    """
    device = next(model.parameters()).device
    k = model.cfg.codebook_size
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    sq_err, loss_sum, n_pix, tokens = 0.0, 0.0, 0, 0
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", mininterval=1.0)
    for i in starts:
        x = to_float(images[i:i + batch_size].to(device))
        out = model(x)
        recon = out.reconstruction.float().clamp(-1, 1)
        sq_err += ((recon - x) / 2).pow(2).sum().item()  # /2: [-1, 1] -> [0, 1] scale
        n_pix += x.numel()
        if loss_cfg is not None:
            loss_sum += vq_loss(out, x, loss_cfg, model.cfg.codebook_update == "loss").item() * len(x)
        counts += torch.bincount(out.quant.indices.flatten(), minlength=k).double()
        tokens = out.quant.indices[0].numel()
    mse = sq_err / n_pix
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    metrics = {"mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "codes_used": used,
               "codebook_usage": used / k, "perplexity": math.exp(entropy), "tokens_per_image": tokens}
    if loss_cfg is not None:
        metrics = {"loss": loss_sum / len(images), **metrics}
    return metrics


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """uint8 grid: a row of originals, then the row of their reconstructions below it, and so on."""
    rows = []
    for i in range(0, len(originals), per_row):
        rows += [originals[i:i + per_row], reconstructions[i:i + per_row]]
    pad = [torch.full_like(r[:1], 255).expand(per_row - len(r), -1, -1, -1) for r in rows]
    return image_grid(torch.cat([torch.cat([r, p]) for r, p in zip(rows, pad)]), nrow=per_row)


class VQVAETask:
    unit = "images"

    def __init__(self, eval_images: torch.Tensor, loss_cfg: LossConfig, sample_images: int = 32, batch_size: int = 256):
        self.eval_images, self.loss_cfg, self.batch_size = eval_images, loss_cfg, batch_size
        self.sample_images = eval_images[:sample_images]

    def loss(self, model: VQVAE, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, _ = batch
        out = model(images)
        codebook_trained = getattr(model, "_orig_mod", model).cfg.codebook_update == "loss"
        return vq_loss(out, images, self.loss_cfg, codebook_trained)

    def evaluate(self, model: VQVAE) -> dict[str, float]:
        return reconstruction_metrics(model, self.eval_images, self.batch_size, self.loss_cfg)

    @torch.no_grad()
    def sample(self, model: VQVAE, step: int, run_dir: Path, logger: MetricsLogger) -> None:
        device = next(model.parameters()).device
        recon = model(to_float(self.sample_images.to(device))).reconstruction.float().clamp(-1, 1)
        grid = comparison_grid(self.sample_images, to_uint8(recon).cpu())
        save_png(grid, Path(run_dir) / "samples" / f"step_{step:06d}.png")
        logger.add_image("reconstructions", grid, step)
