"""The QMP socket address, in QEMU's -qmp syntax: `unix:PATH[,server=on|off][,wait=on|off]` (and the older
spellings `server`, `nowait`), or a bare PATH (YAML `qmp: PATH`).

hvm always listens (server=off, QEMU's "connect to a listening client", is refused). wait=on is honoured as
QEMU does: the guest does not start until a first client has connected. Unlike QEMU, whose `server` waits
unless told `wait=off`, hvm does not wait unless told `wait=on`: a VM that waits for nobody by default is
what a script or a YAML file wants."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# sun_path is 108 bytes with its terminating NUL on Linux.
MAX_SOCKET_PATH = 107


class QmpAddressError(ValueError):
    """A QMP address that cannot be used; str() is the one-line reason."""


@dataclass(frozen=True)
class QmpAddress:
    path: Path
    wait: bool = False      # wait=on: the guest starts once a first client has connected

    def __str__(self) -> str:
        return f"unix:{self.path},server=on,wait={'on' if self.wait else 'off'}"


def _on_off(option: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise QmpAddressError(f"{option}={value[:40]!r}: expected on or off")


def parse_qmp_address(text: str, base: Path | None = None) -> QmpAddress:
    """`unix:PATH[,server=on][,wait=off]` or a bare PATH -> QmpAddress; a relative PATH is taken against
    `base` (default: the current directory). Raises QmpAddressError."""
    if not isinstance(text, str) or not text:
        raise QmpAddressError("expected unix:PATH[,server=on][,wait=off] or a socket path")
    if "\0" in text:
        raise QmpAddressError("the socket path contains a NUL byte")
    wait = False
    if text.startswith("unix:"):
        # QEMU's option syntax: a comma inside the path is written ",," (an escaped comma).
        parts, cur, i, body = [], [], 0, text[5:]
        while i < len(body):
            if body[i] == ",":
                if body[i + 1:i + 2] == ",":
                    cur.append(",")
                    i += 2
                    continue
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(body[i])
            i += 1
        parts.append("".join(cur))
        raw_path, options = parts[0], parts[1:]
        for opt in options:
            name, eq, value = opt.partition("=")
            if name == "server":
                if eq and not _on_off("server", value):
                    raise QmpAddressError("server=off is not supported: hvm listens on the socket "
                                          "(give server=on or leave it out)")
            elif name == "nowait" and not eq:
                wait = False
            elif name == "wait":
                wait = _on_off("wait", value) if eq else True
            else:
                raise QmpAddressError(f"{opt[:40]!r} is not an option of a QMP socket (server=on, wait=on|off)")
    elif ":" in text.split("/", 1)[0] and not text.startswith(("/", ".", "~")):
        kind = text.split(":", 1)[0]
        raise QmpAddressError(f"{kind[:20]}: is not supported: hvm's QMP listens on a UNIX socket "
                              "(unix:PATH)")
    else:
        raw_path = text
    if not raw_path:
        raise QmpAddressError("the socket path is empty")
    path = Path(os.path.expanduser(raw_path))
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    path = Path(os.path.normpath(path))
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise QmpAddressError(f"{str(path)[:60]}...: a UNIX socket path is at most {MAX_SOCKET_PATH} bytes "
                              f"(this one has {len(os.fsencode(path))}); use a shorter or relative path")
    return QmpAddress(path, wait)
