"""ADDP's pixel encoder and token decoder (Tian et al., ICLR 2024, arXiv 2306.05423; reference ChangyaoTian/ADDP
`modeling/encoders/models_addp.py`, MaskedGenerativeEncoderViT), module names as in the reference.

- input: an image x_t in [0, 1] (decoded from reliable and soft tokens), clamped to [0, 1] and ImageNet-normalised
  (mean .485/.456/.406, std .229/.224/.225; `normalize_input`);
- encoder: p x p patches (`patch_embed`), + learned `pos_embed` (cls at row 0, `cls_token`), LayerNorm
  `tokenizer_norm` (eps 1e-6), pre-LN blocks over all 1 + L tokens (no MAE-style dropping), LayerNorm `norm`;
- decoder: `decoder_embed`; the cls slot and every masked slot (mask_t) take the learned `mask_token`, so pixel
  features enter at reliable positions only; the id embeddings (`token_emb`, V x D, the encoder width) of the
  reliable ids are appended (an equal count per row); positions: `decoder_pos_embed_learned` on pixel slots,
  `decoder_pos_mask_embed` on masked slots, `decoder_pos_token_embed` (rows 1..L, by grid position) on the appended
  ids; pre-LN `decoder_blocks`, `decoder_norm`; MlmLayer head (gen.models.mage.MlmLayer) against the detached id
  table: logits over V at slots 1..L.
Class-conditional variant (not in ADDP; model.addp.class_conditional): the cls slot holds the id embedding of
K + label instead of the mask token (K + the null label for dropped labels and guidance).
Vocabulary V = K + 1000 + 1 (codes, MAGE's class ids, the mask id) by default. The decoder width must equal the
encoder width (the appended id embeddings are D wide), as in both released configs.
Dropout (model.addp.dropout; the reference's 0.1): `tokenizer_dropout` after `tokenizer_norm`, and in the blocks.
Not built: the reference's unused `decoder_pos_embed`, `decoder_pred`,
`pos_token_embed`, `pos_mask_embed`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gen.cond import as_cond
from gen.config import check
from gen.dropout import dropout as sample_dropout
from gen.layers import Block, PatchEmbed
from gen.models.base import Backbone, BackboneOutput, ImageFeatures
from gen.models.mage import MlmLayer, TokenNetConfig

SIZES: dict[str, dict[str, int]] = {
    # ADDP addp_vit_base_patch16 / addp_vit_large_patch16 (decoder depth 8: configs/release); T: a test-size model.
    "T": dict(depth=2, hidden_size=64, num_heads=2, decoder_depth=1, decoder_num_heads=2),
    "B": dict(depth=12, hidden_size=768, num_heads=12, decoder_depth=8, decoder_num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, decoder_depth=8, decoder_num_heads=16),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ADDPNetConfig(TokenNetConfig):
    """ADDP encoder-decoders (model.name ADDP-T/B/L); sizes override the size table."""

    patch_size: int = 16
    """Pixel patch side; equals the tokenizer's downsampling f (latent.vq.factor) so patches and ids align."""
    class_slots: int = 1000
    """Class ids in the vocabulary V = K + class_slots + 1 (MAGE's and ADDP's: 1000)."""
    class_conditional: bool = False
    """Condition the token decoder on the class label (not in ADDP, which is unconditional): the cls slot holds the
    id embedding of K + label (the null label cond.num_classes for dropout and guidance) instead of the mask token;
    the pixel encoder never sees the label. With cond.label_dropout, sampler.cfg_scale guides the logits."""
    def size_table(self, name: str) -> dict[str, int]:
        return SIZES[ADDPNet.SIZES_OF.get(name, "T")]

    def validate(self, cfg) -> None:
        """Positive sizes, widths the heads divide, and patches the size of the tokenizer's cells."""
        s = self.validate_token_options("model.addp", cfg.model.name)
        for heads in ("num_heads", "decoder_num_heads"):
            check(s["hidden_size"] % s[heads] == 0, f"model.addp.{heads}",
                  f"{s[heads]} heads do not divide the width {s['hidden_size']}")
        if self.class_conditional:
            check(cfg.cond.num_classes + 1 <= self.class_slots, "model.addp.class_slots",
                  f"{self.class_slots} cannot hold cond.num_classes={cfg.cond.num_classes} labels plus the null one")
        check(self.patch_size == cfg.latent.vq.factor, "model.addp.patch_size",
              f"{self.patch_size} must equal latent.vq.factor={cfg.latent.vq.factor} (one patch per token)")


class ADDPNet(Backbone):
    """The encoder-decoder of the module docstring: `forward(x_t, t, cond, ids=, mask=)` -> logits (N, h, w, V)."""

    KEY = "addp"
    Config = ADDPNetConfig
    LAYOUTS = ("id_grid",)
    MODELS = {}
    ENCODES_IMAGES = True
    SIZES_OF = {"ADDP-T": "T", "ADDP-B": "B", "ADDP-L": "L"}

    def __init__(self, grid: tuple[int, int], codebook_size: int, patch_size: int, depth: int, hidden_size: int,
                 num_heads: int, decoder_depth: int, decoder_num_heads: int, class_slots: int = 1000,
                 num_classes: int | None = None, dropout: float = 0.0, embed_init_std: float = 0.02):
        super().__init__()
        self.sample_shape = self.token_grid = tuple(grid)
        self.codebook_size, self.patch_size = int(codebook_size), int(patch_size)
        self.vocab_size = self.codebook_size + class_slots + 1
        self.mask_id = self.vocab_size - 1
        self.null_class = num_classes  # the null label of a class-conditional decoder; None: unconditional (ADDP)
        self.depth, self.num_blocks, self.width = depth, depth + decoder_depth, hidden_size
        n, d = grid[0] * grid[1], hidden_size
        self.patch_embed = PatchEmbed(3, d, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.tokenizer_norm = nn.LayerNorm(d, eps=1e-6)
        self.tokenizer_dropout = sample_dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, num_heads, drop=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + 1, d))
        self.decoder_pos_mask_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.decoder_pos_token_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.decoder_blocks = nn.ModuleList(Block(d, decoder_num_heads, drop=dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.token_emb = nn.Embedding(self.vocab_size, d)
        self.mlm_layer = MlmLayer(d, d, self.vocab_size)
        self.register_buffer("mean", torch.tensor(MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).reshape(1, 3, 1, 1), persistent=False)
        self.initialize_weights(embed_init_std)

    def initialize_weights(self, embed_std: float = 0.02) -> None:
        """The reference's init: N(0, embed_std^2) tables and tokens (0.02), xavier-uniform Linears (and the patch
        conv as a Linear) with zero bias, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for p in (self.cls_token, self.pos_embed, self.mask_token, self.decoder_pos_embed_learned,
                  self.decoder_pos_mask_embed, self.decoder_pos_token_embed, self.token_emb.weight):
            nn.init.normal_(p, std=embed_std)

    @classmethod
    def from_config(cls, cfg, sample_shape) -> ADDPNet:
        """cfg.model.name with cfg.model.addp's options; K = latent.vq.codebook_size."""
        o = cfg.model.addp
        return cls(tuple(sample_shape), cfg.latent.vq.codebook_size, o.patch_size, class_slots=o.class_slots,
                   num_classes=cfg.cond.num_classes if o.class_conditional else None, dropout=o.dropout,
                   embed_init_std=o.embed_init_std, **o.sizes(cfg.model.name))

    @classmethod
    def config_blocks(cls, cfg) -> int:
        s = cfg.model.addp.sizes(cfg.model.name)
        return s["depth"] + s["decoder_depth"]

    def token_width(self, block: int) -> int:
        return self.width

    def warm_parameters(self, blocks: int) -> tuple[str, ...]:
        return ("patch_embed.", "cls_token", "pos_embed", "tokenizer_norm.",
                *(f"blocks.{i}." for i in range(min(blocks, self.depth))))

    def encode(self, x: Tensor, taps: frozenset[int] = frozenset(), blocks: int | None = None
               ) -> tuple[Tensor, dict[int, Tensor]]:
        """The pixel encoder up to block `blocks` (all: None), before the final LayerNorm: tokens (N, 1 + L, D), cls
        first, and feats[k], the L grid tokens after block k in taps."""
        n = x.shape[0]
        h = self.patch_embed((x.clamp(0.0, 1.0) - self.mean) / self.std) + self.pos_embed[:, 1:]
        h = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), h], dim=1)
        h, feats = self.tokenizer_dropout(self.tokenizer_norm(h)), {}
        for k, block in enumerate(self.blocks[:blocks], start=1):
            h = block(h)
            if k in taps:
                feats[k] = h[:, 1:]
        return h, feats

    def encode_images(self, images: Tensor) -> ImageFeatures:
        """The whole encoder (final LayerNorm included) on real images in [0, 1]: its cls and L grid tokens."""
        h = self.norm(self.encode(images)[0])
        return ImageFeatures(h[:, 0], h[:, 1:])

    def forward(self, x: Tensor, t: Tensor, cond, *, ids: Tensor, mask: Tensor, taps=(),
                stop_at: int | None = None) -> BackboneOutput:
        """Logits over V (N, h, w, V) from the image x (N, 3, H, W) in [0, 1], the ids (N, h, w) and mask_t (N, h, w)
        (an equal number of unmasked ids per row); t is not read, cond only by a class-conditional model.
        feats[k]: the L grid tokens after block k (encoder blocks 1..depth, then decoder blocks: their first L
        slots)."""
        taps = frozenset(taps)
        last = self.check_taps(taps, stop_at)
        n = x.shape[0]
        h, feats = self.encode(x, taps, min(last, self.depth))
        if last <= self.depth:
            return BackboneOutput(None, feats)
        masked = torch.cat([mask.new_ones(n, 1), mask.reshape(n, -1)], dim=1)  # the cls slot takes the mask token
        slots = torch.where(masked[..., None], self.mask_token, self.decoder_embed(self.norm(h)))
        if self.null_class is not None:  # the cls slot holds the label's id embedding
            label = self.token_emb(self.codebook_size + as_cond(cond).labels.to(x.device).long())
            slots = torch.cat([label[:, None].to(slots.dtype), slots[:, 1:]], dim=1)
        pos_masked = torch.cat([mask.new_zeros(n, 1), mask.reshape(n, -1)], dim=1)  # cls keeps the pixel position
        slots = slots + torch.where(pos_masked[..., None], self.decoder_pos_mask_embed, self.decoder_pos_embed_learned)
        reliable = ~mask.reshape(n, -1)
        width = slots.shape[-1]
        appended = self.token_emb(ids.reshape(n, -1)[reliable].reshape(n, -1))
        appended = appended + self.decoder_pos_token_embed[:, 1:].expand(n, -1, -1)[reliable].reshape(n, -1, width)
        h = torch.cat([slots, appended], dim=1)
        for k, block in enumerate(self.decoder_blocks[: last - self.depth], start=self.depth + 1):
            h = block(h)
            if k in taps:
                feats[k] = h[:, 1: 1 + reliable.shape[1]]
        if stop_at is not None:
            return BackboneOutput(None, feats)
        logits = self.mlm_layer(self.decoder_norm(h), self.token_emb.weight.detach())
        return BackboneOutput(logits[:, 1: 1 + reliable.shape[1]].reshape(*ids.shape, -1), feats)


def _model(size: str, **overrides) -> ADDPNet:
    """ADDP-<size> with keyword overrides; defaults: 16 x 16 tokens of K = 1024, patches of 16."""
    return ADDPNet(**{"grid": (16, 16), "codebook_size": 1024, "patch_size": 16, **SIZES[size], **overrides})


ADDPNet.MODELS = {f"ADDP-{s}": (lambda s: lambda **kw: _model(s, **kw))(s) for s in SIZES}
