"""SRA (Jiang et al. 2025, spec section 2): align an early student block to a later block of the EMA teacher.

The student's tokens after block `student_layer` go through a head D -> 2D -> D; the target is the EMA
teacher's raw tokens after block `teacher_layer` on the same x0 and noise at a less noisy time
t_t = clamp(t_s - u t_max, 0, 1), u ~ U(0, 1) per sample, with the student's post-dropout labels (spec 2.1).
The teacher is `batch.teacher`, a callable the Trainee builds around the trainer's EMA model (no_grad, eval,
early exit). The head is training-only: the backbone has none.

Reproducibility of u: it is `batch.uniform`, drawn by the trainer with every other random input of the step
for the whole global batch (gen.factory.step_draws), so a resumed run and a run on any number of processes
see the same offsets. Outside the trainer (no `uniform`), u comes from torch's global generator.
"""
from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.base import AlignBatch, Aligner, WeightSchedule
from align.repa import MODEL_SIZES, check_layer
from gen.config import check
from gen.factory import build_objective

# (student, teacher) block pair per (family, size) (spec 2.2, 1-indexed block outputs). SiT-S is not reported:
# B's pair, same 12 blocks. DiT is reported for XL only (8 -> 16); DiT S/B/L take SiT's pair of their size.
DEFAULT_PAIRS: dict[tuple[str, str], tuple[int, int]] = {
    ("SiT", "S"): (3, 8), ("SiT", "B"): (3, 8), ("SiT", "L"): (6, 16), ("SiT", "XL"): (8, 20),
    ("DiT", "S"): (3, 8), ("DiT", "B"): (3, 8), ("DiT", "L"): (6, 16), ("DiT", "XL"): (8, 16),
}


def default_pair(model_name: str) -> tuple[int, int]:
    """SRA's (student, teacher) layers for a registered backbone (spec 2.2)."""
    if model_name not in MODEL_SIZES:
        raise KeyError(f"no default SRA layers for model {model_name!r}: set align.sra_student_layer and "
                       f"align.sra_teacher_layer")
    return DEFAULT_PAIRS[(model_name.split("-")[0], MODEL_SIZES[model_name])]


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of 1 - cos(pred_i, target_i), cosine over channels (spec 2.3 recommended), fp32, (N,)."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(dim=-1)


def smooth_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Smooth-L1 with beta 0.05, mean over tokens and channels (spec 2.3, the paper's variant), fp32, (N,)."""
    err = F.smooth_l1_loss(pred.float(), target.float(), beta=0.05, reduction="none")
    return err.reshape(err.shape[0], -1).mean(dim=1)


# Keys are what `align.sra_loss` takes. The paper's smooth-L1 step schedule (spec 2.3) is constant through
# 400K steps at batch 256, so both variants use a constant weight here.
SRA_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cosine": cosine_loss, "smooth_l1": smooth_l1_loss}


def _flow_teacher_time(t: Tensor, u: Tensor, t_max: float, objective) -> Tensor:
    """t_t = clamp(t_s - u t_max, 0, 1) on flow time (spec 2.1 step 2)."""
    return (t - u.to(t.dtype) * t_max).clamp(0.0, 1.0)


def _ddpm_teacher_time(t: Tensor, u: Tensor, t_max: float, objective) -> Tensor:
    """t_t = round(t_s - u t_max T) clamped to 0..T-1, integer steps (spec 2.4 with a continuous offset)."""
    steps = objective.num_timesteps
    return torch.round(t.double() - u.double() * t_max * steps).clamp(0, steps - 1).long()


# Objective registry key -> teacher time in that objective's units.
TEACHER_TIMES: dict[str, Callable[[Tensor, Tensor, float, object], Tensor]] = {
    "flow": _flow_teacher_time,
    "ddpm": _ddpm_teacher_time,
}


def build_head(hidden_size: int) -> nn.Sequential:
    """Token-wise MLP D -> 2D -> D with SiLU; xavier-uniform weights, zero bias (spec 2.1)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(), nn.Linear(2 * hidden_size, hidden_size))
    for layer in mlp[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return mlp


class SRA(Aligner):
    """SRA: head(student tokens after `student_layer`) regressed onto the EMA teacher's tokens after `teacher_layer`."""

    def __init__(self, hidden_size: int, student_layer: int, teacher_layer: int, objective, objective_name: str, *,
                 t_max: float = 0.2, loss: str = "cosine", schedule: WeightSchedule | None = None):
        super().__init__(schedule or WeightSchedule(0.5))  # constant 0.5 (spec 2.3, cosine)
        if student_layer < 1 or teacher_layer < 1:
            raise ValueError(f"SRA layers must be >= 1, got {student_layer} -> {teacher_layer}")
        if loss not in SRA_LOSSES:
            raise ValueError(f"unknown SRA loss {loss!r}; one of {sorted(SRA_LOSSES)}")
        if objective_name not in TEACHER_TIMES:
            raise ValueError(f"SRA has no teacher time for objective {objective_name!r}; one of {sorted(TEACHER_TIMES)}")
        if not 0.0 <= t_max <= 1.0:
            raise ValueError(f"SRA t_max must lie in [0, 1], got {t_max}")
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.taps = (student_layer,)
        self.objective = objective  # not a module: noising only (`noised`), no parameters
        self.objective_name, self.t_max, self.loss_name = objective_name, t_max, loss
        self.head = build_head(hidden_size)

    def draw_u(self, batch: AlignBatch) -> Tensor:
        """u ~ U(0, 1) per sample: the trainer's `batch.uniform` (reproducible, see the module doc)."""
        if batch.uniform is not None:
            return batch.uniform.to(batch.t.device)
        return torch.rand(batch.t.shape[0], device=batch.t.device)

    def teacher_time(self, t: Tensor, u: Tensor) -> Tensor:
        """The teacher's (less noisy) time for student times t and offsets u, in the objective's units."""
        return TEACHER_TIMES[self.objective_name](t, u, self.t_max, self.objective)

    def forward(self, feats: dict[int, Tensor], batch: AlignBatch) -> dict[str, Tensor]:
        """Per-sample SRA loss (N,), the mean cosine and the mean time offset (detached)."""
        if batch.teacher is None:
            raise ValueError("SRA needs batch.teacher (the EMA model): build the Trainee with teacher=ema.model")
        h_s = feats[self.student_layer]  # (N, T, D)
        t_t = self.teacher_time(batch.t, self.draw_u(batch))  # (N,)
        x_tt = self.objective.noised(batch.x0, t_t, batch.noise)  # same x0 and noise (spec 2.1 step 4)
        h_t = batch.teacher(x_tt, t_t, batch.y, self.teacher_layer)  # (N, T, D), no grad
        pred = self.head(h_s)  # (N, T, D)
        if pred.shape != h_t.shape:
            raise ValueError(f"SRA head output {tuple(pred.shape)} vs teacher tokens {tuple(h_t.shape)}")
        loss = SRA_LOSSES[self.loss_name](pred, h_t)
        with torch.no_grad():
            cos = F.cosine_similarity(pred.float(), h_t.float(), dim=-1).mean()
            gap = (batch.t.double() - t_t.double()).mean()
        return {"loss": loss, "cos": cos, "t_gap": gap.float()}

    @classmethod
    def validate_config(cls, cfg) -> None:
        """The sra_* keys (spec section 2)."""
        a = cfg.align
        explicit = a.sra_student_layer is not None and a.sra_teacher_layer is not None
        check(explicit or cfg.model.name in MODEL_SIZES, "align.sra_student_layer",
              f"no default SRA layers for model {cfg.model.name!r}: set align.sra_student_layer and "
              f"sra_teacher_layer")
        for key, index in (("sra_student_layer", 0), ("sra_teacher_layer", 1)):
            check_layer(cfg, key, getattr(a, key), lambda name, i=index: default_pair(name)[i])
        check(0.0 <= a.sra_t_max <= 1.0, "align.sra_t_max", "must lie in [0, 1]")
        check(a.sra_loss in SRA_LOSSES, "align.sra_loss", f"one of {sorted(SRA_LOSSES)}, got {a.sra_loss!r}")
        check(a.sra_coeff >= 0, "align.sra_coeff", "must be >= 0")
        check(a.sra_stop_step is None or a.sra_stop_step > 0, "align.sra_stop_step", "null or a positive step")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, *, cached_targets: Collection[str] = ()) -> SRA:
        """Build from `cfg.align` (sra_* keys) for the student `model`; the objective comes from `cfg.objective`."""
        a = cfg.align
        pair = default_pair(cfg.model.name) if None in (a.sra_student_layer, a.sra_teacher_layer) else None
        student = a.sra_student_layer if a.sra_student_layer is not None else pair[0]
        teacher = a.sra_teacher_layer if a.sra_teacher_layer is not None else pair[1]
        for key, layer in (("sra_student_layer", student), ("sra_teacher_layer", teacher)):
            if layer > model.depth:
                raise ValueError(f"config key 'align.{key}': {layer} exceeds the model's {model.depth} blocks")
        schedule = WeightSchedule(a.sra_coeff, stop_step=a.sra_stop_step)
        return cls(model.hidden_size, student, teacher, build_objective(cfg, model), cfg.objective.name,
                   t_max=a.sra_t_max, loss=a.sra_loss, schedule=schedule)

    def extra_repr(self) -> str:
        return f"layers={self.student_layer}->{self.teacher_layer}, t_max={self.t_max}, loss={self.loss_name}"
