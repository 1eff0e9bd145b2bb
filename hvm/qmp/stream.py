"""Splits a QMP client's byte stream into messages, as QEMU's JSON streamer does: a message is one JSON
value, not a line (qemu.qmp sends objects back to back, no newline between them). Objects and arrays end
where their brackets balance (strings and escapes skipped); anything else at the top level is taken up to
the end of its line and reported as an error. Every byte is scanned once, with regular expressions that
jump to the next bracket or quote, and a message may be at most `limit` bytes."""
from __future__ import annotations

import json
import re
from typing import Any

_STRUCT = re.compile(rb'[{}\[\]"]')          # outside strings: what changes the depth or starts a string
_IN_STRING = re.compile(rb'["\\]')           # inside strings: the end, or an escape
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
MAX_DEPTH = 64                               # QEMU's limit is 1024; no QMP command nests deeper than a few


class MessageTooLong(Exception):
    pass


class Splitter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self._start = -1        # offset of the message being read, or -1 between messages
        self._scan = 0          # bytes before this offset have been scanned
        self._depth = 0
        self._in_string = False
        self._bare = False      # a top-level value that is not an object or array: read to the newline
        self._too_deep = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Add bytes; return the complete messages (None for one that nested too deep). Raises
        MessageTooLong when the message being read passes the limit (the connection is then closed)."""
        buf = self.buf
        buf += data
        out: list[bytes | None] = []
        n = len(buf)
        i = self._scan
        while i < n:
            if self._start < 0:
                m = _NOT_SPACE.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.start()
                self._start = i
                c = buf[i]
                if c == 0x7B or c == 0x5B:      # { or [
                    self._depth, self._bare, self._too_deep = 1, False, False
                    i += 1
                else:
                    self._bare = True
                continue
            if self._bare:
                j = buf.find(b"\n", i)
                if j < 0:
                    i = n
                    break
                out.append(bytes(buf[self._start:j]))
                self._start, self._bare = -1, False
                i = j + 1
                continue
            if self._in_string:
                m = _IN_STRING.search(buf, i)
                if m is None:
                    i = n
                    break
                if buf[m.start()] == 0x5C:      # backslash: skip the escaped byte
                    if m.start() + 1 >= n:
                        i = m.start()           # rescan the backslash once the next byte is here
                        break
                    i = m.start() + 2
                    continue
                self._in_string = False
                i = m.start() + 1
                continue
            m = _STRUCT.search(buf, i)
            if m is None:
                i = n
                break
            c = buf[m.start()]
            i = m.start() + 1
            if c == 0x22:
                self._in_string = True
            elif c == 0x7B or c == 0x5B:
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    self._too_deep = True
            else:
                self._depth -= 1
                if self._depth == 0:
                    out.append(None if self._too_deep else bytes(buf[self._start:i]))
                    self._start = -1
        self._scan = i
        # Drop what is done with; keep the message being read.
        keep = self._start if self._start >= 0 else self._scan
        if keep:
            del buf[:keep]
            self._scan -= keep
            if self._start >= 0:
                self._start = 0
        if self._start >= 0 and len(buf) > self.limit:
            raise MessageTooLong()
        return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def decode(raw: bytes) -> Any:
    """One message's bytes -> the JSON value. Raises ValueError with QEMU-like words."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("JSON parse error, invalid UTF-8 sequence in string") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"JSON parse error, {e.msg[:1].lower()}{e.msg[1:]}") from None
    except ValueError as e:
        raise ValueError(f"JSON parse error, {e}") from None
    except RecursionError:
        raise ValueError("JSON parse error, nesting too deep") from None
