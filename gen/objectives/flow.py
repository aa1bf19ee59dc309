"""Flow-matching objectives on interpolant paths x_t = alpha_t x + sigma_t eps (SiT, REPA).

Time convention (REPA loss.py / samplers.py): t = 0 is data, t = 1 is noise, sampling integrates t from 1 to 0.
SiT's time is
s = 1 - t and its velocity is -v. One path object gives alpha, sigma and their t-derivatives to both the loss and
the samplers; every conversion between predictions goes through the 2x2 system

    x_t = a x + s eps,    v = a' x + s' eps,    det = a s' - s a',

so velocity -> (data, noise, score) divides only by det (and sigma for the score) and stays exact wherever the path
is regular. Noise or score -> velocity has to divide by alpha: that is why SiT trains and samples those predictions
away from t = 1 on the linear and cosine paths (whose alpha vanishes there).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gen.cond import Cond, Conditioning, as_cond
from gen.config import ComponentConfig, check
from gen.objectives.base import LossOutput, Objective, mean_flat
from gen.sampling.guidance import with_cfg
from gen.sampling.noise import Generators
from gen.sampling.solvers import HEUN_GUIDANCE, ode_grid, sample_euler, sample_euler_maruyama, sample_heun, sde_grid


class Coefficients(NamedTuple):
    """alpha_t, sigma_t and their derivatives d/dt, broadcastable against x."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @property
    def det(self) -> Tensor:
        """Determinant a s' - s a' of the map (x, eps) -> (x_t, v)."""
        return self.alpha * self.d_sigma - self.sigma * self.d_alpha


# prediction -> (x, eps) given (prediction, x_t, coefficients); the inverse of _FROM_DATA_NOISE.
_TO_DATA_NOISE: dict[str, Callable] = {
    "velocity": lambda v, x_t, c: ((c.d_sigma * x_t - c.sigma * v) / c.det, (c.alpha * v - c.d_alpha * x_t) / c.det),
    "noise": lambda e, x_t, c: ((x_t - c.sigma * e) / c.alpha, e),
    # score of p(x_t | x) = -eps / sigma (SiT transport.py get_score)
    "score": lambda s, x_t, c: ((x_t + c.sigma**2 * s) / c.alpha, -c.sigma * s),
    "data": lambda x, x_t, c: (x, (x_t - c.alpha * x) / c.sigma),
}
_FROM_DATA_NOISE: dict[str, Callable] = {
    "velocity": lambda x, e, c: c.d_alpha * x + c.d_sigma * e,
    "noise": lambda x, e, c: e,
    "score": lambda x, e, c: -e / c.sigma,
    "data": lambda x, e, c: x,
}


class Path(ABC):
    """An interpolant x_t = alpha_t x + sigma_t eps on t in [0, 1]; subclasses give `_coefficients` in float64."""

    name: str = ""

    @abstractmethod
    def _coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, d_alpha, d_sigma) elementwise on a float64 tensor t."""

    def coefficients(self, t: Tensor, x: Tensor | None = None) -> Coefficients:
        """(alpha, sigma, d_alpha, d_sigma) at t (N,), shaped (N, 1, ..., 1) like x and in x's float dtype."""
        if x is None:
            return Coefficients(*self._coefficients(torch.as_tensor(t).to(torch.float64)))
        return self._broadcast(t, x.dim(), torch.promote_types(x.dtype, torch.float32), x.device)

    def _broadcast(self, t: Tensor, ndim: int, dtype: torch.dtype, device) -> Coefficients:
        """Coefficients computed in float64 (VP's 1 - alpha^2 cancels near t = 0), then shaped and cast."""
        coeffs = self._coefficients(torch.as_tensor(t).to(torch.float64))
        shape = (-1,) + (1,) * (ndim - 1)
        return Coefficients(*(c.to(device=device, dtype=dtype).reshape(shape) for c in coeffs))

    def drift_variance(self, t: Tensor, x: Tensor | None = None) -> Tensor:
        """SiT's drift variance Lambda_t = sigma det / alpha (path.py compute_drift with s = 1 - t); weights use it."""
        c = self.coefficients(t, x)
        return c.sigma * c.det / c.alpha

    def convert(self, pred: Tensor, x_t: Tensor, t: Tensor, src: str, dst: str) -> Tensor:
        """Turn a `src` prediction at (x_t, t) into a `dst` one; kinds: velocity, noise, score, data."""
        for kind in (src, dst):
            if kind not in _FROM_DATA_NOISE:
                raise ValueError(f"unknown prediction kind {kind!r}; choose from {sorted(_FROM_DATA_NOISE)}")
        if src == dst:
            return pred
        dtype = torch.promote_types(torch.promote_types(pred.dtype, x_t.dtype), torch.float32)
        c = self._broadcast(t, pred.dim(), dtype, pred.device)
        return _FROM_DATA_NOISE[dst](*_TO_DATA_NOISE[src](pred, x_t, c), c)


class LinearPath(Path):
    """Rectified-flow / SiT "Linear": alpha = 1 - t, sigma = t."""

    name = "linear"

    def _coefficients(self, t):
        """Straight line from data to noise; constant derivatives."""
        one = torch.ones_like(t)
        return 1 - t, t, -one, one


class CosinePath(Path):
    """SiT "GVP" in our time: alpha = cos(pi t / 2), sigma = sin(pi t / 2) (alpha^2 + sigma^2 = 1)."""

    name = "cosine"

    def _coefficients(self, t):
        """Quarter circle; derivatives carry the factor pi / 2."""
        half_pi = math.pi / 2
        cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
        return cos, sin, -half_pi * sin, half_pi * cos


class VPPath(Path):
    """SiT "VP": alpha = exp(m), m = -t^2 (smax - smin) / 4 - t smin / 2, sigma = sqrt(1 - alpha^2)."""

    name = "vp"

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _coefficients(self, t):
        """m' = -beta_t / 2 with beta_t = smin + t (smax - smin); sigma' = -alpha alpha' / sigma."""
        span = self.sigma_max - self.sigma_min
        log_alpha = -0.25 * t**2 * span - 0.5 * t * self.sigma_min
        d_log_alpha = -0.5 * t * span - 0.5 * self.sigma_min
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))
        d_alpha = alpha * d_log_alpha
        return alpha, sigma, d_alpha, -alpha * d_alpha / sigma


PATHS: dict[str, type[Path]] = {"linear": LinearPath, "cosine": CosinePath, "vp": VPPath}


# Loss weights for noise / score predictions (SiT transport.py training_losses), from Lambda and sigma.
WEIGHTINGS: dict[str, Callable[[Tensor, Tensor], Tensor | float]] = {
    "none": lambda lam, sigma: 1.0,
    "velocity": lambda lam, sigma: (lam / sigma) ** 2,
    "likelihood": lambda lam, sigma: lam / sigma**2,
}

# Lognormal times (REPA loss.py): r = exp(N(0, 1)) is the noise-to-signal ratio sigma_t / alpha_t, mapped to the t
# with that ratio in closed form. REPA defines it for these two paths only.
_TIME_AT_RATIO: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda log_r: torch.sigmoid(log_r),  # t / (1 - t) = r  <=>  t = r / (1 + r) = sigmoid(log r)
    "cosine": lambda log_r: (2 / math.pi) * torch.atan(torch.exp(log_r)),  # tan(pi t / 2) = r
}


def _uniform_time(n: int, path: Path, t_range: tuple[float, float], device, generator=None) -> Tensor:
    """t ~ U(t_min, t_max) per sample (SiT, REPA paper default)."""
    lo, hi = t_range
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def _lognormal_time(n: int, path: Path, t_range: tuple[float, float], device, generator=None) -> Tensor:
    """t with sigma_t / alpha_t = exp(N(0, 1)): logit-normal(0, 1) on the linear path (REPA loss.py, issue #30)."""
    if path.name not in _TIME_AT_RATIO:
        raise ValueError(f"time_sampler 'lognormal' is defined for paths {sorted(_TIME_AT_RATIO)} (REPA loss.py), "
                         f"not {path.name!r}; use time_sampler='uniform'")
    log_r = torch.randn(n, device=device, generator=generator)
    return _TIME_AT_RATIO[path.name](log_r).clamp(*t_range)


TIME_SAMPLERS: dict[str, Callable[..., Tensor]] = {"uniform": _uniform_time, "lognormal": _lognormal_time}


@dataclass(frozen=True)
class FlowSampler:
    """A solver with the time grid it runs on and its default number of steps."""

    solver: Callable
    grid: Callable[[int, tuple[float, float]], Tensor]  # (num_steps, (t_min, t_max)) -> decreasing float64 times
    default_steps: int
    stochastic: bool = False  # takes path= and generator=


def _ode_grid(num_steps: int, t_range: tuple[float, float]) -> Tensor:
    """Uniform grid over the sampling range, noise end first."""
    return ode_grid(num_steps, t_max=t_range[1], t_min=t_range[0])


def _sde_grid(num_steps: int, t_range: tuple[float, float]) -> Tensor:
    """REPA's grid ending with a mean step 0.04 -> 0; no network call happens at t = 0, so t_min is not needed."""
    return sde_grid(num_steps, t_max=t_range[1])


# Defaults: 50 ODE steps (REPA previews / generate.py), 250 SDE steps (REPA FID protocol: README generate.py
# --mode=sde --num-steps=250).
SAMPLERS: dict[str, FlowSampler] = {
    "euler": FlowSampler(sample_euler, _ode_grid, 50),
    "heun": FlowSampler(sample_heun, _ode_grid, 50),
    "euler_maruyama": FlowSampler(sample_euler_maruyama, _sde_grid, 250, stochastic=True),
}

# Regression error per prediction (SiT transport.py training_losses): velocity |v_hat - v|^2, noise |eps_hat - eps|^2,
# score |s_hat sigma + eps|^2 (the score target is -eps / sigma).
_ERRORS: dict[str, Callable[[Tensor, Tensor, Tensor, Coefficients], Tensor]] = {
    "velocity": lambda pred, x0, noise, c: pred - (c.d_alpha * x0 + c.d_sigma * noise),
    "noise": lambda pred, x0, noise, c: pred - noise,
    "score": lambda pred, x0, noise, c: pred * c.sigma + noise,
}


def _choose(registry, key: str, what: str):
    """registry[key], or a ValueError naming the choices."""
    if key not in registry:
        raise ValueError(f"unknown {what} {key!r}; choose from {sorted(registry)}")
    return registry[key]


@dataclass
class FlowConfig(ComponentConfig):
    """Flow matching on interpolant paths (SiT transport, REPA loss.py)."""

    path: str = "linear"
    """Interpolant: linear, cosine or vp (t = 0 data, t = 1 noise)."""
    prediction: str = "velocity"
    """Network target: velocity, noise or score."""
    weighting: str = "none"
    """Loss weighting for noise/score predictions: none, velocity or likelihood."""
    time_sampler: str = "uniform"
    """Training time distribution: uniform or lognormal."""

    def validate(self, cfg) -> None:
        """Registered choices, combinations SiT's transport allows, and Heun's guidance rule (a flow sampler)."""
        for key, table in (("path", PATHS), ("prediction", _ERRORS), ("weighting", WEIGHTINGS),
                           ("time_sampler", TIME_SAMPLERS)):
            check(getattr(self, key) in table, f"objective.flow.{key}", f"one of {sorted(table)}")
        check(self.prediction != "velocity" or self.weighting == "none", "objective.flow.weighting",
              "applies to noise/score predictions only (SiT transport.py); use none with prediction=velocity")
        check(self.time_sampler != "lognormal" or self.path in _TIME_AT_RATIO, "objective.flow.time_sampler",
              f"lognormal is defined for paths {sorted(_TIME_AT_RATIO)} (REPA loss.py); use uniform")
        check(cfg.sampler.heun_guidance in HEUN_GUIDANCE, "sampler.heun_guidance", f"one of {', '.join(HEUN_GUIDANCE)}")
        check(cfg.sampler.eta == 0.0, "sampler.eta", "is DDIM's stochasticity; flow samplers take none (set it to 0)")


class FlowObjective(Objective):
    """Flow matching on an interpolant path with velocity, noise or score prediction (SiT transport, REPA loss.py)."""

    KEY = "flow"
    Config = FlowConfig
    LATENT_KINDS = ("continuous",)

    def __init__(self, path: str = "linear", prediction: str = "velocity", weighting: str = "none",
                 time_sampler: str = "uniform", label_dropout: float = 0.1, null_class: int | None = None,
                 train_eps: float | None = None, sample_eps: float | None = None):
        self.path = _choose(PATHS, path, "path")()
        self.error = _choose(_ERRORS, prediction, "prediction")
        self.prediction = prediction
        self.weighting = _choose(WEIGHTINGS, weighting, "weighting")
        if prediction == "velocity" and weighting != "none":
            raise ValueError(f"weighting={weighting!r} applies to noise/score predictions only (SiT transport.py); "
                             "use weighting='none' with prediction='velocity'")
        self.time_sampler = _choose(TIME_SAMPLERS, time_sampler, "time_sampler")
        # Fail at construction rather than at the first step (private generator: the global RNG is untouched).
        self.time_sampler(1, self.path, (0.0, 1.0), "cpu", torch.Generator().manual_seed(0))
        # null_class None = unconditional model: labels pass through unchanged and cfg_scale must stay 1.
        super().__init__(Conditioning(null_class, label_dropout))
        self.train_range = self._time_range(train_eps, 1e-5 if path == "vp" else 1e-3)
        self.sample_range = self._time_range(sample_eps, 1e-3)

    def _time_range(self, eps: float | None, default_eps: float) -> tuple[float, float]:
        """(t_min, t_max) for training or sampling, after SiT create_transport / check_interval."""
        # VP clips only the data end (SiT: s <= 1 - eps); noise/score clip both ends on linear/cosine (alpha = 0 at
        # t = 1); velocity on linear/cosine is regular on [0, 1] unless an eps is given.
        if self.path.name == "vp":
            return (default_eps if eps is None else eps, 1.0)
        if eps is None:
            eps = 0.0 if self.prediction == "velocity" else default_eps
        return (eps, 1.0 - eps)

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n training times (float32) from the time sampler, inside the training range."""
        return self.time_sampler(n, self.path, self.train_range, device, generator)

    SAMPLERS = SAMPLERS

    @classmethod
    def from_config(cls, cfg, model) -> FlowObjective:
        """From cfg.objective.flow and cfg.cond, for `model` (its null class)."""
        o = cfg.objective.flow
        return cls(path=o.path, prediction=o.prediction, weighting=o.weighting, time_sampler=o.time_sampler,
                   label_dropout=cfg.cond.label_dropout, null_class=model.null_class)

    def noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise on the path (the loss and SRA's teacher input)."""
        c = self.path.coefficients(t, x0)
        return c.alpha * x0 + c.sigma * noise

    def teacher_view(self, x0: Tensor, t: Tensor, noise: Tensor, u: Tensor, t_max: float) -> tuple[Tensor, Tensor]:
        """SRA's teacher input: the same x0 and noise at t_t = clamp(t - u t_max, 0, 1) (SRA paper, method section;
        vvvvvjdy/SRA SiT-SRA/loss.py)."""
        t_t = (t - u.to(t.dtype) * t_max).clamp(0.0, 1.0)
        return self.noised(x0, t_t, noise), t_t

    def compute_loss(self, model, x0: Tensor, cond: Cond, *, taps: tuple[int, ...], t: Tensor,
                     noise: Tensor) -> LossOutput:
        """Per-sample flow-matching loss: mean over non-batch dims of the (weighted) squared error."""
        c = self.path.coefficients(t, x0)
        x_t = self.noised(x0, t, noise)
        out = self.call(model, x_t, t, cond, taps=taps)
        pred = out.out[:, : x0.shape[1]]  # a learn_sigma head's extra channels are ignored
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # bf16 autocast output -> fp32 loss
        # Weights (noise/score only): Lambda_t = sigma det / alpha is SiT's drift variance (Path.drift_variance).
        weight = self.weighting(c.sigma * c.det / c.alpha, c.sigma)
        err = self.error(pred, x0, noise, c)
        return LossOutput(loss=mean_flat(weight * err**2), x_t=x_t, t=t, noise=noise, cond=cond, feats=dict(out.feats))

    def sample_options(self, scfg) -> dict:
        """`sample` keyword arguments from a gen.config.SamplerConfig (sampler, steps, CFG scale and interval, and
        Heun's guidance rule)."""
        if scfg.eta != 0.0:
            raise ValueError(f"sampler.eta={scfg.eta} is DDIM's stochasticity; flow samplers take no eta (set it to 0)")
        options = {"sampler": scfg.sampler, "num_steps": scfg.num_steps, "cfg_scale": scfg.cfg_scale,
                   "cfg_interval": tuple(scfg.cfg_interval)}
        if scfg.sampler == "heun":
            options["guidance"] = scfg.heun_guidance
        return options

    def sample(self, model_fn: Callable, noise: Tensor, cond, *, sampler: str = "euler_maruyama",
               num_steps: int | None = None, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               generator: Generators = None, callback: Callable | None = None,
               **sampler_specific) -> Tensor:
        """Integrate `noise` from t_max to data with CFG (all channels) and the chosen sampler (generator: SDE only)."""
        spec = _choose(SAMPLERS, sampler, "sampler")
        if cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("cfg_scale != 1 needs null_class (the model was built without an unconditional label)")
        guided = with_cfg(model_fn, cfg_scale, self.cond, cfg_interval)
        channels = noise.shape[1]

        def velocity_fn(x: Tensor, t: Tensor, cond: Cond, t_guide: float | None = None) -> Tensor:
            """Guided prediction turned into the velocity dx/dt (in float64 when a conversion is needed); `t_guide`:
            the host time the guidance interval is judged at (gen.sampling.solvers, HEUN_GUIDANCE)."""
            pred = guided(x, t, cond, t_guide=t_guide)[:, :channels]
            if self.prediction == "velocity":
                return pred
            return self.path.convert(pred.double(), x.double(), t, self.prediction, "velocity")

        ts = spec.grid(spec.default_steps if num_steps is None else num_steps, self.sample_range)
        if spec.stochastic:
            sampler_specific = dict(path=self.path, generator=generator, **sampler_specific)
        return spec.solver(velocity_fn, noise, ts, extra_args={"cond": as_cond(cond)}, callback=callback,
                           **sampler_specific)
