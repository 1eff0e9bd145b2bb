"""Files hvm reads and writes on the host side of the serial console (issue 11): the output file is opened
only once the VM is built, never through a symlink and never truncating what is not a regular file; an
input file is checked when the config is read and streamed to the guest as the guest takes it, after the
watchdog started."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import FIRMWARE, ROOT, run_measured, write_yaml
from hvm.config import ConfigError, load_config
from hvm.console import INPUT_AHEAD, INPUT_CHUNK, Console

ECHO = FIRMWARE / "echo.bin"
HELLO = FIRMWARE / "hello.bin"


def one_line_error(result, expected: str) -> None:
    assert result.status == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [expected], result.stderr


# --- output: --serial file:PATH --------------------------------------------------------------------------

def test_console_log_survives_a_vm_that_cannot_be_built(hvm, tmp_path):
    log = tmp_path / "console.log"
    log.write_text("the last run's log\n")
    notakernel = tmp_path / "kernel.txt"
    notakernel.write_text("not a kernel\n" * 10)
    # was: the log was truncated before the kernel was found unbootable (status 2)
    r = hvm("run", "--kernel", str(notakernel), "--serial", f"file:{log}", "--timeout", "5")
    one_line_error(r, f"hvm: {notakernel}: not a kernel hvm can boot (no multiboot header, not ELF, not a bzImage)")
    assert log.read_text() == "the last run's log\n"


def test_console_log_survives_a_bad_flag(hvm, tmp_path):
    log = tmp_path / "console.log"
    log.write_text("the last run's log\n")
    r = hvm("run", "configs/hello.yaml", "--serial", f"file:{log}", "--vcpus", "0")
    one_line_error(r, "hvm: --vcpus: 0 is out of range (1..64)")
    assert log.read_text() == "the last run's log\n"


def test_console_log_is_written(hvm, tmp_path):
    log = tmp_path / "console.log"
    log.write_text("old contents, longer than the new ones\n" * 10)
    r = hvm("run", "configs/hello.yaml", "--serial", f"file:{log}", "--timeout", "10")
    assert r.status == 0, r.stderr
    assert log.read_text() == "Hello from real mode!\n"
    assert log.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_console_log_symlink_is_not_followed(hvm, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "console.log"
    link.symlink_to(victim)
    # was: hvm truncated and overwrote the symlink's target
    r = hvm("run", "configs/hello.yaml", "--serial", f"file:{link}", "--timeout", "10")
    one_line_error(r, f"hvm: serial output file {link}: is a symbolic link (not followed)")
    assert victim.read_text() == "precious\n"


def test_console_log_to_a_directory(hvm, tmp_path):
    r = hvm("run", "configs/hello.yaml", "--serial", f"file:{tmp_path}", "--timeout", "10")
    one_line_error(r, f"hvm: serial output file {tmp_path}: is a directory")


def test_console_log_unknown_user(hvm):
    r = hvm("run", "configs/hello.yaml", "--serial", "file:~nosuchuser/log", "--timeout", "10")
    one_line_error(r, "hvm: --serial: serial output file ~nosuchuser/log: no user named 'nosuchuser' for '~nosuchuser'")


def test_console_output_to_dev_null_is_not_truncated_or_refused(hvm):
    r = hvm("run", "configs/hello.yaml", "--serial", "file:/dev/null", "--timeout", "10")
    assert (r.status, r.stderr) == (0, "")


# --- input: devices.serial.input file:PATH ----------------------------------------------------------------

def echo_config(tmp_path, input_spec: str, timeout: float = 10):
    return write_yaml(tmp_path, f"boot: {{image: {ECHO}}}\nmemory: 4M\ntimeout: {timeout}\n"
                      f"devices: {{serial: {{output: stdio, input: '{input_spec}'}}}}\n")


def test_input_file_reaches_the_guest(hvm, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"hello, file\nq")
    r = hvm("run", str(echo_config(tmp_path, f"file:{tmp_path}/in.txt")))
    assert (r.status, r.out, r.stderr) == (0, "HELLO, FILE\nbye\n", "")


def test_input_file_relative_to_the_current_directory(hvm, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"rel\nq")
    cfg = echo_config(tmp_path, "file:in.txt")
    r = hvm("run", str(cfg), cwd=tmp_path)
    assert (r.status, r.out) == (0, "REL\nbye\n"), r.stderr


def test_missing_input_file(hvm, tmp_path):
    cfg = echo_config(tmp_path, f"file:{tmp_path}/missing")
    # was: FileNotFoundError in Machine.start, status 70
    one_line_error(hvm("run", str(cfg)), f"hvm: {cfg}: devices.serial.input: file not found: {tmp_path}/missing")


def test_input_fifo_is_refused_at_once(hvm, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    cfg = echo_config(tmp_path, f"file:{tmp_path}/fifo")
    t0 = time.monotonic()
    # was: open() waited for a writer forever, and SIGTERM did not end it
    one_line_error(hvm("run", str(cfg), timeout=10),
                   f"hvm: {cfg}: devices.serial.input: {tmp_path}/fifo is a FIFO, not a regular file (for a pipe or "
                   "a device use input: stdin and redirect hvm's stdin from it)")
    assert time.monotonic() - t0 < 5


def test_input_device_is_refused(hvm, tmp_path):
    cfg = echo_config(tmp_path, "file:/dev/zero")   # was: read whole until memory ran out
    one_line_error(hvm("run", str(cfg), timeout=10),
                   f"hvm: {cfg}: devices.serial.input: /dev/zero is a device, not a regular file (for a pipe or "
                   "a device use input: stdin and redirect hvm's stdin from it)")


def test_input_directory_and_empty_name(tmp_path):
    with pytest.raises(ConfigError, match=f"devices.serial.input: {tmp_path} is a directory, not a regular file"):
        load_config(echo_config(tmp_path, f"file:{tmp_path}"))
    with pytest.raises(ConfigError, match="devices.serial.input: 'file:' is not one of: auto, stdin, none, file:PATH"):
        load_config(echo_config(tmp_path, "file:"))


def test_big_input_file_is_streamed_and_the_watchdog_ends_it_on_time(tmp_path):
    """64 MiB of input for a guest that echoes it slowly: hvm reads it as the guest takes it (RSS stays small)
    and the watchdog, started first, ends the run on time. Was: the file read whole and queued byte by byte
    into the UART (hundreds of MB) before the watchdog started."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)    # sparse: zeros the echo guest reads and never ends on
    cfg = echo_config(tmp_path, f"file:{big}", timeout=2)
    run = run_measured("run", str(cfg), tmp_path=tmp_path, timeout=30)
    assert run.status == 124, run.stderr
    assert "timeout: the guest was still running after 2 s" in run.stderr
    assert run.seconds < 2 + 3, run.seconds                # startup (~0.2 s) + teardown, not reading 64 MiB
    assert run.maxrss_kib < 64 * 1024, run.maxrss_kib      # KiB: an interpreter and 4 MiB of guest RAM (~25 MiB)


# --- the console's input pump, in-process ------------------------------------------------------------------

def test_pump_reads_only_as_far_ahead_as_the_guest_takes(tmp_path):
    data = bytes(range(256)) * 4096          # 1 MiB
    src = tmp_path / "in"
    src.write_bytes(data)
    fed = bytearray()
    taken = [0]                              # how much the "guest" has read of what was fed
    console = Console("none", f"file:{src}")
    console.start_input(fed.extend, pending=lambda: len(fed) - taken[0])
    try:
        time.sleep(0.3)
        assert INPUT_AHEAD < len(fed) <= INPUT_AHEAD + INPUT_CHUNK   # stopped reading: the guest took nothing
        deadline = time.monotonic() + 10
        while len(fed) < len(data) and time.monotonic() < deadline:
            taken[0] = len(fed)              # the guest drains what it has
            time.sleep(0.001)
        assert bytes(fed) == data            # everything, in order, nothing twice
    finally:
        console.close()
    assert console._input_thread is None


def test_pump_with_a_blocking_feed_stops_at_close(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"x" * (1 << 20))
    calls = []
    release = threading.Event()

    def feed(data: bytes) -> None:          # a UART applying backpressure: blocks until the guest reads
        calls.append(len(data))
        release.wait(5)

    console = Console("none", f"file:{src}")
    console.start_input(feed)
    thread = console._input_thread
    time.sleep(0.2)
    assert calls == [INPUT_CHUNK]
    t0 = time.monotonic()
    closer = threading.Thread(target=console.close)
    closer.start()
    time.sleep(0.1)
    release.set()                            # the blocked feed returns after close began
    closer.join(5)
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 2
    assert calls == [INPUT_CHUNK]            # nothing fed after close


def test_pump_stops_at_close_while_waiting_for_the_guest(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"x" * (1 << 20))
    console = Console("none", f"file:{src}")
    console.start_input(lambda data: None, pending=lambda: 1 << 30)   # the guest never reads
    thread = console._input_thread
    t0 = time.monotonic()
    console.close()
    assert not thread.is_alive() and time.monotonic() - t0 < 0.5


def test_input_file_swapped_for_a_fifo_after_the_check(tmp_path, caplog):
    os.mkfifo(tmp_path / "fifo")
    console = Console("none", f"file:{tmp_path}/fifo")
    t0 = time.monotonic()
    console.start_input(lambda data: None)   # must not block in open() waiting for a writer
    console.close()
    assert time.monotonic() - t0 < 1
    assert "not a regular file any more: the guest gets no input" in caplog.text


def test_console_opens_its_file_only_when_asked(tmp_path):
    log = tmp_path / "log"
    log.write_text("old\n")
    console = Console(f"file:{log}", "none", open_now=False)
    assert log.read_text() == "old\n"
    console.open()
    console.write(b"new\n")
    console.close()
    assert log.read_text() == "new\n"


def test_stdin_from_dev_zero_is_read_as_the_guest_takes_it(tmp_path):
    """`hvm run < /dev/zero`: hvm reads stdin only while the guest has taken what it was given (was: 1.67 GB
    in 10 s, all queued for the UART)."""
    cfg = write_yaml(tmp_path, f"boot: {{image: {ECHO}}}\nmemory: 4M\ntimeout: 2\n")
    with open("/dev/zero", "rb") as zero:
        run = run_measured("run", str(cfg), tmp_path=tmp_path, stdin=zero, timeout=30)
    assert run.status == 124, run.stderr
    assert run.maxrss_kib < 64 * 1024, run.maxrss_kib


def test_qemu_shim_kernel_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "kernel")
    r = subprocess.run([sys.executable, "-m", "hvm.qemu_shim", "-kernel", str(tmp_path / "kernel")], cwd=ROOT,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=20, text=True)
    # was: the shim's own check opened the FIFO and waited for a writer
    assert (r.returncode, r.stderr) == (2, f"hvm: --kernel: not a regular file: {tmp_path}/kernel is a FIFO\n")


def test_guest_ram_the_host_cannot_provide(hvm):
    # 1 TiB is within the config's bound; this host (24 GB, no swap) refuses the mapping
    r = hvm("run", "configs/hello.yaml", "--memory", "1T", "--timeout", "5")
    if r.status == 0:
        pytest.skip("this host maps 1 TiB of guest RAM")
    one_line_error(r, "hvm: --memory: this host cannot provide 1048576 MiB of guest RAM (Cannot allocate memory)")


# --- hvm/files.py: the one place user files are opened -----------------------------------------------------

def test_files_open_output_and_regular_inputs(tmp_path):
    from hvm.files import HostFileError, expand_user, open_output, open_regular_input, read_regular_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # a FIFO with no writer neither hangs the open nor is read; one with no reader cannot be written
    with pytest.raises(HostFileError, match=f"^input {fifo}: is a FIFO, not a regular file$"):
        open_regular_input(fifo, "input")
    with pytest.raises(HostFileError, match=f"^out {fifo}: a FIFO with no reader$"):
        open_output(fifo, "out")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    with pytest.raises(HostFileError, match=f"^input {big}: 100 bytes, more than the 99 allowed$"):
        read_regular_file(big, "input", 99)
    assert read_regular_file(big, "input", 100) == b"x" * 100
    # outputs: a regular file is truncated only once opened; a symlink is never followed
    out = tmp_path / "out"
    out.write_text("old")
    fd = open_output(out, "out")
    os.close(fd)
    assert out.read_text() == ""
    (tmp_path / "link").symlink_to(big)
    with pytest.raises(HostFileError, match="is a symbolic link"):
        open_output(tmp_path / "link", "out")
    assert big.read_bytes() == b"x" * 100
    with pytest.raises(HostFileError, match="no user named 'nosuchuser'"):
        expand_user("~nosuchuser/x", "image")
