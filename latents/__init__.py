"""Latent spaces the generative models run in, and the registry configs name them by."""
from __future__ import annotations

from latents.base import ROUNDING, LatentSpace, to_uint8
from latents.binary import BinaryLatents
from latents.mosaic_sdf import MosaicSDFSpace
from latents.pixel import PixelSpace
from latents.sd_vae import SDVAE
from latents.vq import VQLatents

LATENTS: dict[str, type[LatentSpace]] = {cls.name: cls for cls in (PixelSpace, SDVAE, BinaryLatents, MosaicSDFSpace,
                                                                         VQLatents)}
"""Latent spaces by the name `latent.name` takes (config section latent.<name with '-' as '_'>)."""


def build_latent(cfg) -> LatentSpace:
    """The latent space of a run from cfg.latent and cfg.data (image size; channels for pixels); weights stay
    unloaded."""
    from gen.config import choose

    return choose("latent", cfg.latent.name, "latent.name").from_config(cfg)


__all__ = ["LATENTS", "ROUNDING", "SDVAE", "BinaryLatents", "LatentSpace", "PixelSpace", "VQLatents", "build_latent",
           "to_uint8"]
