"""The aligner interface of DESIGN.md 3.4: what the trainer hands an aligner, and what it gets back.

The trainer runs one student forward with the union of all aligners' taps, then adds
`aligner.weight(step) * aligner(feats, batch)["loss"]` to the per-sample denoising loss for every aligner,
and puts the aligners' parameters (projectors, heads) in the optimizer. Frozen encoders and teachers are
not parameters of an aligner, so they never reach the optimizer or a checkpoint.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class AlignBatch:
    """Everything an aligner may read about the current micro-batch besides the student's tapped features."""

    x0: Tensor  # clean model input (latent), (N, C, H, W)
    x_t: Tensor  # noised input the student saw
    t: Tensor  # (N,) time in the objective's units
    noise: Tensor  # the noise that produced x_t
    y: Tensor  # (N,) labels after dropout (the student's, so teachers see the same nulls)
    step: int  # optimizer steps done so far
    pixels: Tensor | None = None  # uint8 (N, 3, H, W) raw images of the same samples, no augmentation
    target_feats: dict[str, Tensor] | None = None  # cached encoder features: encoder name -> (N, T, d)
    teacher: Callable | None = None  # feats of the EMA model at given inputs (SRA)
    uniform: Tensor | None = None  # (N,) U(0, 1) per sample from the trainer's step draws (aligners' own randomness)

    @classmethod
    def from_loss(cls, out, x0: Tensor, step: int, **optional) -> AlignBatch:
        """Build from an objective's `LossOutput` (x_t, t, noise, post-dropout y) plus the clean input."""
        return cls(x0=x0, x_t=out.x_t, t=out.t, noise=out.noise, y=out.y, step=step, **optional)


# A schedule maps (its settings, step) to the weight; the names are what configs type.
SCHEDULES: dict[str, Callable[[WeightSchedule, int], float]] = {
    "constant": lambda s, step: s.coeff,
    # ERW phase 2 (spec 3.3): lambda(k) = c0 * 2^(-(k - W) / H), W = warmup steps, H = half-life in steps.
    "halving": lambda s, step: s.coeff * 2.0 ** (-(step - s.start_step) / s.half_life_steps),
}


@dataclass(frozen=True)
class WeightSchedule:
    """Per-step weight of an auxiliary loss: a SCHEDULES entry, switched off from `stop_step` on."""

    coeff: float = 0.5
    kind: str = "constant"
    stop_step: int | None = None  # weight 0 for step >= stop_step (HASTE-style early stop, spec 1.4)
    start_step: int = 0  # "halving": the step at which the weight is `coeff`
    half_life_steps: float | None = None  # "halving": steps over which the weight halves

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown weight schedule {self.kind!r}; one of {sorted(SCHEDULES)}")
        if self.kind == "halving" and not (self.half_life_steps and self.half_life_steps > 0):
            raise ValueError("the 'halving' schedule needs a positive half_life_steps")
        if self.stop_step is not None and self.stop_step < 0:
            raise ValueError(f"stop_step must be >= 0, got {self.stop_step}")

    def __call__(self, step: int) -> float:
        """The weight at optimizer step `step` (0-based: the step being computed)."""
        if self.stop_step is not None and step >= self.stop_step:
            return 0.0
        return float(SCHEDULES[self.kind](self, step))


class Aligner(nn.Module, ABC):
    """An auxiliary loss on the student's tapped token features (REPA, SRA, ERW)."""

    taps: tuple[int, ...]  # student blocks it reads (1-based: output after k blocks)
    warmup_steps: int = 0  # steps of an own warmup phase before the joint training (ERW), see `warmup_loss`

    def __init__(self, schedule: WeightSchedule):
        super().__init__()
        self.schedule = schedule

    def weight(self, step: int) -> float:
        """The loss weight at optimizer step `step`; 0 means the trainer may skip this aligner."""
        return self.schedule(step)

    @abstractmethod
    def forward(self, feats: dict[int, Tensor], batch: AlignBatch) -> dict[str, Tensor]:
        """`"loss"`: (N,) per-sample loss (unweighted); other entries: detached scalar logs."""

    def warmup_loss(self, model: nn.Module, batch: AlignBatch) -> dict[str, Tensor]:
        """Aligners with `warmup_steps > 0`: the whole per-sample loss of a warmup step (only it trains then);
        `batch` holds the clean input as x0 and x_t, t = 0 and the post-dropout labels."""
        raise NotImplementedError(f"{type(self).__name__} has no warmup phase")

    def warm_parameters(self) -> tuple[str, ...]:
        """Aligners with a warmup: name prefixes of the backbone parameters the warmup trains."""
        raise NotImplementedError(f"{type(self).__name__} has no warmup phase")

    def end_warmup(self, generator) -> None:
        """Aligners with a warmup: called once when the joint training begins (e.g. to re-draw heads)."""

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Check this method's `align.*` keys against the run config; raise gen.config.ConfigError."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg, model: nn.Module, *, cached_targets: Collection[str] = ()) -> Aligner:
        """Build from the run config and the student; encoders whose features are in `cached_targets` are not built."""
