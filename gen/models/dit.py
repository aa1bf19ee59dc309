"""The adaLN-Zero transformer of DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024), one class for both.

DiT and SiT share the network; they differ in what the objective feeds it (integer DDPM steps vs
continuous flow time) and in two defaults kept from their code: DiT predicts a learned variance
(8 output channels) and leaves the patch-conv bias at PyTorch's default init, SiT as trained by REPA
predicts 4 channels and zeroes that bias.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from gen.cond import as_cond
from gen.config import ComponentConfig, check
from gen.layers import AdaLNBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d, unpatchify
from gen.models.base import Backbone, BackboneOutput
from gen.validation import in_range

# Sizes are data (DiT paper, Table 1): depth, hidden width D, attention heads.
SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# Variant defaults; everything here can be overridden per model.
VARIANTS: dict[str, dict] = {
    "DiT": dict(learn_sigma=True, zero_patch_bias=False, patches=(2, 4, 8)),
    "SiT": dict(learn_sigma=False, zero_patch_bias=True, patches=(1, 2, 4, 8)),
}


@dataclass
class DiTConfig(ComponentConfig):
    """DiT/SiT transformers (model.name DiT-*/SiT-*): options over the size table and the variant defaults."""

    learn_sigma: Optional[bool] = None
    """Predict a variance too (2x output channels); null keeps the variant default (DiT yes, SiT no)."""
    qk_norm: bool = False
    """Per-head LayerNorm on queries and keys (REPA's --qk-norm)."""
    rope: bool = False
    """2-D rotary position embedding on q/k in every attention (LightningDiT/ERW style); off: DiT/SiT as published."""
    depth: Optional[int] = None
    """Number of blocks; null keeps the size table's value."""
    hidden_size: Optional[int] = None
    """Token width D; null keeps the size table's value."""
    num_heads: Optional[int] = None
    """Attention heads; null keeps the size table's value."""

    def validate(self, cfg) -> None:
        """Positive sizes, and a width the heads divide."""
        for key in ("depth", "hidden_size", "num_heads"):
            value = getattr(self, key)
            in_range(f"model.dit.{key}", value, 1, nullable=True)
        size = SIZES[Transformer.SIZES_OF[cfg.model.name]] if cfg.model.name in Transformer.SIZES_OF else {}
        width, heads = self.hidden_size or size.get("hidden_size"), self.num_heads or size.get("num_heads")
        check(width is None or heads is None or width % heads == 0, "model.dit.hidden_size",
              f"{width} is not divisible by {heads} heads (model.dit.num_heads)")
        check(width is None or width % 4 == 0, "model.dit.hidden_size",  # sincos_2d: sin and cos of rows and columns
              f"{width} is not a multiple of 4, which the 2-D sin-cos position embedding needs")
        check(not self.rope or width is None or heads is None or width // heads % 4 == 0, "model.dit.num_heads",
              f"2-D RoPE (model.dit.rope) needs a head width divisible by 4, and {width} / {heads} heads gives "
              f"{width // heads if width and heads else '?'}; choose other model.dit.hidden_size/num_heads")


def _build(variant: str, size: str, patch_size: int, **overrides) -> Transformer:
    """A variant/size/patch entry with user overrides (input_size, in_channels, num_classes, learn_sigma, ...)."""
    allowed = set(inspect.signature(Transformer.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown} for {variant}-{size}/{patch_size}; "
                        f"valid: {sorted(allowed)}")
    defaults = {k: v for k, v in VARIANTS[variant].items() if k != "patches"}
    return Transformer(**{**SIZES[size], **defaults, "patch_size": patch_size, **overrides})


class AdaLNStack(Backbone):
    """What every adaLN-Zero block stack shares (DiT/SiT here, the set transformer): x/t/y embedders, `blocks` of
    width `hidden_size` and a `final_layer`."""

    def token_width(self, block: int) -> int:
        """Every block keeps the width D."""
        return self.hidden_size

    def warm_parameters(self, blocks: int) -> tuple[str, ...]:
        """The x/t/y embedders and blocks 1..blocks (a fixed position table is frozen anyway)."""
        return ("x_embedder.", "t_embedder.", "y_embedder.", *(f"blocks.{i}." for i in range(blocks)))

    def compile_regions(self, **options) -> None:
        """Compile each block and the final layer in place ("regional compilation"): the blocks share one graph,
        so compiling costs about one block's time, and taps / early exits between blocks need no recompile."""
        for block in self.blocks:
            block.compile(**options)
        self.final_layer.compile(**options)


class Transformer(AdaLNStack):
    """DiT/SiT backbone: patchify, sin-cos positions, adaLN-Zero blocks, modulated final layer.

    `qk_norm` and `rope` (2-D RoPE on q/k, LightningDiT/ERW style) are independent switches; both off: as published.
    """

    KEY = "dit"
    Config = DiTConfig
    LAYOUTS = ("grid",)

    def __init__(
        self,
        *,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        rope: bool = False,
        zero_patch_bias: bool = True,
    ):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = (h, w)
        self.grid = (h // patch_size, w // patch_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.rope = rope
        self.hidden_size = hidden_size
        self.depth = self.num_blocks = depth
        self.sample_shape = (in_channels, h, w)
        self.token_grid = self.grid
        self.num_classes = num_classes
        self.null_class = num_classes  # explicit null id: the last row of the label table

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        num_tokens = self.grid[0] * self.grid[1]
        # Fixed sin-cos positions, a frozen Parameter so it is in the state dict and the EMA like upstream.
        # Kept with RoPE on: LightningDiT (hence ERW) adds pos_embed to the patch tokens with use_rope too.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        rope_grid = self.grid if rope else None  # 2-D RoPE on q/k in every block; tables are not saved
        self.blocks = nn.ModuleList(
            [AdaLNBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, rope=rope_grid) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights(zero_patch_bias)

    def initialize_weights(self, zero_patch_bias: bool = True) -> None:
        """DiT's init: xavier Linears, N(0, 0.02) embedders, zeroed adaLN and output layers (model outputs 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(sincos_2d(self.hidden_size, self.grid).unsqueeze(0))
        # The patch conv is initialised as the Linear it is (xavier over the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if zero_patch_bias:
            nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output layer at 0.
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @classmethod
    def from_config(cls, cfg, sample_shape: tuple[int, ...]) -> Transformer:
        """cfg.model.name with cfg.model.dit's options, for latents of shape (C, H, W), cfg.cond.num_classes classes."""
        if len(sample_shape) != 3:
            raise ValueError(f"{cfg.model.name} takes (C, H, W) samples, got shape {tuple(sample_shape)}")
        channels, height, width = sample_shape
        patch = int(cfg.model.name.rsplit("/", 1)[1])  # before building: the latent grid must tile into patches
        check(height % patch == 0 and width % patch == 0, "data.image_size",
              f"{cfg.data.image_size} gives {cfg.latent.name} latents of {height}x{width}, which the patch size "
              f"{patch} of {cfg.model.name} does not divide; use a multiple of "
              f"{patch * max(1, cfg.data.image_size // height)} or a model with a smaller patch size")
        o = cfg.model.dit
        overrides = {k: getattr(o, k) for k in ("learn_sigma", "depth", "hidden_size", "num_heads")
                     if getattr(o, k) is not None}
        return cls.MODELS[cfg.model.name](input_size=(height, width), in_channels=channels,
                                          num_classes=cfg.cond.num_classes, qk_norm=o.qk_norm, rope=o.rope, **overrides)

    @classmethod
    def config_blocks(cls, cfg) -> int:
        """model.dit.depth, else the size table's depth."""
        return cfg.model.dit.depth or SIZES[cls.SIZES_OF[cfg.model.name]]["depth"]

    def forward(self, x: Tensor, t: Tensor, cond, *, taps=(), stop_at: int | None = None) -> BackboneOutput:
        """Denoise `x` at time `t` under `cond` (a Cond, or class labels); `feats[k]`: tokens after k blocks.

        With `stop_at=k` only the first k blocks run and `out` is None (teachers that need one feature).
        """
        taps = frozenset(taps)
        last = self.check_taps(taps, stop_at)
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"input of spatial size {tuple(x.shape[-2:])}, model built for {self.input_size}")
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(as_cond(cond).labels)  # (N, D)
        feats: dict[int, Tensor] = {}
        for k, block in enumerate(self.blocks[:last], start=1):
            h = block(h, c)  # (N, T, D)
            if k in taps:
                feats[k] = h
        if stop_at is not None:
            return BackboneOutput(None, feats)
        out = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return BackboneOutput(unpatchify(out, self.grid, self.patch_size, self.out_channels), feats)


Transformer.MODELS = {
    f"{variant}-{size}/{p}": partial(_build, variant, size, p)
    for variant, spec in VARIANTS.items() for size in SIZES for p in spec["patches"]
}
Transformer.SIZES_OF = {name: name.split("-")[1].split("/")[0] for name in Transformer.MODELS}
