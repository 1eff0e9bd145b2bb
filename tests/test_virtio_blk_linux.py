"""virtio-blk (hvm/mmio/virtio/blk.py) proved by Linux's own virtio_blk and ext4 (slow: a Linux boot each).

The minimal kernel mounts an ext4 image from --drive as its root (`root=/dev/vda`) and runs the image's
/init, which is build/linux/ud2init: its first instruction is ud2, so (this host's guests cannot make
system calls anyway) init dies at once and the kernel panics "Attempted to kill init! exitcode=0x00000004".
That panic can only come from a /init read from the disk and executed: there is no initramfs.

rw: the mount writes the superblock (mount count, mount time, state) and ext4's commit flushes it
(FLUSH/FUA as VIRTIO_BLK_T_FLUSH): the bytes reach the host file. ro with readonly=on: the device offers
VIRTIO_BLK_F_RO, the kernel mounts read-only and the host file keeps every byte.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess

import pytest

from conftest import LINUX_CMDLINE, ROOT, run_hvm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("built_linux")]
LINUX = ROOT / "build" / "linux"
KERNEL = LINUX / "vmlinux-minimal"
UD2INIT = LINUX / "ud2init"
BOOT_TIMEOUT = 900        # ~40 s on an idle host; minutes when other guests share its 2 cores
SUPERBLOCK = 1024
PANIC = "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004"


def ext4_image(tmp_path) -> "tuple":
    if shutil.which("mke2fs") is None:
        pytest.skip("mke2fs (e2fsprogs) is not installed")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(UD2INIT, root / "init")
    (root / "init").chmod(0o755)
    image = tmp_path / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-F", str(image), "16M"], check=True,
                   capture_output=True, timeout=60)
    return image


def superblock(image) -> tuple[int, int, int]:
    """ext4's s_mtime (last mount time), s_mnt_count and s_state."""
    with open(image, "rb") as f:
        f.seek(SUPERBLOCK)
        sb = f.read(1024)
    mtime, = struct.unpack_from("<I", sb, 0x2C)
    mnt_count, = struct.unpack_from("<H", sb, 0x34)
    magic, state = struct.unpack_from("<HH", sb, 0x38)
    assert magic == 0xEF53
    return mtime, mnt_count, state


def counters(stderr: str) -> dict[str, int]:
    m = re.search(r"^device virtio-blk0: (.*)$", stderr, re.M)
    assert m, stderr
    words = m.group(1).split()
    return {k: int(v) for k, v in zip(words[::2], words[1::2])}


def boot(image, *, readonly: bool) -> "object":
    mode = "ro" if readonly else "rw"
    drive = f"file={image},format=raw,if=virtio" + (",readonly=on" if readonly else "")
    return run_hvm("run", "--kernel", str(KERNEL), "-m", "256M", "--append",
                   f"{LINUX_CMDLINE} root=/dev/vda {mode} init=/init", "--drive", drive, "--stats",
                   "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 60)


def test_linux_mounts_ext4_rw_runs_its_init_and_the_superblock_write_reaches_the_file(tmp_path):
    image = ext4_image(tmp_path)
    mtime0, count0, _ = superblock(image)
    assert mtime0 == 0 and count0 == 0               # mke2fs never mounted it
    r = boot(image, readonly=False)
    out = r.stdout.decode(errors="replace")
    assert "virtio_blk virtio0: [vda] 32768 512-byte logical blocks" in out, out[-3000:]
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem \S+ r/w", out), out[-3000:]
    assert PANIC in out, out[-3000:]
    assert r.status == 4, r.stderr
    mtime, count, _ = superblock(image)
    assert count == count0 + 1 and mtime > 0         # the rw mount's superblock write is in the host file
    stats = counters(r.stderr)
    assert stats["writes"] > 0 and stats["flushes"] > 0 and stats["ioerrs"] == 0, stats


def test_linux_mounts_a_readonly_disk_read_only_and_the_file_is_unchanged(tmp_path):
    image = ext4_image(tmp_path)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    r = boot(image, readonly=True)
    out = r.stdout.decode(errors="replace")
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem \S+ ro ", out), out[-3000:]
    assert PANIC in out, out[-3000:]
    assert r.status == 4, r.stderr
    stats = counters(r.stderr)
    assert stats["reads"] > 0 and stats["writes"] == 0 and stats["ioerrs"] == 0, stats
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
