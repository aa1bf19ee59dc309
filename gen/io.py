"""Small file and tensor helpers every job shares: atomic writes, checked torch.load, grey-to-RGB, flat dicts."""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a hidden temporary file next to `path`, then rename it over `path`.

    A reader never sees a half-written file, and a crash leaves at most the temporary file, which the next
    write replaces. The temporary name keeps the suffix, so writers that pick a format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # per process: concurrent writers
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_state(path: str | Path, what: str) -> dict:
    """torch.load a weights file safely (weights only, on the CPU: nothing unpickled as code) and check it holds a
    dict. `what` names the file's role and the config key that gave it, so a wrong file fails in one clear line."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path} ({what}) is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} ({what}) holds a {type(obj).__name__}, not a state dict")
    return obj


def to_rgb(images: Tensor) -> Tensor:
    """(N, 1, H, W) grey images repeated to (N, 3, H, W); RGB images unchanged (a view, no copy)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def flatten(d: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested mappings as dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
