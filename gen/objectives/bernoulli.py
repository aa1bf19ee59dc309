"""Bernoulli diffusion on binary latents (Binary Latent Diffusion, Wang et al., CVPR 2023, arXiv 2304.04820, Sec. 3).

Forward process (reference `models/binarylatent.py`, `noise_scheduler`): each step keeps a bit with probability a_t
and otherwise replaces it by a fair coin, q(x_t = 1 | x_{t-1}) = a_t x_{t-1} + (1 - a_t) / 2. With k_t = prod a_i
(k_0 = 1) the marginal is q(x_t = 1 | x0) = k_t x0 + (1 - k_t) / 2 and for s < t the kernel P(x_t | x_s = v) is
k_{t|s} 1[v = x_t] + (1 - k_{t|s}) / 2 with k_{t|s} = k_t / k_s, symmetric in (x_s, x_t). Schedules: "linear",
a_t = 1 - 1 / (T - t + 1), i.e. k_t = 1 - t / T exactly (every released model), and "cosine",
k_t = (1 + cos(pi t / T)) / 2. Integer steps t in 1..T; the network sees t / T (0 data, 1 noise, like flow time).

Parameterisation: with `prediction="flip"` (every README command's --p_flip) the network's logit f per bit has
sigma(f) = P(x0 != x_t), so the x0-logit is (1 - 2 x_t) f and BCE((1 - 2 x_t) f, x0) = BCE(f, x0 XOR x_t);
`prediction="x0"` reads the x0-logit directly. Bits enter the network as 2 x - 1 (the reference's token embedding of
+-1 bits); with patch size 1 a DiT/SiT patch embedding is then a linear map per position.

Loss (reference `focal_loss` with gamma = 0, alpha = -1, loss_final "mean"): per-sample class-balanced BCE on the
target y (flips, or x0), weight (1 - rho) on y = 1 and rho on y = 0 with rho the sample's fraction of ones in y.
Options: plain BCE, a focal factor (1 - p_t)^gamma, the time weight 1 - (t - 1) / T ("weighted"), and the auxiliary
posterior-matching BCE ("aux"). Logged: bce, bit_acc (x0 bits predicted right), flip_rate (rho of the flips).

Sampler ("ancestral", reference `BinaryDiffusion.sample`): fair coins, then for the listed steps t > s the exact Bayes
posterior of x_s given x_t and x0 ~ Bern(p); at t = 1 the bits 1[p > 0.5]. Temperature divides the logits;
classifier-free guidance uses the project's convention l_u + w (l_c - l_u) on the (tempered) x0-logits, w =
sampler.cfg_scale; the paper's (1 + w_BLD) l_c - w_BLD l_u is w = 1 + w_BLD (w = 1: no guidance).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gen.cond import Cond, Conditioning, as_cond
from gen.config import ComponentConfig, check
from gen.objectives.base import LossOutput, Objective, mean_flat
from gen.sampling.guidance import network_fn, with_cfg
from gen.sampling.noise import Generators, rand


def linear_keep(num_timesteps: int) -> Tensor:
    """k_0..k_T of a_t = 1 - 1 / (T - t + 1): k_t = prod_{i <= t} (T - i) / (T - i + 1) = 1 - t / T (float64)."""
    return 1.0 - torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps


def cosine_keep(num_timesteps: int) -> Tensor:
    """k_t = (1 + cos(pi t / T)) / 2 (the reference's "cos"), float64; a_t = k_t / k_{t-1}."""
    return 0.5 + 0.5 * torch.cos(math.pi * torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {"linear": linear_keep, "cosine": cosine_keep}


def step_list(num_timesteps: int, num_steps: int) -> list[int]:
    """Visited steps, descending: 1 + floor(i (T - 1) / (S - 1)), i < S (the reference's linspace, in exact integer
    arithmetic); all T steps when S = T. Contains T and 1, strictly decreasing."""
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"Bernoulli sampling takes 2..T={num_timesteps} steps, got {num_steps} (sampler.num_steps)")
    return [1 + (i * (num_timesteps - 1)) // (num_steps - 1) for i in range(num_steps)][::-1]


def _uniform(shape: Sequence[int], generator: Generators, device) -> Tensor:
    """U(0, 1) of `shape`; with a list of generators, row i from generator i (gen.sampling.noise's layout)."""
    return rand(shape, generator, device)


class BernoulliChain:
    """Float64 keep factors k_0..k_T of one schedule and the Bernoulli process's closed forms."""

    def __init__(self, keep: Tensor):
        keep = torch.as_tensor(keep, dtype=torch.float64)
        if keep.ndim != 1 or keep[0] != 1.0 or bool((keep[1:] > keep[:-1]).any()) or float(keep[-1]) < 0:
            raise ValueError("keep factors must start at 1 and decrease to >= 0")
        self.keep = keep
        self.num_timesteps = keep.shape[0] - 1
        self.step_keep = torch.cat([keep[:1], keep[1:] / keep[:-1]])  # a_t (a_0 = 1)
        self._on: dict[torch.device, Tensor] = {}

    def k(self, t: Tensor | int, like: Tensor) -> Tensor:
        """k_t in like's float dtype and device, shaped (N, 1, ..., 1) for per-sample t."""
        if like.device not in self._on:
            self._on[like.device] = self.keep.to(like.device, torch.float32 if like.device.type == "mps" else None)
        # A host int indexes without a device read (a 0-d device index would be read back: a sync per step).
        index = t if isinstance(t, int) else torch.as_tensor(t, device=like.device).long()
        return self._on[like.device][index].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def marginal(self, x0: Tensor, t: Tensor | int) -> Tensor:
        """q(x_t = 1 | x0) = k_t x0 + (1 - k_t) / 2 (x0 may be a probability: then E over x0 ~ Bern(x0))."""
        k = self.k(t, x0)
        return k * x0 + (1.0 - k) / 2

    def q_sample(self, x0: Tensor, t: Tensor | int, uniform: Tensor) -> Tensor:
        """x_t = 1[u < q(x_t = 1 | x0)] with the given U(0, 1) draws."""
        return (uniform.to(x0) < self.marginal(x0, t)).to(x0.dtype)

    def posterior(self, p: Tensor, x_t: Tensor, s: Tensor | int, t: Tensor | int) -> Tensor:
        """P(x_s = 1 | x_t, x0 ~ Bern(p)) for 0 <= s < t: prior(v) = E q(x_s = v | x0), like(v) = P(x_t | x_s = v)."""
        k_s = self.k(s, p)
        kernel = self.k(t, p) / k_s  # k_{t|s}; k_s > 0 for s < T
        prior1 = k_s * p + (1.0 - k_s) / 2
        like1 = kernel * x_t + (1.0 - kernel) / 2  # P(x_t | x_s = 1)
        like0 = kernel * (1.0 - x_t) + (1.0 - kernel) / 2  # P(x_t | x_s = 0)
        num = prior1 * like1
        return num / (num + (1.0 - prior1) * like0)


def balanced_weights(target: Tensor) -> Tensor:
    """(1 - rho) on ones and rho on zeros, rho = the sample's fraction of ones (reference focal_loss, alpha = -1)."""
    rho = mean_flat(target).reshape(-1, *([1] * (target.ndim - 1)))
    return (1.0 - rho) * target + rho * (1.0 - target)


LOSSES = ("balanced", "plain")
TIME_WEIGHTS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "none": lambda t, steps: torch.ones_like(t, dtype=torch.float32),  # reference loss_final "mean"
    "linear": lambda t, steps: 1.0 - (t.float() - 1.0) / steps,  # reference loss_final "weighted"
}
PREDICTIONS = ("flip", "x0")


@dataclass
class BernoulliConfig(ComponentConfig):
    """Bernoulli diffusion on binary latents (BLD): schedule, parameterisation, loss options, sampling temperature."""

    num_timesteps: int = 64
    """Steps T of the chain (reference README: 64); the network sees t / T."""
    schedule: str = "linear"
    """Keep factors: linear (k_t = 1 - t / T, every released model) or cosine (k_t = (1 + cos(pi t / T)) / 2)."""
    prediction: str = "flip"
    """Network output per bit: flip (logit of x0 != x_t; the README's --p_flip) or x0 (logit of x0 = 1)."""
    loss: str = "balanced"
    """BCE weighting per sample: balanced (rare class weighted by 1 - rho, reference default) or plain."""
    focal_gamma: float = 0.0
    """Focal factor (1 - p_t)^gamma on the BCE; 0 is plain BCE (reference default)."""
    time_weighting: str = "none"
    """Per-step weight: none (reference loss_final mean, README) or linear (1 - (t - 1) / T, loss_final weighted)."""
    aux_weight: float = 0.0
    """Weight of the auxiliary BCE between the model's and the true posterior of x_{t-1} (reference `aux`); 0 off."""
    temperature: float = 1.0
    """Sampling temperature dividing the logits (reference README: 0.5-1.0; FID 4.17 on churches at 0.9)."""

    def validate(self, cfg) -> None:
        """Registered choices, non-negative weights, and sampler steps within the chain."""
        check(self.num_timesteps >= 2, "objective.bernoulli.num_timesteps", "must be at least 2")
        check(self.schedule in SCHEDULES, "objective.bernoulli.schedule", f"one of {sorted(SCHEDULES)}")
        check(self.prediction in PREDICTIONS, "objective.bernoulli.prediction", f"one of {PREDICTIONS}")
        check(self.loss in LOSSES, "objective.bernoulli.loss", f"one of {LOSSES}")
        check(self.time_weighting in TIME_WEIGHTS, "objective.bernoulli.time_weighting",
              f"one of {sorted(TIME_WEIGHTS)}")
        check(self.focal_gamma >= 0, "objective.bernoulli.focal_gamma", "must be >= 0")
        check(self.aux_weight >= 0, "objective.bernoulli.aux_weight", "must be >= 0")
        check(self.temperature > 0, "objective.bernoulli.temperature", "must be positive")
        for key, steps in (("sampler.num_steps", cfg.sampler.num_steps), ("log.fid_num_steps", cfg.log.fid_num_steps)):
            check(steps is None or 2 <= steps <= self.num_timesteps, key,
                  f"Bernoulli sampling visits 2..objective.bernoulli.num_timesteps={self.num_timesteps} steps")
        check(cfg.sampler.eta == 0.0, "sampler.eta", "is DDIM's; the Bernoulli sampler takes none (set it to 0)")


class BernoulliObjective(Objective):
    """BLD's Bernoulli diffusion: keep-or-fair-coin corruption, flip logits, balanced BCE, ancestral sampling."""

    KEY = "bernoulli"
    Config = BernoulliConfig
    LATENT_KINDS = ("binary",)
    SAMPLERS = {"ancestral": "exact-posterior ancestral sampling over a subset of steps (BLD Sec. 3)"}

    def __init__(self, num_timesteps: int = 64, schedule: str = "linear", prediction: str = "flip",
                 loss: str = "balanced", focal_gamma: float = 0.0, time_weighting: str = "none",
                 aux_weight: float = 0.0, temperature: float = 1.0, label_dropout: float = 0.1,
                 null_class: int | None = None):
        for value, choices, what in ((schedule, SCHEDULES, "schedule"), (prediction, PREDICTIONS, "prediction"),
                                     (loss, LOSSES, "loss"), (time_weighting, TIME_WEIGHTS, "time_weighting")):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; choose from {sorted(choices)}")
        if focal_gamma < 0 or aux_weight < 0 or temperature <= 0:
            raise ValueError("focal_gamma and aux_weight must be >= 0 and temperature > 0")
        super().__init__(Conditioning(null_class, label_dropout))  # per-sample dropout, in Objective.loss
        self.chain = BernoulliChain(SCHEDULES[schedule](num_timesteps))
        self.num_timesteps = num_timesteps
        self.prediction, self.balanced, self.focal_gamma = prediction, loss == "balanced", float(focal_gamma)
        self.time_weight, self.aux_weight = TIME_WEIGHTS[time_weighting], float(aux_weight)
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, cfg, model) -> BernoulliObjective:
        """From cfg.objective.bernoulli and cfg.cond; the backbone must output one logit per bit (no variance)."""
        if model.learn_sigma:
            raise ValueError(f"objective bernoulli reads one logit per bit, but {cfg.model.name} also predicts a "
                             f"variance; build it without one (e.g. model.dit.learn_sigma=false, or a SiT model)")
        o = cfg.objective.bernoulli
        return cls(num_timesteps=o.num_timesteps, schedule=o.schedule, prediction=o.prediction, loss=o.loss,
                   focal_gamma=o.focal_gamma, time_weighting=o.time_weighting, aux_weight=o.aux_weight,
                   temperature=o.temperature, label_dropout=cfg.cond.label_dropout, null_class=model.null_class)

    # -- draws and model calls -------------------------------------------------------------------------

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n integer steps, uniform on 1..T."""
        return torch.randint(1, self.num_timesteps + 1, (n,), generator=generator, device=device)

    def draw(self, n: int, sample_shape, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """Steps, and per bit two uniforms: noise[:, 0] draws x_t, noise[:, 1] SRA's teacher view from x_t."""
        device = device if device is not None else (generator.device if generator is not None else None)
        t = self.sample_time(n, device=device, generator=generator)
        noise = torch.rand((n, 2, *sample_shape), generator=generator, device=device)
        return {"t": t, "noise": noise, **self.cond.draw(n, generator, device)}

    def prior(self, sample_shape, generator: Generators = None, n: int | None = None, device=None) -> Tensor:
        """Fair coins x_T ~ Bern(1/2) (k_T = 0 on both schedules), one generator per sample when given a list."""
        n = len(generator) if isinstance(generator, (list, tuple)) else n
        return (_uniform((n, *sample_shape), generator, device) < 0.5).float()

    def call(self, model, x: Tensor, t: Tensor, cond: Cond, *, taps=(), stop_at: int | None = None):
        """The backbone on +-1 bits 2 x - 1 at time t / T (integer steps t)."""
        return model(2.0 * x - 1.0, t.to(torch.float32) / self.num_timesteps, cond, taps=taps, stop_at=stop_at)

    def model_fn(self, model, dtype: torch.dtype | None = None) -> Callable:
        """`fn(x, t / T, cond) -> logits` for the sampler: bits x in {0, 1}, mapped to +-1 like `call`."""
        net = network_fn(model, dtype)
        return lambda x, t_frac, cond: net(2.0 * x - 1.0, t_frac, cond)

    def x0_logits(self, out: Tensor, x_t: Tensor) -> Tensor:
        """Logits of x0 = 1 from the network output: (1 - 2 x_t) f for flips (not 1 - f: that is a probability
        identity), the output itself for x0 prediction."""
        return (1.0 - 2.0 * x_t) * out if self.prediction == "flip" else out

    # -- training ---------------------------------------------------------------------------------

    def teacher_view(self, x0: Tensor, t: Tensor, noise: Tensor, u: Tensor, t_max: float) -> tuple[Tensor, Tensor]:
        """SRA's teacher input from the same Markov chain: s = max(1, t - D), D = floor(u (floor(t_max T) + 1)), and
        x_s ~ q(x_s | x_t, x0) drawn with noise[:, 1]; (x_s, x_t) is then distributed as q(x_s | x0) q(x_t | x_s)."""
        t = t.to(x0.device).long()
        span = math.floor(t_max * self.num_timesteps)
        offset = torch.floor(u.to(x0.device).double() * (span + 1)).long().clamp(max=span)
        s = (t - offset).clamp(min=1)
        x_t = self.chain.q_sample(x0, t, noise[:, 0])
        post = self.chain.posterior(x0, x_t, s.clamp(max=self.num_timesteps - 1), t)  # s == t rows: x_t below
        x_s = (noise[:, 1].to(x0) < post).to(x0.dtype)
        same = (s == t).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.where(same, x_t, x_s), s

    def compute_loss(self, model, x0: Tensor, cond: Cond, *, taps: tuple[int, ...], t: Tensor,
                     noise: Tensor) -> LossOutput:
        """Per-sample (balanced, focal, time-weighted) BCE on flips or x0, plus the optional aux term."""
        t = t.to(x0.device).long()
        x0 = x0.float()
        x_t = self.chain.q_sample(x0, t, noise[:, 0])
        res = self.call(model, x_t, t, cond, taps=taps)
        out = res.out[:, : x0.shape[1]].float()  # bf16 autocast output -> fp32 loss
        flips = (x0 != x_t).float()
        target = flips if self.prediction == "flip" else x0
        bce = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        weight = balanced_weights(target) if self.balanced else torch.ones_like(target)
        if self.focal_gamma > 0:
            prob = torch.sigmoid(out)
            miss = (1.0 - (prob * target + (1.0 - prob) * (1.0 - target))).clamp(1e-6, 1 - 1e-6)
            weight = weight * miss**self.focal_gamma
        time_weight = self.time_weight(t, self.num_timesteps)
        logits = self.x0_logits(out, x_t)
        loss = time_weight * mean_flat(weight * bce)
        logs = {"bce": mean_flat(bce).detach(), "flip_rate": mean_flat(flips),
                "bit_acc": mean_flat(((logits > 0).float() == x0).float())}
        if self.aux_weight > 0:
            aux = time_weight * self.aux_loss(torch.sigmoid(logits), x0, x_t, t)
            logs["aux"] = aux.detach()
            loss = loss + self.aux_weight * aux
        return LossOutput(loss=loss, x_t=x_t, t=t, noise=noise, cond=cond, feats=res.feats, logs=logs)

    def aux_loss(self, p: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample BCE between the model's posterior of x_{t-1} (from p = P(x0 = 1)) and the true one (from x0);
        at t = 1 both are about x0 itself: p against x0 (reference `aux`)."""
        s = t - 1
        first = (t == 1).reshape(-1, *([1] * (x0.ndim - 1)))
        model = torch.where(first, p, self.chain.posterior(p, x_t, s, t))
        true = torch.where(first, x0, self.chain.posterior(x0, x_t, s, t))
        return mean_flat(F.binary_cross_entropy(model.clamp(1e-6, 1 - 1e-6), true.clamp(0.0, 1.0), reduction="none"))

    # -- sampling ---------------------------------------------------------------------------------

    def sample_options(self, scfg) -> dict:
        """Steps, guidance scale and interval from a gen.config.SamplerConfig; temperature from this objective."""
        if scfg.eta != 0.0:
            raise ValueError(f"sampler.eta={scfg.eta} is DDIM's; the Bernoulli sampler takes none (set it to 0)")
        return {"sampler": scfg.sampler, "num_steps": scfg.num_steps, "cfg_scale": scfg.cfg_scale,
                "cfg_interval": tuple(scfg.cfg_interval), "temperature": self.temperature}

    def guided_logits(self, model_fn: Callable, x: Tensor, t_frac: Tensor, cond: Cond, cfg_scale: float = 1.0,
                      cfg_interval: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0,
                      t_guide: float | None = None) -> Tensor:
        """x0-logits l_u + w (l_c - l_u) / temperature (w = cfg_scale, project convention; BLD's w is w - 1),
        guided inside `cfg_interval` of t / T (judged at the host float `t_guide` when given: no device read);
        the unconditional pass sees the null condition."""
        if cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("cfg_scale != 1 needs null_class (the model was built without an unconditional label)")
        fn = with_cfg(lambda y, tt, c: self.x0_logits(model_fn(y, tt, c)[:, : y.shape[1]].float(), y), cfg_scale,
                      self.cond, cfg_interval)
        return fn(x, t_frac, cond, t_guide=t_guide) / temperature

    @torch.no_grad()
    def sample(self, model_fn: Callable, x_T: Tensor, cond, *, sampler: str = "ancestral",
               num_steps: int | None = None, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               temperature: float | None = None, generator: Generators = None,
               callback: Callable | None = None) -> Tensor:
        """Ancestral sampling from bits x_T over `num_steps` of the T steps (default all); returns {0, 1} bits.

        `callback(dict(i, t, x, denoised))` gets the bits after the i-th step at step t and P(x0 = 1) there.
        """
        if sampler not in self.SAMPLERS:
            raise ValueError(f"unknown Bernoulli sampler {sampler!r}; choose from {sorted(self.SAMPLERS)}")
        temperature = self.temperature if temperature is None else float(temperature)
        steps = step_list(self.num_timesteps, self.num_timesteps if num_steps is None else int(num_steps))
        cond = as_cond(cond)
        x = x_T.float()
        for i, t in enumerate(steps):
            t_frac = torch.full((x.shape[0],), t / self.num_timesteps, device=x.device)
            p = torch.sigmoid(self.guided_logits(model_fn, x, t_frac, cond, cfg_scale, cfg_interval, temperature,
                                                 t_guide=t / self.num_timesteps))
            if t > 1:
                post = self.chain.posterior(p, x, steps[i + 1], t)
                x = (_uniform(x.shape, generator, x.device) < post).float()
            else:
                x = (p > 0.5).float()
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": p})
        return x.to(x_T.dtype)
