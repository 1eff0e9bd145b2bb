"""Files hvm opens on a user's behalf: output files that never follow a symlink or clobber what is not a
regular file, and input files of bounded size that are never FIFOs or devices read until memory runs out.

Every failure is a `HostFileError` carrying one line that names the file and what is wrong with it; the CLI
reports it with status 2.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

# Only these kinds of non-regular file make sense as an output: written to, never truncated or replaced.
_STREAM_KINDS = (stat.S_ISCHR, stat.S_ISFIFO, stat.S_ISSOCK)


class HostFileError(ValueError):
    """A file given by the user that hvm cannot use: the message is one line naming it."""


def _describe(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_output(path: str | os.PathLike, what: str, mode: int = 0o644, *, truncate: bool = True) -> int:
    """Open `path` for writing and return the fd (close-on-exec).

    A symlink is never followed (O_NOFOLLOW: a planted link in /tmp cannot make root overwrite another
    file). A new file is created with `mode` (before the umask). A regular file is truncated only after it
    was opened, so a file that is not regular is never truncated; a character device, FIFO or socket (a
    terminal, /dev/null, a pipe) is written as it is; a directory or block device is refused. `what` names
    the file in the message ("serial output file", "trace file").
    """
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symlink
            raise HostFileError(f"{what} {path}: is a symbolic link (not followed)") from None
        if e.errno == 21:  # EISDIR
            raise HostFileError(f"{what} {path}: is a directory") from None
        if e.errno == 6:   # ENXIO: a FIFO with no reader
            raise HostFileError(f"{what} {path}: a FIFO with no reader") from None
        raise HostFileError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if truncate:
                os.ftruncate(fd, 0)
        elif not any(kind(st.st_mode) for kind in _STREAM_KINDS):
            raise HostFileError(f"{what} {path}: is {_describe(st.st_mode)}")
        os.set_blocking(fd, True)
    except OSError as e:
        os.close(fd)
        raise HostFileError(f"{what} {path}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular_input(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> int:
    """Check that `path` is a regular file hvm may read (no FIFO that would hang, no /dev/zero read until
    memory runs out), at most `max_bytes` long; return its size. Does not keep it open."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise HostFileError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HostFileError(f"{what} {path}: is {_describe(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise HostFileError(f"{what} {path}: {st.st_size} bytes, more than the {max_bytes} allowed")
    if not os.access(path, os.R_OK):
        raise HostFileError(f"{what} {path}: Permission denied")
    return st.st_size


def open_regular_input(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> int:
    """Open a regular file for reading (a blocking fd, close-on-exec), checked on the open file itself: a
    path swapped for a FIFO or a device after an earlier check can neither hang the open (O_NONBLOCK) nor be
    read (fstat), and a file over `max_bytes` is refused."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise HostFileError(f"{what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostFileError(f"{what} {path}: is {_describe(st.st_mode)}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise HostFileError(f"{what} {path}: {st.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """Read a whole regular file of at most `max_bytes` (checked on the open file too, so a file that grows
    or is swapped for a FIFO between the check and the read cannot get past the bound)."""
    path = os.fspath(path)
    check_regular_input(path, what, max_bytes)
    fd = open_regular_input(path, what, max_bytes)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise HostFileError(f"{what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise HostFileError(f"{what} {path}: more than the {max_bytes} bytes allowed")
    return data


def expand_user(path: str, what: str) -> Path:
    """`~` and `~user` as a shell expands them; an unknown user is a one-line error, not a traceback."""
    try:
        expanded = os.path.expanduser(path)
    except (KeyError, RuntimeError):
        expanded = path
    if expanded.startswith("~"):
        user = expanded[1:].split("/", 1)[0]
        raise HostFileError(f"{what} {path}: no user named {user!r} for '~{user}'")
    return Path(expanded)
