"""virtio-net (virtio 1.x spec 5.1, device ID 1) on an existing host TAP device.

Queues: receiveq (0) and transmitq (1); no control queue, no multiqueue. Features offered: VIRTIO_NET_F_MAC
(the config space's MAC) and VIRTIO_NET_F_STATUS (link always up). No checksum or segmentation offloads
(CSUM, GUEST_CSUM, *_TSO*, *_UFO, MRG_RXBUF are not offered): the guest computes its own checksums and
sends and receives whole frames of at most its MTU, and the tap is opened without IFF_VNET_HDR, so the host
kernel hands us complete frames too. Every buffer starts with the 12-byte virtio 1.x header
(struct virtio_net_hdr_mrg_rxbuf): on TX it is stripped (its offload fields cannot apply: nothing was
negotiated), on RX it is all zero with num_buffers = 1.

TX runs on the vCPU thread at QueueNotify: every chain's frame is written to the tap (non-blocking: a full
tap queue drops the frame, as a NIC would). RX is a reader thread: poll() on the tap and a wake pipe; each
frame goes into the next receive chain under transport.lock and the queue is signalled. When the guest has
no receive buffer the frame is kept (one frame at most) and the thread stops reading the tap until the
guest notifies queue 0, so nothing is buffered beyond that frame: further frames wait in (and are dropped
by) the host kernel's tap queue. Frames arriving while the driver is not running are read and dropped
(counted). While the VM is paused the thread does not touch guest memory (pause() returns only once it
cannot), so a snapshot sees a consistent device; the kept frame is host state and not saved.

A hostile transmit or receive ring is a VirtqueueError: the device needs a reset (the transport's rule).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import select
import socket
import struct
import threading
from typing import Callable

from hvm.mmio.virtio import attach
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.backend import VirtioBackend
from hvm.mmio.virtio.queue import Queue, VirtqueueError

from hvm.boot.errors import BootError
from hvm.mmio.registry import DeviceContext, DeviceType, Prop

log = logging.getLogger(__name__)

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

HDR_LEN = 12              # struct virtio_net_hdr_mrg_rxbuf: virtio 1.x always has num_buffers
ETH_HLEN = 14
MAX_FRAME = 65550         # bytes of one frame (what Linux's virtio-net may send at most: 64 KiB + headers)
QUEUE_SIZE = 256
RX, TX = 0, 1
MAX_WARNINGS = 16

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

_IFNAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}")


class TapError(ValueError):
    """A tap device that cannot be used: one line (config-time errors, status 2)."""


def default_mac(index: int) -> str:
    """QEMU's default MACs: 52:54:00:12:34:56 for the first NIC, then :57, :58, ..."""
    return f"52:54:00:12:34:{(0x56 + index) & 0xFF:02x}"


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a unicast, non-zero address (ValueError, one line, otherwise)."""
    parts = str(text).split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
        raise ValueError(f"{str(text)[:40]!r} is not a MAC address (6 hex octets: 52:54:00:12:34:56)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address (the first octet's low bit is set): a NIC needs a "
                         "unicast one")
    if mac == bytes(6):
        raise ValueError(f"{text} is the all-zero address")
    return mac


def check_ifname(name: str) -> None:
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise TapError(f"{str(name)[:40]!r} is not a network interface name (1-15 letters, digits, . _ - : @ +)")


def check_tap(name: str) -> None:
    """The interface exists in this network namespace. Never creates one: TUNSETIFF on a name that does not
    exist would make a new tap (as root), so the name is looked up first (if_nametoindex asks the calling
    thread's namespace; /sys/class/net would show the namespace sysfs was mounted in)."""
    check_ifname(name)
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise TapError(f"no such tap device {name} (create one: ip tuntap add {name} mode tap)") from None


def open_tap(name: str) -> int:
    """An fd attached to the existing tap `name` (O_NONBLOCK, O_CLOEXEC, IFF_TAP|IFF_NO_PI); TapError
    (one line) when it does not exist or cannot be attached."""
    check_tap(name)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"cannot open /dev/net/tun for tap {name}: {e.strerror}") from None
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        why = {errno.EPERM: "permission denied (the tap belongs to another user or group: "
                            "ip tuntap add NAME mode tap user USER, or run as root)",
               errno.EBUSY: "busy (attached already: by another process, or another NIC)",
               errno.EINVAL: "not a tap device (a tun device, a multiqueue tap or another kind of interface; "
                             "create one: ip tuntap add NAME mode tap)"}.get(e.errno, e.strerror)
        raise TapError(f"cannot attach to tap device {name}: {why}") from None
    return fd


class VirtioNet(VirtioBackend):
    device_id = vc.VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name: str, tap_fd: int, mac: bytes, tap_name: str = "tap", start: bool = True):
        """`tap_fd`: a non-blocking fd whose reads and writes are whole Ethernet frames (a tap, or one end of
        a SOCK_SEQPACKET/SOCK_DGRAM socketpair in tests); the backend owns it from now on."""
        self.name = name
        self.tap_name = tap_name
        self.mac = bytes(mac)
        self._fd = tap_fd
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._queues: list[Queue] = []
        self._signal: Callable[[int], None] | None = None
        self._active = False          # DRIVER_OK and not reset (guarded by transport.lock)
        self._paused = False          # guarded by transport.lock: the reader checks it before any RX write
        self._stop = False
        self._want_buffers = False    # the reader holds a frame and waits for a notify of queue 0
        self._pending: bytes | None = None    # the one frame kept while the guest has no receive buffer
        self._warnings = 0
        # Host-side statistics (not device state): for --stats and tests.
        self.tx_frames = self.tx_bytes = self.tx_dropped = self.tx_errors = 0
        self.rx_frames = self.rx_bytes = self.rx_dropped = 0
        self.rx_waits = 0             # times the reader stopped reading for lack of receive buffers
        self.reader_wakeups = 0       # poll() returns in the reader (a busy loop would show here)
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._reader, name=f"{self.name}-rx", daemon=True)
        self._thread.start()

    # --- helpers -----------------------------------------------------------------------------------
    def _warn(self, fmt: str, *args: object) -> None:
        self._warnings += 1
        level = logging.WARNING if self._warnings <= MAX_WARNINGS else logging.DEBUG
        log.log(level, "%s: " + fmt, self.name, *args)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass          # the pipe is full: the reader has wake-ups waiting already
        except OSError:
            pass          # closed

    # --- the VirtioBackend interface ----------------------------------------------------------------
    def device_features(self) -> int:
        return (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)

    def config(self) -> bytes:
        # struct virtio_net_config: mac[6], status (F_STATUS); max_virtqueue_pairs and mtu need features
        # not offered, so the space ends here.
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def activate(self, features: int, queues: list[Queue], signal: Callable[[int], None]) -> None:
        with self.transport.lock:
            self._queues, self._signal = queues, signal
            self._active = True
        self._wake()

    def reset(self) -> None:
        with self.transport.lock:
            self._queues, self._signal = [], None
            self._active = False
            self._want_buffers = False
        self._wake()    # never a join: reset() may run on the reader itself (NEEDS_RESET from _deliver)

    def notify(self, queue_index: int) -> None:
        if queue_index == TX:
            self._transmit()
        elif queue_index == RX:
            # New receive buffers: the reader may deliver the frame it kept and read on.
            if self._want_buffers:
                self._wake()

    def pause(self) -> None:
        # Under the lock: once this returns, the reader is not inside a delivery and will not start one.
        with self.transport.lock:
            self._paused = True
        self._wake()

    def resume(self) -> None:
        with self.transport.lock:
            self._paused = False
        self._wake()

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.warning("%s: the RX thread did not stop within 5 s", self.name)
                return    # its fds stay open rather than be reused under it
        for fd in (self._fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._wake_r = self._wake_w = -1

    def stats(self) -> dict[str, int]:
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes, "tx_dropped": self.tx_dropped,
                "tx_errors": self.tx_errors, "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
                "rx_dropped": self.rx_dropped, "rx_waits": self.rx_waits}

    # --- TX (vCPU thread, transport.lock held) ------------------------------------------------------
    def _transmit(self) -> None:
        if not self._queues:
            return
        q = self._queues[TX]
        sent = False
        while (chain := q.pop()) is not None:     # VirtqueueError: the transport sets NEEDS_RESET
            n = chain.readable_len - HDR_LEN
            if n < ETH_HLEN or n > MAX_FRAME:
                self.tx_dropped += 1
                self._warn("transmit chain %d of %d bytes dropped (a frame is %d..%d bytes after the %d-byte "
                           "header)", chain.head, chain.readable_len, ETH_HLEN, MAX_FRAME, HDR_LEN)
            else:
                frame = chain.read(n, offset=HDR_LEN)
                try:
                    os.write(self._fd, frame)
                    self.tx_frames += 1
                    self.tx_bytes += n
                except BlockingIOError:
                    self.tx_dropped += 1      # the tap's queue is full: dropped, as a NIC would
                except OSError as e:
                    self.tx_errors += 1
                    self._warn("write to tap %s failed: %s", self.tap_name, e.strerror)
            q.push_used(chain, 0)
            sent = True
        if sent and self._signal is not None:
            self._signal(TX)

    # --- RX (the reader thread) ---------------------------------------------------------------------
    def _deliver(self, frame: bytes) -> bool:
        """Put a frame into the next receive chain. True when the frame is done with (delivered or dropped),
        False when it must wait (no buffer, or paused)."""
        t = self.transport
        with t.lock:
            if self._paused:
                return False
            if not self._active or t.broken or not self._queues or not self._queues[RX].ready:
                self.rx_dropped += 1          # nobody to give it to: a NIC without a driver drops it
                return True
            q = self._queues[RX]
            try:
                chain = q.pop()
            except VirtqueueError as e:
                t.needs_reset(str(e))
                self.rx_dropped += 1
                return True
            if chain is None:
                # Set under the lock notify() takes: a notify after this line sees it and wakes the reader.
                if not self._want_buffers:
                    self.rx_waits += 1
                self._want_buffers = True
                return False
            self._want_buffers = False
            need = HDR_LEN + len(frame)
            if chain.writable_len < need:
                # Without MRG_RXBUF every buffer must take a whole frame; a short one gets nothing (Linux
                # counts a used length below header + Ethernet header as a length error and reuses it).
                self.rx_dropped += 1
                self._warn("receive chain %d holds %d bytes, a %d-byte frame needs %d: dropped", chain.head,
                           chain.writable_len, len(frame), need)
                q.push_used(chain, 0)
            else:
                header = bytes(HDR_LEN - 2) + struct.pack("<H", 1)     # num_buffers = 1
                written = chain.write(header + frame)
                q.push_used(chain, written)
                self.rx_frames += 1
                self.rx_bytes += len(frame)
            if self._signal is not None:
                self._signal(RX)
            return True

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        tap_registered = False
        try:
            while not self._stop:
                want_tap = self._pending is None and not self._paused
                if want_tap != tap_registered:
                    if want_tap:
                        poller.register(self._fd, select.POLLIN)
                    else:
                        poller.unregister(self._fd)
                    tap_registered = want_tap
                events = poller.poll()
                self.reader_wakeups += 1
                for fd, ev in events:
                    if fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                if self._stop:
                    break
                if self._pending is None and tap_registered and any(fd == self._fd for fd, _ in events):
                    try:
                        self._pending = os.read(self._fd, MAX_FRAME + 1)
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        self._warn("read from tap %s failed: %s; receive stops", self.tap_name, e.strerror)
                        return
                    else:
                        if not self._pending:     # end of file (a socket's peer closed): nothing more comes
                            self._pending = None
                            self._warn("tap %s closed; receive stops", self.tap_name)
                            return
                        if len(self._pending) < ETH_HLEN or len(self._pending) > MAX_FRAME:
                            self.rx_dropped += 1
                            self._pending = None
                if self._pending is not None:
                    if self._deliver(self._pending):
                        self._pending = None
        except Exception:   # a bug: say so once; the VM runs on without receive
            log.exception("%s: RX thread failed", self.name)


# --- the device type (CONTRACT.md part A) ------------------------------------------------------------
def check(props: dict) -> None:
    """Config time: the MAC is a unicast one and the tap can be attached (existence, permission, not busy:
    attached and let go again, as nothing else says whether TUNSETIFF would succeed)."""
    if props.get("mac") is not None:
        parse_mac(props["mac"])
    os.close(open_tap(props["tap"]))


def create(ctx: DeviceContext, props: dict) -> object:
    mac = parse_mac(props.get("mac") or default_mac(ctx.index))
    try:
        fd = open_tap(props["tap"])    # checked at config time; it may have gone since (status 2 all the same)
    except TapError as e:
        raise BootError(f"{ctx.name}: {e}") from None
    return attach(ctx, VirtioNet(ctx.name, fd, mac, props["tap"]))


DEVICE = DeviceType(
    name="virtio-net", aliases=("virtio-net-device",), multiple=True, virtio=True, create=create, check=check,
    # A host tap named in a snapshot is a host resource a crafted file could point at (as a disk path):
    # a VM with a NIC is not saved; a restore never attaches to a tap it did not get from the user.
    snapshot=False,
    props=(Prop("tap", "str", alias="ifname", help="an existing host tap device (ip tuntap add NAME mode tap)"),
           Prop("mac", "mac", None, help="the NIC's MAC (default 52:54:00:12:34:56, :57, ... by index)")),
    help="virtio network card on an existing host tap device (no checksum/TSO offloads)")
