"""Backbone family `bae`: stage 1 of Binary Latent Diffusion (Wang et al., CVPR 2023, arXiv 2304.04820, Sec. 3.1), the
binary autoencoder trained by train.py with the `autoencoder` objective on the pixel latent space.

The module holds the autoencoder (`ae`, a latents.bae.BinaryAutoencoder whose shape the latent.binary.* keys give, so
stage 2 reads the same keys) and the PatchGAN discriminator (`disc`) of the reference `models/binaryae.py`
`Discriminator` (taming's NLayerDiscriminator: 4x4 convs, LeakyReLU 0.2, BatchNorm after every conv but the first
and the last, ndf 64, 3 layers). Both train under one optimizer; the objective keeps each one's gradient to its own
loss (gen/objectives/autoencoder.py). Checkpoints and the EMA hold both; stage 2 reads the EMA's `ae.*` weights.

Images: the pixel space's [-1, 1]; the autoencoder works in [0, 1] as the reference (and its released weights) do.
Grey images (the digits) are repeated to RGB, since the binary latent space feeds its autoencoder RGB.
`forward` is the deterministic reconstruction (thresholded bits): what previews show.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gen.config import ComponentConfig, check
from gen.models.base import Backbone, BackboneOutput
from latents.bae import BAEArch, BinaryAutoencoder


@dataclass
class BAEConfig(ComponentConfig):
    """Stage-1 binary autoencoder (model.name=BAE): the network shape comes from latent.binary.*; these keys are the
    discriminator's."""

    disc_layers: int = 3
    """PatchGAN stride-2 layers (reference: 3); 0: no discriminator (objective.autoencoder.disc_start_step: null)."""
    disc_ndf: int = 64
    """Width of the discriminator's first conv (reference ndf 64)."""

    def validate(self, cfg) -> None:
        """Only objective autoencoder trains it; layers and width are sensible, and the patch map of the last conv is
        not empty at data.image_size."""
        check(cfg.objective.name == "autoencoder", "objective.name",
              f"model.name={cfg.model.name} is the stage-1 binary autoencoder, trained by objective.name=autoencoder, "
              f"not {cfg.objective.name!r}; a stage-2 prior is a DiT/SiT (e.g. model.name=SiT-S/1)")
        check(self.disc_layers >= 0, "model.bae.disc_layers", "must be >= 0")
        check(self.disc_ndf > 0, "model.bae.disc_ndf", "must be positive")
        side = patch_side(cfg.data.image_size, self.disc_layers)
        check(self.disc_layers == 0 or side >= 1, "model.bae.disc_layers",
              f"{self.disc_layers} layers leave no patch at data.image_size={cfg.data.image_size}; use fewer")


def patch_side(image_size: int, layers: int) -> int:
    """Side of the discriminator's logit map: `layers` stride-2 4x4 convs (padding 1), then two stride-1 ones."""
    side = image_size
    for _ in range(layers):
        side //= 2
    return side - 2


class PatchDiscriminator(nn.Sequential):
    """taming's NLayerDiscriminator as the reference builds it (models/binaryae.py `Discriminator`)."""

    def __init__(self, channels: int = 3, ndf: int = 64, layers: int = 3):
        mods: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                     nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        mods.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        super().__init__(*mods)
        for m in self.modules():  # taming's weights_init: N(0, 0.02) convs, N(1, 0.02) BatchNorm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


class BAEBackbone(Backbone):
    """Binary autoencoder + PatchGAN discriminator, trained as stage 1 (objective `autoencoder`)."""

    KEY = "bae"
    Config = BAEConfig
    LAYOUTS = ("grid",)
    MODELS = {"BAE": lambda **kw: BAEBackbone(**kw)}
    null_class = None
    num_blocks = 0
    token_grid = None

    def __init__(self, arch: BAEArch = BAEArch(), sample_shape: tuple[int, ...] = (3, 256, 256), disc_layers: int = 3,
                 disc_ndf: int = 64):
        super().__init__()
        if sample_shape[0] not in (1, 3) or tuple(sample_shape[1:]) != (arch.image_size,) * 2:
            raise ValueError(f"the BAE takes grey or RGB images of side {arch.image_size}, got {tuple(sample_shape)}")
        self.sample_shape = tuple(sample_shape)
        self.ae = BinaryAutoencoder(arch)
        self.disc = PatchDiscriminator(arch.in_channels, disc_ndf, disc_layers) if disc_layers > 0 else None

    @classmethod
    def from_config(cls, cfg, sample_shape: tuple[int, ...]) -> BAEBackbone:
        """The autoencoder latent.binary.* describes at data.image_size, with model.bae's discriminator."""
        b = cfg.model.bae
        return cls(cfg.latent.binary.arch(cfg.data.image_size), sample_shape, b.disc_layers, b.disc_ndf)

    @classmethod
    def config_blocks(cls, cfg) -> int:
        """No token blocks: aligners cannot run on an autoencoder."""
        return 0

    def token_width(self, block: int) -> int:
        raise ValueError("the BAE has no token blocks (align.methods must be empty in stage 1)")

    def warm_parameters(self, blocks: int) -> tuple[str, ...]:
        raise ValueError("the BAE has no token blocks (align.methods must be empty in stage 1)")

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last conv weight, where VQGAN's adaptive GAN weight compares gradient norms."""
        return self.ae.decoder.conv_out.weight

    def rgb01(self, x: Tensor) -> Tensor:
        """Pixel-space images in [-1, 1] (grey or RGB) -> RGB in [0, 1], the autoencoder's input and target."""
        x = (x + 1.0) / 2.0
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def reconstruct(self, x: Tensor, mode: str = "threshold", uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(reconstruction in [0, 1], bit probabilities) of pixel-space images, bits drawn as `mode` says
        (Bernoulli with the straight-through estimator from `uniform`, or thresholded)."""
        p = self.ae.probs(self.rgb01(x))
        return self.ae.decode(self.ae.binarize(p, mode, uniform)), p

    def forward(self, x: Tensor, t: Tensor, cond, *, taps: Iterable[int] = (),
                stop_at: int | None = None) -> BackboneOutput:
        """Deterministic reconstruction (bits 1[p > 0.5]) in the pixel space's [-1, 1], RGB; t and cond unused."""
        if tuple(taps) or stop_at is not None:
            raise ValueError("the BAE has no token blocks to tap")
        return BackboneOutput(self.reconstruct(x)[0] * 2.0 - 1.0, {})

    def compile_regions(self, **options) -> None:
        """Compile the autoencoder only (the discriminator also runs through torch.func.functional_call)."""
        self.ae.compile(**options)


def ae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's weights (a BinaryAutoencoder state dict) from a stage-1 checkpoint's EMA state dict."""
    return {k[len("ae."):]: v for k, v in state.items() if k.startswith("ae.")}
