"""Binary latents: images as C x h x w Bernoulli bits of a binary autoencoder (Binary Latent Diffusion, Wang et al.,
CVPR 2023, arXiv 2304.04820; network and key map in latents.bae).

Raw encoding (what prepare.py caches): the bits, uint8, packed 8 to a byte (np.packbits order: first bit in the
most significant position) or one per byte. The bits are Bernoulli(p) draws (the reference's default for prior
training codes) or 1[p > 0.5] (`latent.binary.bits`). A Bernoulli draw uses a generator seeded from the image's
bytes and `latent.binary.seed`, so an image always gets the same bits, whatever the batch, process or shard it is
encoded in. `to_model` unpacks them to float {0, 1} of shape (N, C, h, w); `decode` gives uint8 images.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor

from gen.config import ComponentConfig, check
from gen.io import BadFile, load_state, load_tensors, to_rgb
from latents.bae import BIT_MODES, BAEArch, BinaryAutoencoder, from_bld
from latents.base import LatentSpace, to_uint8

CH_MULT: dict[int, tuple[int, ...]] = {4: (1, 2, 4), 8: (1, 1, 2, 4), 16: (1, 1, 2, 2, 4)}
"""Default channel multipliers per downsampling factor f (f = 16: the reference's released models)."""

_PUBLISHED = (
    "the released BLD autoencoders are linked from github.com/ZeWang95/BinaryLatentDiffusion binary-ae/README.md "
    "(Google Drive folders BAE_C64 and BAE_C128: saved_models/binaryae_ema_<step>.th or binaryae_<step>.th; C128 "
    "also needs latent.binary.decoder_res_blocks=6), or train one (stage 1); pass the file with "
    "latent.binary.weights=/path/to/file"
)


@dataclass
class BinaryConfig(ComponentConfig):
    """Binary autoencoder bits (BLD): the network's shape, where its weights are and how bits are drawn."""

    weights: Optional[str] = None
    """Autoencoder weights: a stage-1 run or checkpoint folder, a state dict file, or a released binaryae_ema_*.th."""
    bit_channels: int = 64
    """Bit channels C per latent position (released models: 64 or 128)."""
    factor: int = 16
    """Spatial downsampling f: 4, 8 or 16 (256 px -> 16x16 bits at f = 16)."""
    ch_mult: Optional[List[int]] = None
    """Channel multiplier per level (log2(f) + 1 entries); null: the default of `factor`."""
    nf: int = 128
    """Base width of the encoder and decoder."""
    res_blocks: int = 2
    """Residual blocks per encoder level."""
    decoder_res_blocks: Optional[int] = None
    """Residual blocks per decoder level; null: res_blocks (the released C128 model has 6, its --gen_mul 3)."""
    attn_resolutions: List[int] = field(default_factory=lambda: [16])
    """Feature-map sides with self-attention after each residual block."""
    emb_dim: int = 256
    """Width of the encoder output and of the bias-free bit projection."""
    norm_groups: int = 32
    """GroupNorm groups (the reference uses 32)."""
    bits: str = "bernoulli"
    """bernoulli (Bernoulli(p), one fixed draw per image) or threshold (1[p > 0.5])."""
    seed: int = 0
    """Seed of the Bernoulli draws, mixed with each image's bytes."""
    pack: bool = True
    """Cache the bits packed 8 per byte; false: one uint8 per bit."""

    def arch(self, image_size: int) -> BAEArch:
        """The network these keys describe, for images of side `image_size`."""
        ch_mult = tuple(self.ch_mult) if self.ch_mult is not None else CH_MULT.get(self.factor, ())
        return BAEArch(bit_channels=self.bit_channels, ch_mult=ch_mult, nf=self.nf, res_blocks=self.res_blocks,
                       decoder_res_blocks=self.decoder_res_blocks, attn_resolutions=tuple(self.attn_resolutions),
                       emb_dim=self.emb_dim, image_size=image_size, norm_groups=self.norm_groups)

    def validate(self, cfg) -> None:
        """Factor and channel multipliers agree, sizes are positive and the norm groups divide every width."""
        check(self.factor in CH_MULT, "latent.binary.factor", f"one of {sorted(CH_MULT)}")
        levels = round(math.log2(self.factor)) + 1
        check(self.ch_mult is None or (len(self.ch_mult) == levels and min(self.ch_mult) > 0),
              "latent.binary.ch_mult", f"{levels} positive entries for factor {self.factor}, or null")
        check(cfg.data.image_size % self.factor == 0, "data.image_size",
              f"{cfg.data.image_size} is not divisible by latent.binary.factor={self.factor}")
        for key in ("bit_channels", "nf", "res_blocks", "emb_dim", "norm_groups"):
            check(getattr(self, key) > 0, f"latent.binary.{key}", "must be positive")
        check(self.decoder_res_blocks is None or self.decoder_res_blocks > 0, "latent.binary.decoder_res_blocks",
              "positive or null")
        widths = [self.nf * m for m in self.arch(cfg.data.image_size).ch_mult] + [self.nf, self.emb_dim]
        check(all(w % self.norm_groups == 0 for w in widths), "latent.binary.norm_groups",
              f"must divide every width {sorted(set(widths))}")
        check(self.bits in BIT_MODES, "latent.binary.bits", f"one of {BIT_MODES}")


def stage1_weights(path: str) -> dict[str, Tensor]:
    """The EMA autoencoder of a stage-1 run folder (its latest checkpoint) or checkpoint folder (model.name=BAE,
    objective autoencoder): the `ae.*` entries of its ema.safetensors."""
    from gen.checkpoint import CheckpointError, resolve_weights
    from gen.models.bae import ae_state

    try:
        ema, _ = resolve_weights(path)
    except CheckpointError:
        raise CheckpointError(f"latent.binary.weights={path!r}: this folder holds no checkpoint (ema.safetensors); "
                              f"train stage 1 into it first (python train.py <stage-1 config> train.run_dir={path}) "
                              f"or name a checkpoints/step-* folder or a weights file") from None
    state = ae_state(load_tensors(ema, "a stage-1 run's EMA weights, latent.binary.weights"))
    if not state:
        raise CheckpointError(f"latent.binary.weights={path!r}: {ema} holds no autoencoder (no ae.* weights); name "
                              f"a stage-1 run (model.name=BAE, objective.name=autoencoder)")
    return state


def pack_bits(bits: Tensor) -> Tensor:
    """(N, ...) {0, 1} -> uint8 (N, ceil(M / 8)), M bits per sample, in np.packbits order (zero-padded)."""
    flat = bits.reshape(bits.shape[0], -1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], pad)], dim=1)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.reshape(flat.shape[0], -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """uint8 (N, ceil(M / 8)) -> uint8 {0, 1} (N, *shape), the inverse of `pack_bits` (np.unpackbits order)."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.to(torch.uint8)[..., None] >> shifts) & 1
    count = math.prod(shape)
    return bits.reshape(packed.shape[0], -1)[:, :count].reshape(packed.shape[0], *shape)


def image_uniforms(images: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """U(0, 1) of `shape` per image, from a generator seeded by the image's bytes and `seed` (float32, on CPU)."""
    host = images.detach().to("cpu", torch.uint8).contiguous().numpy()
    out = []
    for image in host:
        digest = hashlib.sha256(image.tobytes() + seed.to_bytes(8, "little", signed=True)).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        out.append(torch.rand(shape, generator=g))
    return torch.stack(out)


class BinaryLatents(LatentSpace):
    """Bits of a frozen binary autoencoder; the objective sees float {0, 1} of shape (C, h, w)."""

    name = "binary"
    Config = BinaryConfig
    kind = "binary"
    raw_dtype = torch.uint8

    def __init__(self, weights: str | None, arch: BAEArch, bits: str = "bernoulli", seed: int = 0, pack: bool = True,
                 batch_size: int = 64):
        if bits not in BIT_MODES:
            raise ValueError(f"unknown bit mode {bits!r}; one of {BIT_MODES} (latent.binary.bits)")
        self.weights = None if weights is None else str(weights)
        self.arch, self.bits, self.seed, self.pack = arch, bits, int(seed), bool(pack)
        self.batch_size = int(batch_size)
        self.shape = arch.latent_shape
        self.raw_shape = (math.ceil(math.prod(self.shape) / 8),) if self.pack else self.shape
        self._net: BinaryAutoencoder | None = None

    @classmethod
    def from_config(cls, cfg) -> BinaryLatents:
        """From cfg.latent.binary and cfg.data.image_size; the weights stay unloaded."""
        b = cfg.latent.binary
        return cls(b.weights, b.arch(cfg.data.image_size), bits=b.bits, seed=b.seed, pack=b.pack)

    # -- weights -------------------------------------------------------------------------------

    def load_weights(self, device: torch.device | str = "cpu") -> BinaryLatents:
        """Load the frozen autoencoder from latent.binary.weights onto `device` (once)."""
        if self._net is None:
            self._net = self._load()
        self._net.to(device)
        return self

    def _load(self) -> BinaryAutoencoder:
        if self.weights is None:
            raise FileNotFoundError(f"the binary latent space needs autoencoder weights and latent.binary.weights is "
                                    f"not set; {_PUBLISHED}")
        what = "binary autoencoder weights, latent.binary.weights"
        if os.path.isdir(self.weights):  # a stage-1 run (its latest checkpoint) or one of its checkpoints
            state = stage1_weights(self.weights)
        elif not os.path.isfile(self.weights):
            raise FileNotFoundError(f"latent.binary.weights={self.weights!r}: no such file or folder; {_PUBLISHED}")
        elif self.weights.endswith(".safetensors"):
            state = load_tensors(self.weights, what)
        else:
            state = load_state(self.weights, what)
        if any(k.startswith(("ae.encoder.", "encoder.blocks.")) for k in state):  # the reference's flat layout
            try:
                state = from_bld(state, self.arch)
            except (KeyError, ValueError) as err:  # keys of another network, or a decoder without --norm_first
                raise BadFile(f"{self.weights} ({what}): {' '.join(str(err).split())}") from None
        net = BinaryAutoencoder(self.arch)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BadFile(f"{self.weights} ({what}) does not fit the configured network (latent.binary.*: "
                          f"bit_channels, factor, nf, res_blocks, ...; a stage-1 run's are in its config.yaml): "
                          f"{str(err).splitlines()[1:3]}") from None
        return net.eval().requires_grad_(False)  # always float32 and frozen

    # -- encoding / decoding -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> uint8 bits, packed (N, ceil(C h w / 8)) or not (N, C, h, w); grey becomes RGB."""
        images = to_rgb(images)
        expected = (3, self.arch.image_size, self.arch.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"the binary latent space expects images of shape {expected}, got "
                             f"{tuple(images.shape[1:])}")
        net = self.load_weights(images.device)._net
        out = []
        for chunk in images.split(self.batch_size):
            p = net.probs(chunk.to(torch.float32) / 255.0)
            uniform = image_uniforms(chunk, self.shape, self.seed) if self.bits == "bernoulli" else None
            bits = net.binarize(p, self.bits, uniform).to(torch.uint8)
            out.append(pack_bits(bits) if self.pack else bits)
        return torch.cat(out)

    def to_model(self, raw: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cached bits -> float32 {0, 1} (N, C, h, w); nothing random (the bits were drawn when encoding)."""
        bits = unpack_bits(raw, self.shape) if self.pack else raw.reshape(raw.shape[0], *self.shape)
        return bits.to(torch.float32)

    @torch.no_grad()
    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """Bits (N, C, h, w) -> uint8 (N, 3, f h, f w) (decoder output in [0, 1], quantised by `rounding`)."""
        net = self.load_weights(z.device)._net
        images = [net.decode(chunk.to(torch.float32)) for chunk in z.split(self.batch_size)]
        return to_uint8(torch.cat(images) * 2.0 - 1.0, rounding)

    def settings(self) -> dict:
        """Weights path, network shape and how bits are drawn and stored."""
        a = self.arch
        return {"weights": self.weights, "bit_channels": a.bit_channels, "ch_mult": list(a.ch_mult), "nf": a.nf,
                "res_blocks": a.res_blocks, "decoder_res_blocks": a.dec_blocks,
                "attn_resolutions": list(a.attn_resolutions), "emb_dim": a.emb_dim, "norm_groups": a.norm_groups,
                "image_size": a.image_size, "bits": self.bits, "seed": self.seed, "pack": self.pack}
