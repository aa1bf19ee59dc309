"""The module a training step differentiates: the backbone plus its aligners, one forward for the whole loss.

Wrapping both in one module lets one DDP wrapper synchronise the backbone's and the projectors' gradients
and lets Accelerate's autocast cover the student forward and the alignment losses alike. The student runs
once, with the union of every aligner's taps (DESIGN.md 3.4).
"""
from __future__ import annotations

from torch import Tensor, nn

from align.base import AlignBatch, Aligner


class Trainee(nn.Module):
    """Backbone + aligners: `forward` returns the per-sample total loss and detached per-term logs."""

    def __init__(self, model: nn.Module, objective, aligners: dict[str, Aligner] | None = None):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: it owns no parameters
        self.aligners = nn.ModuleDict(aligners or {})
        self.taps = tuple(sorted(set().union(*(a.taps for a in self.aligners.values()))))

    @property
    def needs_pixels(self) -> bool:
        """Whether an aligner computes its targets from raw images each step."""
        return any(getattr(a, "needs_pixels", False) for a in self.aligners.values())

    def forward(self, x0: Tensor, y: Tensor, step: int, draws: dict[str, Tensor], pixels: Tensor | None = None,
                target_feats: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """loss = denoise + sum_i weight_i(step) * aligner_i (per sample), and the terms for logging."""
        out = self.objective.loss(self.model, x0, y, taps=self.taps, **draws)
        total, logs = out.loss, {"denoise": out.loss.detach(), **out.logs}
        if self.aligners:
            batch = AlignBatch.from_loss(out, x0, step, pixels=pixels, target_feats=target_feats)
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
