"""Gaussian noise from one generator or from one generator per sample.

A list of per-sample generators makes sample i depend only on its own seed, whatever the batch it is
drawn in: sample.py gives the same images for any process count and batch size.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape: Sequence[int], generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """N(0, I) of `shape`; with a list of generators, row i comes from generator i."""
    return _rows(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """U(0, 1) of `shape`; with a list of generators, row i comes from generator i."""
    return _rows(torch.rand, shape, generator, device, dtype)


def _rows(fn, shape: Sequence[int], generator: Generators, device, dtype) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return fn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([fn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def sample_generators(seed: int, indices: Sequence[int], device=None) -> list[torch.Generator]:
    """One generator per global sample index, seeded from (seed, index)."""
    return [torch.Generator(device=device).manual_seed(seed * 2**32 + int(i)) for i in indices]
