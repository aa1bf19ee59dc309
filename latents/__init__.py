"""Latent spaces the generative models run in, and the registry configs name them by."""
from __future__ import annotations

from latents.base import ROUNDING, LatentSpace, to_uint8
from latents.pixel import PixelSpace
from latents.sd_vae import SDVAE

LATENTS: dict[str, type[LatentSpace]] = {"pixel": PixelSpace, "sd-vae": SDVAE}
"""Latent spaces by the name `latent.name` takes."""


def _pixel(cfg) -> LatentSpace:
    from gen.data import dataset_channels  # lazy: gen.data builds latents for cache checks

    return PixelSpace(dataset_channels(cfg), cfg.data.image_size)


def _sd_vae(cfg) -> LatentSpace:
    return SDVAE(cfg.latent.vae_path, cfg.data.image_size, scale=cfg.latent.scale)


_BUILDERS = {"pixel": _pixel, "sd-vae": _sd_vae}


def build_latent(cfg) -> LatentSpace:
    """The latent space of a run from cfg.latent and cfg.data (image size; channels for pixels); weights stay unloaded."""
    if cfg.latent.name not in _BUILDERS:
        from gen.config import ConfigError

        raise ConfigError(f"config key 'latent.name': unknown latent space {cfg.latent.name!r}; one of {sorted(LATENTS)}")
    return _BUILDERS[cfg.latent.name](cfg)


__all__ = ["LATENTS", "ROUNDING", "SDVAE", "LatentSpace", "PixelSpace", "build_latent", "to_uint8"]
