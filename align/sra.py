"""SRA (Jiang et al. 2025, arXiv 2505.02831; vvvvvjdy/SRA SiT-SRA/loss.py, train.py): align an early student block
to a later block of the EMA teacher.

The student's tokens after block `student_layer` go through a head D -> 2D -> D; the target is the EMA
teacher's raw tokens after block `teacher_layer` on the same x0 and noise at a less noisy time
t_t = clamp(t_s - u t_max, 0, 1), u ~ U(0, 1) per sample, with the student's post-dropout labels (SRA SiT-SRA/loss.py);
the objective defines the view (`teacher_view`: DDPM's integer steps follow SRA DiT-SRA instead).
The teacher is `batch.teacher`, a callable the Trainee builds around the trainer's EMA model (no_grad, eval,
early exit). The head is training-only: the backbone has none.

Reproducibility of u: it is `batch.uniform`, drawn by the trainer with every other random input of the step
for the whole global batch (gen.step.StepDraws), so a resumed run and a run on any number of processes
see the same offsets. Outside the trainer (no `uniform`), u comes from torch's global generator.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.repa import check_layer
from gen.aligner import AlignBatch, Aligner, WeightSchedule
from gen.config import ComponentConfig, check
from gen.objectives.base import Objective

# (student, teacher) block pair per size (SRA paper, layer ablation; 1-indexed block outputs): SiT S/B 3 -> 8,
# L 6 -> 16, XL 8 -> 20. SiT-S is not reported: B's pair, same 12 blocks. DiT-XL is reported as 8 -> 16; other
# backbones of a size take SiT's pair of that size.
STUDENT_LAYER: dict[str, int] = {"S": 3, "B": 3, "L": 6, "XL": 8}
TEACHER_LAYER: dict[str, int] = {"S": 8, "B": 8, "L": 16, "XL": 20}
DIT_XL_TEACHER_LAYER = 16


def default_pair(cfg) -> tuple[int, int]:
    """SRA's (student, teacher) layers for the configured backbone: align.sra.* or the per-size defaults."""
    a = cfg.align.sra
    teacher_table = dict(TEACHER_LAYER, XL=DIT_XL_TEACHER_LAYER) if cfg.model.name.startswith("DiT-") else TEACHER_LAYER
    return (check_layer(cfg, "align.sra.student_layer", a.student_layer, STUDENT_LAYER),
            check_layer(cfg, "align.sra.teacher_layer", a.teacher_layer, teacher_table))


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of 1 - cos(pred_i, target_i), cosine over channels (recommended in the SRA README note),
    fp32, (N,)."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(dim=-1)


def token_axis_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """The reference code's `--loss-type cos` (SRA SiT-SRA/loss.py, its default): 1 - F.cosine_similarity(pred,
    target) with torch's default dim=1, which on (N, T, D) tokens is the cosine over the token axis, one per
    channel; mean over channels, fp32, (N,). An ablation: the per-token cosine (`cosine`) is what the paper and the
    SRA README describe."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=1).mean(dim=-1)


def smooth_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Smooth-L1 with beta 0.05, mean over tokens and channels (SRA SiT-SRA/loss.py, the paper's variant), fp32,
    (N,)."""
    err = F.smooth_l1_loss(pred.float(), target.float(), beta=0.05, reduction="none")
    return err.reshape(err.shape[0], -1).mean(dim=1)


# Keys are what `align.sra.loss` takes. The reference's smooth-L1 weight (SRA SiT-SRA/train.py and DiT-SRA/train.py,
# by epoch) is constant until epoch 149 and then falls tenfold per 1000 epochs: align.sra.decay_start_step and
# half_life_steps give it by step (configs/dit_xl2_sra.yaml); constant otherwise.
SRA_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cosine": cosine_loss, "smooth_l1": smooth_l1_loss,
                                                              "token_axis_cosine": token_axis_cosine_loss}


def build_head(hidden_size: int) -> nn.Sequential:
    """Token-wise MLP D -> 2D -> D with SiLU; xavier-uniform weights, zero bias (SRA SiT-SRA/models/sit.py
    SimpleHead)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(), nn.Linear(2 * hidden_size, hidden_size))
    for layer in mlp[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return mlp


@dataclass
class SRAConfig(ComponentConfig):
    """SRA: an early student block regressed onto a later block of the EMA teacher at a less corrupted view."""

    student_layer: Optional[int] = None
    """Student block fed to the head (1-based); null: size default SiT S/B 3, L 6, XL 8, DiT-XL 8."""
    teacher_layer: Optional[int] = None
    """EMA-teacher block aligned to (1-based, early exit there); null: SiT S/B 8, L 16, XL 20, DiT-XL 16."""
    t_max: float = 0.2
    """Teacher time t_s - u * t_max (a fraction of the objective's time range), u ~ U(0, 1); paper 0.2. DDPM:
    t_s - randint(0, int(T * t_max)) clamped to [1, T - 1], as SRA DiT-SRA."""
    loss: str = "cosine"
    """Alignment loss: cosine (per-token 1 - cos, recommended), smooth_l1 (beta 0.05, the paper's) or
    token_axis_cosine (ablation: the reference code's default `cos`, a cosine over the token axis per channel)."""
    coeff: float = 0.5
    """Loss weight lambda, constant (cosine 0.5; the paper's smooth-L1 uses 0.2)."""
    stop_step: Optional[int] = None
    """Weight 0 from this optimizer step on; null keeps it on."""
    decay_start_step: Optional[int] = None
    """null: constant weight. Else coeff until this step, then halving every half_life_steps (the reference's
    smooth-L1 schedule by step: epoch 149 at 5004 steps an epoch, tenfold per 1000 epochs)."""
    half_life_steps: Optional[float] = None
    """Steps over which the weight halves after decay_start_step (1000 epochs x log10(2) for the reference's)."""

    def validate(self, cfg) -> None:
        """Layers within the backbone, offset, loss, weight, its decay and stop step."""
        default_pair(cfg)
        check(0.0 <= self.t_max <= 1.0, "align.sra.t_max", "must lie in [0, 1]")
        check(self.loss in SRA_LOSSES, "align.sra.loss", f"one of {sorted(SRA_LOSSES)}, got {self.loss!r}")
        check(self.coeff >= 0, "align.sra.coeff", "must be >= 0")
        check(self.stop_step is None or self.stop_step > 0, "align.sra.stop_step", "null or a positive step")
        decays = self.decay_start_step is not None
        check(decays == (self.half_life_steps is not None), "align.sra.half_life_steps",
              "set both align.sra.decay_start_step and align.sra.half_life_steps, or neither (constant weight)")
        check(not decays or (self.decay_start_step >= 0 and self.half_life_steps > 0), "align.sra.half_life_steps",
              "decay_start_step >= 0 and half_life_steps > 0")


class SRA(Aligner):
    """SRA: head(student tokens after `student_layer`) regressed onto the EMA teacher's tokens after `teacher_layer`."""

    KEY = "sra"
    Config = SRAConfig

    def __init__(self, hidden_size: int, student_layer: int, teacher_layer: int, *,
                 t_max: float = 0.2, loss: str = "cosine", schedule: WeightSchedule | None = None):
        super().__init__(schedule or WeightSchedule(0.5))  # constant 0.5 (SRA SiT-SRA/train.py, cosine)
        if student_layer < 1 or teacher_layer < 1:
            raise ValueError(f"SRA layers must be >= 1, got {student_layer} -> {teacher_layer}")
        if loss not in SRA_LOSSES:
            raise ValueError(f"unknown SRA loss {loss!r}; one of {sorted(SRA_LOSSES)}")
        if not 0.0 <= t_max <= 1.0:
            raise ValueError(f"SRA t_max must lie in [0, 1], got {t_max}")
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.taps = (student_layer,)
        self.t_max, self.loss_name = t_max, loss
        self.head = build_head(hidden_size)

    def draw_u(self, batch: AlignBatch) -> Tensor:
        """u ~ U(0, 1) per sample: the trainer's `batch.uniform` (reproducible, see the module doc)."""
        if batch.uniform is not None:
            return batch.uniform.to(batch.t.device)
        return torch.rand(batch.t.shape[0], device=batch.t.device)

    def forward(self, feats: dict[int, Tensor], batch: AlignBatch) -> dict[str, Tensor]:
        """Per-sample SRA loss (N,), the mean cosine and the mean time offset (detached)."""
        if batch.teacher is None or batch.objective is None:
            raise ValueError("SRA needs batch.teacher (the EMA model) and batch.objective: build the Trainee with "
                             "teacher=ema.model")
        h_s = feats[self.student_layer]  # (N, T, D)
        # The same x0 and noise at a less corrupted time (SRA paper, method section; SiT-SRA/loss.py).
        x_tt, t_t = batch.objective.teacher_view(batch.x0, batch.t, batch.noise, self.draw_u(batch), self.t_max)
        h_t = batch.teacher(x_tt, t_t, batch.cond, self.teacher_layer)  # (N, T, D), no grad
        pred = self.head(h_s)  # (N, T, D)
        if pred.shape != h_t.shape:
            raise ValueError(f"SRA head output {tuple(pred.shape)} vs teacher tokens {tuple(h_t.shape)}")
        loss = SRA_LOSSES[self.loss_name](pred, h_t)
        with torch.no_grad():
            cos = F.cosine_similarity(pred.float(), h_t.float(), dim=-1).mean()
            gap = (batch.t.double() - t_t.double()).mean()
        return {"loss": loss, "cos": cos, "t_gap": gap.float()}

    @classmethod
    def from_config(cls, cfg, model: nn.Module, objective, *, cached_targets: Collection[str] = ()) -> SRA:
        """Build from cfg.align.sra for the student `model` (the teacher view comes from the objective per batch)."""
        a = cfg.align.sra
        student, teacher = default_pair(cfg)
        if type(objective).teacher_view is Objective.teacher_view:
            raise ValueError(f"config key 'align.methods': SRA needs a teacher view, which objective "
                             f"{cfg.objective.name!r} does not define")
        if a.decay_start_step is None:
            schedule = WeightSchedule(a.coeff, stop_step=a.stop_step)
        else:
            schedule = WeightSchedule(a.coeff, "halving", stop_step=a.stop_step, start_step=a.decay_start_step,
                                      half_life_steps=a.half_life_steps)
        return cls(model.token_width(student), student, teacher, t_max=a.t_max, loss=a.loss, schedule=schedule)

    def extra_repr(self) -> str:
        return f"layers={self.student_layer}->{self.teacher_layer}, t_max={self.t_max}, loss={self.loss_name}"
