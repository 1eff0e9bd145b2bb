"""The benchmark suite's tcg-vs-kvm rows (bench/tcg.py, `make bench-tcg`): the CPL0/CPL3 guest really runs its
loop in the ring it claims under both accelerators, and `python -m bench --quick --only tcg` prints those rows
well-formed, with both accelerators' figures. Speed is never asserted: it depends on the host."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

ROWS = ("tcg.cpl0", "tcg.cpl3", "tcg.pio", "tcg.pio_dev", "tcg.console_uart", "tcg.console_pv")
HEADER = "| id | benchmark | hvm: median (min) | reference: median (min) | ratio | notes |"
UNITS = {"tcg.cpl0": "iteration", "tcg.cpl3": "iteration", "tcg.pio": "OUT", "tcg.pio_dev": "OUT",
         "tcg.console_uart": "line", "tcg.console_pv": "line"}


def _need_both():
    from bench.tcg import unavailable

    why = unavailable()
    if why:
        pytest.skip(f"the rows need both accelerators: {why}")
    if not (ROOT / "firmware" / "build" / "bench_cpl.bin").is_file():
        pytest.skip("needs `make firmware` (firmware/build/bench_cpl.bin)")


@pytest.mark.parametrize("ring", [0, 3])
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_bench_cpl_runs_its_loop_in_the_ring_it_claims(ring, accel, tmp_path):
    """The guest reports CS after its loop: RPL 3 (0x2b, user code | 3) or ring 0 (0x08), then ends by the
    debug-exit write at that ring (IOPL 3), with no exception (which tcg could not deliver)."""
    _need_both()
    from bench.exits import patch_header
    from hvm import Machine
    from hvm.config import parse_spec
    from hvm.console import Console
    from hvm.trace import TraceConfig

    image = patch_header(ROOT / "firmware" / "build" / "bench_cpl.bin", tmp_path / "cpl.bin", 1000, ring, "<I",
                         arg_as_built=0)
    spec = parse_spec({"memory": "16M", "timeout": 10, "machine": "none", "accel": accel,
                       "boot": {"image": str(image), "load": 0x100000, "mode": "long"},
                       "devices": {"serial": {"output": "none", "input": "none"},
                                   "debug_exit": {"port": 0xF4, "size": 4}}})
    with Machine(spec, console=Console("none", "none", open_now=False), trace=TraceConfig(memory=True)) as m:
        result = m.run()
        exits = [(e.reason, e.port, e.direction, e.data) for e in m.exits()]
    assert (result.reason, result.status) == ("debug-exit", 1)
    assert [e[:3] for e in exits] == [("IO", 0x80, "out"), ("IO", 0xF4, "out")] and exits[1][3] == b"\0"
    cs = int.from_bytes(exits[0][3], "little")
    assert cs & 3 == ring, f"CS {cs:#x}"
    if ring == 0:
        assert cs == 0x08
    elif accel == "tcg" or not on_kvm_pvm():
        assert cs == 0x2B           # the guest's user code selector, RPL 3
    else:
        # kvm_pvm runs guest user code natively with the host's own user selector: a `mov %cs` there reads
        # Linux's __USER_CS (0x33), not the guest's 0x2b; its RPL is still 3
        assert cs == 0x33


def on_kvm_pvm() -> bool:
    return (Path("/sys/module/kvm_pvm")).is_dir()


def test_bench_cpl_refuses_a_zero_loop(tmp_path):
    """A zero count would spin 2^64 times: the harness refuses it before any run."""
    from bench.common import BenchError
    from bench.tcg import CASES, write_config

    with pytest.raises(BenchError, match="iterations must be >= 1"):
        write_config(CASES[0], "tcg", 0, tmp_path)


@pytest.fixture(scope="module")
def quick_tcg(tmp_path_factory):
    _need_both()
    subprocess.run(["make", "-s", "bench-build"], cwd=ROOT, check=True, timeout=300)
    results = tmp_path_factory.mktemp("bench-tcg")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "tcg", "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc, results


def test_quick_tcg_rows_are_well_formed(quick_tcg):
    proc, _ = quick_tcg
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == HEADER and set(lines[1].strip("|").split("|")) == {"---"}
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 6, cells
        rows[cells[0]] = cells
    assert tuple(rows) == ROWS
    for key, (_, title, tcg, kvm, ratio, note) in rows.items():
        per = UNITS[key]
        assert "tcg vs kvm" in title
        assert tcg.endswith(f"/{per})") and "(min " in tcg, tcg                  # e.g. "6.78 ns/iteration (min ...)"
        assert kvm.startswith("kvm (the same guest, hardware assist): ") and kvm.endswith(f"/{per})"), kvm
        assert float(ratio) > 0
        assert note.startswith(f"tcg/kvm time per {per} (< 1: tcg faster); ")
        assert ("tcg " in note and "x faster" in note) and "differenced" in note, note


def test_quick_tcg_json_has_both_accelerators(quick_tcg):
    """Each row's raw figures: one sample per rep and accelerator, each from a short and a longer run whose
    difference is positive (start-up excluded), the ratio being tcg's median over kvm's."""
    proc, results = quick_tcg
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((results / "tcg.json").read_text())
    assert [r["key"] for r in data["rows"]] == list(ROWS)
    for key in ROWS:
        raw = data["data"][key]
        assert raw["unit"] == f"s/{UNITS[key]}"
        for accel in ("tcg", "kvm"):
            assert raw[accel]["n"] == 1 and raw[accel]["median"] > 0
            (run,) = raw["runs"][accel]
            assert run["long"] > run["short"] >= 1
            assert run["long_seconds"] > run["short_seconds"] > 0
            assert run["per_iteration"] == pytest.approx(
                (run["long_seconds"] - run["short_seconds"]) / (run["long"] - run["short"]))
        assert raw["ratio_tcg_over_kvm"] == pytest.approx(raw["tcg"]["median"] / raw["kvm"]["median"])


def test_unicorn_floor_is_measured():
    """`python -m bench.tcg`: Unicorn alone, the floor docs/performance.md compares the tcg rows with."""
    from hvm.vcpu.tcg import unavailable

    if unavailable():
        pytest.skip(unavailable())
    from bench.tcg import unicorn_floor

    floor = unicorn_floor(reps=1)
    assert len(floor["loop_ns"]) == len(floor["out_noop_hook_ns"]) == 1
    assert floor["loop_ns"][0] > 0 and floor["out_noop_hook_ns"][0] > 0
