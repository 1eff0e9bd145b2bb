"""The Python API: create, start, pause, resume, stop, wait on console output; every fd released."""
from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import CONFIGS, FIRMWARE
from hvm import Machine, load_config
from hvm.config import FlatBoot, KernelBoot, SerialSpec, VmSpec
from hvm.console import Console


def ticker_spec(timeout: float = 20) -> VmSpec:
    return VmSpec(name="ticker", boot=FlatBoot(FIRMWARE / "ticker.bin", 0x7C00, 0x7C00, "real"),
                  memory=4 << 20, timeout=timeout, irqchip=False)


def quiet() -> Console:
    return Console("none", "none")


def test_run_and_read_the_console():
    with Machine(load_config(CONFIGS / "hello.yaml"), console=quiet()) as vm:
        result = vm.run()
        assert (result.status, result.reason) == (0, "halt")
        assert vm.console.text() == "Hello from real mode!\n"
        assert vm.stats().by_reason == {"IO": 49, "HLT": 1}


def test_pause_resume_stop():
    with Machine(ticker_spec(), console=quiet()) as vm:
        vm.start()
        assert vm.wait_for_console(b"tick\ntick\n", timeout=10)
        vm.pause()
        assert vm.state == "paused"
        time.sleep(0.05)  # let any output already in flight land
        frozen = bytes(vm.console.history)
        time.sleep(0.5)
        assert bytes(vm.console.history) == frozen      # a paused guest prints nothing
        vm.resume()
        assert vm.state == "running"
        assert vm.wait_for_console(b"tick\n", timeout=10, start=len(frozen))
        result = vm.stop()
        assert (result.status, result.reason) == (0, "stopped")
        assert vm.state == "stopped"
        assert not any(t.is_alive() for t in vm.threads)


def test_wait_for_console_gives_up_when_the_guest_ends():
    with Machine(load_config(CONFIGS / "hello.yaml"), console=quiet()) as vm:
        vm.start()
        t0 = time.monotonic()
        assert vm.wait_for_console("never printed", timeout=10) is None
        assert time.monotonic() - t0 < 5
        assert vm.wait(10).reason == "halt"


def test_watchdog_from_the_api():
    with Machine(ticker_spec(timeout=0.3), console=quiet()) as vm:
        result = vm.run()
        assert (result.status, result.reason) == (124, "timeout")


def test_feed_input_from_python():
    spec = VmSpec(name="echo", boot=FlatBoot(FIRMWARE / "echo.bin", 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  timeout=20, irqchip=False, serial=SerialSpec("none", "none"))
    with Machine(spec, console=quiet()) as vm:
        vm.start()
        vm.uart.feed(b"abc")
        assert vm.wait_for_console(b"ABC", timeout=10)
        vm.uart.feed(b"xq")
        result = vm.wait(10)
        assert result.reason == "halt"
        assert vm.console.text() == "ABCX" + "bye\n"


def test_stdin_pipe_reaches_the_guest(hvm, tmp_path):
    cfg = tmp_path / "echo.yaml"
    cfg.write_text(f"boot: {{image: {FIRMWARE / 'echo.bin'}}}\nmemory: 4M\ntimeout: 10\n")
    r = hvm("run", str(cfg), input=b"hello, world\nq")
    assert (r.status, r.out) == (0, "HELLO, WORLD\nbye\n")


def test_two_vcpus_with_the_in_kernel_irqchip():
    # The AP waits for INIT/SIPI in the kernel; the BSP runs the multiboot test to its debug exit.
    spec = VmSpec(name="smp", boot=KernelBoot(FIRMWARE / "mbtest.elf", (), "exit=5"), memory=32 << 20, vcpus=2,
                  timeout=20, irqchip=True)
    with Machine(spec, console=quiet()) as vm:
        result = vm.run()
        assert (result.status, result.reason) == (11, "debug-exit")
        assert len(vm.threads) == 2
        assert "exiting through port 0xf4" in vm.console.text()


def test_lifecycle_errors():
    with Machine(ticker_spec(), console=quiet()) as vm:
        with pytest.raises(RuntimeError, match="cannot resume a VM that is created"):
            vm.resume()
        vm.start()
        with pytest.raises(RuntimeError, match="cannot start a VM that is running"):
            vm.start()
        vm.stop()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leaks_after_200_create_destroy_cycles():
    spec = load_config(CONFIGS / "hello.yaml")
    Machine(spec, console=quiet()).close()  # warm-up: one-time imports and signal handler
    before = fd_count()
    for i in range(200):
        with Machine(spec, console=quiet()) as vm:
            if i % 10 == 0:  # every tenth one also boots and runs to its halt
                assert vm.run().status == 0
    assert fd_count() == before


def test_no_fd_leaks_when_construction_fails(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x90" * (5 << 20))
    spec = VmSpec(name="x", boot=FlatBoot(big, 0x100000, 0x100000, "protected"), memory=4 << 20, irqchip=False)
    before = fd_count()
    for _ in range(20):
        with pytest.raises(Exception, match="do not fit in guest memory"):
            Machine(spec, console=quiet())
    assert fd_count() == before


def test_terminal_raw_mode_ctrl_a_x_and_restore(tmp_path):
    """On a terminal, keys go to the guest unprocessed, Ctrl-A x quits as in QEMU, and the terminal
    settings are restored afterwards."""
    import pty
    import select
    import subprocess
    import sys
    import termios

    cfg = tmp_path / "echo.yaml"
    cfg.write_text(f"boot: {{image: {FIRMWARE / 'echo.bin'}}}\nmemory: 4M\ntimeout: 20\n")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg)], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE)
    out = b""

    def read_until(pattern: bytes, limit: float = 10) -> None:
        nonlocal out
        import time
        deadline = time.monotonic() + limit
        while pattern not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                out += os.read(master, 1024)

    try:
        import time
        time.sleep(1.0)                       # let hvm put the terminal in raw mode
        os.write(master, b"hi")
        read_until(b"HI")
        assert b"HI" in out                   # no local echo ("hi"), the guest's upper-case echo
        assert b"hi" not in out
        os.write(master, b"\x01x")            # Ctrl-A x
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


# --- run states and events (QMP's RunState names and event shapes) -----------------------------------

def recorder(vm: Machine) -> list:
    events: list = []
    vm.add_listener(lambda name, data: events.append((name, data)))
    return events


def test_run_states_and_events_through_pause_resume_stop():
    with Machine(ticker_spec(), console=quiet()) as vm:
        events = recorder(vm)
        assert (vm.run_state, vm.state) == ("prelaunch", "created")
        vm.start()
        assert vm.run_state == "running"
        assert vm.wait_for_console(b"tick\n", timeout=10)
        vm.pause()
        vm.pause()                                  # paused already: nothing happens, no second STOP
        assert (vm.run_state, vm.state) == ("paused", "paused")
        vm.resume()
        vm.resume()                                 # running already: no second RESUME
        assert vm.run_state == "running"
        vm.stop()
        assert (vm.run_state, vm.state) == ("shutdown", "stopped")
        assert events == [("STOP", {}), ("RESUME", {}),
                          ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
        with pytest.raises(RuntimeError, match=r"cannot pause a VM that is stopped \(shutdown\)"):
            vm.pause()
        with pytest.raises(RuntimeError, match=r"cannot resume a VM that is stopped \(shutdown\)"):
            vm.resume()


def test_a_guest_that_ends_reports_a_guest_shutdown():
    with Machine(load_config(CONFIGS / "hello.yaml"), console=quiet()) as vm:
        events = recorder(vm)
        assert vm.run().reason == "halt"
        assert vm.run_state == "shutdown"
        assert events == [("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]


def test_a_crashing_guest_is_guest_panicked():
    spec = VmSpec(name="triple", boot=FlatBoot(FIRMWARE / "triple.bin", 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  timeout=20, irqchip=False)
    with Machine(spec, console=quiet()) as vm:
        events = recorder(vm)
        assert vm.run().status == 4
        assert vm.run_state == "guest-panicked"
        assert events == [("GUEST_PANICKED", {"action": "poweroff"}),
                          ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})]


def test_watchdog_is_a_host_signal_shutdown():
    with Machine(ticker_spec(timeout=0.3), console=quiet()) as vm:
        events = recorder(vm)
        assert vm.run().status == 124
        assert events == [("SHUTDOWN", {"guest": False, "reason": "host-signal"})]


def test_a_pause_that_times_out_leaves_the_vm_running_and_usable(monkeypatch):
    # A vCPU that cannot be stopped (its kick is lost here) must not wedge the machine: the pause gives up,
    # lets the others go, and the VM is running and can be paused again once kicks work.
    with Machine(ticker_spec(), console=quiet()) as vm:
        events = recorder(vm)
        vm.start()
        assert vm.wait_for_console(b"tick\n", timeout=10)
        thread = vm.threads[0]
        monkeypatch.setattr(thread, "kick", lambda: None)
        with pytest.raises(TimeoutError, match="did not pause within 0.3 s; the VM runs on"):
            vm.pause(timeout=0.3)
        assert vm.run_state == "running"
        mark = len(vm.console.history)
        assert vm.wait_for_console(b"tick\n", timeout=10, start=mark)   # still ticking
        vm.resume()                                                      # a no-op, not an error
        monkeypatch.undo()
        vm.pause(timeout=5)
        assert vm.run_state == "paused"
        vm.resume()
        assert vm.wait_for_console(b"tick\n", timeout=10, start=len(vm.console.history))
        vm.stop()
        assert [e for e, _ in events] == ["STOP", "RESUME", "SHUTDOWN"]


def test_a_failing_listener_does_not_change_the_run(caplog):
    with Machine(ticker_spec(), console=quiet()) as vm:
        def broken(name, data):
            raise ValueError("listener bug")
        vm.add_listener(broken)
        events = recorder(vm)
        vm.start()
        vm.pause()
        vm.resume()
        vm.remove_listener(broken)
        vm.stop()
        assert [e for e, _ in events] == ["STOP", "RESUME", "SHUTDOWN"]
        assert "listener" in caplog.text and "failed on STOP" in caplog.text


def test_pause_and_resume_from_several_threads_at_once():
    import threading

    with Machine(ticker_spec(), console=quiet()) as vm:
        events = recorder(vm)
        vm.start()
        errors = []

        def flip(n):
            try:
                for i in range(n):
                    (vm.pause if i % 2 == 0 else vm.resume)()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=flip, args=(20,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        vm.resume()
        assert vm.run_state == "running"
        # Each STOP is followed by a RESUME before the next STOP: transitions never interleave.
        names = [e for e, _ in events]
        assert names and all(a != b for a, b in zip(names, names[1:]))
        assert vm.wait_for_console(b"tick\n", timeout=10, start=len(vm.console.history))
        vm.stop()


def test_system_reset_of_a_running_vm_emits_reset_alone():
    """QEMU's system_reset reports RESET only: no STOP/RESUME around it (QMP clients would see the VM stop)."""
    with Machine(ticker_spec(), console=quiet()) as vm:
        events = recorder(vm)
        vm.start()
        assert vm.wait_for_console(b"tick\n", timeout=10)
        vm.system_reset()
        assert vm.run_state == "running"
        assert vm.wait_for_console(b"tick\n", timeout=10, start=len(vm.console.history))   # runs on
        vm.pause()
        vm.system_reset()
        assert vm.run_state == "paused"                 # a paused VM stays paused
        assert events == [("RESET", {"guest": False, "reason": "host-qmp-system-reset"}), ("STOP", {}),
                          ("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]


def test_close_of_a_running_vm_is_a_host_quit():
    vm = Machine(ticker_spec(), console=quiet())
    events = recorder(vm)
    vm.start()
    assert vm.wait_for_console(b"tick\n", timeout=10)
    vm.close()
    assert vm.run_state == "shutdown"
    assert events == [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]


def test_close_leaves_no_halt_watch_thread_behind(monkeypatch):
    """With several vCPUs a thread asks them whether they all halted; close() ends it before it closes the
    vCPUs (it kicks them, writing their kvm_run), even in a round waiting for answers that do not come."""
    spec = VmSpec(name="ticker2", boot=FlatBoot(FIRMWARE / "ticker.bin", 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  vcpus=2, timeout=20, irqchip=True)
    vm = Machine(spec, console=quiet())
    for t in vm.threads:
        monkeypatch.setattr(t, "probe", lambda: None)     # no answers: a round waits PROBE_TIMEOUT
    vm.start()
    assert vm.wait_for_console(b"tick\n", timeout=10)
    time.sleep(0.3)                                     # the halt watch is in a round now
    watch = vm._halt_watch
    assert watch is not None and watch.is_alive()
    vm.close()
    assert not watch.is_alive()
    assert not [t.name for t in threading.enumerate() if t.name == "halt-watch"]
