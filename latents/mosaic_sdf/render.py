"""Headless shaded pictures of triangle meshes on the CPU: a vectorised numpy z-buffer rasteriser, no GL context.

Orthographic camera looking at the origin from azimuth 35 and elevation 25 degrees; the box [-1, 1]^3 fits the frame.
Every triangle is rasterised over the pixel centres of its bounding box (edge functions, all (triangle, pixel) pairs
at once), the nearest fragment per pixel wins, and it is shaded with two-sided Lambert lighting of its face normal
(ambient 0.25, one directional light) on a white background. An empty mesh renders as a blank picture.
"""
from __future__ import annotations

import math

import numpy as np

AZIMUTH, ELEVATION = math.radians(35.0), math.radians(25.0)
EXTENT = 1.6
"""Half width of the frame in world units (the box [-0.9, 0.9]^3 spans at most 0.9 sqrt(3) = 1.56 from its centre)."""
LIGHT = np.array([-0.4, 0.5, 0.77])
"""Direction towards the light in camera coordinates (x right, y up, z towards the viewer)."""
COLOUR = np.array([0.55, 0.68, 0.85])
"""Surface albedo (RGB)."""
AMBIENT = 0.25


def camera_rotation() -> np.ndarray:
    """World -> camera rotation (rows: right, up, towards the viewer)."""
    ca, sa, ce, se = math.cos(AZIMUTH), math.sin(AZIMUTH), math.cos(ELEVATION), math.sin(ELEVATION)
    towards = np.array([ce * sa, se, ce * ca])  # from the origin to the eye (y up)
    right = np.cross([0.0, 1.0, 0.0], towards)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(towards, right), towards])


def render_mesh(mesh, size: int = 128) -> np.ndarray:
    """A shaded picture of `mesh` (a trimesh.Trimesh), uint8 (3, size, size)."""
    image = np.ones((size * size, 3))
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if faces.shape[0] == 0:
        return (image.reshape(size, size, 3).transpose(2, 0, 1) * 255).round().astype(np.uint8)
    rot = camera_rotation()
    cam = np.asarray(mesh.vertices, dtype=np.float64) @ rot.T
    # pixel coordinates: column from x, row from -y; depth: larger z is nearer
    px = np.stack([(cam[:, 0] / EXTENT + 1) * size / 2, (1 - cam[:, 1] / EXTENT) * size / 2, cam[:, 2]], axis=1)
    tri = px[faces]  # (F, 3, 3)
    normals = np.asarray(mesh.face_normals, dtype=np.float64) @ rot.T
    shade = AMBIENT + (1 - AMBIENT) * np.abs(normals @ (LIGHT / np.linalg.norm(LIGHT)))  # two-sided Lambert
    lo = np.clip(np.floor(tri[:, :, :2].min(1) - 0.5), 0, size - 1).astype(np.int64)  # (F, 2): col, row
    hi = np.clip(np.ceil(tri[:, :, :2].max(1) - 0.5), 0, size - 1).astype(np.int64)
    w, h = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    counts = w * h
    face = np.repeat(np.arange(len(faces)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    col = lo[face, 0] + local % w[face]
    row = lo[face, 1] + local // w[face]
    p = np.stack([col + 0.5, row + 0.5], axis=1)
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]

    def edge(u, v):
        return (v[:, 0] - u[:, 0]) * (p[:, 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (p[:, 0] - u[:, 0])

    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    l0, l1, l2 = edge(b, c), edge(c, a), edge(a, b)
    ok = np.abs(area) > 1e-12
    safe = np.where(ok, area, 1.0)
    l0, l1, l2 = l0 / safe, l1 / safe, l2 / safe  # barycentric weights of a, b, c (either winding)
    inside = ok & (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
    depth = (l0 * a[:, 2] + l1 * b[:, 2] + l2 * c[:, 2])[inside]
    pixel = (row * size + col)[inside]
    face = face[inside]
    order = np.lexsort((-depth, pixel))  # per pixel, nearest first
    first = order[np.unique(pixel[order], return_index=True)[1]]
    image[pixel[first]] = np.clip(shade[face[first], None] * COLOUR, 0, 1)
    return (image.reshape(size, size, 3).transpose(2, 0, 1) * 255).round().astype(np.uint8)
