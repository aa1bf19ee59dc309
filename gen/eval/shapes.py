"""COV / MMD / 1-NNA of generated 3D shapes against a reference set (gen.eval.shape_metrics), over any number of
processes: the metrics sample.py computes for modality "shape" and what evaluate.py computes with eval.metrics=[cd]
and/or [emd].

Inputs: a folder of meshes (searched recursively for gen.shape_data.MESH_EXTENSIONS, sorted by path) or an .npz of
point clouds (key "points", else arr_0: float (N, P, 3) with P >= eval.shape_points). Protocol, stated once:
- every mesh, generated or reference, is centred on its bounding box and scaled so that its largest half extent is 1
  (the clouds of an .npz are taken as given), then eval.shape_points points are taken from its surface by
  farthest-point sampling among 4x as many area-uniform samples (seed 0);
- Chamfer: squared L2, the sum of the two directional means, on all eval.shape_points points;
- EMD (approximation): the exact optimal matching on the first eval.emd_points points of each cloud's farthest-point
  order (an evenly spread subset; exact EMD of 2,048-point clouds is one 2048^2 assignment per pair).
Work is split across processes by rows (mesh i on process i mod world; row i of every distance matrix likewise) and
gathered in index order, so the scores do not depend on the number of processes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gen.eval.collective import Collective
from gen.eval.shape_metrics import coverage, mesh_points, mmd, one_nna, pairwise

SHAPE_METRICS = ("cd", "emd")
"""eval.metrics / sample.metrics names of the shape metrics: COV, MMD and 1-NNA under Chamfer or EMD."""


def unit_box(mesh):
    """A copy of `mesh` centred on its bounding box with largest half extent 1 (an empty mesh as it is)."""
    if len(mesh.faces) == 0:
        return mesh
    lo, hi = mesh.bounds
    out = mesh.copy()
    out.apply_translation(-(lo + hi) / 2.0)
    out.apply_scale(2.0 / max(float((hi - lo).max()), 1e-12))
    return out


def mesh_files(folder: Path) -> list[str]:
    """Every mesh file under `folder`, sorted by path."""
    from gen.shape_data import MESH_EXTENSIONS

    found = []
    for root, subdirs, names in os.walk(folder, followlinks=True):
        subdirs.sort()
        found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(MESH_EXTENSIONS)]
    return found


def _gather_rows(mine: Tensor, indices: np.ndarray, total: int, comm: Collective) -> Tensor:
    """Rows this process computed for global `indices` -> all `total` rows in index order, on every process."""
    rows = comm.cat(mine)
    order = comm.cat(torch.as_tensor(indices, dtype=torch.long, device=mine.device))
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    out[order] = rows
    return out


def clouds_of_meshes(meshes, count: int, comm: Collective | None = None, device="cpu") -> Tensor:
    """Point clouds (N, count, 3) of a list of meshes (or of mesh file paths), each normalised to the unit box (an
    empty mesh, a failed sample, gives `count` copies of the origin); mesh i is sampled on process i mod world."""
    from gen.shape_data import read_mesh

    comm = comm or Collective(False)
    mine = np.arange(comm.rank, len(meshes), comm.world)
    clouds = [mesh_points(unit_box(read_mesh(m) if isinstance(m, (str, Path)) else m), count)
              for m in (meshes[i] for i in mine)]
    local = torch.stack(clouds).to(device) if clouds else torch.zeros(0, count, 3, device=device)
    return _gather_rows(local, mine, len(meshes), comm)


def load_clouds(path, count: int, comm: Collective | None = None, device="cpu") -> Tensor:
    """Clouds (N, count, 3) from a folder of meshes or an .npz of clouds, with one clear error for anything else."""
    from gen.data import DataError

    path = Path(path)
    if path.is_dir():
        files = mesh_files(path)
        if not files:
            raise DataError(f"no mesh files in {path}; give a folder of meshes or an .npz of point clouds")
        return clouds_of_meshes(files, count, comm, device)
    if path.suffix != ".npz" or not path.is_file():
        raise DataError(f"{path} is neither a folder of meshes nor an .npz of point clouds (key points or arr_0)")
    with np.load(path) as data:
        key = "points" if "points" in data else "arr_0"
        clouds = data[key] if key in data else None
    if clouds is None or clouds.ndim != 3 or clouds.shape[2] != 3 or clouds.shape[1] < count \
            or not np.issubdtype(clouds.dtype, np.floating):
        found = "no points/arr_0" if clouds is None else f"{clouds.dtype} {clouds.shape}"
        raise DataError(f"{path} holds {found}; expected float point clouds (N, P, 3) with P >= eval.shape_points="
                        f"{count} under key points or arr_0")
    return torch.from_numpy(np.ascontiguousarray(clouds[:, :count], dtype=np.float32)).to(device)


def split_pairwise(a: Tensor, b: Tensor, distance: str, comm: Collective) -> Tensor:
    """pairwise(a, b) with the rows of `a` split over processes (row i on process i mod world), gathered."""
    mine = np.arange(comm.rank, a.shape[0], comm.world)
    local = pairwise(a[torch.as_tensor(mine, dtype=torch.long)], b, distance) if len(mine) else \
        torch.zeros(0, b.shape[0], dtype=a.dtype, device=a.device)
    return _gather_rows(local, mine, a.shape[0], comm)


def shape_scores(generated: Tensor, reference: Tensor, distances, emd_points: int,
                 comm: Collective | None = None) -> dict[str, float]:
    """{"cov-cd", "mmd-cd", "1-nna-cd", ...} for each distance in `distances`, plus the set sizes."""
    comm = comm or Collective(False)
    out = {}
    for name in distances:
        g, r = (generated, reference) if name == "cd" else (generated[:, :emd_points], reference[:, :emd_points])
        d_gr, d_gg, d_rr = (split_pairwise(x, y, name, comm) for x, y in ((g, r), (g, g), (r, r)))
        out.update({f"cov-{name}": coverage(d_gr), f"mmd-{name}": mmd(d_gr),
                    f"1-nna-{name}": one_nna(d_gg, d_rr, d_gr)})
    return {**out, "num_generated": int(generated.shape[0]), "num_reference": int(reference.shape[0])}


def protocol(ecfg) -> dict:
    """How the shape metrics were computed (recorded with the scores)."""
    return {"points": ecfg.shape_points, "emd_points": ecfg.emd_points, "normalisation": "unit box per mesh",
            "chamfer": "squared L2, sum of both directional means", "emd": "exact matching on the first emd_points "
            "of the farthest-point order", "reference": ecfg.reference}


def reference_clouds(ecfg, comm: Collective | None = None, device="cpu") -> Tensor:
    """The clouds of eval.reference, or a clear error when it is not set."""
    from gen.config import ConfigError

    if not ecfg.reference:
        raise ConfigError("config key 'eval.reference': shape metrics need a reference set (a folder of meshes or an "
                          ".npz of point clouds)")
    return load_clouds(ecfg.reference, ecfg.shape_points, comm, device)


_LAST_CLOUDS: dict[str, tuple] = {}
"""The last generated and reference clouds of `sample_metric` (the same meshes object / reference path and point
count): sample.py's cd and emd metrics then sample every mesh once, not once per metric."""


def _memo(slot: str, key, make) -> Tensor:
    """`make()`, or its value from the previous call with the same `key` (compared by identity and equality)."""
    last = _LAST_CLOUDS.get(slot)
    if last is None or last[0] is not key[0] or last[1:] != key[1:]:
        _LAST_CLOUDS[slot] = last = (*key, make())
    return last[-1]


def sample_metric(distance: str):
    """The SAMPLE_METRICS entry for `distance`: fn(meshes, labels, cfg) -> scores against eval.reference."""
    def score(meshes, labels, cfg) -> dict:
        e = cfg.eval
        generated = _memo("generated", (meshes, e.shape_points), lambda: clouds_of_meshes(list(meshes), e.shape_points))
        reference = _memo("reference", (None, str(e.reference), e.shape_points), lambda: reference_clouds(e))
        return {**shape_scores(generated, reference, (distance,), e.emd_points), "protocol": protocol(e)}

    return score


def evaluate_shapes(samples, ecfg, device="cpu") -> dict:
    """Scores of the shapes at `samples` (folder of meshes or .npz of clouds) for eval.metrics, on every process."""
    comm = Collective()
    reference = reference_clouds(ecfg, comm, device)
    generated = load_clouds(samples, ecfg.shape_points, comm, device)
    return shape_scores(generated, reference, ecfg.metrics, ecfg.emd_points, comm)
