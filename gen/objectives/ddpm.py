"""DiT's discrete diffusion: DDPM (Ho et al. 2020) with IDDPM's learned-range variance and hybrid loss.

DiT (Peebles & Xie 2023) forks improved-diffusion (Nichol & Dhariwal 2021, "IDDPM"): T = 1000 linear
betas, epsilon prediction, a network that also emits v in [-1, 1] interpolating the log variance between
beta_t and the posterior variance (IDDPM eq. 15), trained with L_simple + L_vb where L_vb only reaches the
variance (IDDPM Sec. 3.1, "L_hybrid"). Sampling runs on a respaced chain (IDDPM Sec. 4), ancestral or DDIM.

Indices: `i` is a position in a (possibly respaced) chain, 0 = least noisy; the network always receives
the original integer step `timestep_map[i]` (0..999) as a float, like DiT's `respace.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from gen.cond import Cond, Conditioning, as_cond
from gen.config import ComponentConfig, check
from gen.objectives.base import LossOutput, Objective, mean_flat
from gen.sampling.guidance import with_cfg
from gen.sampling.noise import randn as draw_noise
from gen.validation import in_range

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear betas 1e-4..0.02 for T = 1000, scaled by 1000/T for other T (IDDPM's "linear")."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule, abar(t) = cos^2((t + s)/(1 + s) * pi/2) with s = 0.008 (IDDPM eq. 17)."""
    s = np.linspace(0.0, 1.0, num_timesteps + 1, dtype=np.float64)
    abar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"linear": linear_betas, "cosine": cosine_betas}


def space_timesteps(num_timesteps: int, section_counts: int | str) -> list[int]:
    """Steps kept from a `num_timesteps` chain: "250" or "10,15,20" (even strides per equal section), or "ddimN"."""
    spec = str(section_counts)
    if spec.startswith("ddim"):
        # DDIM's striding (IDDPM respace.py): the smallest integer stride giving exactly N steps from 0.
        want = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride ({spec!r})")
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for k, count in enumerate(counts):
        length = size + (1 if k < extra else 0)
        if not 1 <= count <= length:
            raise ValueError(f"cannot take {count} steps from a section of {length} ({spec!r} of {num_timesteps})")
        stride = (length - 1) / (count - 1) if count > 1 else 1.0
        pos = 0.0
        for _ in range(count):
            # Accumulated float position and Python's round(), as IDDPM does, so the kept steps match DiT's.
            steps.append(start + round(pos))
            pos += stride
        start += length
    return sorted(set(steps))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Phi(x) that IDDPM/DiT train with (the GELU approximation's CDF)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of the 256-level bin of x in [-1, 1] under N(means, e^(2 log_scales)).

    Ho et al. Sec. 3.3: bins of width 2/255, the outermost bins extend to -inf / +inf.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class PMeanVar(NamedTuple):
    """The model's reverse step p(x_{i-1} | x_i) and the predictions it came from."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    eps: Tensor


class DiffusionChain:
    """Float64 tables of one (possibly respaced) discrete Gaussian chain, its posterior and its reverse steps."""

    def __init__(self, betas, *, timestep_map=None, learn_sigma: bool = True):
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if b.ndim != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        n = self.num_timesteps = b.shape[0]
        self.timestep_map = torch.arange(n) if timestep_map is None else torch.as_tensor(timestep_map).long()
        self.learn_sigma = learn_sigma
        one = torch.ones(1, dtype=torch.float64)
        abar = torch.cumprod(1.0 - b, dim=0)
        self.betas = b
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = torch.cat([one, abar[:-1]])
        self.alphas_cumprod_next = torch.cat([abar[1:], 0 * one])
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7): beta~_t and the coefficients of x_0 and x_t.
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - abar)
        # beta~_0 = 0, so its log is clipped to beta~_1 (IDDPM); a 1-step chain falls back to beta_0.
        first = self.posterior_variance[1:2] if n > 1 else b[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - b).sqrt() / (1.0 - abar)
        self.log_betas = b.log()
        # Fixed variance without learn_sigma: IDDPM's default "fixed large" sigma^2 = beta_t (Ho et al. Sec. 3.2),
        # with beta~_1 in place of beta_0 for a better decoder likelihood (IDDPM/DiT p_mean_variance).
        self.fixed_log_variance = torch.cat([first, b[1:]]).log()
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    def _at(self, name: str, i: Tensor, like: Tensor) -> Tensor:
        """Table `name` at chain indices i, in like's dtype/device, shaped (N, 1, ..., 1)."""
        key = (name, like.device)
        if key not in self._on_device:
            table = getattr(self, name)
            # MPS has no float64; every other device keeps the float64 table and casts after indexing.
            self._on_device[key] = (table.float() if like.device.type == "mps" else table).to(like.device)
        return self._on_device[key][i.to(like.device)].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
        """x_i ~ q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I) (Ho et al. eq. 4)."""
        return self._at("sqrt_alphas_cumprod", i, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", i, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{i-1} | x_i, x_0) (Ho et al. eq. 6-7)."""
        mean = self._at("posterior_mean_coef1", i, x_t) * x0 + self._at("posterior_mean_coef2", i, x_t) * x_t
        var = self._at("posterior_variance", i, x_t).expand_as(x_t)
        return mean, var, self._at("posterior_log_variance_clipped", i, x_t).expand_as(x_t)

    def p_mean_variance(self, out: Tensor, x_t: Tensor, i: Tensor) -> PMeanVar:
        """p(x_{i-1} | x_i) from a raw network output (eps, then v with learn_sigma); x0_hat unclipped as in DiT."""
        c = x_t.shape[1]
        out = out.to(x_t.dtype)
        eps = out[:, :c]
        if self.learn_sigma:
            if out.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma needs {2 * c} output channels (eps, v), the network gave {out.shape[1]}")
            # Learned range (IDDPM eq. 15): v = -1 -> beta~_t (clipped), v = +1 -> beta_t, linear in log space.
            frac = (out[:, c:] + 1.0) / 2.0
            log_var = frac * self._at("log_betas", i, x_t) + (1.0 - frac) * self._at(
                "posterior_log_variance_clipped", i, x_t
            )
        else:
            log_var = self._at("fixed_log_variance", i, x_t).expand_as(x_t)
        # x_0 from eps (Ho et al. eq. 15), then the posterior mean at that x_0 (eq. 7).
        pred_x0 = (
            self._at("sqrt_recip_alphas_cumprod", i, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", i, x_t) * eps
        )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, i)
        return PMeanVar(mean, log_var.exp(), log_var, pred_x0, eps)

    def vb_term(self, out: Tensor, x0: Tensor, x_t: Tensor, i: Tensor) -> Tensor:
        """Per-sample VB term in bits/dim: KL to the posterior, the decoder NLL at i = 0 (IDDPM eq. 4-6)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, i)
        p = self.p_mean_variance(out, x_t, i)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / math.log(2.0)
        return torch.where(i == 0, nll, kl)

    def ddpm_step(self, out: Tensor, x: Tensor, i: Tensor, randn: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """Ancestral step x_i -> x_{i-1} ~ p(x_{i-1} | x_i) (Ho et al. Alg. 2); the last step adds no noise."""
        p = self.p_mean_variance(out, x, i)
        nonzero = (i != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return p.mean + nonzero * (0.5 * p.log_variance).exp() * randn(), p.pred_x0

    def ddim_step(
        self, out: Tensor, x: Tensor, i: Tensor, randn: Callable[[], Tensor], eta: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """DDIM step x_i -> x_{i-1} (Song et al. 2021 eq. 12), sigma = eta * eq. 16; eta = 0 is deterministic."""
        p = self.p_mean_variance(out, x, i)
        abar, abar_prev = self._at("alphas_cumprod", i, x), self._at("alphas_cumprod_prev", i, x)
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x_prev = abar_prev.sqrt() * p.pred_x0 + (1 - abar_prev - sigma**2).sqrt() * p.eps
        return (x_prev + sigma * randn() if eta > 0 else x_prev), p.pred_x0

    def _call(self, model_fn: ModelFn, x: Tensor, k: int, cond: Cond, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Chain index k as a batch, and the network output at original step timestep_map[k] (float64 state)."""
        i = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        step = float(self.timestep_map[k])  # a host value: the time is filled on the device, guidance tested here
        t = torch.full((x.shape[0],), step, dtype=torch.float64, device=x.device)
        return i, model_fn(x.to(dtype), t, cond, t_guide=step).to(torch.float64)

    @torch.no_grad()
    def sample_loop(self, model_fn: ModelFn, x_T: Tensor, cond: Cond, step, *, generator=None, callback=None) -> Tensor:
        """Run `step` (ddpm_step / ddim_step) from x_T at the noisiest index down to x_0; state kept in float64;
        `model_fn(x, t, cond, t_guide)` also gets the step as a host float (gen.sampling.guidance.with_cfg).

        `callback(dict(i, t, x, denoised))` gets the state after the i-th step (0-based), which read network step t.
        """
        x = x_T.to(torch.float64)

        def randn() -> Tensor:
            # Drawn in the caller's dtype (as DiT draws float32 noise), from the explicit generator.
            return draw_noise(x.shape, generator, device=x.device, dtype=x_T.dtype).to(torch.float64)

        for n, k in enumerate(reversed(range(self.num_timesteps))):
            i, out = self._call(model_fn, x, k, cond, x_T.dtype)
            x, pred_x0 = step(out, x, i, randn)
            if callback is not None:
                callback({"i": n, "t": int(self.timestep_map[k]), "x": x, "denoised": pred_x0})
        return x.to(x_T.dtype)

    @torch.no_grad()
    def reverse_loop(self, model_fn: ModelFn, x0: Tensor, cond: Cond, *, callback=None) -> Tensor:
        """Deterministic DDIM inversion (eta = 0): data x0 -> x at the noisiest index, which DDIM maps back."""
        x = x0.to(torch.float64)
        c = x.shape[1]
        for k in range(self.num_timesteps):
            # Step k moves abar_prev[k] -> abar[k] with eps read at the level x is at (index k-1; index 0 for the data).
            _, out = self._call(model_fn, x, max(k - 1, 0), cond, x0.dtype)
            eps = out[:, :c]
            abar_from, abar_to = float(self.alphas_cumprod_prev[k]), float(self.alphas_cumprod[k])
            pred_x0 = (x - math.sqrt(1 - abar_from) * eps) / math.sqrt(abar_from)
            x = math.sqrt(abar_to) * pred_x0 + math.sqrt(1 - abar_to) * eps
            if callback is not None:
                callback({"i": k, "t": int(self.timestep_map[k]), "x": x, "denoised": pred_x0})
        return x.to(x0.dtype)


@dataclass
class DDPMConfig(ComponentConfig):
    """DiT's discrete Gaussian diffusion (IDDPM's learned-range variance and hybrid loss)."""

    num_timesteps: int = 1000
    """Length T of the diffusion chain (linear betas 1e-4..0.02, scaled by 1000/T)."""
    beta_schedule: str = "linear"
    """Betas: linear (Ho et al., DiT) or cosine (IDDPM eq. 17)."""

    def validate(self, cfg) -> None:
        """A positive chain length and a registered schedule."""
        in_range("objective.ddpm.num_timesteps", self.num_timesteps, 2)
        check(self.beta_schedule in BETA_SCHEDULES, "objective.ddpm.beta_schedule", f"one of {sorted(BETA_SCHEDULES)}")
        top = float(BETA_SCHEDULES[self.beta_schedule](self.num_timesteps).max())
        check(top <= 1.0, "objective.ddpm.num_timesteps",  # linear: betas scaled by 1000/T reach 0.02 * 1000/T
              f"{self.num_timesteps} steps push the {self.beta_schedule} betas to {top:g} > 1; use at least 20 steps "
              f"or objective.ddpm.beta_schedule=cosine")


class DDPMObjective(DiffusionChain, Objective):
    """DiT's training objective and samplers: the full T-step chain plus eps-MSE + VB loss, DDPM/DDIM sampling."""

    KEY = "ddpm"
    Config = DDPMConfig
    LATENT_KINDS = ("continuous",)

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        learn_sigma: bool = True,
        label_dropout: float = 0.1,
        null_class: int | None = None,
    ):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose from {sorted(BETA_SCHEDULES)}")
        DiffusionChain.__init__(self, BETA_SCHEDULES[beta_schedule](num_timesteps), learn_sigma=learn_sigma)
        Objective.__init__(self, Conditioning(null_class, label_dropout))  # null_class None: unconditional, no CFG
        self._spaced: dict[str, DiffusionChain] = {}

    def respace(self, section_counts: int | str) -> DiffusionChain:
        """The chain on `space_timesteps(T, section_counts)`: beta_i = 1 - abar_{s_i} / abar_{s_(i-1)} (IDDPM 4)."""
        key = str(section_counts)
        if key not in self._spaced:
            keep = torch.tensor(space_timesteps(self.num_timesteps, key))
            abar = self.alphas_cumprod[keep]
            betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
            self._spaced[key] = DiffusionChain(
                betas, timestep_map=self.timestep_map[keep], learn_sigma=self.learn_sigma
            )
        return self._spaced[key]

    SAMPLERS = {"ddpm": "ancestral sampling on the respaced chain", "ddim": "DDIM with eta"}

    @classmethod
    def from_config(cls, cfg, model) -> DDPMObjective:
        """From cfg.objective.ddpm and cfg.cond, for `model` (its null class and variance head)."""
        o = cfg.objective.ddpm
        return cls(num_timesteps=o.num_timesteps, beta_schedule=o.beta_schedule, learn_sigma=model.learn_sigma,
                   label_dropout=cfg.cond.label_dropout, null_class=model.null_class)

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n integer steps, uniform over the full chain."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def sample_options(self, scfg) -> dict:
        """`sample` keyword arguments from a gen.config.SamplerConfig."""
        return {"sampler": scfg.sampler, "num_steps": scfg.num_steps, "eta": scfg.eta, "cfg_scale": scfg.cfg_scale,
                "cfg_interval": tuple(scfg.cfg_interval)}

    def noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x0) at integer steps t with the given noise (the loss and SRA's teacher input)."""
        return self.q_sample(x0, t.to(x0.device).long(), noise)

    def teacher_view(self, x0: Tensor, t: Tensor, noise: Tensor, u: Tensor, t_max: float) -> tuple[Tensor, Tensor]:
        """SRA's teacher input on integer steps, as vvvvvjdy/SRA DiT-SRA (train.py, gaussian_diffusion.py
        training_losses): t_t = clamp(t - k, 1, T - 1) with k = randint(0, K), K = int(T t_max), here
        k = floor(u K), uniform on {0, ..., K - 1} for u ~ U[0, 1). The clamp's lower end is 1, so a student at
        t = 0 gets a teacher at step 1. K = 0 (t_max < 1 / T) means k = 0 (the reference's randint refuses it).
        Same x0 and noise."""
        steps = self.num_timesteps
        span = int(steps * t_max)  # the reference's int(diffusion.num_timesteps * args.t_max)
        k = torch.floor(u.double().to(t.device) * span).clamp(0, max(span - 1, 0)).long()
        t_t = (t.long() - k).clamp(1, steps - 1)
        return self.noised(x0, t_t, noise), t_t

    def compute_loss(self, model, x0: Tensor, cond: Cond, *, taps: tuple[int, ...], t: Tensor,
                     noise: Tensor) -> LossOutput:
        """Per-sample L_simple (eps MSE) + L_vb on the detached mean (IDDPM L_hybrid as DiT trains it)."""
        t = t.to(x0.device).long()
        x_t = self.noised(x0, t, noise)
        res = self.call(model, x_t, t, cond, taps=taps)
        out = res.out.to(torch.promote_types(x0.dtype, torch.float32))  # bf16 autocast output -> fp32 loss
        eps = out[:, : x0.shape[1]]
        mse = mean_flat((noise - eps) ** 2)
        logs = {"mse": mse.detach()}
        loss = mse
        if self.learn_sigma:
            # The VB term sees the eps prediction detached, so it trains only v (IDDPM Sec. 3.1). DiT's loss type
            # is plain MSE, so L_vb is not rescaled by T/1000; with T = 1000 this is lambda = 1e-3 of IDDPM eq. 16.
            vb = self.vb_term(torch.cat([eps.detach(), out[:, x0.shape[1]:]], dim=1), x0, x_t, t)
            logs["vb"] = vb.detach()
            loss = mse + vb
        return LossOutput(loss=loss, x_t=x_t, t=t, noise=noise, cond=cond, feats=res.feats, logs=logs)

    def _guided(self, model_fn: ModelFn, channels: int, cfg_scale: float, cfg_interval) -> ModelFn:
        """CFG on the eps channels only (all of them, not DiT models.py forward_with_cfg's 3 of 4), the interval
        mapped to integer steps; the result takes the chain's host time as `t_guide` (no device read per step)."""
        if cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("cfg_scale != 1 needs the objective's null_class (the model's unconditional label)")
        lo, hi = cfg_interval
        # The interval is a fraction of the chain, t / T; the network's time is the original integer step.
        interval = (lo * self.num_timesteps, hi * self.num_timesteps)
        return with_cfg(model_fn, cfg_scale, self.cond, interval, channels=channels)

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        cond,
        *,
        sampler: str = "ddpm",
        num_steps: int | str = 250,
        eta: float = 0.0,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None,
        callback=None,
    ) -> Tensor:
        """Samples from x_T = `noise` on the respaced chain: "ddpm" (ancestral, unclipped, as DiT) or "ddim" (eta)."""
        chain = self.respace(num_steps)
        steps = {"ddpm": chain.ddpm_step, "ddim": partial(chain.ddim_step, eta=eta)}
        if sampler not in steps:
            raise ValueError(f"unknown DDPM sampler {sampler!r}; choose from {sorted(steps)}")
        fn = self._guided(model_fn, noise.shape[1], cfg_scale, cfg_interval)
        return chain.sample_loop(fn, noise, as_cond(cond), steps[sampler], generator=generator, callback=callback)

    def ddim_reverse(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        cond,
        *,
        num_steps: int | str = 250,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        callback=None,
    ) -> Tensor:
        """DDIM inversion x0 -> x_T on the respaced chain; `sample(..., sampler="ddim")` on that chain maps it back."""
        fn = self._guided(model_fn, x0.shape[1], cfg_scale, cfg_interval)
        return self.respace(num_steps).reverse_loop(fn, x0, as_cond(cond), callback=callback)
