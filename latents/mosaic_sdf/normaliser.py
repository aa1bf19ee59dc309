"""Per-column standardisation of Mosaic-SDF tokens, pooled over every row of every shape.

Yariv et al. (CVPR 2024, arXiv 2312.09222) train on the token matrices; how they normalise them was not checked,
so this scheme is this implementation's choice. Because the statistics pool all rows, they do
not depend on row order, and the standardised set stays a set. The half-side column is optionally taken as log s
first, so that a de-normalised sample always has s > 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from latents.mosaic_sdf.representation import HEAD

SCALE_COLUMN = HEAD - 1
"""Index of the half-side column in a token."""


class ColumnNormaliser:
    """Running float64 sums of the token columns (mergeable across shards and processes) and the resulting
    standardisation z = (t - mean) / std, per column; identity until fitted."""

    def __init__(self, width: int, log_scale: bool = True, min_std: float = 1e-6):
        self.width = int(width)
        self.log_scale = bool(log_scale)
        self.min_std = float(min_std)
        self.count = 0
        self.sum = torch.zeros(self.width, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.width, dtype=torch.float64)
        self.mean = torch.zeros(self.width)
        self.std = torch.ones(self.width)

    def _transform(self, tokens: Tensor) -> Tensor:
        if not self.log_scale:
            return tokens
        head, scale, tail = tokens[..., :SCALE_COLUMN], tokens[..., SCALE_COLUMN:HEAD], tokens[..., HEAD:]
        return torch.cat([head, scale.clamp_min(1e-12).log(), tail], dim=-1)

    def _inverse_transform(self, tokens: Tensor) -> Tensor:
        if not self.log_scale:
            return tokens
        head, scale, tail = tokens[..., :SCALE_COLUMN], tokens[..., SCALE_COLUMN:HEAD], tokens[..., HEAD:]
        return torch.cat([head, scale.exp(), tail], dim=-1)

    def update(self, tokens: Tensor) -> ColumnNormaliser:
        """Add the rows of tokens (..., width) to the running sums and refresh mean and std."""
        if tokens.shape[-1] != self.width:
            raise ValueError(f"tokens of width {tokens.shape[-1]} for a normaliser of width {self.width}")
        rows = self._transform(tokens.detach()).reshape(-1, self.width).to("cpu", torch.float64)
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sum_sq += (rows * rows).sum(0)
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean * mean).clamp_min(0)
        self.mean = mean.float()
        self.std = var.sqrt().clamp_min(self.min_std).float()
        return self

    def encode(self, tokens: Tensor) -> Tensor:
        """Raw tokens (..., width) -> standardised tokens."""
        return (self._transform(tokens) - self.mean.to(tokens)) / self.std.to(tokens)

    def decode(self, z: Tensor) -> Tensor:
        """Standardised tokens (..., width) -> raw tokens (half sides > 0 when log_scale)."""
        return self._inverse_transform(z * self.std.to(z) + self.mean.to(z))

    def state_dict(self) -> dict:
        """Mean and std (float32, (width,)), the log-scale flag and the row count behind them."""
        return {"mean": self.mean.clone(), "std": self.std.clone(), "log_scale": self.log_scale, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict's output (the running sums are not restored: a loaded normaliser is final)."""
        mean, std = torch.as_tensor(state["mean"]).float(), torch.as_tensor(state["std"]).float()
        if mean.shape != (self.width,) or std.shape != (self.width,):
            raise ValueError(f"normaliser statistics of shape {tuple(mean.shape)} for token width {self.width}")
        if bool(state["log_scale"]) != self.log_scale:
            raise ValueError(f"normaliser statistics with log_scale={state['log_scale']} for a normaliser with "
                             f"log_scale={self.log_scale}")
        self.mean, self.std, self.count = mean, std, int(state["count"])
