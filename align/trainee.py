"""The module a training step differentiates: the backbone plus its aligners, one forward for the whole loss.

Wrapping both in one module lets one DDP wrapper synchronise the backbone's and the projectors' gradients
and lets Accelerate's autocast cover the student forward and the alignment losses alike. The student runs
once, with the union of every computed aligner's taps (DESIGN.md 3.4).

What a step trains follows the step: during an aligner's warmup phase (ERW) only that aligner and the backbone
parts it names, afterwards everything; aligners past their stop step are no longer computed. `set_phase` flips
requires_grad accordingly and the trainer re-wraps the module with Accelerate when that changes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from align.base import AlignBatch, Aligner
from gen.objectives.base import drop_labels


class Trainee(nn.Module):
    """Backbone + aligners: `forward` returns the per-sample total loss and detached per-term logs."""

    def __init__(self, model: nn.Module, objective, aligners: dict[str, Aligner] | None = None,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: it owns no parameters
        self.aligners = nn.ModuleDict(aligners or {})
        # The trainer's EMA model (SRA teacher), held in a list so it is no submodule: it stays out of
        # state_dict(), parameters(), .to() and the DDP wrapper; the EMA update keeps owning it.
        self._teacher: list[nn.Module] = [] if teacher is None else [teacher]
        warm = [name for name, a in self.aligners.items() if a.warmup_steps > 0]
        if len(warm) > 1:
            raise ValueError(f"aligners {warm} each want a warmup phase; at most one can have one")
        self.warm = warm[0] if warm else None  # the aligner owning the warmup phase (ERW), by name
        self._trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        self.set_phase("full")

    def phase_at(self, step: int) -> str:
        """"warmup" while the warm aligner's warmup lasts (steps 0..W-1), then "full"."""
        if self.warm is not None and step < self.aligners[self.warm].warmup_steps:
            return "warmup"
        return "full"

    def active_at(self, step: int) -> tuple[str, ...]:
        """The aligners computed at `step`: the warm one during its warmup, else those not switched off for good."""
        if self.phase_at(step) == "warmup":
            return (self.warm,)
        return tuple(name for name, a in self.aligners.items()
                     if a.schedule.stop_step is None or step < a.schedule.stop_step)

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """What `phase` trains (the optimizer's parameters): everything trainable, or, in the warmup, the warm
        aligner and the backbone parts it names. Switched-off aligners stay in, so the optimizer of a phase is
        the same whenever it is built (a resumed run loads its state)."""
        if phase not in ("warmup", "full"):
            raise ValueError(f"unknown phase {phase!r}")
        if phase == "warmup" and self.warm is None:
            raise ValueError("no aligner has a warmup phase")
        keep = ()
        if phase == "warmup":
            keep = (f"aligners.{self.warm}.", *(f"model.{p}" for p in self.aligners[self.warm].warm_parameters()))
        return [p for name, p in self.named_parameters()
                if name in self._trainable and (phase == "full" or name.startswith(keep))]

    def set_phase(self, phase: str, active: tuple[str, ...] | None = None) -> None:
        """Train what `phase` trains, computing only the `active` aligners (default: all the phase runs).

        Every other parameter gets requires_grad=False, so no DDP wrapper built afterwards expects a gradient
        for it and no optimizer moves it: it keeps its value exactly (its initialisation, during a warmup).
        """
        trained = {id(p) for p in self.phase_parameters(phase)}
        self.active = tuple(active) if active is not None else (
            (self.warm,) if phase == "warmup" else tuple(self.aligners))
        off = tuple(f"aligners.{name}." for name in self.aligners if name not in self.active)
        for name, p in self.named_parameters():
            p.requires_grad_(id(p) in trained and not (off and name.startswith(off)))
        self.phase = phase
        # One student forward reads the union of the computed aligners' taps.
        self.taps = tuple(sorted(set().union(*(self.aligners[a].taps for a in self.active)))) \
            if phase == "full" else ()

    @property
    def teacher(self) -> nn.Module | None:
        """The EMA model aligners read as a teacher, or None."""
        return self._teacher[0] if self._teacher else None

    @torch.no_grad()
    def _teacher_feats(self, x_t: Tensor, t: Tensor, y: Tensor, layer: int) -> Tensor:
        """The teacher's tokens after block `layer` (eval, no grad, ambient autocast, early exit; spec 2.1 step 4)."""
        teacher = self._teacher[0]
        if teacher.training:
            teacher.eval()
        return teacher(x_t, t.float(), y, taps=(layer,), stop_at=layer).feats[layer]

    @property
    def needs_pixels(self) -> bool:
        """Whether an aligner computes its targets from raw images each step."""
        return any(getattr(a, "needs_pixels", False) for a in self.aligners.values())

    def forward(self, x0: Tensor, y: Tensor, step: int, draws: dict[str, Tensor], pixels: Tensor | None = None,
                target_feats: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """loss = denoise + sum_i weight_i(step) * aligner_i (per sample), and the terms for logging."""
        draws = dict(draws)
        uniform = draws.pop("uniform", None)  # the aligners' per-sample randomness, not an objective input
        if self.phase == "warmup":
            return self._warmup_forward(x0, y, step, draws, pixels, target_feats)
        out = self.objective.loss(self.model, x0, y, taps=self.taps, **draws)
        total, logs = out.loss, {"denoise": out.loss.detach(), **out.logs}
        if self.active:
            teacher = self._teacher_feats if self._teacher else None
            batch = AlignBatch.from_loss(out, x0, step, pixels=pixels, target_feats=target_feats, teacher=teacher,
                                         uniform=uniform)
            for name in self.active:  # switched-off aligners are skipped (the trainer re-wraps DDP without them)
                aligner = self.aligners[name]
                result = aligner(out.feats, batch)
                total = total + aligner.weight(step) * result["loss"]
                logs[name] = result["loss"].detach()
                logs.update({f"{name}/{k}": v.detach().reshape(-1) for k, v in result.items() if k != "loss"})
        return total, logs

    def _warmup_forward(self, x0: Tensor, y: Tensor, step: int, draws: dict[str, Tensor], pixels: Tensor | None,
                        target_feats: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """A warmup step: the warm aligner's loss alone, on the clean input with the step's label dropout."""
        y = drop_labels(y, self.objective.label_dropout, self.objective.null_class, draws.get("drop"))
        zeros = torch.zeros(x0.shape[0], device=x0.device)
        batch = AlignBatch(x0=x0, x_t=x0, t=zeros, noise=torch.zeros_like(x0), y=y, step=step, pixels=pixels,
                           target_feats=target_feats)
        result = self.aligners[self.warm].warmup_loss(self.model, batch)
        logs = {f"{self.warm}/warmup/{k}": v.detach().reshape(-1) for k, v in result.items() if k != "loss"}
        return result["loss"], {f"{self.warm}/warmup": result["loss"].detach(), **logs}


def build_aligners(cfg, model: nn.Module, cached_targets=()) -> dict[str, Aligner]:
    """The aligners `cfg.align.methods` names, for the student `model`."""
    from align import ALIGNERS

    return {name: ALIGNERS[name].from_config(cfg, model, cached_targets=cached_targets) for name in cfg.align.methods}
