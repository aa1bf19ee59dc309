"""Masked token modelling on VQ ids (MaskGIT, Chang et al., CVPR 2022, arXiv 2202.04200; MAGE, Li et al., CVPR 2023,
arXiv 2211.09117): mask part of an image's ids, predict the masked ones, and generate by iterative
confidence-based decoding.

Training (MAGE `models_mage.py` forward_encoder / forward_loss; MaskGIT Sec. 3.2):
- a mask ratio r per sample (or one per global batch, as MAGE draws it): `cosine`, r = cos(pi/2 u) with u ~ U(0, 1)
  (MaskGIT's schedule), or `truncnorm`, a normal (mu, std) truncated to [min, max] (MAGE: 0.55, 0.25, [0.5, 1]),
  by its inverse CDF at u;
- n = ceil(L r) (clipped to 1..L) masked positions per row: the n lowest of L uniform scores (exact counts, ties
  broken by position; MAGE redraws scores until no tie changes a count);
- optional token drop (MAGE: the ceil(0.5 L) lowest scores, a subset of the masked ones, leave the encoder;
  gen.models.mage);
- loss: cross-entropy with label smoothing eps over the K codes, (1 - eps) NLL + eps mean_k(-log p_k) (MAGE's
  LabelSmoothingCrossEntropy, eps = 0.1), on masked positions only; per sample the mean over its masked positions
  (MAGE averages over the batch's masked positions: equal when counts are equal, i.e. with per-batch ratios).
Logged: `masked_acc`, the argmax accuracy on masked positions, and `mask_ratio`.

Sampling (`maskgit`, MAGE gen_img_uncond.py `gen_image`): start all-masked; at step s of S, sample every position
from softmax(logits) (no logit temperature), keep revealed ids, then with ratio = (s + 1) / S re-mask the
m = clip(floor(L cos(pi/2 ratio)), 1, unknown - 1) lowest-confidence positions among the unknown ones, confidence
log p(sampled id) + tau (1 - ratio) Gumbel (tau = `choice_temperature`, MAGE 4.5), revealed ids at +inf; the `linear`
schedule uses 1 - ratio. The result is the last step's sampled ids, every position hard. Class-conditional models
guide the logits, l_u + w (l_c - l_u) (w = sampler.cfg_scale), inside cfg_interval of the masked fraction.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gen.cond import Cond, Conditioning, as_cond
from gen.config import ComponentConfig, check
from gen.objectives.base import LossOutput, Objective
from gen.sampling.guidance import with_cfg
from gen.sampling.noise import Generators, rand

MASK_SCHEDULES = ("cosine", "truncnorm")
SAMPLE_SCHEDULES = ("cosine", "linear")


@dataclass
class MaskedTokensConfig(ComponentConfig):
    """Masked token modelling (MaskGIT/MAGE): mask-ratio distribution, token drop, label smoothing, decoding."""

    mask_schedule: str = "cosine"
    """Training mask ratio: cosine (r = cos(pi/2 u), MaskGIT) or truncnorm (MAGE: ratio_mu, ratio_std, ratio_min,
    ratio_max)."""
    per_batch: bool = False
    """One mask ratio per global batch (MAGE) instead of one per sample (MaskGIT)."""
    ratio_min: float = 0.5
    """truncnorm: lower end (MAGE 0.5)."""
    ratio_max: float = 1.0
    """truncnorm: upper end (MAGE 1.0)."""
    ratio_mu: float = 0.55
    """truncnorm: mean of the untruncated normal (MAGE 0.55)."""
    ratio_std: float = 0.25
    """truncnorm: standard deviation of the untruncated normal (MAGE 0.25)."""
    drop_ratio: float = 0.0
    """Fraction of positions (ceil) dropped from the encoder, the lowest-scored masked ones (MAGE 0.5; 0 off)."""
    label_smoothing: float = 0.1
    """Label smoothing eps over the K codes (MAGE 0.1)."""
    choice_temperature: float = 4.5
    """Sampling: Gumbel scale of the re-masking confidence, annealed by (1 - step fraction) (MAGE 4.5)."""
    sample_schedule: str = "cosine"
    """Sampling: fraction kept masked after step s of S, cos(pi/2 (s+1)/S) (MAGE) or linear 1 - (s+1)/S."""

    def validate(self, cfg) -> None:
        """Known schedules, ratios in range, and a token drop that only removes masked positions."""
        check(self.mask_schedule in MASK_SCHEDULES, "objective.masked_tokens.mask_schedule", f"one of {MASK_SCHEDULES}")
        check(self.sample_schedule in SAMPLE_SCHEDULES, "objective.masked_tokens.sample_schedule",
              f"one of {SAMPLE_SCHEDULES}")
        check(0.0 <= self.ratio_min < self.ratio_max <= 1.0, "objective.masked_tokens.ratio_min",
              "needs 0 <= ratio_min < ratio_max <= 1")
        check(self.ratio_std > 0, "objective.masked_tokens.ratio_std", "must be positive")
        check(0.0 <= self.label_smoothing < 1.0, "objective.masked_tokens.label_smoothing", "must lie in [0, 1)")
        check(self.choice_temperature >= 0, "objective.masked_tokens.choice_temperature", "must be >= 0")
        check(0.0 <= self.drop_ratio < 1.0, "objective.masked_tokens.drop_ratio", "must lie in [0, 1)")
        check(self.drop_ratio == 0 or (self.mask_schedule == "truncnorm" and self.drop_ratio <= self.ratio_min),
              "objective.masked_tokens.drop_ratio", "drops masked positions only: needs mask_schedule=truncnorm "
              "and drop_ratio <= ratio_min (MAGE: 0.5 and 0.5)")
        check(cfg.sampler.eta == 0.0, "sampler.eta", "the maskgit sampler takes none (set it to 0)")


def lowest(scores: Tensor, counts: Tensor) -> Tensor:
    """Boolean (N, L): the counts[i] lowest scores of row i (ties by position), exactly counts[i] per row."""
    ranks = scores.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < counts.reshape(-1, 1)


def reveal(probs: Tensor, ids: Tensor, unknown: Tensor, u: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """One decoding draw (MaskGIT/MAGE, also ADDP's sampler): ids at `unknown` positions ~ probs (N, L, K) by the
    inverse CDF at u[:, 0], the others kept; confidence log p(id) + tau Gumbel (from u[:, 1]) there, +inf elsewhere.
    u: (N, 2, L) float64 uniforms."""
    cdf = probs.double().cumsum(dim=-1)
    draw = torch.searchsorted(cdf, (u[:, 0] * cdf[..., -1])[..., None]).squeeze(-1)
    ids = torch.where(unknown, draw.clamp(max=probs.shape[-1] - 1), ids)
    gumbel = -torch.log(-torch.log(u[:, 1].clamp(torch.finfo(torch.float64).tiny, 1.0 - 1e-16)))
    confidence = torch.log(probs.gather(-1, ids[..., None])[..., 0].double()) + tau * gumbel
    return ids, torch.where(unknown, confidence, torch.inf)


class MaskedTokensObjective(Objective):
    """MaskGIT/MAGE masked token prediction on a vq latent, sampled by iterative confidence-based decoding."""

    KEY = "masked_tokens"
    Config = MaskedTokensConfig
    LATENT_KINDS = ("tokens",)
    SAMPLERS = {"maskgit": "iterative confidence-based decoding with Gumbel re-masking (MaskGIT/MAGE)"}
    DRAWS = {"u": "sample", "u_batch": "batch", "scores": "sample"}
    BACKBONES = ("mage",)

    def __init__(self, mask_id: int, codebook_size: int, mask_schedule: str = "cosine", per_batch: bool = False,
                 ratio_min: float = 0.5, ratio_max: float = 1.0, ratio_mu: float = 0.55, ratio_std: float = 0.25,
                 drop_ratio: float = 0.0, label_smoothing: float = 0.1, choice_temperature: float = 4.5,
                 sample_schedule: str = "cosine", label_dropout: float = 0.1, null_class: int | None = None):
        if mask_schedule not in MASK_SCHEDULES or sample_schedule not in SAMPLE_SCHEDULES:
            raise ValueError(f"unknown schedule {mask_schedule!r} / {sample_schedule!r}")
        super().__init__(Conditioning(null_class, label_dropout if null_class is not None else 0.0))
        self.mask_id, self.codebook_size = int(mask_id), int(codebook_size)
        self.mask_schedule, self.per_batch = mask_schedule, bool(per_batch)
        self.truncnorm = (float(ratio_min), float(ratio_max), float(ratio_mu), float(ratio_std))
        self.drop_ratio, self.label_smoothing = float(drop_ratio), float(label_smoothing)
        self.choice_temperature, self.sample_schedule = float(choice_temperature), sample_schedule

    @classmethod
    def from_config(cls, cfg, model) -> MaskedTokensObjective:
        """From cfg.objective.masked_tokens and cfg.cond, for an id_grid backbone (its mask id and K)."""
        o = cfg.objective.masked_tokens
        return cls(model.mask_id, model.codebook_size, mask_schedule=o.mask_schedule, per_batch=o.per_batch,
                   ratio_min=o.ratio_min, ratio_max=o.ratio_max, ratio_mu=o.ratio_mu, ratio_std=o.ratio_std,
                   drop_ratio=o.drop_ratio, label_smoothing=o.label_smoothing,
                   choice_temperature=o.choice_temperature, sample_schedule=o.sample_schedule,
                   label_dropout=cfg.cond.label_dropout, null_class=model.null_class)

    # -- masks -------------------------------------------------------------------------------------

    def mask_ratio(self, u: Tensor) -> Tensor:
        """Mask ratios from uniforms u (float64): cos(pi/2 u), or the truncated normal's inverse CDF at u."""
        u = u.double()
        if self.mask_schedule == "cosine":
            return torch.cos(math.pi / 2 * u)
        lo, hi, mu, std = self.truncnorm
        a, b = (torch.special.ndtr(torch.tensor((v - mu) / std, dtype=torch.float64)) for v in (lo, hi))
        return (mu + std * torch.special.ndtri(a + u * (b - a))).clamp(lo, hi)

    def masks(self, n: int, length: int, u: Tensor, u_batch: Tensor, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mask (N, L) with ceil(L r) positions per row, drop (N, L) or None) of one draw."""
        ratio = self.mask_ratio(u_batch.reshape(1).expand(n) if self.per_batch else u)
        counts = torch.ceil(length * ratio).long().clamp(1, length)
        scores = scores.reshape(n, length)
        mask = lowest(scores, counts)
        if self.drop_ratio == 0:
            return mask, None
        dropped = torch.full_like(counts, math.ceil(length * self.drop_ratio))
        return mask, lowest(scores, dropped)

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n training mask ratios (per sample)."""
        return self.mask_ratio(torch.rand(n, generator=generator, device=device)).float()

    def draw(self, n: int, sample_shape, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """A uniform per sample (its ratio), one per batch (the batch's ratio), one score per position."""
        device = device if device is not None else (generator.device if generator is not None else None)
        u = torch.rand(n, generator=generator, device=device)
        u_batch = torch.rand(1, generator=generator, device=device)
        scores = torch.rand((n, *sample_shape), generator=generator, device=device)
        return {"u": u, "u_batch": u_batch, "scores": scores, **self.cond.draw(n, generator, device)}

    def prior(self, sample_shape, generator: Generators = None, n: int | None = None, device=None) -> Tensor:
        """All positions masked: ids (N, h, w) of the mask id."""
        n = len(generator) if isinstance(generator, (list, tuple)) else n
        return torch.full((n, *sample_shape), self.mask_id, dtype=torch.long, device=device)

    # -- training ---------------------------------------------------------------------------------

    def smoothed_ce(self, logits: Tensor, target: Tensor) -> Tensor:
        """(1 - eps) NLL + eps mean_k(-log p_k) per position: logits (..., K), target (...) long."""
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, target[..., None])[..., 0]
        return (1.0 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(dim=-1)

    def compute_loss(self, model, x0: Tensor, cond: Cond, *, taps: tuple[int, ...], u: Tensor, u_batch: Tensor,
                     scores: Tensor) -> LossOutput:
        n, length = x0.shape[0], x0[0].numel()
        mask, drop = self.masks(n, length, u, u_batch, scores)
        x_t = torch.where(mask.reshape(x0.shape), self.mask_id, x0)
        ratio = mask.float().mean(dim=1)
        kwargs = {} if drop is None else {"drop": drop}
        out = model(x_t, ratio, cond, taps=taps, **kwargs)
        logits = out.out.reshape(n, length, -1)
        target = x0.reshape(n, length)
        weight = mask.float()
        per_sample = (self.smoothed_ce(logits, target) * weight).sum(dim=1) / weight.sum(dim=1)
        correct = (logits.detach().argmax(dim=-1) == target).float()
        logs = {"masked_acc": (correct * weight).sum(dim=1) / weight.sum(dim=1), "mask_ratio": ratio}
        return LossOutput(loss=per_sample, x_t=x_t, t=ratio, noise=scores, cond=cond, feats=out.feats, logs=logs)

    # -- sampling ---------------------------------------------------------------------------------

    def model_fn(self, model, dtype: torch.dtype | None = None) -> Callable:
        """`fn(ids, t, cond) -> logits (N, h, w, K)`; ids stay int64 whatever `dtype` (autocast sets precision)."""
        return lambda x, t, cond: model(x, t.to(torch.float32), cond).out

    def sample_options(self, scfg) -> dict:
        """Steps and guidance from a gen.config.SamplerConfig; choice temperature and schedule from this objective."""
        if scfg.eta != 0.0:
            raise ValueError(f"sampler.eta={scfg.eta} is DDIM's; the maskgit sampler takes none (set it to 0)")
        return {"num_steps": scfg.num_steps, "cfg_scale": scfg.cfg_scale, "cfg_interval": tuple(scfg.cfg_interval),
                "choice_temperature": self.choice_temperature, "schedule": self.sample_schedule}

    def remaining(self, step: int, num_steps: int, length: int) -> int:
        """floor(L s(ratio)) for ratio = (step + 1) / num_steps: the masked count the schedule asks for."""
        ratio = (step + 1) / num_steps
        keep = math.cos(math.pi / 2 * ratio) if self.sample_schedule == "cosine" else 1.0 - ratio
        return math.floor(length * keep)

    @torch.no_grad()
    def sample(self, model_fn: Callable, x_T: Tensor, cond, *, generator: Generators = None, num_steps: int = 12,
               cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               choice_temperature: float | None = None, schedule: str | None = None,
               callback: Callable | None = None) -> Tensor:
        """Iterative decoding from ids x_T (mask id where unknown); returns hard ids (N, h, w).

        `callback(dict(i, ids, mask))` gets the sampled ids after step i and the positions re-masked for step i + 1.
        """
        if cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("cfg_scale != 1 needs a class-conditional model (this one is unconditional)")
        tau = self.choice_temperature if choice_temperature is None else float(choice_temperature)
        if schedule is not None and schedule != self.sample_schedule:
            raise ValueError(f"this objective samples with the {self.sample_schedule} schedule, not {schedule!r}")
        cond = as_cond(cond)
        fn = with_cfg(model_fn, cfg_scale, self.cond, cfg_interval)
        n, shape = x_T.shape[0], x_T.shape
        ids = x_T.reshape(n, -1).long()
        length = ids.shape[1]
        sampled = ids
        for step in range(num_steps):
            unknown = ids == self.mask_id
            t = unknown.float().mean(dim=1)
            logits = fn(ids.reshape(shape), t, cond).float().reshape(n, length, -1)
            probs = torch.softmax(logits, dim=-1)
            u = rand((n, 2, length), generator, x_T.device, torch.float64)
            ratio = (step + 1) / num_steps
            sampled, confidence = reveal(probs, ids, unknown, u, tau * (1.0 - ratio))
            counts = unknown.sum(dim=1) - 1
            counts = counts.clamp(max=self.remaining(step, num_steps, length)).clamp(min=1)
            remask = lowest(confidence, counts) & unknown
            ids = torch.where(remask, self.mask_id, sampled)
            if callback is not None:
                callback({"i": step, "ids": sampled.reshape(shape), "mask": remask.reshape(shape)})
        return sampled.reshape(shape)
