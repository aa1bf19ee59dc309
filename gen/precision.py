"""Numeric precision of a block of code: exact float32, TF32 matmuls/convolutions, or bf16 autocast.

Used by the samplers (sampler.precision) and by the feature extractors of the metrics (always exact float32, as the
float32 TF graph of guided-diffusion's evaluator). The switches are restored on exit, whatever the job around set.
Every job also flushes denormal floats to zero on the CPU (`flush_denormals`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def flush_denormals() -> None:
    """Flush denormal floats (magnitude below 1.2e-38) to zero in this process's CPU arithmetic (x86 FTZ/DAZ).

    Called at the start of every job. Denormal operands take a slow path in the CPU's floating-point units: inside
    the convolutions of a small binary autoencoder (their gradients' products) they made a training step 16x
    slower (2.5 s instead of 0.15 s on 2 cores). Only values that small change, and they become 0 in the same way
    on every run and process, so resume and process-count equality hold as before; GPU kernels are not affected.
    """
    torch.set_flush_denormal(True)
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")


def training_precision(setting: str) -> str:
    """Accelerate's mixed_precision for train.mixed_precision: "auto" is bf16 on a CUDA device that supports it
    (no loss scaling, the fast path) and "no" elsewhere (the CPU, where bf16 is slower); others as given."""
    if setting not in MIXED_PRECISIONS:
        raise ValueError(f"mixed precision {setting!r} is not one of {MIXED_PRECISIONS}")
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _tf32_knobs() -> list[tuple[object, str, object, object]]:
    """(object, attribute, exact value, TF32 value) of this torch build's TF32 switches: the fp32_precision API
    (torch >= 2.9) or the legacy allow_tf32 flags."""
    # Reading a legacy flag after the new API was used raises in torch >= 2.9, so use the new API when it exists.
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee", "tf32"),
                (conv, "fp32_precision", "ieee", "tf32")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False, True),
            (torch.backends.cudnn, "allow_tf32", False, True)]


@contextmanager
def precision(kind: str, device: torch.device | str):
    """Run the enclosed code in `kind`: fp32 (TF32 off, autocast off), tf32 (TF32 on, autocast off; REPA
    generate.py's default) or bf16 (autocast to bfloat16 on `device`, TF32 on for what stays float32)."""
    if kind not in PRECISIONS:
        raise ValueError(f"precision {kind!r} is not one of {PRECISIONS}")
    knobs = _tf32_knobs()
    saved = [getattr(obj, name) for obj, name, _, _ in knobs]
    try:
        for obj, name, exact, tf32 in knobs:
            setattr(obj, name, exact if kind == "fp32" else tf32)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=kind == "bf16"):
            yield
    finally:
        for (obj, name, _, _), value in zip(knobs, saved):
            setattr(obj, name, value)


@contextmanager
def exact_float32(device: torch.device | str):
    """Run the enclosed code in true float32: TF32 off for matmuls and convolutions, autocast disabled."""
    with precision("fp32", device):
        yield
