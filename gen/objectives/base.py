"""What every training objective returns, and the per-sample mean it is built from."""
from __future__ import annotations

from abc import ABC, abstractmethod
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


def drop_labels(y: Tensor, prob: float, null_class: int | None, drop: Tensor | None = None) -> Tensor:
    """Replace labels by the null class where `drop` is set, or each with probability `prob` (CFG training)."""
    if null_class is None or (drop is None and prob <= 0):
        return y
    if drop is None:
        drop = torch.rand(y.shape[0], device=y.device) < prob
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


class Objective(ABC):
    """What the jobs use of every objective besides `loss` and `sample` (DESIGN.md 3.2)."""

    SAMPLERS: dict  # sampler name -> implementation; names are what `sampler.sampler` takes
    label_dropout: float
    null_class: int | None

    @abstractmethod
    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n training times in the objective's units."""

    def draw(self, n: int, sample_shape, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """Every random input of `loss` for n samples (t, noise, label-drop mask) from one generator.

        The trainer draws them for a whole global micro-batch and gives each process its slice, so training
        does not depend on the number of processes.
        """
        device = device if device is not None else (generator.device if generator is not None else None)
        t = self.sample_time(n, device=device, generator=generator)
        noise = torch.randn((n, *sample_shape), generator=generator, device=device)
        drop = torch.rand(n, generator=generator, device=device) < self.label_dropout
        return {"t": t, "noise": noise, "drop": drop}
