"""Stable Diffusion's KL autoencoder (diffusers AutoencoderKL), used the way REPA uses it.

Raw encoding = posterior mean ‖ std of the [-1, 1] image, (8, H/8, W/8) float32, as REPA's
`preprocessing/encoders.py` stores it; each training step draws z = (mean + std·ε)·0.18215
(REPA train.py `sample_posterior` and `latents_scale`: bias 0, one scale for all channels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gen.config import ComponentConfig, check
from gen.io import BadFile, to_rgb
from gen.validation import in_range
from latents.base import LatentSpace, to_uint8

FACTOR = 8
"""Spatial downsampling of the SD VAE (4 blocks, 3 of them halving)."""
LATENT_CHANNELS = 4
"""Channels of an SD VAE latent."""

_PUBLISHED = (
    "the weights are published on the Hugging Face Hub as stabilityai/sd-vae-ft-ema (REPA's decoder for "
    "evaluation) and stabilityai/sd-vae-ft-mse (same encoder); download one once on a machine with network "
    "access (huggingface_hub.snapshot_download('stabilityai/sd-vae-ft-ema')) and copy the folder here, "
    "then pass its path with latent.sd_vae.vae_path=/path/to/sd-vae-ft-ema"
)


@dataclass
class SDVAEConfig(ComponentConfig):
    """Stable Diffusion's VAE (diffusers AutoencoderKL), f = 8, 4 channels."""

    vae_path: Optional[str] = None
    """Local diffusers folder of AutoencoderKL, or a repo id already in the local HF cache."""
    scale: float = 0.18215
    """Latent scale factor applied to posterior samples (SD's 0.18215, one for all channels)."""

    def validate(self, cfg) -> None:
        """A positive scale and an image size the VAE's downsampling divides."""
        in_range("latent.sd_vae.scale", self.scale, 0.0, above=True)
        check(cfg.data.image_size % FACTOR == 0, "data.image_size",
              f"{cfg.data.image_size} is not divisible by the SD VAE's downsampling factor {FACTOR}")


class SDVAE(LatentSpace):
    """SD-VAE latents: cached posterior moments, a fresh posterior sample times `scale` per step."""

    name = "sd-vae"
    Config = SDVAEConfig
    DRAWS = {"noise": "sample"}

    def __init__(self, vae_path: str | None, image_size: int, scale: float = 0.18215, batch_size: int = 64):
        if image_size % FACTOR:
            raise ValueError(f"sd-vae needs data.image_size divisible by {FACTOR}, got {image_size}")
        self.vae_path = None if vae_path is None else str(vae_path)
        self.image_size = int(image_size)
        self.scale = float(scale)
        self.batch_size = int(batch_size)
        side = self.image_size // FACTOR
        self.shape = (LATENT_CHANNELS, side, side)
        self.raw_shape = (2 * LATENT_CHANNELS, side, side)
        self._vae = None

    @classmethod
    def from_config(cls, cfg) -> SDVAE:
        """From cfg.latent.sd_vae (weights path, scale) and cfg.data.image_size; the weights stay unloaded."""
        return cls(cfg.latent.sd_vae.vae_path, cfg.data.image_size, scale=cfg.latent.sd_vae.scale)

    # -- weights -------------------------------------------------------------------------------

    def load_weights(self, device: torch.device | str = "cpu") -> SDVAE:
        """Load the AutoencoderKL from a local folder or the local HF cache (never the network) onto `device`."""
        if self._vae is None:
            self._vae = self._load()
        self._vae.to(device)
        return self

    def _load(self):
        from diffusers.models import AutoencoderKL  # lighter than the top-level lazy module (~2x faster import)

        if self.vae_path is None:
            raise FileNotFoundError(f"the sd-vae latent space needs its weights and latent.sd_vae.vae_path is not set; "
                                    f"{_PUBLISHED}")
        try:
            vae = AutoencoderKL.from_pretrained(self.vae_path, local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError) as err:
            where = ("the folder exists but holds no loadable AutoencoderKL (config.json + "
                     "diffusion_pytorch_model.safetensors)" if os.path.isdir(self.vae_path)
                     else "no such folder, and no such repo id in the local Hugging Face cache")
            raise FileNotFoundError(f"cannot load the SD VAE from latent.sd_vae.vae_path={self.vae_path!r}: {where}; "
                                    f"{_PUBLISHED}") from err
        config = vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        if config.latent_channels != LATENT_CHANNELS or factor != FACTOR:
            raise BadFile(f"latent.sd_vae.vae_path={self.vae_path!r} is not an SD VAE: {config.latent_channels} "
                          f"latent channels and downsampling {factor}, expected {LATENT_CHANNELS} and {FACTOR}")
        # Always float32 (the cache must not depend on the machine's precision) and frozen.
        return vae.eval().requires_grad_(False)

    # -- encoding / decoding -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float32 posterior mean ‖ std (N, 8, H/8, W/8); 1-channel images become RGB."""
        images = to_rgb(images)
        expected = (3, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"sd-vae expects images of shape {expected}, got {tuple(images.shape[1:])}")
        vae = self.load_weights(images.device)._vae
        out = []
        for chunk in images.split(self.batch_size):
            posterior = vae.encode(chunk.to(torch.float32) / 127.5 - 1.0).latent_dist
            out.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(out)

    def draw(self, n: int, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """The posterior noise of n samples."""
        return {"noise": torch.randn((n, *self.shape), generator=generator, device=device)}

    def to_model(self, raw: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """(mean + std·ε)·scale, ε = `noise` if given, else drawn from `generator` on its device."""
        # A trainer passes its rank's slice of one global draw (world-size independent); a generator draws on
        # its own device, so one seed gives one z whatever device the latents live on.
        mean, std = raw.to(torch.float32).chunk(2, dim=1)
        if noise is not None:
            if noise.shape != mean.shape:
                raise ValueError(f"noise of shape {tuple(noise.shape)} for latents of shape {tuple(mean.shape)}")
            eps = noise.to(mean.device, torch.float32)
        elif generator is None:
            eps = torch.randn(mean.shape, device=mean.device)
        else:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        return (mean + std * eps) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """Model-space latents (N, 4, h, w) -> uint8 (N, 3, 8h, 8w)."""
        vae = self.load_weights(z.device)._vae
        images = [vae.decode(chunk.to(torch.float32) / self.scale).sample for chunk in z.split(self.batch_size)]
        return to_uint8(torch.cat(images), rounding)

    def settings(self) -> dict:
        """Weights path, image size and scale."""
        return {"vae_path": self.vae_path, "image_size": self.image_size, "scale": self.scale}

    def state_dict(self) -> dict:
        """The latent scale (the only normalisation; no per-channel statistics in any reference repo)."""
        return {"scale": self.scale}
