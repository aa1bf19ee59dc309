"""Pixel space: the model runs on the [-1, 1] image itself (ADM's x / 127.5 - 1)."""
from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass

from gen.config import ComponentConfig
from gen.io import to_rgb
from latents.base import LatentSpace, to_uint8


@dataclass
class PixelConfig(ComponentConfig):
    """Pixels in [-1, 1]: no keys of its own (channels from the dataset, size from data.image_size)."""


class PixelSpace(LatentSpace):
    """Images scaled to [-1, 1]; the raw encoding is already the model input."""

    name = "pixel"
    Config = PixelConfig

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

    def to_model(self, raw: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Identity: pixels need no posterior sample or normalisation."""
        return raw

    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """[-1, 1] -> uint8 (N, 3, H, W); one-channel images are repeated to RGB for grids and Inception."""
        return to_rgb(to_uint8(z, rounding)).contiguous()

    def settings(self) -> dict:
        """Channels and image size."""
        return {"channels": self.channels, "image_size": self.image_size}
