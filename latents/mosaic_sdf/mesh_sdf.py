"""Signed distance to a triangle mesh in pure torch: no GL context, no download, any device.

Unsigned distance: brute force over (point, triangle) pairs in chunks, the closest point being the projection onto
the triangle's plane when it falls inside the triangle and the nearest point of its three edges otherwise. Sign: the
generalised winding number (Jacobson et al., "Robust Inside-Outside Segmentation using Generalized Winding Numbers",
SIGGRAPH 2013), the sum of the triangles' signed solid angles (Van Oosterom and Strackee's formula) over 4 pi; a point
is inside where it exceeds 1/2. The result is negative inside, the Mosaic-SDF convention, whatever a library's sign.
Cost is points x faces: fine up to a few thousand faces (the procedural shapes, decimated meshes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PAIRS_PER_CHUNK = 2 ** 21
"""(point, triangle) pairs evaluated at once; bounds the memory to a few hundred MB in float32."""


def _segment_sq(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Squared distance from points p (P, 1, 3) to segments [a, b] (1, T, 3) -> (P, T)."""
    ab = b - a
    t = ((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-30)
    closest = a + t.clamp(0.0, 1.0)[..., None] * ab
    return ((p - closest) ** 2).sum(-1)


def triangle_distance_sq(points: Tensor, triangles: Tensor) -> Tensor:
    """Squared distance of each point (P, 3) to each triangle (T, 3, 3) -> (P, T)."""
    p = points[:, None, :]
    a, b, c = (triangles[None, :, i] for i in range(3))
    normal = torch.cross(b - a, c - a, dim=-1)
    area2 = (normal * normal).sum(-1)
    ap = p - a
    # Barycentric coordinates of the projection from the sub-triangle areas (signed by the normal).
    u = (torch.cross(c - b, p - b, dim=-1) * normal).sum(-1)
    v = (torch.cross(a - c, p - c, dim=-1) * normal).sum(-1)
    w = (torch.cross(b - a, ap, dim=-1) * normal).sum(-1)
    inside = (u >= 0) & (v >= 0) & (w >= 0) & (area2 > 1e-24)
    plane_sq = (ap * normal).sum(-1) ** 2 / area2.clamp_min(1e-30)
    edge_sq = torch.minimum(torch.minimum(_segment_sq(p, a, b), _segment_sq(p, b, c)), _segment_sq(p, c, a))
    return torch.where(inside, plane_sq, edge_sq)


def winding_number(points: Tensor, triangles: Tensor) -> Tensor:
    """Generalised winding number of the mesh at each point (P, 3) -> (P,): ~1 inside a closed outward-wound
    mesh, ~0 outside."""
    a, b, c = (triangles[None, :, i] - points[:, None, :] for i in range(3))
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.cross(b, c, dim=-1)).sum(-1)
    den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return (2.0 * torch.atan2(det, den)).sum(-1) / (4.0 * math.pi)


def mesh_sdf(points: Tensor, vertices: Tensor, faces: Tensor) -> Tensor:
    """Signed distance, negative inside, of points (P, 3) to the closed mesh (vertices (V, 3), faces (F, 3) wound
    outward) -> (P,), in the points' dtype and device; computed in chunks of PAIRS_PER_CHUNK pairs."""
    triangles = vertices.to(points)[faces.long().to(points.device)]
    chunk = max(1, PAIRS_PER_CHUNK // max(1, triangles.shape[0]))
    out = []
    for part in points.split(chunk):
        dist = triangle_distance_sq(part, triangles).amin(dim=1).clamp_min(0).sqrt()
        inside = winding_number(part, triangles) > 0.5
        out.append(torch.where(inside, -dist, dist))
    return torch.cat(out) if out else points.new_zeros(0)


class MeshSDF:
    """A callable signed distance (negative inside) to one trimesh mesh, for building and fine-tuning an M-SDF."""

    def __init__(self, mesh, dtype=torch.float32, device=None):
        self.vertices = torch.as_tensor(mesh.vertices, dtype=dtype, device=device)
        self.faces = torch.as_tensor(mesh.faces, dtype=torch.long, device=device)

    def __call__(self, points: Tensor) -> Tensor:
        """SDF at points (P, 3) -> (P,), no gradient (the mesh is data)."""
        with torch.no_grad():
            return mesh_sdf(points, self.vertices, self.faces)
