"""Linux boot, hvm beside QEMU: the same kernel, initramfs and final command line, one run each; the wall
time (from just before fork) at which each console milestone first appears on the serial console.

On a host whose KVM backend emulates guest kernel code (kvm_pvm) QEMU stops at the first instruction the
backend cannot emulate: KVM reports an internal error (emulation failure), QEMU prints a register dump
on stderr and pauses the VM. That is detected on stderr; QEMU is then killed and the row says where it
stopped. The ratio compares the time to the last milestone both VMMs reached."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

from bench.common import QEMU, ROOT, Figure, Row, have_qemu, hvm_command

LINUX_BUILD = ROOT / "build" / "linux"
KERNEL_ELF = LINUX_BUILD / "vmlinux-minimal"        # 64-bit ELF with a PVH note: hvm and QEMU microvm boot it
KERNEL_BZ = LINUX_BUILD / "bzImage-minimal"         # QEMU's fallback if it cannot boot the ELF
INITRD = LINUX_BUILD / "initramfs-ud2.cpio"         # /init executes ud2: the kernel panics once init runs
BASE_CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1"
MEM = "256M"
MILESTONES = ("Linux version", "Freeing SMP alternatives", "Run /init as init process")
HVM_TIMEOUT = 240           # hvm's own --timeout
HVM_WALL = HVM_TIMEOUT + 20
QEMU_WALL = 120.0
QEMU_ERROR = re.compile(r"KVM internal error|emulation failure|KVM: entry failed|error: kvm run failed")
STAMP = re.compile(r"^\[\s*[0-9.]+\]\s*")
GRACE = 1.0                 # after QEMU's error line: let it finish its register dump, then kill it
LINUX_TITLE = "Linux boot to `Run /init`: time to each console milestone (vmlinux-minimal 6.12, initramfs-ud2, 256 MiB)"
LINUX_REF = "QEMU -M microvm -accel kvm, same kernel, initrd and command line"
# The figure before issue 16 trimmed the kernel (guest/linux/README.md "Boot time"), for the note.
PREVIOUS = ("previous figure 35.6 s (2026-12-01, before issue 16's kernel trim and noreplace-smp; "
            "42-50 s in earlier make bench runs)")
# The linux.init row's reference: that figure, recorded (hvm at 9990a57 with the kernel of that day), not re-run.
PREVIOUS_INIT_S = 35.6
INIT_GOAL_S = 20.0
INIT_TITLE = "Linux to `Run /init` under hvm (vmlinux-minimal 6.12, initramfs-ud2, 256 MiB)"
INIT_REF = "hvm before issue 16 (recorded 2026-12-01 05:47 UTC: kernel and command line of that day)"
# the instruction at the <byte> of QEMU's Code= line
OPCODES = {"cc": "INT3", "9b": "FWAIT", "cd": "INT n", "f4": "HLT", "0f": "a 0F-prefixed instruction"}


def host_cmdline() -> tuple[str, list[str]]:
    """The command line hvm ends up giving the kernel: the base plus the options hvm adds on this host."""
    try:
        from hvm.host import detect
        extra = list(detect().linux_cmdline or [])
    except Exception:       # noqa: BLE001 - no host profile: no extra options
        extra = []
    return " ".join([BASE_CMDLINE] + extra), extra


def watch_console(argv: list[str], wall: float, stop_on_stderr: re.Pattern | None = None) -> dict:
    """Run argv, reading its stdout and stderr as they come; record when each milestone line first
    appears (seconds since just before fork). Kill it at `wall` seconds, or GRACE s after a stderr line
    matches `stop_on_stderr`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = b"", b""
    seen: dict[str, float] = {}
    lines_at: dict[str, float] = {}     # console line without its printk time stamp -> seconds
    last_line, last_line_at = "", 0.0
    error_at = None
    killed = None
    fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    try:
        while fds:
            now = time.perf_counter() - t0
            limit = wall if error_at is None else min(wall, error_at + GRACE)
            if now >= limit:
                killed = "wall limit" if error_at is None else "error"
                os.kill(proc.pid, signal.SIGKILL)
                break
            ready, _, _ = select.select(list(fds), [], [], limit - now)
            at = time.perf_counter() - t0
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del fds[fd]
                    continue
                if fds[fd] == "out":
                    start = out.rfind(b"\n") + 1
                    out += chunk
                    text = out[start:].decode("utf-8", "replace")
                    for m in MILESTONES:
                        if m not in seen and m in text:
                            seen[m] = at
                    for ln in text.splitlines(keepends=True):
                        if ln.endswith("\n"):      # a complete line: when it first appeared
                            lines_at.setdefault(STAMP.sub("", ln).strip(), at)
                    lines = [ln for ln in out[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
                    if lines and lines[-1] != last_line:
                        last_line, last_line_at = lines[-1], at
                else:
                    err += chunk
                    if stop_on_stderr is not None and error_at is None and \
                            stop_on_stderr.search(err.decode("utf-8", "replace")):
                        error_at = at
    finally:
        if not fds and killed is None:      # both pipes closed: the child is exiting, let it
            try:
                proc.wait(max(1.0, wall - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None and killed is None:
            killed = "wall limit"
            os.kill(proc.pid, signal.SIGKILL)
        status = proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    return {"argv": argv, "status": status, "seconds": time.perf_counter() - t0, "killed": killed,
            "milestones": seen, "last_line": last_line, "last_line_at": last_line_at, "error_at": error_at,
            "lines_at": lines_at, "console": out[-200000:].decode("utf-8", "replace"), "stderr": err[-6000:].decode("utf-8", "replace"),
            "console_cmdline": _console_cmdline(out.decode("utf-8", "replace"))}


def _console_cmdline(console: str) -> str | None:
    m = re.search(r"Command line: (.*)", console)
    return m[1].strip() if m else None


def qemu_error_summary(stderr: str) -> str:
    """'KVM internal error. Suberror: 1 (emulation failure) at RIP=... on <cc> (INT3)' from QEMU's dump."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    head = next((ln for ln in lines if QEMU_ERROR.search(ln)), lines[-1] if lines else "no message")
    parts = [head]
    if any(ln == "emulation failure" for ln in lines) and "emulation failure" not in head:
        parts.append("(emulation failure)")
    rip = re.search(r"RIP=([0-9a-f]+)", stderr)
    code = re.search(r"Code=.*?<([0-9a-f]{2})>((?: [0-9a-f]{2}){0,3})", stderr)
    if rip:
        parts.append(f"at RIP={rip[1]}")
    if code:
        parts.append(f"on <{code[1]}>{code[2]} ({OPCODES.get(code[1], 'opcode ' + code[1])})")
    return " ".join(parts)


def _ms(run: dict) -> str:
    return ", ".join(f"{m!r} {run['milestones'][m]:.1f} s" for m in MILESTONES if m in run["milestones"]) or "none"


def bench_linux(quick: bool, log) -> tuple[list[Row], dict]:
    """linux.boot (hvm beside QEMU, to the last milestone both reach) and linux.init (hvm to "Run /init",
    beside the figure before issue 16), from one boot under each VMM."""
    rows, raw = _bench_boot(quick, log)
    boot = rows[0]
    milestones = (raw.get("hvm") or {}).get("milestones") or {}
    init = MILESTONES[-1]
    if boot.status == "skipped" and not milestones:
        rows.append(Row("linux.init", INIT_TITLE, INIT_REF, status="skipped", note=boot.note))
    elif init not in milestones:
        rows.append(Row("linux.init", INIT_TITLE, INIT_REF, status="error",
                        note=f"hvm never printed {init!r}: {boot.note[:200]}"))
    else:
        t = milestones[init]
        rows.append(Row("linux.init", INIT_TITLE, INIT_REF, Figure("s", [t]), Figure("s", [PREVIOUS_INIT_S]),
                        "hvm now/hvm before, time from fork to 'Run /init as init process'",
                        f"goal ≤ {INIT_GOAL_S:g} s: {'met' if t <= INIT_GOAL_S else 'not met'} ({t:.1f} s); "
                        "what was trimmed and what each saved: guest/linux/README.md, 'Boot time'; "
                        "one boot (the linux.boot row's)"))
    return rows, raw


def _bench_boot(quick: bool, log) -> tuple[list[Row], dict]:
    if quick:
        return [Row("linux.boot", LINUX_TITLE, LINUX_REF, status="skipped",
                    note="skipped in quick mode (a boot takes about a minute here)")], {"status": "skipped"}
    missing = [p.name for p in (KERNEL_ELF, KERNEL_BZ, INITRD) if not p.is_file()]
    if missing:
        return [Row("linux.boot", LINUX_TITLE, LINUX_REF, status="skipped",
                    note=f"skipped: run make linux first ({', '.join(missing)} missing)")], {"status": "skipped"}
    cmdline, extra = host_cmdline()
    hvm_argv = hvm_command() + ["run", "--kernel", str(KERNEL_ELF), "--initrd", str(INITRD), "--append",
                                BASE_CMDLINE, "-m", MEM, "--timeout", str(HVM_TIMEOUT), "--serial", "stdio", "--stats"]
    log(f"  linux: hvm run (up to {HVM_TIMEOUT} s) ...")
    hvm = watch_console(hvm_argv, HVM_WALL)
    log(f"  linux: hvm status {hvm['status']} after {hvm['seconds']:.1f} s; milestones: {_ms(hvm)}")
    raw: dict = {"cmdline": cmdline, "host_options": extra, "hvm": hvm}
    if not hvm["milestones"]:
        tail = (hvm["stderr"].strip() or hvm["last_line"])[-200:]
        return [Row("linux.boot", LINUX_TITLE, LINUX_REF, status="error",
                    note=f"hvm reached no milestone (status {hvm['status']}): {tail}")], raw
    if not have_qemu():
        return [Row("linux.boot", LINUX_TITLE, LINUX_REF, Figure("s", [max(hvm["milestones"].values())]),
                    status="skipped", note=f"{QEMU} not found; hvm: {_ms(hvm)}")], raw

    qemu_base = [QEMU, "-M", "microvm", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
                 "-serial", "stdio", "-m", MEM, "-initrd", str(INITRD), "-append", cmdline]
    qemu, kernel_used = None, None
    for kernel in (KERNEL_ELF, KERNEL_BZ):      # microvm boots the PVH ELF; the bzImage is the fallback
        log(f"  linux: QEMU microvm -kernel {kernel.name} (up to {QEMU_WALL:g} s) ...")
        qemu = watch_console(qemu_base + ["-kernel", str(kernel)], QEMU_WALL, QEMU_ERROR)
        kernel_used = kernel.name
        if qemu["milestones"]:
            break
        log(f"  linux: QEMU with {kernel.name} printed no milestone: {qemu['stderr'].strip()[-300:]}")
    raw.update(qemu=qemu, qemu_kernel=kernel_used)
    log(f"  linux: QEMU {'stopped' if qemu['error_at'] is not None else 'ran'} after {qemu['seconds']:.1f} s; "
        f"milestones: {_ms(qemu)}")

    notes = [f"hvm ({KERNEL_ELF.name}): {_ms(hvm)}; exit status {hvm['status']}"
             + (" (init killed by SIGILL: kernel panic)" if hvm["status"] == 4 else "")
             + (f", killed at the {HVM_WALL} s wall limit" if hvm["killed"] else "")]
    notes.append(f"QEMU (-kernel {kernel_used}): {_ms(qemu)}")
    if qemu["error_at"] is not None:
        reached = [m for m in MILESTONES if m in qemu["milestones"]]
        where = f"{reached[-1]!r}" if reached else f"line {qemu['last_line'][:80]!r}"
        notes.append(f"QEMU stopped at {where} (last console line {qemu['last_line'][:100]!r}) after "
                     f"{qemu['error_at']:.1f} s: {qemu_error_summary(qemu['stderr'])}")
    elif qemu["killed"]:
        notes.append(f"QEMU killed at the {QEMU_WALL:g} s wall limit; last console line {qemu['last_line'][:100]!r}")
    unprinted = [m for m in MILESTONES if m not in hvm["milestones"] and any(
        hvm["milestones"][n] for n in MILESTONES[MILESTONES.index(m) + 1:] if n in hvm["milestones"])]
    if unprinted:
        notes.append(f"{', '.join(map(repr, unprinted))} never printed by this kernel (hvm got past it)")
    if qemu["error_at"] is not None and qemu["last_line"]:
        last = STAMP.sub("", qemu["last_line"]).strip()
        if last in hvm["lines_at"] and last in qemu["lines_at"]:
            notes.append(f"QEMU's last line {last[:60]!r}: hvm {hvm['lines_at'][last]:.1f} s, "
                         f"QEMU {qemu['lines_at'][last]:.1f} s "
                         f"(ratio {hvm['lines_at'][last] / qemu['lines_at'][last]:.2f})")
    exits = re.search(r"exits: (\d+) total\n((?:  \S.*\n)*)", hvm["stderr"])
    if exits:
        reasons = [" ".join(ln.split()) for ln in exits[2].splitlines()][:4]
        notes.append(f"hvm --stats: {int(exits[1]):,} exits in the whole run ({', '.join(reasons)})")
    if hvm["console_cmdline"] and qemu["console_cmdline"] and hvm["console_cmdline"] != qemu["console_cmdline"]:
        notes.append(f"the kernels saw different command lines: hvm {hvm['console_cmdline']!r}, "
                     f"QEMU {qemu['console_cmdline']!r}")
    else:
        notes.append("same final command line for both (hvm's host options passed to QEMU too)")
    notes.append("times from fork, one run each")
    init = MILESTONES[-1]
    notes.insert(0, f"hvm to {init!r}: " + (f"{hvm['milestones'][init]:.1f} s" if init in hvm["milestones"]
                                            else "not reached") + f"; {PREVIOUS}")

    common = [m for m in MILESTONES if m in hvm["milestones"] and m in qemu["milestones"]]
    if not common:
        notes.insert(0, "no ratio: QEMU reached no milestone")
        return [Row("linux.boot", LINUX_TITLE, LINUX_REF, Figure("s", [max(hvm["milestones"].values())]),
                    ratio_of="", note="; ".join(notes))], raw
    m = common[-1]
    return [Row("linux.boot", LINUX_TITLE, LINUX_REF, Figure("s", [hvm["milestones"][m]]),
                Figure("s", [qemu["milestones"][m]]), f"hvm/QEMU time to {m!r} (the last milestone both reached)",
                "; ".join(notes))], raw
