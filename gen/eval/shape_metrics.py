"""3D shape metrics between point clouds: Chamfer and EMD, and COV / MMD / 1-NNA between a generated and a reference
set (the protocol of Yang et al., "PointFlow", ICCV 2019, used by Yariv et al., "Mosaic-SDF", CVPR 2024, arXiv
2312.09222, supplementary A.1).

Normalisation, stated once: clouds are compared in the coordinates given, with no per-pair rescaling. Clouds from
the Mosaic-SDF pipeline live in its box (each mesh's bounding box centred, largest half extent
latent.mosaic_sdf.margin, 0.9 by default), so reference meshes must be normalised the same way before sampling.
- Chamfer: CD(X, Y) = mean_x min_y |x - y|^2 + mean_y min_x |x - y|^2 (squared L2, the sum of the two directional
  means, no factor 1/2).
- EMD: mean_x |x - pi(x)| (L2, not squared) over the optimal one-to-one matching pi of two clouds of equal size
  (scipy's linear_sum_assignment, exact).
Pairwise distances run in batches with torch on the clouds' device, except pairwise Chamfer on the CPU, which
queries one k-d tree per cloud (scipy cKDTree: exact nearest neighbours, distances from coordinate differences, so
the same values; measured 31 ms -> about 2 ms per 2,048-point pair on 2 cores); the assignment runs on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

EXACT = "donot_use_mm_for_euclid_dist"
"""torch.cdist mode that differences coordinates (the |x|^2 - 2 x.y + |y|^2 expansion leaves CD(X, X) ~ 1e-8)."""

PAIRS_PER_BATCH = 2 ** 24
"""Point pairs held at once when computing a block of pairwise Chamfer distances (64 MB of float32)."""


def chamfer(x: Tensor, y: Tensor) -> Tensor:
    """Chamfer distance of matched clouds x (B, N, 3) and y (B, M, 3) -> (B,) (squared L2, sum of both means)."""
    d = torch.cdist(x, y, compute_mode=EXACT).square()
    return d.amin(dim=2).mean(dim=1) + d.amin(dim=1).mean(dim=1)


def emd(x: Tensor, y: Tensor) -> Tensor:
    """Earth mover's distance of matched clouds x, y (B, N, 3) of equal size -> (B,): the mean L2 length of the
    optimal one-to-one matching (exact, scipy.optimize.linear_sum_assignment on the CPU)."""
    from scipy.optimize import linear_sum_assignment

    if x.shape != y.shape:
        raise ValueError(f"EMD needs clouds of equal size, got {tuple(x.shape)} and {tuple(y.shape)}")
    cost = torch.cdist(x.double(), y.double(), compute_mode=EXACT).cpu().numpy()
    out = np.empty(cost.shape[0])
    for b, c in enumerate(cost):
        rows, cols = linear_sum_assignment(c)
        out[b] = c[rows, cols].mean()
    return torch.as_tensor(out, dtype=x.dtype, device=x.device)


DISTANCES = {"cd": chamfer, "emd": emd}
"""Point-cloud distances by the suffix their metrics carry (mmd-cd, cov-emd, ...)."""


def chamfer_kdtree(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Chamfer distances (Na, Nb) of CPU clouds a (Na, N, 3) and b (Nb, M, 3) through one k-d tree per
    cloud (exact nearest neighbours; each directional mean in float64, then cast to the clouds' dtype)."""
    from scipy.spatial import cKDTree

    pa, pb = a.double().numpy(), b.double().numpy()
    trees_a, trees_b = [cKDTree(p) for p in pa], [cKDTree(p) for p in pb]
    out = np.empty((len(pa), len(pb)))
    for i, (x, tx) in enumerate(zip(pa, trees_a)):
        for j, (y, ty) in enumerate(zip(pb, trees_b)):
            out[i, j] = np.mean(ty.query(x)[0] ** 2) + np.mean(tx.query(y)[0] ** 2)
    return torch.as_tensor(out, dtype=a.dtype)


def pairwise(a: Tensor, b: Tensor, distance: str = "cd") -> Tensor:
    """D[i, j] = distance(a[i], b[j]) for clouds a (Na, N, 3) and b (Nb, M, 3) -> (Na, Nb), in batches of pairs
    (Chamfer of CPU clouds: k-d trees, `chamfer_kdtree`)."""
    if distance == "cd" and a.device.type == "cpu" and b.device.type == "cpu" and a.shape[0] * b.shape[0] > 0:
        return chamfer_kdtree(a, b)
    fn = DISTANCES[distance]
    per = max(1, PAIRS_PER_BATCH // max(1, a.shape[1] * b.shape[1]))
    rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(b.shape[0])
    cols = torch.arange(b.shape[0], device=a.device).repeat(a.shape[0])
    out = torch.empty(a.shape[0] * b.shape[0], dtype=a.dtype, device=a.device)
    for start in range(0, out.numel(), per):
        i, j = rows[start:start + per], cols[start:start + per]
        out[start:start + per] = fn(a[i], b[j])
    return out.reshape(a.shape[0], b.shape[0])


def coverage(d_gr: Tensor) -> float:
    """COV: the fraction of reference shapes that are the nearest reference of some generated shape, from the
    (generated x reference) distance matrix."""
    return d_gr.argmin(dim=1).unique().numel() / d_gr.shape[1]


def mmd(d_gr: Tensor) -> float:
    """MMD: the mean over reference shapes of the distance to the nearest generated shape."""
    return float(d_gr.amin(dim=0).mean())


def one_nna(d_gg: Tensor, d_rr: Tensor, d_gr: Tensor) -> float:
    """1-NNA: leave-one-out 1-nearest-neighbour accuracy of telling generated from reference shapes in their union
    (0.5 is ideal; ties go to the first index, generated shapes first)."""
    ng, nr = d_gr.shape
    full = torch.cat([torch.cat([d_gg, d_gr], dim=1), torch.cat([d_gr.T, d_rr], dim=1)], dim=0).clone()
    full.fill_diagonal_(float("inf"))
    is_gen = torch.arange(ng + nr, device=full.device) < ng
    return float((is_gen[full.argmin(dim=1)] == is_gen).float().mean())


def set_metrics(generated: Tensor, reference: Tensor, distances: tuple[str, ...] = ("cd", "emd")) -> dict[str, float]:
    """COV, MMD and 1-NNA of a generated set of clouds (Ng, N, 3) against a reference set (Nr, N, 3), for each
    distance: {"cov-cd", "mmd-cd", "1-nna-cd", "cov-emd", ...}."""
    out = {}
    for name in distances:
        d_gr = pairwise(generated, reference, name)
        d_gg = pairwise(generated, generated, name)
        d_rr = pairwise(reference, reference, name)
        out.update({f"cov-{name}": coverage(d_gr), f"mmd-{name}": mmd(d_gr),
                    f"1-nna-{name}": one_nna(d_gg, d_rr, d_gr)})
    return out


def mesh_points(mesh, count: int, oversample: int = 4, seed: int = 0) -> Tensor:
    """`count` points spread over a mesh's surface: farthest-point sampling from oversample * count area-uniform
    samples drawn with `seed` -> float32 (count, 3). An empty mesh (a failed sample) gives `count` copies of the
    origin: a degenerate cloud with finite distances to every other."""
    from latents.mosaic_sdf.build import farthest_point_sampling, surface_samples

    if mesh.faces.shape[0] == 0:
        return torch.zeros(count, 3)
    points, _ = surface_samples(mesh, oversample * count, seed)
    return points[farthest_point_sampling(points, count)]
