"""The random-token control of the shape metrics: standard-normal model-space tokens (what every sampler starts
from) decoded exactly as samples are (the run's normaliser, splatting, nearest fill, marching cubes) and written as
sample.py writes them, so that evaluate.py scores them the same way.

    python -m latents.mosaic_sdf.baseline runs/quickstart_3d --out runs/quickstart_3d/samples/random.npz
    python evaluate.py runs/quickstart_3d/samples/random --config configs/quickstart_3d.yaml
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from gen.errors import DEBUG_HELP, one_line_errors


def random_tokens(weights: str, out: str, num_samples: int, seed: int = 0, overrides=()) -> str:
    """Decode `num_samples` N(0, I) token sets (sample i from a generator seeded by (seed, i), as sample.py) with the
    run's latent space and statistics; write them with its save_samples (labels i mod classes, for the file names)."""
    from gen.checkpoint import load_latent_state, resolve_weights
    from gen.config import load_config
    from gen.sampling.noise import sample_generators
    from latents import build_latent

    ema_path, cfg_path = resolve_weights(weights)
    cfg = load_config(cfg_path, list(overrides))
    latent = build_latent(cfg)
    load_latent_state(ema_path.parent, latent)
    gens = sample_generators(seed, np.arange(num_samples), "cpu")
    z = torch.stack([torch.randn(latent.shape, generator=g) for g in gens])
    labels = np.arange(num_samples, dtype=np.int64) % cfg.cond.num_classes
    return str(latent.save_samples(out, latent.to_storage(latent.decode(z)), labels))


def main(argv=None) -> None:
    """Command line: run folder (or checkpoint), --out .npz, --num-samples, --seed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="run folder (its latest checkpoint) or a checkpoints/step-* folder")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    parser.add_argument("--out", required=True, help="output .npz; the meshes go to the folder of the same stem")
    parser.add_argument("--num-samples", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    with one_line_errors(args.debug):
        print(f"wrote {random_tokens(args.weights, args.out, args.num_samples, args.seed, args.overrides)}")


if __name__ == "__main__":
    main()
