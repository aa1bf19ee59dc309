"""Classifier-free guidance with a guidance interval, and the adapter from a backbone module to `model_fn`."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gen.cond import Cond, Conditioning


def with_cfg(model_fn: Callable, scale: float, conditioning: Conditioning, interval: tuple[float, float] = (0.0, 1.0),
             channels: int | None = None) -> Callable:
    """Wrap `model_fn(x, t, cond)` with classifier-free guidance u + scale * (c - u) inside the t interval; the
    unconditional branch sees `conditioning.null(cond)`.

    As in REPA samplers.py (DiT models.py forward_with_cfg guides 3 of 4 channels): guidance applies to all latent
    channels unless `channels` limits it to the first `channels` (the rest, e.g. DiT's variance outputs, come from
    the conditional branch); the batch is doubled exactly once
    and only for samples whose t lies in [lo, hi] (REPA's guidance interval, Kynkaanniemi et al. 2024); outside it
    only the conditional pass runs. scale == 1 is the conditional model itself. The interval is judged at `t_guide`
    when the caller passes one, else at t; the returned function takes `t_guide` whatever the scale.
    A float `t_guide` is one time for the whole batch known on the host (the flow solvers and the DDPM chain pass
    their grid time; Heun's corrector its step's start time, gen.sampling.solvers.HEUN_GUIDANCE): the interval test
    then reads no device value, so a guided step has no host-device sync. A tensor t / t_guide (per-sample times,
    e.g. masked-token decoding's masked fractions) is tested on the device and read back.
    """
    if scale == 1.0:
        return lambda x, t, cond, t_guide=None: model_fn(x, t, cond)
    lo, hi = interval

    def guided(x: Tensor, t: Tensor, cond: Cond, t_guide: Tensor | float | None = None) -> Tensor:
        """Guided prediction; one network call on the batch plus its in-interval unconditional copies."""
        n = x.shape[0]
        if isinstance(t_guide, float):
            if not lo <= t_guide <= hi:
                return model_fn(x, t, cond)
            sel = slice(None)
        else:
            t_in = t if t_guide is None else t_guide
            inside = (t_in >= lo) & (t_in <= hi)
            if not bool(inside.any()):
                return model_fn(x, t, cond)
            sel = slice(None) if bool(inside.all()) else inside
        out = model_fn(torch.cat([x, x[sel]]), torch.cat([t, t[sel]]), cond.cat(conditioning.null(cond.select(sel))))
        cond, uncond = out[:n], out[n:]
        k = cond.shape[1] if channels is None else channels
        result = cond.clone()
        result[sel, :k] = uncond[:, :k] + scale * (cond[sel, :k] - uncond[:, :k])
        return result

    return guided


def network_fn(model: nn.Module, dtype: torch.dtype | None = None) -> Callable:
    """`model_fn(x, t, cond)` for a backbone: x cast to `dtype` (None keeps x's), t as float32, returns `.out`."""

    def fn(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Raw network output for one batch (float32 t: bf16 cannot represent DDPM's integer 999 exactly)."""
        return model(x if dtype is None else x.to(dtype), t.to(torch.float32), cond).out

    return fn
