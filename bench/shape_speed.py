"""Mosaic-SDF speed: mesh -> M-SDF seconds per shape (with and without the fine-tune), M-SDF -> mesh seconds at a
marching-cubes resolution, and shape-metric seconds for a generated x reference set of point clouds.

    python bench/shape_speed.py                     # n = 1024, k = 7, 128^3, 100 x 100 shapes at 2,048 points
    python bench/shape_speed.py --shapes 2 --finetune-steps 50 --metric-sets 20   # a quick look

Meshes: the procedural shapes (latents.mosaic_sdf.procedural, 1,280 faces at most), converted by the latent's torch
path (latents.mosaic_sdf.build.from_mesh) on the given device. Fine-tune: latents.mosaic_sdf.build.finetune with its
defaults (2,048 points per step). Metrics: gen.eval.shapes.shape_scores (Chamfer on all points, EMD on eval.emd_points)
on random clouds (the time does not depend on the values). Prints one JSON line per item.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn):
    """fn() and its wall-clock seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    """Run the benchmark items and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--shapes", type=int, default=3, help="procedural shapes converted (one per class)")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--metric-sets", type=int, default=100, help="generated and reference shapes each")
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--emd-points", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from gen.eval.shapes import shape_scores
    from latents.mosaic_sdf.build import finetune, from_mesh, normalise_mesh, surface_samples
    from latents.mosaic_sdf.extract import to_mesh
    from latents.mosaic_sdf.mesh_sdf import MeshSDF
    from latents.mosaic_sdf.procedural import ProceduralShapes

    device, shapes = torch.device(args.device), ProceduralShapes(args.shapes)
    base = {"device": str(device), "threads": torch.get_num_threads(), "n": args.n, "k": args.k}
    for i in range(args.shapes):
        mesh, label = shapes[i]
        msdf, init_s = timed(lambda: from_mesh(mesh, args.n, args.k, device=device))
        norm = normalise_mesh(mesh)
        surface, normals = surface_samples(norm, 20000)
        _, tune_s = timed(lambda: finetune(msdf, MeshSDF(norm, device=device), surface.to(device), normals.to(device),
                                           steps=args.finetune_steps))
        _, mesh_s = timed(lambda: to_mesh(msdf, args.resolution))
        print(json.dumps({**base, "shape": shapes.classes[label], "faces": len(mesh.faces), "mesh_to_msdf_s": init_s,
                          f"finetune_{args.finetune_steps}_steps_s": tune_s,
                          f"msdf_to_mesh_{args.resolution}_s": mesh_s}), flush=True)
    g = torch.Generator().manual_seed(0)
    clouds = [torch.rand(args.metric_sets, args.points, 3, generator=g).to(device) for _ in range(2)]
    for distances in (("cd",), ("emd",)):
        _, metric_s = timed(lambda: shape_scores(*clouds, distances, args.emd_points))
        print(json.dumps({**base, "metric": distances[0], "sets": f"{args.metric_sets}x{args.metric_sets}",
                          "points": args.points, "emd_points": args.emd_points, "seconds": metric_s}), flush=True)


if __name__ == "__main__":
    main()
