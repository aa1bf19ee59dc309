"""ERW (Liu et al. 2025, spec section 3): warm the first blocks up on encoder features, then REPA, decaying weight.

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

Deviation, on purpose: the reference warms the blocks without RoPE and runs them with RoPE in phase 2 (spec 3.2);
here both phases run the configured backbone (`model.rope`), so the warmed blocks see the attention they keep.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.base import AlignBatch, WeightSchedule
from align.encoders import FrozenEncoder
from align.repa import (
    MODEL_SIZES,
    REPA,
    build_targets,
    check_encoders,
    check_layer,
    config_blocks,
    default_depth,
    init_projector,
)
from gen.config import check

# c0, the REPA weight at the transition, per size (reference code: XL 6, L 3, otherwise 1).
DEFAULT_COEFF: dict[str, float] = {"S": 1.0, "B": 1.0, "L": 3.0, "XL": 6.0}


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


# Keys are what `align.erw_warmup_loss` takes; the reference code uses the cosine.
WARMUP_LOSSES = ("cosine", "nt_xent")


def default_erw_depth(model_name: str) -> int:
    """Phase-2 REPA depth: 14 for XL (ERW README), REPA's size default otherwise (spec 3.3)."""
    return 14 if MODEL_SIZES.get(model_name) == "XL" else default_depth(model_name)


def default_coeff(model_name: str) -> float:
    """c0 for a registered backbone (spec 3.3); the paper's own ablation favours 0.5, so it is a config key."""
    if model_name not in MODEL_SIZES:
        raise KeyError(f"no default ERW weight for model {model_name!r}: set align.erw_coeff")
    return DEFAULT_COEFF[MODEL_SIZES[model_name]]


class ERW(REPA):
    """REPA whose projectors first warm up blocks 1..warm_depth alone (phase 1), then align block `depth`."""

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

    def warm_parameters(self) -> tuple[str, ...]:
        """Backbone parameters phase 1 trains: the x/t/y embedders and blocks 1..K (pos_embed is frozen anyway)."""
        return ("x_embedder.", "t_embedder.", "y_embedder.", *(f"blocks.{i}." for i in range(self.warm_depth)))

    def warmup_loss(self, model: nn.Module, batch: AlignBatch) -> dict[str, Tensor]:
        """Phase 1, per sample: warmup_coeff * -(1/T) sum_i cos(P(h_K(x0, t=0, y))_i, z_i) (spec 3.1), or NT-Xent."""
        k = self.warm_depth
        h = model(batch.x0, batch.t, batch.y, taps=(k,), stop_at=k).feats[k]  # (N, T, D), t = 0: the clean input
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
    def warmup_cost_ratio(self, model: nn.Module, image_size: int) -> float:
        """FLOPs of a warmup step / FLOPs of a full step, for one sample (spec 3.6, "full-step equivalents").

        A step costs 3 forwards (forward + backward) of what it trains plus one forward of each online encoder;
        the warmup runs blocks 1..K and the projector, the full step the whole backbone and the projector.
        Other aligners' costs (e.g. SRA's teacher) are not counted.
        """
        from torch.utils.flop_counter import FlopCounterMode

        p = next(model.parameters())
        x = torch.zeros(1, model.in_channels, *model.input_size, device=p.device, dtype=p.dtype)
        t, y = torch.zeros(1, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device)

        def flops(fn) -> int:
            with FlopCounterMode(display=False) as counter:
                fn()
            return counter.get_total_flops()

        def student(depth: int, stop_at: int | None) -> None:
            h = model(x, t, y, taps=(depth,), stop_at=stop_at).feats[depth]
            for projector in self.projectors:
                projector(h)

        pixels = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=p.device)
        encoders = sum(flops(lambda e=e: e.to(p.device)(pixels)) for e in self.encoders.values())
        warm = 3 * flops(lambda: student(self.warm_depth, self.warm_depth)) + encoders
        full = 3 * flops(lambda: student(self.depth, None)) + encoders
        return warm / full

    @classmethod
    def validate_config(cls, cfg) -> None:
        """The erw_* keys (spec section 3) and the encoders they share with REPA."""
        a = cfg.align
        check_encoders(cfg)
        check_layer(cfg, "erw_depth", a.erw_depth, default_erw_depth)
        blocks = config_blocks(cfg)
        check(a.erw_warm_depth >= 1 and (blocks is None or a.erw_warm_depth <= blocks), "align.erw_warm_depth",
              f"{a.erw_warm_depth} must lie in 1..{blocks} (the model's blocks)")
        check(0 <= a.erw_warmup_steps <= cfg.train.max_steps, "align.erw_warmup_steps",
              f"{a.erw_warmup_steps} must lie in 0..train.max_steps ({cfg.train.max_steps}): the warmup steps are "
              f"part of train.max_steps")
        check(a.erw_coeff is not None or cfg.model.name in MODEL_SIZES, "align.erw_coeff",
              f"no default for model {cfg.model.name!r}: set it")
        check(a.erw_coeff is None or a.erw_coeff >= 0, "align.erw_coeff", "must be >= 0")
        check(a.erw_warmup_coeff > 0, "align.erw_warmup_coeff", "must be positive")
        check(a.erw_half_life_steps > 0, "align.erw_half_life_steps", "must be positive")
        check(a.erw_warmup_loss in WARMUP_LOSSES, "align.erw_warmup_loss", f"one of {WARMUP_LOSSES}")
        check(a.erw_temperature > 0, "align.erw_temperature", "must be positive")

    @classmethod
    def from_config(cls, cfg, model: nn.Module, *, cached_targets: Collection[str] = ()) -> ERW:
        """Build from `cfg.align` (erw_* keys; encoders and projector width from repa_*) for the student `model`."""
        a = cfg.align
        depth = a.erw_depth if a.erw_depth is not None else default_erw_depth(cfg.model.name)
        if max(depth, a.erw_warm_depth) > model.depth:
            raise ValueError(f"config keys 'align.erw_depth' / 'align.erw_warm_depth': {depth} / {a.erw_warm_depth} "
                             f"exceed the model's {model.depth} blocks")
        encoders, dims = build_targets(cfg, model, cached_targets)
        coeff = a.erw_coeff if a.erw_coeff is not None else default_coeff(cfg.model.name)
        schedule = WeightSchedule(coeff, "halving", start_step=a.erw_warmup_steps,
                                  half_life_steps=a.erw_half_life_steps)
        return cls(model.hidden_size, dims, depth, warm_depth=a.erw_warm_depth, warmup_steps=a.erw_warmup_steps,
                   warmup_coeff=a.erw_warmup_coeff, reuse_projector=a.erw_reuse_projector,
                   warmup_loss=a.erw_warmup_loss, temperature=a.erw_temperature,
                   projector_dim=a.repa_projector_dim, schedule=schedule, encoders=encoders)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, warm_depth={self.warm_depth}, warmup_steps={self.warmup_steps}"
