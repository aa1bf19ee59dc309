"""The aligner contract (docs/architecture.md, "Aligner"): every hook the training step calls, and what it hands
an aligner.

The step (gen.step.Trainee) runs one student forward with the union of all aligners' taps, then adds
`aligner.weight(step) * aligner(feats, batch)["loss"]` to the per-sample denoising loss for every aligner,
and puts the aligners' parameters (projectors, heads) in the optimizer. Frozen encoders and teachers are
not parameters of an aligner, so they never reach the optimizer or a checkpoint. An aligner with a warmup phase
(ERW) declares it here too: its length, its loss, what it trains, its cost, and what happens when it ends.
The concrete aligners live in the align package (align.ALIGNERS).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from gen.cond import Cond


@dataclass
class AlignBatch:
    """Everything an aligner may read about the current micro-batch besides the student's tapped features."""

    x0: Tensor  # clean model input (latent), (N, *sample_shape)
    x_t: Tensor  # corrupted input the student saw
    t: Tensor  # (N,) time in the objective's units
    noise: Tensor  # the noise that produced x_t
    cond: Cond  # conditions after dropout (the student's, so teachers see the same nulls)
    step: int  # optimizer steps done so far
    pixels: Tensor | None = None  # uint8 (N, 3, H, W) raw images of the same samples, no augmentation
    target_feats: dict[str, Tensor] | None = None  # cached encoder features: encoder name -> (N, T, d)
    teacher: Callable | None = None  # teacher(x, t, cond, layer): tokens of the EMA model (SRA)
    objective: Any = None  # the run's gen.objectives.Objective (its teacher_view)
    uniform: Tensor | None = None  # (N,) U(0, 1) per sample from the trainer's step draws (aligners' own randomness)

    @classmethod
    def from_loss(cls, out, x0: Tensor, step: int, **optional) -> AlignBatch:
        """Build from an objective's `LossOutput` (x_t, t, noise, post-dropout cond) plus the clean input."""
        return cls(x0=x0, x_t=out.x_t, t=out.t, noise=out.noise, cond=out.cond, step=step, **optional)


# A schedule maps (its settings, step) to the weight; the names are what configs type.
SCHEDULES: dict[str, Callable[[WeightSchedule, int], float]] = {
    "constant": lambda s, step: s.coeff,
    # c0 until start_step S, then c0 * 2^(-(k - S) / H), H = half-life in steps: ERW phase 2 (LINs-lab/ERW train.py,
    # S = the warmup steps) and SRA's smooth-L1 schedule (vvvvvjdy/SRA train.py, by epoch: x0.1 per 1000 epochs).
    "halving": lambda s, step: s.coeff * 2.0 ** (-max(step - s.start_step, 0) / s.half_life_steps),
}


@dataclass(frozen=True)
class WeightSchedule:
    """Per-step weight of an auxiliary loss: a SCHEDULES entry, switched off from `stop_step` on."""

    coeff: float = 0.5
    kind: str = "constant"
    # Weight 0 for step >= stop_step (HASTE-style early stop: the HASTE paper switches REPA off during training).
    stop_step: int | None = None
    start_step: int = 0  # "halving": the step from which the weight decays (`coeff` until then)
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

    KEY: ClassVar[str]
    """Registry key in align.ALIGNERS (what align.methods lists) and the config section align.<KEY>."""
    Config: ClassVar[type]
    """The aligner's config dataclass (a gen.config.ComponentConfig; its `validate` checks align.<KEY>)."""
    EXCLUDES: ClassVar[tuple[str, ...]] = ()
    """Aligners it cannot train together with (refused at config load)."""

    taps: tuple[int, ...]  # student blocks it reads (1-based: output after k blocks)
    warmup_steps: int = 0  # steps of an own warmup phase before the joint training (ERW), see `warmup_loss`

    def __init__(self, schedule: WeightSchedule):
        super().__init__()
        self.schedule = schedule

    def weight(self, step: int) -> float:
        """The loss weight at optimizer step `step`; 0 means the trainer may skip this aligner."""
        return self.schedule(step)

    @property
    def stop_step(self) -> int | None:
        """From this step on the aligner is switched off for good (the trainer stops computing it)."""
        return self.schedule.stop_step

    @property
    def needs_pixels(self) -> bool:
        """Whether it reads `batch.pixels` (raw images) every step, e.g. to run an encoder on them."""
        return False

    def target_encoders(self) -> tuple[str, ...]:
        """Encoders (align.encoders.ENCODERS keys) whose features it aligns to, cached or computed online."""
        return ()

    @abstractmethod
    def forward(self, feats: dict[int, Tensor], batch: AlignBatch) -> dict[str, Tensor]:
        """`"loss"`: (N,) per-sample loss (unweighted); other entries: detached scalar logs."""

    def warmup_loss(self, model: nn.Module, batch: AlignBatch) -> dict[str, Tensor]:
        """Aligners with `warmup_steps > 0`: the whole per-sample loss of a warmup step (only it trains then);
        `batch` holds the clean input as x0 and x_t, t = 0 and the post-dropout conditions."""
        raise NotImplementedError(f"{type(self).__name__} has no warmup phase")

    def warm_parameters(self, model: nn.Module) -> tuple[str, ...]:
        """Aligners with a warmup: name prefixes of the backbone parameters the warmup trains."""
        raise NotImplementedError(f"{type(self).__name__} has no warmup phase")

    def warmup_cost(self, model: nn.Module) -> float:
        """Aligners with a warmup: the cost of a warmup step in full training steps (compute accounting)."""
        return 1.0

    def end_warmup(self, generator) -> None:
        """Aligners with a warmup: called once when the joint training begins (e.g. to re-draw heads)."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg, model: nn.Module, objective, *, cached_targets: Collection[str] = ()) -> Aligner:
        """Build from the run config (cfg.align.<KEY>) for the student `model` trained with `objective`; encoders
        whose features are in `cached_targets` are not built."""
