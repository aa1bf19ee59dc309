"""Plumbing shared by the feature networks: local weight files and their sha256 (exact float32: gen.precision).

As the float32 TF graph of guided-diffusion evaluator.py, the extractor runs in float32 with TF32 off and no autocast,
whatever the job around it set (train.py enables TF32 and bf16 autocast for the backbone; precision moves FID, SiT
issue #14). DESIGN.md "Offline first" (pytorch-fid and torch-fidelity download their Inception weights at run time):
weights come from a local path given by configuration, a missing file is one error naming the file, where it is
published and the config key, and the file's sha256 is recorded with every score.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from gen.io import BadFile


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_weights(path: str | Path | None, key: str, needed: str, published: str) -> Path:
    """The weights file at `path`, or one FileNotFoundError naming the file, where it is published and the config
    key."""
    hint = f"it needs {needed}, published at {published}; download it once elsewhere, copy it here and set {key}=PATH"
    if path is None or str(path) == "":
        raise FileNotFoundError(f"config key '{key}' is not set: {hint} (nothing is downloaded at run time)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"config key '{key}': no file {p}; {hint}")
    return p


def check_sha256(path: Path, expected: str | None, key: str) -> str:
    """The file's sha256; raises if `expected` is given (full hex or a prefix of >= 8 digits) and differs."""
    actual = file_sha256(path)
    if expected:
        want = expected.strip().lower()
        if len(want) < 8 or not actual.startswith(want):
            raise BadFile(f"{path} has sha256 {actual}, but config key '{key}' expects {want}: the file is "
                             f"corrupt or a different version; replace it or correct {key}")
    return actual
