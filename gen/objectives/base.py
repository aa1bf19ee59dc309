"""What every training objective returns, and the per-sample mean it is built from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LossOutput:
    """Per-sample loss plus the fields an aligner needs (DESIGN.md 3.2 / 3.4)."""

    loss: Tensor  # (N,) per-sample denoising loss
    x_t: Tensor  # noised input the model saw
    t: Tensor  # (N,) time in the objective's own units
    noise: Tensor  # the noise that produced x_t
    y: Tensor  # (N,) labels after dropout (null class where dropped)
    feats: dict[int, Tensor] = field(default_factory=dict)  # tapped block outputs, (N, T, D)
    logs: dict[str, Tensor] = field(default_factory=dict)  # detached extra terms (e.g. "mse", "vb")


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def drop_labels(y: Tensor, prob: float, null_class: int | None) -> Tensor:
    """Replace each label by the null class with probability `prob` (classifier-free guidance training)."""
    if prob <= 0 or null_class is None:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)
