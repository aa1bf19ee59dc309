"""REPA (Yu et al. 2024, arXiv 2410.06940; REPA loss.py, train.py): align the student's tokens after block `depth`
to frozen encoders.

Per encoder k a token-wise projector P_k maps the student's tokens h (N, T, D) to the encoder width; the
per-sample loss is the mean over encoders of -(1/T) sum_i cos(P_k(h)_i, z_k,i), cosine over channels,
in [-1, 1] (REPA loss.py, proj_loss). Targets come from the feature cache when it holds them, else from the
encoders on the clean uint8 images. The projectors are training-only: the backbone has none.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.encoders import ENCODERS, FrozenEncoder, build_encoder
from gen.aligner import AlignBatch, Aligner, WeightSchedule
from gen.config import ComponentConfig, check
from gen.models import family_of, model_size, require_grid
from gen.validation import in_range

# Aligned block per model size: B 4 (REPA paper, Table 7), L and XL 8 (REPA README). S is not reported (the reference
# cannot build SiT-S with REPA): 4, as B, which has the same 12 blocks. DiT-XL/2 + REPA's depth is not stated by the
# paper: 8 assumed, as SiT-XL.
DEFAULT_DEPTH: dict[str, int] = {"S": 4, "B": 4, "L": 8, "XL": 8}


def size_default(table: dict, model_name: str, key: str):
    """A per-size default for a registered backbone, or a ConfigError asking to set `key`."""
    size = model_size(model_name)
    check(size in table, key, f"no default for model {model_name!r}: set it")
    return table[size]


def check_encoders(encoders: list[str], projector_dim: int, section: str) -> None:
    """`align.<section>.encoders`: a non-empty list of distinct registered encoders, and a positive projector width."""
    bad = [k for k in encoders if k not in ENCODERS]
    check(bool(encoders) and not bad and len(set(encoders)) == len(encoders), f"align.{section}.encoders",
          f"a non-empty list of distinct keys of {sorted(ENCODERS)}, got {encoders}")
    in_range(f"align.{section}.projector_dim", projector_dim, 1)


def check_layer(cfg, key: str, layer: int | None, default: dict) -> int:
    """A 1-based block (`layer`, or its per-size default from `default`) within the configured backbone."""
    layer = layer if layer is not None else size_default(default, cfg.model.name, key)
    blocks = family_of(cfg.model.name).config_blocks(cfg)
    check(1 <= layer <= blocks, key, f"{layer} must lie in 1..{blocks} (the model's blocks)")
    return layer


def build_targets(cfg, names: list[str], model: nn.Module, cached_targets: Collection[str] = (),
                  who: str = "REPA") -> tuple[dict, dict[str, int]]:
    """Encoders `names` for `model`'s token grid: the frozen encoders to run (those not in the cache) and every
    target's width. `cached_targets` names the cached encoders, or maps them to their cached (T, d), which must then
    be one token per backbone token at the encoder's width."""
    grid = require_grid(model, who)
    if isinstance(cached_targets, Mapping):
        tokens = grid[0] * grid[1]
        wrong = {name: tuple(shape) for name, shape in cached_targets.items()
                 if name in names and tuple(shape) != (tokens, ENCODERS[name].dim)}
        check(not wrong, "data.path", f"the cached encoder features {wrong} (tokens, width) do not fit this "
              f"backbone's {tokens} tokens; re-run prepare.py with this run's model.name and data.image_size")
    encoders = {name: build_encoder(name, cfg.align.encoder_weights.get(name), cfg.data.image_size, grid)
                for name in names if name not in cached_targets}
    return encoders, {name: encoders[name].dim if name in encoders else ENCODERS[name].dim for name in names}


@dataclass
class REPAConfig(ComponentConfig):
    """REPA: projected student tokens after one block aligned to frozen encoders' patch tokens."""

    encoders: List[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    """Target encoders (align.encoders.ENCODERS keys), one projector each, losses averaged."""
    depth: Optional[int] = None
    """Student block aligned (1-based, output after k blocks); null: size default S 4, B 4, L 8, XL 8."""
    projector_dim: int = 2048
    """Hidden width of the projector MLP D -> dim -> dim -> encoder width."""
    coeff: float = 0.5
    """Loss weight lambda (paper 0.5)."""
    stop_step: Optional[int] = None
    """Weight 0 from this optimizer step on (early stop of the alignment); null keeps it on."""

    def validate(self, cfg) -> None:
        """Encoders, block, weight and stop step (REPA paper, Sec. 4 and Table 7)."""
        check_encoders(self.encoders, self.projector_dim, "repa")
        check_layer(cfg, "align.repa.depth", self.depth, DEFAULT_DEPTH)
        in_range("align.repa.coeff", self.coeff, 0.0)
        in_range("align.repa.stop_step", self.stop_step, 1, nullable=True)


def build_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """Token-wise MLP D -> projector_dim -> projector_dim -> d with SiLU (keys 0/2/4 as REPA's checkpoints)."""
    mlp = nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, out_dim),
    )
    init_projector(mlp)
    return mlp


@torch.no_grad()
def init_projector(mlp: nn.Sequential, generator: torch.Generator | None = None) -> None:
    """REPA's init, the backbone's basic one: xavier-uniform weights, zero biases. Weights are drawn on the CPU
    (from `generator`, else torch's global one) and copied, so a CPU generator serves parameters on any device."""
    for layer in mlp[::2]:
        weight = torch.empty(layer.weight.shape)
        nn.init.xavier_uniform_(weight, generator=generator)
        layer.weight.copy_(weight)
        nn.init.zeros_(layer.bias)


def negative_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """-(1/T) sum_i cos(pred_i, target_i) per sample (N,), cosine over channels, computed in fp32."""
    pred = F.normalize(pred.float(), dim=-1)  # (N, T, d)
    target = F.normalize(target.float(), dim=-1)  # (N, T, d)
    return -(pred * target).sum(dim=-1).mean(dim=-1)  # (N,)


class REPA(Aligner):
    """REPA: one projector per target encoder on the tokens after block `depth`; losses averaged over encoders."""

    KEY = "repa"
    Config = REPAConfig

    def __init__(self, hidden_size: int, target_dims: Mapping[str, int], depth: int, *, projector_dim: int = 2048,
                 schedule: WeightSchedule | None = None, encoders: Mapping[str, FrozenEncoder] | None = None):
        super().__init__(schedule or WeightSchedule(0.5))  # lambda = 0.5 (REPA README / train.py --proj-coeff)
        if not target_dims:
            raise ValueError("REPA needs at least one target encoder")
        if depth < 1:
            raise ValueError(f"REPA depth must be >= 1, got {depth}")
        self.depth = depth
        self.taps = (depth,)
        self.names = tuple(target_dims)  # projector k <-> names[k], the official `projectors.{k}` order
        self.hidden_size, self.projector_dim = hidden_size, projector_dim
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, d) for d in target_dims.values()])
        # A plain dict, not a ModuleDict: frozen encoders stay out of state_dict(), checkpoints and the optimizer.
        self.encoders: dict[str, FrozenEncoder] = dict(encoders or {})

    @property
    def needs_pixels(self) -> bool:
        """Whether some targets are computed online from `batch.pixels` (else all come from the cache)."""
        return bool(self.encoders)

    def target_encoders(self) -> tuple[str, ...]:
        """The encoders whose patch tokens it aligns to."""
        return self.names

    def targets(self, name: str, batch: AlignBatch, device: torch.device) -> Tensor:
        """Encoder `name`'s tokens (N, T, d) for the batch: cached when present, else computed on the clean images."""
        if batch.target_feats is not None and name in batch.target_feats:
            # Asynchronous from the loader's pinned memory: a blocking copy here, after the backbone's forward is
            # queued, would make the host wait for that forward every step.
            return batch.target_feats[name].to(device, non_blocking=True)
        encoder = self.encoders.get(name)
        if encoder is None or batch.pixels is None:
            raise ValueError(f"REPA target {name!r}: not in batch.target_feats and "
                             f"{'no pixels in the batch' if encoder is not None else 'the encoder was not built'}")
        if encoder.device != device:
            encoder.to(device)
        return encoder(batch.pixels)

    def forward(self, feats: dict[int, Tensor], batch: AlignBatch) -> dict[str, Tensor]:
        """Per-sample REPA loss (N,) on the tokens after block `depth`, and the mean cosine per encoder (detached)."""
        return self.align_tokens(feats[self.depth], batch)

    def align_tokens(self, h: Tensor, batch: AlignBatch, loss_fn=negative_cosine) -> dict[str, Tensor]:
        """Per-sample loss (N,) of student tokens h (N, T, D) against the batch's targets, mean over encoders.

        `loss_fn(z_hat, z) -> (N,)`: REPA's negative cosine, or another token loss (ERW's warmup may use NT-Xent);
        the logs are the mean cosine per encoder either way.
        """
        losses, logs = [], {}
        for name, projector in zip(self.names, self.projectors):
            z = self.targets(name, batch, h.device)  # (N, T, d)
            z_hat = projector(h)  # (N, T, d)
            if z.shape != z_hat.shape:
                raise ValueError(f"REPA target {name!r} has shape {tuple(z.shape)}, the projected student tokens "
                                 f"{tuple(z_hat.shape)}: encoder grid and backbone grid must match (REPA utils.py "
                                 f"load_encoders resamples the encoder's pos_embed to it)")
            loss = loss_fn(z_hat, z)  # (N,)
            losses.append(loss)
            cosine = -loss if loss_fn is negative_cosine else -negative_cosine(z_hat.detach(), z)
            logs[f"cos/{name}"] = cosine.detach().mean()
        return {"loss": torch.stack(losses).mean(dim=0), **logs}

    def load_official_projectors(self, state: Mapping[str, Tensor]) -> None:
        """Load REPA's `projectors.{k}.{0,2,4}.*` (OfficialWeights.aligner) strictly; projector k <-> encoder k."""
        own = self.state_dict()
        bad = sorted(set(state) ^ set(own)) + [k for k in own if k in state and state[k].shape != own[k].shape]
        if bad:
            file_dims = [tuple(state[k].shape) for k in sorted(state) if k.endswith(".4.weight")]
            raise ValueError(
                f"REPA projector state does not fit: it has {len(file_dims)} projector(s) with output weights "
                f"{file_dims}, this REPA has encoders {list(self.names)} with widths "
                f"{[p[-1].out_features for p in self.projectors]}, D={self.hidden_size}, "
                f"projector_dim={self.projector_dim}; first differences: {bad[:4]}")
        self.load_state_dict(dict(state), strict=True)

    @classmethod
    def from_config(cls, cfg, model: nn.Module, objective, *, cached_targets: Collection[str] = ()) -> REPA:
        """Build from cfg.align.repa for the student `model`; cached encoders are not loaded."""
        a = cfg.align.repa
        depth = check_layer(cfg, "align.repa.depth", a.depth, DEFAULT_DEPTH)
        encoders, dims = build_targets(cfg, a.encoders, model, cached_targets)
        schedule = WeightSchedule(a.coeff, stop_step=a.stop_step)
        return cls(model.token_width(depth), dims, depth, projector_dim=a.projector_dim, schedule=schedule,
                   encoders=encoders)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, targets={list(self.names)}"
