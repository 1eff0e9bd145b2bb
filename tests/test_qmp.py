"""QMP: hvm's server against QEMU's own client library (qemu.qmp: QMPClient and its legacy sync wrapper),
qmp-shell, raw sockets and `hvm ctl`, with firmware/ticker.bin running (its console is a file: it stops
growing while the VM is stopped). Every hvm is bounded by its --timeout and by the test's own waits and kill."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FIRMWARE, ROOT, run_hvm, write_yaml
from hvm.qmp.address import QmpAddressError, parse_qmp_address
from hvm.qmp.stream import MessageTooLong, Splitter

qmp_lib = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402

TICKER = FIRMWARE / "ticker.bin"
ECHO = FIRMWARE / "echo.bin"
VM_TIMEOUT = 30          # hvm's own watchdog for each VM these tests start
WAIT = 10.0              # seconds for anything a test waits for


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1")


class Vm:
    """`python -m hvm run` in the background with a QMP socket; killed at the end of the test."""

    def __init__(self, tmp_path: Path, image: Path = TICKER, qmp_opts: str = ",server=on,wait=off",
                 stdin=subprocess.DEVNULL, extra: tuple[str, ...] = ()):
        self.sock = tmp_path / "vm.sock"
        self.console = tmp_path / "console.txt"
        cfg = write_yaml(tmp_path, f"boot: {{image: {image}}}\nmemory: 4M\ntimeout: {VM_TIMEOUT}\n"
                         f"devices: {{serial: {{output: 'file:{self.console}', input: stdin}}}}\n")
        self.err = open(tmp_path / "hvm-stderr.txt", "w+b")
        self.proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg), "--qmp",
                                      f"unix:{self.sock}{qmp_opts}", *extra],
                                     cwd=ROOT, stdin=stdin, stdout=subprocess.DEVNULL, stderr=self.err, env=_env())

    def wait_socket(self) -> "Vm":
        deadline = time.monotonic() + WAIT
        while not self.sock.exists():
            assert self.proc.poll() is None, f"hvm ended early: {self.stderr()}"
            assert time.monotonic() < deadline, "the QMP socket did not appear"
            time.sleep(0.02)
        return self

    def ticks(self) -> int:
        try:
            return self.console.read_bytes().count(b"tick\n")
        except FileNotFoundError:
            return 0

    def wait_ticks(self, n: int) -> int:
        """Wait until the console has at least n more ticks than now; the count then."""
        start = self.ticks()
        deadline = time.monotonic() + WAIT
        while self.ticks() < start + n:
            assert time.monotonic() < deadline, f"the guest stopped ticking ({self.ticks()} ticks)"
            assert self.proc.poll() is None, f"hvm ended: {self.stderr()}"
            time.sleep(0.02)
        return self.ticks()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode("utf-8", "replace")

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.err.close()


@pytest.fixture
def vm(tmp_path):
    v = Vm(tmp_path).wait_socket()
    yield v
    v.kill()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(path: Path) -> QMPClient:
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(str(path)), WAIT)
    return client


async def next_event(client: QMPClient, name: str, timeout: float = WAIT) -> dict:
    """The next event called `name` (others skipped)."""
    async def find():
        async for event in client.events:
            if event["event"] == name:
                return event
    return await asyncio.wait_for(find(), timeout)


async def status_once_started(client: QMPClient) -> str:
    """query-status's status once hvm started the VM: the socket is made before start() (as QEMU's is made
    before its machine runs), so a client that connects at once may see "prelaunch" first."""
    deadline = time.monotonic() + WAIT
    while (status := (await client.execute("query-status"))["status"]) == "prelaunch":
        assert time.monotonic() < deadline, "the VM never started"
        await asyncio.sleep(0.02)
    return status


async def hung_up(client: QMPClient) -> None:
    """Disconnect from a VM that ended: hvm, as QEMU, closes the connection after SHUTDOWN, and qemu.qmp
    reports that EOF from disconnect() when its reader saw it first."""
    with contextlib.suppress(EOFError):
        await client.disconnect()


class Raw:
    """A plain socket client, for what a library would not send."""

    def __init__(self, path: Path, negotiate: bool = True):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(WAIT)
        self.s.connect(str(path))
        self.buf = b""
        self.greeting = self.recv()
        if negotiate:
            assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            data = self.s.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self) -> dict:
        """The next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def cmd(self, obj) -> dict:
        self.send(json.dumps(obj).encode())
        return self.reply()

    def close(self) -> None:
        self.s.close()


# --- the protocol, with QEMU's client ---------------------------------------------------------------------
def test_greeting_version_commands_and_status(vm):
    vm.wait_ticks(1)   # the socket exists before the guest starts: query a guest that ran (a loaded host lags)

    async def go():
        c = await connect(vm.sock)
        greeting = c.greeting
        version = await c.execute("query-version")
        commands = await c.execute("query-commands")
        status = await c.execute("query-status")
        cpus = await c.execute("query-cpus-fast")
        stats = await c.execute("x-hvm-stats")
        await c.disconnect()
        return greeting, version, commands, status, cpus, stats

    greeting, version, commands, status, cpus, stats = run(go())
    assert greeting.QMP.capabilities == []
    assert greeting.QMP.version == version
    assert version["qemu"] == {"major": 8, "minor": 2, "micro": 0}
    assert version["package"].startswith("hvm ")
    names = {c["name"] for c in commands}
    assert names == {"qmp_capabilities", "query-status", "stop", "cont", "system_reset", "system_powerdown",
                     "system_wakeup",
                     "quit", "query-cpus-fast", "query-version", "query-commands", "migrate", "query-migrate",
                     "x-hvm-stats", "x-hvm-trace"}
    assert status == {"running": True, "status": "running"}
    assert len(cpus) == 1
    assert cpus[0]["cpu-index"] == 0 and cpus[0]["target"] == "x86_64"
    assert cpus[0]["qom-path"] == "/machine/unattached/device[0]"
    # thread-id is the vCPU thread's host TID: a task of the hvm process
    assert os.path.exists(f"/proc/{vm.proc.pid}/task/{cpus[0]['thread-id']}")
    # the ticker writes to COM1's data port (0x3f8) for each character
    assert stats["total"] > 0 and stats["by_reason"]["IO"] > 0
    assert stats["by_port"]["0x3f8"] >= 5
    assert stats["by_device"]["com1"] > 0


def test_stop_cont_events_and_console(vm):
    vm.wait_ticks(2)

    async def go():
        c = await connect(vm.sock)
        assert await c.execute("stop") == {}
        stop = await next_event(c, "STOP")
        status = await c.execute("query-status")
        before = vm.ticks()
        await asyncio.sleep(0.6)
        still = vm.ticks()
        assert await c.execute("stop") == {}          # stopping a stopped VM: no error, as QEMU
        assert await c.execute("cont") == {}
        resume = await next_event(c, "RESUME")
        after = await c.execute("query-status")
        await c.disconnect()
        return stop, status, before, still, resume, after

    stop, status, before, still, resume, after = run(go())
    assert stop["data"] == {} and set(stop["timestamp"]) == {"seconds", "microseconds"}
    assert abs(stop["timestamp"]["seconds"] - time.time()) < 60
    assert status == {"running": False, "status": "paused"}
    assert still == before, "the console grew while the VM was stopped"
    assert resume["data"] == {}
    assert after == {"running": True, "status": "running"}
    vm.wait_ticks(2)   # it ticks again after cont


def test_quit_sends_shutdown_and_ends_hvm_with_status_0(vm):
    async def go():
        c = await connect(vm.sock)
        assert await c.execute("quit") == {}
        event = await next_event(c, "SHUTDOWN")
        await hung_up(c)
        return event

    event = run(go())
    assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert vm.wait() == 0
    assert not vm.sock.exists(), "the socket file was left behind"


def test_shutdown_event_when_the_guest_ends(tmp_path):
    """echo.bin halts after reading 'q': SHUTDOWN {"guest": true, "reason": "guest-shutdown"}, status 0."""
    v = Vm(tmp_path, ECHO, stdin=subprocess.PIPE).wait_socket()
    try:
        async def go():
            c = await connect(v.sock)
            assert await status_once_started(c) == "running"
            v.proc.stdin.write(b"abq")
            v.proc.stdin.flush()
            event = await next_event(c, "SHUTDOWN")
            await hung_up(c)
            return event

        event = run(go())
        assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert v.wait() == 0
        assert v.console.read_bytes().startswith(b"AB")
        assert not v.sock.exists()
    finally:
        v.kill()


def test_legacy_sync_client(vm):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    mon = QEMUMonitorProtocol(str(vm.sock))
    try:
        greeting = mon.connect(negotiate=True)
        assert greeting["QMP"]["version"]["package"].startswith("hvm ")
        assert mon.cmd("query-status") == {"running": True, "status": "running"}
        assert mon.cmd_raw("stop", None) == {"return": {}}
        event = mon.pull_event(wait=WAIT)
        assert event["event"] == "STOP"
        reply = mon.cmd_raw("nonesuch", None)
        assert reply["error"] == {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"}
        with pytest.raises(ExecuteError):
            mon.cmd("migrate", uri="tcp:x")
        assert mon.cmd("cont") == {}
    finally:
        mon.close()


def test_qmp_shell(vm):
    shell = Path(sys.executable).parent / "qmp-shell"
    if not shell.exists():
        pytest.skip("qmp-shell is not installed next to this Python (qemu.qmp installs it)")
    proc = subprocess.run([str(shell), str(vm.sock)], input=b"query-status\nstop\nquery-status\ncont\n",
                          capture_output=True, timeout=30)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr
    assert "Connected to QEMU 8.2.0" in out
    assert '"status": "running"' in out and '"status": "paused"' in out


# --- migrate, trace, reset, powerdown -------------------------------------------------------------------
def test_migrate_uri_errors_and_query_migrate_before_any(vm):
    async def go():
        c = await connect(vm.sock)
        out = [await c.execute("query-migrate")]
        for args in ({"uri": "tcp:localhost:4444"}, {"uri": "exec:cat"}, {"uri": "file:"}):
            with pytest.raises(ExecuteError) as e:
                await c.execute("migrate", args)
            out.append((e.value.error_class, str(e.value)))
        await c.disconnect()
        return out

    before, *errors = run(go())
    assert before == {}
    assert errors[0] == ("GenericError", "hvm migrates only to a file: 'file:PATH' (not 'tcp')")
    assert errors[1] == ("GenericError", "hvm migrates only to a file: 'file:PATH' (not 'exec')")
    assert errors[2][0] == "GenericError"


def test_migrate_to_file(vm, tmp_path):
    snap = tmp_path / "vm.snap"

    async def go():
        c = await connect(vm.sock)
        assert await c.execute("migrate", {"uri": f"file:{snap}"}) == {}
        statuses = []
        while not statuses or statuses[-1] not in ("completed", "failed"):
            statuses.append((await next_event(c, "MIGRATION"))["data"]["status"])
        info = await c.execute("query-migrate")
        status = await c.execute("query-status")
        await c.disconnect()
        return statuses, info, status

    statuses, info, status = run(go())
    assert statuses == ["setup", "active", "completed"], info
    assert info["status"] == "completed" and info["total-time"] >= 0
    assert status == {"running": False, "status": "postmigrate"}
    assert snap.stat().st_size > 0
    assert run_hvm("ctl", str(vm.sock), "quit").status == 0
    assert vm.wait() == 0

    # a new hvm runs on from the file, with a QMP socket of its own (--incoming takes --qmp anew)
    sock2, console2 = tmp_path / "in.sock", tmp_path / "console2.txt"
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", "--incoming", f"file:{snap}", "--qmp",
                             f"unix:{sock2}", "--serial", f"file:{console2}", "--timeout", str(VM_TIMEOUT)],
                            cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while not sock2.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        while not console2.exists() or console2.read_bytes().count(b"tick") < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "the restored guest does not tick"
            time.sleep(0.02)
        r = Raw(sock2)
        assert r.cmd({"execute": "query-status"})["return"] == {"running": True, "status": "running"}
        assert r.cmd({"execute": "quit"}) == {"return": {}}
        r.close()
        assert proc.wait(WAIT) == 0
        assert not sock2.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_x_hvm_trace_starts_and_stops_while_running(vm, tmp_path):
    trace = tmp_path / "exits.jsonl"
    vm.wait_ticks(1)

    async def go():
        c = await connect(vm.sock)
        errors = []
        with pytest.raises(ExecuteError) as e:
            await c.execute("x-hvm-trace", {"enable": False})
        errors.append(str(e.value))
        with pytest.raises(ExecuteError) as e:
            await c.execute("x-hvm-trace", {"enable": True, "file": str(trace), "filter": "reason=bogus"})
        errors.append(str(e.value))
        assert await c.execute("x-hvm-trace", {"enable": True, "file": str(trace), "filter": "port=0x3f8"}) == {}
        with pytest.raises(ExecuteError) as e:
            await c.execute("x-hvm-trace", {"enable": True, "file": str(trace)})
        errors.append(str(e.value))
        status = await c.execute("query-status")
        await asyncio.sleep(0.5)
        assert await c.execute("x-hvm-trace", {"enable": False}) == {}
        await c.disconnect()
        return errors, status

    errors, status = run(go())
    assert errors[0] == "exit tracing is not on"
    assert "bogus" in errors[1]
    assert errors[2].startswith("exit tracing is already on")
    assert status["status"] == "running"
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records, "no exit was traced"
    assert all(r["port"] == 0x3F8 for r in records)     # the filter held
    size = trace.stat().st_size
    vm.wait_ticks(2)                                    # runs on untraced: the file does not grow
    assert trace.stat().st_size == size


def test_system_powerdown_and_system_reset(tmp_path):
    """machine: pc: the power button is pressed (POWERDOWN; the ticker ignores it and runs on), and
    system_reset starts the machine again from its boot state (RESET), still running."""
    v = Vm(tmp_path, extra=("--machine", "pc")).wait_socket()
    try:
        v.wait_ticks(1)

        async def go():
            c = await connect(v.sock)
            assert await c.execute("system_powerdown") == {}
            powerdown = await next_event(c, "POWERDOWN")
            assert await c.execute("system_reset") == {}
            reset = await next_event(c, "RESET")
            status = await c.execute("query-status")
            await c.disconnect()
            return powerdown, reset, status

        powerdown, reset, status = run(go())
        assert powerdown["data"] == {}
        assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert status == {"running": True, "status": "running"}
        v.wait_ticks(2)
    finally:
        v.kill()


def test_system_powerdown_needs_a_pc(vm):
    async def go():
        c = await connect(vm.sock)
        with pytest.raises(ExecuteError) as e:
            await c.execute("system_powerdown")
        await c.disconnect()
        return e.value

    e = run(go())
    assert e.error_class == "GenericError"
    assert str(e) == "system_powerdown needs the ACPI power button of machine: pc"


# --- malformed input and abusive clients, while the guest keeps ticking ---------------------------------
def test_malformed_input_gets_qemu_errors_and_the_vm_runs_on(vm):
    vm.wait_ticks(1)
    r = Raw(vm.sock, negotiate=False)
    try:
        assert set(r.greeting["QMP"]) == {"version", "capabilities"}
        assert r.cmd({"execute": "query-status", "id": 1}) == {
            "error": {"class": "CommandNotFound",
                      "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
        assert r.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})["error"]["desc"] == \
            "Capability 'oob' not available"
        assert r.cmd({"execute": "qmp_capabilities", "id": "neg"}) == {"return": {}, "id": "neg"}
        assert r.cmd({"execute": "qmp_capabilities"})["error"] == {
            "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}
        cases = [
            (b"hello\n", "JSON parse error"),
            (b"[1, 2]", "QMP input must be a JSON object"),
            (b'"text"\n', "QMP input must be a JSON object"),
            (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
            (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
            (b'{"execute": "stop", "arguments": []}', "QMP input member 'arguments' must be an object"),
            (b'{"execute": "stop", "bogus": 1}', "QMP input member 'bogus' is unexpected"),
            (b'{"exec-oob": "query-status"}', "QMP input member 'exec-oob' is unexpected"),
            (b'{"execute": "migrate"}', "Parameter 'uri' is missing"),
            (b'{"execute": "migrate", "arguments": {"uri": 5}}',
             "Invalid parameter type for 'uri', expected: string"),
            (b'{"execute": "stop", "arguments": {"now": true}}', "Parameter 'now' is unexpected"),
            (b'{"execute": "x-hvm-trace", "arguments": {"enable": "yes"}}',
             "Invalid parameter type for 'enable', expected: boolean"),
            (b'{"execute": "query-status" "x"}', "JSON parse error"),
            (b'{"a": NaN}', "JSON parse error"),
            (b"[" * 100 + b"]" * 100, "JSON parse error, nesting too deep"),
        ]
        for data, desc in cases:
            r.send(data)
            reply = r.reply()
            assert reply["error"]["class"] == "GenericError", (data, reply)
            assert reply["error"]["desc"].startswith(desc), (data, reply)
        r.send(b'{"execute": "nonesuch", "id": [1, {"x": "}"}]}')
        assert r.reply() == {"error": {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"},
                             "id": [1, {"x": "}"}]}
        # Back to back, split anywhere, braces and escaped quotes inside strings: still two messages.
        two = b'{"execute": "query-status", "id": "a\\"}{"}{"execute":"query-status","id":"b"}'
        for i in range(0, len(two), 7):
            r.send(two[i:i + 7])
            time.sleep(0.005)
        assert r.reply()["id"] == 'a"}{'
        assert r.reply() == {"return": {"running": True, "status": "running"}, "id": "b"}
    finally:
        r.close()
    vm.wait_ticks(2)


def test_huge_message_is_refused_and_closed(vm):
    r = Raw(vm.sock)
    try:
        r.send(b'{"execute": "' + b"x" * (70 * 1024))
        reply = r.reply()
        assert reply["error"]["desc"] == "JSON parse error, a message longer than 65536 bytes"
        with pytest.raises((EOFError, ConnectionResetError)):
            r.recv()
    finally:
        r.close()
    r2 = Raw(vm.sock)
    assert r2.cmd({"execute": "query-status"})["return"]["status"] == "running"
    r2.close()
    vm.wait_ticks(2)


def test_disconnect_mid_command_and_many_clients(vm):
    from hvm.qmp.server import MAX_CLIENTS

    for _ in range(5):   # a command sent, the connection closed before its reply
        r = Raw(vm.sock)
        r.send(b'{"execute": "stop"}{"execute": "query-cpus-fast"}{"execute": "cont"}')
        r.close()
    # Commands run in order on one thread: once this cont is answered, theirs are done, and their
    # connections are closed as soon as hvm has seen them go.
    probe = Raw(vm.sock)
    assert probe.cmd({"execute": "cont"}) == {"return": {}}
    probe.close()
    time.sleep(0.3)
    held = [Raw(vm.sock) for _ in range(MAX_CLIENTS)]
    try:
        # one more: told why in one error, then closed
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(WAIT)
        extra.connect(str(vm.sock))
        data = b""
        while True:
            chunk = extra.recv(4096)
            if not chunk:
                break
            data += chunk
        extra.close()
        assert json.loads(data)["error"]["desc"] == f"too many QMP clients (at most {MAX_CLIENTS})"
        assert held[-1].cmd({"execute": "query-status"})["return"]["status"] == "running"
        vm.wait_ticks(2)
    finally:
        for r in held:
            r.close()
    # the slots are free again, as soon as hvm has seen those clients go
    deadline = time.monotonic() + WAIT
    while True:
        try:
            r = Raw(vm.sock)
            break
        except (OSError, EOFError, KeyError):
            assert time.monotonic() < deadline, "a client slot was never freed"
            time.sleep(0.05)
    assert r.cmd({"execute": "query-status"})["return"]["running"] is True
    r.close()


def test_a_client_that_does_not_read_is_dropped(tmp_path):
    """It sends thousands of commands and reads no reply: past the output limit (here 32 KiB, by default
    1 MiB) hvm disconnects it, and the VM and other clients carry on."""
    with _inproc(tmp_path, max_output=32 * 1024) as (m, server):
        r = Raw(server.path)
        request = b'{"execute": "query-commands"}' * 6000
        errors = []

        def flood():
            try:
                r.s.sendall(request)
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive()
        deadline = time.monotonic() + WAIT      # not reading meanwhile: hvm's queue for it grows, then it goes
        while server._clients:
            assert time.monotonic() < deadline, "the client that does not read was never dropped"
            time.sleep(0.05)
        # hvm closed the connection: reading drains what the kernel holds, then EOF (or a reset)
        total = 0
        try:
            while chunk := r.s.recv(1 << 20):
                total += len(chunk)
        except ConnectionResetError:
            pass
        r.close()
        assert total < 6000 * 600, "all replies arrived: the client was never dropped"
        other = Raw(server.path)
        assert other.cmd({"execute": "query-status"})["return"]["status"] == "running"
        other.close()
        assert m.run_state == "running"


def test_a_flood_of_clients_does_not_slow_the_guest(vm):
    """Four clients sending garbage lines, oversized messages and hundreds of x-hvm-stats at once: the
    ticker's rate stays within half of what it was just before (measured: 0.99-1.12 of it; without the
    I/O thread's backoff, 0.40-0.54, the GIL going to the flood)."""
    def rate(seconds: float) -> float:
        a = vm.ticks()
        time.sleep(seconds)
        return (vm.ticks() - a) / seconds

    stop = threading.Event()

    def garbage():
        while not stop.is_set():
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect(str(vm.sock))
                for _ in range(50):
                    s.sendall(b"hello garbage\n" * 100 + b'{"execute": "qmp_capabilities"}[1, 2]')
                    s.recv(1 << 20)
                s.sendall(b"{" + b"x" * 70000)
                s.close()
            except OSError:
                pass

    def commands():
        while not stop.is_set():
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(vm.sock))
                s.sendall(b'{"execute": "qmp_capabilities"}' + b'{"execute": "x-hvm-stats"}' * 300)
                s.close()
            except OSError:
                pass

    vm.wait_ticks(2)
    idle = rate(2.0)
    threads = [threading.Thread(target=f, daemon=True) for f in (garbage, garbage, commands, commands)]
    for t in threads:
        t.start()
    try:
        busy = rate(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert idle > 0
    assert busy >= 0.5 * idle, f"{busy:.1f} ticks/s under the flood, {idle:.1f} before"
    r = Raw(vm.sock)
    assert r.cmd({"execute": "query-status"})["return"] == {"running": True, "status": "running"}
    r.close()


# --- hvm ctl --------------------------------------------------------------------------------------------
def test_hvm_ctl(vm, tmp_path):
    r = run_hvm("ctl", str(vm.sock), "query-status")
    assert (r.status, json.loads(r.out), r.stderr) == (0, {"running": True, "status": "running"}, "")
    r = run_hvm("ctl", str(vm.sock), "stop")
    assert (r.status, r.out.strip()) == (0, "{}")
    assert json.loads(run_hvm("ctl", str(vm.sock), "query-status").out)["status"] == "paused"
    assert run_hvm("ctl", str(vm.sock), "cont").status == 0
    r = run_hvm("ctl", str(vm.sock), "nonesuch")
    assert (r.status, r.out, r.stderr) == (1, "", "hvm: nonesuch: The command nonesuch has not been found\n")
    r = run_hvm("ctl", str(vm.sock), "migrate", '{"uri": "tcp:x"}')
    assert r.status == 1 and r.stderr == "hvm: migrate: hvm migrates only to a file: 'file:PATH' (not 'tcp')\n"
    r = run_hvm("ctl", str(vm.sock), "migrate", json.dumps({"uri": f"file:{tmp_path}/no/dir/vm.snap"}))
    assert (r.status, r.out) == (1, "")      # ctl waits for the save's end, and names why it failed
    assert r.stderr == (f"hvm: migrate: {tmp_path}/no/dir/vm.snap: cannot create a file in {tmp_path}/no/dir: "
                        "No such file or directory\n")
    r = run_hvm("ctl", str(vm.sock), "migrate", json.dumps({"uri": f"file:{tmp_path}/vm.snap"}))
    assert (r.status, r.out.strip()) == (0, "{}")
    assert (tmp_path / "vm.snap").read_bytes()[:8] == b"HVMSNAP\0"     # complete when ctl returned
    assert json.loads(run_hvm("ctl", str(vm.sock), "query-status").out)["status"] == "postmigrate"
    assert run_hvm("ctl", str(vm.sock), "cont").status == 0
    r = run_hvm("ctl", str(vm.sock), "migrate", "{uri")
    assert r.status == 2 and r.stderr.startswith("hvm: ctl: JSON-ARGS: not JSON") and r.stderr.count("\n") == 1
    r = run_hvm("ctl", str(vm.sock), "migrate", "uri=file:x")     # qmp-shell's syntax, not ctl's
    assert r.status == 2
    assert r.stderr.endswith("; give a JSON object, e.g. '{\"uri\": \"file:vm.snap\"}'\n")
    r = run_hvm("ctl", str(vm.sock), "migrate", "[1]")
    assert r.status == 2 and "JSON-ARGS: must be a JSON object" in r.stderr
    r = run_hvm("ctl", str(tmp_path / "nope.sock"), "query-status")
    assert r.status == 2
    assert r.stderr == f"hvm: ctl: {tmp_path / 'nope.sock'}: no such socket (is the VM running with --qmp?)\n"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    r = run_hvm("ctl", str(plain), "query-status")
    assert (r.status, r.stderr) == (2, f"hvm: ctl: {plain}: not a socket (give the PATH of a running VM's "
                                       "--qmp unix:PATH)\n")
    r = run_hvm("ctl", str(tmp_path), "query-status")
    assert r.status == 2 and ": not a socket (" in r.stderr
    stale = tmp_path / "stale.sock"          # what a killed VM leaves: a socket nobody listens on
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    r = run_hvm("ctl", str(stale), "query-status")
    assert (r.status, r.stderr) == (2, f"hvm: ctl: {stale}: connection refused: no VM listens on this socket "
                                       "(a stale one, left by a VM that was killed?)\n")
    stats = json.loads(run_hvm("ctl", str(vm.sock), "x-hvm-stats").out)
    assert stats["total"] > 0
    r = run_hvm("ctl", str(vm.sock), "quit")
    assert (r.status, r.out.strip()) == (0, "{}")
    assert vm.wait() == 0


# --- the socket -----------------------------------------------------------------------------------------
def test_socket_mode_and_removal(vm):
    st = os.lstat(vm.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    run_hvm("ctl", str(vm.sock), "quit")
    assert vm.wait() == 0
    assert not vm.sock.exists()


def test_refuses_a_regular_file_and_a_live_socket(tmp_path):
    path = tmp_path / "vm.sock"
    path.write_text("precious")
    args = ("run", "--kernel", str(FIRMWARE / "mbtest.elf"), "--timeout", "10", "--serial", "none")
    r = run_hvm(*args, "--qmp", f"unix:{path},server=on,wait=off")
    assert r.status == 2
    assert r.stderr == f"hvm: --qmp: {path}: exists and is not a socket: hvm does not replace it\n"
    assert path.read_text() == "precious"
    r = run_hvm(*args, "--qmp", f"unix:{tmp_path}/no/such/dir/vm.sock")
    assert r.status == 2
    assert r.stderr == f"hvm: --qmp: {tmp_path}/no/such/dir/vm.sock: No such file or directory\n"
    path.unlink()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        r = run_hvm(*args, "--qmp", f"unix:{path}")
        assert r.status == 2
        assert r.stderr == f"hvm: --qmp: {path}: a live socket (another VM's?): hvm does not replace it\n"
        assert path.exists()
    finally:
        live.close()


def test_replaces_a_stale_socket_and_yaml_qmp_key(tmp_path):
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()     # the file stays, nobody listens: what a killed VM leaves
    cfg = write_yaml(tmp_path, f"boot: {{image: {TICKER}}}\nmemory: 4M\ntimeout: {VM_TIMEOUT}\nqmp: vm.sock\n"
                     "devices: {serial: none}\n")
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg)], cwd=ROOT, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while True:   # the path is relative to the YAML file's directory
            try:
                r = Raw(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert r.cmd({"execute": "quit"}) == {"return": {}}
        r.close()
        assert proc.wait(WAIT) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("value,message", [
    ("123", "qmp: expected a socket path or unix:PATH[,server=on][,wait=off], got a number (123)"),
    ("'tcp:localhost:4444'", "qmp: tcp: is not supported: hvm's QMP listens on a UNIX socket (unix:PATH)"),
    ("'unix:x.sock,server=off'", "qmp: server=off is not supported"),
    ("'unix:x.sock,wait=maybe'", "qmp: wait='maybe': expected on or off"),
    ("'unix:x.sock,reconnect=1'", "qmp: 'reconnect=1' is not an option of a QMP socket"),
])
def test_bad_qmp_values(tmp_path, value, message):
    cfg = write_yaml(tmp_path, f"boot: {{image: {TICKER}}}\nmemory: 4M\ntimeout: 5\nqmp: {value}\n")
    r = run_hvm("run", str(cfg))
    assert r.status == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"hvm: {cfg}: {message}"), r.stderr
    r = run_hvm("run", str(cfg).replace("vm.yaml", "none.yaml"), "--qmp", "tcp:1")
    assert r.status == 2


def test_flag_error_names_the_flag(tmp_path):
    cfg = write_yaml(tmp_path, f"boot: {{image: {TICKER}}}\nmemory: 4M\ntimeout: 5\n")
    r = run_hvm("run", str(cfg), "--qmp", "unix:" + "x" * 200)
    assert r.status == 2 and r.stderr.startswith("hvm: --qmp: ") and "at most 107 bytes" in r.stderr


def test_wait_on_holds_the_guest_until_a_client_connects(tmp_path):
    v = Vm(tmp_path, qmp_opts=",server=on,wait=on").wait_socket()
    try:
        time.sleep(0.8)
        assert v.ticks() == 0, "the guest ran before a client connected"
        assert "waiting for a QMP client on" in v.stderr()
        r = Raw(v.sock)
        v.wait_ticks(2)
        assert r.cmd({"execute": "quit"}) == {"return": {}}
        r.close()
        assert v.wait() == 0
    finally:
        v.kill()


def test_sigterm_while_waiting_for_a_client_removes_the_socket(tmp_path):
    v = Vm(tmp_path, qmp_opts=",server=on,wait=on").wait_socket()
    try:
        v.proc.terminate()
        assert v.wait() == 128 + 15, v.stderr()
        assert not v.sock.exists()
    finally:
        v.kill()


# --- the QEMU shim ---------------------------------------------------------------------------------------
def test_shim_passes_qmp_through(tmp_path):
    from hvm.qemu_shim import ShimError, translate

    for value in ("unix:/tmp/x.sock,server,nowait", "unix:/tmp/x.sock,server=on,wait=off"):
        args = translate(["-kernel", "k", "-qmp", value])
        assert args[args.index("--qmp") + 1] == value
        assert parse_qmp_address(value) == parse_qmp_address("unix:/tmp/x.sock")
    with pytest.raises(ShimError, match="UNIX socket"):
        translate(["-qmp", "stdio"])
    # end to end: hvm-qemu with -qmp, a multiboot kernel held by wait=on until a client asks
    sock = tmp_path / "shim.sock"
    proc = subprocess.Popen([sys.executable, "-m", "hvm.qemu_shim", "-kernel", str(FIRMWARE / "mbtest.elf"),
                             "-qmp", f"unix:{sock},server=on,wait=on"], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        # mbtest ends within milliseconds of the first client's connect: hvm may close the connection
        # before it reads what the client sent (a reset), which is the VM having ended, as the status says.
        # The guest starts once this client connected: a loaded host may answer before it did (prelaunch).
        try:
            r = Raw(sock)
            status = r.cmd({"execute": "query-status"})["return"]["status"]
            assert status in ("prelaunch", "running", "shutdown")
            r.close()
        except (ConnectionResetError, BrokenPipeError, EOFError):
            pass
        assert proc.wait(WAIT) == 1    # mbtest's own status: it writes 0 to isa-debug-exit, (0 << 1) | 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- units ----------------------------------------------------------------------------------------------
def test_splitter_back_to_back_split_and_limits():
    s = Splitter(100)
    assert s.feed(b'  {"a": "}\\"{"}{"b"') == [b'{"a": "}\\"{"}']
    assert s.feed(b": [1, {}]}\n[]") == [b'{"b": [1, {}]}', b"[]"]
    assert s.feed(b"garbage") == []
    assert s.feed(b" more\n{}") == [b"garbage more", b"{}"]
    assert s.feed(b'"\\') == []                  # a bare string, an escape cut in two
    assert s.feed(b'""\n') == [b'"\\""']
    with pytest.raises(MessageTooLong):
        s.feed(b"{" + b" " * 200)
    deep = Splitter(1000)
    assert deep.feed(b"[" * 70 + b"]" * 70) == [None]


def test_parse_qmp_address(tmp_path):
    a = parse_qmp_address("unix:vm.sock", tmp_path)
    assert a.path == tmp_path / "vm.sock" and not a.wait
    assert parse_qmp_address("unix:/a,,b.sock,server,wait").path == Path("/a,b.sock")
    assert parse_qmp_address("unix:/a.sock,server,wait").wait
    assert not parse_qmp_address("unix:/a.sock,server,nowait").wait
    assert parse_qmp_address("/x/y.sock").path == Path("/x/y.sock")
    for bad in ("", "unix:", "unix:/a,server=off", "telnet:1", "unix:/a,bogus"):
        with pytest.raises(QmpAddressError):
            parse_qmp_address(bad)


# --- in process: the QMP side of migrate, reset and powerdown, with the Machine's methods stubbed -----------
@contextlib.contextmanager
def _inproc(tmp_path: Path, fast_loop: bool = True, trace=None, **limits):
    """A ticker Machine in this process with a QmpServer (given `limits`); yields (machine, server)."""
    from hvm.config import FlatBoot, VmSpec
    from hvm.console import Console
    from hvm.machine import Machine
    from hvm.qmp.address import QmpAddress
    from hvm.qmp.server import QmpServer

    spec = VmSpec(name="ticker", boot=FlatBoot(TICKER, 0x7C00, 0x7C00, "real"), memory=4 << 20, timeout=VM_TIMEOUT)
    m = Machine(spec, console=Console("none", "none", open_now=False), fast_loop=fast_loop, trace=trace)
    server = QmpServer(m, QmpAddress(tmp_path / "in.sock"), **limits)
    try:
        server.start()
        m.start()
        yield m, server
    finally:
        server.close()
        m.close()
    assert not (tmp_path / "in.sock").exists()
    assert m.result is not None and m.result.status == 0


@pytest.fixture
def inproc(tmp_path):
    with _inproc(tmp_path) as pair:
        yield pair


def test_migrate_events_and_query_migrate_with_a_stub_snapshot(inproc, tmp_path):
    m, server = inproc
    saved = []
    gate = threading.Event()

    def snapshot(path, *, resume=False):   # the contract's Machine.snapshot: pauses, saves, postmigrate
        gate.wait(WAIT)
        m.pause()
        m._set_run_state("postmigrate")
        if "bad" in str(path):
            m.resume()
            raise RuntimeError(f"{path}: No space left on device")
        saved.append(path)

    m.snapshot = snapshot

    async def go():
        c = await connect(server.path)
        assert await c.execute("migrate", {"uri": f"file:{tmp_path / 'a.snap'}"}) == {}
        during = await c.execute("query-migrate")
        with pytest.raises(ExecuteError) as e:
            await c.execute("migrate", {"uri": f"file:{tmp_path / 'b.snap'}"})
        busy = str(e.value)
        gate.set()
        statuses = []
        while not statuses or statuses[-1] not in ("completed", "failed"):
            statuses.append((await next_event(c, "MIGRATION"))["data"]["status"])
        done = await c.execute("query-migrate")
        status = await c.execute("query-status")
        assert await c.execute("cont") == {}             # postmigrate runs on, as QEMU's does
        assert await c.execute("migrate", {"uri": f"file:{tmp_path / 'bad.snap'}"}) == {}
        failed_statuses = []
        while not failed_statuses or failed_statuses[-1] not in ("completed", "failed"):
            failed_statuses.append((await next_event(c, "MIGRATION"))["data"]["status"])
        failed = await c.execute("query-migrate")
        after = await c.execute("query-status")
        await c.disconnect()
        return during, busy, statuses, done, status, failed_statuses, failed, after

    during, busy, statuses, done, status, failed_statuses, failed, after = run(go())
    assert during["status"] in ("setup", "active")
    assert busy == "There's a migration process in progress"
    assert statuses == ["setup", "active", "completed"]    # setup came before the reply: skipped by nothing
    assert done["status"] == "completed" and isinstance(done["total-time"], int)
    assert saved == [tmp_path / "a.snap"]
    assert status == {"running": False, "status": "postmigrate"}
    assert failed_statuses == ["setup", "active", "failed"]
    assert failed["status"] == "failed"
    assert failed["error-desc"] == f"{tmp_path / 'bad.snap'}: No space left on device"
    assert after["status"] == "running"


@pytest.mark.parametrize("fast_loop", [True, False], ids=["c-loop", "python-loop"])
def test_x_hvm_trace_switches_the_run_loops(tmp_path, fast_loop):
    """On, off, on again while paused (the VM stays paused; records follow cont), off: each vCPU's loop
    follows; a VM started with a trace (--trace) can have it stopped."""
    from hvm.trace.tracer import TraceConfig

    first, second, started = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "start.jsonl"
    with _inproc(tmp_path, fast_loop=fast_loop, trace=TraceConfig(path=started)) as (m, server):
        async def go():
            c = await connect(server.path)
            await asyncio.sleep(0.2)
            assert await c.execute("x-hvm-trace", {"enable": False}) == {}     # the trace it started with
            assert m.tracer is None and all(t.trace_sink is None for t in m.threads)
            assert await c.execute("x-hvm-trace", {"enable": True, "file": str(first)}) == {}
            await asyncio.sleep(0.3)
            assert await c.execute("x-hvm-trace", {"enable": False}) == {}
            size = first.stat().st_size
            await asyncio.sleep(0.2)
            assert first.stat().st_size == size
            assert await c.execute("stop") == {}
            assert await c.execute("x-hvm-trace", {"enable": True, "file": str(second), "rip": True}) == {}
            assert (await c.execute("query-status"))["status"] == "paused"
            await asyncio.sleep(0.2)
            assert second.stat().st_size == 0
            assert await c.execute("cont") == {}
            await asyncio.sleep(0.3)
            assert await c.execute("x-hvm-trace", {"enable": False}) == {}
            assert (await c.execute("query-status"))["status"] == "running"
            await c.disconnect()

        run(go())
        if fast_loop:
            assert all(t.fast is not None and not t.fast.tracing for t in m.threads)
    for path in (started, first, second):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert records and all(r["reason"] == "IO" for r in records), path
        assert all(r["port"] in range(0x3F8, 0x400) for r in records)
    assert all("rip" in r for r in map(json.loads, second.read_text().splitlines()))


def test_hvm_ctl_gives_up_on_a_server_that_only_sends_events(tmp_path):
    """A hostile or broken server that answers nothing but events forever: hvm ctl's timeout is one deadline
    for the exchange, not a per-message wait that each event renews."""
    from hvm.qmp.client import CtlError, ctl

    path = tmp_path / "evil.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    stop = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            while not stop.is_set():
                try:
                    conn.sendall(b'{"event": "NOISE", "data": {}, "timestamp": {"seconds": 0, "microseconds": 0}}\n')
                except OSError:
                    return
                time.sleep(0.01)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(CtlError, match="no reply within 1 s"):
            ctl(str(path), "query-status", None, timeout=1.0)
        assert time.monotonic() - t0 < 3
    finally:
        stop.set()
        srv.close()
        t.join(5)


def test_dash_S_starts_frozen_until_cont(tmp_path):
    """QEMU's -S: the vCPUs run no instruction until QMP `cont`; query-status says prelaunch meanwhile,
    stop is a no-op, cont emits RESUME and the guest runs."""
    v = Vm(tmp_path, extra=("-S",)).wait_socket()
    try:
        async def go():
            c = await connect(v.sock)
            assert await c.execute("query-status") == {"running": False, "status": "prelaunch"}
            await asyncio.sleep(0.5)
            assert v.ticks() == 0                       # not one instruction ran
            assert await c.execute("stop") == {}
            await c.execute("cont")
            await next_event(c, "RESUME")
            assert await c.execute("query-status") == {"running": True, "status": "running"}
            await c.disconnect()
        run(go())
        v.wait_ticks(2)
    finally:
        v.kill()


def test_dash_S_needs_something_that_can_start_the_vm(tmp_path):
    cfg = write_yaml(tmp_path, f"boot: {{image: {TICKER}}}\ntimeout: 5\n")
    r = run_hvm("run", str(cfg), "-S")
    assert r.status == 2
    assert r.stderr == ("hvm: -S: nothing could start the VM: give --qmp (then QMP `cont`) or a script with a "
                        "resume step\n")


def test_shim_passes_dash_S_through():
    from hvm.qemu_shim import translate

    argv = translate(["-kernel", "k.elf", "-qmp", "unix:/tmp/x.sock,server,nowait", "-S"])
    assert argv[-3:] == ["--qmp", "unix:/tmp/x.sock,server,nowait", "-S"]
