"""Machine.console as a pexpect object: pexpect's own expect machinery over the console history, send()
into the UART. Guests: firmware/echo.S (echoes its input upper-cased; 'q' prints "bye" and halts), ticker,
hello, pvcon (floods the console). Every run is bounded by the VmSpec's watchdog and by wait()/expect timeouts."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time

import pexpect
import pytest
from pexpect.spawnbase import SpawnBase

from conftest import FIRMWARE, ROOT
from hvm import Machine
from hvm import console as console_module
from hvm.config import FlatBoot, VmSpec, parse_devices
from hvm.console import Console


def flat_spec(image: str, timeout: float = 20, **kw) -> VmSpec:
    return VmSpec(name=image, boot=FlatBoot(FIRMWARE / f"{image}.bin", 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  timeout=timeout, irqchip=False, **kw)


def quiet() -> Console:
    return Console("none", "none")


def test_expect_sendline_before_after_and_eof_with_the_exit_status():
    with Machine(flat_spec("echo"), console=quiet()) as vm:
        vm.start()
        con = vm.console
        assert isinstance(con, Console)
        con.sendline("hello")                       # os.linesep, as pexpect's sendline
        assert con.expect([b"nothing like it", "HEL+O"]) == 1
        assert (con.before, con.after, con.match.group(0)) == (b"", b"HELLO", b"HELLO")
        assert isinstance(con, SpawnBase)           # pexpect's own class, from the first use on
        assert con.send(b"abc") == 3
        assert con.expect("B") == 0
        assert (con.before, con.after) == (b"\nA", b"B")   # the line's newline was left unread: kept
        assert con.expect_exact(["C"]) == 0
        assert con.before == b""
        assert con.isalive()
        con.send("q")
        assert con.expect(pexpect.EOF, timeout=10) == 0
        assert con.before == b"bye\n"
        assert con.exitstatus == 0 and con.flag_eof and not con.isalive()
        with pytest.raises(pexpect.EOF):
            con.expect("anything", timeout=1)
        assert vm.wait(10).reason == "halt"


def test_timeout_raises_or_matches_and_loses_nothing():
    with Machine(flat_spec("echo"), console=quiet()) as vm:
        vm.start()
        con = vm.console
        con.send("xy")
        t0 = time.monotonic()
        with pytest.raises(pexpect.TIMEOUT):
            con.expect("never printed", timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 3
        assert con.expect(["never printed", pexpect.TIMEOUT], timeout=0.2) == 1
        assert con.after is pexpect.TIMEOUT
        assert con.expect("XY", timeout=0) == 0     # what the timed-out expects read is still there
        assert con.before == b""
        vm.stop()


def test_expect_waits_for_output_that_comes_later():
    with Machine(flat_spec("echo"), console=quiet()) as vm:
        vm.start()
        con = vm.console

        def later():
            time.sleep(0.3)
            con.send("late")

        threading.Thread(target=later, daemon=True).start()
        t0 = time.monotonic()
        con.expect("LATE", timeout=10)
        assert 0.25 <= time.monotonic() - t0 < 5
        vm.stop()


def test_no_byte_lost_or_repeated_across_many_expects():
    """6000 bytes sent at once (more than the UART's 4 KiB queue: send() waits for the guest), then one
    expect per token: each before is empty and the matches put together are exactly the echo."""
    tokens = [f"x{i:04d};" for i in range(1000)]
    with Machine(flat_spec("echo", timeout=60), console=quiet()) as vm:
        vm.start()
        con = vm.console
        assert con.send("".join(tokens)) == 6000
        seen = []
        for i in range(len(tokens)):
            con.expect(rf"X{i:04d};", timeout=20)
            assert con.before == b"", (i, con.before)
            seen.append(con.after)
        assert b"".join(seen) == "".join(tokens).upper().encode()
        assert vm.console.history == b"".join(seen)
        vm.stop()


def test_eof_after_the_guest_ended_and_logfiles():
    log_all, log_read, log_send = io.BytesIO(), io.BytesIO(), io.BytesIO()
    con = quiet()
    con.logfile = log_all            # set before pexpect's first use: kept
    with Machine(flat_spec("echo"), console=con) as vm:
        con.logfile_read = log_read
        con.logfile_send = log_send
        vm.start()
        con.send("ab")
        con.expect("AB")
        con.send("q")
        con.expect(pexpect.EOF)
        assert vm.wait(10).status == 0
    assert log_read.getvalue() == b"ABbye\n"
    assert log_send.getvalue() == b"abq"
    assert sorted(log_all.getvalue()) == sorted(b"ABbye\nabq")   # both ways, in the order they happened


def test_eof_comes_only_after_all_output_was_read():
    with Machine(flat_spec("hello"), console=quiet()) as vm:
        vm.start()
        assert vm.wait(10).reason == "halt"
        con = vm.console
        assert con.expect(["mode", pexpect.EOF]) == 0
        assert con.before == b"Hello from real "
        assert con.expect(pexpect.EOF) == 0 and con.before == b"!\n"


def test_send_blocks_on_a_guest_that_does_not_read_until_the_vm_stops():
    with Machine(flat_spec("ticker"), console=quiet()) as vm:
        vm.start()
        done = threading.Event()
        threading.Thread(target=lambda: (vm.console.send(b"z" * 10000), done.set()), daemon=True).start()
        assert not done.wait(0.5)                   # 4 KiB queued, the rest waits: backpressure
        assert vm.uart.input_pending <= 4096 + 16
        vm.stop()
        assert done.wait(3)                         # the stop let it go


def test_send_without_a_serial_port():
    with Machine(flat_spec("hello", serial=None), console=quiet()) as vm:
        with pytest.raises(pexpect.ExceptionPexpect, match="no serial input"):
            vm.console.send("x")


def test_a_flooding_guest_nobody_expects_on_is_bounded_and_not_held_up(tmp_path, monkeypatch, caplog):
    """pvcon prints 20000 lines through the pvconsole; nobody reads them. The history keeps its bound (here
    64 KiB), the guest runs to its end, and a later expect reads what was kept, saying what was dropped."""
    from bench.exits import patch_header

    monkeypatch.setattr(console_module, "HISTORY_LIMIT", 64 << 10)
    line = b"one line, printed three ways\n"
    image = patch_header(FIRMWARE / "pvcon.bin", tmp_path / "pvcon.bin", 20000, 2, arg_as_built=0)
    spec = VmSpec(name="pvcon", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 << 20, timeout=30,
                  irqchip=False, devices=parse_devices({"pvconsole": True}))
    with Machine(spec, console=quiet()) as vm:
        result = vm.run()
        assert (result.reason, result.status) == ("debug-exit", 1)
        con = vm.console
        assert len(con.history) <= 64 << 10
        assert con._trimmed + len(con.history) == 20000 * len(line)
        assert type(con) is Console                 # pexpect not used yet: a plain Console
        with caplog.at_level(logging.WARNING, logger="hvm.console"):
            con.expect(pexpect.EOF, timeout=10)
        assert 0 < len(con.before) <= 64 << 10 and con.before.endswith(line)
        assert any("were dropped" in r.getMessage() for r in caplog.records)


def test_a_long_expect_on_a_flooding_guest_keeps_pexpect_buffers_bounded(tmp_path, monkeypatch):
    from bench.exits import patch_header

    monkeypatch.setattr(console_module, "PEXPECT_LIMIT", 8192)
    monkeypatch.setattr(console_module, "PEXPECT_KEEP", 4096)
    line = b"one line, printed three ways\n"
    image = patch_header(FIRMWARE / "pvcon.bin", tmp_path / "pvcon.bin", 5000, 2, arg_as_built=0)
    spec = VmSpec(name="pvcon", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 << 20, timeout=30,
                  irqchip=False, devices=parse_devices({"pvconsole": True}))
    with Machine(spec, console=quiet()) as vm:
        con = vm.console
        con.maxread = 1024
        vm.start()
        with pytest.raises(pexpect.EOF):
            con.expect("never printed", timeout=20)
        assert len(con.before) <= 8192 + 1024 and con.before.endswith(line)
        assert vm.wait(10).status == 1


def test_hvm_run_without_expect_does_not_import_pexpect():
    code = ("import sys; from hvm import Machine, load_config; from hvm.console import Console\n"
            "with Machine(load_config('configs/hello.yaml'), console=Console('none', 'none')) as vm:\n"
            "    print(vm.run().status, 'pexpect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["0", "False"], out.stderr


INTERACT = """
import sys
from pathlib import Path
from hvm import Machine
from hvm.config import FlatBoot, VmSpec
from hvm.console import Console
spec = VmSpec(name="echo", boot=FlatBoot(Path(sys.argv[1]), 0x7C00, 0x7C00, "real"), memory=4 << 20, timeout=20,
              irqchip=False)
with Machine(spec, console=Console("none", "none")) as vm:
    vm.start()
    vm.console.send("pre")
    vm.console.expect("PRE")
    print("ready", flush=True)
    vm.console.interact()
    print("back", flush=True)
    vm.console.send("q")
    print(vm.wait(10).status, flush=True)
"""


def test_interact_in_a_terminal():
    """interact() driven the way a user drives it: through a pty (pexpect.spawn of a Python script)."""
    child = pexpect.spawn(sys.executable, ["-c", INTERACT, str(FIRMWARE / "echo.bin")], cwd=str(ROOT),
                          timeout=20)
    try:
        child.expect("ready")
        child.send("hey")
        child.expect("HEY")
        child.sendcontrol("]")                       # pexpect's escape character: back to the script
        child.expect("back")
        child.expect(r"(\d+)\s")
        assert child.match.group(1) == b"0"
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
