"""The binary autoencoder (BAE) of Binary Latent Diffusion (Wang et al., CVPR 2023, arXiv 2304.04820, Sec. 3.1) and
the key map of its released checkpoints.

Network (reference `models/binaryae.py`, a Taming-VQGAN conv stack):
- encoder: conv 3x3, per level `res_blocks` residual blocks (+ self-attention where the feature map's side is in
  `attn_resolutions`) and a stride-2 downsampling between levels, a mid block (res, attn, res), GroupNorm, conv 3x3
  to `emb_dim` channels; no non-linearity between the last GroupNorm and conv (as in the reference);
- binariser: 1x1 conv `emb_dim -> C` then a sigmoid gives bit probabilities p; bits are Bernoulli(p) or 1[p > 0.5];
  the straight-through estimator z = b + p - stopgrad(p) has the forward value b and the gradient of p;
- decoder input: z_q = z^T E, a bias-free 1x1 conv `C -> emb_dim` (the reference's `quantize.embed`), then GroupNorm
  (the reference's `norm_first`, on in every released model), then the encoder's layout in reverse
  (`decoder_res_blocks` per level: the C128 release uses 3x the encoder's, its `--gen_mul 3`).
Images enter in [0, 1] (torchvision ToTensor in the reference's data loader) and come out in about [0, 1].

Our module names follow taming's structured layout (encoder.down.{level}.block.{j}, ...); the reference stores flat
`blocks.{index}` lists. `from_bld` maps a released state dict onto ours and `to_bld` back (see `bld_layout`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BAEArch:
    """Hyper-parameters of a binary autoencoder; the defaults are the released LAION C64 model's."""

    bit_channels: int = 64  # C, the reference's `codebook_size` (there is no codebook)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # channel multiplier per level; factor f = 2^(levels - 1)
    nf: int = 128  # base width
    res_blocks: int = 2  # residual blocks per encoder level
    decoder_res_blocks: int | None = None  # per decoder level; None: res_blocks (C128 release: 6)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sides (pixels / 2^level) with self-attention
    emb_dim: int = 256  # width of the encoder output and of the decoder input projection
    image_size: int = 256
    in_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups (reference: 32; tiny test models use fewer)

    @property
    def factor(self) -> int:
        """Spatial downsampling f."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def dec_blocks(self) -> int:
        """Residual blocks per decoder level."""
        return self.res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the bits of one image."""
        side = self.image_size // self.factor
        return (self.bit_channels, side, side)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)  # reference utils/vqgan_utils.py normalize


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus the input (through a 1x1 conv, `skip`, when the width changes).

    `bias=False` builds bias-free convs; `skip_after=True` applies the width-changing 1x1 conv to the block's output
    h instead of its input, h + skip(h) (MAGE's JAX-ported VQGAN, latents.vqgan: its `nin_shortcut` maps h)."""

    def __init__(self, c_in: int, c_out: int, groups: int, bias: bool = True, skip_after: bool = False):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.skip = nn.Conv2d(c_out if skip_after else c_in, c_out, 1, bias=bias) if c_in != c_out else None
        self.skip_after = skip_after

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.skip is None:
            return h + x
        return h + self.skip(h if self.skip_after else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1-conv q, k, v and output), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, their attention blocks (possibly none) and the resampling (or None)."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
        self.resample = resample  # Downsample after an encoder level, Upsample after a decoder level, or None

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x if self.resample is None else self.resample(x)


class Mid(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1 = ResBlock(channels, channels, groups), AttnBlock(channels, groups)
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level_channels(arch: BAEArch) -> list[tuple[int, int, int]]:
    """(input width, output width, feature side) of each level, finest first."""
    widths = [arch.nf * m for m in (1, *arch.ch_mult)]
    return [(widths[i], widths[i + 1], arch.image_size // 2**i) for i in range(len(arch.ch_mult))]


class Encoder(nn.Module):
    def __init__(self, arch: BAEArch):
        super().__init__()
        g, last = arch.norm_groups, len(arch.ch_mult) - 1
        self.conv_in = nn.Conv2d(arch.in_channels, arch.nf, 3, padding=1)
        down = []
        for i, (c_in, c_out, side) in enumerate(_level_channels(arch)):
            blocks = [ResBlock(c_in if j == 0 else c_out, c_out, g) for j in range(arch.res_blocks)]
            attn = [AttnBlock(c_out, g) for _ in blocks] if side in arch.attn_resolutions else []
            down.append(Level(blocks, attn, Downsample(c_out) if i != last else None))
        self.down = nn.ModuleList(down)
        top = arch.nf * arch.ch_mult[-1]
        self.mid, self.norm_out = Mid(top, g), _norm(top, g)
        self.conv_out = nn.Conv2d(top, arch.emb_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(self.norm_out(self.mid(x)))


class Decoder(nn.Module):
    def __init__(self, arch: BAEArch):
        super().__init__()
        g, top = arch.norm_groups, arch.nf * arch.ch_mult[-1]
        self.norm_in = _norm(arch.emb_dim, g)  # the reference's norm_first
        self.conv_in = nn.Conv2d(arch.emb_dim, top, 3, padding=1)
        self.mid = Mid(top, g)
        up: list[Level | None] = [None] * len(arch.ch_mult)
        c_in = top
        for i, (_, c_out, side) in reversed(list(enumerate(_level_channels(arch)))):
            blocks = [ResBlock(c_in if j == 0 else c_out, c_out, g) for j in range(arch.dec_blocks)]
            attn = [AttnBlock(c_out, g) for _ in blocks] if side in arch.attn_resolutions else []
            up[i] = Level(blocks, attn, Upsample(c_out) if i != 0 else None)
            c_in = c_out
        self.up = nn.ModuleList(up)  # up[i] works at level i's resolution; run coarsest first
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, arch.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(self.norm_in(z)))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(self.norm_out(x))


BIT_MODES = ("bernoulli", "threshold")
"""How probabilities become bits: Bernoulli(p) (the reference's default) or 1[p > 0.5] (its `deterministic`)."""


class BinaryAutoencoder(nn.Module):
    """Encoder -> sigmoid bit probabilities -> bits (straight-through) -> bias-free projection -> decoder."""

    def __init__(self, arch: BAEArch):
        super().__init__()
        if arch.image_size % arch.factor:
            raise ValueError(f"image size {arch.image_size} is not divisible by the downsampling {arch.factor}")
        self.arch = arch
        self.encoder = Encoder(arch)
        self.to_bits = nn.Conv2d(arch.emb_dim, arch.bit_channels, 1)
        self.embed = nn.Conv2d(arch.bit_channels, arch.emb_dim, 1, bias=False)  # z_q = z^T E
        self.decoder = Decoder(arch)

    def probs(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (N, 3, H, W) -> bit probabilities p (N, C, H/f, W/f)."""
        return torch.sigmoid(self.to_bits(self.encoder(images)))

    @staticmethod
    def binarize(p: Tensor, mode: str = "bernoulli", uniform: Tensor | None = None) -> Tensor:
        """Bits with the straight-through estimator: forward value exactly the bits, gradient that of p.

        `uniform` (same shape as p) gives the Bernoulli draws 1[u < p]; None draws from torch's generator.
        """
        if mode == "threshold":
            bits = (p > 0.5).to(p.dtype)
        elif mode == "bernoulli":
            u = torch.rand_like(p) if uniform is None else uniform.to(p)
            bits = (u < p).to(p.dtype)
        else:
            raise ValueError(f"unknown bit mode {mode!r}; one of {BIT_MODES}")
        # b + (p - sg(p)) is b exactly; the reference's left-to-right b + p - sg(p) rounds 1 to 1 - 2^-24 sometimes.
        return bits + (p - p.detach())

    def decode(self, z: Tensor) -> Tensor:
        """Bits (or straight-through codes) (N, C, h, w) -> images in about [0, 1]."""
        return self.decoder(self.embed(z))

    def forward(self, images: Tensor, mode: str = "bernoulli") -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, probabilities, straight-through bits) of images in [0, 1]."""
        p = self.probs(images)
        z = self.binarize(p, mode)
        return self.decode(z), p, z


# ---------------------------------------------------------------------------------------------------
# Released checkpoints: reference state dicts (BinaryGAN: ae.encoder / ae.quantize / ae.generator, plus disc.* and
# perceptual.*) mapped onto BinaryAutoencoder.

BLD_DROPPED = ("disc.", "perceptual.", "generator.logsigma.")
"""Reference keys (after the "ae." prefix is removed) with no counterpart: the discriminator, LPIPS and the decoder's
unused ELBO head (`Generator.logsigma`)."""


def bld_layout(arch: BAEArch) -> list[tuple[str, str, str]]:
    """(reference module, our module, kind) in the reference's construction order (`Encoder`/`Generator.blocks`).

    kind: "res" (our `skip` is the reference's always-built `conv_out`), "attn", "conv", "norm" or "resample".
    """
    out: list[tuple[str, str, str]] = []
    enc = iter(range(10_000))

    def add(prefix: str, ours: str, kind: str, counter) -> None:
        out.append((f"{prefix}.blocks.{next(counter)}", ours, kind))

    add("encoder", "encoder.conv_in", "conv", enc)
    levels = _level_channels(arch)
    for i, (_, _, side) in enumerate(levels):
        for j in range(arch.res_blocks):
            add("encoder", f"encoder.down.{i}.block.{j}", "res", enc)
            if side in arch.attn_resolutions:
                add("encoder", f"encoder.down.{i}.attn.{j}", "attn", enc)
        if i != len(levels) - 1:
            add("encoder", f"encoder.down.{i}.resample", "resample", enc)
    for ours, kind in (("mid.block_1", "res"), ("mid.attn_1", "attn"), ("mid.block_2", "res"),
                       ("norm_out", "norm"), ("conv_out", "conv")):
        add("encoder", f"encoder.{ours}", kind, enc)
    gen = iter(range(10_000))
    for ours, kind in (("norm_in", "norm"), ("conv_in", "conv"), ("mid.block_1", "res"), ("mid.attn_1", "attn"),
                       ("mid.block_2", "res")):
        add("generator", f"decoder.{ours}", kind, gen)
    for i in reversed(range(len(levels))):
        for j in range(arch.dec_blocks):
            add("generator", f"decoder.up.{i}.block.{j}", "res", gen)
            if levels[i][2] in arch.attn_resolutions:
                add("generator", f"decoder.up.{i}.attn.{j}", "attn", gen)
        if i != 0:
            add("generator", f"decoder.up.{i}.resample", "resample", gen)
    for ours, kind in (("norm_out", "norm"), ("conv_out", "conv")):
        add("generator", f"decoder.{ours}", kind, gen)
    return out


def from_bld(state: dict[str, Tensor], arch: BAEArch) -> dict[str, Tensor]:
    """A reference BAE state dict (binaryae_*.th / binaryae_ema_*.th, keys with or without "ae.") -> ours.

    Renames module prefixes by `bld_layout`, `conv_out` of residual blocks to `skip` (dropped where the width does
    not change: the reference builds it but never uses it), `quantize.proj.0` to `to_bits`, and the embedding
    `quantize.embed.weight` (C, emb_dim) to the 1x1 conv `embed.weight` (emb_dim, C, 1, 1); drops BLD_DROPPED.
    Unknown keys raise a KeyError naming them (missing ones fail the strict load that follows); a decoder without the
    input GroupNorm (trained without --norm_first, which rescales bits differently) raises a ValueError.
    """
    src = {(k[3:] if k.startswith("ae.") else k): v for k, v in state.items()}
    src = {k: v for k, v in src.items() if not k.startswith(BLD_DROPPED)}
    first = src.get("generator.blocks.0.weight")
    if first is not None and first.ndim != 1:
        raise ValueError("this BLD autoencoder was trained without --norm_first (its decoder starts with a conv, not "
                         "a GroupNorm); only norm_first models (every released one) are supported")
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for ref, ours, kind in bld_layout(arch):
        for key in [k for k in src if k.startswith(ref + ".")]:
            suffix = key[len(ref) + 1:]
            used.add(key)
            if kind == "res" and suffix.startswith("conv_out."):
                shortcut = src[f"{ref}.conv_out.weight"]
                if shortcut.shape[0] == shortcut.shape[1]:
                    continue  # built by the reference but never used: same width in and out
                suffix = "skip." + suffix[len("conv_out."):]
            out[f"{ours}.{suffix}"] = src[key]
    if "quantize.proj.0.weight" in src:
        for name in ("weight", "bias"):
            out[f"to_bits.{name}"] = src[f"quantize.proj.0.{name}"]
            used.add(f"quantize.proj.0.{name}")
    if "quantize.embed.weight" in src:
        out["embed.weight"] = src["quantize.embed.weight"].t()[:, :, None, None].contiguous()
        used.add("quantize.embed.weight")
    unknown = sorted(set(src) - used)
    if unknown:
        raise KeyError(f"{len(unknown)} reference key(s) the BAE key map does not know (a checkpoint of another "
                       f"architecture, or one trained without --norm_first?): {unknown[:6]}")
    return out


def to_bld(state: dict[str, Tensor], arch: BAEArch) -> dict[str, Tensor]:
    """Our state dict -> the reference's key names ("ae." prefix, no discriminator/LPIPS/logsigma entries; unused
    residual `conv_out` entries are absent). The inverse of `from_bld` on every key it keeps."""
    out: dict[str, Tensor] = {}
    for ref, ours, kind in bld_layout(arch):
        for key in [k for k in state if k.startswith(ours + ".")]:
            suffix = key[len(ours) + 1:]
            if kind == "res" and suffix.startswith("skip."):
                suffix = "conv_out." + suffix[len("skip."):]
            out[f"ae.{ref}.{suffix}"] = state[key]
    out["ae.quantize.proj.0.weight"], out["ae.quantize.proj.0.bias"] = state["to_bits.weight"], state["to_bits.bias"]
    out["ae.quantize.embed.weight"] = state["embed.weight"][:, :, 0, 0].t().contiguous()
    return out
