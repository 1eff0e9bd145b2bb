"""Run kvm-unit-tests guests under hvm the way upstream's runner runs them under QEMU.

Reads upstream's unittests.cfg (INI: file, smp, test_args / extra_params, qemu_params, arch, groups,
timeout), runs each x86_64 entry whose binary is present as `hvm run` with the same meaning as
`qemu-system-x86_64 ... -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel X -smp N
-append ARGS`, and reports PASS/FAIL/SKIP per entry in upstream's format, with QEMU's results on the
same host (RESULTS-QEMU.md beside the binaries) side by side.

Status mapping, as upstream's scripts/arch-run.bash: exit status 1 (guest wrote 0 to 0xf4) is PASS;
another odd status (V << 1) | 1 means the guest exited with V: 77 is SKIP, anything else FAIL;
124 is a timeout (FAIL).
"""
from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 90.0
ARCH = "x86_64"


@dataclass
class KutEntry:
    name: str
    file: str
    smp: int = 1
    args: str = ""
    qemu_params: str = ""
    arch: str = ""
    groups: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class KutResult:
    entry: KutEntry
    status: str                 # PASS, FAIL, SKIP
    detail: str = ""            # "(10 tests)", "timeout; duration=90", a skip reason
    seconds: float = 0.0
    exit_status: int | None = None
    output: str = ""

    def line(self) -> str:
        """Upstream's result line: 'PASS name (N tests)' / 'FAIL name (timeout; duration=90)'."""
        return f"{self.status} {self.entry.name}" + (f" {self.detail}" if self.detail else "")


@dataclass
class QemuReference:
    result: str
    seconds: float | None


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_unittests_cfg(path: Path) -> list[KutEntry]:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.read_string(path.read_text())
    entries = []
    for name in cp.sections():
        sec = cp[name]
        args = _unquote(sec.get("test_args", sec.get("extra_params", "")))
        m = re.match(r"^\s*-append\s+(.*)$", args)  # old-style extra_params = -append 'x'
        if m:
            args = _unquote(m.group(1))
        timeout = sec.get("timeout", "")
        entries.append(KutEntry(
            name=name, file=sec.get("file", "").strip(), smp=int(_unquote(sec.get("smp", "1")) or 1), args=args,
            qemu_params=_unquote(sec.get("qemu_params", "")), arch=sec.get("arch", "").strip(),
            groups=tuple(sec.get("groups", "").split()),
            timeout=float(timeout.rstrip("s")) if timeout.strip() else DEFAULT_TIMEOUT))
    return entries


def parse_qemu_results(path: Path) -> dict[str, QemuReference]:
    """The markdown table of RESULTS-QEMU.md: | entry | command | result | seconds |."""
    refs: dict[str, QemuReference] = {}
    if not path.exists():
        return refs
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.match(r"^(PASS|FAIL|SKIP)", cells[2]):
            try:
                seconds = float(cells[3])
            except ValueError:
                seconds = None
            refs[cells[0]] = QemuReference(cells[2], seconds)
    return refs


def hvm_args_for(entry: KutEntry, directory: Path, timeout: float | None = None) -> list[str]:
    """The `hvm run` flags equivalent to upstream's QEMU command line for this entry."""
    args = ["run", "--kernel", str(directory / entry.file), "--vcpus", str(entry.smp), "--device", "pc-testdev",
            "--serial", "stdio", "--timeout", f"{timeout if timeout is not None else entry.timeout:g}"]
    if entry.args:
        args += ["--append", entry.args]
    params = shlex.split(entry.qemu_params)
    i = 0
    while i < len(params):
        p = params[i]
        if p in ("-machine", "-M") and i + 1 < len(params):
            for opt in params[i + 1].split(","):
                if opt == "pit=off":
                    args.append("--no-pit")
            i += 2
            continue
        if p == "-m" and i + 1 < len(params):
            args += ["--memory", params[i + 1]]
            i += 2
            continue
        i += 1
    return args


def run_entry(entry: KutEntry, directory: Path, timeout: float | None = None) -> KutResult:
    if entry.arch and entry.arch != ARCH:
        return KutResult(entry, "SKIP", f"({entry.arch} only)")
    binary = directory / entry.file
    if not binary.is_file():
        return KutResult(entry, "SKIP", f"(Test file '{binary}' not found)")
    limit = timeout if timeout is not None else entry.timeout
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "hvm", *hvm_args_for(entry, directory, limit)],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=limit + 30)
        status = proc.returncode
        output = proc.stdout.decode("utf-8", "replace")
        err = proc.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:  # hvm's own watchdog should have fired long before
        return KutResult(entry, "FAIL", f"(timeout; duration={limit:g})", time.monotonic() - t0)
    seconds = time.monotonic() - t0
    summary = ""
    for line in output.splitlines()[-5:]:
        if line.startswith("SUMMARY: "):
            summary = "(" + line[len("SUMMARY: "):].rstrip("\r") + ")"
    if status == 124:
        return KutResult(entry, "FAIL", f"(timeout; duration={limit:g})", seconds, status, output + err)
    if status & 1:
        code = status >> 1
        verdict = "PASS" if code == 0 else "SKIP" if code == 77 else "FAIL"
        return KutResult(entry, verdict, summary, seconds, status, output + err)
    reason = err.strip().splitlines()[0] if err.strip() else f"exit status {status}"
    return KutResult(entry, "FAIL", summary or f"({reason})", seconds, status, output + err)


def run_all(directory: Path, names: list[str] | None = None, groups: list[str] | None = None,
            timeout: float | None = None, out=sys.stdout, verbose: bool = False) -> list[KutResult]:
    entries = parse_unittests_cfg(directory / "unittests.cfg")
    if names:
        unknown = set(names) - {e.name for e in entries}
        if unknown:
            raise ValueError(f"no such entries in {directory / 'unittests.cfg'}: {', '.join(sorted(unknown))}")
        entries = [e for e in entries if e.name in names]
    if groups:
        entries = [e for e in entries if set(groups) & set(e.groups)]
    refs = parse_qemu_results(directory / "RESULTS-QEMU.md")
    results = []
    for entry in entries:
        result = run_entry(entry, directory, timeout)
        results.append(result)
        print(result.line(), file=out, flush=True)
        if verbose and result.status == "FAIL":
            print(result.output, file=out)
    print(format_table(results, refs), file=out)
    return results


def format_table(results: list[KutResult], refs: dict[str, QemuReference]) -> str:
    lines = ["", "| entry | hvm | hvm s | QEMU (same host) | QEMU s | parity |", "|---|---|---|---|---|---|"]
    parity = compared = 0
    for r in results:
        ref = refs.get(r.entry.name)
        hvm_cell = r.status + (f" {r.detail}" if r.detail and r.status != "SKIP" else "")
        if ref is None:
            q, qs, same = "-", "-", "-"
        else:
            compared += 1
            q = ref.result
            qs = f"{ref.seconds:.1f}" if ref.seconds is not None else "-"
            ok = (r.status == "PASS") or not ref.result.startswith("PASS")
            parity += ok
            same = "yes" if ok else "NO"
        lines.append(f"| {r.entry.name} | {hvm_cell} | {r.seconds:.1f} | {q} | {qs} | {same} |")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP of {len(results)}"
                 + (f"; every entry QEMU passes here, hvm passes: {parity}/{compared}" if compared else ""))
    return "\n".join(lines)
