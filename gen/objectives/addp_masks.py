"""ADDP's masking (Tian et al., ICLR 2024, arXiv 2306.05423): the mask-ratio grid, the nested training masks and the
generation schedule (reference ChangyaoTian/ADDP `modeling/utils.py` compute_mask_ratio_probs,
`modeling/encoders/models_addp.py` random_masking, `engine_generate.py` compute_mask_next).

Grid: r_j = cos(pi/2 j / steps), j = 0..steps, in float32 as the reference computes it (torch.arange / steps, then
torch.cos), keeping lo <= r < hi, sorted ascending; P(j) proportional to the pdf of a normal (mu, std) at r_j (the
truncation to [lo, hi] only rescales it, so it cancels in the normalisation). Default: 66 ratios, 0.509 .. 0.9999.

Nested masks, one ratio pair per global batch (every row then has the same counts): i ~ Categorical(P),
i' = min(i + U{1..5}, last); n_t = ceil(L r_i), n_t1 = ceil(L r_i') (float32 products, as np.ceil of the reference's
float32 tensors); with one U(0, 1) score per (row, position), mask_t = the n_t lowest scores of the row and
mask_t1 = the n_t1 lowest, so mask_t is a subset of mask_t1. Exact counts on ties (broken by position); the reference
redraws the scores instead.

Generation: after step s of S, n_s = clip(ceil(L r_s), 1, L) positions stay masked, r_s = cos(pi/2 (s+1)/S)
(cosine) or 1 - (s+1)/S (linear); the clip leaves one soft token after the last step (official), `full_reveal`
makes the last count 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gen.objectives.masked_tokens import lowest


def ratio_grid(steps: int = 100, lo: float = 0.5, hi: float = 1.0, mu: float = 0.55,
               std: float = 0.25) -> tuple[Tensor, Tensor]:
    """(ratios float32 ascending, probabilities float64) of the grid in the module docstring."""
    r = torch.cos(math.pi / 2.0 * (torch.arange(steps + 1) / steps)).clamp(0.0, 1.0)  # float32, descending
    r = r[(r >= lo) & (r < hi)].flip(0)
    if len(r) == 0:
        raise ValueError(f"no grid ratio cos(pi/2 j/{steps}) lies in [{lo}, {hi})")
    density = torch.exp(-0.5 * ((r.double() - mu) / std) ** 2)
    return r, density / density.sum()


def grid_levels(probs: Tensor, u_level: Tensor, u_offset: Tensor) -> tuple[int, int]:
    """(i, i') from two uniforms: i by the inverse CDF of `probs`, i' = min(i + 1 + floor(5 u), last)."""
    cdf = probs.cumsum(0)
    i = min(int(torch.searchsorted(cdf, u_level.double().reshape(1) * cdf[-1]).item()), len(probs) - 1)
    offset = 1 + min(int(math.floor(5 * float(u_offset.reshape(())))), 4)
    return i, min(i + offset, len(probs) - 1)


def nested_masks(ratios: Tensor, i: int, i_next: int, scores: Tensor) -> tuple[Tensor, Tensor]:
    """(mask_t, mask_t1), each (N, L) bool with ceil(L r_i) and ceil(L r_i') positions per row, mask_t within
    mask_t1 (scores (N, L))."""
    n, length = scores.shape
    counts = [int(torch.ceil(length * ratios[k])) for k in (i, i_next)]
    return tuple(lowest(scores, torch.full((n,), c, device=scores.device)) for c in counts)


def generation_counts(length: int, steps: int, schedule: str = "cosine", full_reveal: bool = False) -> list[int]:
    """Masked positions after each of the `steps` generation steps (module docstring)."""
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"unknown schedule {schedule!r}; cosine or linear")
    out = []
    for s in range(steps):
        frac = (s + 1) / steps
        r = math.cos(math.pi / 2.0 * frac) if schedule == "cosine" else 1.0 - frac
        out.append(min(max(math.ceil(length * r), 1), length))
    if full_reveal:
        out[-1] = 0
    return out
