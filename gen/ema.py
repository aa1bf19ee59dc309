"""Exponential moving average of a model's weights, updated with one foreach lerp per step."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An EMA copy of `model` (every parameter, frozen ones such as pos_embed included; buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # initialised as a copy (DiT, REPA)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * online, for all parameters at once."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from `model`'s current weights (ERW's transition), keeping this copy's identity."""
        self.model.load_state_dict(model.state_dict(), strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights (the network's own state-dict keys)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the EMA weights strictly."""
        self.model.load_state_dict(state, strict=True)
