"""Run kvm-unit-tests guests under hvm the way upstream's runner runs them under QEMU.

Reads upstream's unittests.cfg (INI: file, smp, test_args / extra_params, qemu_params, arch, groups,
timeout), runs each x86_64 entry whose binary is present as `hvm run` with the same meaning as
`qemu-system-x86_64 ... -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel X -smp N
-append ARGS`, and reports PASS/FAIL/SKIP per entry in upstream's format, with QEMU's results on the
same host (RESULTS-QEMU.md beside the binaries) side by side.

Status mapping, as upstream's scripts/arch-run.bash: exit status 1 (guest wrote 0 to 0xf4) is PASS;
another odd status (V << 1) | 1 means the guest exited with V: 77 is SKIP, anything else FAIL;
124 is a timeout (FAIL).

A bad entry (a quote that does not close, an smp that is not a number) fails that entry alone, with the file
and line in its result; a file that is not a unittests.cfg at all is a `KutError` (one line, status 2). Each
`hvm run` child runs in its own session, so that SIGINT/SIGTERM to the runner (`Interrupted`) kills the
child's whole process group before the runner ends, and its output goes to temporary files of which only
the tail is kept in memory.
"""
from __future__ import annotations

import ast
import configparser
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hvm.files import HostFileError, read_regular_file

DEFAULT_TIMEOUT = 90.0
MAX_TIMEOUT = 24 * 3600.0          # seconds: a test that needs more than a day is a typo
MAX_SMP = 64                       # as hvm's own vcpus limit
CFG_MAX_BYTES = 4 << 20            # upstream's whole x86/unittests.cfg is ~20 KiB
RESULTS_MAX_BYTES = 4 << 20
OUTPUT_TAIL = 1 << 20              # bytes of a child's stdout/stderr kept for the result
KILL_GRACE = 5.0                   # seconds between SIGTERM and SIGKILL to a child's process group
ARCH = "x86_64"


class KutError(ValueError):
    """unittests.cfg (or the command line) cannot be used at all: one line naming the file."""


class Interrupted(Exception):
    """The runner got SIGINT/SIGTERM/SIGHUP; the running child's process group has been killed."""

    def __init__(self, signo: int):
        super().__init__(f"interrupted by signal {signo}")
        self.signo = signo


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
    error: str = ""             # why this entry cannot run ("unittests.cfg:12: qemu_params: ..."): a FAIL


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


def _read_text(path: Path, what: str, max_bytes: int) -> str:
    try:
        return read_regular_file(path, what, max_bytes).decode("utf-8")
    except HostFileError as e:
        raise KutError(str(e)) from None
    except UnicodeDecodeError as e:
        raise KutError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _section_lines(text: str) -> dict[str, int]:
    """Line number of each [section] header (configparser does not keep them), for messages."""
    lines: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[([^]]+)\]", line)
        if m:
            lines.setdefault(m.group(1), n)
    return lines


def _entry(name: str, sec: configparser.SectionProxy, where: str) -> KutEntry:
    """One section as a KutEntry; a value that cannot be used is kept as the entry's `error`."""
    entry = KutEntry(name=name, file=sec.get("file", "").strip(), arch=sec.get("arch", "").strip(),
                     groups=tuple(sec.get("groups", "").split()))
    try:
        args = _unquote(sec.get("test_args", sec.get("extra_params", "")))
        m = re.match(r"^\s*-append\s+(.*)$", args)  # old-style extra_params = -append 'x'
        if m:
            args = _unquote(m.group(1))
        entry.args = args
        entry.qemu_params = _unquote(sec.get("qemu_params", ""))
        field = "qemu_params"
        shlex.split(entry.qemu_params)            # checked now, so a bad quote fails this entry alone
        field = "smp"
        raw = _unquote(sec.get("smp", "1")) or "1"
        try:
            entry.smp = int(raw, 0)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not 1 <= entry.smp <= MAX_SMP:
            raise ValueError(f"{entry.smp} is not in 1..{MAX_SMP}")
        field = "timeout"
        raw = sec.get("timeout", "").strip()
        if raw:
            try:
                entry.timeout = float(raw.rstrip("s"))
            except ValueError:
                raise ValueError(f"{raw!r} is not a number of seconds") from None
            if not (math.isfinite(entry.timeout) and 0 < entry.timeout <= MAX_TIMEOUT):
                raise ValueError(f"{raw!r} is not in (0, {MAX_TIMEOUT:g}] seconds")
        field = "file"
        if not entry.file:
            raise ValueError("missing: which binary to run")
    except ValueError as e:
        entry.error = f"{where}: {field}: {e}"
    return entry


def parse_unittests_cfg(path: Path) -> list[KutEntry]:
    text = _read_text(path, "unittests.cfg", CFG_MAX_BYTES)
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cp.read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as e:
        raise KutError(f"{path}:{e.lineno}: not a unittests.cfg: {e.line.strip()!r} comes before any [entry] "
                       "header") from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]              # line as configparser quotes it: repr() of the raw line
        try:
            line = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            pass
        raise KutError(f"{path}:{lineno}: cannot parse {str(line).strip()!r}") from None
    except configparser.Error as e:
        raise KutError(f"{path}: {e.message.splitlines()[0]}") from None
    lines = _section_lines(text)
    return [_entry(name, cp[name], f"{path}:{lines.get(name, '?')}") for name in cp.sections()]


def parse_qemu_results(path: Path) -> dict[str, QemuReference]:
    """The markdown table of RESULTS-QEMU.md: | entry | command | result | seconds |, or the upstream tree's
    | entry | QEMU here |."""
    refs: dict[str, QemuReference] = {}
    if not path.exists():
        return refs
    for line in _read_text(path, "QEMU results", RESULTS_MAX_BYTES).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.match(r"^(PASS|FAIL|SKIP)", cells[2]):
            try:
                seconds = float(cells[3])
            except ValueError:
                seconds = None
            refs[cells[0]] = QemuReference(cells[2], seconds)
        elif len(cells) == 2 and re.match(r"^(PASS|FAIL|SKIP)", cells[1]):   # upstream/: | entry | QEMU here |
            refs[cells[0]] = QemuReference(cells[1], None)
    return refs


# What upstream's x86/run puts before each entry's own flags (its QEMU command line's common prefix).
QEMU_PREFIX = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard", "-device", "pc-testdev",
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
               "-device", "pci-testdev", "-machine", "accel=kvm"]


def qemu_args_for(entry: KutEntry, directory: Path, accel: str = "kvm") -> list[str]:
    """Upstream's QEMU command line for this entry (after the binary): x86/run KERNEL -smp N -append ARGS PARAMS;
    `accel` is x86/run's -machine accel= ($ACCEL: kvm or tcg)."""
    prefix = QEMU_PREFIX[:-1] + [f"accel={accel}"]
    args = prefix + ["-kernel", str(directory / entry.file), "-smp", str(entry.smp)]
    if entry.args:
        args += ["-append", entry.args]
    return args + shlex.split(entry.qemu_params)


def hvm_args_for(entry: KutEntry, directory: Path, timeout: float | None = None, accel: str = "kvm") -> list[str]:
    """The `hvm run` flags for this entry: upstream's QEMU command line through hvm-qemu's own translation, so
    both ways of running an entry mean the same. Raises hvm.qemu_shim.ShimError for a flag hvm cannot honour
    (-cpu with a feature this host cannot give, q35, intel-iommu): upstream's runner makes that a SKIP."""
    from hvm.qemu_shim import check_cpu_arg, drop_tcg_cpu, translate

    args = translate(qemu_args_for(entry, directory, accel))
    drop_tcg_cpu(args)
    if "--cpu" in args:
        check_cpu_arg(args[args.index("--cpu") + 1])
    return args + ["--timeout", f"{timeout if timeout is not None else entry.timeout:g}"]


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - OUTPUT_TAIL))
    return f.read().decode("utf-8", "replace")


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def kill_group(proc: subprocess.Popen) -> None:
    """End a child started in its own session and everything it started: SIGTERM to the group (hvm run
    then stops its vCPUs and restores the terminal), SIGKILL after KILL_GRACE seconds; always reaped.
    A second Ctrl-C meanwhile waits until this is done (blocked), so it cannot leave the child behind."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for signo, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, signo)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run_entry(entry: KutEntry, directory: Path, timeout: float | None = None, accel: str = "kvm") -> KutResult:
    if entry.error:
        return KutResult(entry, "FAIL", f"({entry.error})")
    if entry.arch and entry.arch != ARCH:
        return KutResult(entry, "SKIP", f"({entry.arch} only)")
    binary = directory / entry.file
    if not binary.is_file():
        return KutResult(entry, "SKIP", f"(Test file '{binary}' not found)")
    limit = timeout if timeout is not None else entry.timeout
    from hvm.qemu_shim import ShimError

    try:
        args = hvm_args_for(entry, directory, limit, accel)
    except ShimError as e:     # as upstream's runner: QEMU refused the command line before loading the kernel
        return KutResult(entry, "SKIP", f"(hvm-qemu: {e})")
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        # Its own session: a Ctrl-C at the terminal reaches the runner alone, and the runner can end the
        # child with everything it started (kill_group) instead of leaving it behind.
        # A stop signal between the fork and the `try` would leave the child running: it is held until
        # the `try` below, where it kills the child (Python runs handlers between bytecodes, so the
        # pending signal is raised right after the mask is restored, inside the `try`).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "hvm", *args],
                                    stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, start_new_session=True)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            raise
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            status = proc.wait(timeout=limit + 30)
        except subprocess.TimeoutExpired:  # hvm's own watchdog should have fired long before
            kill_group(proc)
            return KutResult(entry, "FAIL", f"(timeout; duration={limit:g})", time.monotonic() - t0)
        except BaseException:              # Interrupted, KeyboardInterrupt: the child goes with the runner
            kill_group(proc)
            raise
        output, err = _tail(out_f), _tail(err_f)
    seconds = time.monotonic() - t0
    summary = ""
    for line in output.splitlines()[-5:]:
        if line.startswith("SUMMARY: "):
            summary = "(" + line[len("SUMMARY: "):].rstrip("\r") + ")"
    if status == 124:
        return KutResult(entry, "FAIL", f"(timeout; duration={limit:g})", seconds, status, output + err)
    if status < 0:                         # killed by a signal from outside (the OOM killer, a user)
        return KutResult(entry, "FAIL", f"(hvm killed by signal {-status})", seconds, status, output + err)
    if status & 1:
        code = status >> 1
        verdict = "PASS" if code == 0 else "SKIP" if code == 77 else "FAIL"
        return KutResult(entry, verdict, summary, seconds, status, output + err)
    reason = err.strip().splitlines()[0] if err.strip() else f"exit status {status}"
    return KutResult(entry, "FAIL", summary or f"({reason})", seconds, status, output + err)


def run_all(directory: Path, names: list[str] | None = None, groups: list[str] | None = None,
            timeout: float | None = None, out=sys.stdout, verbose: bool = False,
            accel: str = "kvm") -> list[KutResult]:
    entries = parse_unittests_cfg(directory / "unittests.cfg")
    if names:
        unknown = set(names) - {e.name for e in entries}
        if unknown:
            raise KutError(f"{directory / 'unittests.cfg'}: no such entries: {', '.join(sorted(unknown))}")
        entries = [e for e in entries if e.name in names]
    if groups:
        entries = [e for e in entries if set(groups) & set(e.groups)]
    refs = parse_qemu_results(directory / "RESULTS-QEMU.md")
    results = []
    for entry in entries:
        result = run_entry(entry, directory, timeout, accel)
        results.append(result)
        print(result.line(), file=out, flush=True)
        if verbose and result.status == "FAIL":
            print(result.output, file=out)
    print(format_table(results, refs), file=out)
    return results


def format_table(results: list[KutResult], refs: dict[str, QemuReference]) -> str:
    """The side-by-side table; `parity` is "yes" where hvm passes or QEMU does not (an entry QEMU passes here
    and hvm does not is "NO"), "better" where hvm passes an entry QEMU does not pass here."""
    lines = ["", "| entry | hvm | hvm s | QEMU (same host) | QEMU s | parity |", "|---|---|---|---|---|---|"]
    qemu_passes = parity = better = 0
    for r in results:
        ref = refs.get(r.entry.name)
        hvm_cell = r.status + (f" {r.detail}" if r.detail else "")
        if ref is None:
            q, qs, same = "-", "-", "-"
        else:
            q = ref.result
            qs = f"{ref.seconds:.1f}" if ref.seconds is not None else "-"
            qemu_pass = ref.result.startswith("PASS")
            qemu_passes += qemu_pass
            parity += qemu_pass and r.status == "PASS"
            better += not qemu_pass and r.status == "PASS"
            same = ("better" if r.status == "PASS" and not qemu_pass else
                    "NO" if qemu_pass and r.status != "PASS" else "yes")
        lines.append(f"| {r.entry.name} | {hvm_cell} | {r.seconds:.1f} | {q} | {qs} | {same} |")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP of {len(results)}"
                 + (f"; every entry QEMU passes here, hvm passes: {parity}/{qemu_passes}; hvm passes {better} "
                    "that QEMU does not" if refs else ""))
    return "\n".join(lines)


# --- upstream's own runner ------------------------------------------------------------------------------
# A built kvm-unit-tests tree (run_tests.sh, scripts/, x86/unittests.cfg, x86/*.flat) is run by upstream's
# run_tests.sh itself, with QEMU=hvm-qemu: the same runner, the same command lines and the same verdicts as
# under QEMU. The tree is copied first (the runner writes logs/ and may sit on a read-only share) and its
# config.mak is pointed at the copy's errata.txt (a tree built elsewhere names its build folder).
RESULT_LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+)(?: (.*))?$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COPY_MAX_BYTES = 256 << 20          # upstream's built x86 tree is ~30 MiB; a folder far bigger is not one


ARCH_DIR = "x86"


def is_upstream_tree(directory: Path) -> bool:
    return (directory / "run_tests.sh").is_file() and (directory / ARCH_DIR / "unittests.cfg").is_file()


def _copy_tree(directory: Path, dest: Path) -> None:
    total = 0

    def ignore(folder: str, names: list[str]) -> list[str]:
        nonlocal total
        skipped = [n for n in names if n == "logs" and Path(folder) == directory]
        for n in names:
            p = Path(folder) / n
            if n not in skipped and p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        if total > COPY_MAX_BYTES:
            raise KutError(f"{directory}: more than {COPY_MAX_BYTES >> 20} MiB: not a kvm-unit-tests tree")
        return skipped

    import shutil

    try:
        shutil.copytree(directory, dest, symlinks=True, ignore=ignore)
    except OSError as e:
        raise KutError(f"{directory}: cannot copy the tree: {e}") from None
    config = dest / "config.mak"
    if config.is_file():
        text = config.read_text("utf-8", "replace")
        text = re.sub(r"(?m)^ERRATATXT=.*$", f"ERRATATXT={dest / 'errata.txt'}", text)
        config.write_text(text)


def _shim_script(folder: Path) -> Path:
    """An executable `hvm-qemu` that runs this very hvm (this interpreter, this package), whatever PATH says."""
    package_root = Path(__file__).resolve().parent.parent
    script = folder / "hvm-qemu"
    script.write_text("#!/bin/sh\n"
                      f"PYTHONPATH={shlex.quote(str(package_root))}${{PYTHONPATH:+:$PYTHONPATH}} "
                      f"exec {shlex.quote(sys.executable)} -m hvm.qemu_shim \"$@\"\n")
    script.chmod(0o755)
    return script


def run_upstream(directory: Path, names: list[str] | None = None, groups: list[str] | None = None,
                 timeout: float | None = None, out=sys.stdout, verbose: bool = False,
                 logs: Path | None = None, accel: str = "kvm") -> list[KutResult]:
    """Upstream's run_tests.sh on a copy of `directory`, driving hvm through hvm-qemu; results as run_all's.
    `accel` becomes the runner's ACCEL (x86/run passes it as -machine accel=, hvm-qemu as --accel)."""
    entries = {e.name: e for e in parse_unittests_cfg(directory / ARCH_DIR / "unittests.cfg")}
    if names:
        unknown = set(names) - set(entries)
        if unknown:
            raise KutError(f"{directory / ARCH_DIR / 'unittests.cfg'}: no such entries: {', '.join(sorted(unknown))}")
    refs = parse_qemu_results(directory / "RESULTS-QEMU.md")
    results: list[KutResult] = []
    with tempfile.TemporaryDirectory(prefix="hvm-kut-") as tmp:
        tree = Path(tmp) / "tree"
        _copy_tree(directory, tree)
        env = dict(os.environ, QEMU=str(_shim_script(Path(tmp))))
        env["ACCEL"] = accel
        if timeout is not None:
            env["TIMEOUT"] = f"{timeout:g}"
        cmd = ["./run_tests.sh", "-v"]
        for g in groups or ():
            cmd += ["-g", g]
        cmd += list(names or ())
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            raise KutError(f"{directory / 'run_tests.sh'}: cannot run it: {e.strerror}") from None
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            t0 = time.monotonic()
            for raw in proc.stdout:
                line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")
                m = RESULT_LINE.match(line)
                if m is None:
                    if verbose:
                        print(line, file=out, flush=True)
                    continue
                status, name, detail = m.group(1), m.group(2), m.group(3) or ""
                now = time.monotonic()
                entry = entries.get(name) or KutEntry(name=name, file="?")
                log = tree / "logs" / f"{name}.log"
                output = ""
                if status == "FAIL" and verbose and log.is_file():
                    output = _read_log_tail(log)
                result = KutResult(entry, status, detail, now - t0, None, output)
                t0 = now
                results.append(result)
                print(result.line(), file=out, flush=True)
                if output:
                    print(output, file=out)
            proc.wait()
        except BaseException:
            kill_group(proc)
            raise
        finally:
            proc.stdout.close()
        copy_error = None
        if logs is not None and (tree / "logs").is_dir():
            import shutil

            try:
                shutil.copytree(tree / "logs", logs, dirs_exist_ok=True)
            except (OSError, shutil.Error) as e:   # --logs is the user's: one line, after the results
                copy_error = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    print(format_table(results, refs), file=out)
    if copy_error is not None:
        raise KutError(f"kut: --logs {logs}: cannot copy the runner's logs: {copy_error}")
    return results


def _read_log_tail(path: Path) -> str:
    with open(path, "rb") as f:
        return _tail(f)
