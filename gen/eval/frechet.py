"""Gaussian feature statistics (float64 running sums, all-reducible) and the Frechet distance between Gaussians.

The distance is FID's (Heusel et al. 2017; guided-diffusion evaluator.py `frechet_distance`), computed differently:
sums are kept in float64 (a one-pass float32 covariance drifts by ~1e-6 at 10K samples), and the trace term uses the
symmetric eigendecomposition route instead of scipy's sqrtm, which is ~20x slower at d = 2048 and has had precision
regressions (SciPy 1.11.2-1.12: scipy issue #19415, pytorch-fid #100); eigvalsh of the non-symmetric product Sigma1
Sigma2 is wrong (torch-fidelity issue #46).
"""
from __future__ import annotations

import numpy as np
import torch


def _as_float64_array(x, name: str) -> np.ndarray:
    """Any numpy array, torch tensor or nested sequence -> float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries")
    return arr


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64 by the symmetric route."""
    mu1, mu2 = _as_float64_array(mu1, "mu1"), _as_float64_array(mu2, "mu2")
    sigma1, sigma2 = _as_float64_array(sigma1, "sigma1"), _as_float64_array(sigma2, "sigma2")
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"means must be 1-d of equal length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    # Symmetrise the inputs: accumulated covariances are symmetric only up to rounding, and eigh reads one triangle.
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    # Tr (S1 S2)^1/2 = sum sqrt(eig(S1 S2)). The product S1 S2 is not symmetric (eigvalsh of it is wrong,
    # torch-fidelity #46), but it is similar to the PSD matrix L^T S2 L for any factor S1 = L L^T: the Cholesky
    # factor when S1 is positive definite (a third of the time of an eigendecomposition), else the symmetric root
    # S1^1/2 from eigh, eigenvalues clamped at 0 so that a singular (N < d) covariance stays finite.
    try:
        factor = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        lam, u = np.linalg.eigh(sigma1)
        factor = (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T
    m = factor.T @ sigma2 @ factor
    m = 0.5 * (m + m.T)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class GaussianStats:
    """Running count, float64 sum and float64 sum of outer products of feature vectors; mergeable across shards."""

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None):
        self.dim = dim
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        if dim is not None:
            self._allocate(dim, self.device or torch.device("cpu"))

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.dim, self.device = dim, device
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features) -> GaussianStats:
        """Add a batch of feature vectors (N, D), numpy or torch; returns self."""
        x = torch.as_tensor(features)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
        if self.sum is None:
            self._allocate(x.shape[1], self.device or x.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have width {x.shape[1]}, these statistics have width {self.dim}")
        x = x.to(self.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: GaussianStats) -> GaussianStats:
        """New statistics of the union of both sample sets."""
        if other.sum is None:
            return self._copy()
        if self.sum is None:
            return other._copy()
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of width {self.dim} and {other.dim}")
        out = GaussianStats(self.dim, self.device)
        out.count = self.count + other.count
        out.sum = self.sum + other.sum.to(self.device)
        out.outer = self.outer + other.outer.to(self.device)
        return out

    __add__ = merge

    def _copy(self) -> GaussianStats:
        out = GaussianStats(device=self.device)
        out.dim, out.count = self.dim, self.count
        if self.sum is not None:
            out.sum, out.outer = self.sum.clone(), self.outer.clone()
        return out

    def mean(self) -> np.ndarray:
        """Sample mean, float64 (D,)."""
        if self.count < 1:
            raise ValueError("mean of empty statistics")
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased (n - 1) sample covariance, float64 (D, D), as np.cov and the ADM reference files use."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        mu = self.sum / self.count
        c = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return (0.5 * (c + c.T)).cpu().numpy()

    def state(self) -> dict[str, torch.Tensor]:
        """Copies as plain float64 tensors (count, sum, outer), ready for an in-place all-reduce(SUM)."""
        if self.sum is None:
            raise ValueError("state of statistics with unknown width: pass dim= so empty shards can join the reduce")
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.device)
        # Copies, so an in-place all-reduce never leaves this object with reduced sums but the local count.
        return {"count": count, "sum": self.sum.clone(), "outer": self.outer.clone()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> GaussianStats:
        """Rebuild statistics from state() tensors (e.g. after an all-reduce)."""
        s, outer = state["sum"].to(torch.float64), state["outer"].to(torch.float64)
        out = cls(s.shape[0], s.device)
        out.count = round(float(state["count"]))
        out.sum, out.outer = s.clone(), outer.clone()
        return out

    def frechet_distance(self, other: GaussianStats) -> float:
        """Frechet distance between the Gaussians fitted to these and to the other statistics."""
        return frechet_distance(self.mean(), self.cov(), other.mean(), other.cov())
