"""The three collectives the metrics need, over torch.distributed when it is initialised (accelerate does), else local.

Statistics are summed (all-reduce of plain float64 tensors, the sums behind guided-diffusion evaluator.py's np.mean /
np.cov), features are gathered only for precision/recall, and every rank joins each collective in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Collective:
    """all-reduce / all-gather / broadcast across the processes of a job; `enabled=False` keeps everything local."""

    def __init__(self, enabled: bool | None = None):
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.enabled = active if enabled is None else bool(enabled) and active
        self.world = dist.get_world_size() if self.enabled else 1
        self.rank = dist.get_rank() if self.enabled else 0

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over processes."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, value: int, device: torch.device) -> int:
        """Largest value over processes."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def cat(self, tensor: Tensor) -> Tensor:
        """Concatenation over processes (rank order) of tensors whose first dimension may differ."""
        if not self.enabled:
            return tensor
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(tensor)], dtype=torch.long, device=tensor.device))
        sizes = [int(s.item()) for s in sizes]
        if max(sizes) == 0:
            return tensor
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def broadcast(self, obj):
        """Rank 0's Python object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
