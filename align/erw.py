"""ERW (Liu et al. 2025, arXiv 2504.10188; LINs-lab/ERW train.py, loss.py): warm the first blocks up on encoder
features, then REPA with a decaying weight.

Phase 1 (steps 0..W-1, `warmup_loss`): only the embedders, blocks 1..K and the projector train. The student sees
the clean latent x0 with the time embedding of t = 0 and its post-dropout label, stops after block K (no final
layer), and the projector maps its tokens to the encoders' patch tokens: per-token negative cosine averaged over
tokens and samples, weight `warmup_coeff` (0.5). Every other parameter keeps its initial value.

Transition (the trainer, at step W): the whole model becomes trainable, the optimizer is rebuilt from scratch and
the EMA is re-initialised to the online weights (the reference loads the warm model's raw weights into both).
Because phase 1 trains the full model's own first blocks, the "non-strict load" of the reference is the identity:
warmed parameters are the phase-1 weights and the rest are exactly the fresh initialisation.

Phase 2 (steps W..): REPA at block `depth` with lambda(k) = c0 * 2^(-(k - W) / H), k the global step; the
phase-1 projector is reused (reference) or re-drawn (`reuse_projector=False`).

Deviation, on purpose: the reference warms the blocks without RoPE and runs them with RoPE in phase 2 (ERW train.py
init_model);
here both phases run the configured backbone (`model.dit.rope`), so the warmed blocks see the attention they keep.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.encoders import FrozenEncoder
from align.repa import DEFAULT_DEPTH, REPA, build_targets, check_encoders, check_layer, init_projector, size_default
from gen.aligner import AlignBatch, WeightSchedule
from gen.config import ComponentConfig, check
from gen.validation import in_range

# c0, the REPA weight at the transition, per size (LINs-lab/ERW train.py: XL 6, L 3, otherwise 1).
DEFAULT_COEFF: dict[str, float] = {"S": 1.0, "B": 1.0, "L": 3.0, "XL": 6.0}
# Phase-2 REPA depth: 14 for XL (ERW README), REPA's size default otherwise.
DEFAULT_ERW_DEPTH: dict[str, int] = {**DEFAULT_DEPTH, "XL": 14}


def nt_xent(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Per-sample token InfoNCE with in-batch negatives, (N,), fp32 (the paper names NT-Xent but never defines it).

    At each token position i, sample n's projected token must pick its own target among the batch's targets at i:
    -log softmax_m(cos(pred_n,i, target_m,i) / temperature)[n], averaged over tokens. The negatives are the
    process's micro-batch, so unlike the cosine loss its value depends on the per-process batch size.
    """
    n, t, _ = pred.shape
    p = F.normalize(pred.float(), dim=-1).transpose(0, 1)  # (T, N, d)
    z = F.normalize(target.float(), dim=-1).transpose(0, 1)  # (T, N, d)
    logits = p @ z.transpose(1, 2) / temperature  # (T, N, N): row n scores sample n's token against every target
    own = torch.arange(n, device=pred.device).repeat(t)  # (T*N,) the matching target of each row
    return F.cross_entropy(logits.reshape(t * n, n), own, reduction="none").view(t, n).mean(dim=0)


# Keys are what `align.erw.warmup_loss` takes; the reference code uses the cosine.
WARMUP_LOSSES = ("cosine", "nt_xent")


@dataclass
class ERWConfig(ComponentConfig):
    """ERW: warm the embedders and first blocks up on encoder features, then REPA with a halving weight."""

    encoders: List[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    """Target encoders (align.encoders.ENCODERS keys) of both phases, one projector each, losses averaged."""
    projector_dim: int = 2048
    """Hidden width of the projector MLP D -> dim -> dim -> encoder width."""
    warmup_steps: int = 100_000
    """Phase 1: steps training only the embedders, blocks 1..warm_depth and the projector on clean latents at t=0
    (part of train.max_steps: the paper's XL run is 100K warmup + 200K full = 300K)."""
    warm_depth: int = 4
    """Phase 1: blocks warmed; the projector reads block K (reference code default 4, paper's best 5)."""
    warmup_coeff: float = 0.5
    """Phase 1: weight of the warmup loss (to the encoders' patch tokens)."""
    warmup_loss: str = "cosine"
    """Phase 1: cosine (per-token negative cosine, the reference code) or nt_xent (token InfoNCE, in-batch
    negatives; the paper names it without a definition)."""
    temperature: float = 0.1
    """Phase 1, nt_xent: softmax temperature (not given by the paper: a guess to tune)."""
    depth: Optional[int] = None
    """Phase 2: block REPA aligns (1-based); null: SiT/DiT-XL 14 (ERW README), other sizes REPA's default."""
    coeff: Optional[float] = None
    """Phase 2: REPA weight c0 at the transition, lambda(k) = c0 * 2^(-(k - W) / H); null: XL 6, L 3, S/B 1."""
    half_life_steps: float = 50_000
    """Phase 2: H, the steps over which the REPA weight halves (reference 50K)."""
    reuse_projector: bool = True
    """Transition: phase 2 keeps the phase-1 projector (reference; it was trained on block K); false re-draws it."""

    def validate(self, cfg) -> None:
        """Both phases' keys (ERW paper, method section; LINs-lab/ERW train.py)."""
        check_encoders(self.encoders, self.projector_dim, "erw")
        check_layer(cfg, "align.erw.depth", self.depth, DEFAULT_ERW_DEPTH)
        check_layer(cfg, "align.erw.warm_depth", self.warm_depth, {})
        check(0 <= self.warmup_steps <= cfg.train.max_steps, "align.erw.warmup_steps",
              f"{self.warmup_steps} must lie in 0..train.max_steps ({cfg.train.max_steps}): the warmup steps are "
              f"part of train.max_steps")
        coeff = self.coeff if self.coeff is not None else size_default(DEFAULT_COEFF, cfg.model.name, "align.erw.coeff")
        in_range("align.erw.coeff", coeff, 0.0)
        in_range("align.erw.warmup_coeff", self.warmup_coeff, 0.0, above=True)
        in_range("align.erw.half_life_steps", self.half_life_steps, 0.0, above=True)
        check(self.warmup_loss in WARMUP_LOSSES, "align.erw.warmup_loss", f"one of {WARMUP_LOSSES}")
        in_range("align.erw.temperature", self.temperature, 0.0, above=True)


class ERW(REPA):
    """REPA whose projectors first warm up blocks 1..warm_depth alone (phase 1), then align block `depth`."""

    KEY = "erw"
    Config = ERWConfig
    EXCLUDES = ("repa",)  # ERW trains REPA itself (with a decaying weight) after its warmup

    def __init__(self, hidden_size: int, target_dims: Mapping[str, int], depth: int, *, warm_depth: int,
                 warmup_steps: int, warmup_coeff: float = 0.5, reuse_projector: bool = True,
                 warmup_loss: str = "cosine", temperature: float = 0.1, projector_dim: int = 2048,
                 schedule: WeightSchedule | None = None, encoders: Mapping[str, FrozenEncoder] | None = None):
        schedule = schedule or WeightSchedule(1.0, "halving", start_step=warmup_steps, half_life_steps=50_000)
        super().__init__(hidden_size, target_dims, depth, projector_dim=projector_dim, schedule=schedule,
                         encoders=encoders)
        if warm_depth < 1 or warmup_steps < 0:
            raise ValueError(f"ERW needs warm_depth >= 1 and warmup_steps >= 0, got {warm_depth}, {warmup_steps}")
        self.warm_depth, self.warmup_steps = warm_depth, warmup_steps
        if warmup_loss not in WARMUP_LOSSES:
            raise ValueError(f"unknown ERW warmup loss {warmup_loss!r}; one of {WARMUP_LOSSES}")
        self.warmup_coeff, self.reuse_projector = warmup_coeff, reuse_projector
        self.warmup_loss_name, self.temperature = warmup_loss, temperature

    def warm_parameters(self, model: nn.Module) -> tuple[str, ...]:
        """Backbone parameters phase 1 trains: what the tokens after block K depend on (embedders, blocks 1..K)."""
        return model.warm_parameters(self.warm_depth)

    def warmup_loss(self, model: nn.Module, batch: AlignBatch) -> dict[str, Tensor]:
        """Phase 1, per sample: warmup_coeff * -(1/T) sum_i cos(P(h_K(x0, t=0, y))_i, z_i) (ERW loss.py forward_warmup),
        or NT-Xent."""
        k = self.warm_depth
        h = model(batch.x0, batch.t, batch.cond, taps=(k,), stop_at=k).feats[k]  # (N, T, D), t = 0: the clean input
        if self.warmup_loss_name == "nt_xent":
            result = self.align_tokens(h, batch, lambda p, z: nt_xent(p, z, self.temperature))
        else:
            result = self.align_tokens(h, batch)
        return {**result, "loss": self.warmup_coeff * result["loss"]}

    def end_warmup(self, generator: torch.Generator) -> None:
        """At the transition: keep the warm projector (reference) or re-draw it (xavier weights, zero biases)."""
        if not self.reuse_projector:
            for projector in self.projectors:
                init_projector(projector, generator)

    @torch.no_grad()
    def warmup_cost(self, model: nn.Module) -> float:
        """FLOPs of a warmup step / FLOPs of a full step, for one sample ("full-step equivalents", as the ERW
        paper's per-step GFLOPs of warmup vs full training).

        A step costs 3 forwards (forward + backward) of what it trains plus one forward of each online encoder;
        the warmup runs blocks 1..K and the projector, the full step the whole backbone and the projector.
        Other aligners' costs (e.g. SRA's teacher) are not counted.
        """
        from torch.utils.flop_counter import FlopCounterMode

        p = next(model.parameters())
        x = torch.zeros(1, *model.sample_shape, device=p.device, dtype=p.dtype)
        t, y = torch.zeros(1, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device)

        def flops(fn) -> int:
            with FlopCounterMode(display=False) as counter:
                fn()
            return counter.get_total_flops()

        def student(depth: int, stop_at: int | None) -> None:
            h = model(x, t, y, taps=(depth,), stop_at=stop_at).feats[depth]
            for projector in self.projectors:
                projector(h)

        encoders = sum(flops(lambda e=e: e.to(p.device)(torch.zeros(1, 3, *e.image_size, dtype=torch.uint8,
                                                                      device=p.device)))
                       for e in self.encoders.values())
        warm = 3 * flops(lambda: student(self.warm_depth, self.warm_depth)) + encoders
        full = 3 * flops(lambda: student(self.depth, None)) + encoders
        return warm / full

    @classmethod
    def from_config(cls, cfg, model: nn.Module, objective, *, cached_targets: Collection[str] = ()) -> ERW:
        """Build from cfg.align.erw for the student `model`."""
        a = cfg.align.erw
        depth = check_layer(cfg, "align.erw.depth", a.depth, DEFAULT_ERW_DEPTH)
        encoders, dims = build_targets(cfg, a.encoders, model, cached_targets, who="ERW")
        coeff = a.coeff if a.coeff is not None else size_default(DEFAULT_COEFF, cfg.model.name, "align.erw.coeff")
        schedule = WeightSchedule(coeff, "halving", start_step=a.warmup_steps, half_life_steps=a.half_life_steps)
        return cls(model.token_width(depth), dims, depth, warm_depth=a.warm_depth, warmup_steps=a.warmup_steps,
                   warmup_coeff=a.warmup_coeff, reuse_projector=a.reuse_projector, warmup_loss=a.warmup_loss,
                   temperature=a.temperature, projector_dim=a.projector_dim, schedule=schedule, encoders=encoders)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, warm_depth={self.warm_depth}, warmup_steps={self.warmup_steps}"
