"""The objective contract (docs/architecture.md, "Objective") and the per-sample mean every loss is built from.

An objective owns the corruption process, the loss, the sampling start (`prior`) and its samplers. It declares
the latent kinds it runs on (refused at config load otherwise), every random input of a training step with its
granularity (`DRAWS`: per sample or per global batch, so the trainer can split draws over processes), the view
SRA's teacher gets (`teacher_view`) and how the model is called (`call`, `model_fn`). Defaulting of missing draws
and condition dropout happen here, once, in `loss`; subclasses implement `compute_loss` on complete draws.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from gen.cond import Cond, Conditioning, as_cond
from gen.sampling.guidance import network_fn
from gen.sampling.noise import Generators, randn


@dataclass
class LossOutput:
    """Per-sample loss plus the fields an aligner needs (AlignBatch)."""

    loss: Tensor  # (N,) per-sample loss
    x_t: Tensor  # corrupted input the model saw
    t: Tensor  # (N,) time in the objective's own units
    noise: Tensor  # the noise that produced x_t
    cond: Cond  # conditions after dropout (null where dropped)
    feats: dict[int, Tensor] = field(default_factory=dict)  # tapped block outputs, (N, T, D)
    logs: dict[str, Tensor] = field(default_factory=dict)  # detached extra terms (e.g. "mse", "vb")


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class Objective(ABC):
    """A training objective with its samplers; see the module docstring for the contract."""

    KEY: ClassVar[str]
    """Registry key in gen.objectives.OBJECTIVES and the config section objective.<KEY>."""
    Config: ClassVar[type]
    """The objective's config dataclass (a gen.config.ComponentConfig)."""
    LATENT_KINDS: ClassVar[tuple[str, ...]]
    """latents.LatentSpace.kind values it runs on (continuous, binary, tokens)."""
    SAMPLERS: ClassVar[dict]
    """Sampler name -> implementation; the names are what sampler.sampler takes."""
    BACKBONES: ClassVar[tuple[str, ...] | None] = None
    """Backbone family keys it trains (their forward takes what it passes); None: every family taking the latent's
    layout."""
    DRAWS: ClassVar[dict[str, str]] = {"t": "sample", "noise": "sample"}
    """Random inputs of `loss` besides the conditioning's: name -> "sample" (one per sample) or "batch" (one per
    global batch, e.g. a mask ratio); `draw` returns exactly these plus the conditioning's."""
    USES_STEP: ClassVar[bool] = False
    """Whether `compute_loss` takes the optimizer step (`step=`, e.g. a loss term switched on at a step); the trainer
    passes it to `loss`, which forwards it only to objectives declaring this."""
    GENERATIVE: ClassVar[bool] = True
    """False for an objective with nothing to sample (a stage-1 autoencoder): sample.py refuses its runs."""

    def __init__(self, cond: Conditioning):
        self.cond = cond

    @property
    def null_class(self) -> int | None:
        """The model's unconditional label (None: an unconditional model)."""
        return self.cond.null_class

    @property
    def label_dropout(self) -> float:
        """Probability of training a sample unconditionally."""
        return self.cond.dropout

    @classmethod
    @abstractmethod
    def from_config(cls, cfg, model: nn.Module) -> Objective:
        """From cfg.objective.<KEY> and cfg.cond, for `model` (e.g. its variance head)."""

    def draw_kinds(self) -> dict[str, str]:
        """Every draw of a training step with its granularity: the objective's and the conditioning's."""
        return {**self.DRAWS, **self.cond.DRAWS}

    @abstractmethod
    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n training times in the objective's units."""

    def draw(self, n: int, sample_shape, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """Every random input of `loss` for n samples from one generator (time, Gaussian noise, dropout mask).

        The trainer draws them for a whole global batch and gives each process its slice (per-sample draws) or
        the whole value (per-batch draws), so training does not depend on the number of processes.
        """
        device = device if device is not None else (generator.device if generator is not None else None)
        t = self.sample_time(n, device=device, generator=generator)
        noise = torch.randn((n, *sample_shape), generator=generator, device=device)
        return {"t": t, "noise": noise, **self.cond.draw(n, generator, device)}

    def prior(self, sample_shape, generator: Generators = None, n: int | None = None, device=None) -> Tensor:
        """The sampling start for n samples (one per generator when given a list): standard Gaussian noise."""
        n = len(generator) if isinstance(generator, (list, tuple)) else n
        return randn((n, *sample_shape), generator, device=device)

    def loss(self, model: nn.Module, x0: Tensor, cond, *, taps=(), step: int | None = None, **draws) -> LossOutput:
        """Per-sample loss of `model` on clean x0 under `cond`; missing draws come from torch's global generator,
        the dropout mask `drop` nulls conditions (none given: drawn, dropped with probability cond.dropout);
        `step` (the optimizer step) reaches `compute_loss` where USES_STEP says so."""
        cond = as_cond(cond)
        missing = [k for k in self.draw_kinds() if draws.get(k) is None]
        if missing:
            fresh = self.draw(x0.shape[0], x0.shape[1:], device=x0.device)
            draws = {**draws, **{k: fresh[k] for k in missing}}
        cond = self.cond.drop(cond, draws.pop("drop"))
        if self.USES_STEP:
            draws["step"] = step
        return self.compute_loss(model, x0, cond, taps=tuple(taps), **draws)

    @abstractmethod
    def compute_loss(self, model: nn.Module, x0: Tensor, cond: Cond, *, taps: tuple[int, ...],
                     **draws) -> LossOutput:
        """The loss on complete draws (every DRAWS entry given) and conditions already dropped."""

    def call(self, model: nn.Module, x: Tensor, t: Tensor, cond: Cond, *, taps=(), stop_at: int | None = None):
        """How this objective calls the backbone (integer times as float); the loss and SRA's teacher use it."""
        return model(x, t if t.is_floating_point() else t.float(), cond, taps=taps, stop_at=stop_at)

    def model_fn(self, model: nn.Module, dtype: torch.dtype | None = None) -> Callable:
        """`fn(x, t, cond) -> prediction` for the samplers: x cast to `dtype` (None keeps x's), t as float32."""
        return network_fn(model, dtype)

    def teacher_view(self, x0: Tensor, t: Tensor, noise: Tensor, u: Tensor, t_max: float) -> tuple[Tensor, Tensor]:
        """A less-corrupted view of the same sample for SRA's teacher: (x at the earlier time, that time), the
        earlier time t - u * t_max of the full time range, with the same x0 and noise."""
        raise NotImplementedError(f"objective {type(self).__name__} defines no teacher view (SRA cannot run on it)")

    @abstractmethod
    def sample_options(self, scfg) -> dict:
        """`sample` keyword arguments from a gen.config.SamplerConfig."""

    @abstractmethod
    def sample(self, model_fn: Callable, x_T: Tensor, cond, *, generator: Generators = None, **options) -> Tensor:
        """Samples from the prior draw `x_T` under `cond` (guidance, sampler and steps from `options`)."""

    def load_weights(self, device: torch.device | str = "cpu") -> Objective:
        """Load frozen parts (none here): kept out of the optimizer, the EMA and training checkpoints."""
        return self
