"""Snapshot and restore (hvm/snapshot/, Machine.snapshot/restore, `hvm run --incoming file:PATH`).

The counting guest (firmware/count.S) prints 0, 1, 2, ... one number per line and, given a limit in EDI,
"done" and debug-exit status 43: any byte lost or repeated across a snapshot shows in the combined output.
"""
from __future__ import annotations

import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

from conftest import FIRMWARE, run_hvm, write_yaml
from hvm.config import load_config
from hvm.console import Console
from hvm.machine import Machine
from hvm.snapshot import SnapshotError, SnapshotFile
from hvm.snapshot.format import FLAG_MEMORY, HEADER_SIZE

COUNT = 60
EXPECTED = "".join(f"{i}\n" for i in range(COUNT)) + "done\n"
STATUS = 43                      # the count guest's debug-exit (0x15 << 1 | 1)
MSR_IA32_TSC = 0x10


def count_yaml(tmp_path: Path, limit: int = COUNT, timeout: int = 20) -> Path:
    return write_yaml(tmp_path, f"""
name: count
memory: 16M
timeout: {timeout}
boot:
  image: {FIRMWARE / 'count.bin'}
  mode: real
  regs: {{rdi: {limit}}}
devices:
  serial: stdio
""", "count.yaml")


def quiet() -> Console:
    return Console("none", "none", open_now=False)


def snapshot_at(tmp_path: Path, line: bytes, name: str = "vm.snap", resume: bool = False):
    """Run the count guest until `line` is printed, snapshot it; returns (path, console text at the save,
    the machine's whole output once it ran on to its end when resume=True)."""
    path = tmp_path / name
    with Machine(load_config(count_yaml(tmp_path)), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(line, timeout=15)
        vm.snapshot(path, resume=resume)
        at_save = bytes(vm.console.history).decode()
        rest = None
        if resume:
            result = vm.wait(20)
            assert result is not None and result.status == STATUS
            rest = bytes(vm.console.history).decode()
        else:
            vm.stop()
    return path, at_save, rest


def restore_cli(path: Path, *extra: str):
    return run_hvm("run", "--incoming", f"file:{path}", *extra)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


# --- the guest -------------------------------------------------------------------------------------------
def test_count_guest_counts_to_its_limit(tmp_path):
    r = run_hvm("run", str(count_yaml(tmp_path)))
    assert r.out == EXPECTED
    assert r.status == STATUS


# --- snapshot and restore ------------------------------------------------------------------------------------
def test_python_snapshot_restored_in_a_new_process_continues_the_count(tmp_path):
    path, before, _ = snapshot_at(tmp_path, b"\n10\n")
    assert before.startswith("0\n1\n") and len(before) < len(EXPECTED)
    r = restore_cli(path)
    assert r.status == STATUS, r.stderr
    assert before + r.out == EXPECTED       # no byte lost, none repeated
    assert r.stderr == ""


def test_restore_twice_from_one_file_gives_the_same_output(tmp_path):
    path, before, _ = snapshot_at(tmp_path, b"\n20\n")
    first, second = restore_cli(path), restore_cli(path)
    assert first.status == second.status == STATUS
    assert first.out == second.out
    assert before + first.out == EXPECTED


def test_snapshot_with_resume_runs_on_and_the_file_continues_from_the_save(tmp_path):
    path, before, whole = snapshot_at(tmp_path, b"\n15\n", resume=True)
    assert whole == EXPECTED                 # the saved VM ran on to its end, nothing lost at the save
    r = restore_cli(path)
    assert before + r.out == EXPECTED


def test_snapshot_of_a_paused_vm(tmp_path):
    path = tmp_path / "paused.snap"
    with Machine(load_config(count_yaml(tmp_path)), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n5\n", timeout=15)
        vm.pause()
        at_pause = bytes(vm.console.history)
        time.sleep(0.2)
        assert bytes(vm.console.history) == at_pause        # paused: no output
        vm.snapshot(path)
        time.sleep(0.1)
        assert bytes(vm.console.history) == at_pause        # still stopped after the save
        assert vm.state == "paused" and vm.run_state == "postmigrate"
        vm.resume()
        result = vm.wait(20)
        assert result.status == STATUS
        assert bytes(vm.console.history).decode() == EXPECTED
    r = restore_cli(path)
    assert at_pause.decode() + r.out == EXPECTED


def test_restored_vm_snapshotted_again_from_python_then_restored_by_the_cli(tmp_path):
    """A restored VM (memory mapped from the first file) saved mid-count to a second file: the chain
    first run -> Machine.restore -> snapshot -> `hvm run --incoming` prints every number once."""
    first, before, _ = snapshot_at(tmp_path, b"\n10\n", "first.snap")
    second = tmp_path / "second.snap"
    vm = Machine.restore(first, console=quiet(), timeout=20)
    with vm:
        assert vm.run_state == "inmigrate"
        vm.start()
        vm.wait_for_console(b"\n30\n", timeout=15)
        vm.snapshot(second)
        middle = bytes(vm.console.history).decode()
        vm.stop()
    r = restore_cli(second)
    assert r.status == STATUS
    assert before + middle + r.out == EXPECTED


def test_save_load_save_gives_identical_sections(tmp_path):
    """A restored, never started machine saved again is the same file section by section, except what
    runs with host time: the kvmclock base and the TSC (kvm_pvm reads the host's TSC whatever is set)."""
    path, _, _ = snapshot_at(tmp_path, b"\n10\n")
    again = tmp_path / "again.snap"
    with Machine.restore(path, console=quiet()) as vm:
        vm.snapshot(again)
    with SnapshotFile(path) as a, SnapshotFile(again) as b:
        assert list(a.sections) == list(b.sections)
        for name, sa in a.sections.items():
            sb = b.sections[name]
            if name == "vm":
                va, vb = dict(a.vm_state), dict(b.vm_state)
                va.pop("clock"), vb.pop("clock")
                assert va == vb
            elif name.startswith("vcpu"):
                va, vb = a.vcpu_states[int(name[4:])], b.vcpu_states[int(name[4:])]
                strip = lambda s: {**s, "msrs": [m for m in s["msrs"] if m[0] != MSR_IA32_TSC]}
                assert strip(va) == strip(vb)
            else:   # description, devices, memmap, and the memory (its crc over the written runs)
                assert (sa.length, sa.crc, sa.aux, sa.flags) == (sb.length, sb.crc, sb.aux, sb.flags), name
                if not sa.flags & FLAG_MEMORY:
                    assert a.raw_section(name) == b.raw_section(name), name
        assert a.memory == b.memory


def test_memory_is_sparse_and_mapped_copy_on_write(tmp_path):
    path, _, _ = snapshot_at(tmp_path, b"\n3\n")
    st = os.stat(path)
    assert st.st_size > 16 << 20                    # the whole 16 MiB region is in the file's length
    assert st.st_blocks * 512 < 1 << 20             # but only the touched pages are written
    with SnapshotFile(path) as snap:
        (image,) = snap.memory
        assert image.offset % 4096 == 0
        assert sum(n for _, n in image.extents) < 64 << 10
    before = path.read_bytes()
    with Machine.restore(path, console=quiet(), timeout=20) as vm:
        assert mapped(path)                          # guest RAM is the file, mapped
        vm.start()
        assert vm.wait(20).status == STATUS
    assert path.read_bytes() == before               # MAP_PRIVATE: the guest's writes never reach the file
    assert not mapped(path)


def test_a_failed_save_leaves_no_file_and_the_vm_running(tmp_path, monkeypatch):
    import hvm.snapshot.format as fmt

    target = tmp_path / "keep.snap"
    target.write_bytes(b"an older snapshot")
    with Machine(load_config(count_yaml(tmp_path)), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n3\n", timeout=15)
        with pytest.raises(SnapshotError, match="no-such-dir"):
            vm.snapshot(tmp_path / "no-such-dir" / "x.snap")

        def full_disk(sections):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(fmt, "_header", full_disk)
        with pytest.raises(SnapshotError, match=r"keep.snap: cannot write the snapshot: No space left on device"):
            vm.snapshot(target)
        assert vm.state == "running"                 # resumed after the failed save
        result = vm.wait(20)
        assert result.status == STATUS and bytes(vm.console.history).decode() == EXPECTED
    assert target.read_bytes() == b"an older snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count.yaml", "keep.snap"]   # no temp file left


def test_snapshot_of_an_ended_vm_is_refused(tmp_path):
    with Machine(load_config(count_yaml(tmp_path, limit=3)), console=quiet()) as vm:
        assert vm.run().status == STATUS
        with pytest.raises(SnapshotError, match="the VM has ended"):
            vm.snapshot(tmp_path / "x.snap")
    assert not (tmp_path / "x.snap").exists()


def test_system_reset_starts_the_guest_again(tmp_path):
    events = []
    with Machine(load_config(count_yaml(tmp_path)), console=quiet()) as vm:
        vm.add_listener(lambda e, d: events.append((e, d)))
        vm.start()
        vm.wait_for_console(b"\n7\n", timeout=15)
        vm.system_reset()
        result = vm.wait(20)
        text = bytes(vm.console.history).decode()
    assert result.status == STATUS
    first, _, again = text.partition("\n0\n")            # the count starts over from 0
    assert EXPECTED.startswith(first + "\n") and first.count("\n") >= 7    # 0..7 (or a little more)
    assert "0\n" + again == EXPECTED
    assert ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}) in events


# --- bad files: one line, status 2, nothing left open ------------------------------------------------------
@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    path, before, _ = snapshot_at(tmp, b"\n10\n")
    return path, before


def refused(path: Path, pattern: str) -> str:
    """Machine.restore refuses `path` with a SnapshotError matching `pattern`, leaving no fd or mapping."""
    fds = open_fds()
    with pytest.raises(SnapshotError, match=pattern) as info:
        Machine.restore(path, console=quiet())
    assert open_fds() == fds
    assert not mapped(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_truncated_files_are_refused(tmp_path, good_snapshot):
    good, _ = good_snapshot
    data = good.read_bytes()
    with SnapshotFile(good) as snap:
        offsets = sorted({s.offset + s.length // 2 for s in snap.sections.values()} | {s.offset for s in
                          snap.sections.values()})
    cut = tmp_path / "cut.snap"
    for n in [0, 4, 8, 100, HEADER_SIZE - 1, HEADER_SIZE, *offsets, len(data) - 4096, len(data) - 1]:
        cut.write_bytes(data[:n])
        refused(cut, r"truncated|not an hvm snapshot|checksum")
    cut.write_bytes(data[:HEADER_SIZE + 10])
    r = restore_cli(cut)
    assert r.status == 2 and r.out == ""
    assert r.stderr.strip().count("\n") == 0 and "truncated" in r.stderr


def test_a_flipped_byte_in_any_section_is_refused(tmp_path, good_snapshot):
    good, _ = good_snapshot
    data = good.read_bytes()
    with SnapshotFile(good) as snap:
        sections = dict(snap.sections)
        (image,) = snap.memory
    spots = {"header magic": 0, "header version": 8, "header table": 70, "header crc": HEADER_SIZE - 1}
    for name, sec in sections.items():
        if sec.flags & FLAG_MEMORY:
            off, n = image.extents[0]
            spots["memory data"] = sec.offset + off + n // 2
            spots["memory hole"] = sec.offset + image.size - 4096 + 7      # a page saved as zero
        else:
            spots[name] = sec.offset + sec.length // 2
    bad = tmp_path / "bad.snap"
    for where, at in spots.items():
        flipped = bytearray(data)
        flipped[at] ^= 0x40
        bad.write_bytes(flipped)
        refused(bad, r"checksum|not an hvm snapshot|format version|not zero|saved as zero")
    bad.write_bytes(data)
    with open(bad, "r+b") as f:        # one CLI run: one line, status 2, the guest never started
        f.seek(sections["devices"].offset)
        f.write(b"X")
    r = restore_cli(bad)
    assert r.status == 2 and r.out == ""
    assert r.stderr == f"hvm: {bad}: section devices: checksum mismatch (the file is corrupted)\n"


def test_padding_and_appended_bytes_are_refused(tmp_path, good_snapshot):
    good, _ = good_snapshot
    data = good.read_bytes()
    with SnapshotFile(good) as snap:
        meta_end = max(s.offset + s.length for s in snap.sections.values() if not s.flags & FLAG_MEMORY)
        mem_start = min(s.offset for s in snap.sections.values() if s.flags & FLAG_MEMORY)
    assert mem_start > meta_end                          # there is padding to corrupt
    bad = tmp_path / "bad.snap"
    flipped = bytearray(data)
    flipped[(meta_end + mem_start) // 2] ^= 1
    bad.write_bytes(flipped)
    refused(bad, "the padding before section mem0 is not zero")
    bad.write_bytes(data + b"\0")
    refused(bad, "1 bytes after the last section")


def test_foreign_and_future_files_are_refused(tmp_path, good_snapshot):
    good, _ = good_snapshot
    data = bytearray(good.read_bytes())
    foreign = tmp_path / "foreign.snap"
    foreign.write_bytes(b"QFI\xfb" + bytes(8000))       # a qcow2 header, say
    assert "not an hvm snapshot" in refused(foreign, "not an hvm snapshot")
    future = tmp_path / "future.snap"
    struct.pack_into("<I", data, 8, 99)                  # format version 99, with a valid header crc
    struct.pack_into("<I", data, HEADER_SIZE - 4, zlib.crc32(bytes(data[:HEADER_SIZE - 4])))
    future.write_bytes(data)
    assert "format version 99" in refused(future, "newer than this hvm reads")
    for path, text in ((foreign, "not an hvm snapshot"), (future, "newer than this hvm reads (1)")):
        r = restore_cli(path)
        assert r.status == 2 and r.out == "" and text in r.stderr and r.stderr.count("\n") == 1


def test_incoming_cli_errors(tmp_path, good_snapshot):
    good, _ = good_snapshot
    cases = [
        (["--incoming", str(good)], "hvm: --incoming: '" + str(good) + "' is not file:PATH (hvm restores from "
                                    "files only)\n"),
        (["--incoming", "tcp:localhost:4444"], "is not file:PATH"),
        (["--incoming", f"file:{tmp_path}/missing.snap"], f"hvm: {tmp_path}/missing.snap: No such file or "
                                                          "directory\n"),
        (["--incoming", f"file:{tmp_path}"], "not a regular file"),
        (["--incoming", f"file:{good}", "--memory", "64M"], "hvm: --incoming: --memory cannot be given: the "
                                                            "snapshot carries the VM description\n"),
        (["--incoming", f"file:{good}", "--serial", "tty"], "hvm: --serial: 'tty' is not one of"),
    ]
    for args, text in cases:
        r = run_hvm("run", *args)
        assert r.status == 2 and r.out == "", (args, r.stderr)
        assert text in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)


def test_incoming_takes_new_console_timeout_and_stats(tmp_path, good_snapshot):
    good, before = good_snapshot
    log = tmp_path / "console.txt"
    r = restore_cli(good, "--serial", f"file:{log}", "--stats")
    assert r.status == STATUS and r.out == ""
    assert before + log.read_text() == EXPECTED
    assert "exits:" in r.stderr
    r = restore_cli(good, "--timeout", "0.05")
    assert r.status == 124 and "timeout: the guest was still running after 0.05 s" in r.stderr


# --- Linux ------------------------------------------------------------------------------------------------
STAMP = re.compile(r"^\[\s*[0-9.]+\] ?", re.M)
NUMBERISH = re.compile(r"\S*\d\S*")
LATER_LINES = ("Serial: 8250/16550 driver", "Freeing unused kernel image", "Run /init as init process",
               "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004")


@pytest.mark.slow
def test_linux_snapshotted_mid_boot_continues_to_the_same_lines(linux_snapshots):
    """The minimal kernel saved a third of the way into its boot (conftest.linux_snapshots), restored in a
    new process: the console goes on where it stopped and prints the lines the uninterrupted boot printed
    after that point, in the same order, to the same end (printk time stamps aside: the restored kernel's
    clock runs on from the save)."""
    snaps = linux_snapshots
    assert snaps.status == 4
    r = run_hvm("run", "--incoming", f"file:{snaps.mid}", "--timeout", "240", input=b"", timeout=300)
    assert r.status == 4, r.stderr[-2000:]
    combined = snaps.mid_console + r.out
    before = len(snaps.mid_console)
    assert snaps.console.startswith(snaps.mid_console)
    # Words with digits masked: time values (sched_clock's), user-space addresses (randomized) differ run to run.
    masked = lambda text: [NUMBERISH.sub("#", line) for line in STAMP.sub("", text).splitlines()]   # noqa: E731
    assert masked(r.out) == masked(snaps.console[before:])
    positions = [combined.find(line, before) for line in LATER_LINES]
    assert -1 not in positions and positions == sorted(positions)


def test_snapshot_from_a_cli_script_then_incoming(tmp_path):
    """The CLI path: `hvm run` with a `script:` whose snapshot step saves mid-count (and runs on), then
    `hvm run --incoming` in a new process: both outputs are the count, the second from where it was saved."""
    snap = tmp_path / "cli.snap"
    cfg = count_yaml(tmp_path)
    cfg.write_text(cfg.read_text() + f'script:\n  - expect: "\\n12\\n"\n  - snapshot: {snap}\n  - exit: {STATUS}\n')
    first = run_hvm("run", str(cfg))
    assert first.status == STATUS, first.stderr
    assert first.out == EXPECTED
    second = restore_cli(snap)
    assert second.status == STATUS
    assert second.out.endswith("done\n") and len(second.out) <= len(EXPECTED) - len("0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n")
    assert EXPECTED.endswith("\n" + second.out)          # a whole-line suffix: no gap, no repeat


def test_restore_needs_no_config_and_no_boot_image(tmp_path):
    """The file carries the VM description and its memory: the image it booted from may be gone."""
    import shutil

    image = tmp_path / "count-copy.bin"
    shutil.copy(FIRMWARE / "count.bin", image)
    cfg = count_yaml(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(FIRMWARE / "count.bin"), str(image)))
    path = tmp_path / "vm.snap"
    with Machine(load_config(cfg), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n4\n", timeout=15)
        vm.snapshot(path)
        before = vm.console.text()
        vm.stop()
    image.unlink()
    cfg.unlink()
    r = restore_cli(path)
    assert r.status == STATUS and before + r.out == EXPECTED


def test_system_reset_of_a_restored_vm(tmp_path):
    """A restored VM's RAM is the snapshot file, mapped copy-on-write: a reset replaces it with zeroed
    anonymous memory at the same addresses and boots the image again; the file is left as it was."""
    path, _, _ = snapshot_at(tmp_path, b"\n30\n")
    before = path.read_bytes()
    with Machine.restore(path, console=quiet(), timeout=20) as vm:
        vm.start()
        vm.wait_for_console(b"\n40\n", timeout=15)
        vm.system_reset()
        assert not mapped(path)                          # RAM no longer the file
        result = vm.wait(20)
        text = vm.console.text()
    assert result.status == STATUS
    head, _, again = text.partition("\n0\n")
    assert head.startswith("31\n") and "0\n" + again == EXPECTED
    assert path.read_bytes() == before


def test_system_reset_refused_when_the_boot_image_is_gone(tmp_path):
    import shutil

    image = tmp_path / "count-copy.bin"
    shutil.copy(FIRMWARE / "count.bin", image)
    cfg = count_yaml(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(FIRMWARE / "count.bin"), str(image)))
    with Machine(load_config(cfg), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n3\n", timeout=15)
        image.unlink()
        with pytest.raises(RuntimeError, match="cannot reset: the boot image .* is not readable any more"):
            vm.system_reset()
        assert vm.run_state == "running"                 # untouched: it counts on to its end
        assert vm.wait(20).status == STATUS
        assert vm.console.text() == EXPECTED


def test_the_pagemap_scan_finds_the_same_pages_as_reading_all_of_them():
    """Saving skips the blocks /proc/self/pagemap shows were never touched (or were dropped); what it
    writes must be exactly the non-zero pages a full read finds."""
    import mmap

    from hvm.memory import GuestMemory
    from hvm.snapshot.format import _nonzero_runs, _untouched_blocks

    with GuestMemory(64 << 20) as mem:
        mem.write(0x100000, b"x" * 10000)                      # two runs, one across a page boundary
        mem.write((64 << 20) - 4096, b"y")                     # the last page
        mem.write(0x800000, b"z" * 8192)                       # written, then dropped: reads as zeros
        mem.regions[0].mapping.madvise(mmap.MADV_DONTNEED, 0x800000, 8192)
        mem.write(0x900000, bytes(4096))                       # touched but zero: not saved
        region = mem.regions[0]
        untouched = _untouched_blocks(region.host_addr, region.size)
        assert untouched is not None and untouched.count(0) <= 4
        fast = list(_nonzero_runs(region.mapping, region.size, untouched))
        assert fast == list(_nonzero_runs(region.mapping, region.size))
        assert fast == [(0x100000, 12288), ((64 << 20) - 4096, 4096)]


def test_the_scan_of_a_restored_vm_finds_the_same_pages_as_reading_all_of_them(tmp_path):
    """A restored VM's RAM is the file, mapped: a page not touched since may still hold the file's data.
    The scan skips only blocks with no touched page and no data in the file."""
    from hvm.snapshot.format import _nonzero_runs, _skippable_blocks

    path, _, _ = snapshot_at(tmp_path, b"\n5\n")
    with Machine.restore(path, console=quiet(), timeout=20) as vm:
        vm.start()
        vm.wait_for_console(b"\n9\n", timeout=15)
        vm.pause()
        region = vm.memory.regions[0]
        vm.memory.write(0xA00000, b"new page")                  # a page only the restored VM wrote
        skip = _skippable_blocks(region, vm.memory.file_backed)
        assert vm.memory.file_backed and skip is not None and skip.count(0) < len(skip)
        fast = list(_nonzero_runs(region.mapping, region.size, skip))
        assert fast == list(_nonzero_runs(region.mapping, region.size))
        assert (0xA00000, 4096) in fast
        vm.stop()


# --- a save against close() and resume() on other threads (review) ----------------------------------------------
def _held_save(monkeypatch):
    """Replace the save with one that waits for `release` and then reads guest RAM (as the real one does)."""
    import hvm.snapshot as snapmod

    started, release, seen = threading.Event(), threading.Event(), {}

    def held(machine, path):
        started.set()
        assert release.wait(10)
        seen["ram"] = bytes(machine.memory.regions[0].mapping[:16])   # still mapped, not closed under us
        return 0
    monkeypatch.setattr(snapmod, "save_machine", held)
    return started, release, seen


def _in_thread(fn) -> tuple[threading.Thread, list]:
    errors: list = []

    def run():
        try:
            fn()
        except BaseException as e:
            errors.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_close_waits_for_a_save_on_another_thread(tmp_path, monkeypatch):
    started, release, seen = _held_save(monkeypatch)
    vm = Machine(load_config(count_yaml(tmp_path)), console=quiet())
    vm.start()
    vm.wait_for_console(b"\n3\n", timeout=15)
    saver, save_errors = _in_thread(lambda: vm.snapshot(tmp_path / "x.snap"))
    assert started.wait(10)
    closer, close_errors = _in_thread(vm.close)
    time.sleep(0.5)
    assert closer.is_alive()            # close() waits: the save still reads guest memory
    assert vm.memory is not None
    release.set()
    saver.join(10)
    closer.join(10)
    assert not saver.is_alive() and not closer.is_alive()
    assert save_errors == [] and close_errors == []
    assert len(seen["ram"]) == 16
    assert vm.memory is None and vm.vcpus == []


def test_a_resume_from_another_thread_waits_for_the_save(tmp_path, monkeypatch):
    started, release, _ = _held_save(monkeypatch)
    with Machine(load_config(count_yaml(tmp_path)), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n3\n", timeout=15)
        saver, save_errors = _in_thread(lambda: vm.snapshot(tmp_path / "x.snap"))
        assert started.wait(10)
        at_save = bytes(vm.console.history)
        resumer, resume_errors = _in_thread(vm.resume)     # QMP cont, a script's resume step
        time.sleep(0.5)
        assert resumer.is_alive() and vm.run_state == "paused"
        assert bytes(vm.console.history) == at_save        # the vCPUs did not run during the save
        release.set()
        saver.join(10)
        resumer.join(10)
        assert save_errors == [] and resume_errors == []
        assert vm.run_state == "running"                    # postmigrate, then resumed
        result = vm.wait(20)
        assert result.status == STATUS and bytes(vm.console.history).decode() == EXPECTED


# --- crafted files with valid checksums: values out of range (review) -----------------------------------------
def rebuild(src: Path, dst: Path, mutate) -> Path:
    """`src` with its metadata sections decoded, changed by `mutate(sections)`, and written back with valid
    checksums (memory sections copied as they are)."""
    from hvm.snapshot.codec import decode, encode
    from hvm.snapshot.format import Section, _align, _header

    with SnapshotFile(src) as f:
        ordered = sorted(f.sections.values(), key=lambda s: s.offset)
        meta = {s.name: decode(f.raw_section(s.name)) for s in ordered if not s.flags & FLAG_MEMORY}
        mems = [(s, f.raw_section(s.name)) for s in ordered if s.flags & FLAG_MEMORY]
    mutate(meta)
    sections, pos = [], HEADER_SIZE
    with open(dst, "wb") as out:
        for name, value in meta.items():
            data = encode(value)
            out.seek(pos)
            out.write(data)
            sections.append(Section(name, pos, len(data), 0, zlib.crc32(data)))
            pos += len(data)
        pos = _align(pos)
        for s, data in mems:
            out.seek(pos)
            out.write(data)
            sections.append(Section(s.name, pos, s.length, s.aux, s.crc, s.flags))
            pos += s.length
        out.truncate(pos)
        out.seek(0)
        out.write(_header(sections))
    return dst


def _spec(change):
    return lambda m: change(m["description"]["spec"])


@pytest.mark.parametrize("name, mutate, pattern", [
    ("mp_state", lambda m: m["vcpu0"].__setitem__("mp_state", 1 << 40), "section vcpu0: .*mp_state or msrs"),
    ("mp_state_negative", lambda m: m["vcpu0"].__setitem__("mp_state", -1), "section vcpu0: .*mp_state or msrs"),
    ("msr_value", lambda m: m["vcpu0"]["msrs"].append([0x10, 1 << 70]), "section vcpu0: .*mp_state or msrs"),
    ("msr_index", lambda m: m["vcpu0"]["msrs"].append([1 << 40, 1]), "section vcpu0: .*mp_state or msrs"),
    ("serial_irq", _spec(lambda s: s["serial"].__setitem__("irq", 1 << 40)), "field 'serial' is out of range"),
    ("serial_sink", _spec(lambda s: s["serial"].__setitem__("output", "bogus")), "field 'serial' is out of range"),
    ("machine", _spec(lambda s: s.__setitem__("machine", "weird")), "field 'machine' is out of range"),
    ("debug_exit", _spec(lambda s: s["debug_exit"].__setitem__("size", 3)), "field 'debug_exit' is out of range"),
    ("memory", _spec(lambda s: s.__setitem__("memory", 4096)), "field 'memory' is out of range"),
    ("boot_reg", _spec(lambda s: s["boot"].__setitem__("regs", [["rdi", 1 << 80]])), "field 'boot' is out of range"),
])
def test_values_out_of_range_are_refused_with_one_line(tmp_path, good_snapshot, name, mutate, pattern):
    path = rebuild(good_snapshot[0], tmp_path / f"{name}.snap", mutate)
    refused(path, pattern)
    r = restore_cli(path, "--serial", "none")
    assert r.status == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_rebuilt_file_with_nothing_changed_restores(tmp_path, good_snapshot):
    """The crafting above writes files hvm takes: the refusals come from the values, not the rebuild."""
    path = rebuild(good_snapshot[0], tmp_path / "same.snap", lambda m: None)
    r = restore_cli(path)
    assert r.status == STATUS and good_snapshot[1] + r.out == EXPECTED


def test_a_paused_vm_saved_with_resume_stays_paused(tmp_path):
    """A script's `pause`, then `snapshot:` (resume=True): the VM stays paused until the `resume` step."""
    with Machine(load_config(count_yaml(tmp_path)), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n5\n", timeout=15)
        vm.pause()
        at_pause = bytes(vm.console.history)
        vm.snapshot(tmp_path / "p.snap", resume=True)
        time.sleep(0.3)
        assert vm.run_state == "paused"
        assert bytes(vm.console.history) == at_pause
        vm.resume()
        assert vm.wait(20).status == STATUS
    r = restore_cli(tmp_path / "p.snap")
    assert at_pause.decode() + r.out == EXPECTED


def test_metadata_is_bounded_in_all_not_only_per_section(tmp_path, good_snapshot, monkeypatch):
    """Every metadata section is decoded and kept: a file of many sections each under the limit is refused."""
    import hvm.snapshot.format as fmt

    with SnapshotFile(good_snapshot[0]) as f:
        lengths = [s.length for s in f.sections.values() if not s.flags & FLAG_MEMORY]
    assert len(lengths) >= 4
    monkeypatch.setattr(fmt, "META_LIMIT", max(lengths) + 1)     # each section fits, all of them do not
    refused(good_snapshot[0], r"metadata sections of \d+ bytes in all, more than hvm reads")


def test_a_restored_vm_does_not_read_its_serial_input_file_again(tmp_path):
    """echo.bin echoes its input upper-cased: "abc" from a file, saved after "ABC"; the restore must not
    give the guest "abc" again (it would echo "ABC" a second time)."""
    (tmp_path / "in.txt").write_bytes(b"abc")
    cfg = write_yaml(tmp_path, f"""
name: echo
memory: 4M
timeout: 20
boot:
  image: {FIRMWARE / 'echo.bin'}
devices:
  serial: {{output: stdio, input: "file:{tmp_path / 'in.txt'}"}}
""", "echo.yaml")
    path = tmp_path / "echo.snap"
    with Machine(load_config(cfg), console=None) as vm:
        vm.start()
        assert vm.wait_for_console(b"ABC", timeout=15)
        vm.snapshot(path)
        vm.stop()
    r = restore_cli(path, "--timeout", "1")
    assert r.status == 124
    assert r.out == ""


def test_a_path_with_a_nul_byte_is_a_snapshot_error(tmp_path):
    with Machine(load_config(count_yaml(tmp_path, limit=100000)), console=quiet()) as vm:
        vm.start()
        vm.wait_for_console(b"\n3\n", timeout=15)
        with pytest.raises(SnapshotError, match="the path contains a NUL byte"):
            vm.snapshot(str(tmp_path / "a\0b"))
        assert vm.run_state == "running"


def test_a_restore_never_opens_a_host_path_named_in_the_snapshot(tmp_path):
    """A snapshot may come from anywhere: its saved `file:` serial output is not reopened (it would be
    truncated); output goes to stdout with one warning, unless --serial names a file anew."""
    victim = tmp_path / "victim.txt"
    cfg = write_yaml(tmp_path, f"""
name: count
memory: 16M
timeout: 20
boot: {{image: {FIRMWARE / 'count.bin'}, mode: real, regs: {{rdi: {COUNT}}}}}
devices: {{serial: {{output: "file:{victim}", input: none}}}}
""", "count.yaml")
    path = tmp_path / "vm.snap"
    with Machine(load_config(cfg)) as vm:
        vm.start()
        assert vm.wait_for_console(b"\n3\n", timeout=15)
        vm.snapshot(path)
        vm.stop()
    victim.write_bytes(b"precious\n")
    r = restore_cli(path)
    assert r.status == STATUS, r.stderr
    assert victim.read_bytes() == b"precious\n"
    assert r.out.endswith("done\n") and r.out.startswith(str(int(r.out.split("\n")[0])))
    assert f"the saved serial output file:{victim} is not reopened (give --serial file:PATH)" in r.stderr


def test_starting_a_restored_vm_emits_resume(tmp_path):
    path, _, _ = snapshot_at(tmp_path, b"\n3\n")
    with Machine.restore(path, console=quiet(), timeout=20) as vm:
        events = []
        vm.add_listener(lambda name, data: events.append(name))
        assert vm.run_state == "inmigrate"
        vm.start()
        assert vm.run_state == "running"
        assert vm.wait(20).status == STATUS
        assert events == ["RESUME", "SHUTDOWN"]


def test_a_restored_vm_started_frozen_waits_for_resume(tmp_path):
    path, at_save, _ = snapshot_at(tmp_path, b"\n3\n")
    with Machine.restore(path, console=quiet(), timeout=20) as vm:
        events = []
        vm.add_listener(lambda name, data: events.append(name))
        vm.start(paused=True)                    # hvm run --incoming file:PATH -S
        assert vm.run_state == "inmigrate"
        time.sleep(0.3)
        assert bytes(vm.console.history) == b""  # frozen: not one byte printed
        vm.pause()                               # frozen already: nothing to do
        vm.resume()
        assert vm.run_state == "running"
        assert vm.wait(20).status == STATUS
        assert at_save + bytes(vm.console.history).decode() == EXPECTED
        assert events == ["RESUME", "SHUTDOWN"]
