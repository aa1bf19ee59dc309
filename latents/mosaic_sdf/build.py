"""Mesh -> Mosaic-SDF: normalisation, farthest-point centres, one common scale, SDF fill, optional fine-tune
(Yariv et al., CVPR 2024, arXiv 2312.09222, Algorithm 1; its section numbers were not checked here).

Choices the paper leaves open are arguments with the defaults of latent.mosaic_sdf.*:
- the box: the bounding box is centred and scaled so that its largest half extent is `margin` (< 1 keeps the
  marching-cubes box of [-1, 1]^3 from clipping the surface);
- the common half side: s = alpha * max_y min_i |y - p_i|_inf over the surface samples y, so with alpha > 1 every
  surface sample lies strictly inside some cube;
- the fine-tune loss: mean |F - SDF| on near-surface points plus lambda * mean |grad F - normal| on surface points.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from latents.mosaic_sdf.representation import MosaicSDF, lattice

SDF = Callable[[Tensor], Tensor]
"""A signed distance function, negative inside: points (P, 3) -> (P,)."""


def check_mesh(mesh, allow_open: bool = False) -> None:
    """Refuse an empty mesh, and unless `allow_open` a mesh that is not watertight (its inside is undefined; with
    `allow_open` the generalised winding number of the mesh SDF decides it, which degrades gracefully with holes)."""
    if mesh.vertices.shape[0] == 0 or mesh.faces.shape[0] == 0:
        raise ValueError("the mesh is empty (no faces); remove the file")
    if not allow_open and not mesh.is_watertight:
        raise ValueError("the mesh is not watertight, so its inside is undefined; repair it (e.g. ManifoldPlus, or "
                         "point-cloud-utils make_mesh_watertight) or set latent.mosaic_sdf.open_meshes=winding")


def normalise_mesh(mesh, margin: float = 0.9, allow_open: bool = False):
    """A copy of the mesh with its bounding box centred at the origin and its largest half extent `margin`.
    Refuses an empty mesh, and unless `allow_open` a mesh that is not watertight (check_mesh)."""
    check_mesh(mesh, allow_open)
    lo, hi = mesh.bounds
    half = float((hi - lo).max()) / 2.0
    if half <= 0:
        raise ValueError("cannot convert a degenerate (zero-extent) mesh to a Mosaic-SDF")
    out = mesh.copy()
    out.apply_translation(-(lo + hi) / 2.0)
    out.apply_scale(margin / half)
    if mesh.is_watertight and out.volume < 0:  # inward-wound: make the faces outward (the winding-number sign)
        out.invert()
    return out


def surface_samples(mesh, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`count` area-uniform points on the mesh and their face normals, float32 (count, 3) each."""
    points, face = mesh.sample(count, return_index=True, seed=seed)
    normals = mesh.face_normals[face]
    return torch.as_tensor(np.asarray(points), dtype=torch.float32), torch.as_tensor(normals, dtype=torch.float32)


def farthest_point_sampling(points: Tensor, n: int, start: int = 0) -> Tensor:
    """Indices (n,) of n points picked greedily, each the farthest (L2) from those already picked, from `start`."""
    if n > points.shape[0]:
        raise ValueError(f"cannot pick {n} farthest points from {points.shape[0]}")
    picked = torch.empty(n, dtype=torch.long, device=points.device)
    dist = torch.full((points.shape[0],), float("inf"), dtype=points.dtype, device=points.device)
    current = start
    for i in range(n):
        picked[i] = current
        dist = torch.minimum(dist, ((points - points[current]) ** 2).sum(-1))
        current = int(dist.argmax())
    return picked


def common_scale(surface: Tensor, centres: Tensor, alpha: float = 1.5, chunk: int = 8192) -> float:
    """alpha * max over surface points of the L-inf distance to the nearest centre: one half side for all grids."""
    worst = 0.0
    for part in surface.split(chunk):
        near = (part[:, None, :] - centres[None]).abs().amax(-1).amin(-1)
        worst = max(worst, float(near.max()))
    return alpha * worst


def fill(centres: Tensor, scale: float, k: int, sdf: SDF) -> MosaicSDF:
    """A Mosaic-SDF with the given centres, one half side and the SDF's values at every lattice node."""
    n = centres.shape[0]
    scales = torch.full((n,), float(scale), dtype=centres.dtype, device=centres.device)
    nodes = centres[:, None, None, None] + scales[:, None, None, None, None] * lattice(k, centres.dtype, centres.device)
    values = sdf(nodes.reshape(-1, 3)).reshape(n, k, k, k).to(centres.dtype)
    return MosaicSDF(centres, scales, values)


def from_sdf(sdf: SDF, surface: Tensor, n: int, k: int, alpha: float = 1.5) -> MosaicSDF:
    """The initial Mosaic-SDF of a shape given its SDF and a dense surface sample (P, 3): n farthest-point centres
    among the samples, the common scale rule, values from the SDF (no fine-tune)."""
    centres = surface[farthest_point_sampling(surface, n)]
    return fill(centres, common_scale(surface, centres, alpha), k, sdf)


def from_mesh(mesh, n: int, k: int, alpha: float = 1.5, margin: float = 0.9, samples: int = 20000,
              seed: int = 0, device=None, allow_open: bool = False) -> MosaicSDF:
    """Mesh -> its initial Mosaic-SDF in the normalised box (normalise_mesh), with the pure-torch mesh SDF.
    `samples` surface points (drawn with `seed`) give the centres and the scale."""
    from latents.mosaic_sdf.mesh_sdf import MeshSDF

    mesh = normalise_mesh(mesh, margin, allow_open)
    surface, _ = surface_samples(mesh, samples, seed)
    return from_sdf(MeshSDF(mesh, device=device), surface.to(device), n, k, alpha)


def gradient_of(shape: MosaicSDF, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """F at x (Q, 3), its spatial gradient (Q, 3) (kept in the graph: differentiable again) and covered (Q,)."""
    x = x.detach().requires_grad_(True)
    f, covered = shape.evaluate(x)
    safe = torch.where(covered, f, torch.zeros_like(f))
    (grad,) = torch.autograd.grad(safe.sum(), x, create_graph=True)
    return safe, grad, covered


def finetune(shape: MosaicSDF, sdf: SDF, surface: Tensor, normals: Tensor, steps: int = 200, lr: float = 1e-3,
             lam: float = 0.1, batch: int = 2048, noise: float = 0.01, min_scale: float = 1e-3,
             seed: int = 0) -> tuple[MosaicSDF, list[float]]:
    """Adam on (centres, half sides, values) of a copy of `shape`; returns it and the loss per step.

    Loss = mean |F(y) - SDF(y)| over `batch` near-surface points (surface samples plus N(0, noise^2) offsets) +
    lam * mean |grad F(y) - n(y)| over `batch` surface points with normals; uncovered points are left out. Half
    sides are clamped to >= min_scale after each step. Each step draws its points from a generator seeded by `seed`.
    """
    params = [t.detach().clone().requires_grad_(True) for t in (shape.centres, shape.scales, shape.values)]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history = []
    for _ in range(steps):
        current = MosaicSDF(*params)
        pick = torch.randint(surface.shape[0], (2, batch), generator=gen).to(surface.device)
        near = surface[pick[0]] + noise * torch.randn(batch, 3, generator=gen).to(surface)
        f, covered = current.evaluate(near)
        target = sdf(near)
        loss_value = (f - target).abs()[covered].mean()
        _, grad, cov = gradient_of(current, surface[pick[1]])
        loss_normal = (grad - normals[pick[1]]).norm(dim=-1)[cov].mean()
        loss = loss_value + lam * loss_normal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            params[1].clamp_(min=min_scale)
        history.append(float(loss.detach()))
    return MosaicSDF(*(p.detach() for p in params)), history
