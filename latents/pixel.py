"""Pixel space: the model runs on the [-1, 1] image itself (ADM's x / 127.5 - 1)."""
from __future__ import annotations

import torch
from torch import Tensor

from latents.base import LatentSpace, to_uint8


class PixelSpace(LatentSpace):
    """Images scaled to [-1, 1]; the raw encoding is already the model input."""

    name = "pixel"
    kind = "continuous"

    def __init__(self, channels: int, image_size: int):
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.shape = (self.channels, self.image_size, self.image_size)
        self.raw_shape = self.shape

    @classmethod
    def from_config(cls, cfg) -> PixelSpace:
        """Channels from the configured dataset (digits 1, image folders 3), size from cfg.data.image_size."""
        from gen.data import dataset_channels  # lazy: gen.data builds latents for cache checks

        return cls(dataset_channels(cfg), cfg.data.image_size)

    def encode_raw(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float32 in [-1, 1]."""
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"pixel space expects images of shape {self.shape}, got {tuple(images.shape[1:])}")
        return images.to(torch.float32) / 127.5 - 1.0

    def to_model(self, raw: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Identity: pixels need no posterior sample or normalisation."""
        return raw

    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """[-1, 1] -> uint8 (N, 3, H, W); one-channel images are repeated to RGB for grids and Inception."""
        images = to_uint8(z, rounding)
        return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images

    def settings(self) -> dict:
        """Channels and image size."""
        return {"channels": self.channels, "image_size": self.image_size}
