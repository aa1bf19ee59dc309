"""The latent-space interface and the shared [-1, 1] -> uint8 quantisation."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _round(x: Tensor) -> Tensor:
    # DiT/SiT sample_ddp.py: clamp(127.5 x + 128, 0, 255) then a truncating cast; the +0.5 hidden in
    # 128 = 127.5 + 0.5 makes truncation a round-half-up of 127.5 (x + 1).
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)


def _floor(x: Tensor) -> Tensor:
    # REPA generate.py: clamp(255 (x + 1) / 2, 0, 255) then a truncating cast, i.e. floor; values sit
    # about half a level below DiT/SiT's and FID moves slightly (spec section 9).
    return (255.0 * (x + 1.0) / 2.0).clamp(0, 255).to(torch.uint8)


ROUNDING = {"round": _round, "floor": _floor}
"""Pixel quantisation conventions by the name `sample.rounding` takes."""


def to_uint8(x: Tensor, rounding: str = "round") -> Tensor:
    """Quantise images in [-1, 1] to uint8 with a named convention from ROUNDING."""
    if rounding not in ROUNDING:
        raise ValueError(f"unknown rounding {rounding!r}; one of {sorted(ROUNDING)} (config key sample.rounding)")
    # float32 at least: bf16 cannot hold 127.5 x + 128 to one level.
    x = x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()
    return ROUNDING[rounding](x)


class LatentSpace(ABC):
    """A space the generative model runs in: cacheable raw encoding, per-step model input, decoding to pixels."""

    name: str = ""
    """Registry key in latents.LATENTS (recorded in caches)."""
    kind: str = "continuous"
    """What objectives can run on it: continuous, binary, tokens or set."""
    shape: tuple[int, ...] = ()
    """Per-sample shape the model sees, e.g. (4, 32, 32)."""
    raw_shape: tuple[int, ...] = ()
    """Per-sample shape of encode_raw's output, i.e. what a cache stores, e.g. (8, 32, 32)."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg) -> LatentSpace:
        """The latent space a gen.config.Config describes (weights stay unloaded)."""

    @abstractmethod
    def encode_raw(self, images: Tensor) -> Tensor:
        """Deterministic, cacheable encoding of uint8 images (N, C, H, W) -> float32 (N, *raw_shape)."""

    @abstractmethod
    def to_model(self, raw: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Raw encodings (N, *raw_shape) -> model inputs (N, *shape), with `noise` (N, *shape) or noise from `generator`."""

    @abstractmethod
    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """Model-space samples (N, *shape) -> uint8 images (N, 3, H, W)."""

    @abstractmethod
    def settings(self) -> dict:
        """The constructor settings, recorded in a cache's meta.json so a cache names what made it."""

    def encode(self, images: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """On-the-fly encoding: uint8 images -> model inputs."""
        return self.to_model(self.encode_raw(images), generator=generator, noise=noise)

    def load_weights(self, device: torch.device | str = "cpu") -> LatentSpace:
        """Load any pretrained weights now (they otherwise load on first use), so a missing file fails early."""
        return self

    def state_dict(self) -> dict:
        """Normalisation statistics (never network weights), stored in training checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise KeyError(f"{type(self).__name__} has no state {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)
