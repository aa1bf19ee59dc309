"""ADDP: alternating denoising of VQ tokens and pixels (Tian et al., ICLR 2024, arXiv 2306.05423; reference
ChangyaoTian/ADDP `modeling/encoders/models_addp.py` forward / forward_loss, `engine_generate.py`).

Training step on clean ids z0 (masks: gen.objectives.addp_masks, one ratio pair per global batch):
- pi_t1 = predictor(z0 visible outside mask_t1), pi_t = predictor(z0 visible outside mask_t) (frozen, no grad);
- code map Z_t = pi_t1 @ codebook on mask_t (soft, expected codes), codebook[z0] elsewhere; x_t = VQDec(Z_t) (frozen,
  no grad);
- the network (gen.models.addp) reads x_t, z0 and mask_t, predicts logits over V; the loss is the soft-target
  cross-entropy with label smoothing eps over V (PyTorch semantics: target (1 - eps) pad(pi_t) + eps / V), on mask_t
  positions, per sample averaged over them (all rows have equal counts: the reference's batch mean).
No pixel loss. Logged: `masked_acc` (argmax of the logits against argmax pi_t on mask_t).

Frozen parts (`load_weights`, never in the optimizer, the EMA or checkpoints): the tokenizer of the run's vq latent
space and the predictor: MAGE (gen.models.mage, unconditional, weights from `objective.addp.predictor_weights`) or the
`oracle` test double, (1 - eps_o) onehot(z0) + eps_o / K at every position whatever the mask.

Sampler `alternating` (engine_generate.py): ids all masked, a constant grey image; per step s of S: logits over the
K codes from (x, ids, mask); ids at masked positions ~ softmax(logits) (no logit temperature), revealed ones frozen;
confidence log p(id) + tau_s Gumbel with tau_s = tau (1 - (s+1)/S) (dynamic) or tau (static), revealed at +inf; the
generation_counts(s) lowest stay masked; Z = softmax(logits) @ codebook on the new mask, codebook[ids] elsewhere;
x = VQDec(Z). Returns the last code map Z (the latent space decodes it): official, one soft position remains;
`final_full_reveal` ends with hard codes only.

Class-conditional ADDP (not in the paper; model.addp.class_conditional): labels reach the token decoder, dropped to
the null label with cond.label_dropout; the sampler guides the logits with sampler.cfg_scale / cfg_interval through
gen.sampling.guidance.with_cfg, its state (image, ids, mask) packed in one tensor (`pack`) so the batch doubling
applies to all of it. The frozen predictor stays unconditional (MAGE's fake class).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gen.cond import Cond, Conditioning, as_cond
from gen.config import ComponentConfig, check
from gen.objectives.addp_masks import generation_counts, grid_levels, nested_masks, ratio_grid
from gen.objectives.base import LossOutput, Objective
from gen.objectives.masked_tokens import lowest, reveal
from gen.sampling.guidance import with_cfg
from gen.sampling.noise import Generators, rand
from latents.vq import embed, soft_embed

PREDICTORS = ("mage", "oracle")


@dataclass
class ADDPConfig(ComponentConfig):
    """ADDP: frozen predictor, mask-ratio grid, label smoothing, and the alternating sampler's knobs."""

    predictor: str = "mage"
    """Frozen token predictor: mage (weights from predictor_weights) or oracle (the test double, oracle_epsilon)."""
    predictor_model: str = "MAGE-B"
    """mage: the predictor's model name (MAGE-B: mage-vitb-1600.pth, MAGE-L: mage-vitl-1600.pth); its sizes are
    that model's with model.mage's overrides (depth, widths, heads: a predictor trained here by masked_tokens)."""
    predictor_weights: Optional[str] = None
    """mage: local weights, a released MAGE checkpoint or a state dict of gen.models.mage."""
    oracle_epsilon: float = 0.0
    """oracle: eps_o of (1 - eps_o) onehot(z0) + eps_o / K (0: exact targets)."""
    ratio_steps: int = 100
    """Mask-ratio grid cos(pi/2 j / ratio_steps) (ADDP: 100)."""
    ratio_min: float = 0.5
    """Grid ratios kept: ratio_min <= r < ratio_max (ADDP: 0.5, 1.0)."""
    ratio_max: float = 1.0
    """Upper end (excluded) of the grid ratios."""
    ratio_mu: float = 0.55
    """Mean of the normal weighting the grid (ADDP: 0.55)."""
    ratio_std: float = 0.25
    """Standard deviation of the normal weighting the grid (ADDP: 0.25)."""
    label_smoothing: float = 0.1
    """Label smoothing eps over the V ids (ADDP: 0.1)."""
    choice_temperature: float = 6.0
    """Sampling: Gumbel scale tau of the re-masking confidence (ADDP: 6.0)."""
    temperature_strategy: str = "dynamic"
    """Sampling: dynamic (tau (1 - (s+1)/S)) or static (tau)."""
    sample_schedule: str = "cosine"
    """Sampling: fraction still masked after step s, cos(pi/2 (s+1)/S) or linear 1 - (s+1)/S."""
    final_full_reveal: bool = False
    """Sampling: reveal every position at the last step (false: the official single soft position remains)."""

    def validate(self, cfg) -> None:
        """Known choices, a non-empty grid, the vq latent, guidance only for a class-conditional model."""
        check(self.predictor in PREDICTORS, "objective.addp.predictor", f"one of {PREDICTORS}")
        check(0.0 <= self.oracle_epsilon <= 1.0, "objective.addp.oracle_epsilon", "must lie in [0, 1]")
        check(self.ratio_steps >= 1, "objective.addp.ratio_steps", "must be >= 1")
        check(0.0 <= self.ratio_min < self.ratio_max <= 1.0, "objective.addp.ratio_min",
              "needs 0 <= ratio_min < ratio_max <= 1")
        check(self.ratio_std > 0, "objective.addp.ratio_std", "must be positive")
        check(0.0 <= self.label_smoothing < 1.0, "objective.addp.label_smoothing", "must lie in [0, 1)")
        check(self.temperature_strategy in ("dynamic", "static"), "objective.addp.temperature_strategy",
              "dynamic or static")
        check(self.sample_schedule in ("cosine", "linear"), "objective.addp.sample_schedule", "cosine or linear")
        check(cfg.latent.name == "vq", "latent.name", "objective addp decodes codes: it runs on the vq latent space")
        check(cfg.sampler.cfg_scale == 1.0 or cfg.model.addp.class_conditional, "sampler.cfg_scale",
              "guidance needs a class-conditional ADDP (model.addp.class_conditional=true); set it to 1")
        check(cfg.sampler.eta == 0.0, "sampler.eta", "the alternating sampler takes none (set it to 0)")


def oracle_probs(ids: Tensor, codebook_size: int, epsilon: float) -> Tensor:
    """(1 - eps) onehot(ids) + eps / K, (N, h, w, K), at every position whatever the mask."""
    return (1.0 - epsilon) * F.one_hot(ids, codebook_size).float() + epsilon / codebook_size


class ADDPObjective(Objective):
    """ADDP's training step and alternating sampler (module docstring)."""

    KEY = "addp"
    Config = ADDPConfig
    LATENT_KINDS = ("tokens",)
    SAMPLERS = {"alternating": "alternate token prediction from pixels and VQ decoding of hard + soft codes (ADDP)"}
    DRAWS = {"level": "batch", "offset": "batch", "scores": "sample"}
    BACKBONES = ("addp",)

    def __init__(self, model, cfg):
        null = model.null_class
        super().__init__(Conditioning(null, cfg.cond.label_dropout if null is not None else 0.0))
        o = cfg.objective.addp
        self.options, self.cfg = o, cfg
        self.mask_id, self.codebook_size, self.vocab_size = model.mask_id, model.codebook_size, model.vocab_size
        self.grid = tuple(model.token_grid)
        self.ratios, self.probs = ratio_grid(o.ratio_steps, o.ratio_min, o.ratio_max, o.ratio_mu, o.ratio_std)
        self.latent = None  # the frozen tokenizer's latent space, from load_weights
        self.predictor = None  # the frozen MAGE predictor (None: the oracle)

    @classmethod
    def from_config(cls, cfg, model) -> ADDPObjective:
        """From cfg.objective.addp; the frozen parts load in `load_weights`."""
        return cls(model, cfg)

    def load_weights(self, device: torch.device | str = "cpu") -> ADDPObjective:
        """The frozen tokenizer (the run's vq latent space) and predictor, on `device`, without gradients."""
        if self.latent is None:
            from latents import build_latent

            self.latent = build_latent(self.cfg)
            if self.options.predictor == "mage":
                from gen.models.mage import MaskedTokenTransformer, load_mage

                name = self.options.predictor_model
                # Sizes: predictor_model's table with model.mage's overrides (those of the predictor's own run).
                net = MaskedTokenTransformer.MODELS[name](grid=self.latent.shape, codebook_size=self.codebook_size,
                                                          **self.cfg.model.mage.sizes(name))
                key = "objective.addp.predictor_weights"
                self.predictor = load_mage(net, self.options.predictor_weights, key).eval().requires_grad_(False)
        self.latent.load_weights(device)
        if self.predictor is not None:
            self.predictor.to(device)
        return self

    def predict(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The frozen predictor's softmax over the K codes (N, h, w, K), z0 visible outside `mask`."""
        if self.predictor is None:
            return oracle_probs(ids, self.codebook_size, self.options.oracle_epsilon)
        x = torch.where(mask.reshape(ids.shape), self.predictor.mask_id, ids)
        return torch.softmax(self.predictor(x, torch.zeros(len(ids), device=ids.device), None).out.float(), dim=-1)

    def code_map(self, ids: Tensor, mask: Tensor, probs: Tensor) -> Tensor:
        """Z: soft codes probs @ codebook on `mask`, codebook[ids] elsewhere (N, d, h, w)."""
        codes = self.latent.codebook(ids.device)
        return torch.where(mask.reshape(len(ids), 1, *ids.shape[1:]), soft_embed(codes, probs), embed(codes, ids))

    # -- draws ------------------------------------------------------------------------------------

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Not used (the mask ratio is drawn per batch from the grid by `draw`)."""
        raise NotImplementedError("ADDP draws its mask ratios per batch from the grid (draw)")

    def draw(self, n: int, sample_shape, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """Per batch: the grid level and the offset uniforms; per sample: one score per position."""
        device = device if device is not None else (generator.device if generator is not None else None)
        level = torch.rand(1, generator=generator, device=device)
        offset = torch.rand(1, generator=generator, device=device)
        scores = torch.rand((n, *sample_shape), generator=generator, device=device)
        return {"level": level, "offset": offset, "scores": scores, **self.cond.draw(n, generator, device)}

    def prior(self, sample_shape, generator: Generators = None, n: int | None = None, device=None) -> Tensor:
        """All positions masked: ids (N, h, w) of the mask id."""
        n = len(generator) if isinstance(generator, (list, tuple)) else n
        return torch.full((n, *sample_shape), self.mask_id, dtype=torch.long, device=device)

    # -- training ---------------------------------------------------------------------------------

    def compute_loss(self, model, x0: Tensor, cond: Cond, *, taps: tuple[int, ...], level: Tensor, offset: Tensor,
                     scores: Tensor) -> LossOutput:
        n, length = x0.shape[0], x0[0].numel()
        i, i_next = grid_levels(self.probs, level, offset)
        mask_t, mask_t1 = nested_masks(self.ratios, i, i_next, scores.reshape(n, length))
        with torch.no_grad():
            target = self.predict(x0, mask_t).reshape(n, length, -1)  # pi_t
            soft = self.predict(x0, mask_t1)  # pi_{t+1}
            x_t = self.latent.decode_codes(self.code_map(x0, mask_t, soft))
        ratio = torch.full((n,), float(self.ratios[i]), device=x0.device)
        out = model(x_t, ratio, cond, ids=x0, mask=mask_t.reshape(x0.shape), taps=taps)
        logits = out.out.reshape(n, length, -1).float()
        eps = self.options.label_smoothing
        smoothed = (1.0 - eps) * F.pad(target, (0, logits.shape[-1] - target.shape[-1])) + eps / logits.shape[-1]
        ce = -(smoothed * F.log_softmax(logits, dim=-1)).sum(-1)
        weight = mask_t.float()
        per_sample = (ce * weight).sum(1) / weight.sum(1)
        hit = (logits.detach()[..., : self.codebook_size].argmax(-1) == target.argmax(-1)).float()
        logs = {"masked_acc": (hit * weight).sum(1) / weight.sum(1), "mask_ratio": ratio}
        return LossOutput(loss=per_sample, x_t=x_t, t=ratio, noise=scores, cond=cond, feats=out.feats, logs=logs)

    # -- sampling ---------------------------------------------------------------------------------

    def pack(self, x: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """The sampler's state as one float32 tensor (N, 3 H W + L), so that guidance (gen.sampling.guidance.with_cfg)
        doubles image, ids and mask alike: the image, then the ids with the mask id where masked (ids < 2^24 are
        exact in float32; the network reads no id under the mask)."""
        marked = torch.where(mask.reshape(ids.shape), self.mask_id, ids)
        return torch.cat([x.float().flatten(1), marked.flatten(1).float()], dim=1)

    def unpack(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image (N, 3, H, W), ids (N, h, w), mask (N, h, w)) of a `pack`ed state."""
        h, w = self.grid
        f = self.latent.factor
        ids = state[:, 3 * h * w * f * f:].round().long().reshape(-1, h, w)
        return state[:, : 3 * h * w * f * f].reshape(-1, 3, h * f, w * f), ids, ids == self.mask_id

    def model_fn(self, model, dtype: torch.dtype | None = None) -> Callable:
        """`fn(state, t, cond) -> logits over the K codes (N, h, w, K)` of a `pack`ed state; the image cast to
        `dtype` (None keeps it); t (the masked fraction) is not read by the network."""
        def fn(state: Tensor, t: Tensor, cond) -> Tensor:
            x, ids, mask = self.unpack(state)
            return model(x if dtype is None else x.to(dtype), t.float(), cond, ids=ids, mask=mask).out[
                ..., : self.codebook_size]

        return fn

    def sample_options(self, scfg) -> dict:
        """Steps and guidance from a gen.config.SamplerConfig, the rest from objective.addp."""
        o = self.options
        return {"num_steps": scfg.num_steps, "cfg_scale": scfg.cfg_scale, "cfg_interval": tuple(scfg.cfg_interval),
                "choice_temperature": o.choice_temperature, "temperature_strategy": o.temperature_strategy,
                "schedule": o.sample_schedule, "final_full_reveal": o.final_full_reveal}

    @torch.no_grad()
    def sample(self, model_fn: Callable, x_T: Tensor, cond, *, generator: Generators = None, num_steps: int = 20,
               choice_temperature: float = 6.0, temperature_strategy: str = "dynamic", schedule: str = "cosine",
               final_full_reveal: bool = False, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               callback: Callable | None = None) -> Tensor:
        """Alternating sampling from ids x_T (all masked); returns the last code map (N, d, h, w). A class-conditional
        model guides its logits u + cfg_scale (c - u) where the masked fraction lies in cfg_interval (as
        masked_tokens does).

        `callback(dict(i, ids, mask, x))` gets the ids, the positions still masked and the image after step i."""
        if cfg_scale != 1.0 and not self.cond.conditional:
            raise ValueError("cfg_scale != 1 needs a class-conditional ADDP (model.addp.class_conditional=true)")
        cond = as_cond(cond) if self.cond.conditional else cond
        fn = with_cfg(model_fn, cfg_scale, self.cond, cfg_interval)
        n, shape = x_T.shape[0], x_T.shape
        length = x_T[0].numel()
        counts = generation_counts(length, num_steps, schedule, final_full_reveal)
        ids = x_T.reshape(n, -1).long()
        mask = torch.ones_like(ids, dtype=torch.bool)
        side = shape[-1] * self.latent.factor
        x = torch.full((n, 3, shape[-2] * self.latent.factor, side), 0.5, device=x_T.device)
        z = None
        for step in range(num_steps):
            state = self.pack(x, ids.reshape(shape), mask.reshape(shape))
            logits = fn(state, mask.float().mean(dim=1), cond).float().reshape(n, length, -1)
            probs = torch.softmax(logits, dim=-1)
            u = rand((n, 2, length), generator, x_T.device, torch.float64)
            frac = (step + 1) / num_steps
            tau = choice_temperature * (1.0 - frac) if temperature_strategy == "dynamic" else choice_temperature
            ids, confidence = reveal(probs, ids, mask, u, tau)
            mask = lowest(confidence, torch.full((n,), counts[step], device=ids.device)) & mask
            z = self.code_map(ids.reshape(shape), mask, probs.reshape(*shape, -1))
            x = self.latent.decode_codes(z)
            if callback is not None:
                callback({"i": step, "ids": ids.reshape(shape), "mask": mask.reshape(shape), "x": x})
        return z
