"""The backbone contract every family implements (docs/architecture.md, "Backbone").

A family is one `Backbone` subclass in its own module: it declares the latent layouts it takes, its config section
(`model.<KEY>`), the model names it registers (`MODELS`, merged into gen.models.MODELS) and builds itself from the
config and the latent's per-sample shape. Aligners and jobs read only what is declared here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn


class BackboneOutput(NamedTuple):
    """Network output (None when stopped early) and the token states after the requested blocks."""

    out: Tensor | None  # the prediction, shaped like the input (or wider: e.g. DiT's learned variance)
    feats: dict[int, Tensor]  # block index k (1-based) -> (N, T, D)


class ImageFeatures(NamedTuple):
    """An image encoder's features of real images: the cls token (None without one) and the grid tokens."""

    cls: Tensor | None  # (N, D)
    tokens: Tensor  # (N, T, D)


class Backbone(nn.Module, ABC):
    """A denoising network: `forward(x, t, cond, taps=, stop_at=)` with tapped token features."""

    KEY: ClassVar[str]
    """Registry key in gen.models.FAMILIES and the config section model.<KEY>."""
    Config: ClassVar[type]
    """The family's config dataclass (a gen.config.ComponentConfig)."""
    LAYOUTS: ClassVar[tuple[str, ...]]
    """Latent layouts it takes (latents.LatentSpace.layout): "grid" (C, H, W), "set" (n, d) or "id_grid" (h, w)
    token ids."""
    MODELS: ClassVar[dict[str, Callable[..., Backbone]]]
    """Model names it registers -> constructors taking keyword overrides."""
    SIZES_OF: ClassVar[dict[str, str]] = {}
    """Model name -> size tag (S, B, L, XL) that methods key their per-size defaults on."""
    TEXT: ClassVar[bool] = False
    """Whether it reads text tokens (gen.cond.Cond.text; built with cond.text_dim > 0)."""

    ENCODES_IMAGES: ClassVar[bool] = False
    """Whether `encode_images` gives features of real images (a pixel encoder, e.g. ADDP's): what the linear probe
    (gen.eval.probe) reads."""

    learn_sigma: bool = False  # whether the output carries a variance after the prediction (DiT's 2C channels)
    null_class: int | None  # the label meaning "unconditional", None for an unconditional model
    num_blocks: int  # tappable blocks 1..num_blocks
    sample_shape: tuple[int, ...]  # per-sample input shape
    token_grid: tuple[int, int] | None  # (rows, cols) of the token grid, None for token sets

    @classmethod
    @abstractmethod
    def from_config(cls, cfg, sample_shape: tuple[int, ...]) -> Backbone:
        """The backbone cfg.model.name names, with cfg.model.<KEY>'s options, for samples of `sample_shape`."""

    @classmethod
    @abstractmethod
    def config_blocks(cls, cfg) -> int:
        """How many blocks the configured model has, without building it (config validation)."""

    @abstractmethod
    def token_width(self, block: int) -> int:
        """Width D of the tokens after `block` (1-based)."""

    @abstractmethod
    def warm_parameters(self, blocks: int) -> tuple[str, ...]:
        """Name prefixes of the parameters that the tokens after `blocks` depend on (embedders, first blocks)."""

    @abstractmethod
    def forward(self, x: Tensor, t: Tensor, cond, *, taps: Iterable[int] = (),
                stop_at: int | None = None) -> BackboneOutput:
        """Denoise x at time t under `cond` (a gen.cond.Cond); feats[k] for k in taps; stop after block stop_at."""

    def encode_images(self, images: Tensor) -> ImageFeatures:
        """Families with `ENCODES_IMAGES`: the encoder's features of real images (N, 3, H, W) in [0, 1], H and W the
        training images' size."""
        raise NotImplementedError(f"{type(self).__name__} has no image encoder (ENCODES_IMAGES is False)")

    def compile_regions_for(self, setting: bool | None, device) -> bool:
        """Compile (compile_regions) as train.compile / sample.compile say: True, False, or None for "on a GPU
        only"; returns whether it did."""
        wanted = torch.device(device).type == "cuda" if setting is None else bool(setting)
        if wanted:
            self.compile_regions()
        return wanted

    def compile_regions(self, **options) -> None:
        """torch.compile this network in place (parameter names, hence checkpoints and the EMA, stay those of the
        plain module). The base compiles the whole forward; families made of repeated blocks override it to compile
        each block, one compiled graph that every block reuses, a fraction of the compile time."""
        self.compile(**options)

    def check_taps(self, taps: frozenset[int], stop_at: int | None) -> int:
        """The last block to run, after checking taps and stop_at lie within 1..num_blocks."""
        last = self.num_blocks if stop_at is None else stop_at
        if any(k < 1 or k > self.num_blocks for k in taps) or not 1 <= last <= self.num_blocks:
            raise ValueError(f"taps {sorted(taps)} / stop_at {stop_at} must lie in 1..{self.num_blocks}")
        if stop_at is not None and any(k > stop_at for k in taps):
            raise ValueError(f"taps {sorted(taps)} go deeper than stop_at={stop_at}")
        return last


def require_grid(model: Backbone, who: str) -> tuple[int, int]:
    """The backbone's token grid, or a clear error for methods that need one (image-encoder targets)."""
    if model.token_grid is None:
        raise ValueError(f"{who} aligns tokens to an image encoder's patch grid, but backbone {type(model).__name__} "
                         f"has a token set with no grid; use an aligner that needs no image encoder (e.g. sra)")
    return model.token_grid
