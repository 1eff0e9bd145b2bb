"""`hvm compare` (hvm/compare.py): one guest under kvm, then tcg; the side-by-side table, its exit status,
the first serial and exit-sequence differences (a planted one and a real one: CPUID under KVM vs Unicorn),
--trace files in hvm's trace format, --json, and one-line errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONFIGS, FIRMWARE, run_hvm, write_yaml
from hvm import cli
from hvm.compare import ExitSummary, compare, diff_exits, format_exit_diff, serial_difference, table
from hvm.trace.record import decode_line

# Every row label of the table, in order (the per-reason and per-port rows are checked separately).
ROWS = ("serial output", "exit status", "exits", "string I/O (rep ins/outs)", "exit sequence", "wall time (run)",
        "wall time (all)", "instructions", "instructions/s")


def rows_of(text: str) -> dict[str, str]:
    """label -> the rest of the line, for lines of the table (before the notes)."""
    out = {}
    for line in text.splitlines()[2:]:
        if line.startswith(("note:", "result:", "serial output differs", "  kvm:", "  tcg:")):
            continue
        label = line[:27].rstrip()
        out[label] = line[27:]
    return out


def test_hello_table_is_well_formed_and_identical():
    r = run_hvm("compare", str(CONFIGS / "hello.yaml"))
    assert r.status == 0, r.stderr
    lines = r.out.splitlines()
    assert lines[0] == f"hvm compare: {CONFIGS / 'hello.yaml'} ({FIRMWARE / 'hello.bin'})"
    assert lines[1].split() == ["kvm", "tcg"]
    rows = rows_of(r.out)
    for label in ROWS:
        assert label in rows, (label, r.out)
    assert rows["serial output"].split() == ["22", "bytes,", "1", "lines"] * 2 + ["identical"]
    assert rows["exit status"].split() == ["0", "(halt)", "0", "(halt)", "same"]
    assert rows["exit sequence"].split() == ["50", "elements", "50", "elements", "identical"]
    assert rows["  IO"].split() == ["49", "49", "same"]
    assert rows["  HLT"].split() == ["1", "1", "same"]
    assert rows["  port 0x03f8 out"].split() == ["23", "23", "same"]     # divisor latch + 22 characters
    assert rows["  port 0x03fd in"].split() == ["22", "22", "same"]
    # Both columns of the timing rows are numbers; the instruction count is the same program's in both.
    assert len(rows["wall time (run)"].split()) >= 4 and rows["wall time (run)"].split()[1] == "ms"
    count = rows["instructions"].split()
    assert count[0] == count[3] and int(count[0]) > 100, rows["instructions"]
    assert rows["instructions/s"].count("/s") == 2
    assert lines[-1] == "result: identical (serial output and exit status)"
    assert "hello" not in r.stderr and r.stderr.count("\n") <= 1    # consoles captured, not on the terminal


def test_json_for_scripts():
    r = run_hvm("compare", str(CONFIGS / "modes.yaml"), "--json")
    assert r.status == 0, r.stderr
    d = json.loads(r.out)
    assert d["identical"] and d["serial_identical"] and d["status_identical"] and d["exits_identical"]
    assert d["serial_difference"] is None and d["exit_difference"] is None
    for accel in ("kvm", "tcg"):
        side = d[accel]
        assert side["status"] == 0 and side["reason"] == "halt"
        assert side["output_lines"] == 3 and side["exits"] == 144 and side["exit_elements"] == 144
        assert side["instructions_per_second"] > 0
    assert d["instructions"] > 1000


def _plant_capital_l(monkeypatch):
    """Under tcg only, the guest's first 'l' to COM1 becomes 'L' on its way to the bus (an accelerator bug)."""
    from hvm.vcpu.tcg import TcgVcpuThread

    from hvm.kvm.constants import EXIT_IO

    original = TcgVcpuThread._write
    done = []

    def planted(self, bus_write, reason, direction, port, size, value):
        if reason == EXIT_IO and port == 0x3F8 and value == ord("l") and not done:
            done.append(True)
            value = ord("L")
        return original(self, bus_write, reason, direction, port, size, value)

    monkeypatch.setattr(TcgVcpuThread, "_write", planted)


def _spec(*argv: str):
    return cli.spec_from_args(cli.build_parser("compare").parse_args(["compare", *argv]))


def test_planted_difference_is_named(monkeypatch):
    _plant_capital_l(monkeypatch)
    c = compare(_spec(str(CONFIGS / "hello.yaml")), count=False)
    assert c.kvm.output == b"Hello from real mode!\n" and c.tcg.output == b"HeLlo from real mode!\n"
    assert not c.identical
    s = c.serial
    assert (s.offset, s.line, s.column) == (2, 1, 2)
    assert (s.kvm, s.tcg) == ("Hello from real mode!", "HeLlo from real mode!")
    text = "\n".join(table(c))
    assert "serial output differs at byte 2 (line 1, column 2):" in text
    assert "  kvm: Hello from real mode!" in text and "  tcg: HeLlo from real mode!" in text
    assert text.splitlines()[-1] == "result: DIFFERENT (serial output)"
    # The exit sequences differ at the same place: the element carrying the byte.
    d = c.exits
    assert not d.identical and d.index is not None
    marked = [(i, a, b) for i, a, b in d.context if i == d.index]
    assert len(marked) == 1
    _, a, b = marked[0]
    assert (a.reason, a.where, a.direction, a.data) == ("IO", 0x3F8, "out", b"l")
    assert (b.reason, b.where, b.direction, b.data) == ("IO", 0x3F8, "out", b"L")
    lines = format_exit_diff(d)
    hit = [ln for ln in lines if ln.lstrip().startswith(">")]
    assert len(hit) == 1 and "'l'" in hit[0] and "'L'" in hit[0]
    assert len(d.context) == 7        # three elements before and after


def test_planted_difference_through_the_command(monkeypatch, capsys):
    _plant_capital_l(monkeypatch)
    status = cli.main(["compare", str(CONFIGS / "hello.yaml"), "--no-count", "--diff-exits"])
    out = capsys.readouterr().out
    assert status == 1
    assert "DIFFERENT" in rows_of(out)["serial output"]
    assert "exit sequences: first difference at element" in out
    assert "instructions: not counted (--no-count)" in out


def test_real_difference_cpuid(tmp_path):
    """firmware/cpuid64 prints the CPUID leaves the guest sees: KVM's (the host's, as hvm adapts it) and
    Unicorn's qemu64 differ, so compare reports status 1 and the first differing byte on line 1."""
    config = write_yaml(tmp_path, f"name: cpuid64\nmemory: 16M\ntimeout: 10\n"
                                  f"boot: {{image: {FIRMWARE / 'cpuid64.bin'}, load: 0x100000, mode: long}}\n")
    r = run_hvm("compare", str(config), "--json")
    assert r.status == 1, r.stderr
    d = json.loads(r.out)
    assert not d["identical"] and not d["serial_identical"] and d["status_identical"]
    diff = d["serial_difference"]
    assert diff["line"] == 1 and diff["kvm"] != diff["tcg"]
    assert d["kvm"]["status"] == d["tcg"]["status"] == 1     # debug-exit with 0
    # A different value printed is a different byte sent to COM1: the exit sequences differ too.
    assert not d["exits_identical"]
    first = d["exit_difference"]["context"]
    marked = [e for e in first if e["index"] == d["exit_difference"]["index"]][0]
    assert marked["kvm"]["where"] == marked["tcg"]["where"] == 0x3F8
    assert marked["kvm"]["data"] != marked["tcg"]["data"]


def test_trace_files_and_string_io_flattened(tmp_path):
    """multiboot's guest does one `rep insb` of 4 bytes: one exit under KVM, four under tcg; compare counts
    the 4 elements in both, and both traces read back with hvm's trace reader."""
    prefix = tmp_path / "mb"
    r = run_hvm("compare", str(CONFIGS / "multiboot.yaml"), "--trace", str(prefix), "--json")
    assert r.status == 0, r.stderr
    d = json.loads(r.out)
    for accel in ("kvm", "tcg"):
        path = Path(f"{prefix}.{accel}.jsonl")
        assert d[accel]["trace"] == str(path)
        records = [decode_line(line) for line in path.read_text().splitlines() if line.strip()]
        assert len(records) == d[accel]["exits"]
        scratch = [x for x in records if x.reason == "IO" and x.port == 0x3FF and x.direction == "in"]
        assert sum(x.count for x in scratch) == 4
        assert len(scratch) == (1 if accel == "kvm" else 4)
        place = [p for p in d[accel]["places"] if p["kind"] == "port" and p["where"] == 0x3FF and p["dir"] == "in"]
        assert place == [{"kind": "port", "where": 0x3FF, "dir": "in", "elements": 4,
                          "exits": 1 if accel == "kvm" else 4}]
        summary = run_hvm("trace", "summary", str(path))
        assert summary.status == 0 and f"{len(records)} exits" in summary.out
    assert d["kvm"]["string_io"] == {"exits": 1, "elements": 4}
    assert d["tcg"]["string_io"] == {"exits": 0, "elements": 0}
    assert d["serial_identical"] and d["kvm"]["status"] == d["tcg"]["status"] == 15


def _record(reason: str, **kw) -> dict:
    return {"t": 0, "vcpu": 0, "reason": reason, **kw}


def test_diff_exits_flattens_and_finds_the_first_difference():
    kvm, tcg = ExitSummary(), ExitSummary()
    kvm.add(_record("IO", port=0x3F8, size=1, dir="out", count=3, data="414243"))
    kvm.add(_record("HLT"))
    for ch in "41", "42", "44":
        tcg.add(_record("IO", port=0x3F8, size=1, dir="out", count=1, data=ch))
    tcg.add(_record("HLT"))
    assert (kvm.records, kvm.elements, tcg.records, tcg.elements) == (2, 4, 4, 4)
    d = diff_exits(kvm, tcg)
    assert not d.identical and d.index == 2
    at = {i: (a, b) for i, a, b in d.context}[2]
    assert (at[0].data, at[0].record, at[0].part, at[1].data, at[1].record) == (b"C", 0, 2, b"D", 2)
    # Equal elements, different exit counts: identical sequences.
    same = ExitSummary()
    for ch in "41", "42", "43":
        same.add(_record("IO", port=0x3F8, size=1, dir="out", count=1, data=ch))
    same.add(_record("HLT"))
    assert diff_exits(kvm, same).identical
    # One a prefix of the other: the difference is where the shorter ends.
    short = ExitSummary()
    short.add(_record("IO", port=0x3F8, size=1, dir="out", count=3, data="414243"))
    d = diff_exits(short, same)
    assert d.index == 3 and "kvm's sequence ends there" in d.note
    assert {i: (a, b) for i, a, b in d.context}[3][0] is None


def test_serial_difference_shortens_long_lines():
    a = b"first\n" + b"x" * 100 + b"A" + b"y" * 100 + b"\n"
    b = b"first\n" + b"x" * 100 + b"B" + b"y" * 100 + b"\n"
    s = serial_difference(a, b)
    assert (s.offset, s.line, s.column) == (106, 2, 100)
    assert s.kvm == "..." + "x" * 30 + "A" + "y" * 29 + "..." and s.tcg == "..." + "x" * 30 + "B" + "y" * 29 + "..."
    s = serial_difference(b"ok\n", b"ok\nmore\n")
    assert (s.offset, s.line, s.kvm, s.tcg) == (3, 2, "<end of output>", "more")
    assert serial_difference(b"same", b"same") is None


@pytest.mark.parametrize("argv, message", [
    ((), "give a config file or --kernel"),
    ((str(CONFIGS / "hello.yaml"), "--bogus"), "unrecognized arguments: --bogus"),
    ((str(CONFIGS / "hello.yaml"), "--accel", "tcg"), "unrecognized arguments: --accel tcg"),
    ((str(CONFIGS / "hello.yaml"), "--vcpus", "2"), "accel tcg runs one vCPU"),
    ((str(CONFIGS / "hello.yaml"), "--vcpus", "0"), "--vcpus"),
    ((str(CONFIGS / "hello.yaml"), "--cpu", "qemu64"), "cpu: applies to accel kvm only"),
    ((str(CONFIGS / "hello.yaml"), "--timeout", "-1"), "--timeout"),
    ((str(CONFIGS / "hello.yaml"), "--trace", "/nonexistent-dir/x"), "/nonexistent-dir/x.kvm.jsonl"),
    (("/nonexistent.yaml",), "/nonexistent.yaml"),
])
def test_bad_input_is_one_line_status_2(argv, message):
    r = run_hvm("compare", *argv)
    assert r.status == 2, (r.status, r.stderr)
    assert r.stdout == b""
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_summaries_are_bounded(monkeypatch):
    """What a guest can make compare keep is bounded: distinct places (the rest summed as 'other') and kept
    elements (beyond them the sequences are compared by a running hash: equal or not, not where)."""
    import hvm.compare as hc

    s = ExitSummary()
    for i in range(hc.MAX_PLACES + 10):
        s.add(_record("MMIO", addr=0x1000_0000 + 8 * i, size=4, dir="write", data="00000000"))
    assert len(s.places) == hc.MAX_PLACES and s.other_places == [10, 10]
    monkeypatch.setattr(hc, "MAX_KEPT", 5)
    a, b = ExitSummary(), ExitSummary()
    for i in range(8):
        a.add(_record("IO", port=0x80, size=1, dir="out", count=1, data=f"{i:02x}"))
        b.add(_record("IO", port=0x80, size=1, dir="out", count=1, data=f"{i if i < 6 else 0x55:02x}"))
    assert len(a.kept) == 5 and a.elements == 8 and not a.complete
    d = diff_exits(a, b)
    assert not d.identical and d.index is None and "the first 5 elements are equal" in d.note


def test_trace_prefix_never_follows_a_symlink(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    (tmp_path / "t.kvm.jsonl").symlink_to(target)
    r = run_hvm("compare", str(CONFIGS / "hello.yaml"), "--trace", str(tmp_path / "t"))
    assert r.status == 2 and r.stdout == b"" and r.stderr.count("\n") == 1, r.stderr
    assert "t.kvm.jsonl" in r.stderr
    assert target.read_text() == "keep me\n"
