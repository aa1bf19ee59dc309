"""The latent-space interface and the shared [-1, 1] -> uint8 quantisation."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from gen.io import atomic_write


def _round(x: Tensor) -> Tensor:
    # DiT/SiT sample_ddp.py: clamp(127.5 x + 128, 0, 255) then a truncating cast; the +0.5 hidden in
    # 128 = 127.5 + 0.5 makes truncation a round-half-up of 127.5 (x + 1).
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)


def _floor(x: Tensor) -> Tensor:
    # REPA generate.py: clamp(255 (x + 1) / 2, 0, 255) then a truncating cast, i.e. floor; values sit
    # about half a level below DiT/SiT's and FID moves slightly (DiT/SiT sample_ddp.py round: clamp(127.5 x + 128)).
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
    """A space the generative model runs in: cacheable raw encoding, per-step model input, decoding, and how its
    samples are shown (`render`) and stored (`to_storage`, `save_samples`)."""

    name: str = ""
    """Registry key in latents.LATENTS (recorded in caches; config section latent.<name> with '-' as '_')."""
    Config: ClassVar[type]
    """The space's config dataclass (a gen.config.ComponentConfig)."""
    kind: ClassVar[str] = "continuous"
    """Values the objective sees: continuous, binary or tokens (objectives declare the kinds they take)."""
    layout: ClassVar[str] = "grid"
    """Sample layout the backbone sees: grid (C, H, W), set (n, d) or id_grid (h, w) of int64 token ids (backbone
    families declare theirs)."""
    modality: ClassVar[str] = "image"
    """What decoded samples are (image, shape): picks the metric suite and the sample file format."""
    raw_dtype: ClassVar[torch.dtype] = torch.float32
    """dtype of encode_raw's output, i.e. of a cache's shards (float32 moments, uint8 bits, int64 token ids)."""
    fitted: ClassVar[bool] = False
    """Whether `to_model` uses statistics fitted to the training data (`fit`): prepare.py then fits them over the
    whole cache and stores `state_dict()` with it (gen.data.LATENT_STATE), train.py loads them from there."""
    DRAWS: ClassVar[dict[str, str]] = {}
    """Random inputs of `to_model` (e.g. posterior noise): name -> "sample" or "batch", drawn by `draw`."""
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
    def to_model(self, raw: Tensor, generator: torch.Generator | None = None, **draws: Tensor) -> Tensor:
        """Raw encodings (N, *raw_shape) -> model inputs (N, *shape), with the given `draws` (as `draw` makes them)
        or randomness from `generator`."""

    def fit(self, raw: Tensor) -> LatentSpace:
        """Add raw encodings (N, *raw_shape) to the fitted statistics (spaces with `fitted`; called once per shard)."""
        return self

    def draw(self, n: int, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """The random inputs of `to_model` for n samples (the trainer draws them with the step's other draws)."""
        return {}

    @abstractmethod
    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """Model-space samples (N, *shape) -> the modality's samples (images: uint8 (N, 3, H, W))."""

    def render(self, samples: Tensor) -> Tensor:
        """Decoded samples -> uint8 pictures (N, 3, H, W) for preview grids and TensorBoard (images: themselves)."""
        return samples

    def to_storage(self, samples: Tensor) -> np.ndarray:
        """Decoded samples -> the rows sample.py stores (images: uint8 NHWC, as the ADM evaluator reads them)."""
        return samples.permute(0, 2, 3, 1).cpu().numpy()

    def from_storage(self, rows: np.ndarray) -> Tensor:
        """Stored rows -> decoded samples (for grids and metrics computed after sampling)."""
        return torch.from_numpy(np.asarray(rows)).permute(0, 3, 1, 2)

    def save_samples(self, path: Path, rows: np.ndarray, labels: np.ndarray) -> Path:
        """Write all stored rows and their labels atomically (images: ADM .npz with arr_0 and arr_1)."""
        return atomic_write(path, lambda tmp: np.savez(tmp, arr_0=rows, arr_1=labels))

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
        """Normalisation statistics (never network weights), stored in every training checkpoint and restored by
        train.py --resume and sample.py."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise KeyError(f"{type(self).__name__} has no state {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)
