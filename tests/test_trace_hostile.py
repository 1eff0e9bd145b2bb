"""The trace tools and the tracer against hostile input and a hostile host (issue 11): garbage files,
records with wrong types and ranges, outputs that are directories or symlinks, a full disk, SIGKILL
and a second SIGINT. Every case ends in status 2 with one line or a clean result, never status 70."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from conftest import CONFIGS, FIRMWARE, ROOT, write_yaml
from hvm.kvm import constants as kc
from hvm.trace import TraceConfig, Tracer
from hvm.trace.record import BadRecord, Skipped, iter_records, parse_line, validate
from hvm.trace.summary import TIME_BINS, format_summary, summarize
from hvm.trace import tracer as tracer_module
from hvm.trace.tracer import STALL_LIMIT

GOOD = '{"t":1000,"vcpu":0,"reason":"IO","port":1016,"size":1,"dir":"out","count":1,"data":"41","device":"com1","handle_ns":900}'
HLT = '{"t":2000,"vcpu":0,"reason":"HLT","handle_ns":500}'

# (name, file content): none of these is a trace
GARBAGE = {
    "random": bytes(range(256)) * 8 + b"\x00\xff\xfe" * 100,
    "empty": b"",
    "json-list": b"[1, 2, 3]\n",
    "json-string": b'"t"\n',
    "not-a-record": b'{"hello": "world"}\n',
    "t-string": GOOD.replace('"t":1000', '"t":"1000"').encode() + b"\n",
    "t-nan": GOOD.replace('"t":1000', '"t":NaN').encode() + b"\n",
    "t-inf": GOOD.replace('"t":1000', '"t":1e400').encode() + b"\n",
    "t-negative": GOOD.replace('"t":1000', '"t":-5').encode() + b"\n",
    "t-huge": GOOD.replace('"t":1000', '"t":' + "9" * 40).encode() + b"\n",
    "t-bool": GOOD.replace('"t":1000', '"t":true').encode() + b"\n",
    "port-float": GOOD.replace('"port":1016', '"port":1016.5').encode() + b"\n",
    "port-range": GOOD.replace('"port":1016', '"port":70000').encode() + b"\n",
    "reason-object": GOOD.replace('"reason":"IO"', '"reason":{"a":1}').encode() + b"\n",
    "handle-list": GOOD.replace('"handle_ns":900', '"handle_ns":[1]').encode() + b"\n",
    "data-not-hex": GOOD.replace('"data":"41"', '"data":"zz"').encode() + b"\n",
    "dir-bad": GOOD.replace('"dir":"out"', '"dir":"sideways"').encode() + b"\n",
    "deep": b"[" * 50_000 + b"]" * 50_000 + b"\n",
    "deep-object": b'{"t":' * 10_000 + b"1" + b"}" * 10_000 + b"\n",
    "long-line": b"x" * (1 << 20),
}


def run_tool(tool: str, src, tmp_path, *extra: str, timeout: float = 60):
    args = [sys.executable, "-m", "hvm", "trace", tool, str(src)]
    if tool != "summary":
        args += ["-o", str(tmp_path / f"out.{tool}")] if not extra else list(extra)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.parametrize("name", sorted(GARBAGE))
@pytest.mark.parametrize("tool", ["summary", "perfetto", "plot"])
def test_garbage_is_not_a_trace(tmp_path, tool, name):
    src = tmp_path / f"{name}.jsonl"
    src.write_bytes(GARBAGE[name])
    status, out, err = run_tool(tool, src, tmp_path)
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith(f"hvm: {src}: not a trace: no exit records"), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / f"out.{tool}").exists()      # nothing written for a file that is not a trace


@pytest.mark.parametrize("tool", ["summary", "perfetto", "plot"])
def test_bad_lines_are_skipped_and_counted(tmp_path, tool):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join([GOOD.encode(), GARBAGE["t-nan"].strip(), b"\xff\xfe garbage",
                                HLT.encode(), GOOD[:40].encode()]) + b"\n")
    status, out, err = run_tool(tool, src, tmp_path)
    assert status == 0, err
    lines = err.splitlines()
    assert lines[0] == (f"hvm: {src}: skipped 3 lines that are not exit records "
                        "(the first, line 2: 't': float where an integer belongs)")
    if tool == "summary":
        assert out.startswith("2 exits over 0.000 s") and len(lines) == 1
    elif tool == "perfetto":
        doc = json.loads((tmp_path / "out.perfetto").read_text())
        assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"] == ["IO out 0x3f8", "HLT"]
    else:
        assert (tmp_path / "out.plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(lines) == 1


def test_validate_in_one_place():
    assert validate(json.loads(GOOD))["port"] == 0x3F8
    for line, why in [("[]", "a JSON list, not an object"),
                      ('{"t":1,"vcpu":0}', "no 'reason' field"),
                      ('{"t":1,"vcpu":0,"reason":"HLT","rip":-1}', "'rip': -1 is outside 0..18446744073709551615"),
                      ('{"t":1,"vcpu":0,"reason":"IO","port":1}', "an I/O record needs 'size' and 'dir' in/out"),
                      ('{"t":1,"vcpu":0,"reason":"MMIO","addr":1,"size":4,"dir":"in"}',
                       "an MMIO record needs 'size' and 'dir' read/write"),
                      ('{"t":1,"vcpu":0,"reason":"a b"}', "'reason': not an exit reason name"),
                      ("[" * 60_000, "nested too deeply")]:
        with pytest.raises(BadRecord) as e:
            parse_line(line)
        assert str(e.value) == why
    skipped = Skipped()
    assert list(iter_records([GOOD, "", None, HLT], skipped)) == [json.loads(GOOD), json.loads(HLT)]
    assert (skipped.count, skipped.first_line, skipped.first_problem) == (1, 3, "longer than 65536 bytes")


def test_summary_memory_is_bounded_by_the_input_not_the_span():
    far = [HLT.replace('"t":2000', f'"t":{t}') for t in (0, 10**17 * 10**9 // 10**9 * 10, 5 * 10**17)]
    tracemalloc.start()
    s = summarize(far)
    text = format_summary(s)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert s.total == 3 and len(s.per_bin) <= 3
    assert peak < 1 << 20, peak
    table = text.split("exits per ")[1].splitlines()
    assert 2 <= len(table) <= TIME_BINS + 1
    assert sum(int(row.split()[-1]) for row in table[1:]) == 3


def test_summary_per_second_rows_for_short_runs():
    s = summarize(HLT.replace('"t":2000', f'"t":{i * 250_000_000}') for i in range(12))
    assert s.per_second == {0: 4, 1: 4, 2: 4}
    assert format_summary(s).endswith("exits per second:\n      0 s          4\n      1 s          4\n      2 s          4")


@pytest.mark.parametrize("tool", ["perfetto", "plot"])
def test_unusable_outputs(tmp_path, tool):
    src = tmp_path / "t.jsonl"
    src.write_text(GOOD + "\n" + HLT + "\n")
    target = tmp_path / "precious"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    what = f"{tool} output"
    for out, msg in [(tmp_path, f"{what} {tmp_path}: is a directory"),
                     ("/nonexistent/f", f"{what} /nonexistent/f: No such file or directory"),
                     (link, f"{what} {link}: is a symbolic link (not followed)"),
                     ("/dev/full", "/dev/full: No space left on device"),
                     (src, f"{src}: the output would overwrite the trace it is made from")]:
        status, _, err = run_tool(tool, src, tmp_path, "-o", str(out))
        assert (status, err) == (2, f"hvm: {msg}\n")
    assert target.read_text() == "keep" and src.read_text() == GOOD + "\n" + HLT + "\n"
    assert not (tmp_path.parent / (tmp_path.name + ".png")).exists()


def test_plot_writes_exactly_the_path_given(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text(GOOD + "\n" + HLT + "\n")
    status, _, err = run_tool("plot", src, tmp_path, "-o", str(tmp_path / "noext"))
    assert status == 0, err
    assert (tmp_path / "noext").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "noext.png").exists()


def test_input_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for src, msg in [(fifo, f"trace file {fifo}: is a FIFO, not a regular file"),
                     ("/dev/zero", "trace file /dev/zero: is a device, not a regular file"),
                     (tmp_path / "none", f"trace file {tmp_path / 'none'}: No such file or directory")]:
        status, _, err = run_tool("summary", src, tmp_path, timeout=20)
        assert (status, err) == (2, f"hvm: {msg}\n")


# --- the tracer ----------------------------------------------------------------------------------------

def test_trace_to_a_full_device_is_a_warning_and_the_guest_status_stands(hvm, tmp_path):
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", "/dev/full")
    assert r.status == 0 and r.out == "Hello from real mode!\n"
    assert r.stderr == ("hvm: trace file /dev/full: write failed (No space left on device): tracing stopped "
                        "after 0 records, the run goes on\n")
    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'triple.bin'}, mode: protected, load: 0x100000}}\n"
                               "memory: 4M\ntimeout: 10\n")
    r = hvm("run", str(cfg), "--trace", "/dev/full", "--serial", "none")
    assert r.status == 4
    assert r.stderr.count("write failed (No space left on device)") == 1 and "Traceback" not in r.stderr


def test_trace_symlink_refused_and_nothing_truncated_before_the_config_is_valid(hvm, tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep")
    link = tmp_path / "exits.jsonl"
    link.symlink_to(target)
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(link))
    assert (r.status, r.stderr) == (2, f"hvm: trace file {link}: is a symbolic link (not followed)\n")
    assert target.read_text() == "keep"
    for path, msg in [(tmp_path, "is a directory"), (tmp_path / "no" / "t.jsonl", "No such file or directory")]:
        r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(path))
        assert (r.status, r.stderr) == (2, f"hvm: trace file {path}: {msg}\n")
    old = tmp_path / "old.jsonl"
    old.write_text(GOOD + "\n")
    for bad in (["--memory", "0"], ["--kernel", str(tmp_path / "nosuch")], ["--trace-filter", "colour=red"],
                ["--serial", f"file:{tmp_path}"]):   # the console's output file is opened before the trace
        r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(old), *bad)
        assert r.status == 2 and r.stderr.count("\n") == 1, r.stderr
        assert old.read_text() == GOOD + "\n"


def raw_io(i: int) -> tuple:
    return (i * 1000, 0, kc.EXIT_IO, 0x3F8, 1, 1, 1, b"A", 500, None)


def test_records_reach_the_file_while_the_vm_runs(tmp_path):
    path = tmp_path / "t.jsonl"
    tracer = Tracer(TraceConfig(path=path), lambda reason, where: "com1")
    try:
        for i in range(1000):
            tracer.append(raw_io(i))
        deadline = time.monotonic() + 1.0     # the promise: on disk within a second, without close()
        while path.stat().st_size == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        lines = path.read_text().splitlines()
        assert len(lines) == 1000 and json.loads(lines[-1])["t"] == 999_000
    finally:
        tracer.close()


def test_a_second_sigint_ends_the_write_out_cleanly(tmp_path, monkeypatch):
    """close() writing out a long queue when SIGINT arrives: no KeyboardInterrupt, the file keeps whole lines."""

    monkeypatch.setattr(tracer_module, "WRITE_INTERVAL", 1000.0)   # everything waits for close()
    monkeypatch.setattr(tracer_module, "HIGH_WATER", 10**9)
    path = tmp_path / "t.jsonl"
    n = 400_000                      # ~0.5 s or more to encode and write
    tracer = Tracer(TraceConfig(path=path), lambda reason, where: "com1")
    for i in range(n):
        tracer.append(raw_io(i))
    assert path.stat().st_size == 0
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        tracer.close()              # a KeyboardInterrupt here fails the test
    finally:
        timer.join()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""          # ends with a whole line
    assert 0 < len(lines) - 1 == tracer.written < n
    assert [parse_line(line)["t"] for line in lines[:-1]] == [i * 1000 for i in range(tracer.written)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def fast_loop_guest(tmp_path, iterations: int):
    """firmware/bench_pio patched to write COM1's scratch register `iterations` times (~100k exits/s)."""
    from bench.exits import patch_header

    image = patch_header(FIRMWARE / "bench_pio.bin", tmp_path / "loop.bin", iterations, 0x3FF)
    return write_yaml(tmp_path, f"boot: {{image: '{image}', load: 0x7c00, mode: real}}\nmemory: 16M\n"
                                "machine: none\ntimeout: 20\n"
                                "devices: {serial: {output: none, input: none}, debug_exit: {port: 0xf4, size: 4}}\n")


def start_hvm(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hvm", "run", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_leaves_the_records_of_the_run_so_far(tmp_path):
    cfg = fast_loop_guest(tmp_path, 50_000_000)
    trace = tmp_path / "t.jsonl"
    proc = start_hvm(str(cfg), "--trace", str(trace), "--timeout", "20")
    try:
        time.sleep(2.5)
        assert proc.poll() is None
        proc.kill()
    finally:
        proc.wait(10)
    lines = trace.read_bytes().split(b"\n")
    records = [parse_line(line) for line in lines[:-1]]   # every whole line parses; the last may be cut
    assert len(records) > 10_000, len(records)
    # Streamed with a bounded delay: the last record on disk is from well within the last second and a half.
    assert records[-1]["t"] > 0.5e9 and all(r["reason"] == "IO" and r["port"] == 0x3FF for r in records)


def test_a_trace_fifo_nobody_reads_stops_tracing_not_the_vm(tmp_path):
    """--trace into a FIFO whose reader never reads: once the pipe is full the writer gives up after
    STALL_LIMIT s with one warning, and the watchdog ends the run on time (it used to block the writer for
    good: the queue grew behind it and close() hung)."""
    cfg = fast_loop_guest(tmp_path, 50_000_000)
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)    # open, never read
    try:
        t0 = time.monotonic()
        proc = start_hvm(str(cfg), "--trace", str(fifo), "--timeout", "4")
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        seconds = time.monotonic() - t0
    finally:
        os.close(reader)
    err = err.decode()
    assert proc.returncode == 124, err
    assert seconds < 4 + 3, seconds
    assert f"write failed (nothing was read for {STALL_LIMIT:g} s): tracing stopped after" in err, err
    assert "Traceback" not in err


def test_second_sigint_during_write_out_cli(tmp_path):
    cfg = fast_loop_guest(tmp_path, 50_000_000)
    trace = tmp_path / "t.jsonl"
    proc = start_hvm(str(cfg), "--trace", str(trace), "--trace-ring", "10000000", "--timeout", "20")
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)                # the write-out of ~300k records takes ~0.3 s here
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "write-out interrupted: it keeps the" in err, err
    lines = trace.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) > 1
    assert all(parse_line(line)["port"] == 0x3FF for line in lines[:-1])


# --- property-based: the tools on mutated traces (Hypothesis; profiles in conftest.py) -------------------

import contextlib  # noqa: E402
import io  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hvm.cli import main as hvm_main  # noqa: E402
from hvm.trace.plot import plot_data  # noqa: E402
from hvm.trace.record import NoRecords  # noqa: E402

TOOL_SECONDS = 5.0   # a bound on one in-process tool call on a small file (they take milliseconds)


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory) -> list[bytes]:
    """The lines of a real trace: modes.yaml (real, protected and long mode; 144 exits)."""
    path = tmp_path_factory.mktemp("real") / "modes.jsonl"
    subprocess.run([sys.executable, "-m", "hvm", "run", str(CONFIGS / "modes.yaml"), "--trace", str(path),
                    "--serial", "none", "--timeout", "10", "--trace-rip"], cwd=ROOT, check=True, timeout=30)
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 144
    return lines


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["in", "out", "read", "write", "IO", "MMIO", "HLT", "com1", "41", "zz"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)
FIELD_NAMES = ["t", "vcpu", "reason", "handle_ns", "port", "addr", "size", "dir", "count", "data", "device",
               "rip", "suberror", "other"]


@st.composite
def mutated_trace(draw, lines: list[bytes]) -> bytes:
    """A real trace after a few random mutations: bytes flipped, inserted, deleted; lines dropped,
    duplicated, cut or replaced by raw bytes; fields deleted or set to any JSON value (NaN, 1e400 ...)."""
    lines = list(lines[:draw(st.integers(1, len(lines)))])
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        kind = draw(st.sampled_from(["field", "field", "delete-field", "bytes", "cut", "drop", "dup", "raw",
                                     "deep"]))
        if not lines:
            lines.append(b"")
        line = lines[i]
        if kind in ("field", "delete-field"):
            try:
                d = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(d, dict):
                continue
            name = draw(st.sampled_from(FIELD_NAMES))
            if kind == "delete-field":
                d.pop(name, None)
            else:
                d[name] = draw(json_values)
            lines[i] = json.dumps(d, allow_nan=True).encode() + b"\n"
        elif kind == "bytes":
            b = bytearray(line)
            for _ in range(draw(st.integers(1, 4))):
                pos = draw(st.integers(0, len(b)))
                op = draw(st.sampled_from(["set", "insert", "delete"]))
                if op == "insert" or not b or pos == len(b):
                    b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
                elif op == "set":
                    b[pos] = draw(st.integers(0, 255))
                else:
                    del b[pos]
            lines[i] = bytes(b)
        elif kind == "cut":
            lines[i] = line[:draw(st.integers(0, max(len(line) - 1, 0)))]
        elif kind == "drop":
            del lines[i]
        elif kind == "dup":
            lines.insert(i, line)
        elif kind == "raw":
            lines[i] = draw(st.binary(max_size=64))
        else:
            depth = draw(st.integers(1, 30_000))
            lines[i] = b"[" * depth + b"]" * depth + b"\n"
    return b"".join(lines)


class Records(list):
    bad = 0


def expected_records(data: bytes) -> Records:
    """The oracle: what record.parse_line accepts, line by line, and how many non-blank lines it rejects."""
    out = Records()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(parse_line(line))
        except BadRecord:
            out.bad += 1
    return out


def bad_lines(records: Records) -> int:
    return records.bad


def call_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = hvm_main(list(argv))
    assert time.monotonic() - start < TOOL_SECONDS
    return status, out.getvalue(), err.getvalue()


def check_outcome(status: int, err: str, want: list[dict], src: Path, extra_lines: int = 0) -> None:
    """Status 0 with at most one line about skipped lines (plus the tool's own), or 2 with one line."""
    assert status in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
    if want:
        assert status == 0 and err.count("\n") <= 1 + extra_lines, err
        bad = bad_lines(want)
        if bad:
            s = "" if bad == 1 else "s"
            assert err.startswith(f"hvm: {src}: skipped {bad} line{s} that "), err
        else:
            assert f"{src}: skipped" not in err
    else:
        assert status == 2 and err.count("\n") == 1 and err.startswith(f"hvm: {src}: not a trace"), err


@pytest.mark.fuzz
@given(data=st.data())
def test_fuzz_summary_on_mutated_traces(real_trace, data):
    blob = data.draw(mutated_trace(real_trace))
    want = expected_records(blob)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.jsonl"
        src.write_bytes(blob)
        status, out, err = call_main("trace", "summary", str(src))
    check_outcome(status, err, want, src)
    if want:
        assert out.startswith(f"{len(want)} exits over ")
        assert len(out.split("exits per ")[1].splitlines()) <= TIME_BINS + 1


@pytest.mark.fuzz
@given(data=st.data())
def test_fuzz_perfetto_on_mutated_traces(real_trace, data):
    blob = data.draw(mutated_trace(real_trace))
    want = expected_records(blob)
    with tempfile.TemporaryDirectory() as d:
        src, dest = Path(d) / "t.jsonl", Path(d) / "out.json"
        src.write_bytes(blob)
        status, _, err = call_main("trace", "perfetto", str(src), "-o", str(dest))
        check_outcome(status, err, want, src, extra_lines=1)   # + "N exit slices written to ..."
        if want:
            slices = [e for e in json.loads(dest.read_text())["traceEvents"] if e["ph"] == "X"]
            assert [s["ts"] for s in slices] == [r["t"] / 1000 for r in want]
        else:
            assert not dest.exists()


@pytest.mark.fuzz
@given(data=st.data())
def test_fuzz_plot_data_on_mutated_traces(real_trace, data):
    """The plot's data pass in-process (rendering takes ~0.3 s: the CLI cases below render)."""
    blob = data.draw(mutated_trace(real_trace))
    want = expected_records(blob)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.jsonl"
        src.write_bytes(blob)
        skipped = Skipped()
        start = time.monotonic()
        try:
            pd = plot_data(src, skipped=skipped)
        except NoRecords:
            assert not want
            return
        assert time.monotonic() - start < TOOL_SECONDS
    assert want and sum(map(sum, pd.rates.values())) == len(want) == sum(pd.hist)
    assert all(len(v) == 100 for v in pd.rates.values())


@pytest.mark.fuzz
@given(records=st.lists(st.fixed_dictionaries(
    {"t": st.integers(0, (1 << 63) - 1), "vcpu": st.integers(0, 3), "reason": st.sampled_from(["HLT", "IO"])},
    optional={"handle_ns": st.integers(0, (1 << 63) - 1)}), min_size=1, max_size=30))
def test_fuzz_summary_of_any_valid_records(records):
    """Extreme but valid values (spans up to 290 years, handling times up to 2**63 ns): bounded output."""
    lines = [json.dumps({**r, **({"port": 1, "size": 1, "dir": "in"} if r["reason"] == "IO" else {})})
             for r in records]
    tracemalloc.start()
    s = summarize(lines)
    text = format_summary(s)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert s.total == len(records) and s.bad_lines == 0
    assert sum(s.per_bin.values()) == len(records) and len(s.per_bin) <= TIME_BINS
    assert peak < 1 << 20 and len(text.splitlines()) < TIME_BINS + 40


# A few whole-CLI cases in subprocesses (the real entry point, rendering included), from fixed seeds.
@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_cli_subprocess(real_trace, tmp_path, seed):
    import random

    rnd = random.Random(seed)
    lines = list(real_trace)
    for _ in range(20):
        i = rnd.randrange(len(lines))
        b = bytearray(lines[i])
        b[rnd.randrange(len(b))] = rnd.randrange(256)
        lines[i] = bytes(b)
    blob = b"".join(lines)
    src = tmp_path / "t.jsonl"
    src.write_bytes(blob)
    want = expected_records(blob)
    assert want   # 20 flipped bytes leave most of 144 lines intact
    for tool in ("summary", "perfetto", "plot"):
        status, out, err = run_tool(tool, src, tmp_path)
        assert status == 0 and "Traceback" not in err, err
        assert err == "" or err.startswith(f"hvm: {src}: skipped ")


def test_a_writer_that_falls_behind_drops_the_oldest_records_not_memory(tmp_path, monkeypatch, caplog):
    """The queue between the vCPUs and the writer is bounded (QUEUE_LIMIT): past it the oldest records
    go, with one warning, instead of hvm's memory growing while the writer is behind."""
    monkeypatch.setattr(tracer_module, "WRITE_INTERVAL", 1000.0)   # the writer waits for close()
    monkeypatch.setattr(tracer_module, "HIGH_WATER", 10**9)
    monkeypatch.setattr(tracer_module, "QUEUE_LIMIT", 50)
    path = tmp_path / "t.jsonl"
    tracer = Tracer(TraceConfig(path=path), lambda reason, where: "com1")
    for i in range(1000):
        tracer.append(raw_io(i))
    assert len(tracer.queue) == 50
    with caplog.at_level(logging.WARNING):
        tracer.close()
    assert [json.loads(line)["t"] for line in path.read_text().splitlines()] == [i * 1000 for i in range(950, 1000)]
    assert tracer.overflowed
    assert [r.getMessage() for r in caplog.records] == [
        "trace: the writer fell 50 records behind the guest: the oldest queued ones are dropped while it "
        "catches up (the trace has gaps)"]


def test_device_cache_is_bounded(tmp_path):
    from hvm.trace.tracer import DEVICE_CACHE_LIMIT

    tracer = Tracer(TraceConfig(path=tmp_path / "t.jsonl"), lambda reason, where: None)
    try:
        for addr in range(0, 3 * DEVICE_CACHE_LIMIT * 4096, 4096):   # a guest scanning MMIO pages
            tracer.device(kc.EXIT_MMIO, addr)
        assert len(tracer._devices) <= DEVICE_CACHE_LIMIT
    finally:
        tracer.close()


raw_records = st.tuples(
    st.integers(0, 1 << 62), st.integers(0, 7),
    st.sampled_from([kc.EXIT_IO, kc.EXIT_MMIO, kc.EXIT_HLT, kc.EXIT_INTERNAL_ERROR, kc.EXIT_SHUTDOWN, 99]),
    st.integers(0, (1 << 64) - 1), st.sampled_from([1, 2, 4, 8]), st.integers(0, 1), st.integers(0, 4096),
    st.binary(max_size=16), st.integers(0, 1 << 40), st.none() | st.integers(0, (1 << 64) - 1))


@pytest.mark.fuzz
@given(raws=st.lists(raw_records, max_size=40), rip=st.booleans(), device=st.sampled_from([None, "com1", "fw-cfg"]))
def test_streamed_lines_are_what_encode_raw_writes(raws, rip, device):
    """The writer's inlined encoder (the path `hvm run --trace` takes) against record.encode_raw."""
    from hvm.trace.record import encode_raw

    if rip:   # with --trace-rip every record carries its RIP
        raws = [r[:9] + (r[9] or 0,) for r in raws]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        tracer = Tracer(TraceConfig(path=path, rip=rip), lambda reason, where: device)
        for raw in raws:
            tracer.append(raw)
        tracer.close()
        got = path.read_text()
    want = "".join(encode_raw(r, device if r[2] in (kc.EXIT_IO, kc.EXIT_MMIO) else None, rip) for r in raws)
    assert got == want and tracer.written == len(raws)
