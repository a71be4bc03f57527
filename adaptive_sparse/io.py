"""The one atomic writer of the project: files and whole directories.

A file is written to a temporary file in the same directory, flushed and fsynced, then renamed
over the target with `os.replace` (atomic on POSIX: a reader sees the old or the new file, never
a mix), and the directory is fsynced. When the write fails (a full disk: ENOSPC, a read-only
folder, a quota), the temporary file is removed, the previous file stays intact and an `OSError`
names the path and says so.

A directory (an artifact) is written to a hidden temporary directory beside the target, and then
- a new target is renamed into place;
- an existing target is swapped with it in one step by Linux's `renameat2(RENAME_EXCHANGE)`, so
  the path always names a complete directory, the old or the new; the old one (now under the
  hidden name) is removed afterwards. Where the call is missing (not Linux, or a filesystem
  without it) the fallback renames twice, and `read_dir_consistent` readers retry across the
  short gap.
`read_dir_consistent` reads files of a directory through one directory descriptor and retries
when the directory was swapped while it read, so a reader always gets one version's files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

_CHUNK = 1 << 20


def _write_error(path, exc: OSError) -> OSError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return OSError(exc.errno, f"{path}: cannot write ({reason}); the previous file, if any, is "
                              "unchanged")


def fsync_dir(path) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path, write: Callable, mode: int):
    """Call `write(file)` on a temporary file beside `path`, fsync it and rename it over `path`;
    returns what `write` returned."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise _write_error(path, e) from None
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(path.parent)
    return result


def atomic_write_bytes(path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns the path."""
    _atomic(path, lambda f: f.write(data), mode)
    return Path(path)


def atomic_write_text(path, text: str, *, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path, obj, *, indent: int | None = 2, sort_keys: bool = False,
                      allow_nan: bool = True) -> Path:
    """JSON with a final newline; values JSON lacks are written as their str (NaN as Python's
    json writes it unless `allow_nan=False`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


def atomic_save_tensors(path, tensors: Mapping, metadata: dict | None = None) -> str:
    """A safetensors file of {name: tensor} written atomically; returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def atomic_copy(src, path, *, chunks=None, digest: bool = False) -> str | None:
    """Copy `src` (or concatenate the files `chunks`, in order) to `path` atomically, streaming;
    returns the sha256 of what was written when `digest`."""
    sources = [Path(src)] if chunks is None else [Path(c) for c in chunks]

    def write(out):
        h = hashlib.sha256()
        for s in sources:
            with open(s, "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    out.write(block)
                    if digest:
                        h.update(block)
        return h.hexdigest() if digest else None

    return _atomic(path, write, 0o644)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    if not hasattr(_renameat2, "fn"):
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _renameat2.fn = fn
    return _renameat2.fn


def exchange(a, b) -> bool:
    """Swap the paths `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE). False when the
    system or the filesystem does not offer it; OSError on any other failure."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"{a}: cannot swap with {b} ({os.strerror(err)})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove hidden partial/old directories of `out` left by writers that have died."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(partial|old)-(\d+)-[0-9a-f]+")
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_dir(out, blobs: Mapping[str, bytes], *, overwrite: bool = False,
                     marker: str) -> Path:
    """Write {file name: bytes} as directory `out`, all or nothing (the last name in `blobs` is
    written last). An existing `out` is replaced only with `overwrite` and only when it is a
    real directory holding `marker` (so a directory we did not write is never removed)."""
    out = Path(out)
    if out.is_symlink():
        raise ValueError(f"out: {out} is a symbolic link; refusing to write through it")
    if out.exists() and not overwrite:
        raise ValueError(f"out: {out} already exists (pass overwrite=True / --overwrite)")
    if out.exists() and not (out.is_dir() and (out / marker).is_file()):
        raise ValueError(f"out: {out} exists and was not written by adaptive-sparse (no "
                         f"{marker}); refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise _write_error(out, e) from None
    try:
        for name, data in blobs.items():
            _write_file(tmp / name, data)
        fsync_dir(tmp)
        if out.exists():
            if exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class DirectoryChanged(Exception):
    """Raised inside a `read_dir_consistent` reader: the directory was replaced mid-read."""


def read_dir_consistent(path, reader: Callable[[int], object], *, attempts: int = 20):
    """Call `reader(dir_fd)` with a descriptor of directory `path` (open files relative to it
    with `open_in(dir_fd, name)`) and return its result. When the reader fails and the
    directory at `path` was swapped meanwhile (an overwrite), read again from the new one, up to
    `attempts` times; a failure on an unchanged directory propagates."""
    path = Path(path)
    for attempt in range(attempts):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if attempt + 1 < attempts and _appearing(path):
                continue
            raise
        try:
            ino = os.fstat(fd).st_ino
            try:
                return reader(fd)
            except Exception:
                if attempt + 1 < attempts and _swapped(path, ino):
                    continue
                raise
        finally:
            os.close(fd)
    raise DirectoryChanged(f"{path}: replaced {attempts} times while being read")


def _swapped(path: Path, ino: int) -> bool:
    try:
        return os.stat(path).st_ino != ino
    except FileNotFoundError:
        return _appearing(path)


def _appearing(path: Path) -> bool:
    """Whether a writer is between the two renames of the fallback overwrite."""
    for _ in range(50):
        time.sleep(0.002)
        if path.exists():
            return True
    return False


def open_in(dir_fd: int, name: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of regular file `name` inside the directory `dir_fd`, refusing symlinks and
    anything that is not a plain file, and files larger than `max_bytes` (checked before
    reading). Errors name only `name`."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(f"{name}: is a symbolic link; artifact files must be plain "
                                  "files") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{name}: not a plain file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"{name}: {st.st_size} bytes, more than the allowed {max_bytes}")
        return f.read()
