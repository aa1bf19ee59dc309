"""Dropout whose masks depend on the sample, not on the batch it shares: process-count invariant and resume-exact.

The mask of a sample in one dropout call is a function of (run seed, step, the sample's index in the global batch,
which dropout call of the forward it is, the element's position within the sample) only, so a run gives the same
masks whatever the number of processes, the accumulation steps or the order of the samples in a micro-batch, and
repeats them on resume without any saved RNG state. It is a counter-based generator (splitmix64, Steele, Lea and
Flood, OOPSLA 2014: state s + k * gamma, output mix64 of it) evaluated in int64 torch ops on the data's device: no
per-sample loop, no host-device sync, the same bits on CPU and CUDA.

- `sample_streams(seed, first, n, device)`: the training step enters it around the forward of a micro-batch of n
  samples whose first one is sample `first` of the step's global batch (`seed`: a host int of the run's seed and the
  step, gen.step.StepDraws). The per-sample keys are computed on the first dropout call: a model without dropout
  does no work.
- `SampleDropout(p)`: nn.Dropout's semantics (keep with probability 1 - p, scale kept values by 1 / (1 - p), while
  training only; eval draws nothing). Each call of a forward takes the next call number of the active stream, so
  two sites (or one site called twice) never share a mask. Outside a stream (a model called in train mode by a
  test or a tool) each call draws its per-sample keys from torch's global generator, like nn.Dropout.
- `dropout(p)`: the layer a block builds, SampleDropout or (p = 0) an identity.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _int64(v: int) -> int:
    """A 64-bit pattern as the signed int torch's int64 holds."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


GAMMA = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment (odd: k -> s + k * gamma is a bijection mod 2^64)
CALL_GAMMA = _int64(0xD1B54A32D192ED03)  # a second odd increment, for the call number
_M1, _M2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)  # splitmix64's multipliers


def mix64(z: Tensor) -> Tensor:
    """splitmix64's output function on int64 `z`, in place (the caller owns z): xor-shifts are logical shifts (the
    arithmetic shift's sign copies masked off), products wrap mod 2^64. Returns z."""
    z ^= (z >> 30) & ((1 << 34) - 1)
    z *= _M1
    z ^= (z >> 27) & ((1 << 37) - 1)
    z *= _M2
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def sample_keys(seed: int, first: int, n: int, device) -> Tensor:
    """(n,) int64 keys of samples first .. first + n - 1 of a global batch: mix64(seed + index * gamma)."""
    index = torch.arange(first, first + n, device=device, dtype=torch.int64)
    return mix64(index * GAMMA + _int64(seed))


def drop_mask(keys: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """(len(keys), *shape) bool, True (dropped) with probability p: hash k of sample i is mix64(keys[i] + k * gamma),
    and its low and high 32-bit words (the int32 view of the int64 on a little-endian CPU or GPU) decide elements 2k
    and 2k + 1: an element drops iff its word, read as a signed int32, is below 2^32 p - 2^31 (2^32 p of the 2^32
    values: the rate exact to 2^-32). One hash for two elements halves the int64 work."""
    numel = 1
    for size in shape:
        numel *= size
    k = torch.arange((numel + 1) // 2, device=keys.device, dtype=torch.int64).mul_(GAMMA)
    words = mix64(keys[:, None] + k).view(torch.int32)  # (n, 2 * ceil(numel / 2))
    drop = words < int(p * 2.0 ** 32) - (1 << 31)
    return drop[:, :numel].reshape(len(keys), *shape)


class _Stream:
    """The per-sample keys of one micro-batch's forward and the number of dropout calls taken so far."""

    def __init__(self, seed: int, first: int, n: int, device):
        self.seed, self.first, self.n, self.device = seed, first, n, device
        self.keys: Tensor | None = None  # computed on the first call
        self.calls = 0

    def next_keys(self, n: int, device) -> Tensor:
        """The (n,) keys of the next dropout call: mix64(sample key + (call + 1) * call_gamma)."""
        if n != self.n:
            raise ValueError(f"dropout over {n} samples inside a forward of {self.n} (gen.dropout.sample_streams): "
                             "a training forward must keep its batch")
        if self.keys is None:
            self.keys = sample_keys(self.seed, self.first, self.n, self.device)
        self.calls += 1
        return mix64(self.keys.to(device) + _int64(self.calls * CALL_GAMMA))


_ACTIVE: list[_Stream] = []


@contextmanager
def sample_streams(seed: int, first: int, n: int, device):
    """Dropout inside: masks of (seed, first + i, call number, element) for the n samples of a micro-batch."""
    _ACTIVE.append(_Stream(seed, first, n, device))
    try:
        yield
    finally:
        _ACTIVE.pop()


def call_keys(n: int, device) -> Tensor:
    """The (n,) keys of a dropout call: the active stream's next ones, or drawn from torch's global generator."""
    if _ACTIVE:
        return _ACTIVE[-1].next_keys(n, device)
    return torch.randint(-(1 << 63), (1 << 63) - 1, (n,), device=device, dtype=torch.int64)


@torch.compiler.disable
def call_mask(shape: tuple[int, ...], p: float, device) -> Tensor:
    """The drop mask of the next dropout call on a tensor of `shape` (dim 0: the samples).

    Always eager, a graph break under torch.compile: inductor folds arange * constant into index expressions whose
    int64 products overflow, undefined in its generated C++ (a compiled mask came out wrong on CPU), and the
    stream's call number is Python state."""
    return drop_mask(call_keys(shape[0], device), tuple(shape[1:]), p)


class SampleDropout(nn.Module):
    """nn.Dropout with per-sample counter-based masks (module docstring); dim 0 of the input is the sample."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = float(p)

    @property
    def active(self) -> bool:
        """Whether a call draws a mask (training with p > 0)."""
        return self.training and self.p > 0

    def forward(self, x: Tensor) -> Tensor:
        """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p); eval: x."""
        if not self.active:
            return x
        drop = call_mask(tuple(x.shape), self.p, x.device)
        return (x * (1.0 / (1.0 - self.p))).masked_fill_(drop, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout(p: float) -> nn.Module:
    """The dropout layer of a block: SampleDropout(p), or an identity for p = 0 (no draws, no work)."""
    return SampleDropout(p) if p > 0 else nn.Identity()
