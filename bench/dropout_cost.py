"""Cost of per-sample dropout: the training forward + backward (gen.step.Trainee, the objective's loss included) of
a config's model with dropout, this tree against a git revision's tree (default: the one before gen/dropout.py,
whose dropout was torch's nn.Dropout and SDPA's dropout_p), in interleaved rounds of fresh processes.

    python bench/dropout_cost.py                                     # quickstart_mage, dropout 0.1 and 0, CPU
    python bench/dropout_cost.py --rounds 5 --iters 20 --baseline 858bcc3

Each round runs every (tree, dropout) arm once, in a new process that imports that tree's `gen`: build, --warmup
steps, then --iters timed ones; the medians over rounds are printed (ms per step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "858bcc3"  # the last commit whose dropout drew from torch's global generator


def worker(config: str, overrides: list[str], batch: int, warmup: int, iters: int) -> float:
    """ms per Trainee forward + backward of `batch` samples, in the tree on sys.path."""
    import torch

    import gen
    from gen.config import load_config
    from gen.models import build_backbone
    from gen.objectives import build_objective
    from gen.step import StepDraws, Trainee
    from latents import build_latent

    if Path(gen.__file__).resolve().parents[1] != Path.cwd().resolve():
        raise RuntimeError(f"imported {gen.__file__}, not the tree in {Path.cwd()}")
    cfg = load_config(config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent = build_latent(cfg)
    torch.manual_seed(0)
    model = build_backbone(cfg, latent.shape).to(device)
    trainee = Trainee(model, build_objective(cfg, model)).to(device).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.latent.vq.codebook_size, (batch, *latent.shape), generator=g).to(device)
    labels = torch.randint(0, cfg.cond.num_classes, (batch,), generator=g).to(device)
    elapsed = []
    for step in range(warmup + iters):
        draws = StepDraws.draw(trainee.objective, latent, batch, 0, step, False, device)
        start = time.perf_counter()
        loss, _ = trainee(x0, labels, step, draws)
        loss.mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(elapsed[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart_mage.yaml")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old tree")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(worker(args.config, args.worker, args.batch, args.warmup, args.iters))
        return
    family = Path(args.config).stem.split("_")[-1]  # quickstart_mage -> mage, the model section of the dropout
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        trees = {"old": old, "new": str(REPO)}
        times = {(tree, p): [] for tree in trees for p in args.dropouts}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for _ in range(args.rounds):
            for tree, p in times:
                cmd = [sys.executable, __file__, "--config", str(REPO / args.config), "--batch", str(args.batch),
                       "--warmup", str(args.warmup), "--iters", str(args.iters),
                       "--worker", f"model.{family}.dropout={p}"]
                out = subprocess.run(cmd, cwd=trees[tree], env={**env, "PYTHONPATH": trees[tree]}, check=True,
                                     capture_output=True, text=True).stdout
                times[tree, p].append(float(out.split()[-1]))
    for (tree, p), ms in times.items():
        print(f"{tree} dropout {p}: {statistics.median(ms):.1f} ms per step (rounds: "
              f"{', '.join(f'{m:.1f}' for m in ms)})")


if __name__ == "__main__":
    main()
