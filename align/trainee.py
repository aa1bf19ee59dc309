"""The module a training step differentiates: the backbone plus its aligners, one forward for the whole loss.

Wrapping both in one module lets one DDP wrapper synchronise the backbone's and the projectors' gradients
and lets Accelerate's autocast cover the student forward and the alignment losses alike. The student runs
once, with the union of every aligner's taps (DESIGN.md 3.4).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from align.base import AlignBatch, Aligner


class Trainee(nn.Module):
    """Backbone + aligners: `forward` returns the per-sample total loss and detached per-term logs."""

    def __init__(self, model: nn.Module, objective, aligners: dict[str, Aligner] | None = None,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: it owns no parameters
        self.aligners = nn.ModuleDict(aligners or {})
        self.taps = tuple(sorted(set().union(*(a.taps for a in self.aligners.values()))))
        # The trainer's EMA model (SRA teacher), held in a list so it is no submodule: it stays out of
        # state_dict(), parameters(), .to() and the DDP wrapper; the EMA update keeps owning it.
        self._teacher: list[nn.Module] = [] if teacher is None else [teacher]

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
        out = self.objective.loss(self.model, x0, y, taps=self.taps, **draws)
        total, logs = out.loss, {"denoise": out.loss.detach(), **out.logs}
        if self.aligners:
            teacher = self._teacher_feats if self._teacher else None
            batch = AlignBatch.from_loss(out, x0, step, pixels=pixels, target_feats=target_feats, teacher=teacher,
                                         uniform=uniform)
            for name, aligner in self.aligners.items():
                # Computed even at weight 0 so every parameter takes part in each step (DDP without
                # find_unused_parameters); the weight then zeroes its gradient.
                result = aligner(out.feats, batch)
                total = total + aligner.weight(step) * result["loss"]
                logs[name] = result["loss"].detach()
                logs.update({f"{name}/{k}": v.detach().reshape(-1) for k, v in result.items() if k != "loss"})
        return total, logs


def build_aligners(cfg, model: nn.Module, cached_targets=()) -> dict[str, Aligner]:
    """The aligners `cfg.align.methods` names, for the student `model`."""
    from align import ALIGNERS

    return {name: ALIGNERS[name].from_config(cfg, model, cached_targets=cached_targets) for name in cfg.align.methods}
