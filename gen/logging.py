"""Picture grids and device-side running means (logged every N steps, no per-step host sync)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gen.io import atomic_write, atomic_write_text, to_rgb


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, 3, H, W) -> one uint8 (H', W', 3) grid, `nrow` images per row (default: square)."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    images = to_rgb(images)
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return grid


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 images atomically."""
    grid = Image.fromarray(make_grid(images, nrow))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


class RunningMeans:
    """Sums of named per-sample values kept on the device; read (and reset) only when logging."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, name: str, values: Tensor) -> None:
        """Accumulate a (N,) tensor of per-sample values without synchronising."""
        values = values.detach().float()
        if name not in self.sums:
            self.sums[name] = torch.zeros((), device=values.device)
            self.counts[name] = torch.zeros((), device=values.device)
        self.sums[name] += values.sum()
        self.counts[name] += values.numel()

    def pop(self, reduce=lambda t: t) -> dict[str, float]:
        """Means since the last pop; `reduce` sums tensors across processes (e.g. accelerator.reduce)."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names] + [self.counts[n] for n in names])
        stacked = reduce(stacked).cpu()
        self.sums, self.counts = {}, {}
        k = len(names)
        return {n: (stacked[i] / stacked[k + i]).item() for i, n in enumerate(names)}


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Drop the records of steps after `last_step` (logged by a run that died before its next checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (the scalar log read by tests and quick plots, next to TensorBoard's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # name the file (a full disk raises from write/close without one)
        raise OSError(err.errno, err.strerror, str(path)) from err
