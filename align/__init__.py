"""Representation-alignment plug-ins (REPA, SRA, ERW): the ALIGNERS registry and frozen target encoders."""
from __future__ import annotations

from align.base import SCHEDULES, AlignBatch, Aligner, WeightSchedule
from align.encoders import ENCODERS, FrozenEncoder, build_encoder
from align.erw import ERW
from align.repa import REPA
from align.sra import SRA

# Keys are what `align.methods` takes (DESIGN.md 3.4).
ALIGNERS: dict[str, type[Aligner]] = {
    "repa": REPA,
    "sra": SRA,
    "erw": ERW,
}

__all__ = [
    "ALIGNERS",
    "ENCODERS",
    "ERW",
    "REPA",
    "SCHEDULES",
    "SRA",
    "AlignBatch",
    "Aligner",
    "FrozenEncoder",
    "WeightSchedule",
    "build_encoder",
]
