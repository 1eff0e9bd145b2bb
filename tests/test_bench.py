"""The benchmark suite's quick mode (`python -m bench --quick`, what `make bench QUICK=1` runs) prints one
well-formed markdown table with every row. Figures are never checked: speed depends on the host."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

EXPECTED_ROWS = (
    "exit.pio", "exit.pio_dev", "exit.pio_lsr", "exit.mmio", "exit.hlt", "trace.jsonl",
    "console.debugcon", "console.pvconsole", "console.virtio", "console.virtio_batch",
    "tcg.cpl0", "tcg.cpl3", "tcg.pio", "tcg.pio_dev", "tcg.console_uart", "tcg.console_pv",
    "virtio_blk.seq4k", "virtio_blk.seq4k_ioeventfd", "virtio_blk.seq64k", "virtio_blk.seq64k_ioeventfd",
    "startup.mbtest", "startup.hello", "rss.mbtest", "rss.hello",
    "mem.overhead",
    "kut.cpuid", "kut.inl_from_pmtimer", "kut.mov_from_cr8", "kut.inl_from_qemu",
    "linux.boot", "linux.init", "restore.linux",
)
SKIPPED_IN_QUICK = {"linux.boot", "linux.init", "restore.linux"}     # a Linux boot takes about a minute: quick mode skips it
HEADER = "| id | benchmark | hvm: median (min) | reference: median (min) | ratio | notes |"
KUT_FLAT = ROOT.parent / "shared" / "kvm-unit-tests" / "vmexit.flat"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (make bench installs it)")
    if not KUT_FLAT.is_file():
        pytest.skip(f"{KUT_FLAT} is not there")
    subprocess.run(["make", "-s", "bench-build"], cwd=ROOT, check=True, timeout=300)
    results = tmp_path_factory.mktemp("bench-results")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--results", str(results)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc, results


def table_rows(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells
    return lines, rows


def test_quick_mode_prints_one_well_formed_table(quick):
    proc, _ = quick
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines, rows = table_rows(proc.stdout)
    assert proc.stdout.strip().splitlines() == lines, "stdout holds the table and nothing else"
    assert lines[0] == HEADER
    assert set(lines[1].strip("|").split("|")) == {"---"}
    assert len(lines) == 2 + len(EXPECTED_ROWS)
    assert tuple(rows) == EXPECTED_ROWS
    for key, cells in rows.items():
        assert len(cells) == 6, cells
        if key in SKIPPED_IN_QUICK:
            assert cells[4] == "skipped" and "quick mode" in cells[5], cells
            continue
        ratio = float(cells[4])
        assert ratio > 0, cells
        assert "(min " in cells[2] and "(min " in cells[3], cells   # both raw figures, median and min


def test_quick_mode_writes_json_results(quick):
    proc, results = quick
    summary = json.loads((results / "summary.json").read_text())
    assert summary["quick"] is True
    assert [r["key"] for r in summary["rows"]] == list(EXPECTED_ROWS)
    assert summary["table"] == "\n".join(table_rows(proc.stdout)[0])
    for group in ("exits", "console", "tcg", "virtio_blk", "startup", "memory", "kut", "linux"):
        assert (results / f"{group}.json").is_file()
