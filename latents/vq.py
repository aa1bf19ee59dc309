"""Vector-quantised token ids: images as an h x w grid of ids into a K-row codebook (MAGE / MaskGIT / ADDP tokens).

Two tokenizers share one interface (`codes`, `encode`, `decode_codes`, `embed`, `soft_embed`):
- `vqgan`: MAGE's frozen VQGAN (latents.vqgan; K = 1024, d = 256, f = 16, released `vqgan_jax_strongaug.ckpt`);
- `palette`: a parameter-free quantizer for CPU tests and the quickstart (ADDP's CPU test double). Its K fixed
  colours c_k (evenly spaced greys, or the first K points of the (2, 3, 5) Halton sequence) lifted to d dimensions
  by a fixed matrix P (3 x d) with orthonormal rows (identity for d = 3): codebook row k = c_k P. Encode: the colour
  nearest (Euclidean, RGB) to each f x f patch mean. Decode: RGB = Z P^T per position (P P^T = I, so a hard code
  gives its colour back exactly), nearest-upsampled by f. Linear in Z, so soft codes decode to blended colours and
  the decode is differentiable in Z.

Raw encoding (what prepare.py caches): int64 ids (N, h, w). `to_model` hands them over unchanged (no randomness);
`decode` maps ids (or their float copies) to uint8 images through the codebook and the tokenizer's decoder.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.config import ComponentConfig, check
from gen.io import to_rgb
from latents.base import LatentSpace, to_uint8
from latents.vqgan import VQGAN, VQGANArch, load_vqgan

QUANTIZERS = ("vqgan", "palette")
PALETTES = ("grey", "halton")

_PUBLISHED = ("MAGE's tokenizer vqgan_jax_strongaug.ckpt is linked from github.com/LTH14/mage README.md (also "
              "github.com/ChangyaoTian/ADDP README.md); pass the file with latent.vq.weights=/path/to/file, or use "
              "latent.vq.quantizer=palette (no weights)")


@dataclass
class VQConfig(ComponentConfig):
    """Token ids of a vector quantizer: MAGE's VQGAN (weights from a local file) or a fixed colour palette."""

    quantizer: str = "vqgan"
    """vqgan (MAGE's VQGAN, latent.vq.weights) or palette (parameter-free fixed colours, CPU tests/quickstart)."""
    weights: Optional[str] = None
    """vqgan: local weights, the released vqgan_jax_strongaug.ckpt (taming keys, mapped by latents.vqgan.from_mage)
    or a VQGAN state dict of ours (.pt/.pth/.safetensors)."""
    codebook_size: int = 1024
    """K, codebook rows (MAGE: 1024)."""
    code_dim: int = 256
    """d, width of a code (MAGE: 256; palette: >= 3, colours lifted by a fixed orthonormal 3 x d map)."""
    factor: int = 16
    """Spatial downsampling f (256 px -> 16 x 16 tokens at f = 16); vqgan: 2^(len(ch_mult) - 1)."""
    ch: int = 128
    """vqgan: base width."""
    ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    """vqgan: width multiplier per level (MAGE: [1, 1, 2, 2, 4])."""
    res_blocks: int = 2
    """vqgan: residual blocks per level."""
    norm_groups: int = 32
    """vqgan: GroupNorm groups (MAGE: 32)."""
    palette: str = "grey"
    """palette: the colours, grey (K evenly spaced greys) or halton (first K Halton points in RGB, bases 2, 3, 5)."""
    seed: int = 0
    """palette: seed of the fixed 3 x d lift (unused for d = 3)."""

    def arch(self, image_size: int) -> VQGANArch:
        """The VQGAN these keys describe, for images of side `image_size`."""
        return VQGANArch(codebook_size=self.codebook_size, code_dim=self.code_dim, ch=self.ch,
                         ch_mult=tuple(self.ch_mult), res_blocks=self.res_blocks, image_size=image_size,
                         norm_groups=self.norm_groups)

    def validate(self, cfg) -> None:
        """Known quantizer and palette, positive sizes, the factor dividing the image and matching ch_mult."""
        check(self.quantizer in QUANTIZERS, "latent.vq.quantizer", f"one of {QUANTIZERS}")
        check(self.palette in PALETTES, "latent.vq.palette", f"one of {PALETTES}")
        for key in ("codebook_size", "code_dim", "factor", "ch", "res_blocks", "norm_groups"):
            check(getattr(self, key) > 0, f"latent.vq.{key}", "must be positive")
        check(cfg.data.image_size % self.factor == 0, "data.image_size",
              f"{cfg.data.image_size} is not divisible by latent.vq.factor={self.factor}")
        if self.quantizer == "palette":
            check(self.code_dim >= 3, "latent.vq.code_dim", "the palette lifts RGB colours: at least 3")
            check(self.codebook_size >= 2, "latent.vq.codebook_size", "the palette needs at least 2 colours")
        else:
            check(len(self.ch_mult) >= 1 and 2 ** (len(self.ch_mult) - 1) == self.factor, "latent.vq.ch_mult",
                  f"{round(math.log2(self.factor)) + 1} levels for latent.vq.factor={self.factor}")
            widths = [self.ch * m for m in self.ch_mult] + [self.ch]
            check(all(w % self.norm_groups == 0 for w in widths), "latent.vq.norm_groups",
                  f"must divide every width {sorted(set(widths))}")


def halton(n: int, base: int) -> Tensor:
    """The first n points (from index 1) of the van der Corput sequence in `base`, float64."""
    out = []
    for i in range(1, n + 1):
        f, x = 1.0, 0.0
        while i:
            f /= base
            x += f * (i % base)
            i //= base
        out.append(x)
    return torch.tensor(out, dtype=torch.float64)


def palette_colours(k: int, kind: str) -> Tensor:
    """(k, 3) RGB colours in [0, 1], float32: evenly spaced greys (black to white) or Halton points."""
    if kind == "grey":
        return torch.linspace(0.0, 1.0, k, dtype=torch.float64)[:, None].expand(k, 3).float()
    if kind == "halton":
        return torch.stack([halton(k, b) for b in (2, 3, 5)], dim=1).float()
    raise ValueError(f"unknown palette {kind!r}; one of {PALETTES}")


class PaletteQuantizer(nn.Module):
    """The parameter-free tokenizer of the module docstring (buffers only: nothing to load or train)."""

    def __init__(self, k: int, code_dim: int, factor: int, kind: str = "grey", seed: int = 0):
        super().__init__()
        if code_dim < 3:
            raise ValueError(f"the palette lifts RGB colours: code_dim must be >= 3, got {code_dim}")
        colours = palette_colours(k, kind)
        if code_dim == 3:
            lift = torch.eye(3)
        else:  # orthonormal rows: Q of a fixed Gaussian (d x 3), transposed
            g = torch.Generator().manual_seed(seed)
            lift = torch.linalg.qr(torch.randn(code_dim, 3, generator=g, dtype=torch.float64))[0].t().float()
        self.factor = factor
        self.register_buffer("colours", colours, persistent=False)
        self.register_buffer("lift", lift, persistent=False)  # P (3, d)
        self.register_buffer("codes", colours @ lift, persistent=False)  # (K, d)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (N, 3, H, W) -> ids (N, h, w) of the colour nearest to each f x f patch mean."""
        means = F.avg_pool2d(images.float(), self.factor).permute(0, 2, 3, 1)  # (N, h, w, 3)
        return torch.cdist(means.reshape(-1, 3), self.colours).argmin(dim=-1).reshape(means.shape[:3])

    def decode_codes(self, codes: Tensor) -> Tensor:
        """A code map (N, d, h, w), any real values -> images (N, 3, f h, f w): RGB = Z P^T, nearest upsampling."""
        rgb = torch.einsum("ndhw,cd->nchw", codes, self.lift.to(codes.dtype))
        return F.interpolate(rgb, scale_factor=self.factor, mode="nearest")


def embed(codes: Tensor, ids: Tensor) -> Tensor:
    """Codebook rows of ids (N, h, w) -> code map (N, d, h, w)."""
    return codes[ids].permute(0, 3, 1, 2)


def soft_embed(codes: Tensor, probs: Tensor) -> Tensor:
    """Expected codes of distributions over the K rows (N, h, w, K) -> code map (N, d, h, w): probs @ codebook."""
    return torch.einsum("nhwk,kd->ndhw", probs.to(codes.dtype), codes)


class VQLatents(LatentSpace):
    """Token ids of a frozen tokenizer; the objective sees int64 ids (h, w)."""

    name = "vq"
    Config = VQConfig
    kind = "tokens"
    layout = "id_grid"
    raw_dtype = torch.int64

    def __init__(self, quantizer: str, image_size: int, codebook_size: int = 1024, code_dim: int = 256,
                 factor: int = 16, weights: str | None = None, arch: VQGANArch | None = None,
                 palette: str = "grey", seed: int = 0, batch_size: int = 64):
        if quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {quantizer!r}; one of {QUANTIZERS} (latent.vq.quantizer)")
        if image_size % factor:
            raise ValueError(f"image size {image_size} is not divisible by the downsampling {factor}")
        self.quantizer, self.image_size, self.factor = quantizer, int(image_size), int(factor)
        self.codebook_size, self.code_dim = int(codebook_size), int(code_dim)
        self.weights = None if weights is None else str(weights)
        self.arch = arch if arch is not None else VQGANArch(codebook_size, code_dim, image_size=image_size)
        self.palette, self.seed, self.batch_size = palette, int(seed), int(batch_size)
        side = image_size // factor
        self.shape = self.raw_shape = (side, side)
        self._net: VQGAN | PaletteQuantizer | None = None

    @classmethod
    def from_config(cls, cfg) -> VQLatents:
        """From cfg.latent.vq and cfg.data.image_size; VQGAN weights stay unloaded."""
        v = cfg.latent.vq
        return cls(v.quantizer, cfg.data.image_size, codebook_size=v.codebook_size, code_dim=v.code_dim,
                   factor=v.factor, weights=v.weights, arch=v.arch(cfg.data.image_size), palette=v.palette,
                   seed=v.seed)

    # -- the tokenizer ---------------------------------------------------------------------------

    def load_weights(self, device: torch.device | str = "cpu") -> VQLatents:
        """Build the tokenizer (loading the VQGAN from latent.vq.weights) onto `device`, once."""
        if self._net is None:
            self._net = self._build()
        self._net.to(device)
        return self

    def _build(self) -> VQGAN | PaletteQuantizer:
        if self.quantizer == "palette":
            return PaletteQuantizer(self.codebook_size, self.code_dim, self.factor, self.palette, self.seed)
        if self.weights is None:
            raise FileNotFoundError(f"the vq latent space's VQGAN needs weights and latent.vq.weights is not set; "
                                    f"{_PUBLISHED}")
        if not os.path.isfile(self.weights):
            raise FileNotFoundError(f"latent.vq.weights={self.weights!r}: no such file; {_PUBLISHED}")
        return load_vqgan(self.weights, self.arch, "VQGAN tokenizer weights, latent.vq.weights")

    def tokenizer(self, device: torch.device | str = "cpu") -> VQGAN | PaletteQuantizer:
        """The frozen tokenizer module on `device` (codes, encode, decode_codes)."""
        return self.load_weights(device)._net

    def codebook(self, device: torch.device | str = "cpu") -> Tensor:
        """The codebook (K, d) on `device`."""
        return self.tokenizer(device).codes

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Any code map (N, d, h, w), soft codes included -> float images in about [0, 1]; differentiable in Z."""
        return self.tokenizer(codes.device).decode_codes(codes)

    # -- the latent-space contract ---------------------------------------------------------------

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> int64 ids (N, h, w); grey becomes RGB."""
        images = to_rgb(images)
        expected = (3, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"the vq latent space expects images of shape {expected}, got {tuple(images.shape[1:])}")
        net = self.tokenizer(images.device)
        return torch.cat([net.encode(chunk.float() / 255.0) for chunk in images.split(self.batch_size)]).long()

    def to_model(self, raw: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cached ids -> int64 ids (N, h, w), unchanged."""
        return raw.reshape(raw.shape[0], *self.shape).long()

    @torch.no_grad()
    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        """ids (N, h, w) (int, or floats holding ints), or a code map (N, d, h, w) (soft codes included, e.g. ADDP's
        final image) -> uint8 (N, 3, H, W) (decoder output in [0, 1])."""
        if z.ndim == 4:
            maps = z.float()
        else:
            ids = z.round().long() if z.is_floating_point() else z.long()
            maps = embed(self.codebook(z.device), ids).float()
        images = [self.decode_codes(chunk) for chunk in maps.split(self.batch_size)]
        return to_uint8(torch.cat(images) * 2.0 - 1.0, rounding)

    def settings(self) -> dict:
        """Quantizer, weights path and shapes (palette: its colours; vqgan: the network)."""
        a = self.arch
        out = {"quantizer": self.quantizer, "codebook_size": self.codebook_size, "code_dim": self.code_dim,
               "factor": self.factor, "image_size": self.image_size}
        if self.quantizer == "palette":
            return {**out, "palette": self.palette, "seed": self.seed}
        return {**out, "weights": self.weights, "ch": a.ch, "ch_mult": list(a.ch_mult), "res_blocks": a.res_blocks,
                "norm_groups": a.norm_groups}
