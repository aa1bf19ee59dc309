"""Scores from features: Frechet distance of statistics, Inception Score by global-index splits, k-NN precision/recall.

Formulas: FID (Heusel et al. 2017), sFID (Nash et al. 2021), Inception Score (Salimans et al. 2016) and improved
precision/recall (Kynkaanniemi et al. 2019, k = 3), with the ADM evaluator's conventions (guided-diffusion
evaluations/evaluator.py).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gen.precision import exact_float32
from gen.eval.frechet import frechet_distance

PR_BLOCK = 10_000  # ADM computes distances in 10,000 x 10,000 blocks; its fp16 -> fp32 fallback is per block
PR_MODES = ("fp16", "fp32")


def frechet_distance_pruned(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance, dropping coordinates whose variance is exactly zero in both Gaussians.

    Exact: such a coordinate has zero rows and columns in both covariances, so it adds only (mu1_i - mu2_i)^2 and a
    zero eigenvalue; the eigendecompositions then run on the live coordinates only (cheaper, same value).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    live = (np.diag(sigma1) != 0) | (np.diag(sigma2) != 0)
    if live.all():
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    dead = ~live
    offset = float(((mu1[dead] - mu2[dead]) ** 2).sum())
    if not live.any():
        return offset
    return offset + frechet_distance(mu1[live], sigma1[np.ix_(live, live)], mu2[live], sigma2[np.ix_(live, live)])


# ---------------------------------------------------------------------------------------------------
# Inception Score


class SplitEntropySums:
    """Per-split float64 sums that give ADM's Inception Score (splits of consecutive global indices).

    For split s with n_s samples: KL_s = mean_x sum_y p(y|x) log p(y|x) - sum_y pbar_s(y) log pbar_s(y), pbar_s =
    mean_x p(y|x), which equals ADM's mean_x KL(p(y|x) || pbar_s). So the sums (n_s, sum_x sum_y p log p,
    sum_x p) are all a split needs: they add across processes, and the score depends only on which global indices
    fall in which split, not on the process count or batch order.
    """

    def __init__(self, num_classes: int, split_size: int, device: torch.device | str = "cpu"):
        self.num_classes, self.split_size, self.device = num_classes, int(split_size), torch.device(device)
        self.count = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.plogp = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.prob = torch.zeros(0, num_classes, dtype=torch.float64, device=self.device)

    def _grow(self, splits: int) -> None:
        extra = splits - len(self.count)
        if extra > 0:
            z = torch.zeros(extra, dtype=torch.float64, device=self.device)
            self.count, self.plogp = torch.cat([self.count, z]), torch.cat([self.plogp, z])
            self.prob = torch.cat([self.prob, torch.zeros(extra, self.num_classes, dtype=torch.float64,
                                                          device=self.device)])

    def update(self, logits: Tensor, index: Tensor) -> None:
        """Add samples: logits (N, C) (softmax applied here, in float64) and their global indices (N,)."""
        split = (index.to(self.device, torch.long) // self.split_size)
        if len(split):
            self._grow(int(split.max()) + 1)
        p = torch.softmax(logits.to(self.device, torch.float64), dim=1)
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        # xlogy: 0 log 0 = 0 (ADM's float32 softmax would give nan for an underflowed probability).
        self.plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.prob.index_add_(0, split, p)

    def tensors(self, splits: int) -> list[Tensor]:
        """(count, plogp, prob) padded to `splits` splits, for an in-place all-reduce(SUM)."""
        self._grow(splits)
        return [self.count, self.plogp, self.prob]

    def score(self) -> dict:
        """{"is": mean over non-empty splits of exp(KL_s), "is_std": their std, "is_splits": count}."""
        keep = self.count > 0
        n, plogp, prob = self.count[keep], self.plogp[keep], self.prob[keep]
        if not len(n):
            raise ValueError("Inception Score of no samples")
        pbar = prob / n[:, None]
        kl = plogp / n - torch.special.xlogy(pbar, pbar).sum(1)
        scores = torch.exp(kl).cpu().numpy()
        return {"is": float(scores.mean()), "is_std": float(scores.std()), "is_splits": len(scores)}


# ---------------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator)


def _distances(a: Tensor, b: Tensor, mode: str) -> Tensor:
    """Squared Euclidean distances max(|a|^2 - 2 a.b + |b|^2, 0) as float32; fp16 mode computes in float16 and
    falls back to float32 for the whole block when any entry is not finite, as ADM's DistanceBlock."""

    def block(dtype):
        x, y = a.to(dtype), b.to(dtype)
        d = (x * x).sum(1, keepdim=True) - 2 * (x @ y.T) + (y * y).sum(1)[None]
        return d.clamp_min(0)

    if mode == "fp16":
        d = block(torch.float16)
        if torch.isfinite(d).all():
            return d.float()
    return block(torch.float32)


def manifold_radii(features: Tensor, k: int = 3, mode: str = "fp16") -> Tensor:
    """Distance of each point to its k-th nearest neighbour in its own set (self excluded), float32 (N,)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, PR_BLOCK):
        rows = features[r0:r0 + PR_BLOCK]
        best = None
        for c0 in range(0, n, PR_BLOCK):
            d = _distances(rows, features[c0:c0 + PR_BLOCK], mode)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        # ADM: the (k+1)-th smallest of a row that includes the point itself (distance ~0) = k-th neighbour.
        radii[r0:r0 + PR_BLOCK] = best[:, k]  # topk values come sorted ascending
    return radii


def precision_recall(reference: Tensor, samples: Tensor, k: int = 3, mode: str = "fp16") -> dict:
    """{"precision", "recall"}: share of samples inside some reference k-NN ball, and of references inside some
    sample ball."""
    if mode not in PR_MODES:
        raise ValueError(f"config key 'eval.pr_mode': {mode!r} is not one of {PR_MODES}")
    reference, samples = reference.float(), samples.to(reference.device).float()
    ref_in = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    smp_in = torch.zeros(len(samples), dtype=torch.bool, device=reference.device)
    with exact_float32(reference.device):  # "fp32" must not silently become TF32 inside a training job
        r_ref, r_smp = manifold_radii(reference, k, mode), manifold_radii(samples, k, mode)
        for r0 in range(0, len(reference), PR_BLOCK):
            for s0 in range(0, len(samples), PR_BLOCK):
                d = _distances(reference[r0:r0 + PR_BLOCK], samples[s0:s0 + PR_BLOCK], mode)  # (R, S)
                smp_in[s0:s0 + PR_BLOCK] |= (d <= r_ref[r0:r0 + PR_BLOCK, None]).any(0)
                ref_in[r0:r0 + PR_BLOCK] |= (d <= r_smp[None, s0:s0 + PR_BLOCK]).any(1)
    return {"precision": float(smp_in.double().mean()), "recall": float(ref_in.double().mean())}
