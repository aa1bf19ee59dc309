"""MAGE's VQGAN tokenizer (Li et al., CVPR 2023, arXiv 2211.09117; also ADDP's, Tian et al., ICLR 2024) and the key
map of its released checkpoint `vqgan_jax_strongaug.ckpt`.

Network (reference LTH14/mage `taming/modules/diffusionmodules/model.py` with `config/vqgan.yaml`: a port of
MaskGIT's JAX tokenizer into taming's module layout; ChangyaoTian/ADDP `configs/release/vqgan.yaml` is identical):
- encoder: bias-free conv 3x3 to `ch`, per level `res_blocks` residual blocks then (except the last level) a 2x2
  average pool (`resamp_with_conv=False`: no parameters), a mid stage of two residual blocks, GroupNorm, SiLU,
  1x1 conv (with bias) to the code width d;
- residual blocks have bias-free convs, and where the width changes their bias-free 1x1 `nin_shortcut` maps the
  block's output h, not its input: out = h + nin(h) (latents.bae.ResBlock with bias=False, skip_after=True);
- there is no attention anywhere (`attn_resolutions` is read by neither the encoder nor the decoder), and no
  quant_conv / post_quant_conv (MAGE's VQModel has none);
- quantizer: the nearest codebook row in Euclidean distance (taming VectorQuantizer2, argmin of |z|^2 + |e|^2 -
  2 z.e), K = 1024 rows of d = 256;
- decoder: conv 3x3 (bias) to the top width, mid stage, per level (coarsest first) `res_blocks` residual blocks then
  a nearest x2 + conv 3x3 upsampling, GroupNorm, SiLU, conv 3x3 to RGB.
Images enter in [0, 1] (MAGE main_pretrain.py: ToTensor, no normalisation) and leave in about [0, 1] (MAGE
gen_img_uncond.py clips x 255 to [0, 255]). The decoder is a plain conv net on a code map, so it decodes any
Z in R^{N x d x h x w}, soft (expected) codes included.

Our module names follow the reference's, except: residual `nin_shortcut` -> `skip`, `up.{i}.upsample` ->
`up.{i}.resample`, `mid.block_1/2` -> `mid.block.0/1` (a latents.bae.Level), `quantize.embedding` -> `codebook`.
`from_mage` maps a released state dict onto ours, `to_mage` back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from latents.bae import Level, ResBlock, Upsample, _norm


@dataclass(frozen=True)
class VQGANArch:
    """Hyper-parameters of the tokenizer; the defaults are MAGE's released model (config/vqgan.yaml)."""

    codebook_size: int = 1024  # K, `n_embed`
    code_dim: int = 256  # d, `embed_dim` = `z_channels`
    ch: int = 128  # base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # per level; downsampling f = 2^(levels - 1)
    res_blocks: int = 2
    image_size: int = 256
    norm_groups: int = 32  # GroupNorm groups (reference 32; tiny test models use fewer)

    @property
    def factor(self) -> int:
        """Spatial downsampling f."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid of one image."""
        side = self.image_size // self.factor
        return (side, side)

    def widths(self) -> list[int]:
        """Width of each level, finest first."""
        return [self.ch * m for m in self.ch_mult]


def _res(c_in: int, c_out: int, groups: int) -> ResBlock:
    return ResBlock(c_in, c_out, groups, bias=False, skip_after=True)


class VQEncoder(nn.Module):
    def __init__(self, arch: VQGANArch):
        super().__init__()
        g, widths = arch.norm_groups, arch.widths()
        self.conv_in = nn.Conv2d(3, arch.ch, 3, padding=1, bias=False)
        down, c_in = [], arch.ch
        for i, c_out in enumerate(widths):
            blocks = [_res(c_in if j == 0 else c_out, c_out, g) for j in range(arch.res_blocks)]
            down.append(Level(blocks, [], nn.AvgPool2d(2) if i != len(widths) - 1 else None))
            c_in = c_out
        self.down = nn.ModuleList(down)
        self.mid = Level([_res(c_in, c_in, g), _res(c_in, c_in, g)], [], None)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, arch.code_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class VQDecoder(nn.Module):
    def __init__(self, arch: VQGANArch):
        super().__init__()
        g, widths = arch.norm_groups, arch.widths()
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(arch.code_dim, c_in, 3, padding=1)
        self.mid = Level([_res(c_in, c_in, g), _res(c_in, c_in, g)], [], None)
        up: list[Level | None] = [None] * len(widths)
        for i in reversed(range(len(widths))):
            blocks = [_res(c_in if j == 0 else widths[i], widths[i], g) for j in range(arch.res_blocks)]
            up[i] = Level(blocks, [], Upsample(widths[i]) if i != 0 else None)
            c_in = widths[i]
        self.up = nn.ModuleList(up)  # up[i] works at level i's resolution; run coarsest first
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQGAN(nn.Module):
    """Encoder -> nearest codebook row -> decoder; `decode_codes` takes any code map (soft codes included)."""

    def __init__(self, arch: VQGANArch):
        super().__init__()
        if arch.image_size % arch.factor:
            raise ValueError(f"image size {arch.image_size} is not divisible by the downsampling {arch.factor}")
        self.arch = arch
        self.encoder, self.decoder = VQEncoder(arch), VQDecoder(arch)
        self.codebook = nn.Embedding(arch.codebook_size, arch.code_dim)

    @property
    def codes(self) -> Tensor:
        """The codebook (K, d)."""
        return self.codebook.weight

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (N, 3, H, W) -> token ids (N, h, w), the nearest codebook row of each encoder vector."""
        z = self.encoder(images).permute(0, 2, 3, 1)  # (N, h, w, d)
        e = self.codes
        dist = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2.0 * z @ e.t()
        return dist.argmin(dim=-1)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """A code map (N, d, h, w), any real values -> images in about [0, 1] (N, 3, f h, f w)."""
        return self.decoder(codes)


# ---------------------------------------------------------------------------------------------------
# The released checkpoint (vqgan_jax_strongaug.ckpt: encoder.*, decoder.*, quantize.embedding.weight, possibly
# under a "state_dict" entry, as taming's VQModel.init_from_ckpt reads it).

_TO_OURS = [(re.compile(r"\.nin_shortcut\."), ".skip."), (re.compile(r"\.upsample\."), ".resample."),
            (re.compile(r"\.mid\.block_1\."), ".mid.block.0."), (re.compile(r"\.mid\.block_2\."), ".mid.block.1."),
            (re.compile(r"^quantize\.embedding\."), "codebook.")]
_TO_MAGE = [(re.compile(r"\.skip\."), ".nin_shortcut."), (re.compile(r"\.resample\."), ".upsample."),
            (re.compile(r"\.mid\.block\.0\."), ".mid.block_1."), (re.compile(r"\.mid\.block\.1\."), ".mid.block_2."),
            (re.compile(r"^codebook\."), "quantize.embedding.")]
_KNOWN = re.compile(r"^(encoder\.|decoder\.|quantize\.embedding\.weight$)")


def _rename(state: dict[str, Tensor], rules) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def from_mage(state: dict) -> dict[str, Tensor]:
    """A MAGE/ADDP VQGAN state dict (taming key names, optionally under "state_dict") -> ours.

    Renames per the module docstring; keys outside encoder.*, decoder.* and quantize.embedding.weight raise a
    KeyError naming them (a checkpoint of another tokenizer); missing ones fail the strict load that follows.
    """
    state = state.get("state_dict", state)
    unknown = sorted(k for k in state if not _KNOWN.match(k))
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) the MAGE VQGAN key map does not know (a checkpoint of another "
                       f"tokenizer?): {unknown[:6]}")
    return _rename(state, _TO_OURS)


def to_mage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the reference's key names; the inverse of `from_mage`."""
    return _rename(state, _TO_MAGE)


def load_vqgan(path: str, arch: VQGANArch, what: str) -> VQGAN:
    """The frozen float32 tokenizer from a local file (ours or the released one), strictly loaded."""
    from gen.io import BadFile, load_state

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = load_state(path, what)
    if "state_dict" in state or "quantize.embedding.weight" in state:
        state = from_mage(state)
    net = VQGAN(arch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BadFile(f"{path} ({what}) does not fit the configured tokenizer (latent.vq.*: codebook_size, "
                      f"code_dim, ch, ch_mult, res_blocks): {str(err).splitlines()[1:3]}") from None
    return net.eval().requires_grad_(False)
