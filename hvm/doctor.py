"""`hvm doctor`: what this host's KVM can do, measured in about a second by tiny probe guests
(firmware/probe.S), run on the backend as it is (no CPUID hiding, no emulation completed by hvm)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvm.config import FlatBoot, VmSpec
from hvm.console import Console
from hvm.host import detect
from hvm.kvm import Kvm, KvmError
from hvm.kvm import constants as kc
from hvm.machine import Machine
from hvm.trace.tracer import TraceConfig

PROBE_IMAGE = Path(__file__).resolve().parent.parent / "firmware" / "build" / "probe.bin"
PROBES = {"pio": 0, "cpl0": 1, "cpl3": 2, "syscall": 3, "int80": 4, "sysenter": 5, "cmpxchg16b": 6,
          "xsave": 7, "int3": 8, "fwait": 9, "cpuid": 10, "movbe": 11, "clac": 12, "clwb": 13, "xgetbv": 14,
          "rdpru": 15, "intn": 16, "avx": 17, "mmx": 18, "npstack": 19}
REPORT_PORT = 0x80
CAPS = ("IRQCHIP", "USER_MEMORY", "SET_TSS_ADDR", "PIT2", "IMMEDIATE_EXIT", "IRQFD", "IOEVENTFD", "READONLY_MEM",
        "INTERNAL_ERROR_DATA", "VCPU_EVENTS", "MP_STATE")


@dataclass
class ProbeRun:
    reason: str                          # RunResult.reason: "debug-exit" when the probe finished
    reports: list[tuple[int, int]] = field(default_factory=list)   # (monotonic ns, value) on port 0x80
    crash: str = ""
    exits: int = 0
    seconds: float = 0.0
    completed: dict[str, int] = field(default_factory=dict)   # emulation failures hvm completed (--stats)


def run_probe(name: str, iterations: int = 0, timeout: float = 10.0, image: Path = PROBE_IMAGE,
              adapt_to_host: bool = False, trace: bool = True, accel: str = "kvm") -> ProbeRun:
    spec = VmSpec(name=f"probe-{name}", boot=FlatBoot(image, 0x100000, 0x100000, "long",
                                                       (("rdi", PROBES[name]), ("rsi", iterations))),
                  memory=8 << 20, timeout=timeout, machine="none", irqchip=False, pit=False, serial=None,
                  accel=accel)
    config = TraceConfig(filter=f"port={REPORT_PORT},dir=out", memory=True) if trace else None
    with Machine(spec, console=Console("none", "none"), adapt_to_host=adapt_to_host, trace=config) as vm:
        run = ProbeRun("")
        t0 = time.monotonic()
        result = vm.run()
        run.seconds = time.monotonic() - t0
        if trace:
            run.reports = [(e.t_ns, e.value) for e in vm.exits()]
        run.reason = result.reason
        stats = vm.stats()
        run.exits = stats.total
        run.completed = dict(stats.completed)
        if result.crash is not None:
            run.crash = result.crash.reason + (": " + result.crash.detail if result.crash.detail else "")
        return run


def _loop_rate(name: str, target_s: float = 0.15, start: int = 1000, accel: str = "kvm") -> tuple[float, int]:
    """Loop iterations per second at a privilege level, doubling the count until the loop lasts long
    enough to time (as kvm-unit-tests' vmexit does). Each iteration is two instructions."""
    n = start
    while True:
        run = run_probe(name, n, accel=accel)
        marks = [t for t, v in run.reports if v in (1, 2)]
        if run.reason != "debug-exit" or len(marks) != 2:
            raise RuntimeError(f"probe {name} failed: {run.reason} {run.crash}")
        elapsed = (marks[1] - marks[0]) / 1e9
        if elapsed >= target_s or n >= 1 << 34:
            return 2 * n / elapsed, n
        n = int(n * min(64, max(2, target_s / max(elapsed, 1e-6) * 1.2)))


def _describe_entry(name: str) -> tuple[bool, str]:
    """Does a user->kernel transition reach the guest kernel? (ok, text)"""
    run = run_probe(name)
    tags = {(v >> 8) & 0xFF: v & 0xFF for _, v in run.reports if v > 2}
    if run.crash:
        return False, f"KVM error: {run.crash}"
    if not tags:
        return False, "nothing arrived"
    tag, cs = next(iter(tags.items()))
    where = chr(tag)
    if where in "SIE":
        if cs & 3 == 0:
            return True, "reaches the guest kernel (CPL0)"
        return False, f"arrives at the entry point still at CPL{cs & 3} (CS={cs:#x})"
    names = {"U": "#UD", "G": "#GP", "P": "#PF", "X": "an unexpected exception"}
    return False, f"raises {names.get(where, where)} instead"


def _describe_insn(name: str) -> tuple[bool, str]:
    run = run_probe(name)
    tags = [chr((v >> 8) & 0xFF) for _, v in run.reports if v >> 16 == 0 and v & 0xFF == 0x08]
    done = "K" in tags
    if done and run.reason == "debug-exit":
        if name == "movbe" and "U" in tags:      # the guest's CPUID has MOVBE, KVM's emulator raises #UD
            return False, "raises #UD although the guest's CPUID has MOVBE"
        return True, "works"
    if run.crash:
        return False, f"cannot be emulated ({run.crash.split(';')[0]})"
    return False, f"did not complete ({run.reason})"


def _diagnose_tcg(out) -> dict:
    """The binary-translation accelerator (hvm/vcpu/tcg.py): is Unicorn there, and how fast it runs the CPL0
    loop of the same probe guest."""
    from hvm.vcpu.tcg import unavailable

    why = unavailable()
    if why is not None:
        out(f"  tcg (Unicorn)       not available: {why}")
        return {"available": False, "why": why}
    import unicorn

    result: dict = {"available": True, "unicorn": unicorn.__version__}
    try:
        rate, _ = _loop_rate("cpl0", accel="tcg", start=100000)
        result["cpl0_mips"] = rate / 1e6
        speed = f"; guest code {rate / 1e6:,.1f} M instructions/s (translated; any CPL)"
    except RuntimeError as e:
        speed = f"; the loop probe failed: {e}"
    out(f"  tcg (Unicorn)       unicorn {unicorn.__version__}: hvm run --accel tcg{speed}")
    return result


def diagnose(out=print) -> dict:
    logging.getLogger("hvm").setLevel(logging.ERROR)
    host = detect()
    results: dict = {"backend": host.backend}
    try:
        with Kvm() as kvm:
            results["api_version"] = 12
            caps = {c: kvm.check_extension(getattr(kc, "CAP_" + c)) for c in CAPS}
            results["capabilities"] = caps
            max_vcpus = kvm.check_extension(kc.CAP_MAX_VCPUS)
    except KvmError as e:   # no KVM: what runs here is the binary-translation accelerator
        out("hvm doctor — this host has no usable KVM")
        out(f"  /dev/kvm            {e}")
        results["kvm"] = str(e)
        results["tcg"] = _diagnose_tcg(out)
        out("")
        out("  => hvm runs guests here on tcg only (--accel auto chooses it): docs/tcg.md")
        return results
    out("hvm doctor — what this host's KVM can do")
    out(f"  /dev/kvm            API version 12, {host.describe()}, up to {max_vcpus} vCPUs")
    out("  capabilities        " + ", ".join(f"{c} {'yes' if v else 'NO'}" for c, v in caps.items()))

    t0 = time.monotonic()
    # Two untraced runs of different lengths: the difference cancels start-up and teardown.
    small, large = run_probe("pio", 500, trace=False), run_probe("pio", 2500, trace=False)
    pio_us = (large.seconds - small.seconds) / 2000 * 1e6
    results["pio_exit_us"] = pio_us
    out(f"  port-I/O exit       {pio_us:.1f} µs round trip, guest -> hvm's Python run loop -> guest")

    cpl0, _ = _loop_rate("cpl0")
    cpl3, _ = _loop_rate("cpl3", start=100000)
    results["cpl0_mips"], results["cpl3_mips"] = cpl0 / 1e6, cpl3 / 1e6
    slow = cpl3 / max(cpl0, 1)
    out(f"  guest CPL0 code     {cpl0 / 1e6:,.1f} M instructions/s" + (f"  ({slow:,.0f}x slower than CPL3: "
        "emulated)" if slow > 20 else "  (native)"))
    out(f"  guest CPL3 code     {cpl3 / 1e6:,.1f} M instructions/s")
    results["tcg"] = tcg = _diagnose_tcg(out)
    if tcg.get("cpl0_mips"):
        ratio = tcg["cpl0_mips"] / max(cpl0 / 1e6, 1e-9)
        out(f"                      tcg runs guest CPL0 code {ratio:,.1f}x " + ("faster than KVM here" if ratio >= 1
                                                                            else "slower than KVM here"))

    entries = {}
    for probe, label in (("syscall", "SYSCALL"), ("int80", "INT 0x80"), ("sysenter", "SYSENTER")):
        ok, text = _describe_entry(probe)
        entries[probe] = ok
        out(f"  {label + ' from CPL3':<19} {text}")
    results["user_to_kernel"] = entries

    insns = {}
    completes = {"int3": "hvm completes it: injects #BP", "fwait": "hvm completes it: skips it",
                 "clac": "hvm completes it: sets/clears RFLAGS.AC", "clwb": "hvm completes it: checks the operand",
                 "xgetbv": "hvm completes it: reads XCR0", "rdpru": "hvm completes it: #UD without CPUID RDPRU",
                 "intn": "hvm completes it: injects the software interrupt",
                 "avx": "hvm completes VZEROALL/VZEROUPPER, VMOVDQA, VMOVNTDQ(A) through the XSAVE area"}
    for probe, label in (("cmpxchg16b", "CMPXCHG16B"), ("xsave", "XSAVE/XRSTOR"), ("int3", "INT3 (64-bit)"),
                         ("fwait", "FWAIT"), ("movbe", "MOVBE"), ("clac", "CLAC/STAC"), ("clwb", "CLWB"),
                         ("xgetbv", "XGETBV"), ("rdpru", "RDPRU"), ("intn", "INT n (CPL0)"), ("avx", "AVX moves")):
        ok, text = _describe_insn(probe)
        insns[probe] = ok
        note = f" — {completes[probe]}" if not ok and probe in completes else ""
        out(f"  {label:<19} {text}{note}")
    results["instructions"] = insns

    # Does the guest see the CPUID hvm gives it? Compare what a guest reads with hvm's hiding on.
    if host.hidden_features:
        seen = run_probe("cpuid", adapt_to_host=True).reports
        leaf1_ecx, leaf7_ebx = seen[0][1], seen[1][1]
        visible = [n for leaf, sub, reg, bit, n in host.hidden_features
                   if (leaf, reg) == (1, "ecx") and leaf1_ecx >> bit & 1 or (leaf, reg) == (7, "ebx") and leaf7_ebx >> bit & 1]
        results["cpuid_hiding_ineffective"] = visible
        if visible:
            out(f"  CPUID hiding        partly ignored by this backend: the guest still sees {', '.join(visible)}")
        else:
            out("  CPUID hiding        effective: the guest sees the CPUID hvm sets")

    if host.backend == "kvm_pvm":
        # measured with firmware/cpuid64.S (hvm/host.py PVM_CPUID_CLEARABLE): what `--cpu MODEL,-feature` can hide
        results["cpu_model_can_hide"] = ["vendor", "leaf 0x80000001", "x2apic", "tsc-deadline"]
        out("  --cpu / -cpu        this backend takes from hvm: the vendor, leaf 0x80000001 (lm, nx, syscall, rdtscp,")
        out("                      svm, ...), x2apic and tsc-deadline; the guest reads the rest of leaf 1 and all of")
        out("                      leaf 7 from the host, so -feature of those is refused (+feature: if KVM has it)")

    out("")
    if not any(entries.values()):
        out("  => Linux boots here up to starting /init, but user space cannot enter the kernel: the first system")
        out("     call of /init fails, so there is no shell. On a VT-x/AMD-V host the same VM gives a shell.")
    elif entries.get("syscall"):
        out("  => system calls reach the guest kernel: Linux guests get a working user space and shell.")
    if host.linux_cmdline:
        out(f"  => hvm run adds to Linux command lines: {' '.join(host.linux_cmdline)}")
    if host.hidden_features:
        out(f"  => hvm asks KVM to hide these CPUID features: {', '.join(n for *_, n in host.hidden_features)}")
    if host.smp_hidden_features:
        out(f"  => and, with several vCPUs: {', '.join(n for *_, n in host.smp_hidden_features)}")
    if host.disabled_quirks:
        out("  => hvm disables KVM's fix-hypercall quirk: a guest's VMCALL/VMMCALL raises #UD (it is no hypercall on")
        out("     this backend, and with the quirk KVM re-runs it forever inside KVM_RUN)")
    if host.filter_feature_msrs:
        out("  => hvm denies SPEC_CTRL, PRED_CMD and FLUSH_CMD (#GP) to guests whose CPUID lacks their features")
    results["elapsed_s"] = time.monotonic() - t0
    return results
