"""Flow samplers as pure functions (k-diffusion style) and the time grids they run on.

Time convention (REPA loss.py / samplers.py): t = 1 is noise, t = 0 is data; every sampler integrates t from ts[0]
down to ts[-1].
All samplers share one signature `(model_fn, x_T, ts, *, extra_args=None, callback=None, ...)`, where
`model_fn(x, t, t_guide=..., **extra_args)` returns the velocity dx/dt; `t_guide` is a host float, the time at
which a guidance interval is judged (gen.sampling.guidance.with_cfg, which then needs no device read; a model_fn
without guidance ignores it): the evaluation's own time, except in Heun's corrector (HEUN_GUIDANCE). The
state is kept in float64; the network sees x in x_T's dtype and t as an (N,) float64 vector (`network_fn` casts
it), and its output is cast back to float64 (REPA `samplers.py` does the same). `callback(dict(i=i, t=t, x=x))`
receives the state after step i, now at time t.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from gen.sampling.noise import Generators, randn


def ode_grid(num_steps: int, t_max: float = 1.0, t_min: float = 0.0) -> Tensor:
    """Uniform float64 grid of num_steps + 1 times from t_max down to t_min (Euler and Heun ODE)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(t_max, t_min, num_steps + 1, dtype=torch.float64)


def sde_grid(num_steps: int, last_step: float = 0.04, t_max: float = 1.0) -> Tensor:
    """REPA's SDE grid: num_steps times from t_max down to last_step, then 0 (the final noise-free mean step)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < last_step < t_max:
        raise ValueError(f"last_step must lie in (0, t_max={t_max}), got {last_step}")
    head = torch.linspace(t_max, last_step, num_steps, dtype=torch.float64)
    return torch.cat([head, torch.zeros(1, dtype=torch.float64)])


def repa_diffusion(t: float) -> float:
    """REPA's reverse-SDE diffusion w(t) = 2t: sqrt(2t|dt|) is SiT's sqrt(2 w dt) with w = sigma_t = t (REPA #52)."""
    return 2.0 * t


def _velocity(model_fn: Callable, x: Tensor, t: float, dtype: torch.dtype, extra_args: dict,
              t_guide: float | None = None) -> Tensor:
    """One network evaluation: float64 state in, float64 velocity out; the network runs in `dtype`; guidance is
    judged at the host float `t_guide` (default: t)."""
    t_vec = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    guide = float(t if t_guide is None else t_guide)
    return model_fn(x.to(dtype), t_vec, t_guide=guide, **extra_args).to(torch.float64)


HEUN_GUIDANCE = ("step_start", "each_eval")
"""When Heun's corrector (at t_next) is guided: "step_start", iff its step's start time t lies in the guidance
interval, as its predictor (REPA samplers.py euler_sampler tests t_cur for both); "each_eval", iff t_next does."""


@torch.no_grad()
def sample_euler(model_fn: Callable, x_T: Tensor, ts: Tensor, *, extra_args: dict | None = None,
                 callback: Callable | None = None) -> Tensor:
    """Explicit Euler on the probability-flow ODE; one network evaluation per step (NFE = N)."""
    extra_args = extra_args or {}
    grid = ts.tolist()
    x = x_T.to(torch.float64)
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        x = x + (t_next - t) * _velocity(model_fn, x, t, x_T.dtype, extra_args)
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x})
    return x.to(x_T.dtype)


@torch.no_grad()
def sample_heun(model_fn: Callable, x_T: Tensor, ts: Tensor, *, extra_args: dict | None = None,
                callback: Callable | None = None, guidance: str = "step_start") -> Tensor:
    """Heun (trapezoidal predictor-corrector) ODE; the corrector is skipped on the last step (NFE = 2N - 1, REPA).

    The corrector's `t_guide` is the step's start time ("step_start", REPA) or its own time ("each_eval"); the two
    differ only on a step that straddles an edge of the guidance interval (HEUN_GUIDANCE).
    """
    if guidance not in HEUN_GUIDANCE:
        raise ValueError(f"Heun guidance rule {guidance!r}: choose from {HEUN_GUIDANCE}")
    extra_args = extra_args or {}
    grid = ts.tolist()
    last = len(grid) - 2
    x = x_T.to(torch.float64)
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        dt = t_next - t
        v = _velocity(model_fn, x, t, x_T.dtype, extra_args)
        x_pred = x + dt * v
        if i < last:
            # Skipping the corrector on the last step also keeps the network away from t = 0 exactly.
            t_guide = t if guidance == "step_start" else t_next
            v_next = _velocity(model_fn, x_pred, t_next, x_T.dtype, extra_args, t_guide=t_guide)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_pred
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x})
    return x.to(x_T.dtype)


@torch.no_grad()
def sample_euler_maruyama(model_fn: Callable, x_T: Tensor, ts: Tensor, *, path, diffusion: Callable = repa_diffusion,
                          generator: Generators = None, extra_args: dict | None = None,
                          callback: Callable | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE dx = (v - w/2 s) dt + sqrt(w) dW; the last step is the noise-free mean step.

    The score s comes from the velocity through `path` (exact 2x2 inversion, `Path.convert`), so the sampler needs
    only a velocity model. Noise comes from `generator` (on x_T's device), or from one generator per sample so that
    sample i depends only on its own seed whatever the batch (gen.sampling.noise). NFE = N.
    """
    extra_args = extra_args or {}
    grid = ts.tolist()
    last = len(grid) - 2
    x = x_T.to(torch.float64)
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        dt = t_next - t
        v = _velocity(model_fn, x, t, x_T.dtype, extra_args)
        t_vec = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        score = path.convert(v, x, t_vec, "velocity", "score")
        w = diffusion(t)
        x = x + dt * (v - 0.5 * w * score)
        if i < last:
            xi = randn(x.shape, generator, device=x.device, dtype=torch.float64)
            x = x + math.sqrt(w * abs(dt)) * xi
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x})
    return x.to(x_T.dtype)
