"""Representation-alignment plug-ins (REPA, SRA, ERW)."""
