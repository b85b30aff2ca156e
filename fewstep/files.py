"""Writing files that survive faults: one atomic writer, one safetensors writer, one way to name write errors.

Every file fewstep writes (checkpoints, ``config.json``, sample grids, reports, statistics) goes through
:func:`write_atomic` or :func:`save_tensors`:

* the bytes go to a temporary file beside the target, which is flushed (and fsynced on request) and
  renamed over the target, so a reader never sees half a file and a failed write leaves the old one;
* a failed write removes its temporary file, so a full disk is not made fuller by debris;
* the file gets the permissions an ordinary ``open`` would give (``0o666`` minus the umask), not the
  ``0o600`` of :func:`tempfile.mkstemp`, so colleagues can read a shared run;
* errors that libraries raise in their own types for what is really an I/O error (safetensors'
  ``SafetensorError("... No space left on device (os error 28)")``) become :class:`OSError` with the
  errno, so callers handle one type: ``except OSError``.
"""
from __future__ import annotations

import errno as errno_codes
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save_file
from torch import Tensor


def _umask() -> int:
    mask = os.umask(0)   # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _os_error(exc: BaseException, path: str | os.PathLike) -> OSError:
    """``exc`` as an :class:`OSError`: itself if it is one, else with the errno its message names."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    code = int(found.group(1)) if found else errno_codes.EIO
    return OSError(code, os.strerror(code) if found else str(exc), str(path))


def write_atomic(path: str | os.PathLike, content: bytes | str | Callable[[Path], None], *,
                 fsync: bool = False) -> Path:
    """Write ``path`` atomically (temporary file in the same directory, then rename); parents are created.

    Args:
        content: the bytes or text, or a function that writes the file at the temporary path it is
            given (``safetensors.torch.save_file``, ``np.savez`` on an open file …).
        fsync: flush the file to the disk before the rename (checkpoints: the rename must not reach
            the disk before the data).
    Raises:
        OSError: the write failed (disk full, permissions …), also when the library reported it in its
            own error type; the target is unchanged and no temporary file is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:   # some ancestor is a file: name it, not mkdir's "File exists"
        blocker = next(p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir())
        raise NotADirectoryError(errno_codes.ENOTDIR, os.strerror(errno_codes.ENOTDIR), str(blocker)) from None
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(content):
                f.write(content.encode() if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as exc:
        _unlink(tmp)
        if not isinstance(exc, OSError) and "os error" in str(exc):   # safetensors' SafetensorError
            raise _os_error(exc, path) from exc
        raise
    except BaseException:   # KeyboardInterrupt mid-write: no debris either
        _unlink(tmp)
        raise
    return path


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_json(path: str | os.PathLike, body: Any, *, default: Callable[[Any], Any] | None = None,
               fsync: bool = False) -> Path:
    """Write ``body`` as indented JSON (with a final newline) atomically; see :func:`write_atomic`."""
    return write_atomic(path, json.dumps(body, indent=1, default=default) + "\n", fsync=fsync)


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, *, fsync: bool = True) -> Path:
    """Write ``tensors`` (moved to CPU, made contiguous) as a safetensors file at ``path``, atomically;
    a full disk raises :class:`OSError` (``ENOSPC``), not safetensors' own error type."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(cpu, str(tmp)), fsync=fsync)


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); ``None`` if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """Bytes as a short string: ``1.4 GiB``, ``312 MiB``, ``12 KiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT)


def describe_os_error(exc: BaseException) -> str:
    """One phrase for a failed file operation, ``No space left on device (runs/a/config.json)``, without
    Python's ``[Errno 28]``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc)
