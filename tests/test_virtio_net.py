"""virtio-net (hvm/mmio/virtio/net.py): frames between a guest's rings and a tap.

Unit tests drive the device through its virtio-mmio registers with tests/virtio_driver.py (no KVM); the
"tap" is one end of a SOCK_SEQPACKET socketpair (whole frames, non-blocking), or a real tap made inside a
private network namespace (`unshare -n`): the host's own network is never touched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from conftest import ROOT
from hvm.memory import MiB, GuestMemory
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioMmio
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio import net
from virtio_driver import GuestDriver, make_rig, memory  # noqa: F401 (memory: the fixture)

W, N = vc.VIRTQ_DESC_F_WRITE, vc.VIRTQ_DESC_F_NEXT
MAC = bytes.fromhex("525400123456")
ETHERTYPE = 0x88B5        # IEEE "local experimental": nothing else on the link sends it
HDR = bytes(12)


def frame(n: int, payload_len: int = 46, dst: bytes = MAC) -> bytes:
    body = struct.pack(">I", n) * (payload_len // 4 + 1)
    return dst + bytes.fromhex("020000000001") + struct.pack(">H", ETHERTYPE) + body[:payload_len]


def wait_for(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Rig:
    """A VirtioNet on a socketpair, its transport, and a guest driver with both queues running."""

    def __init__(self, memory: GuestMemory, start_driver: bool = True, queue_size: int = 16):
        self.host, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dev_end.setblocking(False)
        self.host.settimeout(5)
        self.backend = net.VirtioNet("virtio-net0", dev_end.detach(), MAC, "pair")
        rig = make_rig(memory, self.backend, queues=2 if start_driver else None, size=queue_size)
        self.irq, self.t, self.driver = rig.irq, rig.t, rig.drv
        self.rx, self.tx = rig.rings if start_driver else (None, None)

    def close(self) -> None:
        self.backend.close()
        self.host.close()


@pytest.fixture
def rig(memory):
    r = Rig(memory)
    yield r
    r.close()


# --- features and configuration space ---------------------------------------------------------------
def test_features_and_config_space(rig):
    feats = rig.driver.device_features()
    assert feats >> net.VIRTIO_NET_F_MAC & 1 and feats >> net.VIRTIO_NET_F_STATUS & 1
    assert feats >> vc.F_VERSION_1 & 1
    # No offloads: CSUM(0), GUEST_CSUM(1), GUEST_TSO4(7), HOST_TSO4(11), MRG_RXBUF(15), CTRL_VQ(17), MQ(22).
    for bit in (0, 1, 7, 8, 10, 11, 12, 14, 15, 17, 22):
        assert not feats >> bit & 1, bit
    assert rig.t.read(vc.MMIO_DEVICE_ID, 4) == 1
    assert bytes(rig.t.read(vc.MMIO_CONFIG + i, 1) for i in range(6)) == MAC
    assert rig.t.read(vc.MMIO_CONFIG + 6, 2) == net.VIRTIO_NET_S_LINK_UP
    assert rig.t.read(vc.MMIO_CONFIG + 4, 4) == 0x0001_5634    # across mac[4..5] and status


def test_default_mac_and_mac_validation():
    assert net.default_mac(0) == "52:54:00:12:34:56"
    assert net.default_mac(1) == "52:54:00:12:34:57"
    assert net.parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    for bad, msg in (("01:00:5e:00:00:01", "is a multicast address"), ("00:00:00:00:00:00", "all-zero"),
                     ("52:54:00:12:34", "is not a MAC address"), ("52:54:00:12:34:5g", "is not a MAC address"),
                     ("52-54-00-12-34-56", "is not a MAC address")):
        with pytest.raises(ValueError, match=msg):
            net.parse_mac(bad)


def test_missing_tap_is_one_line_and_nothing_is_created():
    with pytest.raises(net.TapError) as e:
        net.open_tap("hvmnotap0")
    assert str(e.value) == "no such tap device hvmnotap0 (create one: ip tuntap add hvmnotap0 mode tap)"
    assert not os.path.exists("/sys/class/net/hvmnotap0")
    for bad in ("../x", "", "a" * 16, "a b", "."):
        with pytest.raises(net.TapError, match="is not a network interface name"):
            net.open_tap(bad)


def test_not_a_tap_is_refused():
    with pytest.raises(net.TapError, match="cannot attach to tap device lo: not a tap device"):
        net.open_tap("lo")


# --- TX ---------------------------------------------------------------------------------------------
def test_tx_frame_reaches_the_tap(rig):
    f = frame(1, 100)
    head = rig.tx.add([HDR[:5], HDR[5:] + f[:20], f[20:]])     # header and frame split across buffers
    rig.driver.kick(1)
    assert rig.host.recv(65536) == f
    assert rig.tx.take_used() == [(head, 0)]
    assert rig.irq.level and rig.driver.ack_interrupt() & vc.INT_USED_BUFFER
    assert (rig.backend.tx_frames, rig.backend.tx_bytes, rig.backend.tx_dropped) == (1, len(f), 0)


def test_tx_malformed_and_oversize_frames_are_dropped_and_counted(rig):
    short = rig.tx.add([HDR + bytes(13)])                     # 13 bytes: no Ethernet header
    nohdr = rig.tx.add([bytes(8)])                            # not even the virtio header
    huge = rig.tx.add([HDR + bytes(net.MAX_FRAME + 1)])       # one byte over the largest frame
    maxi = rig.tx.add([HDR + frame(7, net.MAX_FRAME - 14)])   # exactly the largest: sent
    rig.driver.kick(1)
    assert sorted(h for h, _ in rig.tx.take_used()) == sorted([short, nohdr, huge, maxi])
    assert (rig.backend.tx_dropped, rig.backend.tx_frames) == (3, 1)
    assert len(rig.host.recv(1 << 17)) == net.MAX_FRAME
    assert not rig.t.broken


def test_hostile_tx_chain_needs_reset_and_the_vmm_goes_on(rig):
    # A descriptor loop: 0 -> 1 -> 0.
    buf = rig.driver.arena.alloc(64)
    rig.tx.write_desc(0, buf, 32, N, 1)
    rig.tx.write_desc(1, buf + 32, 32, N, 0)
    rig.tx.publish(0)
    rig.driver.kick(1)
    assert rig.t.broken and rig.t.read(vc.MMIO_STATUS, 4) & vc.STATUS_DEVICE_NEEDS_RESET
    assert rig.driver.ack_interrupt() & vc.INT_CONFIG_CHANGE
    assert rig.backend.tx_frames == 0
    # An out-of-RAM buffer after a reset: the same, and a reset brings the device back.
    rig.rx, rig.tx = rig.driver.start(2, 16)
    rig.tx.write_desc(0, 64 * MiB, 100)
    rig.tx.publish(0)
    rig.driver.kick(1)
    assert rig.t.broken
    rig.rx, rig.tx = rig.driver.start(2, 16)
    assert not rig.t.broken
    rig.tx.add([HDR + frame(2)])
    rig.driver.kick(1)
    assert rig.host.recv(65536) == frame(2)


def test_hostile_rx_ring_needs_reset(rig):
    rig.rx.write_desc(0, 0xFFFF_F000, 4096, W)               # outside 16 MiB of RAM
    rig.rx.publish(0)
    rig.driver.kick(0)
    rig.host.send(frame(1))
    wait_for(lambda: rig.t.broken, what="NEEDS_RESET")
    assert rig.backend.rx_frames == 0
    assert rig.backend._thread.is_alive()


# --- RX ---------------------------------------------------------------------------------------------
def test_rx_frame_reaches_a_guest_buffer(rig):
    head = rig.rx.add(in_lens=[1526])
    rig.driver.kick(0)
    f = frame(3, 200)
    rig.host.send(f)
    wait_for(lambda: rig.rx.used_idx() == 1, what="the used ring")
    assert rig.rx.take_used() == [(head, 12 + len(f))]
    data = rig.rx.written(head)
    assert data[:12] == bytes(10) + b"\x01\x00"            # header zero, num_buffers = 1
    assert data[12:12 + len(f)] == f
    assert rig.irq.level and rig.driver.ack_interrupt() & vc.INT_USED_BUFFER
    assert (rig.backend.rx_frames, rig.backend.rx_bytes, rig.backend.rx_dropped) == (1, len(f), 0)


def test_rx_frame_across_several_writable_buffers(rig):
    head = rig.rx.add(in_lens=[10, 30, 2000])
    rig.driver.kick(0)
    f = frame(4, 500)
    rig.host.send(f)
    wait_for(lambda: rig.rx.used_idx() == 1, what="the used ring")
    assert rig.rx.take_used() == [(head, 12 + len(f))]
    assert rig.rx.written(head)[12:12 + len(f)] == f


def test_rx_buffer_too_small_gets_nothing_and_is_counted(rig):
    small = rig.rx.add(in_lens=[64])
    rig.driver.kick(0)
    rig.host.send(frame(5, 200))
    wait_for(lambda: rig.rx.used_idx() == 1, what="the used ring")
    assert rig.rx.take_used() == [(small, 0)]
    assert (rig.backend.rx_dropped, rig.backend.rx_frames) == (1, 0)


def test_no_rx_buffer_waits_without_spinning_and_keeps_one_frame(rig):
    frames = [frame(i) for i in range(40)]
    for f in frames:
        rig.host.send(f)
    wait_for(lambda: rig.backend.rx_waits == 1, what="the reader to wait")
    wakeups = rig.backend.reader_wakeups
    time.sleep(0.5)
    # No busy loop: the reader sleeps in poll() on its wake pipe only (the socket is full of frames).
    assert rig.backend.reader_wakeups == wakeups
    assert rig.backend._pending == frames[0]
    assert rig.backend.rx_dropped == 0
    # Three buffers: three frames, in order, then it waits again (40 - 3 still in the socket, not in hvm).
    heads = [rig.rx.add(in_lens=[1526]) for _ in range(3)]
    rig.driver.kick(0)
    wait_for(lambda: rig.rx.used_idx() == 3, what="three frames")
    time.sleep(0.05)
    assert rig.rx.used_idx() == 3
    assert [rig.rx.written(h)[12:12 + 60] for h in heads] == frames[:3]
    assert rig.backend._pending == frames[3] and rig.backend.rx_waits == 2


def test_rx_before_driver_ok_is_dropped_and_counted(memory):
    r = Rig(memory, start_driver=False)
    try:
        for i in range(5):
            r.host.send(frame(i))
        wait_for(lambda: r.backend.rx_dropped == 5, what="5 drops")
        assert r.backend.rx_frames == 0 and r.backend._pending is None
        # Once the driver runs, frames are received.
        r.rx, r.tx = r.driver.start(2, 16)
        head = r.rx.add(in_lens=[1526])
        r.driver.kick(0)
        r.host.send(frame(9))
        wait_for(lambda: r.rx.used_idx() == 1, what="the used ring")
        assert r.rx.written(head)[12:72] == frame(9)
    finally:
        r.close()


def test_paused_device_writes_no_guest_memory(rig):
    head = rig.rx.add(in_lens=[1526])
    rig.driver.kick(0)
    rig.backend.pause()
    before = rig.driver.memory.read(rig.rx.used, 16)
    rig.host.send(frame(6))
    time.sleep(0.3)
    assert rig.rx.used_idx() == 0 and rig.driver.memory.read(rig.rx.used, 16) == before
    assert rig.rx.written(head) == bytes(1526)
    rig.backend.resume()
    wait_for(lambda: rig.rx.used_idx() == 1, what="the frame after resume")
    assert rig.rx.written(head)[12:72] == frame(6)


def test_reset_forgets_queues_and_drops_the_kept_frame(rig):
    rig.host.send(frame(1))
    wait_for(lambda: rig.backend.rx_waits == 1, what="the reader to wait")
    rig.t.write(vc.MMIO_STATUS, 4, 0)        # driver resets the device
    wait_for(lambda: rig.backend.rx_dropped == 1, what="the kept frame dropped")
    assert rig.backend._pending is None


def test_peer_closed_stops_the_reader_without_spinning(memory):
    r = Rig(memory)
    try:
        r.host.close()        # EOF on the device's end: the reader logs once and ends (no poll loop on it)
        r.backend._thread.join(timeout=5)
        assert not r.backend._thread.is_alive()
        r.tx.add([HDR + frame(1)])
        r.driver.kick(1)      # TX to a closed peer: an error counted, the VMM goes on
        assert (r.backend.tx_errors, r.backend.tx_frames) == (1, 0)
    finally:
        r.backend.close()


def test_close_joins_the_thread_and_closes_the_fds(memory):
    r = Rig(memory)
    thread, fds = r.backend._thread, (r.backend._fd, r.backend._wake_r, r.backend._wake_w)
    r.backend.close()
    assert not thread.is_alive()
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF
    assert r.host.recv(10) == b""          # the device's end is closed: EOF
    r.host.close()


def test_tx_while_rx_thread_runs_is_consistent(rig):
    """TX on the 'vCPU' (this thread) and RX on the reader at once: every frame arrives once, in order."""
    heads = [rig.rx.add(in_lens=[1526]) for _ in range(16)]
    rig.driver.kick(0)

    def pump() -> None:
        for i in range(16):
            rig.host.send(frame(100 + i))
    t = threading.Thread(target=pump)
    t.start()
    for i in range(16):
        rig.tx.add([HDR + frame(i)])
        rig.driver.kick(1)
        rig.tx.take_used()
    t.join()
    got = [rig.host.recv(2000) for _ in range(16)]
    assert got == [frame(i) for i in range(16)]
    wait_for(lambda: rig.rx.used_idx() == 16, what="16 frames")
    assert [rig.rx.written(h)[12:72] for h in heads] == [frame(100 + i) for i in range(16)]


# --- a real tap, in a private network namespace -----------------------------------------------------
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class NetNs:
    """A network namespace kept alive by an `unshare -n` process, with tap0 (10.0.2.2/24, up) in it.
    enter() moves this thread into it and back (setns: per thread; new sockets and taps belong to the
    namespace they were made in)."""

    SETUP = ("ip link set lo up && echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 && "
             "ip tuntap add tap0 mode tap && ip addr add 10.0.2.2/24 dev tap0 && ip link set tap0 up && "
             "echo ready && exec sleep 600")

    def __init__(self):
        self.proc = subprocess.Popen(["unshare", "-n", "sh", "-c", self.SETUP], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"namespace setup failed: {self.proc.stderr.read().strip()}")
        self.ns_fd = os.open(f"/proc/{self.proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    @contextlib.contextmanager
    def enter(self):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.ns_fd)
            yield
        finally:
            _setns(home)
            os.close(home)

    def run(self, *cmd: str) -> str:
        return subprocess.run(["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *cmd], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def close(self) -> None:
        os.close(self.ns_fd)
        self.proc.kill()
        self.proc.wait(timeout=5)


def _can_unshare() -> str:
    try:
        r = subprocess.run(["unshare", "-n", "ip", "tuntap", "add", "t0", "mode", "tap"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return "" if r.returncode == 0 else (r.stderr.strip() or f"status {r.returncode}")


@pytest.fixture(scope="module")
def netns():
    why = _can_unshare()
    if why:
        pytest.skip(f"cannot make a tap in a private network namespace (unshare -n; needs root): {why}")
    ns = NetNs()
    yield ns
    ns.close()


@pytest.fixture
def tap_rig(netns, memory):
    with netns.enter():
        fd = net.open_tap("tap0")
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        sniff.bind(("tap0", 0))
    sniff.settimeout(5)
    backend = net.VirtioNet("virtio-net0", fd, MAC, "tap0")
    t = VirtioMmio(memory, IrqLine(5), backend)
    driver = GuestDriver(t, memory)
    rx, tx = driver.start(2, 16)
    yield backend, t, driver, rx, tx, sniff
    backend.close()
    sniff.close()


def _incoming(sniff: socket.socket) -> bytes:
    """The next frame that came in on tap0 (from the device), skipping the host's own outgoing ones."""
    while True:
        data, addr = sniff.recvfrom(65536)
        if addr[2] != socket.PACKET_OUTGOING:
            return data


def test_tap_config_check_in_namespace(netns):
    with netns.enter():
        net.check({"tap": "tap0", "mac": None})           # attaches and lets go: no error
        with pytest.raises(net.TapError, match="no such tap device tap9 "):
            net.check({"tap": "tap9", "mac": None})
        fd = net.open_tap("tap0")
        try:
            # A tap (not multiqueue) takes one process: a second attach is a one-line error.
            with pytest.raises(net.TapError, match="cannot attach to tap device tap0: busy"):
                net.open_tap("tap0")
        finally:
            os.close(fd)
    assert "tap9" not in netns.run("ip", "-o", "link")


def _hvm_in(ns: NetNs, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/proc/{ns.proc.pid}/ns/net", sys.executable, "-m", "hvm", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_netdev_end_to_end_in_namespace(netns):
    kernel = str(ROOT / "firmware" / "build" / "mbtest.elf")
    r = _hvm_in(netns, "run", "--kernel", kernel, "--netdev", "tap,ifname=tap0", "--stats", "--timeout", "20")
    assert r.returncode == 1, r.stderr     # mbtest's debug-exit code 0: status (0 << 1) | 1
    assert re.search(r"^device virtio-net0: notifications 0 .* tx_frames 0 .* rx_waits 0$", r.stderr, re.M), r.stderr
    # Two NICs on one (single-queue) tap: the second attach is refused, one line, status 2.
    r = _hvm_in(netns, "run", "--kernel", kernel, "--netdev", "tap,ifname=tap0", "--netdev", "tap,ifname=tap0",
                "--timeout", "20")
    assert (r.returncode, r.stderr) == (2, "hvm: virtio-net1: cannot attach to tap device tap0: busy (attached "
                                           "already: by another process, or another NIC)\n")
    r = _hvm_in(netns, "run", "--kernel", kernel, "--netdev", "tap,ifname=tap7", "--timeout", "20")
    assert (r.returncode, r.stderr) == (2, "hvm: --netdev: no such tap device tap7 (create one: ip tuntap add tap7 "
                                           "mode tap)\n")
    assert "tap7" not in netns.run("ip", "-o", "link")


def test_yaml_and_hvm_qemu_in_namespace(netns, tmp_path):
    kernel = ROOT / "firmware" / "build" / "mbtest.elf"
    vm = tmp_path / "vm.yaml"
    vm.write_text(f"boot: {{kernel: {kernel}}}\ndevices:\n  virtio-net: [{{tap: tap0, mac: '52:54:00:AA:BB:01'}}]\n")
    r = _hvm_in(netns, "run", str(vm), "--stats", "--timeout", "20")
    assert r.returncode == 1 and "device virtio-net0: " in r.stderr, r.stderr
    vm.write_text(f"boot: {{kernel: {kernel}}}\ndevices:\n  virtio-net: [{{tap: tap0, mac: '53:54:00:AA:BB:01'}}]\n")
    r = _hvm_in(netns, "run", str(vm))
    assert (r.returncode, r.stderr) == (2, f"hvm: {vm}: devices.virtio-net[0].mac: 53:54:00:AA:BB:01 is a "
                                           "multicast address (the first octet must be even)\n")
    for net_args in (["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no", "-device",
                      "virtio-net-device,netdev=n0,mac=52:54:00:00:00:09"],
                     ["-nic", "tap,ifname=tap0,model=virtio-net-device"]):
        r = subprocess.run(["nsenter", f"--net=/proc/{netns.proc.pid}/ns/net", sys.executable, "-m", "hvm.qemu_shim",
                            "-kernel", str(kernel), *net_args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr) == (1, ""), r.stderr


def test_tap_tx_and_rx(tap_rig):
    backend, t, driver, rx, tx, sniff = tap_rig
    f = frame(1, 100, dst=b"\xff" * 6)
    tx.add([HDR + f])
    driver.kick(1)
    assert _incoming(sniff) == f
    head = rx.add(in_lens=[1526])
    driver.kick(0)
    g = frame(2, 100)
    sniff.send(g)
    wait_for(lambda: rx.used_idx() == 1, what="a frame from the tap")
    assert rx.take_used() == [(head, 12 + len(g))]
    assert rx.written(head)[12:12 + len(g)] == g


def test_tap_without_rx_buffers_bounded_by_the_kernel_queue(netns, tap_rig):
    """Frames the guest has no buffers for wait in the tap's own queue (txqueuelen), where the kernel drops
    the excess and counts it; hvm keeps one frame and does not spin."""
    backend, t, driver, rx, tx, sniff = tap_rig
    for i in range(1500):
        sniff.send(frame(i))
    wait_for(lambda: backend.rx_waits == 1, what="the reader to wait")
    wakeups = backend.reader_wakeups
    time.sleep(0.3)
    assert backend.reader_wakeups == wakeups
    dropped = json.loads(netns.run("ip", "-j", "-s", "link", "show", "tap0"))[0]["stats64"]["tx"]["dropped"]
    assert dropped >= 1500 - 1000 - 1        # qlen 1000 kept by the kernel, one by hvm, the rest dropped
    heads = [rx.add(in_lens=[1526]) for _ in range(8)]
    driver.kick(0)
    wait_for(lambda: rx.used_idx() == 8, what="8 frames")
    assert [rx.written(h)[12:72] for h in heads] == [frame(i) for i in range(8)]
    assert backend.rx_dropped == 0


# --- flags: --netdev and hvm-qemu's -netdev/-device/-nic ---------------------------------------------
def test_netdev_flag_becomes_virtio_net_entries():
    from hvm.cli import build_parser, overrides_from_args

    args = build_parser().parse_args(["run", "--kernel", "k", "--netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                                      "--netdev", "tap,ifname=tap1,mac=52:54:00:00:00:02"])
    origins: dict = {}
    assert overrides_from_args(args, origins)["devices"]["virtio-net"] == [
        {"tap": "tap0"}, {"tap": "tap1", "mac": "52:54:00:00:00:02"}]
    assert origins["devices.virtio-net[1]"] == "--netdev" and origins["devices.virtio-net[1].mac"] == "--netdev: mac"


@pytest.mark.parametrize("spec, message", [
    ("user,id=n0", "--netdev: 'user': hvm has tap networking only (tap,ifname=NAME[,mac=MAC])"),
    ("tap,id=n0", "--netdev: tap needs ifname=NAME (an existing tap device: ip tuntap add NAME mode tap)"),
    ("tap,ifname=t0,script=/etc/qemu-ifup", "--netdev: script=/etc/qemu-ifup: hvm runs no network scripts "
                                            "(script=no; make and configure the tap beforehand)"),
    ("tap,ifname=t0,vhost=on", "--netdev: 'vhost' is not an option of tap (ifname, mac, id, script=no, downscript=no)"),
    ("tap,ifname", "--netdev: 'ifname' is not OPTION=VALUE"),
])
def test_netdev_flag_errors_are_one_line(spec, message):
    from hvm.cli import build_parser, overrides_from_args
    from hvm.config import ConfigError

    args = build_parser().parse_args(["run", "--kernel", "k", "--netdev", spec])
    with pytest.raises(ConfigError) as e:
        overrides_from_args(args)
    assert str(e.value) == message


def test_qemu_shim_netdev_device_and_nic():
    from hvm.qemu_shim import translate

    args = translate(["-kernel", "k", "-nic", "tap,ifname=tap1,model=virtio-net-device",
                      "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                      "-device", "virtio-net-device,netdev=n0,mac=52:54:00:00:00:01"])
    assert args[args.index("--netdev"):] == ["--netdev", "tap,ifname=tap1", "--netdev",
                                             "tap,ifname=tap0,script=no,downscript=no,mac=52:54:00:00:00:01"]


@pytest.mark.parametrize("argv, message", [
    (["-netdev", "tap,id=n0,ifname=t0"], "-netdev id=n0: no -device virtio-net-device,netdev=n0 uses it"),
    (["-device", "virtio-net-device,netdev=n9"], "-device virtio-net-device: netdev=n9 names no -netdev id"),
    (["-nic", "tap,ifname=t0"], "-nic model=None: hvm's NIC is virtio-net-device (model=virtio-net-device)"),
    (["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"], "-netdev user: hvm has tap networking only"),
])
def test_qemu_shim_net_errors(argv, message):
    from hvm.qemu_shim import ShimError, translate

    with pytest.raises(ShimError) as e:
        translate(["-kernel", "k", *argv])
    assert str(e.value) == message


# --- Linux's own virtio-net driver: DHCP and netconsole over a tap in a private namespace ---------------
LINUX = ROOT / "build" / "linux"
NET_CONFIG = ("CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_IP_PNP_DHCP", "CONFIG_NETCONSOLE")
GUEST_IP, HOST_IP, NETCONSOLE_PORT = "10.0.2.15", "10.0.2.2", 6666


def _kernel_lacks_networking() -> str:
    config = LINUX / "kbuild-minimal" / ".config"
    if not (LINUX / "vmlinux-minimal").exists() or not config.exists():
        return f"no minimal kernel at {LINUX} (make linux)"
    text = config.read_text()
    missing = [c for c in NET_CONFIG if f"\n{c}=y\n" not in text]
    return f"the kernel at {LINUX} lacks {', '.join(missing)} (make linux with the issue-13 config)" if missing else ""


def start_dnsmasq(ns: NetNs, tmp) -> subprocess.Popen:
    """dnsmasq (build/net/dnsmasq: `make net`) serving DHCP on tap0 of the namespace: one address, no DNS,
    no lease file, no ping before an offer (the "guest" answers no ICMP); its log on stdout."""
    return subprocess.Popen(
        ["nsenter", f"--net=/proc/{ns.proc.pid}/ns/net", str(ROOT / "build" / "net" / "dnsmasq"), "--no-daemon",
         "--conf-file=/dev/null", "--port=0", "--interface=tap0", "--bind-interfaces",
         f"--dhcp-range={GUEST_IP},{GUEST_IP},255.255.255.0,1h", "--no-ping", "--no-resolv", "--no-hosts",
         "--leasefile-ro", "--user=root", f"--pid-file={tmp / 'dnsmasq.pid'}", "--log-dhcp"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_dnsmasq(dnsmasq: subprocess.Popen) -> str:
    dnsmasq.terminate()
    try:
        return dnsmasq.communicate(timeout=10)[0].decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        dnsmasq.kill()
        return dnsmasq.communicate()[0].decode("utf-8", "replace")


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def dhcp_discover(mac: bytes, xid: int) -> bytes:
    """A DHCPDISCOVER as a client broadcasts it (Ethernet, IPv4 0.0.0.0 -> 255.255.255.255, UDP 68 -> 67)."""
    bootp = struct.pack(">BBBBIHH4s4s4s4s16s64s128sI", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4),
                        bytes(4), mac + bytes(10), bytes(64), bytes(128), 0x63825363)
    bootp += bytes([53, 1, 1, 255])
    bootp += bytes(300 - len(bootp))
    udp = struct.pack(">HHHH", 68, 67, 8 + len(bootp), 0) + bootp      # UDP checksum 0: none (IPv4)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack(">H", _ip_checksum(ip)) + ip[12:]
    return b"\xff" * 6 + mac + struct.pack(">H", 0x0800) + ip + udp


def dhcp_reply(frame_: bytes, xid: int) -> tuple[int, bytes] | None:
    """(DHCP message type, yiaddr) of a frame that is a DHCP reply for `xid`, else None."""
    if len(frame_) < 14 + 20 + 8 + 240 or frame_[12:14] != b"\x08\x00" or frame_[23] != 17:
        return None
    ihl = (frame_[14] & 15) * 4
    udp = frame_[14 + ihl:]
    if struct.unpack(">H", udp[2:4])[0] != 68:
        return None
    bootp = udp[8:]
    if bootp[0] != 2 or struct.unpack(">I", bootp[4:8])[0] != xid:
        return None
    options, i = bootp[240:], 0
    while i < len(options) and options[i] != 255:
        if options[i] == 0:
            i += 1
            continue
        if options[i] == 53:
            return options[i + 2], bootp[16:20]
        i += 2 + options[i + 1]
    return None


def test_dhcp_through_the_device_and_a_tap(netns, tap_rig, tmp_path):
    """Host side of the Linux test, without Linux: a DHCPDISCOVER sent through the device's transmit queue
    reaches dnsmasq behind tap0, and its DHCPOFFER comes back through the receive queue."""
    if not (ROOT / "build" / "net" / "dnsmasq").exists():
        pytest.skip("no build/net/dnsmasq (make net)")
    backend, t, driver, rx, tx, sniff = tap_rig
    heads = [rx.add(in_lens=[1526]) for _ in range(8)]
    driver.kick(0)
    dnsmasq = start_dnsmasq(netns, tmp_path)
    try:
        offer = None
        deadline = time.monotonic() + 10
        while offer is None and time.monotonic() < deadline:
            tx.add([HDR + dhcp_discover(MAC, 0x1234ABCD)])     # again each second, as a client does
            driver.kick(1)
            tx.take_used()
            second = time.monotonic() + 1
            while offer is None and time.monotonic() < second:
                for head, n in rx.take_used():
                    offer = offer or dhcp_reply(rx.written(head)[12:n], 0x1234ABCD)
                    rx.buffers.pop(head)
                    heads.append(rx.add(in_lens=[1526]))
                    driver.kick(0)
                time.sleep(0.01)
    finally:
        log_text = stop_dnsmasq(dnsmasq)
    assert offer == (2, bytes([10, 0, 2, 15])), log_text        # DHCPOFFER of 10.0.2.15
    assert "DHCPOFFER(tap0) 10.0.2.15 52:54:00:12:34:56" in log_text
    assert backend.tx_frames >= 1 and backend.rx_frames >= 1


@dataclass
class NetBoot:
    status: int
    console: str
    stderr: str
    datagrams: list[bytes]
    dnsmasq_log: str


@pytest.fixture(scope="module")
def linux_net_boot(tmp_path_factory, built_linux):
    """One boot of the minimal kernel with virtio-net on tap0 in a private namespace where dnsmasq serves
    DHCP and a UDP socket listens for netconsole; the /init is UD2 (this host cannot run user space)."""
    why = _kernel_lacks_networking() or _can_unshare()
    if why:
        pytest.skip(why)
    subprocess.run(["make", "-s", "net"], cwd=ROOT, check=True, timeout=600)
    tmp = tmp_path_factory.mktemp("net")
    ns = NetNs()
    nsenter = ["nsenter", f"--net=/proc/{ns.proc.pid}/ns/net"]
    dnsmasq = start_dnsmasq(ns, tmp)
    with ns.enter():
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listener.bind((HOST_IP, NETCONSOLE_PORT))
    datagrams: list[bytes] = []

    def listen() -> None:
        listener.settimeout(0.5)
        while not done.is_set():
            try:
                datagrams.append(listener.recv(4096))
            except socket.timeout:
                continue
            except OSError:
                return
    done = threading.Event()
    listener_thread = threading.Thread(target=listen, daemon=True)
    listener_thread.start()
    try:
        cmdline = (f"console=ttyS0 earlyprintk=serial panic=-1 ip=dhcp "
                   f"netconsole=@{GUEST_IP}/,{NETCONSOLE_PORT}@{HOST_IP}/")
        proc = subprocess.run(
            [*nsenter, sys.executable, "-m", "hvm", "run", "--kernel", str(LINUX / "vmlinux-minimal"),
             "--initrd", str(LINUX / "initramfs-ud2.cpio"), "--append", cmdline, "--memory", "256M",
             "--netdev", "tap,ifname=tap0", "--timeout", "600", "--stats"],
            cwd=ROOT, capture_output=True, timeout=700, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        time.sleep(0.5)     # the last datagrams
    finally:
        done.set()
        listener_thread.join(timeout=5)
        listener.close()
        log_text = stop_dnsmasq(dnsmasq)
        ns.close()
    return NetBoot(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"),
                   datagrams, log_text)


@pytest.mark.slow
def test_linux_dhcp_over_virtio_net(linux_net_boot):
    b = linux_net_boot
    assert "virtio_net" in b.console or "eth0" in b.console, b.console[-3000:]
    # The DHCP exchange needs both directions: DISCOVER/REQUEST transmitted, OFFER/ACK received.
    assert re.search(rf"IP-Config: Got DHCP answer from {re.escape(HOST_IP)}", b.console), b.console[-4000:]
    assert re.search(rf"IP-Config: Complete:.*\n.*device=eth0, hwaddr=52:54:00:12:34:56, ipaddr={GUEST_IP}",
                     b.console), b.console[-4000:]
    assert f"DHCPACK(tap0) {GUEST_IP} 52:54:00:12:34:56" in b.dnsmasq_log, b.dnsmasq_log
    assert "Run /init as init process" in b.console
    assert b.status == 4, b.stderr[-2000:]        # the UD2 /init: the kernel panics, panic=-1 resets


@pytest.mark.slow
def test_linux_netconsole_over_virtio_net(linux_net_boot):
    text = b"".join(linux_net_boot.datagrams).decode("utf-8", "replace")
    assert linux_net_boot.datagrams, linux_net_boot.console[-3000:]
    # Log lines the kernel printed after netconsole started reach the listener as UDP datagrams.
    assert "Run /init as init process" in text, text[-2000:]
    assert "Kernel panic - not syncing" in text, text[-2000:]
