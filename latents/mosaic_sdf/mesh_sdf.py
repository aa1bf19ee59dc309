"""Signed distance to a triangle mesh in pure torch: no GL context, no download, any device.

Unsigned distance: brute force over (point, triangle) pairs in chunks, the closest point being the projection onto
the triangle's plane when it falls inside the triangle and the nearest point of its three edges otherwise. Sign: the
generalised winding number (Jacobson et al., "Robust Inside-Outside Segmentation using Generalized Winding Numbers",
SIGGRAPH 2013), the sum of the triangles' signed solid angles (Van Oosterom and Strackee's formula) over 4 pi; a point
is inside where it exceeds 1/2. The result is negative inside, the Mosaic-SDF convention, whatever a library's sign.
Cost: the winding number is points x faces (float32 matrix products); distances only go to the triangles near each
run of points. Fine up to some thousands of faces (the procedural shapes, decimated meshes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PAIRS_PER_CHUNK = 2 ** 21
"""(point, triangle) pairs of a winding-number evaluation held at once (float32: a few hundred MB)."""


def _dot(p: Tensor, v: Tensor) -> Tensor:
    """p (P, 3) . v (T, 3) for every pair -> (P, T), as one matrix product."""
    return p @ v.T


def triangle_distance_sq(points: Tensor, triangles: Tensor) -> Tensor:
    """Squared distance of each point (P, 3) to each triangle (T, 3, 3) -> (P, T).

    Every (point, triangle) quantity is a dot product of the point with a per-triangle vector, so each is one matrix
    product plus a per-triangle constant; call it in float64 (the expanded |p - a|^2 cancels in float32)."""
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    normal = torch.cross(b - a, c - a, dim=-1)
    area2 = (normal * normal).sum(-1)
    pp = (points * points).sum(-1, keepdim=True)
    inside = area2 > 1e-24
    edge_sq = None
    for v0, v1 in ((a, b), (b, c), (c, a)):
        e = v1 - v0
        # The projection lies on the inner side of edge v0 -> v1 when (p - v0) . (normal x e) >= 0.
        side = torch.cross(normal, e, dim=-1)
        inside = inside & (_dot(points, side) - (v0 * side).sum(-1) >= 0)
        ee = (e * e).sum(-1).clamp_min(1e-30)
        pe = _dot(points, e) - (v0 * e).sum(-1)                            # (p - v0) . e
        t = (pe / ee).clamp(0.0, 1.0)
        d0 = pp - 2 * _dot(points, v0) + (v0 * v0).sum(-1)                 # |p - v0|^2
        d = d0 - 2 * t * pe + t * t * ee
        edge_sq = d if edge_sq is None else torch.minimum(edge_sq, d)
    plane = _dot(points, normal) - (a * normal).sum(-1)
    plane_sq = plane * plane / area2.clamp_min(1e-30)
    return torch.where(inside, plane_sq, edge_sq).clamp_min(0)


def winding_number(points: Tensor, triangles: Tensor) -> Tensor:
    """Generalised winding number of the mesh at each point (P, 3) -> (P,): ~1 inside a closed outward-wound
    mesh, ~0 outside. Uses det(a - p, b - p, c - p) = det(a, b, c) - p . (a x b + b x c + c x a) and the like,
    so each term is a matrix product (in float32, call it about a nearby origin)."""
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    pp = (points * points).sum(-1, keepdim=True)
    pa, pb, pc = _dot(points, a), _dot(points, b), _dot(points, c)
    la = (pp - 2 * pa + (a * a).sum(-1)).clamp_min(0).sqrt()
    lb = (pp - 2 * pb + (b * b).sum(-1)).clamp_min(0).sqrt()
    lc = (pp - 2 * pc + (c * c).sum(-1)).clamp_min(0).sqrt()
    ab = (a * b).sum(-1) - pa - pb + pp                                    # (a - p) . (b - p)
    bc = (b * c).sum(-1) - pb - pc + pp
    ca = (c * a).sum(-1) - pc - pa + pp
    cross_sum = torch.cross(a, b, dim=-1) + torch.cross(b, c, dim=-1) + torch.cross(c, a, dim=-1)
    det = (a * torch.cross(b, c, dim=-1)).sum(-1) - _dot(points, cross_sum)
    den = la * lb * lc + ab * lc + bc * la + ca * lb
    return (2.0 * torch.atan2(det, den)).sum(-1) / (4.0 * math.pi)


def morton_order(points: Tensor, bits: int = 10) -> Tensor:
    """A permutation of points (P, 3) along a Z-order curve over their bounding box: consecutive points are close,
    so a run of them has a small bounding box."""
    lo, hi = points.amin(0), points.amax(0)
    q = ((points - lo) / (hi - lo).clamp_min(1e-12) * (2 ** bits - 1)).long()
    code = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    for b in range(bits):
        for axis in range(3):
            code |= ((q[:, axis] >> b) & 1) << (3 * b + axis)
    return code.argsort()


def mesh_sdf(points: Tensor, vertices: Tensor, faces: Tensor, chunk: int | None = None) -> Tensor:
    """Signed distance, negative inside, of points (P, 3) to the closed mesh (vertices (V, 3), faces (F, 3) wound
    outward) -> (P,), in the points' dtype and device.

    Points are taken `chunk` at a time in Z-order (default: 2^17 / faces, within [128, 8192]: short runs cull
    more triangles, long runs cost less Python overhead on small meshes). For each run, the distance to the nearest
    vertex bounds the distance to the mesh from above, so only triangles whose bounding boxes lie within that bound
    of the run's bounding box are tested, exactly, in float64. The winding number needs every triangle; it runs in
    float32 about the run's centre (only its comparison with 1/2 is used).
    """
    if points.shape[0] == 0:
        return points.new_zeros(0)
    device = points.device
    tri64 = vertices.to(device, torch.float64)[faces.long().to(device)]
    tri_lo, tri_hi = tri64.amin(dim=1), tri64.amax(dim=1)
    vert64 = vertices.to(device, torch.float64)
    out = torch.empty(points.shape[0], dtype=torch.float64, device=device)
    per = max(1, PAIRS_PER_CHUNK // max(1, tri64.shape[0]))
    chunk = chunk or min(8192, max(128, 2 ** 17 // max(1, tri64.shape[0])))
    for idx in morton_order(points).split(chunk):
        p = points[idx].to(torch.float64)
        centre = p.mean(dim=0)
        local = (p - centre).float()
        # Upper bound on every point's distance to the mesh (+ slack for float32 rounding), then box culling.
        bound = torch.cdist(local, (vert64 - centre).float()).amin(dim=1).max().double() + 1e-3
        lo, hi = p.amin(dim=0), p.amax(dim=0)
        gap = torch.maximum(tri_lo - hi, lo - tri_hi).clamp_min(0).norm(dim=1)
        dist = triangle_distance_sq(p, tri64[gap <= bound]).amin(dim=1).sqrt()
        tri_local = (tri64 - centre).float()
        winding = torch.cat([winding_number(part, tri_local) for part in local.split(per)])
        out[idx] = torch.where(winding > 0.5, -dist, dist)
    return out.to(points.dtype)


class MeshSDF:
    """A callable signed distance (negative inside) to one trimesh mesh, for building and fine-tuning an M-SDF."""

    def __init__(self, mesh, dtype=torch.float32, device=None):
        self.vertices = torch.as_tensor(mesh.vertices, dtype=dtype, device=device)
        self.faces = torch.as_tensor(mesh.faces, dtype=torch.long, device=device)

    def __call__(self, points: Tensor) -> Tensor:
        """SDF at points (P, 3) -> (P,), no gradient (the mesh is data)."""
        with torch.no_grad():
            return mesh_sdf(points, self.vertices, self.faces)
