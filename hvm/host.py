"""What this host's KVM can do, as far as a VMM must adapt to it.

On the kvm_pvm backend (no VT-x/AMD-V: guest CPL0 code is emulated instruction by instruction),
some instructions cannot be emulated (XSAVE family, CMPXCHG16B, ...): hvm hides them from the guest's
CPUID, adds kernel command-line options that cut emulated work, and completes a few emulation
failures itself (INT3, FWAIT). `hvm doctor` measures the rest with probe guests.
"""
from __future__ import annotations

import os

from hvm.plain import Frozen

# (leaf, subleaf or None, register, bit, name): CPU features this backend's emulator cannot run, or that
# make Linux take paths through instructions it cannot run.
PVM_HIDDEN_FEATURES = [
    (1, None, "ecx", 13, "cx16"), (1, None, "ecx", 26, "xsave"), (1, None, "ecx", 27, "osxsave"),
    (1, None, "ecx", 28, "avx"), (1, None, "ecx", 12, "fma"), (1, None, "ecx", 29, "f16c"),
    (1, None, "ecx", 9, "ssse3"), (1, None, "ecx", 19, "sse4_1"), (1, None, "ecx", 20, "sse4_2"),
    (1, None, "ecx", 1, "pclmulqdq"), (1, None, "ecx", 25, "aes"), (1, None, "ecx", 22, "movbe"),
    (1, None, "ecx", 23, "popcnt"), (1, None, "ecx", 17, "pcid"), (1, None, "ecx", 30, "rdrand"),
    (7, 0, "ebx", 0, "fsgsbase"), (7, 0, "ebx", 5, "avx2"), (7, 0, "ebx", 7, "smep"),
    (7, 0, "ebx", 10, "invpcid"), (7, 0, "ebx", 20, "smap"), (7, 0, "ebx", 29, "sha_ni"),
    (7, 0, "ebx", 16, "avx512f"), (7, 0, "ebx", 18, "rdseed"), (7, 0, "ecx", 22, "rdpid"),
    (0x80000001, None, "edx", 27, "rdtscp"),
]

# The kvm_pvm backend does not take all of a VMM's CPUID: measured, the guest still sees XSAVE, POPCNT and
# most other bits of the host's leaf 1 whatever KVM_SET_CPUID2 says (CX16 does go away). So Linux is
# also told on its command line to leave those features alone (clearcpuid=, noxsave, nopcid), plus
# options that cut emulated work (soft-lockup backtraces, crypto self-tests and memory zeroing dominate
# an emulated boot). clocksource=kvm-clock: kvm_pvm ignores writes to a vCPU's TSC, so a guest restored from a
# snapshot on the TSC clocksource sees its clock jump by the time since the save and then emulates every
# timer tick it missed (measured: 25-78 s instead of 8 s to /init); the kvmclock is restored exactly.
PVM_CLEARCPUID = ("xsave,cx16,popcnt,smap,smep,fsgsbase,invpcid,rdpid,rdtscp,ssse3,sse4_1,sse4_2,pclmulqdq,aes,"
                  "movbe,sha_ni,avx,avx2,rdrand,rdseed")
# PVM_CLEARCPUID is 127 characters: Linux 6.12 reads clearcpuid= into a 128-byte buffer and silently ignores
# what does not fit, so a name added here must replace one. noreplace-smp: on one vCPU Linux would
# otherwise rewrite each of its ~3000 `lock` prefixes with text_poke (a page-table switch and a TLB flush
# each): measured 2.1 s of an emulated boot (the lock prefixes stay; the rest of the boot was no slower).
PVM_LINUX_CMDLINE = ["nokaslr", "noxsave", "nopcid", f"clearcpuid={PVM_CLEARCPUID}", "nowatchdog", "nosoftlockup",
                     "mitigations=off", "init_on_alloc=0", "cryptomgr.notests", "tsc=reliable",
                     "clocksource=kvm-clock", "noreplace-smp"]
# With several vCPUs, the KVM paravirtual features through which one vCPU acts on another hang a Linux
# boot on this backend: halt-and-kick spinlocks (KVM_HC_KICK_CPU), IPIs, remote TLB flushes and directed
# yields by hypercall. Measured with the 6.12 minimal kernel and 2 vCPUs: with them, the boot stops for good
# at the clocksource switch (stop_machine; "rcu_sched self-detected stall on CPU 1", CPU 0 never runs
# again); with `nopvspin` (no PV spinlocks) it stalls the same way after the initramfs; with `nopv`, or with
# these four CPUID bits hidden (kvmclock, steal time and PV EOI kept), it boots to /init. The backend
# honours hvm's leaf 0x40000001 (checked from a guest), so hiding them is enough.
PVM_SMP_HIDDEN_FEATURES = [
    (0x40000001, None, "eax", 7, "kvm-pv-unhalt"), (0x40000001, None, "eax", 9, "kvm-pv-tlb-flush"),
    (0x40000001, None, "eax", 11, "kvm-pv-send-ipi"), (0x40000001, None, "eax", 13, "kvm-pv-sched-yield"),
]


# What of hvm's CPUID the kvm_pvm backend lets a guest see, measured with firmware/cpuid64.S (every feature bit of
# leaves 1, 7.0 and 0x80000001 cleared, then set): the vendor (leaf 0) and leaf 0x80000001 are the VMM's; of
# leaf 1 only the bits KVM emulates itself (x2apic, tsc-deadline) can be cleared, the guest reads the others
# from the host CPU; leaf 7.0 is the host's whatever hvm sets. So `-cpu ...,-feature` is refused for the rest
# (hvm/cpu_model.py) unless the host lacks the feature anyway. Leaves not measured count as not honoured.
PVM_CPUID_CLEARABLE = {(1, "ecx", 21), (1, "ecx", 24)}
# ... and features of this host CPU the backend itself keeps from every guest, whatever the VMM sets (measured
# the same way: the host's /proc/cpuinfo has them, no guest sees them). A -feature of these is no lie.
PVM_BACKEND_HIDES = ("cx16", "pcid", "invpcid", "rdpid")
PVM_CPUID_CLEARABLE_LEAVES = {0x80000001}


def cpuid_clear_honoured(backend: str, leaf: int, reg: str, bit: int) -> bool:
    """Whether a CPUID feature bit hvm clears is really gone for the guest on this backend."""
    if backend != "kvm_pvm":
        return True    # hardware-assisted KVM gives the guest exactly the CPUID the VMM sets
    return leaf in PVM_CPUID_CLEARABLE_LEAVES or (leaf, reg, bit) in PVM_CPUID_CLEARABLE


# KVM quirks hvm disables on this backend (KVM_CAP_DISABLE_QUIRKS2 bits). FIX_HYPERCALL_INSN (1 << 5): a guest's
# VMCALL or VMMCALL (kvm-unit-tests' hypercall, vmexit_vmcall, apic's PV IPI test; Linux's KVM PV features)
# is no hypercall on kvm_pvm: it raises #UD, KVM's emulator then "fixes" it by writing the backend's own
# hypercall bytes (the same 0f 01 c1 a VMCALL already has, measured: the guest's code is unchanged) and runs
# it again, forever, inside KVM_RUN (no exit reaches the VMM; one host CPU spins; QEMU hangs the same).
# With the quirk disabled KVM raises #UD in the guest, as a CPU without VMX/SVM does.
PVM_DISABLED_QUIRKS = 1 << 5


# MSRs that exist only with a CPUID feature: (MSR, count, [(leaf, register, bit), ...] any of which enables
# it). KVM on VT-x/AMD-V raises #GP on them when the guest's CPUID lacks every feature; kvm_pvm lets the
# guest read and write them whatever its CPUID says (kvm-unit-tests msr/msr64: "Expected #GP on
# RDMSR(SPEC_CTRL), got vector 0"; KVM_GET_SUPPORTED_CPUID offers none of these bits here). hvm denies them
# with a KVM MSR filter when the vCPU's CPUID does not offer them (pvm_denied_msrs).
FEATURE_MSRS = [
    (0x48, 1, [(7, "edx", 26), (0x80000008, "ebx", 14)]),                       # SPEC_CTRL: IBRS / AMD IBRS
    (0x49, 1, [(7, "edx", 26), (0x80000008, "ebx", 12)]),                       # PRED_CMD: IBRS / AMD IBPB
    (0x10B, 1, [(7, "edx", 28)]),                                               # FLUSH_CMD: FLUSH_L1D
]


def denied_feature_msrs(cpuid: list[dict[str, int]]) -> list[tuple[int, int]]:
    """(base, count) of the FEATURE_MSRS this CPUID (KVM_GET_SUPPORTED_CPUID-style entries) does not offer."""
    def has(leaf: int, reg: str, bit: int) -> bool:
        return any(e["function"] == leaf and e["index"] == 0 and e[reg] >> bit & 1 for e in cpuid)
    return [(msr, n) for msr, n, features in FEATURE_MSRS if not any(has(*f) for f in features)]


# OSXSAVE is no host feature: it mirrors the guest's own CR4.OSXSAVE (and /proc/cpuinfo never lists it).
_DYNAMIC_CPUID_BITS = frozenset({"osxsave"})


def cpuid_hiding_ignored(backend: str, hidden) -> frozenset[str]:
    """Names of the `hidden` features a guest on `backend` still sees when the host has them: the bits whose clear
    the backend does not take (cpuid_clear_honoured), less those it keeps from every guest itself. On kvm_pvm,
    `hvm doctor`'s cpuid probe (leaf 1 ECX, leaf 7 EBX read from a guest) measures the same: all of hvm's hidden
    features but CX16, PCID, INVPCID. Instructions hvm completes check the guest's CPUID as the guest sees it
    (hvm/vcpu/complete.py: MOVBE, CLAC/STAC, XGETBV, AVX)."""
    keeps = set(PVM_BACKEND_HIDES) if backend == "kvm_pvm" else set()
    return frozenset(name for leaf, _sub, reg, bit, name in hidden
                     if not cpuid_clear_honoured(backend, leaf, reg, bit)
                     and name not in keeps and name not in _DYNAMIC_CPUID_BITS)


class HostProfile(Frozen):
    """backend: "kvm_pvm", "vmx", "svm" or "unknown"; smp_hidden_features: hidden too when the VM has several
    vCPUs; disabled_quirks: KVM_X86_QUIRK_* bits hvm disables (KVM_CAP_DISABLE_QUIRKS2);
    filter_feature_msrs: deny FEATURE_MSRS the guest's CPUID lacks (the backend does not). (Plain:
    hvm/plain.py says why.)"""
    _fields = ("backend", "cpl0_emulated", "hidden_features", "linux_cmdline", "smp_hidden_features",
               "disabled_quirks", "filter_feature_msrs")

    def __init__(self, backend: str, cpl0_emulated: bool, hidden_features: list | None = None,
                 linux_cmdline: list[str] | None = None, smp_hidden_features: list | None = None,
                 disabled_quirks: int = 0, filter_feature_msrs: bool = False):
        self._set(backend=backend, cpl0_emulated=cpl0_emulated,
                  hidden_features=[] if hidden_features is None else hidden_features,
                  linux_cmdline=[] if linux_cmdline is None else linux_cmdline,
                  smp_hidden_features=[] if smp_hidden_features is None else smp_hidden_features,
                  disabled_quirks=disabled_quirks, filter_feature_msrs=filter_feature_msrs)

    @property
    def hiding_ignored(self) -> frozenset[str]:
        """Names of hidden_features the guest still sees when the host has them."""
        return cpuid_hiding_ignored(self.backend, self.hidden_features)

    def honours_clear(self, leaf: int, reg: str, bit: int) -> bool:
        return cpuid_clear_honoured(self.backend, leaf, reg, bit)

    def describe(self) -> str:
        if self.backend == "kvm_pvm":
            return "KVM backend kvm_pvm (no VT-x/AMD-V): guest kernel code is emulated"
        return f"KVM backend {self.backend}: hardware-assisted"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_cpu_flags() -> set[str]:
    """The host CPU's feature flags as Linux names them (/proc/cpuinfo)."""
    return _cpu_flags()


def guest_default_flags(profile: "HostProfile") -> set[str]:
    """The host flags (Linux's names) a guest sees where the backend does not take hvm's CPUID bits: the host
    CPU's, less what the backend keeps from every guest."""
    flags = _cpu_flags()
    if profile.backend == "kvm_pvm":
        flags -= set(PVM_BACKEND_HIDES)   # Linux names them as QEMU does
    return flags


def detect() -> HostProfile:
    if os.path.isdir("/sys/module/kvm_pvm"):
        return HostProfile("kvm_pvm", True, PVM_HIDDEN_FEATURES, PVM_LINUX_CMDLINE, PVM_SMP_HIDDEN_FEATURES,
                           PVM_DISABLED_QUIRKS, filter_feature_msrs=True)
    flags = _cpu_flags()
    if "vmx" in flags:
        return HostProfile("vmx", False)
    if "svm" in flags:
        return HostProfile("svm", False)
    return HostProfile("unknown", False)


def cpu_flags() -> set[str]:
    """The host CPU's feature flags as /proc/cpuinfo names them (movbe, smap, xsave, ...)."""
    return _cpu_flags()


def guest_visible_cpuid(table: list[dict[str, int]], hidden, shown: set[str],
                        raw: list[dict[str, int]] = ()) -> list[dict[str, int]]:
    """`table` (what hvm gave KVM_SET_CPUID2) with the hidden features named in `shown` set again: on a backend
    that shows the guest the host's bits whatever hvm hid, the CPUID the guest reads. With XSAVE shown, leaf
    0xD (the XSAVE components; hide_features empties it) comes back from `raw` too."""
    back = [f for f in hidden if f[4] in shown]
    leaf_d = {(r["function"], r["index"]): r for r in raw if r["function"] == 0xD} if "xsave" in shown else {}
    out = []
    for e in table:
        e = dict(leaf_d.get((e["function"], e["index"]), e))
        for leaf, sub, reg, bit, _name in back:
            if e["function"] == leaf and (sub is None or e["index"] == sub):
                e[reg] |= 1 << bit
        out.append(e)
    return out


def hide_features(entries: list[dict[str, int]], hidden) -> list[dict[str, int]]:
    """Clear the given CPUID feature bits in KVM_GET_SUPPORTED_CPUID-style entries."""
    out = []
    for e in entries:
        e = dict(e)
        for leaf, sub, reg, bit, _name in hidden:
            if e["function"] == leaf and (sub is None or e["index"] == sub):
                e[reg] &= ~(1 << bit)
        if e["function"] == 0xD and hidden and any(n == "xsave" for *_, n in hidden):
            for reg in ("eax", "ebx", "ecx", "edx"):
                e[reg] = 0  # no XSAVE state components either
        out.append(e)
    return out
