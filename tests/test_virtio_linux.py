"""Linux's own virtio_mmio and virtio_blk drivers against hvm's transport (slow: a Linux boot).

The transport and queues are what is under test, so the disk behind them is a small in-test backend (a
4 MiB in-memory image holding an MBR with one partition; the real virtio-blk device is its own module),
added to the built Machine by hand in a slot of its own, with its `virtio_mmio.device=` on the command line:
"vda: vda1" can only be printed when the kernel probed the device (magic, version, features with
VERSION_1/EVENT_IDX/INDIRECT_DESC, config space capacity), set up the queue, sent a read through the
ring, got the interrupt and found the partition table in the bytes the device wrote. A virtio-rng comes
from the registry (`devices: {virtio-rng: true}`: slot, IRQ and command line from the builder): with
HW_RANDOM_VIRTIO in the kernel it must be fed from, without it the kernel only acknowledges it."""
from __future__ import annotations

import struct
import pytest

from conftest import ROOT
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioBackend, VirtioMmio
from hvm.mmio.virtio import constants as vc

pytestmark = pytest.mark.slow
LINUX = ROOT / "build" / "linux"
BOOT_TIMEOUT = 600
SECTORS = 8192
BLK_BASE, BLK_IRQ = 0xD000_8000, 10     # away from the registry's slots (0xd0000000 + n * 4K, IRQ 5, 6, ...)
RNG_BASE, RNG_IRQ = 0xD000_0000, 5      # the registry's first slot


class TestDisk(VirtioBackend):
    """virtio-blk reads (and GET_ID) from an in-memory image: just enough for the kernel's partition scan."""
    __test__ = False
    device_id = vc.VIRTIO_ID_BLOCK
    queue_max_sizes = (128,)
    name = "test-disk"

    def __init__(self, image: bytes):
        self.image = image
        self.features = None
        self.reads = 0
        self.queues = None

    def config(self) -> bytes:
        return struct.pack("<Q", len(self.image) // 512)      # capacity, in 512-byte sectors

    def activate(self, features, queues, signal):
        self.features, self.queues, self.signal = features, queues, signal

    def reset(self):
        self.queues = None

    def notify(self, index):
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            kind, _, sector = struct.unpack("<IIQ", chain.read(16))
            room = chain.writable_len - 1                      # the last writable byte is the status
            status = 0
            if kind == 0:                                      # VIRTIO_BLK_T_IN
                chain.write(self.image[sector * 512:sector * 512 + room])
                self.reads += 1
            elif kind == 8:                                    # VIRTIO_BLK_T_GET_ID
                chain.write(b"hvm-test-disk".ljust(20, b"\0")[:room])
            else:
                status = 2                                     # VIRTIO_BLK_S_UNSUPP
            chain.write(bytes([status]), offset=room)
            q.push_used(chain, chain.writable_len)
        self.signal(index)


def kernel_has(option: str) -> bool:
    config = LINUX / "kbuild-minimal" / ".config"
    return config.is_file() and f"{option}=y" in config.read_text().splitlines()


def test_linux_virtio_drivers_use_the_transport(built_linux):
    from hvm.config import parse_spec
    from hvm.console import Console
    from hvm.machine import Machine

    kernel, initrd = LINUX / "vmlinux-minimal", LINUX / "initramfs-ud2.cpio"
    assert kernel_has("CONFIG_VIRTIO_MMIO"), "guest/linux/minimal.config lost CONFIG_VIRTIO_MMIO"
    with_rng = kernel_has("CONFIG_HW_RANDOM_VIRTIO")
    image = bytearray(SECTORS * 512)
    image[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 4096)   # one Linux partition
    image[510:512] = b"\x55\xaa"
    cmdline = f"console=ttyS0 panic=-1 virtio_mmio.device=4K@{BLK_BASE:#x}:{BLK_IRQ}"
    spec = parse_spec({"memory": "256M", "timeout": BOOT_TIMEOUT, "devices": {"virtio-rng": True}, "boot": {
        "kernel": str(kernel), "initrd": [str(initrd)], "cmdline": cmdline}})
    with Machine(spec, console=Console("none", "none", open_now=False)) as vm:
        disk = TestDisk(bytes(image))
        blk = VirtioMmio(vm.memory, IrqLine(BLK_IRQ, vm.vm.set_irq_line), disk)
        vm.mmio.register(BLK_BASE, vc.MMIO_SIZE, blk)
        entropy = vm.mmio.find(RNG_BASE).device
        assert isinstance(entropy, VirtioMmio) and entropy.backend.device_id == vc.VIRTIO_ID_RNG
        vm.start()
        found = vm.wait_for_console(b"vda: vda1", timeout=BOOT_TIMEOUT)
        result = vm.wait(BOOT_TIMEOUT + 30)
        console = vm.console.text()
    assert found is not None, console[-3000:]
    assert result is not None
    assert "virtio_blk virtio0: [vda] 8192 512-byte logical blocks (4.19 MB/4.00 MiB)" in console
    wanted = 1 << vc.F_VERSION_1 | 1 << vc.F_RING_EVENT_IDX | 1 << vc.F_RING_INDIRECT_DESC
    assert disk.features is not None and disk.features & wanted == wanted
    assert disk.reads >= 1
    stats = blk.stats()
    assert stats["errors"] == 0 and stats["notifications"] >= 1 and stats["interrupts"] >= 1
    assert blk.status == (vc.STATUS_ACKNOWLEDGE | vc.STATUS_DRIVER | vc.STATUS_FEATURES_OK | vc.STATUS_DRIVER_OK)
    assert blk.interrupt_status == 0 and not blk.irq.level     # every interrupt was acknowledged
    assert f"virtio-mmio.0 at {BLK_BASE:#x}-{BLK_BASE + 0xfff:#x}, IRQ {BLK_IRQ}." in console
    assert f"virtio-mmio.1 at {RNG_BASE:#x}-{RNG_BASE + 0xfff:#x}, IRQ {RNG_IRQ}." in console
    if with_rng:
        assert entropy.backend.bytes_served > 0 and entropy.errors == 0 and entropy.driver_ok
    else:
        # no driver for it: the virtio core reset it and acknowledged it, and no driver went further
        assert entropy.status == vc.STATUS_ACKNOWLEDGE and entropy.backend.bytes_served == 0
