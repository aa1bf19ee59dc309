"""How the four jobs end on an expected failure: one line `error: ...` naming the cause, the key or file and the fix.

Every job's `main` runs its work inside `one_line_errors(debug)`. An expected failure (a bad config value, data or
file, a held lock, a diverging loss, a full disk, a read-only folder) then ends the job with that one line on stderr
and exit code 1, without a traceback; `--debug` or the environment variable REPGEN_DEBUG=1 re-raises it with the
traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager

DEBUG_ENV = "REPGEN_DEBUG"
"""Environment variable that, set to 1, shows the traceback of an expected failure (as --debug does)."""

DEBUG_HELP = f"show the traceback of an expected error instead of its one-line message (also {DEBUG_ENV}=1)"
"""The help text of every job's --debug flag."""


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss, or a finite one that exploded (train.divergence_factor)."""


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
"""OSError numbers of a write the user can fix: disk full or quota exceeded, permission denied, read-only."""

_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "file write failed")
"""How writers that do not raise OSError (torch.save's zip writer, safetensors) report a full disk."""


def disk_full(err: BaseException) -> bool:
    """Whether `err` reports a full disk (or an exhausted quota), from an OSError or a writer's own message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return not isinstance(err, OSError) and any(text in str(err) for text in _DISK_FULL_TEXT)


def as_write_error(err: BaseException, path) -> BaseException:
    """`err`, raised while writing `path`, as an OSError naming `path` when it reports a full disk; else `err`."""
    if disk_full(err) and not (isinstance(err, OSError) and err.filename):
        code = err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC
        return OSError(code, os.strerror(code), str(path))
    return err


def expected_errors() -> tuple[type, ...]:
    """The exception types that end a job with one line (imported here, when a job fails)."""
    from gen.checkpoint import CheckpointError
    from gen.config import ConfigError
    from gen.data import DataError
    from gen.io import BadFile, LockHeld

    return (ConfigError, DataError, CheckpointError, BadFile, LockHeld, NonFiniteLoss, FileNotFoundError,
            FileExistsError)


def message(err: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for anything else (a bug: keep its traceback)."""
    if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError)):
        where = err.filename or "a file"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"disk full while writing {where} ({err.strerror}); free space on that file system (or raise "
                    f"the quota), or write elsewhere, then run the job again")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (f"cannot write {where} ({err.strerror}); make its folder writable, or choose another output "
                    f"folder (train.run_dir, sample.out, --out)")
        return None
    if disk_full(err):
        return (f"disk full while writing ({str(err).splitlines()[0].strip()}); free space on the output's file "
                f"system, or write elsewhere, then run the job again")
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename} does not exist ({err.strerror}); check the path"
    if isinstance(err, expected_errors()):
        return " ".join(str(err).split())  # one line, whatever the message's own line breaks
    return None


def debugging(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: the job's --debug flag or REPGEN_DEBUG=1."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextmanager
def one_line_errors(debug: bool = False):
    """Run a job's body: an expected failure exits with `error: <message>` (exit code 1) unless debugging."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - classified below; anything unexpected is re-raised as it is
        line = message(err)
        if line is None or debugging(debug):
            raise
        sys.stdout.flush()
        sys.exit(f"error: {line}")
