"""Boot each firmware program through the CLI and check its serial bytes, exit status and exits.
Checked on the kvm_pvm host (CPL0 emulated); the same guests run unchanged on VT-x/AMD-V."""
from __future__ import annotations

import re

import pytest

from conftest import CONFIGS, FIRMWARE, write_yaml

MBTEST = str(FIRMWARE / "mbtest.elf")


def test_hello_real_mode(hvm):
    r = hvm("run", str(CONFIGS / "hello.yaml"))
    assert r.stdout == b"Hello from real mode!\n"
    assert r.status == 0, r.stderr


def test_modes_walks_real_protected_long(hvm):
    r = hvm("run", str(CONFIGS / "modes.yaml"))
    assert r.out == "real mode: hello\nprotected mode: hello\nlong mode: hello (EFER.LMA=1)\n"
    assert r.status == 0


def test_vmm_sets_up_protected_mode(hvm):
    r = hvm("run", str(CONFIGS / "hello32.yaml"))
    assert (r.status, r.out) == (0, "protected mode, set up by hvm: hello\n")


def test_vmm_sets_up_long_mode(hvm):
    r = hvm("run", str(CONFIGS / "hello64.yaml"))
    assert (r.status, r.out) == (0, "long mode, set up by hvm: hello\n")


def test_multiboot_kernel_like_qemu(hvm):
    r = hvm("run", "--kernel", MBTEST, "--append", "exit=7 hello world", "--memory", "32M", "--timeout", "10")
    assert r.out == ("multiboot: magic ok\n"
                     "mem_upper: 0x00007c00 KiB\n"          # (32 MiB - 1 MiB) / 1 KiB
                     f"cmdline: {MBTEST} exit=7 hello world\n"  # the kernel's name first, as GRUB and QEMU
                     "mmap entries: 0x00000003\n"           # usable low, reserved 640K-1M, usable high
                     "mmio read with no device: 0xffffffff\n"
                     "port read with no device: 0x000000ff\n"
                     "rep insb from the UART scratch register: 0x5a5a5a5a\n"
                     "exiting through port 0xf4\n")
    assert r.status == (7 << 1) | 1


@pytest.mark.parametrize("code,status", [(0, 1), (1, 3), (42, 85), (127, 255), (128, 1)])
def test_debug_exit_status(hvm, code, status):
    r = hvm("run", "--kernel", MBTEST, "--append", f"exit={code}", "--serial", "none", "--timeout", "10")
    assert r.status == status
    assert r.stdout == b""


def test_unknown_port_and_mmio_are_logged_once_and_survived(hvm):
    r = hvm("run", "--kernel", MBTEST, "--serial", "none", "--timeout", "10", "--stats")
    assert r.status == 1
    assert "mmio write of 0x12345678 (4 bytes) to 0xd0000000: no device there, dropped" in r.stderr
    assert "port read (1 bytes) from 0x02fd: no device there, reads as all ones" in r.stderr
    # unclaimed ports are listed with the others under "by port", marked
    assert re.search(r"^by port:\n(  0x[0-9a-f]{4} .*\n)*  0x02fd\s+1  \(no device\)\n", r.stderr, re.M)
    assert re.search(r"MMIO with no device:\n\s+0x00d0000000\s+2\n", r.stderr)
    assert re.search(r"^\s+MMIO\s+2$", r.stderr, re.M)


def test_hello_exit_counts(hvm):
    # 5 UART-init writes, then per byte of "Hello from real mode!\n" (22) one LSR read and one THR write, one HLT.
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--stats")
    assert r.status == 0
    assert re.search(r"^exits: 50 total$", r.stderr, re.M)
    assert re.search(r"^\s+IO\s+49$", r.stderr, re.M)
    assert re.search(r"^\s+HLT\s+1$", r.stderr, re.M)
    assert re.search(r"^\s+0x03f8\s+23$", r.stderr, re.M)
    assert re.search(r"^\s+0x03fd\s+22$", r.stderr, re.M)


def test_triple_fault_is_a_crash_report(hvm, tmp_path):
    p = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'triple.bin'}, mode: protected, load: 0x100000}}\n"
                             "memory: 4M\ntimeout: 10\n")
    r = hvm("run", str(p))
    assert r.out == "about to triple fault\n"
    assert r.status == 4
    assert "guest crashed: SHUTDOWN (triple fault) on vCPU 0" in r.stderr
    assert re.search(r"RIP=00000000001000[0-9a-f]{2} ", r.stderr)
    assert "IDT.LIMIT=0" in r.stderr
    assert "last 16 exits (oldest first):" in r.stderr
    assert "IO out port=0x03f8 size=1 count=1 value=0xa" in r.stderr  # the final newline
    assert "Traceback" not in r.stderr


def test_timeout_ends_a_runaway_guest_with_124(hvm, tmp_path):
    p = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'ticker.bin'}}}\nmemory: 4M\n")
    r = hvm("run", str(p), "--timeout", "1")
    assert r.status == 124
    assert "timeout: the guest was still running after 1 s" in r.stderr
    assert r.out.startswith("tick\ntick\n")


def test_the_timeout_line_is_the_only_one_when_the_console_is_a_file(hvm, tmp_path):
    # No blank line before it: the console went to a file, not the terminal stderr shares.
    p = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'ticker.bin'}}}\nmemory: 4M\n")
    r = hvm("run", str(p), "--timeout", "0.5", "--serial", f"file:{tmp_path / 'out.txt'}")
    assert (r.status, r.stderr) == (124, "hvm: timeout: the guest was still running after 0.5 s\n")
    assert (tmp_path / "out.txt").read_bytes().startswith(b"tick\n")


def test_config_timeout_is_used(hvm, tmp_path):
    p = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'ticker.bin'}}}\nmemory: 4M\ntimeout: 0.5\n")
    r = hvm("run", str(p), "--serial", "none")
    assert r.status == 124
    assert "after 0.5 s" in r.stderr


def test_serial_to_file(hvm, tmp_path):
    out = tmp_path / "console.txt"
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--serial", f"file:{out}")
    assert r.status == 0
    assert r.stdout == b""
    assert out.read_bytes() == b"Hello from real mode!\n"


def test_flags_override_config(hvm):
    # configs/multiboot.yaml says exit=7 and 64M; the flags win.
    r = hvm("run", str(CONFIGS / "multiboot.yaml"), "--append", "exit=3", "--memory", "16M")
    assert r.status == 7
    assert "mem_upper: 0x00003c00 KiB\n" in r.out
    assert f"cmdline: {MBTEST} exit=3\n" in r.out


@pytest.mark.parametrize("signo,blocked_by_parent", [(15, False), (1, False), (15, True)],
                         ids=["SIGTERM", "SIGHUP", "SIGTERM-blocked-by-parent"])
def test_sigterm_stops_the_vm_cleanly(tmp_path, signo, blocked_by_parent):
    """SIGTERM/SIGHUP end the run with 128 + N and one line. Also when the parent started hvm with them
    blocked (the mask survives exec; `hvm kut` did that to its children, whose SIGTERM then never came)."""
    import signal
    import subprocess
    import sys
    import time

    def block():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})

    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'ticker.bin'}}}\nmemory: 4M\ntimeout: 20\n")
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=block if blocked_by_parent else None)
    try:
        assert proc.stdout.read(5) == b"tick\n"
        time.sleep(0.2)
        proc.send_signal(signo)
        assert proc.wait(timeout=10) == 128 + signo
        err = proc.stderr.read().decode()
        assert f"terminated by signal {signo}" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
