"""One training step: its random draws (`StepDraws`), its inputs (`model_inputs`) and the module it differentiates
(`Trainee`: the backbone plus its aligners, one forward for the whole loss).

Wrapping both in one module lets one DDP wrapper synchronise the backbone's and the projectors' gradients
and lets Accelerate's autocast cover the student forward and the alignment losses alike. The student runs
once, with the union of every computed aligner's taps (DESIGN.md 3.4).

What a step trains follows the step: during an aligner's warmup phase (ERW) only that aligner and the backbone
parts it names, afterwards everything; aligners past their stop step are no longer computed. `set_phase` flips
requires_grad accordingly and the trainer re-wraps the module with Accelerate when that changes.

Randomness: every random input of an optimizer step (the objective's and the conditioning's draws, the latent
space's posterior noise, flips, the aligners' uniforms) is drawn for the whole global batch from one generator
seeded by (seed, step); each process takes its slice of each micro-step (per-batch draws whole), so a run does not
depend on the number of processes nor on how the global batch is split into accumulation steps. Dropout masks inside
the forward come from per-sample counter-based streams of (seed, step, global sample index) (gen.dropout), with the
same property.
"""
from __future__ import annotations

from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from gen.aligner import AlignBatch, Aligner
from gen.cond import Cond, as_cond
from gen.dropout import sample_streams
from gen.io import to_rgb


@dataclass
class StepDraws:
    """The random inputs of one optimizer step (or of one process's micro-batch, after `micro`)."""

    objective: dict[str, Tensor]  # Objective.draw: time, noise, dropout mask, ...
    latent: dict[str, Tensor]  # LatentSpace.draw: posterior noise, ...
    uniform: Tensor  # (N,) U(0, 1) per sample, the aligners' own randomness (SRA's u)
    flip: Tensor | None = None  # (N,) bool, horizontal flips (data.hflip)
    per_batch: frozenset[str] = frozenset()  # objective/latent draws that hold one value for the whole batch
    dropout_seed: int | None = None  # host int of (seed, step) keying the forward's dropout masks (gen.dropout)
    first: int = 0  # index in the global batch of the first sample here

    @classmethod
    def draw(cls, objective, latent, n: int, seed: int, step: int, hflip: bool, device) -> StepDraws:
        """Every random input of step `step` for a global batch of n, from a generator seeded by (seed, step)."""
        g = torch.Generator(device=device)
        g.manual_seed(seed * 1_000_003 + step)
        drawn = objective.draw(n, latent.shape, g)
        posterior = latent.draw(n, g, device)
        flip = torch.rand(n, generator=g, device=device) < 0.5 if hflip else None
        uniform = torch.rand(n, generator=g, device=device)
        kinds = {**objective.draw_kinds(), **latent.DRAWS}
        return cls(drawn, posterior, uniform, flip, frozenset(k for k, v in kinds.items() if v == "batch"),
                   seed * 1_000_003 + step)

    def micro(self, micro: int, rank: int, world: int, per_process: int) -> StepDraws:
        """This process's part of micro-step `micro`, in gen.data.DistributedBatchSampler's layout of a batch."""
        start = (micro * world + rank) * per_process
        part = slice(start, start + per_process)

        def cut(draws: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v if k in self.per_batch else v[part] for k, v in draws.items()}

        return replace(self, objective=cut(self.objective), latent=cut(self.latent), uniform=self.uniform[part],
                       flip=None if self.flip is None else self.flip[part],
                       first=self.first + start)

    def dropout_streams(self, n: int, device):
        """The context of a forward of these n samples: its dropout masks are functions of (dropout_seed, global
        sample index, call, element) only (gen.dropout.sample_streams), so they do not depend on the batch split
        and repeat on resume. No seed (draws not from `draw`): masks from torch's global generator."""
        return sample_streams(self.dropout_seed, self.first, n, device) if self.dropout_seed is not None \
            else nullcontext()


def model_inputs(batch: dict, latent, conditioning, draws: StepDraws,
                 device) -> tuple[Tensor, Cond, Tensor | None]:
    """A micro-batch -> model-space x0 (online encoding of (flipped) images, or a cached raw encoding, then the
    latent's own draws), its conditions, and the same images as uint8 RGB for aligners that read pixels (None from a
    cache)."""
    cond = conditioning.from_batch(batch, device)
    if "raw" in batch:
        return latent.to_model(batch["raw"].to(device, non_blocking=True), **draws.latent), cond, None
    images = batch["image"].to(device, non_blocking=True)
    if draws.flip is not None:
        images = torch.where(draws.flip[:, None, None, None], images.flip(-1), images)
    return latent.to_model(latent.encode_raw(images), **draws.latent), cond, to_rgb(images)


class Trainee(nn.Module):
    """Backbone + aligners: `forward` returns the per-sample total loss and detached per-term logs."""

    def __init__(self, model: nn.Module, objective, aligners: dict[str, Aligner] | None = None,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: its frozen parts stay out of the optimizer, EMA and checkpoints
        self.aligners = nn.ModuleDict(aligners or {})
        # The trainer's EMA model (SRA teacher), held in a list so it is no submodule: it stays out of
        # state_dict(), parameters(), .to() and the DDP wrapper; the EMA update keeps owning it.
        self._teacher: list[nn.Module] = [] if teacher is None else [teacher]
        warm = [name for name, a in self.aligners.items() if a.warmup_steps > 0]
        if len(warm) > 1:
            raise ValueError(f"aligners {warm} each want a warmup phase; at most one can have one")
        self.warm = warm[0] if warm else None  # the aligner owning the warmup phase (ERW), by name
        self._warm_cost: float | None = None
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
        return tuple(name for name, a in self.aligners.items() if a.stop_step is None or step < a.stop_step)

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
            warm = self.aligners[self.warm].warm_parameters(self.model)
            keep = (f"aligners.{self.warm}.", *(f"model.{p}" for p in warm))
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
    def _teacher_feats(self, x_t: Tensor, t: Tensor, cond: Cond, layer: int) -> Tensor:
        """The teacher's tokens after block `layer` (eval, no grad, ambient autocast, early exit; SRA's teacher)."""
        teacher = self._teacher[0]
        if teacher.training:
            teacher.eval()
        return self.objective.call(teacher, x_t, t, cond, taps=(layer,), stop_at=layer).feats[layer]

    @property
    def needs_pixels(self) -> bool:
        """Whether an aligner computes its targets from raw images each step."""
        return any(a.needs_pixels for a in self.aligners.values())

    def missing_targets(self, cached: Collection[str]) -> list[str]:
        """Target encoders the aligners need that are not in `cached` (a latent cache must then hold them)."""
        return sorted({name for a in self.aligners.values() for name in a.target_encoders()} - set(cached))

    def end_warmup(self, generator: torch.Generator) -> None:
        """At the end of the warmup phase: the warm aligner's own transition (e.g. re-drawing its head)."""
        self.aligners[self.warm].end_warmup(generator)

    def warm_cost(self) -> float:
        """The cost of a warmup step in full steps (measured once, by the warm aligner)."""
        if self._warm_cost is None:
            self._warm_cost = self.aligners[self.warm].warmup_cost(self.model)
        return self._warm_cost

    def summary(self) -> str | None:
        """One line on the warmup phase for the run's log, or None without one."""
        if self.warm is None:
            return None
        return (f"{self.warm}: {self.aligners[self.warm].warmup_steps} warmup steps of {self.warm_cost():.3f} full "
                f"steps each")

    def step_logs(self, step: int) -> dict[str, float]:
        """Logged with the losses: `full_step_equivalents` when a warmup phase makes steps cost unequal."""
        if self.warm is None:
            return {}
        warm = self.aligners[self.warm].warmup_steps
        return {"full_step_equivalents": min(step, warm) * self.warm_cost() + max(step - warm, 0)}

    def forward(self, x0: Tensor, cond: Cond, step: int, draws: StepDraws, pixels: Tensor | None = None,
                target_feats: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """loss = denoise + sum_i weight_i(step) * aligner_i (per sample), and the terms for logging."""
        with draws.dropout_streams(x0.shape[0], x0.device):
            if self.phase == "warmup":
                return self._warmup_forward(x0, cond, step, draws, pixels, target_feats)
            return self._forward(x0, cond, step, draws, pixels, target_feats)

    def _forward(self, x0: Tensor, cond: Cond, step: int, draws: StepDraws, pixels: Tensor | None,
                 target_feats: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """A joint step: the objective's loss plus the active aligners'."""
        out = self.objective.loss(self.model, x0, cond, taps=self.taps, step=step, **draws.objective)
        total, logs = out.loss, {"denoise": out.loss.detach(), **out.logs}
        if self.active:
            teacher = self._teacher_feats if self._teacher else None
            batch = AlignBatch.from_loss(out, x0, step, pixels=pixels, target_feats=target_feats, teacher=teacher,
                                         objective=self.objective, uniform=draws.uniform)
            for name in self.active:  # switched-off aligners are skipped (the trainer re-wraps DDP without them)
                aligner = self.aligners[name]
                result = aligner(out.feats, batch)
                total = total + aligner.weight(step) * result["loss"]
                logs[name] = result["loss"].detach()
                logs.update({f"{name}/{k}": v.detach().reshape(-1) for k, v in result.items() if k != "loss"})
        return total, logs

    def _warmup_forward(self, x0: Tensor, cond: Cond, step: int, draws: StepDraws, pixels: Tensor | None,
                        target_feats: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """A warmup step: the warm aligner's loss alone, on the clean input with the step's condition dropout."""
        cond = self.objective.cond.drop(as_cond(cond), draws.objective.get("drop"))
        zeros = torch.zeros(x0.shape[0], device=x0.device)
        batch = AlignBatch(x0=x0, x_t=x0, t=zeros, noise=torch.zeros_like(x0), cond=cond, step=step, pixels=pixels,
                           target_feats=target_feats, objective=self.objective, uniform=draws.uniform)
        result = self.aligners[self.warm].warmup_loss(self.model, batch)
        logs = {f"{self.warm}/warmup/{k}": v.detach().reshape(-1) for k, v in result.items() if k != "loss"}
        return result["loss"], {f"{self.warm}/warmup": result["loss"].detach(), **logs}


def build_aligners(cfg, model: nn.Module, objective, cached_targets=()) -> dict[str, Aligner]:
    """The aligners cfg.align.methods names, for the student `model` trained with `objective`."""
    from gen.config import registry

    aligners = registry("align")
    return {name: aligners[name].from_config(cfg, model, objective, cached_targets=cached_targets)
            for name in cfg.align.methods}
