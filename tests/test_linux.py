"""Linux guests: a minimal 6.12 kernel (vmlinux and bzImage) and Debian's stock cloud kernel, built or
fetched by `make linux` from Debian packages. All slow: a Linux boot takes about a minute on the kvm_pvm
host (every guest kernel instruction is emulated there) and the stock kernel 13-22 minutes (measured: "Run /init" after 1296 s with the machine busy).

What is asserted depends on what the host can do, as `hvm doctor` measures it: on kvm_pvm (where these
tests were checked) user space cannot make system calls, so the proof of reaching user space is the
kernel's report of what /init did at its first instruction; where system calls work, the busybox shell
runs a command and powers the VM off."""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ROOT, run_hvm
from hvm.doctor import run_probe

pytestmark = pytest.mark.slow
LINUX = ROOT / "build" / "linux"
BASE_CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1"


@pytest.fixture(scope="module")
def assets():
    subprocess.run(["make", "-s", "linux"], cwd=ROOT, check=True, timeout=3600)
    return LINUX


@pytest.fixture(scope="module")
def syscalls_work() -> bool:
    run = run_probe("syscall")
    return any(((v >> 8) & 0xFF) == ord("S") and (v & 3) == 0 for _, v in run.reports)


def boot(kernel, initrd, timeout, *extra):
    return run_hvm("run", "--kernel", str(kernel), "--initrd", str(initrd), "--append", BASE_CMDLINE,
                   "--memory", "256M", "--timeout", str(timeout), "--stats", *extra, input=b"",
                   timeout=timeout + 60)


def assert_reached_ud2_init(out: str, r):
    assert "Linux version 6." in out
    assert "Run /init as init process" in out
    # /init's first instruction is UD2: the kernel kills it with SIGILL (signal 4) and, init being gone,
    # panics; panic=-1 resets the machine and hvm ends with the panic and the last console lines.
    assert re.search(r"Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004", out), out[-3000:]
    assert r.status == 4
    assert "guest kernel panicked; last console lines:" in r.stderr
    assert re.search(r"^\s+[\d.]+\s+Run /init as init process$", r.stderr, re.M)  # boot milestone in --stats


def test_minimal_vmlinux_reaches_user_space(assets, linux_snapshots):
    # The kernel's boot up to "Write protecting the kernel read-only data" is the session's one boot
    # (conftest.linux_snapshots); this test runs on from its snapshot, in a new process, to user space.
    assert "Linux version 6." in linux_snapshots.late_console
    r = run_hvm("run", "--incoming", f"file:{linux_snapshots.late}", "--timeout", "240", "--stats", input=b"",
                timeout=300)
    assert_reached_ud2_init(linux_snapshots.late_console + r.stdout.decode("utf-8", "replace"), r)


def _linux_yaml_on_a_copy_of_its_disk(tmp_path) -> str:
    """configs/linux.yaml as it is, but its rw root disk a copy: the test leaves build/linux's image alone."""
    import shutil

    import yaml

    config = yaml.safe_load((ROOT / "configs" / "linux.yaml").read_text())
    disk = tmp_path / "rootfs.ext4"
    shutil.copy(ROOT / "build" / "linux" / "rootfs.ext4", disk)
    config["boot"]["kernel"] = str(ROOT / "build" / "linux" / "vmlinux-minimal")
    config["devices"]["virtio-blk"] = [{"file": str(disk)}]
    path = tmp_path / "linux.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_minimal_kernel_with_busybox(assets, syscalls_work, tmp_path):
    config = _linux_yaml_on_a_copy_of_its_disk(tmp_path)
    if syscalls_work:
        # A host where user space can enter the kernel (checked by hvm doctor's probe): a real shell.
        r = run_hvm("run", config, "--timeout", "240", "--serial", "stdio",
                    input=b"echo hvm-shell-$((6*7))\npoweroff -f\n", timeout=300)
        assert "hvm-shell-42" in r.out
        assert r.status == 0
    else:
        # kvm_pvm: the kernel boots, mounts its root disk (virtio-blk) and starts the disk's /init, whose
        # first system call cannot reach the kernel.
        r = run_hvm("run", config, "--timeout", "240", "--stats", timeout=300)
        assert "VFS: Mounted root (ext4 filesystem) on device" in r.out
        assert "Run /init as init process" in r.out
        assert "Kernel panic - not syncing: Attempted to kill init!" in r.out
        assert r.status == 4
        assert "kvm_pvm host: added to the kernel command line:" in r.stderr


def test_minimal_bzimage_boots_through_the_boot_protocol(assets):
    # The compressed form: the decompressor (emulated here, slow) runs from the 64-bit entry and hands over.
    r = boot(LINUX / "bzImage-minimal", LINUX / "initramfs-ud2.cpio", 600)
    assert_reached_ud2_init(r.out, r)


def test_stock_debian_kernel_reaches_user_space(assets):
    r = run_hvm("run", "--kernel", str(LINUX / "vmlinuz-cloud"), "--initrd", str(LINUX / "initramfs-ud2.cpio"),
                "--append", BASE_CMDLINE, "--memory", "512M", "--timeout", "2400", "--stats", timeout=2500)
    assert_reached_ud2_init(r.out, r)
