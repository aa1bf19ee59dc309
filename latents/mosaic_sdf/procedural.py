"""An embedded dataset of procedural shapes: watertight trimesh primitives with random proportions.

Item i of a ProceduralShapes set is a pure function of (seed, i): its class is i mod the number of classes and its
proportions come from a numpy generator seeded by (seed, i), so any process can build any item on its own and the
set needs no download. Meshes are returned as made (not normalised: the conversion to a Mosaic-SDF normalises).
"""
from __future__ import annotations

import numpy as np

CLASSES = ("box", "sphere", "capsule", "cylinder", "torus", "cone")
"""Class names, in label order."""


def make_shape(name: str, rng: np.random.Generator):
    """One watertight, outward-wound mesh of class `name` with proportions drawn from rng."""
    import trimesh

    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if name == "box":
        mesh = trimesh.creation.box(extents=(u(0.4, 1.0), u(0.4, 1.0), u(0.4, 1.0)))
    elif name == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=u(0.3, 0.5))
        mesh.apply_scale((1.0, u(0.7, 1.0), u(0.7, 1.0)))      # an ellipsoid
    elif name == "capsule":
        mesh = trimesh.creation.capsule(height=u(0.3, 0.8), radius=u(0.15, 0.3), count=[16, 16])
    elif name == "cylinder":
        mesh = trimesh.creation.cylinder(radius=u(0.2, 0.5), height=u(0.4, 1.0), sections=32)
    elif name == "torus":
        mesh = trimesh.creation.torus(major_radius=u(0.45, 0.6), minor_radius=u(0.12, 0.25), major_sections=32,
                                      minor_sections=16)
    elif name == "cone":
        mesh = trimesh.creation.cone(radius=u(0.3, 0.5), height=u(0.5, 1.0), sections=32)
    else:
        raise ValueError(f"unknown procedural shape class {name!r}; one of {list(CLASSES)}")
    return mesh


def caption(mesh, name: str) -> str:
    """A templated caption of a procedural mesh from its class and its bounding box (z is up for every class):
    "a {small|large} {tall|flat|squat} {class}", e.g. "a large tall cylinder". Tall: height > 1.25 x the larger
    horizontal extent; flat: < 0.8 x; squat otherwise. Small: the largest extent is below 0.8, large otherwise."""
    x, y, z = (float(e) for e in mesh.extents)
    ratio = z / max(x, y)
    form = "tall" if ratio > 1.25 else "flat" if ratio < 0.8 else "squat"
    size = "small" if max(x, y, z) < 0.8 else "large"
    return f"a {size} {form} {name}"


class ProceduralShapes:
    """`size` procedural meshes over `classes`, item i -> (trimesh.Trimesh, label) deterministic in (seed, i)."""

    def __init__(self, size: int, seed: int = 0, classes: tuple[str, ...] = CLASSES):
        unknown = [c for c in classes if c not in CLASSES]
        if unknown or not classes:
            raise ValueError(f"unknown procedural shape classes {unknown}; choose among {list(CLASSES)}")
        self.size, self.seed, self.classes = int(size), int(seed), tuple(classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(f"procedural shape {i} of {self.size}")
        label = i % len(self.classes)
        rng = np.random.default_rng([self.seed, i])
        return make_shape(self.classes[label], rng), label


def write_folder(out, size: int, seed: int = 0, classes: tuple[str, ...] = CLASSES, file_type: str = "obj") -> list:
    """Write a ProceduralShapes set as a mesh folder (out/<class>/<index>.<file_type>, the layout data.name=mesh_folder
    and evaluate.py read); returns the paths. Files are written atomically, existing ones are kept."""
    from pathlib import Path

    from gen.io import atomic_write

    shapes, paths = ProceduralShapes(size, seed, classes), []
    for i in range(size):
        mesh, label = shapes[i]
        path = Path(out) / shapes.classes[label] / f"{i:06d}.{file_type}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp, m=mesh: m.export(str(tmp), file_type=file_type))
        paths.append(path)
    return paths


def main(argv=None) -> None:
    """python -m latents.mosaic_sdf.procedural OUT --num-items N --seed S: write procedural shapes as a mesh folder
    (e.g. a held-out reference set for evaluate.py; seed 1 is data.split=heldout's)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="output folder (class sub-folders of .obj files)")
    parser.add_argument("--num-items", type=int, required=True, help="number of shapes")
    parser.add_argument("--seed", type=int, default=1, help="0 is data.split=train's shapes, 1 heldout's")
    args = parser.parse_args(argv)
    print(f"wrote {len(write_folder(args.out, args.num_items, args.seed))} meshes under {args.out}")


if __name__ == "__main__":
    main()
