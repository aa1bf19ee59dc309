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
                       num_classes=cfg.model.num_classes, qk_norm=cfg.model.qk_norm, **overrides)


def build_objective(cfg: Config, model: nn.Module):
    """The configured objective for `model` (null class and variance head taken from the model)."""
    return OBJECTIVES[cfg.objective.name].from_config(cfg.objective, model)


def step_generator(seed: int, step: int, micro: int, device: torch.device | str) -> torch.Generator:
    """A generator for one micro-step, identical on every process (so draws do not depend on world size)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4_099 + micro)
    return g


def rank_slice(t: Tensor, rank: int, per_process: int) -> Tensor:
    """This process's contiguous part of a tensor drawn for the whole global micro-batch."""
    return t[rank * per_process:(rank + 1) * per_process]
