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
import socket
import struct
import subprocess
import threading
import time

import pytest

from hvm.memory import MiB, GuestMemory
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioMmio
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio import net
from virtio_driver import GuestDriver

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
        self.irq = IrqLine(5)
        self.t = VirtioMmio(memory, self.irq, self.backend)
        self.driver = GuestDriver(self.t, memory)
        self.rx = self.tx = None
        if start_driver:
            self.rx, self.tx = self.driver.start(2, queue_size)

    def close(self) -> None:
        self.backend.close()
        self.host.close()


@pytest.fixture
def memory():
    with GuestMemory(16 * MiB) as mem:
        yield mem


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
