"""Small file and tensor helpers every job shares: atomic writes, sequential .npy writes, writable-folder checks,
checked torch.load, grey-to-RGB, flat dicts, folder locks."""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from gen.errors import as_write_error


class BadFile(ValueError):
    """A file that exists but does not hold what its role (and the config key naming it) needs."""


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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        translated = as_write_error(err, path)  # a full disk, however the writer reports it, names `path`
        if translated is not err:
            raise translated from err
        raise
    return path


class NpyWriter:
    """Write an .npy array of known shape row block by row block, with plain `write` calls.

    Unlike a writable memory map (np.lib.format.open_memmap), whose writes to a full disk kill the process with
    SIGBUS, a full disk here raises OSError(ENOSPC) naming the file. Read the result with np.load(mmap_mode="r").
    """

    def __init__(self, path: str | Path, shape: tuple, dtype):
        import numpy as np

        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        self._guard(lambda: np.lib.format.write_array_header_2_0(self._file, header))

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as err:
            try:
                self._file.close()  # flushes the buffer again, which fails the same way: the descriptor closes anyway
            except OSError:
                pass
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def write(self, rows) -> None:
        """Append `rows` (shape (n, *shape[1:]), this writer's dtype) after the rows written so far."""
        import numpy as np

        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} do not fit {self.path} {self.shape} after {self.rows} rows")
        self._guard(lambda: self._file.write(rows.tobytes()))
        self.rows += len(rows)

    def close(self) -> Path:
        """Flush and close; every row must have been written."""
        if self.rows != self.shape[0]:
            self._file.close()
            raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
        self._guard(self._file.flush)
        self._guard(lambda: os.fsync(self._file.fileno()))
        self._file.close()
        return self.path


def check_writable(path: str | Path, key: str) -> None:
    """Raise ConfigError naming `key` (a config key, or a command-line option such as --out) unless `path` (a folder,
    existing or to be created) can be written.

    Checked from the nearest existing folder up, before a job writes anything. Permission bits do not bind the
    root user, so a root job learns of a read-only folder only when it writes (an OSError the jobs report).
    """
    from gen.config import ConfigError

    name = key if key.startswith("--") else f"config key '{key}'"
    folder = Path(path).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{name}: {folder} cannot be created: {existing} is a file, not a folder; "
                          f"choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{name}: {folder} {what} (permission denied or a read-only file system); "
                          f"make it writable or choose another {key}")


def check_writable_file(path: str | Path, key: str) -> None:
    """`check_writable` of the folder of the file `path` (named by `key`), and `path` not an existing folder."""
    from gen.config import ConfigError

    path = Path(path).expanduser().absolute()
    check_writable(path.parent, key)
    if path.is_dir():
        name = key if key.startswith("--") else f"config key '{key}'"
        raise ConfigError(f"{name}: {path} is a folder, not a file; give a file path or remove that folder")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_state(path: str | Path, what: str) -> dict:
    """torch.load a weights file safely (weights only, on the CPU: nothing unpickled as code) and check it holds a
    dict. `what` names the file's role and the config key that gave it, so a wrong file fails in one clear line."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise BadFile(f"{path} ({what}) is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise BadFile(f"{path} ({what}) holds a {type(obj).__name__}, not a state dict")
    return obj


def load_tensors(path: str | Path, what: str, device: str = "cpu") -> dict:
    """safetensors' load_file, with a corrupt or truncated file as BadFile naming it and its role `what`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise BadFile(f"{path} ({what}) is not a readable safetensors file ({' '.join(str(err).split())}): it is "
                      f"corrupt or truncated; use another checkpoint (checkpoints/step-*) or copy it again") from None


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


class LockHeld(RuntimeError):
    """Another live job holds the lock of a folder this job would write."""


class FolderLock:
    """An exclusive lock on a folder for one job: `folder/.lock`, held with flock while the job runs.

    The kernel drops the lock when its holder exits, however it exits, so a lock left by a killed process is free
    again and the next job takes it over; the file then still names the dead holder, and is rewritten. flock is
    reliable on local file systems and on NFSv4 with lock support; on others (old NFS, some FUSE mounts) it may
    lock nothing, so keep one writer per folder there by hand.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path, job: str, name: str = NAME):
        self.path = Path(folder) / name
        self.job = job
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise LockHeld naming the holder (pid, host, job, start time) and the fix."""
        import fcntl
        import json
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(f"{self.path} is held by another job ({holder}); wait for it to end or stop it, or write "
                           f"elsewhere") from None
        record = {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with a job taking it)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class JobLock:
    """A FolderLock that the main process of a (multi-process) job takes for all its processes: `acquire` raises
    LockHeld on every process when it is taken (the main process's verdict is broadcast, so no process starts
    writing alone). Take it right before the job's first write, so a job refused earlier leaves nothing behind."""

    def __init__(self, accelerator, folder: str | Path, job: str, name: str = FolderLock.NAME):
        self.accelerator, self.lock = accelerator, FolderLock(folder, job, name)

    def acquire(self) -> JobLock:
        """Take the lock for the whole job, or raise LockHeld (on every process) naming the holder."""
        from accelerate.utils import broadcast_object_list

        error = None
        if self.accelerator.is_main_process:
            try:
                self.lock.acquire()
            except LockHeld as err:
                error = str(err)
        if self.accelerator.num_processes > 1:
            error = broadcast_object_list([error])[0]
        if error is not None:
            raise LockHeld(error)
        return self

    def release(self) -> None:
        """Give the lock up (a no-op when it was never taken)."""
        self.lock.release()

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
