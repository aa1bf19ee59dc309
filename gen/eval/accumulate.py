"""Per-process feature accumulation and its reduction across processes (the float64 statistics of guided-diffusion
evaluator.py, made summable; samples keyed by the global index of DiT sample_ddp.py / REPA generate.py).

An `Accumulator` runs uint8 image batches through the feature networks and keeps, per feature, what the metrics
need: float64 Gaussian statistics (summed across processes), the features themselves (gathered, for
precision/recall only) and the Inception Score's per-split sums (keyed by global sample index). `reduce` joins the
collectives in a fixed order on every process and returns the totals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from gen.eval.collective import Collective
from gen.eval.frechet import GaussianStats
from gen.eval.scores import SplitEntropySums


@dataclass
class Features:
    """Totals over all processes of one image set."""

    count: int
    stats: dict[str, GaussianStats] = field(default_factory=dict)
    gathered: dict[str, Tensor] = field(default_factory=dict)  # rows in global index order
    splits: SplitEntropySums | None = None


class Accumulator:
    """Running features of this process's share of an image set."""

    def __init__(self, networks: dict[str, nn.Module], stats=(), gather=(), splits: str | None = None,
                 split_size: int = 5000, device: torch.device | str = "cpu"):
        wanted = set(stats) | set(gather) | ({splits} if splits else set())
        # Only the networks that provide a wanted feature run (e.g. no DINOv2 forward for FID alone).
        self.networks = {name: net for name, net in networks.items() if wanted & set(net.dims)}
        self.dims = {f: d for net in self.networks.values() for f, d in net.dims.items()}
        missing = wanted - set(self.dims)
        if missing:
            raise ValueError(f"no feature network provides {sorted(missing)}")
        self.device = torch.device(device)
        self.stats = {f: GaussianStats(self.dims[f], self.device) for f in sorted(stats)}
        self.gather = {f: [] for f in sorted(gather)}
        self.index: list[Tensor] = []
        self.split_feature = splits
        self.splits = SplitEntropySums(self.dims[splits], split_size, self.device) if splits else None
        self.count = 0

    @torch.no_grad()
    def update(self, images: Tensor, index: Tensor) -> None:
        """Add uint8 images (N, 3, H, W) with their global sample indices (N,)."""
        images, index = images.to(self.device), index.to(self.device, torch.long)
        feats = {}
        for net in self.networks.values():
            feats.update(net(images))
        for f, st in self.stats.items():
            st.update(feats[f])
        for f, parts in self.gather.items():
            parts.append(feats[f])
        if self.gather:
            self.index.append(index)
        if self.splits is not None:
            self.splits.update(feats[self.split_feature], index)
        self.count += len(images)

    def reduce(self, comm: Collective) -> Features:
        """Totals over all processes (every process must call this); leaves the running state untouched."""
        total = comm.sum_(torch.tensor([float(self.count)], dtype=torch.float64, device=self.device))
        stats = {f: GaussianStats.from_state({k: comm.sum_(v) for k, v in st.state().items()})
                 for f, st in self.stats.items()}
        gathered = {}
        if self.gather:
            index = comm.cat(torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long,
                                                                                   device=self.device))
            order = torch.argsort(index)  # global index order: the same rows whatever the process count
            for f, parts in self.gather.items():
                local = torch.cat(parts) if parts else torch.zeros(0, self.dims[f], device=self.device)
                gathered[f] = comm.cat(local)[order]
        splits = None
        if self.splits is not None:
            n = comm.max(len(self.splits.count), self.device)
            splits = SplitEntropySums(self.splits.num_classes, self.splits.split_size, self.device)
            splits.count, splits.plogp, splits.prob = [comm.sum_(t.clone()) for t in self.splits.tensors(n)]
        return Features(round(float(total.item())), stats, gathered, splits)


def shard(n: int, rank: int, world: int) -> range:
    """This process's contiguous block of [0, n)."""
    return range(n * rank // world, n * (rank + 1) // world)


def feed(update, source, indices, batch_size: int, comm: Collective, desc: str) -> None:
    """Run this process's contiguous share of `indices` of an image source through update(images, index)."""
    indices = np.asarray(indices, dtype=np.int64)
    part = shard(len(indices), comm.rank, comm.world)
    mine = indices[part.start:part.stop]
    bar = tqdm(total=len(mine), desc=desc, disable=comm.rank != 0, leave=False)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        images = torch.from_numpy(source.read(idx)).permute(0, 3, 1, 2).contiguous()  # NHWC file -> NCHW memory
        update(images, torch.from_numpy(idx))
        bar.update(len(idx))
    bar.close()
