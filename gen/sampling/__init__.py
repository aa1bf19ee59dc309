"""Samplers as pure functions, their time grids, and classifier-free guidance (DESIGN.md 3.3)."""
from gen.sampling.guidance import network_fn, with_cfg
from gen.sampling.solvers import (
    ode_grid,
    repa_diffusion,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sde_grid,
)

__all__ = [
    "network_fn",
    "ode_grid",
    "repa_diffusion",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
    "sde_grid",
    "with_cfg",
]
