"""VM-exit tracing: exact exit sequences, summaries that match the guest's known counts, Perfetto
trace-event output, plots, complete traces of crashed runs, filters, ring mode, the Python API, and
summaries of large traces in bounded memory."""
from __future__ import annotations

import json
import re
import tracemalloc

from conftest import CONFIGS, FIRMWARE, write_yaml
from hvm import Machine, load_config
from hvm.console import Console
from hvm.trace import TraceConfig
from hvm.trace.record import decode_line
from hvm.trace.summary import format_summary, summarize

HELLO_TEXT = b"Hello from real mode!\n"
UART_INIT = [("out", 0x3FB, b"\x80"), ("out", 0x3F8, b"\x01"), ("out", 0x3F9, b"\x00"), ("out", 0x3FB, b"\x03"),
             ("out", 0x3FA, b"\xc7")]


def hello_sequence():
    seq = [("IO",) + e for e in UART_INIT]
    for ch in HELLO_TEXT:
        seq.append(("IO", "in", 0x3FD, b"\x60"))        # LSR: THRE | TEMT
        seq.append(("IO", "out", 0x3F8, bytes([ch])))
    seq.append(("HLT", None, None, b""))
    return seq


def read_trace(path):
    return [decode_line(line) for line in path.read_text().splitlines()]


def test_exact_exit_sequence(hvm, tmp_path):
    trace = tmp_path / "exits.jsonl"
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(trace))
    assert r.status == 0
    recs = read_trace(trace)
    assert [(e.reason, e.direction, e.port, e.data) for e in recs] == hello_sequence()
    assert all(e.vcpu == 0 for e in recs)
    assert [e.device for e in recs[:-1]] == ["com1"] * (len(recs) - 1)
    times = [e.t_ns for e in recs]
    assert times == sorted(times) and times[0] > 0
    assert all(e.handle_ns > 0 for e in recs)


def test_summary_counts_match_the_guest(hvm, tmp_path):
    trace = tmp_path / "exits.jsonl"
    assert hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(trace)).status == 0
    s = summarize(trace.read_text().splitlines())
    assert s.total == 50
    assert {k: v.count for k, v in s.by_reason.items()} == {"IO": 49, "HLT": 1}
    assert {k: v.count for k, v in s.by_port.items()} == {0x3F8: 23, 0x3FD: 22, 0x3FB: 2, 0x3F9: 1, 0x3FA: 1}
    assert {k: v.count for k, v in s.by_device.items()} == {"com1": 49}
    r = hvm("trace", "summary", str(trace))
    assert r.status == 0
    assert r.out.startswith("50 exits over ")
    assert re.search(r"^IO\s+49\s+98\.0%", r.out, re.M)
    assert re.search(r"^0x03f8\s+23\s+46\.0%", r.out, re.M)


def test_perfetto_trace_events(hvm, tmp_path):
    trace, out = tmp_path / "exits.jsonl", tmp_path / "exits.json"
    assert hvm("run", str(CONFIGS / "modes.yaml"), "--trace", str(trace)).status == 0
    n = len(trace.read_text().splitlines())
    r = hvm("trace", "perfetto", str(trace), "-o", str(out))
    assert r.status == 0
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == n == 144
    for e in slices:  # the trace-event format's required fields for complete events
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) and e["dur"] > 0
    assert {"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "vCPU 0"}} in events
    assert slices[0]["name"] == "IO out 0x3fb" and slices[-1]["name"] == "HLT"


def test_plot_writes_a_png(hvm, tmp_path):
    trace, png = tmp_path / "exits.jsonl", tmp_path / "exits.png"
    assert hvm("run", str(CONFIGS / "modes.yaml"), "--trace", str(trace)).status == 0
    r = hvm("trace", "plot", str(trace), "-o", str(png))
    assert r.status == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_trace_of_a_crashed_run_is_complete(hvm, tmp_path):
    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'triple.bin'}, mode: protected, load: 0x100000}}\n"
                               "memory: 4M\ntimeout: 10\n")
    trace = tmp_path / "exits.jsonl"
    r = hvm("run", str(cfg), "--trace", str(trace), "--stats")
    assert r.status == 4
    recs = read_trace(trace)
    assert recs[-1].reason == "SHUTDOWN"
    total = int(re.search(r"^exits: (\d+) total$", r.stderr, re.M).group(1))
    assert len(recs) == total == 5 + 2 * len(b"about to triple fault\n") + 1


def test_trace_of_a_timed_out_run_is_parseable(hvm, tmp_path):
    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'ticker.bin'}}}\nmemory: 4M\n")
    trace = tmp_path / "exits.jsonl"
    r = hvm("run", str(cfg), "--trace", str(trace), "--timeout", "0.5", "--serial", "none", "--stats")
    assert r.status == 124
    recs = read_trace(trace)                            # every line parses
    total = int(re.search(r"^exits: (\d+) total$", r.stderr, re.M).group(1))
    assert len(recs) == total > 10


def test_filter(hvm, tmp_path):
    trace = tmp_path / "exits.jsonl"
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(trace), "--trace-filter", "reason=io,port=0x3f8,dir=out")
    assert r.status == 0
    assert [e.data for e in read_trace(trace)] == [b"\x01"] + [bytes([c]) for c in HELLO_TEXT]
    bad = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(trace), "--trace-filter", "colour=red")
    assert bad.status == 2 and "trace filter: 'colour=red' is not KEY=VALUE" in bad.stderr


def test_ring_keeps_the_last_exits(hvm, tmp_path):
    trace = tmp_path / "exits.jsonl"
    r = hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(trace), "--trace-ring", "3")
    assert r.status == 0
    assert [(e.reason, e.port, e.data) for e in read_trace(trace)] == [
        ("IO", 0x3FD, b"\x60"), ("IO", 0x3F8, b"\n"), ("HLT", None, b"")]


def test_rip_capture(hvm, tmp_path):
    trace = tmp_path / "exits.jsonl"
    assert hvm("run", str(CONFIGS / "hello.yaml"), "--trace", str(trace), "--trace-rip").status == 0
    rips = [e.rip for e in read_trace(trace)]
    image_end = 0x7C00 + (FIRMWARE / "hello.bin").stat().st_size
    assert all(0x7C00 <= rip <= image_end for rip in rips)


def test_python_api():
    spec = load_config(CONFIGS / "hello.yaml")
    seen = []
    with Machine(spec, console=Console("none", "none"), trace=TraceConfig(memory=True)) as vm:
        vm.on_exit(seen.append)
        assert vm.run().status == 0
        recs = list(vm.exits())
    assert [(e.reason, e.direction, e.port, e.data) for e in recs] == hello_sequence()
    assert seen == recs
    assert recs[6].value == ord("H")


def synthetic_lines(n: int):
    for i in range(n):
        yield (f'{{"t":{i * 1000},"vcpu":0,"reason":"IO","port":{0x3F8 + i % 8},"size":1,"dir":"out","count":1,'
               f'"data":"41","device":"com1","handle_ns":{500 + i % 977}}}\n')


def test_large_traces_summarise_in_bounded_memory():
    tracemalloc.start()
    s = summarize(synthetic_lines(300_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert s.total == 300_000 and s.by_port[0x3F8].count == 37_500
    assert peak < 2 << 20, f"peak {peak} bytes: the summary must stream"
    st = s.by_reason["IO"]
    assert (st.min, st.max) == (500, 1476)
    assert abs(st.percentile(50) - 988) < 40       # log-bucket estimate of the true median
    assert "300000 exits over 0.300 s" in format_summary(s)
