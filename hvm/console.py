"""The host end of the serial console: where guest output goes, where guest input comes from,
and a searchable history that scripts can wait on.

The console is also a pexpect object (expect, expect_exact, send, sendline, before/after/match, EOF,
TIMEOUT, logfile, interact): pexpect's own SpawnBase and Expecter do the matching, over a reader of the
history (`_PexpectSide.read_nonblocking`). No thread and no pipe: a console nobody expects on costs nothing
and never holds up the guest, and what pexpect reads is what the history kept (bounded, HISTORY_LIMIT).
pexpect is imported on the first use of its API only (it costs ~8 ms at startup otherwise)."""
from __future__ import annotations

import logging
import os
import re
import select
import stat
import sys
import termios
import threading
import time

from hvm._types import Callable
from hvm.files import expand_user, open_output

log = logging.getLogger(__name__)

HISTORY_LIMIT = 16 << 20  # bytes of console output kept for wait_for()
# Line completion times kept (for time_of, the boot milestones): the first half of them for good (boot),
# then the newest ones; a line whose entry was dropped gets the time of the next line kept (a bound).
LINE_TIMES_LIMIT = 1 << 15
STALL_POLL = 0.1          # seconds between looks at whether a stalled output sink should be given up on
CTRL_A = 0x01
INPUT_CHUNK = 4096        # bytes of host input read (and fed to the UART) at a time
INPUT_AHEAD = 4096        # host input read ahead of the guest at most: the rest waits in the file or pipe
INPUT_POLL = 0.01         # seconds between looks at whether the guest took its input
# The pexpect side. READ_CHUNK: the most one read hands pexpect (its `maxread`). While output streams in,
# reads are spaced READ_SPACING apart plus 1 s per READ_RATE bytes pexpect holds unmatched: each read makes
# pexpect search all of that again, so this keeps a long expect on a chatty guest from costing a core.
# pexpect's own buffers (`before`, the search window) are cut to their last PEXPECT_KEEP bytes past
# PEXPECT_LIMIT: memory stays bounded however long an expect waits.
READ_CHUNK = 1 << 20
READ_SPACING = 0.002
READ_RATE = 50 << 20
PEXPECT_LIMIT = 8 << 20
PEXPECT_KEEP = 4 << 20
EOF_POLL = 0.05           # seconds between looks at whether the VM ended, for a reader with nothing to read


class Console:
    """Guest serial output -> sink + history; host input -> `feed` callback (the UART)."""

    def __init__(self, output: str = "stdio", input: str = "none", open_now: bool = True):
        """`open_now=False` leaves a file: output unopened until open() (Machine opens it once the VM is
        built, so a VM that fails to build does not truncate the old log)."""
        self.output = output
        self.input = input
        self.history = bytearray()
        self._trimmed = 0
        # (monotonic time, offset just past the newline) of each line: when each line was complete.
        self.line_times: list[tuple[float, int]] = []
        self._cond = threading.Condition(threading.Lock())  # a plain lock: write() is on the exit hot path
        self._write_lock = threading.Lock()
        self._waiters = 0
        self._closed = False
        self._out_fd: int | None = None
        self._own_out_fd = False
        self._opened = False
        self._input_thread: threading.Thread | None = None
        self._saved_tty: list | None = None
        self.on_quit: Callable[[], None] | None = None
        # The pexpect side's state (cheap: pexpect itself is set up on first use, see __getattr__).
        self._read_pos = 0            # bytes of output (since the start, trimmed ones included) pexpect has read
        self._last_read = 0.0
        self._feed: Callable[[bytes], None] | None = None       # the UART's feed (Machine.attach)
        self._pending: Callable[[], int] | None = None          # bytes fed the guest has not read yet
        self._ended: Callable[[], int | None] | None = None     # the VM's status once all its output is in
        if open_now:
            self.open()

    def attach(self, feed: Callable[[bytes], None] | None, pending: Callable[[], int] | None,
               ended: Callable[[], int | None]) -> None:
        """Wired by Machine: `feed` passes send()'s bytes to the UART (it blocks while the UART's input queue
        is full and lets go once the VM stops); `ended()` is the VM's exit status once it ended and no vCPU
        can write any more, else None (then EOF comes after the last byte is read)."""
        self._feed = feed
        self._pending = pending
        self._ended = ended

    def __getattr__(self, name: str):
        # Only for attributes the console does not have: the first use of pexpect's API (expect, before,
        # logfile, ...) turns this console into a pexpect object, then looks again.
        if name.startswith("__") or "_pexpect_ready" in self.__dict__ or "_cond" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._become_pexpect()
        return getattr(self, name)

    def _become_pexpect(self) -> None:
        from pexpect.spawnbase import SpawnBase

        kept = dict(self.__dict__)    # attributes a caller set before (console.logfile = f) stay set
        self.__class__ = _pexpect_class(type(self))
        SpawnBase.__init__(self, timeout=30, maxread=READ_CHUNK)
        for key, value in kept.items():
            self.__dict__[key] = value
        if "delaybeforesend" not in kept:
            self.delaybeforesend = None   # pexpect's 50 ms pause before a send is for a pty's echo: no pty here
        if "delayafterread" not in kept:
            self.delayafterread = None    # read_nonblocking spaces reads itself (READ_SPACING)
        self.name = "<hvm console>"
        self.closed = False
        self._pexpect_ready = True

    def open(self) -> None:
        """Open the output sink (once). A file: is opened without following a symlink, created 0644, and
        truncated only if it is a regular file (hvm/files.py open_output); failures are HostFileError."""
        if self._opened:
            return
        self._opened = True
        output = self.output
        if output == "stdio":
            self._out_fd = sys.stdout.fileno() if _has_fileno(sys.stdout) else None
            if self._out_fd is None:
                self._out_fd = -1  # no real stdout (e.g. under pytest capture): write through sys.stdout
        elif output.startswith("file:"):
            path = expand_user(output[5:], "serial output file")
            self._out_fd = open_output(path, "serial output file", 0o644)
            self._own_out_fd = True

    # --- output ---------------------------------------------------------------------------------
    # Set by abandon_stalled_output() (the machine is stopping): output a sink does not take is dropped
    # rather than waited for, so a stalled stdout (a pipe nobody reads) never holds up a vCPU's stop.
    _abandon = False
    _dropped = False
    _sink: tuple[int, str, bool] | None = None   # (fd to write, "file"/"nonblock"/"poll", hvm opened it)

    def abandon_stalled_output(self) -> None:
        """From now on, give up on output the sink does not take within STALL_POLL (writers blocked now too)."""
        self._abandon = True

    def write(self, data: bytes) -> None:
        # Several devices write here (the UART, debugcon, pvconsole), from any vCPU thread: one writer at
        # a time keeps their bytes and the line offsets in order. Readers take the condition's lock.
        # Devices call this outside their own locks; a writer waiting here can be let go (abandon).
        lock = self._write_lock
        if not lock.acquire(False):          # (uncontended, the common case: no timed wait to set up)
            while not lock.acquire(timeout=STALL_POLL):
                if self._abandon:
                    return
        try:
            # bytearray += is atomic under the GIL, so readers need the condition's lock only while the
            # history is trimmed, and a waiter only to be woken. History first: what the guest said is
            # kept even if the sink stalls.
            history = self.history
            history += data
            if b"\n" in data:
                line_times = self.line_times
                line_times.append((time.monotonic(), self._trimmed + len(history)))
                if len(line_times) > LINE_TIMES_LIMIT:
                    del line_times[LINE_TIMES_LIMIT // 2:LINE_TIMES_LIMIT * 3 // 4]
            if len(history) > HISTORY_LIMIT or self._waiters:
                with self._cond:
                    if len(history) > HISTORY_LIMIT:
                        cut = len(history) - HISTORY_LIMIT
                        del history[:cut]
                        self._trimmed += cut
                    self._cond.notify_all()
            fd = self._out_fd
            if fd is not None:
                if fd >= 0:
                    sink = self._sink
                    if sink is not None and sink[1] != "poll":
                        # The hot path: one write() that takes everything (a regular file, or a pipe or
                        # terminal with room); what is left waits in _write_out.
                        try:
                            n = os.write(sink[0], data)
                        except BlockingIOError:
                            n = 0
                        except OSError:
                            return   # a closed terminal must not crash the guest
                        if n < len(data):
                            self._write_out(fd, data[n:])
                    else:
                        self._write_out(fd, data)
                else:
                    sys.stdout.write(data.decode("latin-1"))
                    sys.stdout.flush()
        finally:
            lock.release()

    def _write_out(self, fd: int, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            sink = self._sink = _open_sink(fd)
        out, mode, _ = sink
        view = memoryview(data)
        while view:     # a pipe or terminal may take part of a big buffer (pvconsole's)
            try:
                if mode != "poll":
                    view = view[os.write(out, view):]
                elif self._writable(out):
                    # A blocking sink that polled writable takes a page without blocking (a pipe: one buffer).
                    view = view[os.write(out, view[:4096]):]
                else:
                    return
            except BlockingIOError:
                if not self._writable(out):
                    return
            except OSError:
                return   # a closed terminal must not crash the guest

    def _writable(self, fd: int) -> bool:
        """Wait until fd takes data (True), or until the machine stops with it still stalled (False: drop)."""
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while True:
            try:
                ready = poller.poll(0 if self._abandon else STALL_POLL * 1000)
            except OSError:
                return False
            if ready:
                return not ready[0][1] & (select.POLLERR | select.POLLNVAL)
            if self._abandon:
                if not self._dropped:
                    self._dropped = True
                    log.warning("console output dropped: the output sink takes nothing and the VM is stopping")
                return False

    def time_of(self, pattern: bytes) -> float | None:
        """When the first line containing `pattern` was complete (monotonic seconds), or None."""
        pos = self.history.find(pattern)
        if pos < 0:
            return None
        end = self._trimmed + pos + len(pattern)
        for t, offset in self.line_times:
            if offset >= end:
                return t
        return time.monotonic() if self.line_times else None

    def text(self) -> str:
        return self.history.decode("utf-8", "replace")

    def wait_for(self, pattern: bytes | str | re.Pattern, timeout: float, start: int = 0,
                 stopped: Callable[[], bool] | None = None) -> re.Match | None:
        """Block until `pattern` appears in the output (from byte `start` on), the timeout passes,
        or `stopped()` says the guest is gone. Returns the match, or None."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self.history, max(0, start - self._trimmed))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (stopped is not None and stopped()) or self._closed:
                    return None
                self._waiters += 1
                try:
                    self._cond.wait(min(left, 0.1))
                finally:
                    self._waiters -= 1

    # --- input ---------------------------------------------------------------------------------
    def start_input(self, feed: Callable[[bytes], None], pending: Callable[[], int] | None = None) -> None:
        """Start passing host input (stdin or a file) to `feed` from a thread of its own, in chunks, as the
        guest takes it: while `pending()` (bytes fed but not yet read by the guest) is above INPUT_AHEAD,
        nothing more is read, so a big file or `</dev/zero` costs no memory. `feed` may also block (a UART
        applying backpressure itself); the thread stops at close() and never feeds after it."""
        source = self.input
        if source == "none":
            return
        tty = False
        own = False
        if source.startswith("file:"):
            path = source[5:]
            try:
                # O_NONBLOCK: a path swapped for a FIFO since the config was checked cannot hang the open.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                log.error("serial input file %s: %s: the guest gets no input", path, e.strerror)
                return
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                log.error("serial input file %s: not a regular file any more: the guest gets no input", path)
                return
            own = True
        else:  # stdin
            fd = sys.stdin.fileno() if _has_fileno(sys.stdin) else None
            if fd is None:
                return
            if os.isatty(fd):
                self._enter_raw_mode(fd)
                tty = self._saved_tty is not None
        self._input_thread = threading.Thread(target=self._pump, args=(fd, feed, pending, tty, own),
                                              name="console-input", daemon=True)
        self._input_thread.start()

    def _pump(self, fd: int, feed: Callable[[bytes], None], pending: Callable[[], int] | None = None,
              tty: bool = False, own: bool = False) -> None:
        try:
            self._pump_loop(fd, feed, pending, tty)
        except Exception:  # a failing feed must not leave a thread traceback on the user's terminal
            log.exception("console input stopped")
        finally:
            if own:
                os.close(fd)

    def _pump_loop(self, fd: int, feed: Callable[[bytes], None], pending: Callable[[], int] | None,
                   tty: bool) -> None:
        escape = False
        while not self._closed:
            if pending is not None and pending() > INPUT_AHEAD:
                time.sleep(INPUT_POLL)  # the guest has not taken what it has: read no further
                continue
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                data = os.read(fd, INPUT_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return  # EOF: the guest simply gets no more input
            if self._closed:
                return
            if not tty:
                feed(data)
                continue
            # QEMU's escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends a literal Ctrl-A.
            out = bytearray()
            for b in data:
                if escape:
                    escape = False
                    if b in (ord("x"), ord("X")):
                        if out:
                            feed(bytes(out))
                        if self.on_quit:
                            self.on_quit()
                        return
                    out.append(b)
                elif b == CTRL_A:
                    escape = True
                else:
                    out.append(b)
            if out:
                feed(bytes(out))

    def _enter_raw_mode(self, fd: int) -> None:
        try:
            saved = termios.tcgetattr(fd)
        except termios.error:
            return
        mode = termios.tcgetattr(fd)
        # Keystrokes go to the guest as typed (Ctrl-C included); output processing stays on.
        mode[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
        mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        self._saved_tty = [fd, saved]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._saved_tty is not None:
            fd, saved = self._saved_tty
            try:
                termios.tcsetattr(fd, termios.TCSANOW, saved)
            except termios.error:
                pass
            self._saved_tty = None
        if self._input_thread is not None:
            self._input_thread.join(1.0)
            self._input_thread = None
        if self._own_out_fd and self._out_fd is not None:
            os.close(self._out_fd)
        self._out_fd = None
        if self._sink is not None and self._sink[2]:
            os.close(self._sink[0])
        self._sink = None


_PEXPECT_CLASSES: dict[type, type] = {}


def _pexpect_class(cls: type) -> type:
    """`cls` with pexpect's SpawnBase mixed in (made once per console class, on first use)."""
    made = _PEXPECT_CLASSES.get(cls)
    if made is None:
        from pexpect.spawnbase import SpawnBase

        made = _PEXPECT_CLASSES[cls] = type(cls.__name__, (cls, _PexpectSide, SpawnBase),
                                            {"__module__": cls.__module__, "__doc__": cls.__doc__})
    return made


_CONTROL = {"@": 0, "`": 0, "[": 27, "{": 27, "\\": 28, "|": 28, "]": 29, "}": 29, "^": 30, "~": 30, "_": 31,
            "?": 127}


class _PexpectSide:
    """What a pexpect spawn has that SpawnBase leaves to its subclasses: reading (from the console history),
    sending (to the UART), isalive, interact. Mixed into a Console on first use of pexpect's API; bytes mode
    (before/after are bytes; str patterns and str to send are encoded, as pexpect's spawn does)."""

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> bytes:
        """The next output bytes after what pexpect read before (at most `size`): waits up to `timeout`
        (-1: self.timeout, None: forever) for output, then TIMEOUT; EOF once the VM ended and every byte
        of its output was read. Bytes the bounded history dropped before they were read are skipped."""
        from pexpect import EOF, TIMEOUT

        if timeout == -1:
            timeout = self.timeout
        self._bound_pexpect_buffers()
        now = time.monotonic()
        deadline = None if timeout is None else now + max(0.0, timeout)
        # Streaming output: space reads out (see READ_SPACING), so each search covers more new bytes.
        spacing = READ_SPACING + self._buffer.tell() / READ_RATE
        gather_until = min(self._last_read + spacing, deadline if deadline is not None else float("inf"))
        with self._cond:
            while True:
                # "ended" first: output written before the VM ended is in the history by the time it says so
                ended = self._closed if self._ended is None else self._ended() is not None or self._closed
                start = self._read_pos - self._trimmed
                if start < 0:
                    log.warning("console: %d bytes of output were dropped (the history keeps %d MiB) before "
                                "pexpect read them", -start, HISTORY_LIMIT >> 20)
                    self._read_pos = self._trimmed
                    start = 0
                available = len(self.history) - start
                now = time.monotonic()
                if available >= size or (available and (ended or now >= gather_until)):
                    data = bytes(self.history[start:start + size])
                    self._read_pos += len(data)
                    break
                if ended and not available:
                    if self._ended is not None:
                        self.exitstatus = self._ended()
                    self.flag_eof = True
                    raise EOF("End Of File (EOF): the VM ended and all its console output was read.")
                wake = deadline if not available else gather_until
                if wake is not None and now >= wake:
                    raise TIMEOUT("Timeout exceeded.")
                pause = EOF_POLL if wake is None else min(EOF_POLL, wake - now)
                if available:
                    self._cond.wait(pause)          # gathering: no need to be woken by each write
                else:
                    self._waiters += 1
                    try:
                        self._cond.wait(pause)
                    finally:
                        self._waiters -= 1
        self._last_read = time.monotonic()
        self._log(data, "read")
        return data

    def _bound_pexpect_buffers(self) -> None:
        """pexpect keeps everything since the last match (for `before`, and to search): past PEXPECT_LIMIT
        bytes, only the last PEXPECT_KEEP of it. Cut the same for both, so `before` still ends where a
        match in the window starts (pexpect computes it from the end)."""
        for name in ("_buffer", "_before"):
            buf = getattr(self, name)
            if buf.tell() > PEXPECT_LIMIT:
                tail = buf.getvalue()[-PEXPECT_KEEP:]
                fresh = self.buffer_type()
                fresh.write(tail)
                setattr(self, name, fresh)

    # --- input to the guest -------------------------------------------------------------------------
    def send(self, s) -> int:
        """Send bytes (a str is UTF-8 encoded) to the guest's serial input; returns the number of bytes.
        Blocks while the UART's input queue is full (the guest is not reading), as a write to a pty does;
        returns once the VM stopped (bytes the guest can no longer read are dropped)."""
        data = self._coerce_send_string(s)
        self._log(data, "send")
        self._send_bytes(data, None)
        return len(data)

    def sendline(self, s="") -> int:
        s = self._coerce_send_string(s)
        return self.send(s + self.linesep)

    def sendcontrol(self, char: str) -> int:
        """Send Ctrl-`char` (sendcontrol('c') sends 0x03), as pexpect's spawn."""
        char = char.lower()
        if "a" <= char <= "z":
            code = ord(char) - ord("a") + 1
        elif char in _CONTROL:
            code = _CONTROL[char]
        else:
            return 0
        return self.send(bytes([code]))

    def _send_bytes(self, data: bytes, timeout: float | None) -> None:
        """Feed `data` to the UART. timeout=None: block as long as the guest does not read (backpressure)
        until the VM stops. Else at most `timeout` seconds, then TIMEOUT (what was not sent by then is not)."""
        from pexpect import TIMEOUT
        from pexpect.exceptions import ExceptionPexpect

        if self._feed is None:
            raise ExceptionPexpect("this console has no serial input (the VM has no serial port)")
        if timeout is None or self._pending is None:
            self._feed(data)
            return
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            if self._ended is not None and self._ended() is not None:
                return  # the VM is gone: nobody will read it
            room = INPUT_AHEAD - self._pending()
            if room > 0:
                # at most what the UART's queue has room for (it holds INPUT_AHEAD bytes): no blocking
                self._feed(bytes(view[:room]))
                view = view[room:]
                continue
            if time.monotonic() >= deadline:
                raise TIMEOUT(f"the guest did not read its input: {len(view)} bytes not sent")
            time.sleep(INPUT_POLL)

    def isalive(self) -> bool:
        """True until the VM ended and all of its output was written."""
        return not self._closed and (self._ended is None or self._ended() is None)

    def interact(self, escape_character: str | None = chr(29), input_filter=None, output_filter=None) -> None:
        """Hand the console to the user, as pexpect's interact: keystrokes (stdin, raw mode on a terminal)
        go to the guest, its output to stdout, until the escape character (Ctrl-], not sent) or the VM's
        end. Console output already written to stdout (serial: stdio) is not written twice."""
        import tty

        from pexpect import EOF, TIMEOUT
        from pexpect.exceptions import ExceptionPexpect

        if self._input_thread is not None:
            raise ExceptionPexpect("interact(): this console already passes stdin to the guest "
                                   "(serial input: stdin)")
        stdin = sys.stdin.fileno()
        stdout = sys.stdout.fileno()
        show = self.output != "stdio"     # else the console writes the output to stdout itself
        escape = escape_character.encode() if escape_character else None
        if show and self.buffer:
            os.write(stdout, self.buffer)
        self.buffer = b""
        self._before = self.buffer_type()
        saved = None
        if os.isatty(stdin):
            saved = termios.tcgetattr(stdin)
            tty.setraw(stdin)
        reading = True
        try:
            while True:
                if reading:
                    ready, _, _ = select.select([stdin], [], [], 0.02)
                    if ready:
                        data = os.read(stdin, 1000)
                        if not data:
                            reading = False      # stdin ended: the guest's output still comes through
                        else:
                            if input_filter:
                                data = input_filter(data)
                            at = data.find(escape) if escape else -1
                            if at >= 0:
                                if at:
                                    self.send(data[:at])
                                return
                            self.send(data)
                try:
                    out = self.read_nonblocking(self.maxread, 0 if reading else 0.05)
                except TIMEOUT:
                    continue
                except EOF:
                    return
                if output_filter:
                    out = output_filter(out)
                if show:
                    os.write(stdout, out)
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSAFLUSH, saved)


def _open_sink(fd: int) -> tuple[int, str, bool]:
    """The descriptor console output is written to: fd itself for a regular file (never blocks); else a
    non-blocking description of its own for the same pipe or terminal (reopened through /proc, so that
    O_NONBLOCK does not change the caller's shared stdout); else fd, polled before each write."""
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd, "file", False
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return fd, "poll", False
    return own, "nonblock", True


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False
