"""An optional adversarial loss for the VQ-VAE: a small PatchGAN discriminator (Isola et al., 2017)
trained from scratch with the hinge loss, as in VQGAN (Esser et al., 2021).

Design, chosen so that one optimiser step and one checkpoint cover everything:
- The discriminator is a submodule of the VQVAE (`model.discriminator`), so its weights are in
  `model.safetensors` and its optimiser state in the trainer's optimisers (state.pt): a resumed run
  continues exactly. The tokenizer drops it after loading (it never affects tokens).
- Its loss is added to the autoencoder's, and one backward pass trains both without gradient
  reversal: the discriminator sees the reconstructions detached (its loss reaches only its own
  weights), and the generator's term runs the discriminator with detached weights
  (`torch.func.functional_call`), so that term reaches only the autoencoder.
- The number of optimiser steps taken is a buffer of the discriminator (`steps`, counted by
  VQVAE.after_optimizer_step), so "start after N steps" survives a resume too. Its value is also
  kept in Python (`steps_taken`), which the loss reads without waiting for the device.
Known compromises: the discriminator shares the run's optimisers and learning rate (Muon for its
filters under optim.muon_conv) and the global gradient clip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class PatchDiscriminator(nn.Module):
    """Images [B, 3, H, W] -> real/fake logits [B, 1, H / 2^layers, W / 2^layers], one per patch."""

    def __init__(self, channels: int = 64, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(math.gcd(32, 2 * c // 4), 2 * c),
                     nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps of the run so far
        self.steps_taken = 0  # the same on the host, kept in step by count_step and by loading a state dict
        self.register_load_state_dict_post_hook(_read_steps)

    def count_step(self) -> None:
        self.steps += 1
        self.steps_taken += 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The same logits with the weights detached: gradients reach the images only."""
        params = {n: p.detach() for n, p in self.named_parameters()}
        return functional_call(self, {**params, **dict(self.named_buffers())}, (images,))


def _read_steps(module: PatchDiscriminator, incompatible_keys) -> None:
    module.steps_taken = int(module.steps)  # one sync per load, never per step


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / ||d g / d W|| at the decoder's last layer W (detached): the adversarial term
    pushes that layer as hard as the reconstruction term does (VQGAN's balancing)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()
