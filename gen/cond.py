"""What a model is conditioned on: one `Cond` per batch, and the run's `Conditioning` that drops and nulls it.

A `Cond` carries class labels and, in text-conditioned runs, text-encoder tokens; further condition kinds become
fields of it, with their null value in `Conditioning`, so objectives, guidance and samplers, which only move `Cond`s
around (`select`, `cat`, `where`), need no change when one is added. Dropout for classifier-free guidance happens in
`Objective.loss` through `Conditioning.drop`, once, with a mask from the step's draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cond:
    """The conditions of a batch: `labels` (N,) long, where the null class means unconditional, and optionally
    `text` (N, T, D) float, a caption's text-encoder tokens (gen.text), where all-zero tokens mean no caption."""

    labels: Tensor
    text: Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device) -> Cond:
        """The same conditions on `device`."""
        text = None if self.text is None else self.text.to(device, non_blocking=True)
        return Cond(self.labels.to(device, non_blocking=True), text)

    def select(self, index) -> Cond:
        """The conditions of the samples picked by `index` (a slice, a mask or indices)."""
        return Cond(self.labels[index], None if self.text is None else self.text[index])

    def cat(self, other: Cond) -> Cond:
        """This batch followed by `other`."""
        _same_kinds(self, other)
        text = None if self.text is None else torch.cat([self.text, other.text])
        return Cond(torch.cat([self.labels, other.labels]), text)

    def where(self, mask: Tensor, other: Cond) -> Cond:
        """Per sample: `other`'s condition where `mask` is set, else this one."""
        _same_kinds(self, other)
        mask = mask.to(self.device)
        text = None if self.text is None else torch.where(mask[:, None, None], other.text, self.text)
        return Cond(torch.where(mask, other.labels, self.labels), text)


def _same_kinds(a: Cond, b: Cond) -> None:
    if (a.text is None) != (b.text is None):
        raise ValueError("cannot combine conditions with and without text tokens")


def as_cond(cond: Cond | Tensor) -> Cond:
    """A `Cond`; a bare label tensor stands for class labels (tests, official-checkpoint checks)."""
    return cond if isinstance(cond, Cond) else Cond(cond)


class Conditioning:
    """How a run conditions: its null condition, the dropout probability and the random draws dropout needs.

    `null_class=None` is an unconditional model: nothing is dropped and guidance is refused. With `text` (a run
    whose batches carry text tokens, cond.text_dim > 0), the null condition is the null class together with all-zero
    text tokens (the same dropout mask drops both): a backbone's cross-attention over zero tokens gives a learned
    constant (its key and value biases), a learned "no caption" that needs no text encoder in training. Zeros, not
    the encoder's embedding of the empty caption, so that training reads nothing but the cache.
    """

    DRAWS = {"drop": "sample"}  # name -> "sample" (one value per sample) | "batch" (one per global batch)

    def __init__(self, null_class: int | None, dropout: float = 0.0, text: bool = False):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must lie in [0, 1), got {dropout}")
        self.null_class, self.dropout, self.text = null_class, float(dropout), bool(text)

    @classmethod
    def from_config(cls, cfg) -> Conditioning:
        """From cfg.cond: class labels 0..num_classes-1 and the null class num_classes; text tokens iff
        cond.text_dim > 0."""
        return cls(cfg.cond.num_classes, cfg.cond.label_dropout, cfg.cond.text_dim > 0)

    @property
    def conditional(self) -> bool:
        """Whether there is a null condition (so dropout and guidance exist)."""
        return self.null_class is not None

    def from_batch(self, batch: dict, device) -> Cond:
        """The conditions of a data batch (its "label" entry, and its "text" entry in a text-conditioned run)."""
        labels = batch["label"].to(device, non_blocking=True)
        if not self.text:
            return Cond(labels)
        if "text" not in batch:
            from gen.data import DataError

            raise DataError("cond.text_dim > 0 but the training data has no text tokens; train on a latent cache "
                            "that prepare.py wrote with cond.text_encoder set, or set cond.text_dim=0")
        return Cond(labels, batch["text"].to(device, torch.float32, non_blocking=True))

    def null(self, like: Cond) -> Cond:
        """The unconditional counterpart of `like` (same batch size and device)."""
        if self.null_class is None:
            raise ValueError("this model is unconditional: it has no null condition for guidance")
        text = None if like.text is None else torch.zeros_like(like.text)
        return Cond(torch.full_like(like.labels, self.null_class), text)

    def preview(self, n: int, dataset, device) -> Cond:
        """The conditions of n preview samples: labels 0, 1, ..., K-1, 0, ... (K the null class); a text run takes
        the labels and text tokens of the training items 0..n-1 (cycling), so the grid shows training captions."""
        if not self.text:
            return Cond(torch.arange(n, device=device) % self.null_class)
        items = [dataset[i % len(dataset)] for i in range(n)]
        return Cond(torch.stack([item["label"] for item in items]), torch.stack([item["text"] for item in items])
                    ).to(device)

    def draw(self, n: int, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """The dropout mask of n samples (drawn even without dropout, so the random stream has one layout)."""
        return {"drop": torch.rand(n, generator=generator, device=device) < self.dropout}

    def drop(self, cond: Cond, mask: Tensor | None) -> Cond:
        """`cond` with the null condition where `mask` is set (no mask: drawn from torch's global generator)."""
        if self.null_class is None or (mask is None and self.dropout <= 0):
            return cond
        if mask is None:
            mask = torch.rand(len(cond), device=cond.device) < self.dropout
        return cond.where(mask, self.null(cond))
