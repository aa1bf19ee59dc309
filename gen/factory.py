"""Config -> objects: the one place the jobs turn a `Config` into a backbone, an objective and step noise."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gen.config import Config
from gen.models import build_model
from gen.objectives import OBJECTIVES

# Model options a config may leave null to keep the size table's / family's value.
_OPTIONAL_MODEL_KEYS = ("learn_sigma", "depth", "hidden_size", "num_heads")


def build_backbone(cfg: Config, latent_shape: tuple[int, ...]) -> nn.Module:
    """The configured backbone, sized for latents of shape (C, H, W)."""
    channels, height, width = latent_shape
    overrides = {k: getattr(cfg.model, k) for k in _OPTIONAL_MODEL_KEYS if getattr(cfg.model, k) is not None}
    return build_model(cfg.model.name, input_size=(height, width), in_channels=channels,
                       num_classes=cfg.model.num_classes, qk_norm=cfg.model.qk_norm, rope=cfg.model.rope,
                       **overrides)


def build_objective(cfg: Config, model: nn.Module):
    """The configured objective for `model` (null class and variance head taken from the model)."""
    return OBJECTIVES[cfg.objective.name].from_config(cfg.objective, model)


def step_draws(objective, latent, global_batch_size: int, seed: int, step: int, hflip: bool,
               device) -> dict[str, Tensor]:
    """Every random input of one optimizer step for the whole global batch, from a generator seeded by (seed, step).

    Time, noise and label-drop mask (the objective's), the latent posterior noise, the flip mask and one uniform
    number per sample for the aligners (SRA's teacher-time offset). Each process
    takes its slice of each micro-step (`micro_slice`), so a run does not depend on the number of processes nor on
    how the global batch is split into accumulation steps.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + step)
    draws = objective.draw(global_batch_size, latent.shape, g)
    draws["posterior"] = torch.randn((global_batch_size, *latent.shape), generator=g, device=device)
    if hflip:
        draws["flip"] = torch.rand(global_batch_size, generator=g, device=device) < 0.5
    draws["uniform"] = torch.rand(global_batch_size, generator=g, device=device)  # aligners' randomness (SRA's u)
    return draws


def micro_slice(draws: dict[str, Tensor], micro: int, rank: int, world: int, per_process: int) -> dict[str, Tensor]:
    """This process's part of micro-step `micro`, in gen.data.DistributedBatchSampler's layout of a global batch."""
    start = (micro * world + rank) * per_process
    return {k: v[start:start + per_process] for k, v in draws.items()}
