"""The QMP server: a UNIX socket speaking the QEMU Machine Protocol (docs/interop/qmp-spec.rst).

Threads: one I/O thread owns the sockets (a selector over non-blocking sockets: accepts, reads, splits
messages, writes replies and events), one command thread runs commands one at a time (a command may
wait: `stop` waits for the vCPUs to park). Nothing here runs on a vCPU thread, and what a client can make
hvm keep is bounded: a message is at most MAX_MESSAGE bytes (past that: an error and the connection
closed), at most MAX_CLIENTS are connected, a client has at most one command in flight (its socket is not
read meanwhile, as QEMU's monitor suspends input), and output it does not read past MAX_OUTPUT bytes gets
it disconnected. Events reach clients from Machine.add_listener; the listener only queues bytes."""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import selectors
import signal
import socket
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hvm.qmp.address import QmpAddress
from hvm.qmp.commands import QEMU_VERSION, SCHEMA, Commands, QmpError, check_arguments
from hvm.qmp.stream import MessageTooLong, Splitter, decode

log = logging.getLogger("hvm.qmp")

MAX_MESSAGE = 64 * 1024       # bytes in one message
MAX_CLIENTS = 16
MAX_OUTPUT = 1 << 20          # bytes queued for a client that does not read, before it is dropped
# Read per round: a client's socket is read again only once what it sent was handled, so this bounds its
# parsed, waiting messages (8 KiB of `{}` is 4096 of them).
READ_SIZE = 8 * 1024
# The I/O thread shares the GIL with the vCPU threads, whose exits need it: a client flooding messages
# must not take it from them. Messages are handled at most BATCH per client per round, and after a round
# that took T seconds the thread sleeps BACKOFF * T (GIL released), so it uses at most 1 / (1 + BACKOFF) of
# the interpreter however busy its clients are. A command answered in microseconds waits microseconds.
BATCH = 16
BACKOFF = 4.0
BACKOFF_MAX = 0.05   # s
# Commands that may wait (for the vCPUs to park, for a device): run on the command thread, one at a time,
# their client's input held meanwhile. The others only read state and answer on the I/O thread at once.
WAITING_COMMANDS = frozenset({"stop", "cont", "system_reset", "system_powerdown", "quit", "migrate", "x-hvm-trace"})
FLUSH_TIMEOUT = 1.0           # s given to clients to take their last events when the server closes


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class QmpSocketError(Exception):
    """The socket cannot be made (a live socket or another file at the path, a bad directory);
    str() is the one line for the user."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    splitter: Splitter
    out: deque = field(default_factory=deque)
    out_bytes: int = 0
    pending: deque = field(default_factory=deque)   # messages read, not yet handled
    negotiated: bool = False
    busy: bool = False          # a command is on the command thread
    closing: bool = False       # close once the output is sent
    eof: bool = False           # the client sent all it will (a half-close): answer it, then close
    dead: bool = False
    mask: int = 0


def _message(obj: dict) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\n"


def _error(desc: str, cls: str = "GenericError", id_: Any = None, has_id: bool = False) -> dict:
    reply: dict = {"error": {"class": cls, "desc": desc}}
    if has_id:
        reply["id"] = id_
    return reply


class QmpServer:
    def __init__(self, machine, address: QmpAddress, *, max_clients: int = MAX_CLIENTS,
                 max_message: int = MAX_MESSAGE, max_output: int = MAX_OUTPUT) -> None:
        self.machine = machine
        self.address = address
        self.path = address.path
        self.max_clients = max_clients
        self.max_message = max_message
        self.max_output = max_output
        self.commands = Commands(machine, self._machine_emit)
        self._lock = threading.Lock()           # clients' output queues, shared with event emitters
        self._clients: dict[int, _Client] = {}
        self._listener: socket.socket | None = None
        self._ident: tuple[int, int] | None = None   # (st_dev, st_ino) of the socket file hvm made
        self._sel: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._jobs: queue.Queue = queue.Queue()
        self._io_thread: threading.Thread | None = None
        self._cmd_thread: threading.Thread | None = None
        self._stopping = False
        self._connected = threading.Event()
        self._listening = False

    # --- setup and teardown ----------------------------------------------------------------------
    def start(self) -> None:
        # The stop signals are held off while the socket is made and the threads start: a SIGTERM handler
        # that raises (hvm run's) landing inside Thread.start() leaves a thread that can be neither used nor
        # joined. The threads keep them blocked (they never need them); a signal that came meanwhile is
        # delivered to this thread when the mask is restored, once close() can undo everything.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self._bind()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._listener, selectors.EVENT_READ, None)
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self.machine.add_listener(self._on_event)
            self._listening = True
            self._io_thread = threading.Thread(target=self._io_loop, name="qmp-io", daemon=True)
            self._cmd_thread = threading.Thread(target=self._command_loop, name="qmp-commands", daemon=True)
            self._io_thread.start()
            self._cmd_thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.info("QMP listening on %s", self.path)

    def _bind(self) -> None:
        path = str(self.path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise QmpSocketError(f"{path}: {e.strerror}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise QmpSocketError(f"{path}: exists and is not a socket: hvm does not replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                pass                    # stale: nobody listens
            except OSError as e:
                raise QmpSocketError(f"{path}: {e.strerror or e}") from None
            else:
                raise QmpSocketError(f"{path}: a live socket (another VM's?): hvm does not replace it")
            finally:
                probe.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise QmpSocketError(f"{path}: cannot remove the stale socket: {e.strerror}") from None
        sock = self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # umask for the bind: the socket file is made 0600 from the start (a chmod after the bind would
        # leave a window in which anyone could connect). Done before the vCPUs run, on the main thread.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            self._listener = None
            raise QmpSocketError(f"{path}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        st = os.lstat(path)
        self._ident = (st.st_dev, st.st_ino)
        sock.listen(8)
        sock.setblocking(False)

    def wait_for_client(self, timeout: float | None = None) -> bool:
        """wait=on: block until a first client connects (True) or `timeout` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._connected.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def close(self, flush: float = FLUSH_TIMEOUT) -> None:
        """Give clients up to `flush` seconds to take what is queued for them (the SHUTDOWN event), then
        close every connection, stop the threads and remove the socket file (if it is still hvm's)."""
        if self._listening:
            self.machine.remove_listener(self._on_event)
            self._listening = False
        if self._io_thread is not None and self._io_thread.is_alive():
            deadline = time.monotonic() + flush
            while time.monotonic() < deadline:
                with self._lock:
                    left = any(c.out and not c.dead for c in self._clients.values())
                if not left:
                    break
                self._wake()
                time.sleep(0.01)
        self._stopping = True
        self._jobs.put(None)
        self._wake()
        for t in (self._io_thread, self._cmd_thread):
            if t is not None and t.ident is not None and t is not threading.current_thread():
                t.join(2.0)
        for c in list(self._clients.values()):
            self._drop(c)
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:   # not a file someone put there since
                os.unlink(self.path)
        except OSError:
            pass
        self._ident = None

    def __enter__(self) -> "QmpServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- events ----------------------------------------------------------------------------------
    def _machine_emit(self, event: str, data: dict) -> None:
        """Commands' events (MIGRATION) go through the machine, so every listener sees them."""
        if self._listening:
            self.machine._emit(event, data)
        else:
            self._on_event(event, data)

    def _on_event(self, event: str, data: dict) -> None:
        """A Machine listener: any thread, must not block. Queues the event for every negotiated client."""
        now = time.time()
        sec = int(now)
        msg = _message({"event": event, "data": data,
                        "timestamp": {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}})
        with self._lock:
            for c in self._clients.values():
                if c.negotiated and not c.dead:
                    self._queue_locked(c, msg)
        self._wake()

    def _queue_locked(self, c: _Client, data: bytes) -> None:
        if c.out_bytes + len(data) > self.max_output:
            if not c.closing:
                log.info("QMP: a client did not read %d bytes of replies and events: disconnected",
                         c.out_bytes)
            c.closing = True
            c.out.clear()
            c.out_bytes = 0
            c.dead = True       # the I/O thread closes it
            return
        c.out.append(data)
        c.out_bytes += len(data)

    def _send(self, c: _Client, obj: dict) -> None:
        with self._lock:
            if not c.dead:
                self._queue_locked(c, _message(obj))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass    # a wake-up is pending already (or the server is closed)

    # --- the I/O thread ---------------------------------------------------------------------------
    def _io_loop(self) -> None:
        sel = self._sel
        clock = time.perf_counter
        while not self._stopping:
            # Messages already read and not handled (past a round's BATCH): look, but do not wait.
            ready = any(c.pending and not c.busy and not c.dead for c in self._clients.values())
            try:
                events = sel.select(0 if ready else None)
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            t0 = clock()
            for key, mask in events:
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    c = key.data
                    try:
                        if mask & selectors.EVENT_WRITE and not c.dead:
                            self._write(c)
                        if mask & selectors.EVENT_READ and not c.dead:
                            self._read(c)
                    except Exception:    # a bug here drops one client, never the VM
                        log.warning("QMP: internal error on a connection: dropped", exc_info=True)
                        c.dead = True
            self._update()
            spent = clock() - t0
            if spent > 0.0002:
                time.sleep(min(spent * BACKOFF, BACKOFF_MAX))

    def _update(self) -> None:
        """Each client's interest, after whatever happened: read when idle, write when output waits."""
        for c in list(self._clients.values()):
            if not c.dead and not c.busy and c.pending:
                try:
                    self._handle_pending(c)
                except Exception:    # a bug here drops one client, never the VM
                    log.warning("QMP: internal error on a connection: dropped", exc_info=True)
                    c.dead = True
            with self._lock:
                has_out = bool(c.out)
            idle = not c.busy and not c.pending
            if c.dead or (c.closing and not has_out) or (c.eof and idle and not has_out):
                self._drop(c)
                continue
            mask = 0
            if idle and not c.closing and not c.eof:
                mask |= selectors.EVENT_READ
            if has_out:
                mask |= selectors.EVENT_WRITE
            if mask != c.mask:
                if c.mask == 0:
                    self._sel.register(c.sock, mask, c)
                elif mask == 0:
                    self._sel.unregister(c.sock)
                else:
                    self._sel.modify(c.sock, mask, c)
                c.mask = mask

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # EMFILE and friends: refuse this one, keep serving
                log.warning("QMP: accept failed: %s", e.strerror or e)
                return
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                try:
                    sock.send(_message(_error(f"too many QMP clients (at most {self.max_clients})")))
                except OSError:
                    pass
                sock.close()
                log.info("QMP: a client was refused: %d are connected", self.max_clients)
                continue
            c = _Client(sock, Splitter(self.max_message))
            greeting = {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": self._package()},
                                "capabilities": []}}
            with self._lock:
                self._clients[sock.fileno()] = c
                self._queue_locked(c, _message(greeting))
            self._connected.set()

    @staticmethod
    def _package() -> str:
        from hvm import __version__

        return f"hvm {__version__}"

    def _drop(self, c: _Client) -> None:
        with self._lock:
            fd = c.sock.fileno()
            if fd >= 0 and self._clients.get(fd) is c:
                del self._clients[fd]
            c.dead = True
            c.out.clear()
            c.out_bytes = 0
        if c.mask and self._sel is not None:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.mask = 0
        c.sock.close()

    def _write(self, c: _Client) -> None:
        with self._lock:
            data = b"".join(c.out)
            c.out.clear()
            c.out_bytes = 0
        if not data:
            return
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:        # the client went away
            c.dead = True
            return
        if n < len(data):
            with self._lock:
                rest = data[n:]
                c.out.appendleft(rest)
                c.out_bytes += len(rest)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            c.dead = True
            return
        if not data:
            # EOF: maybe only a half-close (`... | socat - UNIX:vm.sock`): answer what came, then close.
            # A client that went away altogether makes the next send fail, and is dropped then.
            c.eof = True
            return
        try:
            msgs = c.splitter.feed(data)
        except MessageTooLong:
            c.pending.clear()
            self._send(c, _error(f"JSON parse error, a message longer than {self.max_message} bytes"))
            c.closing = True
            return
        c.pending.extend(msgs)

    # --- messages -------------------------------------------------------------------------------
    def _handle_pending(self, c: _Client) -> None:
        for _ in range(BATCH):
            if not c.pending or c.busy or c.dead:
                return
            self._handle(c, c.pending.popleft())

    def _handle(self, c: _Client, raw: bytes | None) -> None:
        if raw is None:
            self._send(c, _error("JSON parse error, nesting too deep"))
            return
        try:
            msg = decode(raw)
        except ValueError as e:
            self._send(c, _error(str(e)))
            return
        if not isinstance(msg, dict):
            self._send(c, _error("QMP input must be a JSON object"))
            return
        has_id, id_ = "id" in msg, msg.get("id")
        try:
            name, args = self._check_request(msg)
        except QmpError as e:
            self._send(c, _error(e.desc, e.cls, id_, has_id))
            return
        if not c.negotiated:
            if name != "qmp_capabilities":
                self._send(c, _error("Expecting capabilities negotiation with 'qmp_capabilities'",
                                     "CommandNotFound", id_, has_id))
                return
            try:
                check_arguments(name, args)
                if args.get("enable"):
                    raise QmpError(f"Capability '{args['enable'][0][:40]}' not available")
            except QmpError as e:
                self._send(c, _error(e.desc, e.cls, id_, has_id))
                return
            reply: dict = {"return": {}}
            if has_id:
                reply["id"] = id_
            with self._lock:
                c.negotiated = True     # under the lock: events from now on reach this client
            self._send(c, reply)
            return
        if name == "qmp_capabilities":
            self._send(c, _error("Capabilities negotiation is already complete, command ignored",
                                 "CommandNotFound", id_, has_id))
            return
        if name in WAITING_COMMANDS:
            c.busy = True
            self._jobs.put((c, name, args, id_, has_id))
        else:
            self._run_command(c, name, args, id_, has_id)

    @staticmethod
    def _check_request(msg: dict) -> tuple[str, dict]:
        for key, value in msg.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":   # also "exec-oob": out-of-band execution is not offered, as QEMU without it
                raise QmpError(f"QMP input member '{key[:60]}' is unexpected")
        if "execute" not in msg:
            raise QmpError("QMP input lacks member 'execute'")
        name = msg["execute"]
        if name not in SCHEMA:
            raise QmpError(f"The command {name[:80]} has not been found", "CommandNotFound")
        return name, msg.get("arguments", {})

    # --- the command thread ------------------------------------------------------------------------
    def _command_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping:
                return
            c, name, args, id_, has_id = job
            ok = self._run_command(c, name, args, id_, has_id)
            c.busy = False
            self._wake()
            if name == "quit" and ok:
                self.commands.after_quit()   # after the reply was queued: the client sees it, then SHUTDOWN

    def _run_command(self, c: _Client, name: str, args: dict, id_: Any, has_id: bool) -> bool:
        try:
            reply: dict = {"return": self.commands.execute(name, args)}
            if has_id:
                reply["id"] = id_
        except QmpError as e:
            reply = _error(e.desc, e.cls, id_, has_id)
        except Exception as e:   # a bug in a command: a reply, never a dead QMP thread
            log.warning("QMP: %s failed", name, exc_info=True)
            reply = _error(f"internal error in {name}: {type(e).__name__}: {e}", "GenericError", id_, has_id)
        self._send(c, reply)
        return "return" in reply
