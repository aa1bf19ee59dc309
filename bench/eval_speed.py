"""Evaluation speed: the Frechet distance at 2048-d (symmetric eigh route vs scipy sqrtm) and Inception images/s.

    python bench/eval_speed.py                     # FD on N = 10K synthetic 2048-d features, both routes; Inception
    python bench/eval_speed.py --skip-sqrtm        # the sqrtm route takes minutes on a small CPU

Synthetic features: correlated Gaussians (10K x 2048 through a random mixing matrix), statistics accumulated in
float64 by GaussianStats, as the metrics do. The sqrtm route is ADM's formula (scipy.linalg.sqrtm of the product,
real part). Inception: random-init weights with the published file's layout (timing does not depend on the values),
uint8 256 x 256 inputs through the TF1 resize to 299; on the CPU and, when there is one, on the GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from gen.eval.frechet import GaussianStats, frechet_distance
from gen.eval.inception import InceptionFeatures, save_random_inception


def sqrtm_route(mu1, s1, mu2, s2) -> float:
    """ADM / pytorch-fid: Tr sqrtm(S1 S2), real part."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy >= 1.16 deprecation chatter
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def timed(fn, repeats: int, *args):
    """fn(*args) and the wall-clock seconds of each of `repeats` runs (shared machines are noisy: report all)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return out, times


def fmt(times: list[float]) -> str:
    return f"best {min(times):.2f} s of {len(times)} ({', '.join(f'{t:.2f}' for t in times)})"


def bench_frechet(n: int, dim: int, skip_sqrtm: bool, repeats: int) -> None:
    """Time both routes on two sets of n synthetic dim-d features."""
    g = torch.Generator().manual_seed(0)
    stats = []
    t0 = time.perf_counter()
    for shift in (0.0, 0.1):
        mix = torch.randn(dim, dim, generator=g) / dim**0.5
        st = GaussianStats(dim)
        for start in range(0, n, 1000):
            st.update(torch.randn(min(1000, n - start), dim, generator=g) @ mix + shift)
        stats.append((st.mean(), st.cov()))
    print(f"statistics of 2 x {n} x {dim} features (float64 sums): {time.perf_counter() - t0:.1f} s")
    (mu1, s1), (mu2, s2) = stats
    fd, t_eigh = timed(frechet_distance, repeats, mu1, s1, mu2, s2)
    print(f"FD {dim}-d, symmetric eigh route: {fmt(t_eigh)}  (FD = {fd:.6f})")
    if not skip_sqrtm:
        ref, t_sqrtm = timed(sqrtm_route, repeats, mu1, s1, mu2, s2)
        print(f"FD {dim}-d, scipy sqrtm route:    {fmt(t_sqrtm)}  (FD = {ref:.6f}, relative difference "
              f"{abs(fd - ref) / abs(ref):.1e}); eigh is {min(t_sqrtm) / min(t_eigh):.1f}x faster (best runs)")


def bench_inception(device: str, batch: int, batches: int, weights: Path) -> None:
    """Images/s of InceptionFeatures (all three feature sets) on uint8 256 x 256 images."""
    net = InceptionFeatures(weights).to(device)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    net(images)  # warm-up (kernel selection, allocation)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        net(images)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f"Inception features on {device} ({torch.get_num_threads()} threads, batch {batch}): "
          f"{batch * batches / seconds:.1f} images/s")


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="synthetic features per set")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--skip-sqrtm", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each Frechet route")
    parser.add_argument("--cpu-batch", type=int, default=8)
    parser.add_argument("--gpu-batch", type=int, default=200)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    bench_frechet(args.n, args.dim, args.skip_sqrtm, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_random_inception(Path(tmp) / "inception.pth")
        bench_inception("cpu", args.cpu_batch, args.batches, weights)
        if torch.cuda.is_available():
            bench_inception("cuda", args.gpu_batch, args.batches * 5, weights)


if __name__ == "__main__":
    main()
