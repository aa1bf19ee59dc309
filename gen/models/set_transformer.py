"""A permutation-equivariant adaLN-Zero transformer over token sets (layout "set": samples (n, d)).

Yariv et al., "Mosaic-SDF for 3D Generative Models" (CVPR 2024, arXiv 2312.09222) train flow matching with a
transformer over the n rows of a shape's token matrix, one token per row and no positional encoding: the network is
then permutation equivariant, and with i.i.d. noise the generated sets are permutation invariant in distribution
(Koehler et al., "Equivariant Flows", ICML 2020). This family is DiT/SiT (Peebles & Xie 2023; Ma et al. 2024) with
the patch embedding replaced by a Linear(d -> D) per row, no position table, full non-causal attention, the same
adaLN-Zero blocks (gen.layers) conditioned on time + class (a learned null class for classifier-free guidance), and a
final Linear(D -> d) per row.

Text conditioning (the paper's text-to-shape model: cross-attention over precomputed text-encoder tokens; the paper's
encoder and layer layout are not checked here): with text_dim > 0 (cond.text_dim) the text tokens (N, S, text_dim) of
gen.cond.Cond.text go through one Linear(text_dim -> D), and after each adaLN-Zero block every row reads them through a
pre-LN cross-attention sub-block (gen.layers.ContextBlock) whose output projection starts at zero, so a fresh
text-conditioned model computes what the class-only one does. Cross-attention treats each row on its own, so the
network stays permutation equivariant in the rows.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Optional

from torch import Tensor, nn

from gen.cond import as_cond
from gen.config import ComponentConfig, check
from gen.layers import AdaLNBlock, ContextBlock, FinalLayer, LabelEmbedder, TimestepEmbedder
from gen.models.base import BackboneOutput
from gen.models.dit import SIZES, AdaLNStack
from gen.validation import in_range


@dataclass
class SetTransformerConfig(ComponentConfig):
    """Set transformers (model.name SetT-{S,B,L,XL}): options over DiT's size table (Table 1 of the DiT paper)."""

    depth: Optional[int] = None
    """Number of blocks; null keeps the size table's value."""
    hidden_size: Optional[int] = None
    """Token width D; null keeps the size table's value."""
    num_heads: Optional[int] = None
    """Attention heads; null keeps the size table's value."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of D."""
    qk_norm: bool = False
    """Per-head LayerNorm on queries and keys."""

    def validate(self, cfg) -> None:
        """Positive sizes, and a width the heads divide."""
        for key in ("depth", "hidden_size", "num_heads"):
            in_range(f"model.set_transformer.{key}", getattr(self, key), 1, nullable=True)
        in_range("model.set_transformer.mlp_ratio", self.mlp_ratio, 0.0, above=True)
        size = SIZES[SetTransformer.SIZES_OF[cfg.model.name]] if cfg.model.name in SetTransformer.SIZES_OF else {}
        width, heads = self.hidden_size or size.get("hidden_size"), self.num_heads or size.get("num_heads")
        check(width is None or heads is None or width % heads == 0, "model.set_transformer.hidden_size",
              f"{width} is not divisible by {heads} heads (model.set_transformer.num_heads)")


def _build(size: str, **overrides) -> SetTransformer:
    """A size entry with user overrides (sample_shape, num_classes, depth, ...)."""
    allowed = set(inspect.signature(SetTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown} for SetT-{size}; valid: {sorted(allowed)}")
    return SetTransformer(**{**SIZES[size], **overrides})


class SetTransformer(AdaLNStack):
    """Row embedding, adaLN-Zero blocks, modulated per-row output; no positions anywhere (equivariant in the rows)."""

    KEY = "set_transformer"
    Config = SetTransformerConfig
    LAYOUTS = ("set",)
    TEXT = True

    def __init__(self, *, sample_shape: tuple[int, int] = (64, 129), hidden_size: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 1000, qk_norm: bool = False,
                 text_dim: int = 0):
        super().__init__()
        if len(sample_shape) != 2:
            raise ValueError(f"a set transformer takes (n, d) token sets, got samples of shape {tuple(sample_shape)}")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        width = self.sample_shape[1]
        self.hidden_size, self.depth = hidden_size, depth
        self.num_blocks = depth
        self.token_grid = None  # a set: no grid for image-encoder targets (gen.models.require_grid refuses it)
        self.num_classes = num_classes
        self.null_class = num_classes  # the last row of the label table
        self.x_embedder = nn.Linear(width, hidden_size)  # one token per row, shared weights: no index enters
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, 1, width)  # patch size 1: Linear(D -> d) per row
        self.initialize_weights()
        self.text_dim = int(text_dim)
        if self.text_dim:  # made and initialised last: the other weights are those of the class-only model
            self.text_embedder = nn.Linear(self.text_dim, hidden_size)
            self.context_blocks = nn.ModuleList(ContextBlock(hidden_size, num_heads, qk_norm=qk_norm)
                                                for _ in range(depth))
            self.initialize_text()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linears, N(0, 0.02) embedders, zeroed adaLN and output layers (the model outputs 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def initialize_text(self) -> None:
        """The text modules as initialize_weights would: xavier Linears, each context block's output zeroed (the
        block is then the identity)."""
        for module in [self.text_embedder, *self.context_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.context_blocks:
            block.zero_init()

    @classmethod
    def from_config(cls, cfg, sample_shape: tuple[int, ...]) -> SetTransformer:
        """cfg.model.name with cfg.model.set_transformer's options, for token sets (n, d), cfg.cond.num_classes and
        cfg.cond.text_dim."""
        o = cfg.model.set_transformer
        overrides = {k: getattr(o, k) for k in ("depth", "hidden_size", "num_heads") if getattr(o, k) is not None}
        return cls.MODELS[cfg.model.name](sample_shape=tuple(sample_shape), num_classes=cfg.cond.num_classes,
                                          mlp_ratio=o.mlp_ratio, qk_norm=o.qk_norm, text_dim=cfg.cond.text_dim,
                                          **overrides)

    @classmethod
    def config_blocks(cls, cfg) -> int:
        """model.set_transformer.depth, else the size table's depth."""
        return cfg.model.set_transformer.depth or SIZES[cls.SIZES_OF[cfg.model.name]]["depth"]

    def forward(self, x: Tensor, t: Tensor, cond, *, taps=(), stop_at: int | None = None) -> BackboneOutput:
        """Velocity (or noise) for token sets x (N, n, d) at time t under `cond`; feats[k]: (N, n, D) after block k."""
        taps = frozenset(taps)
        last = self.check_taps(taps, stop_at)
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"input token sets of shape {tuple(x.shape[1:])}, model built for {self.sample_shape}")
        cond = as_cond(cond)
        h = self.x_embedder(x)  # (N, n, D)
        c = self.t_embedder(t) + self.y_embedder(cond.labels)  # (N, D)
        context = self._context(cond, x)
        feats: dict[int, Tensor] = {}
        for k, block in enumerate(self.blocks[:last], start=1):
            h = block(h, c)
            if context is not None:
                h = self.context_blocks[k - 1](h, context)
            if k in taps:
                feats[k] = h
        if stop_at is not None:
            return BackboneOutput(None, feats)
        return BackboneOutput(self.final_layer(h, c), feats)


    def _context(self, cond, x: Tensor) -> Tensor | None:
        """The embedded text tokens (N, S, D) of a text-conditioned model, None for a class-only one."""
        if not self.text_dim:
            if cond.text is not None:
                raise ValueError("text tokens given to a set transformer built without text (cond.text_dim=0)")
            return None
        if cond.text is None or cond.text.shape[-1] != self.text_dim or cond.text.shape[0] != x.shape[0]:
            got = None if cond.text is None else tuple(cond.text.shape)
            raise ValueError(f"this set transformer reads text tokens (N, S, {self.text_dim}) for N = {x.shape[0]}; "
                             f"got {got}")
        return self.text_embedder(cond.text.to(x.dtype))


SetTransformer.MODELS = {f"SetT-{size}": partial(_build, size) for size in SIZES}
SetTransformer.SIZES_OF = {f"SetT-{size}": size for size in SIZES}
