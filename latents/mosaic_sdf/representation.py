"""The Mosaic-SDF representation and its global SDF (Yariv et al., "Mosaic-SDF for 3D Generative Models", CVPR 2024,
arXiv 2312.09222, the representation section: n local k^3 SDF grids blended by a partition of unity).

Grid i has centre p_i (3), half side s_i > 0 (the cube is p_i + s_i [-1, 1]^3) and values V_i (k, k, k) sampled at
the lattice nodes p_i + s_i g, g in G = {-1, -1 + 2/(k-1), ..., 1}^3 with 'ij' indexing: V_i[a, b, c] is the value at
(g_a, g_b, g_c). The SDF is negative inside. A token (row) is [p_x, p_y, p_z, s, V flattened in C order over
(a, b, c)], width 4 + k^3.

The global SDF blends the grids whose cubes contain x with the tent weights w_i(x) = ReLU(1 - |x - p_i|_inf / s_i),
normalised to sum to one; it is undefined outside the union of the cubes, which the `covered` mask reports. The exact
weight form is this implementation's reading of the paper's partition of unity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HEAD = 4
"""Columns of a token before the SDF values: centre (3) and half side (1)."""


def token_width(k: int) -> int:
    """Width 4 + k^3 of a token of a Mosaic-SDF with k^3 grids."""
    return HEAD + k ** 3


def grid_size(width: int) -> int:
    """k of a token width 4 + k^3 (ValueError if the width is not of that form)."""
    k = round((width - HEAD) ** (1.0 / 3.0))
    if k < 2 or HEAD + k ** 3 != width:
        raise ValueError(f"a Mosaic-SDF token has 4 + k^3 columns (k >= 2); got width {width}")
    return k


def lattice(k: int, dtype=torch.float32, device=None) -> Tensor:
    """The local lattice nodes G as (k, k, k, 3), 'ij' indexing: [a, b, c] -> (g_a, g_b, g_c)."""
    g = torch.linspace(-1.0, 1.0, k, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1)


def local_terms(u: Tensor, values: Tensor, k: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Tent weight and trilinear value of grids at points given in their local coordinates.

    u: (..., 3) = (x - p) / s for a (point, grid) pair; values: the pair's grid values flattened, (..., k^3)
    broadcastable to u's leading shape, or with `rows` (u's leading shape, long) the table (n, k^3) of all grids and
    each pair's grid in it (the 8 corners are then read from the table: no per-pair copy of a grid). Returns the
    unnormalised weight ReLU(1 - |u|_inf) and the trilinear interpolation of the grid at u (an explicit 8-corner
    gather; meaningful where the weight is positive).
    Differentiable in u and values.
    """
    tent = torch.relu(1.0 - u.abs().amax(dim=-1))
    c = (u.clamp(-1.0, 1.0) + 1.0) * (0.5 * (k - 1))         # continuous lattice index in [0, k - 1]
    i0 = c.detach().floor().clamp(0, k - 2)
    f = c - i0                                                # fractional part, carries the gradient
    i0 = i0.long()
    flat = values.expand(*u.shape[:-1], values.shape[-1]) if rows is None else None
    out = torch.zeros_like(tent)
    for dx in (0, 1):
        wx = f[..., 0] if dx else 1.0 - f[..., 0]
        for dy in (0, 1):
            wy = f[..., 1] if dy else 1.0 - f[..., 1]
            for dz in (0, 1):
                wz = f[..., 2] if dz else 1.0 - f[..., 2]
                idx = ((i0[..., 0] + dx) * k + (i0[..., 1] + dy)) * k + (i0[..., 2] + dz)
                corner = values[rows, idx] if rows is not None else \
                    torch.gather(flat, -1, idx.unsqueeze(-1)).squeeze(-1)
                out = out + wx * wy * wz * corner
    return tent, out


@dataclass
class MosaicSDF:
    """One shape: centres (n, 3), half sides (n,) and values (n, k, k, k), negative inside."""

    centres: Tensor
    scales: Tensor
    values: Tensor

    def __post_init__(self):
        n = self.centres.shape[0]
        if self.centres.shape != (n, 3) or self.scales.shape != (n,) or self.values.shape[0] != n \
                or self.values.dim() != 4 or len(set(self.values.shape[1:])) != 1:
            raise ValueError(f"a Mosaic-SDF needs centres (n, 3), scales (n,), values (n, k, k, k); got "
                             f"{tuple(self.centres.shape)}, {tuple(self.scales.shape)}, {tuple(self.values.shape)}")

    @property
    def n(self) -> int:
        """Number of grids."""
        return self.centres.shape[0]

    @property
    def k(self) -> int:
        """Lattice nodes per axis."""
        return self.values.shape[1]

    def nodes(self) -> Tensor:
        """World positions of every grid's lattice nodes, (n, k, k, k, 3)."""
        g = lattice(self.k, self.centres.dtype, self.centres.device)
        return self.centres[:, None, None, None] + self.scales[:, None, None, None, None] * g

    def to_tokens(self) -> Tensor:
        """The token matrix (n, 4 + k^3): [centre, half side, values in C order]."""
        return torch.cat([self.centres, self.scales[:, None], self.values.reshape(self.n, -1)], dim=1)

    @classmethod
    def from_tokens(cls, tokens: Tensor) -> MosaicSDF:
        """Inverse of to_tokens for one shape's (n, 4 + k^3) matrix."""
        k = grid_size(tokens.shape[-1])
        return cls(tokens[:, :3], tokens[:, 3], tokens[:, HEAD:].reshape(-1, k, k, k))

    def map(self, fn) -> MosaicSDF:
        """The same shape with fn applied to each tensor (e.g. .detach, .double)."""
        return MosaicSDF(fn(self.centres), fn(self.scales), fn(self.values))

    def _pairs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = (x[:, None, :] - self.centres[None]) / self.scales[None, :, None]
        return local_terms(u, self.values.reshape(1, self.n, -1), self.k)

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Blend weights at points x (Q, 3): normalised w (Q, n), zero rows where uncovered, and covered (Q,)."""
        tent = self._pairs(x)[0]
        total = tent.sum(dim=1, keepdim=True)
        covered = total[:, 0] > 0
        return tent / total.clamp_min(torch.finfo(tent.dtype).tiny), covered

    def evaluate(self, x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
        """The global SDF at points x (Q, 3) from the grids that contain each point: (F (Q,), covered (Q,)).

        F is NaN where no cube contains the point (the SDF is undefined there; mask with `covered`).
        Differentiable in x, centres, scales and values; `chunk` points at a time bound the memory. Only the
        (point, grid) pairs whose L-inf distance is below the half side (with a relative slack of 1e-5) are
        interpolated, found without gradient and recomputed with it: the pairs left out have a zero tent weight,
        adding 0 to F and, ReLU's derivative being 0 at 0, 0 to every gradient. So this is the blend over all pairs
        without its (Q, n, k^3) gradient buffers (n = 1024, k = 7: gigabytes per chunk).
        """
        flat = self.values.reshape(self.n, -1)
        outs, masks = [], []
        for part in x.split(chunk):
            with torch.no_grad():  # every pair with tent > 0 (|u|_inf < 1), and a few more on the cube's border
                near = torch.cdist(part, self.centres, p=float("inf")) < self.scales * (1.0 + 1e-5)
                q, g = near.nonzero(as_tuple=True)
            tent, value = local_terms((part[q] - self.centres[g]) / self.scales[g, None], flat, self.k, rows=g)
            total = tent.new_zeros(part.shape[0]).index_add(0, q, tent)
            blended = tent.new_zeros(part.shape[0]).index_add(0, q, tent * value)
            covered = total > 0
            f = blended / total.clamp_min(torch.finfo(tent.dtype).tiny)
            outs.append(torch.where(covered, f, torch.full_like(f, float("nan"))))
            masks.append(covered)
        return torch.cat(outs), torch.cat(masks)

def to_tokens(shapes: list[MosaicSDF]) -> Tensor:
    """Shapes with equal n and k -> a batch of token matrices (B, n, 4 + k^3)."""
    return torch.stack([s.to_tokens() for s in shapes])


def from_tokens(tokens: Tensor) -> list[MosaicSDF]:
    """A batch of token matrices (B, n, 4 + k^3) -> one MosaicSDF per row of the batch."""
    return [MosaicSDF.from_tokens(t) for t in tokens]
