"""virtio-console: the backend alone (a GuestMemory and tests/virtio_driver.py's guest-side driver, no VM),
firmware/vcon (a virtio-mmio driver in firmware) printing and echoing through it under a real VM, and
Linux's own driver (console=hvc0, slow)."""
from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import FIRMWARE, ROOT, run_hvm, write_yaml
from hvm.memory import GuestMemory
from hvm.mmio.bus import MmioBus
from hvm.mmio.device import DeviceStateError, IrqLine
from hvm.mmio.virtio import attach, constants as vc
from hvm.mmio.virtio import console as vcon
from hvm.mmio.virtio.console import INPUT_QUEUE_LIMIT, VirtioConsole
from virtio_driver import GuestDriver, patch_firmware

BASE = 0xD000_0000
LINE = b"one line, printed three ways\n"


class Ctx(SimpleNamespace):
    """The parts of a DeviceContext that virtio-console's create() uses."""


def make(memory: GuestMemory):
    out: list[bytes] = []
    ctx = Ctx(name="virtio-console0", index=0, memory=memory, console=SimpleNamespace(write=out.append),
              mmio=MmioBus(), slot=SimpleNamespace(base=BASE, size=0x1000, irq=5), lines={}, closers=[],
              console_input=None)
    ctx.irq_line = lambda n: ctx.lines.setdefault(n, IrqLine(n))
    ctx.on_close = ctx.closers.append
    ctx.set_console_input = lambda feed, pending, release=None: setattr(ctx, "console_input", (feed, pending))
    transport = vcon.create(ctx, {})
    return ctx, transport, transport.backend, out


@pytest.fixture
def mem():
    with GuestMemory(4 << 20) as m:
        yield m


def started(mem, size: int = 8):
    ctx, transport, backend, out = make(mem)
    driver = GuestDriver(transport, mem)
    rx, tx = driver.start(2, size=size, features=None)
    return ctx, transport, backend, out, driver, rx, tx


def test_identity_features_and_wiring(mem):
    ctx, transport, backend, out = make(mem)
    driver = GuestDriver(transport, mem)
    assert driver.r(vc.MMIO_DEVICE_ID) == 3
    assert driver.device_features() & 0xFFFF_FFFF & ~((1 << 28) | (1 << 29)) == 0   # no console features
    assert ctx.mmio.find(BASE + 0xFFF).device is transport
    feed, pending = ctx.console_input
    assert feed == backend.feed and pending() == 0
    # queues: receiveq and transmitq, nothing more
    driver.w(vc.MMIO_QUEUE_SEL, 2)
    assert driver.r(vc.MMIO_QUEUE_NUM_MAX) == 0
    ctx.closers[-1]()                      # the Machine's close: blocked feeders would be let go
    assert backend._input.closed


def test_transmit_sends_chains_in_order(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    h1 = tx.add([b"hello, ", b"world\n"])
    h2 = tx.add([b"second"], indirect=True)
    driver.kick(1)
    assert b"".join(out) == b"hello, world\nsecond"
    assert tx.take_used() == [(h1, 0), (h2, 0)]
    assert backend.tx_bytes == 19
    assert ctx.lines[5].level and driver.ack_interrupt() == vc.INT_USED_BUFFER and not ctx.lines[5].level


def test_transmit_of_a_big_buffer_goes_out_in_pieces(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    data = bytes(range(256)) * 1024          # 256 KiB
    tx.add([data])
    driver.kick(1)
    assert b"".join(out) == data and max(map(len, out)) <= vcon.OUTPUT_CHUNK


def test_input_waits_for_the_driver_then_fills_buffers(mem):
    ctx, transport, backend, out = make(mem)
    backend.feed(b"typed early")
    assert backend.input_pending == 11
    driver = GuestDriver(transport, mem)
    rx, tx = driver.start(2, size=8, features=None)   # the reset in the probe keeps queued input
    h1 = rx.add(in_lens=[4])
    h2 = rx.add(in_lens=[64])
    driver.kick(0)
    assert rx.take_used() == [(h1, 4), (h2, 7)]
    assert rx.written(h1) == b"type" and rx.written(h2)[:7] == b"d early"
    assert backend.input_pending == 0 and backend.rx_bytes == 11


def test_input_fed_later_goes_straight_into_posted_buffers(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    head = rx.add(in_lens=[16])
    driver.kick(0)
    assert rx.take_used() == [] and not ctx.lines[5].level
    backend.feed(b"abc")
    assert rx.take_used() == [(head, 3)] and rx.written(head)[:3] == b"abc"
    assert ctx.lines[5].level                          # the used-buffer interrupt
    backend.feed(b"more")                              # no buffer: it waits
    assert backend.input_pending == 4


def test_feed_blocks_when_full_and_close_lets_it_go(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    done = threading.Event()
    t = threading.Thread(target=lambda: (backend.feed(b"x" * (INPUT_QUEUE_LIMIT + 100)), done.set()), daemon=True)
    t.start()
    time.sleep(0.3)
    assert not done.is_set() and backend.input_pending == INPUT_QUEUE_LIMIT   # backpressure, bounded
    backend.close()
    t.join(2)
    assert done.is_set() and backend.input_pending == INPUT_QUEUE_LIMIT       # the rest dropped


def test_blocked_feed_resumes_when_the_guest_takes_input(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem, size=16)
    payload = bytes(i & 0xFF for i in range(INPUT_QUEUE_LIMIT + 1000))
    t = threading.Thread(target=backend.feed, args=(payload,), daemon=True)
    t.start()
    time.sleep(0.2)
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < len(payload) and time.monotonic() < deadline:
        head = rx.add(in_lens=[1024])
        with transport.lock:
            driver.kick(0)
        for h, n in rx.take_used():
            got += rx.written(h)[:n]
        time.sleep(0.01)
    t.join(2)
    assert got == payload and not t.is_alive()


def test_paused_device_does_not_touch_guest_memory(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    head = rx.add(in_lens=[8])
    transport.pause()
    backend.feed(b"later")
    assert rx.take_used() == [] and backend.input_pending == 5
    transport.resume()
    assert rx.take_used() == [(head, 5)]


def test_save_load_pending_input(mem):
    ctx, transport, backend, out = make(mem)
    backend.feed(b"queued")
    state = transport.save()
    assert state["backend"] == {"pending_input": b"queued"}
    ctx2, transport2, backend2, out2 = make(mem)
    transport2.load(state)
    assert backend2.input_pending == 6
    with pytest.raises(DeviceStateError, match="pending_input"):
        backend2.load({"pending_input": b"x" * (INPUT_QUEUE_LIMIT + 1)})
    with pytest.raises(DeviceStateError, match="unknown state field"):
        backend2.load({"pending_input": b"", "cols": 80})
    assert backend2.input_pending == 6                 # a refused state leaves the device as it was


def test_hostile_transmit_ring_breaks_only_the_device(mem):
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    tx.write_desc(0, 0xC000_0000, 16)                  # in the PCI hole: not guest RAM
    tx.publish(0)
    driver.kick(1)
    assert out == [] and driver.r(vc.MMIO_STATUS) & vc.STATUS_DEVICE_NEEDS_RESET
    backend.feed(b"ignored until reset")               # the input thread does not touch a broken queue
    assert backend.input_pending == 19
    # the driver resets and starts over: the device works again, the input is still there
    rx, tx = driver.start(2, size=8, features=None)
    head = rx.add(in_lens=[32])
    driver.kick(0)
    assert rx.take_used() == [(head, 19)]
    tx.add([b"ok\n"])
    driver.kick(1)
    assert out == [b"ok\n"]


def test_hostile_receive_ring_a_read_only_buffer(mem):
    """A receive chain with no writable buffer: the device takes nothing from the input, completes it with
    0 bytes (the guest broke its own buffer, not the VMM)."""
    ctx, transport, backend, out, driver, rx, tx = started(mem)
    backend.feed(b"abc")
    head = rx.add([b"readonly"])
    driver.kick(0)
    assert rx.take_used() == [(head, 0)] and backend.input_pending == 3


# --- firmware/vcon under a real VM -------------------------------------------------------------------

def vcon_image(tmp_path, iterations: int, mode: int = 0, base: int = BASE):
    return patch_firmware(FIRMWARE / "vcon.bin", tmp_path / f"vcon-{mode}.bin", iterations, base, mode)


def vcon_yaml(tmp_path, image, serial: str, extra: str = "") -> str:
    return str(write_yaml(tmp_path, f"name: vcon\nmemory: 16M\ntimeout: 20\nmachine: none\n"
                          f"boot: {{image: '{image}', load: 0x100000, mode: protected}}\n"
                          f"devices: {{serial: {serial}, virtio-console: true{extra}}}\n", "vcon.yaml"))


HANDSHAKE_EXITS = 35


@pytest.mark.parametrize("mode, lines, notifies", [(0, 3, 3), (2, 17, 3)])   # 2: 8 buffers per notify
def test_firmware_prints_through_virtio_console(tmp_path, mode, lines, notifies):
    out = tmp_path / "serial.out"
    image = vcon_image(tmp_path, lines, mode)
    run = run_hvm("run", vcon_yaml(tmp_path, image, f"{{output: 'file:{out}', input: none}}"), "--stats")
    assert run.status == 1, run.stderr
    assert out.read_bytes() == LINE * lines                # byte for byte, through the transmit queue
    # the 35 accesses of the handshake, one QueueNotify exit per batch, then the debug-exit OUT
    assert re.search(rf"^  MMIO +{HANDSHAKE_EXITS + notifies}$", run.stderr, re.M), run.stderr
    assert re.search(r"^  IO +1$", run.stderr, re.M), run.stderr
    assert re.search(rf"^device virtio-console: notifications {notifies + 0}  interrupts 0  config_interrupts 0  "
                     rf"errors 0  tx_bytes {len(LINE) * lines}  rx_bytes 0$", run.stderr, re.M), run.stderr



@pytest.mark.parametrize("name", ["virtio-console", "virtconsole"])
def test_device_flag(tmp_path, name):
    """`--device virtio-console` (or QEMU's name) on a VM whose YAML has none."""
    image = vcon_image(tmp_path, 2)
    cfg = write_yaml(tmp_path, f"name: vcon\nmemory: 16M\ntimeout: 20\nmachine: none\n"
                     f"boot: {{image: '{image}', load: 0x100000, mode: protected}}\n", "plain.yaml")
    run = run_hvm("run", str(cfg), "--device", name)
    assert (run.status, run.stdout) == (1, LINE * 2), run.stderr
    run = run_hvm("run", str(cfg))
    assert run.status == 3 and run.stdout == b""     # no device at the base: vcon says so (debug-exit 1)
    run = run_hvm("run", str(cfg), "--device", f"{name},cols=80")
    assert run.status == 2 and run.stderr.count("\n") == 1 and "cols" in run.stderr, run.stderr

def test_firmware_echoes_input_from_a_file(tmp_path):
    out = tmp_path / "serial.out"
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"hello virtio\nsecond line\nq and nothing after")
    image = vcon_image(tmp_path, 1, mode=1)
    run = run_hvm("run", vcon_yaml(tmp_path, image, f"{{output: 'file:{out}', input: 'file:{inp}'}}"))
    assert run.status == 1, run.stderr
    assert out.read_bytes() == b"HELLO VIRTIO\nSECOND LINE\nbye\n"




def test_without_a_uart_stdin_goes_to_virtio_console(tmp_path):
    """`serial: false`: the console is this terminal, output and input (as for console=hvc0 alone)."""
    image = vcon_image(tmp_path, 1, mode=1)
    run = run_hvm("run", vcon_yaml(tmp_path, image, "false"), input=b"from stdin\nq")
    assert (run.status, run.out) == (1, "FROM STDIN\nbye\n"), run.stderr

def test_pexpect_api_sends_and_expects_through_virtio_console(tmp_path):
    """The console's pexpect API (what scripts use) over virtio-console: send() goes to the receive queue."""
    from hvm import Machine, load_config
    from hvm.console import Console

    image = vcon_image(tmp_path, 1, mode=1)
    spec = load_config(vcon_yaml(tmp_path, image, "{output: none, input: none}"))
    with Machine(spec, console=Console("none", "none")) as vm:
        vm.start()
        try:
            vm.console.send(b"pexpect works\n")
            vm.console.expect_exact(b"PEXPECT WORKS\n", timeout=10)
            vm.console.send(b"q")
            vm.console.expect_exact(b"bye\n", timeout=10)
        finally:
            result = vm.wait(timeout=15)
    assert result is not None and (result.reason, result.status) == ("debug-exit", 1)

def test_firmware_finds_no_device_at_a_wrong_base(tmp_path):
    image = vcon_image(tmp_path, 1, base=0xD000_1000)
    run = run_hvm("run", vcon_yaml(tmp_path, image, "none"))
    assert run.status == 3          # debug-exit 1: no virtio-console at the base (all-ones reads)


# --- Linux's own driver --------------------------------------------------------------------------------

@pytest.mark.slow
def test_linux_boot_log_through_hvc0(tmp_path):
    """Linux's virtio_console driver as the kernel's only console (no UART at all). hvc registers its console
    at console_initcall time and drops what it cannot write yet, so the log starts where the virtio-console
    port appears (device_initcall, ~19 s into this emulated boot): the end of the boot, /init, the panic."""
    import subprocess

    subprocess.run(["make", "-s", "linux"], cwd=ROOT, check=True, timeout=3600)
    linux = ROOT / "build" / "linux"
    cfg = write_yaml(tmp_path, "name: hvc\nmemory: 256M\nvcpus: 1\n"
                     f"boot: {{kernel: '{linux / 'vmlinux-minimal'}', initrd: '{linux / 'initramfs-ud2.cpio'}', "
                     "cmdline: 'console=hvc0 panic=-1'}\n"
                     "devices: {serial: false, virtio-console: true}\n", "hvc.yaml")
    run = run_hvm("run", str(cfg), "--timeout", "240", "--stats", timeout=300)
    assert "Run /init as init process" in run.out, run.stderr[-3000:]
    assert "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004" in run.out
    assert re.search(r"^\[ *[\d.]+\] ", run.out)          # the kernel's own log lines, timestamps and all
    assert run.status == 4
    assert re.search(r"^  virtio-console +\d+$", run.stderr, re.M), run.stderr   # --stats: exits by device
    # and the device's own counters: the driver kicked the transmit queue, the device interrupted back
    counters = re.search(r"^device virtio-console: notifications (\d+)  interrupts (\d+) ", run.stderr, re.M)
    assert counters and int(counters[1]) > 0 and int(counters[2]) > 0, run.stderr

def test_ctrl_a_x_and_input_through_the_console_pump(mem):
    """The console's input thread (Ctrl-A x, Ctrl-A Ctrl-A) works the same whatever device takes the input."""
    import os

    from hvm.console import Console

    ctx, transport, backend, out = make(mem)
    console = Console("none", "none")
    quit_called = []
    console.on_quit = lambda: quit_called.append(True)
    r, w = os.pipe()
    try:
        os.write(w, b"ab\x01\x01c\x01xnot sent")
        console._pump_loop(r, backend.feed, lambda: backend.input_pending, tty=True)
    finally:
        os.close(r)
        os.close(w)
        console.close()
    assert quit_called == [True] and bytes(backend._pending) == b"ab\x01c"


def test_hvm_qemu_spelling():
    from hvm.qemu_shim import ShimError, translate

    args = translate(["-chardev", "stdio,id=con0", "-device", "virtio-serial-device", "-device",
                      "virtconsole,chardev=con0,id=c0"])
    assert args[args.index("--serial") + 1] == "stdio" and args[-2:] == ["--device", "virtio-console"]
    args = translate(["-device", "virtio-serial-device", "-device", "virtconsole"])
    assert args[args.index("--serial") + 1] == "none" and args[-2:] == ["--device", "virtio-console"]
    for argv, message in (
            (["-device", "virtconsole"], "-device virtconsole: no virtio-serial bus"),
            (["-device", "virtio-serial-device", "-device", "virtconsole,chardev=nope"],
             "-device virtconsole: chardev 'nope' not found"),
            (["-device", "virtio-serial-device", "-device", "virtconsole,bogus=1"],
             "-device virtconsole: bogus: property not supported by hvm")):
        with pytest.raises(ShimError, match=message):
            translate(argv)
