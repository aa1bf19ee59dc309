"""Model + objective + latent space -> images: the loops shared by training previews, FID tracking and sample.py."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gen.cond import Cond, as_cond
from gen.config import SamplerConfig
from gen.precision import precision
from gen.sampling.noise import Generators, sample_generators


@torch.no_grad()
def generate(model: nn.Module, objective, latent, cond, x_T: Tensor, scfg: SamplerConfig,
             generator: Generators = None, rounding: str = "round") -> Tensor:
    """Sample from the prior draw `x_T` under `cond` (a Cond, or class labels) with the configured sampler, guidance
    and network precision (sampler.precision), and decode (images: uint8 (N, 3, H, W))."""
    was_training = model.training
    model.eval()
    try:
        with precision(scfg.precision, x_T.device):
            z = objective.sample(objective.model_fn(model), x_T, as_cond(cond), generator=generator,
                                 **objective.sample_options(scfg))
    finally:
        model.train(was_training)
    return latent.decode(z.float(), rounding=rounding)


def sample_labels(num_samples: int, num_classes: int, scheme: str, seed: int) -> np.ndarray:
    """Labels of samples 0..N-1: uniform random from `seed` (the reference repos) or balanced (i mod K)."""
    if scheme == "balanced":
        return np.arange(num_samples, dtype=np.int64) % num_classes
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (num_samples,), generator=g).numpy().astype(np.int64)


def generate_indexed(model: nn.Module, objective, latent, scfg: SamplerConfig, labels: np.ndarray,
                     indices: Sequence[int], seed: int, batch_size: int, rounding: str,
                     device, text: Tensor | None = None) -> Iterator[tuple[np.ndarray, Tensor]]:
    """Yield (global indices, decoded samples) for `indices` in batches; sample i depends only on (seed, i). With
    `text` (C, T, D) (gen.text.sample_text), sample i is also conditioned on text[i mod C].

    Its generator draws the prior sample and every SDE/DDPM noise, so the samples are the same whatever the
    batch size or the split of indices over processes.
    """
    indices = np.asarray(indices, dtype=np.int64)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        gens = sample_generators(seed, idx, device)
        x_T = objective.prior(latent.shape, gens, device=device)
        y = torch.as_tensor(labels[idx], device=device)
        cond = Cond(y) if text is None else Cond(y, text[torch.as_tensor(idx % len(text))].to(device))
        yield idx, generate(model, objective, latent, cond, x_T, scfg, generator=gens, rounding=rounding)
