"""Cost of each aligner relative to the plain training step, same model and batch.

    python bench/align_overhead.py configs/sit_b2.yaml --batch 8 align.methods=[repa]
    python bench/align_overhead.py configs/sit_xl2.yaml --batch 32 align.methods=[repa]   # on a GPU: bf16
    python bench/align_overhead.py configs/sit_xl2_erw.yaml --batch 32                    # ERW's two phases

Rows: the plain step (denoising loss only); each aligner of `align.methods` with cached targets (its heads,
loss and backward through the tapped blocks; ERW also its warmup step); and, for aligners with frozen encoders, the
encoders' forward on the batch's images (random-init weights: timing does not depend on them), i.e. the extra cost
of computing the targets online instead of caching them with prepare.py. Latents, labels and images are synthetic.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from align import ALIGNERS, ENCODERS
from align.encoders import FrozenEncoder, create_encoder_model
from gen.cond import Cond
from gen.config import component_config, load_config
from gen.ema import EMA
from gen.models import build_backbone
from gen.objectives import build_objective
from gen.step import StepDraws, Trainee
from latents import build_latent


def timed(fn, device) -> float:
    """Seconds of one call, the device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(runs: dict, steps: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds of one call each so that drifting machine load
    (a shared CPU swings tens of percent) hits every configuration alike; `warmup` untimed rounds first."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(warmup + steps):
        for label, fn in runs.items():
            seconds = timed(fn, device)
            if r >= warmup:
                times[label].append(seconds)
    return {label: statistics.median(ts) for label, ts in times.items()}


def main() -> None:
    """Print seconds per step and the ratio to the plain step for each configuration."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    latent = build_latent(cfg)
    model = build_backbone(cfg, latent.shape).to(device)
    objective = build_objective(cfg, model)
    n = args.batch
    x0 = torch.randn(n, *latent.shape, device=device)
    y = Cond(torch.randint(0, cfg.cond.num_classes, (n,), device=device))
    draws = StepDraws(objective={}, latent={}, uniform=torch.rand(n, device=device))  # the rest: torch's global RNG
    pixels = torch.randint(0, 256, (n, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8, device=device)
    # The target encoders of the listed aligners that have some (REPA, ERW), each once.
    encoder_names = list(dict.fromkeys(e for m in cfg.align.methods
                                       for e in getattr(component_config(cfg, "align", m), "encoders", ())
                                       if e in ENCODERS))
    grid = model.token_grid
    cached = {e: torch.randn(n, grid[0] * grid[1], ENCODERS[e].dim, device=device) for e in encoder_names}

    def step_fn(trainee, phase="full"):
        def step():
            trainee.set_phase(phase)  # trainees share the model: each sets what its phase trains
            trainee.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = trainee(x0, y, 0, draws, pixels=None, target_feats=cached)
            loss.mean().backward()
        return step

    teacher = EMA(model, cfg.train.ema_decay).model  # what train.py hands SRA: the EMA copy, no second one
    runs = {"plain": step_fn(Trainee(model, objective))}
    for method in cfg.align.methods:
        aligner = ALIGNERS[method].from_config(cfg, model, objective, cached_targets=encoder_names).to(device)
        trainee = Trainee(model, objective, {method: aligner}, teacher=teacher)
        if trainee.warm is not None:  # ERW's phase 1: blocks 1..K and the projector, on clean latents
            runs[f"+{method} warmup step (cached targets)"] = step_fn(trainee, "warmup")
        runs[f"+{method} (cached targets)"] = step_fn(trainee)
    for name in encoder_names:
        spec = ENCODERS[name]
        encoder = FrozenEncoder(name, spec, create_encoder_model(spec, grid), cfg.data.image_size, grid)
        encoder.to(device)

        def encode(encoder=encoder):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                encoder(pixels)

        runs[f"  {name} forward (online targets)"] = encode
    rows = list(interleaved_medians(runs, args.steps, args.warmup, device).items())
    plain = rows[0][1]
    print(f"{cfg.model.name} batch {n} {str(dtype).split('.')[-1]} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for label, seconds in rows:
        print(f"{label:40s} {1e3 * seconds:9.1f} ms   x{seconds / plain:.3f} of the plain step (median)")


if __name__ == "__main__":
    main()
