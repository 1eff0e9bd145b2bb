"""`hvm ctl PATH COMMAND [JSON-ARGS]`: a small QMP client for shell scripts (a plain socket and json).

Connects, reads the greeting, negotiates, sends one command, prints its "return" value as JSON and exits 0.
A QMP error: its desc in one line, status 1. No socket, bad arguments, a server that does not speak QMP:
one line, status 2. Events that arrive meanwhile are skipped. `migrate` returns once the save ended
(status 1 with the reason when it failed), so the next line of a script can use the file."""
from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from typing import Any

EXIT_QMP_ERROR = 1
EXIT_USAGE = 2
TIMEOUT = 30.0          # s: for the connection and each reply (a `stop` waits up to 5 s for the vCPUs)
MAX_REPLY = 16 << 20    # bytes: a server sending more without a newline is not speaking QMP


class CtlError(Exception):
    """One line for the user, status 2."""


class _Conn:
    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise CtlError(f"{path}: no such socket (is the VM running with --qmp?)") from None
        except ConnectionRefusedError:
            self.sock.close()
            raise CtlError(f"{path}: {_refused_why(path)}") from None
        except OSError as e:
            self.sock.close()
            raise CtlError(f"{path}: {e.strerror or e}") from None
        self.path = path
        self.buf = b""
        self.counter = 0
        self.timeout = timeout
        # One deadline for the whole exchange: a server that keeps sending (events) cannot keep hvm ctl
        # waiting longer than the timeout by resetting the socket's per-recv timeout.
        self.deadline = time.monotonic() + timeout

    def close(self) -> None:
        self.sock.close()

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                self.sock.settimeout(left)
                data = self.sock.recv(65536)
            except socket.timeout:
                raise CtlError(f"{self.path}: no reply within {self.timeout:g} s") from None
            except OSError as e:
                raise CtlError(f"{self.path}: {e.strerror or e}") from None
            if not data:
                raise CtlError(f"{self.path}: the server closed the connection")
            self.buf += data
            if len(self.buf) > MAX_REPLY:
                raise CtlError(f"{self.path}: not a QMP server (a reply longer than {MAX_REPLY} bytes)")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise CtlError(f"{self.path}: not a QMP server (a reply that is not JSON)") from None
        if not isinstance(msg, dict):
            raise CtlError(f"{self.path}: not a QMP server (a reply that is not an object)")
        return msg

    def execute(self, command: str, arguments: dict | None) -> dict:
        """Send one command; the reply with its id (events skipped)."""
        self.counter += 1
        ident = f"ctl-{self.counter}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise CtlError(f"{self.path}: {e.strerror or e}") from None
        while True:
            reply = self.recv()
            if "event" in reply:
                continue
            if reply.get("id") == ident:
                return reply
            if "error" in reply and "id" not in reply:   # a message the server could not parse
                return reply


def ctl(path: str, command: str, args_text: str | None, timeout: float = TIMEOUT) -> int:
    arguments = None
    if args_text is not None:
        try:
            arguments = json.loads(args_text)
        except ValueError as e:
            raise CtlError(f"JSON-ARGS: not JSON ({e}); give a JSON object, e.g. "
                           "'{\"uri\": \"file:vm.snap\"}'") from None
        if not isinstance(arguments, dict):
            raise CtlError("JSON-ARGS: must be a JSON object, e.g. '{\"uri\": \"file:vm.snap\"}'")
    conn = _Conn(path, timeout)
    try:
        greeting = conn.recv()
        if "error" in greeting:     # refused before the greeting (too many clients)
            raise CtlError(f"{path}: {_desc(greeting)}")
        if "QMP" not in greeting:
            raise CtlError(f"{path}: not a QMP server (no greeting)")
        reply = conn.execute("qmp_capabilities", None)
        if "error" in reply:
            raise CtlError(f"{path}: capabilities negotiation failed: {_desc(reply)}")
        reply = conn.execute(command, arguments)
        if command == "migrate" and "error" not in reply:
            reply = _wait_for_migration(conn, reply, timeout)
    finally:
        conn.close()
    if "error" in reply:
        print(f"hvm: {command}: {_desc(reply)}", file=sys.stderr)
        return EXIT_QMP_ERROR
    print(json.dumps(reply.get("return", {})))
    return 0


def _wait_for_migration(conn: _Conn, reply: dict, timeout: float) -> dict:
    """QMP's migrate replies at once and saves in the background; a shell script wants to know the file is
    complete. Poll query-migrate until the save ended: its reply, or an error reply with the reason."""
    deadline = time.monotonic() + timeout
    while True:
        state = conn.execute("query-migrate", None).get("return") or {}
        status = state.get("status")
        if status == "completed":
            return reply
        if status == "failed":
            return {"error": {"class": "GenericError", "desc": state.get("error-desc", "the save failed")}}
        if time.monotonic() > deadline:
            raise CtlError(f"{conn.path}: migrate: the save did not end within {timeout:g} s "
                           f"(query-migrate: {status})")
        time.sleep(0.01)


def _refused_why(path: str) -> str:
    """Why connect() was refused, in the user's terms: ECONNREFUSED is also what a plain file gives."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "Connection refused"
    if not stat.S_ISSOCK(mode):
        return "not a socket (give the PATH of a running VM's --qmp unix:PATH)"
    return "connection refused: no VM listens on this socket (a stale one, left by a VM that was killed?)"


def _desc(reply: dict) -> str:
    err = reply.get("error")
    desc = err.get("desc") if isinstance(err, dict) else None
    return " ".join(str(desc if desc is not None else err).split())[:500]
