"""Representation-alignment plug-ins (REPA, SRA, ERW): the ALIGNERS registry and frozen target encoders.

The contract they implement (gen.aligner.Aligner) and the step that runs them (gen.step) live in gen; a new aligner
is one module here (an Aligner subclass with its Config dataclass) plus one line below.
"""
from __future__ import annotations

from align.encoders import ENCODERS, FrozenEncoder, build_encoder
from align.erw import ERW
from align.repa import REPA
from align.sra import SRA
from gen.aligner import SCHEDULES, AlignBatch, Aligner, WeightSchedule

ALIGNERS: dict[str, type[Aligner]] = {cls.KEY: cls for cls in (REPA, SRA, ERW)}
"""Aligners by the key align.methods lists (config section align.<key>)."""

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
