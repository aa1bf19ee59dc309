"""Model + objective + latent space -> images: the loop shared by training previews and sample.py."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gen.config import SamplerConfig
from gen.sampling.guidance import network_fn
from gen.sampling.noise import Generators


@torch.no_grad()
def generate(model: nn.Module, objective, latent, labels: Tensor, noise: Tensor, scfg: SamplerConfig,
             generator: Generators = None, rounding: str = "round") -> Tensor:
    """Sample latents from `noise` for `labels` with the configured sampler and CFG, decode to uint8 (N, 3, H, W)."""
    was_training = model.training
    model.eval()
    try:
        z = objective.sample(network_fn(model), noise, labels, generator=generator, **objective.sample_options(scfg))
    finally:
        model.train(was_training)
    return latent.decode(z.float(), rounding=rounding)
