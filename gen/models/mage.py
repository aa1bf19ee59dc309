"""MAGE's bidirectional token transformer (Li et al., CVPR 2023, arXiv 2211.09117): a masked-token predictor over an
h x w grid of VQ ids, and the key map of its released weights (`mage-vitb-1600.pth`, `mage-vitl-1600.pth`).

Network (reference LTH14/mage `models_mage.py`, MaskedGenerativeEncoderViT):
- vocabulary V = K + class_slots + 1: codes 0..K-1, class ids K..K+class_slots-1, the mask id V - 1; position 0
  holds a class id (MAGE, unconditional: always the "fake class" K + 76, id 1100), positions 1..L the codes or the
  mask id;
- `token_emb` (BertEmbeddings): word + learned position embedding (L + 1 rows), LayerNorm (eps 1e-6);
- encoder: pre-LN blocks (gen.layers.Block, qkv bias, exact GELU, eps 1e-6), LayerNorm `norm`;
- decoder: Linear `decoder_embed`; every masked (or dropped) position gets the decoder-embedded features of
  position 0 (`pad_with_cls_token`); + `decoder_pos_embed_learned`; pre-LN `decoder_blocks`; `decoder_norm`;
- MlmLayer head: Linear to the encoder width, exact GELU, LayerNorm (eps 1e-5), logits = h E^T + b with E the
  *detached* word-embedding table (no gradient reaches E through the head) and b a learned bias over V.
`out` holds the logits of the K codes at positions 1..L, shaped (N, h, w, K) (MAGE's loss and sampler both slice
logits[:, 1:, :K]).

Token drop (MAGE training only): `forward(..., drop=mask)` removes the positions of `mask` (N, L), an equal count per
row and a subset of the masked ones, from the encoder; the decoder fills them like masked ones. MAGE drops
ceil(0.5 L) positions while training (gen.objectives.masked_tokens, `drop_ratio`) and none when generating;
ADDP's frozen predictor (its token_predictor.py) drops none. Reproducing the released predictors' outputs
therefore needs the whole encoder-decoder but not the drop, which changes training only.

Dropout (model.mage.dropout; MAGE: 0.1): after the embeddings' LayerNorm and in every block (gen.layers.Block).
Not built: the reference's unused parameters (patch_embed, cls_token, the fixed sin-cos pos_embed /
decoder_pos_embed, mask_token, decoder_pred): a released checkpoint's entries for them, and its frozen `vqgan.*`
copy, are dropped by `from_mage` (MAGE_UNUSED).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.cond import as_cond
from gen.config import ComponentConfig, check
from gen.dropout import dropout as sample_dropout
from gen.layers import Block
from gen.models.base import Backbone, BackboneOutput
from gen.validation import in_range

SIZES: dict[str, dict[str, int]] = {
    # MAGE models_mage.py mage_vit_base_patch16 / mage_vit_large_patch16; T: a test-size model.
    "T": dict(depth=2, hidden_size=32, num_heads=2, decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2),
    "B": dict(depth=12, hidden_size=768, num_heads=12, decoder_depth=8, decoder_hidden_size=768, decoder_num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, decoder_depth=8, decoder_hidden_size=1024,
              decoder_num_heads=16),
}


@dataclass
class TokenNetConfig(ComponentConfig):
    """What MAGE's and ADDP's token transformers share: size overrides of their size tables, dropout and the scale of
    the N(0, 0.02) table init. A subclass gives its size table (`size_table`)."""

    depth: Optional[int] = None
    """Encoder blocks; null keeps the size table's value."""
    hidden_size: Optional[int] = None
    """Encoder width (ADDP: the decoder's too); null keeps the size table's value."""
    num_heads: Optional[int] = None
    """Encoder heads; null keeps the size table's value."""
    decoder_depth: Optional[int] = None
    """Decoder blocks; null keeps the size table's value (MAGE, ADDP: 8)."""
    decoder_num_heads: Optional[int] = None
    """Decoder heads; null keeps the size table's value (MAGE, ADDP: 16)."""

    embed_init_std: float = 0.02
    """Std of the normal init of the id table and the token/decoder position tables (MAGE, ADDP: 0.02; ADDP's pixel
    encoder too). The head scores against the detached id table, so its logits scale with the table's norm: tiny
    widths learn much faster with a larger value (the digits quickstarts: 1.0)."""
    dropout: float = 0.0
    """Dropout while training (MAGE, ADDP: 0.1): after the embeddings' LayerNorm and in every encoder and decoder
    block (attention weights, attention output, MLP; gen.layers.Block). Each sample's masks are a function of the
    run's seed, the step and its index in the global batch (gen.dropout): the same on any number of processes and
    exact on resume."""

    def size_table(self, name: str) -> dict[str, int]:
        """The size table's entry of model `name` (e.g. MAGE-B): every size key of this family."""
        raise NotImplementedError

    def sizes(self, name: str) -> dict[str, int]:
        """The size table's entry of model `name` with this section's overrides."""
        table = self.size_table(name)
        return {k: table[k] if getattr(self, k) is None else getattr(self, k) for k in table}

    def validate_token_options(self, section: str, name: str) -> dict[str, int]:
        """Positive size overrides, dropout in [0, 1) and a positive init scale, named under `section` (model.mage /
        model.addp); returns model `name`'s sizes."""
        for key in self.size_table(name):
            in_range(f"{section}.{key}", getattr(self, key), 1, nullable=True)
        in_range(f"{section}.dropout", self.dropout, 0.0, 1.0, below=True)
        in_range(f"{section}.embed_init_std", self.embed_init_std, 0.0, above=True)
        return self.sizes(name)


@dataclass
class MageConfig(TokenNetConfig):
    """MAGE token transformers (model.name MAGE-T/B/L) on vq token ids; sizes override the size table."""

    class_slots: Optional[int] = None
    """Class ids in the vocabulary V = K + class_slots + 1 (K: latent.vq.codebook_size); null: 1000 for an
    unconditional model (MAGE's vocabulary), cond.num_classes + 1 (the labels and the null one) otherwise."""
    unconditional: bool = False
    """Ignore labels: every sample gets the fake class id K + fake_class_slot (MAGE, unconditional)."""
    fake_class_slot: int = 76
    """Class slot of the unconditional model's fake class (MAGE: 76, i.e. id 1100 for K = 1024)."""
    decoder_hidden_size: Optional[int] = None
    """Decoder width; null keeps the size table's value."""

    def slots(self, cfg) -> int:
        """The class slots of the vocabulary."""
        if self.class_slots is not None:
            return self.class_slots
        return 1000 if self.unconditional else cfg.cond.num_classes + 1

    def size_table(self, name: str) -> dict[str, int]:
        return SIZES[MaskedTokenTransformer.SIZES_OF.get(name, "T")]

    def validate(self, cfg) -> None:
        """Positive sizes, widths the heads divide, room for the labels and the fake class among the class slots."""
        s = self.validate_token_options("model.mage", cfg.model.name)
        for prefix in ("", "decoder_"):
            check(s[f"{prefix}hidden_size"] % s[f"{prefix}num_heads"] == 0, f"model.mage.{prefix}hidden_size",
                  f"{s[f'{prefix}hidden_size']} is not divisible by {s[f'{prefix}num_heads']} heads")
        in_range("model.mage.class_slots", self.class_slots, 1, nullable=True)
        slots = self.slots(cfg)
        if self.unconditional:
            check(0 <= self.fake_class_slot < slots, "model.mage.fake_class_slot",
                  f"must lie in [0, class slots = {slots}) (model.mage.class_slots)")
        else:
            check(cfg.cond.num_classes + 1 <= slots, "model.mage.class_slots",
                  f"{slots} cannot hold cond.num_classes={cfg.cond.num_classes} labels plus the null one")


class TokenEmbedding(nn.Module):
    """Word + learned position embedding, then LayerNorm and dropout (MAGE's BertEmbeddings names)."""

    def __init__(self, vocab_size: int, width: int, positions: int, dropout: float = 0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-6)
        self.dropout = sample_dropout(dropout)

    def forward(self, ids: Tensor) -> Tensor:
        """(N, T) long -> (N, T, D)."""
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]))


class MlmLayer(nn.Module):
    """Linear, exact GELU, LayerNorm, then logits against a (detached) embedding table plus a bias over V."""

    def __init__(self, width: int, word_width: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(width, word_width)
        self.ln = nn.LayerNorm(word_width)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        """(N, T, D_dec) and the (V, D) table -> logits (N, T, V)."""
        return self.ln(F.gelu(self.fc(x))) @ table.t() + self.bias


class MaskedTokenTransformer(Backbone):
    """MAGE's encoder-decoder token predictor (module docstring); x holds ids (N, h, w) with masked ones = mask_id."""

    KEY = "mage"
    Config = MageConfig
    LAYOUTS = ("id_grid",)
    MODELS = {}
    SIZES_OF = {"MAGE-T": "T", "MAGE-B": "B", "MAGE-L": "L"}

    def __init__(self, grid: tuple[int, int], codebook_size: int, depth: int, hidden_size: int, num_heads: int,
                 decoder_depth: int, decoder_hidden_size: int, decoder_num_heads: int, class_slots: int = 1000,
                 num_classes: int | None = None, fake_class_slot: int = 76, dropout: float = 0.0,
                 embed_init_std: float = 0.02):
        super().__init__()
        self.sample_shape = self.token_grid = tuple(grid)
        self.codebook_size, self.class_slots = int(codebook_size), int(class_slots)
        self.vocab_size = self.codebook_size + self.class_slots + 1
        self.mask_id = self.vocab_size - 1
        self.fake_class_slot = int(fake_class_slot)
        self.null_class = num_classes  # label meaning "unconditional"; None: an unconditional model
        self.depth, self.num_blocks = depth, depth + decoder_depth
        self.widths = (hidden_size, decoder_hidden_size)
        n = grid[0] * grid[1]
        self.token_emb = TokenEmbedding(self.vocab_size, hidden_size, n + 1, dropout)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, drop=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + 1, decoder_hidden_size))
        self.decoder_blocks = nn.ModuleList(Block(decoder_hidden_size, decoder_num_heads, drop=dropout)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=1e-6)
        self.mlm_layer = MlmLayer(decoder_hidden_size, hidden_size, self.vocab_size)
        self.initialize_weights(embed_init_std)

    def initialize_weights(self, embed_std: float = 0.02) -> None:
        """MAGE's init: xavier-uniform Linears with zero bias, unit LayerNorms, N(0, embed_std^2) embeddings and
        positions (MAGE: 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for table in (self.token_emb.word_embeddings.weight, self.token_emb.position_embeddings.weight,
                      self.decoder_pos_embed_learned):
            nn.init.normal_(table, std=embed_std)

    @classmethod
    def from_config(cls, cfg, sample_shape) -> MaskedTokenTransformer:
        """cfg.model.name with cfg.model.mage's options, for id grids of `sample_shape`; K = latent.vq.codebook_size."""
        o = cfg.model.mage
        return cls(tuple(sample_shape), cfg.latent.vq.codebook_size, class_slots=o.slots(cfg),
                   num_classes=None if o.unconditional else cfg.cond.num_classes,
                   fake_class_slot=o.fake_class_slot, dropout=o.dropout, embed_init_std=o.embed_init_std,
                   **o.sizes(cfg.model.name))

    @classmethod
    def config_blocks(cls, cfg) -> int:
        s = cfg.model.mage.sizes(cfg.model.name)
        return s["depth"] + s["decoder_depth"]

    def token_width(self, block: int) -> int:
        return self.widths[0] if block <= self.depth else self.widths[1]

    def warm_parameters(self, blocks: int) -> tuple[str, ...]:
        enc = ("token_emb.", *(f"blocks.{i}." for i in range(min(blocks, self.depth))))
        if blocks <= self.depth:
            return enc
        return (*enc, "norm.", "decoder_embed.", "decoder_pos_embed_learned",
                *(f"decoder_blocks.{i}." for i in range(blocks - self.depth)))

    def class_ids(self, cond, n: int, device) -> Tensor:
        """The id at position 0: K + label, K + fake_class_slot for an unconditional model."""
        if self.null_class is None:
            return torch.full((n,), self.codebook_size + self.fake_class_slot, dtype=torch.long, device=device)
        return self.codebook_size + as_cond(cond).labels.to(device).long()

    def forward(self, x: Tensor, t: Tensor, cond, *, taps=(), stop_at: int | None = None,
                drop: Tensor | None = None) -> BackboneOutput:
        """Logits (N, h, w, K) of the codes at every position of the ids x (N, h, w); t is not read (MAGE has no
        time input). `drop` (N, L) bool removes positions from the encoder (equal counts per row; module docstring).
        feats[k]: the L grid tokens after block k (encoder blocks 1..depth, then decoder blocks)."""
        taps = frozenset(taps)
        last = self.check_taps(taps, stop_at)
        n = x.shape[0]
        ids = torch.cat([self.class_ids(cond, n, x.device)[:, None], x.reshape(n, -1).long()], dim=1)
        h = self.token_emb(ids)  # (N, 1 + L, D)
        keep = None
        if drop is not None:
            if taps & set(range(1, self.depth + 1)):
                raise ValueError("encoder taps need every position: no token drop with them")
            keep = torch.cat([drop.new_zeros(n, 1), drop.reshape(n, -1)], dim=1).logical_not()
            h = h[keep].reshape(n, -1, h.shape[-1])
        feats = {}
        for k, block in enumerate(self.blocks[:last], start=1):
            h = block(h)
            if k in taps:
                feats[k] = h[:, 1:]
        if last <= self.depth:
            return BackboneOutput(None, feats)
        h = self.decoder_embed(self.norm(h))
        pad = h[:, :1]
        if keep is not None:
            h = torch.zeros(n, ids.shape[1], h.shape[-1], dtype=h.dtype, device=h.device).masked_scatter(
                keep[..., None], h)
            h = torch.where(keep[..., None], h, pad)
        h = torch.where((ids == self.mask_id)[..., None], pad, h) + self.decoder_pos_embed_learned
        for k, block in enumerate(self.decoder_blocks[: last - self.depth], start=self.depth + 1):
            h = block(h)
            if k in taps:
                feats[k] = h[:, 1:]
        if stop_at is not None:
            return BackboneOutput(None, feats)
        logits = self.mlm_layer(self.decoder_norm(h), self.token_emb.word_embeddings.weight.detach())
        return BackboneOutput(logits[:, 1:, : self.codebook_size].reshape(*x.shape, -1), feats)


def _model(size: str, **overrides) -> MaskedTokenTransformer:
    """MAGE-<size> with keyword overrides (grid, codebook_size, ...); defaults: 16 x 16 tokens, K = 1024."""
    kwargs = {"grid": (16, 16), "codebook_size": 1024, **SIZES[size], **overrides}
    return MaskedTokenTransformer(**kwargs)


MaskedTokenTransformer.MODELS = {f"MAGE-{s}": (lambda s: lambda **kw: _model(s, **kw))(s) for s in SIZES}


# ---------------------------------------------------------------------------------------------------
# Released weights: MAGE's main_pretrain checkpoints ({"model": state_dict, ...}), keys named as above.

MAGE_UNUSED = ("vqgan.", "patch_embed.", "cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
               "decoder_pred.", "token_emb.position_ids")
"""Reference keys with no counterpart here: the frozen tokenizer copy (load it as latent.vq.weights), the pixel
patch embedding, cls token, fixed sin-cos positions, mask token and pixel head that MAGE builds but never uses in
its token path, and BertEmbeddings' position_ids buffer. (`decoder_pos_embed_learned` is kept: the prefix test is
exact, see `from_mage`.)"""


def from_mage(state: dict) -> dict[str, Tensor]:
    """A MAGE checkpoint ({"model": ...} or the bare state dict) -> ours: MAGE_UNUSED dropped, names unchanged."""
    state = state.get("model", state)

    def unused(key: str) -> bool:
        return key.startswith(MAGE_UNUSED) and key != "decoder_pos_embed_learned"

    return {k: v for k, v in state.items() if not unused(k)}


PUBLISHED = ("MAGE's predictors mage-vitb-1600.pth / mage-vitl-1600.pth are linked from github.com/LTH14/mage "
             "README.md (also github.com/ChangyaoTian/ADDP README.md)")


def load_mage(model: MaskedTokenTransformer, path: str | None, key: str) -> MaskedTokenTransformer:
    """Load a released MAGE checkpoint, a state dict of ours, or a masked_tokens run's model/ema .safetensors from
    the local file `path` into `model`, strictly; `key` is the config key that gave the path (named in the errors)."""
    import os

    from gen.io import BadFile, load_state

    if path is None or not os.path.isfile(str(path)):
        problem = f"{key} is not set" if path is None else f"{key}={str(path)!r}: no such file"
        raise FileNotFoundError(f"{problem}; {PUBLISHED}; pass the file with {key}=/path/to/file")
    if str(path).endswith(".safetensors"):  # e.g. a masked_tokens run's checkpoint, ema.safetensors
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = from_mage(load_state(str(path), f"MAGE predictor weights, {key}"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BadFile(f"{path} ({key}) does not fit the configured MAGE model (its size, K and class slots): "
                      f"{str(err).splitlines()[1:3]}") from None
    return model
