"""The guest's CPU model: QEMU's `-cpu MODEL[,vendor=...][,+feat][,-feat][,feat=on|off]` (`hvm run --cpu`,
YAML `cpu:`), applied to the CPUID hvm gives KVM (KVM_SET_CPUID2) after the host's hidden features.

Models: `host`/`max` (everything KVM supports, as without a model), `qemu64` and `Opteron_G1` (QEMU's
feature sets, as QEMU gives them under KVM: with the hypervisor bit, qemu64 with x2apic). A feature asked
for with +feat must be one KVM supports and hvm does not hide on this backend; a feature asked away with
-feat must be one this backend lets hvm hide (kvm_pvm takes the vendor, leaf 0x80000001 and the
KVM-emulated bits of leaf 1, but the guest reads leaf 1's other bits and all of leaf 7 from the host):
anything else is refused, as upstream kvm-unit-tests' runner then skips the test.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

VENDORS = {"GenuineIntel": "GenuineIntel", "AuthenticAMD": "AuthenticAMD"}

# QEMU's feature names -> (leaf, subleaf or None, register, bit)
_L1D = ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", None, "sep", "mtrr", "pge", "mca",
        "cmov", "pat", "pse36", "pn", "clflush", None, "ds", "acpi", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm",
        "ia64", "pbe"]
_L1C = ["pni", "pclmulqdq", "dtes64", "monitor", "ds-cpl", "vmx", "smx", "est", "tm2", "ssse3", "cid", None, "fma",
        "cx16", "xtpr", "pdcm", None, "pcid", "dca", "sse4.1", "sse4.2", "x2apic", "movbe", "popcnt", "tsc-deadline",
        "aes", "xsave", "osxsave", "avx", "f16c", "rdrand", "hypervisor"]
_L7B = ["fsgsbase", "tsc-adjust", "sgx", "bmi1", "hle", "avx2", None, "smep", "bmi2", "erms", "invpcid", "rtm", None,
        None, "mpx", None, "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt",
        "clwb", "intel-pt", "avx512pf", "avx512er", "avx512cd", "sha-ni", "avx512bw", "avx512vl"]
_L7C = [None, "avx512vbmi", "umip", "pku", "ospke", "waitpkg", "avx512vbmi2", None, "gfni", "vaes", "vpclmulqdq",
        "avx512vnni", "avx512bitalg", None, "avx512-vpopcntdq", None, "la57", None, None, None, None, None, "rdpid",
        None, "bus-lock-detect", "cldemote", None, "movdiri", "movdir64b", None, "sgxlc", "pks"]
_X1C = ["lahf-lm", "cmp-legacy", "svm", "extapic", "cr8legacy", "abm", "sse4a", "misalignsse", "3dnowprefetch",
        "osvw", "ibs", "xop", "skinit", "wdt", None, "lwp", "fma4", "tce", None, "nodeid-msr", None, "tbm", "topoext",
        "perfctr-core", "perfctr-nb"]
_X1D = [None] * 11 + ["syscall"] + [None] * 8 + ["nx", None, "mmxext", None, None, "fxsr-opt", "pdpe1gb", "rdtscp",
                                                  None, "lm", "3dnowext", "3dnow"]
_X8B = ["clzero", None, "xsaveerptr", None, "rdpru", None, None, None, None, "wbnoinvd", None, None, "ibpb"]
_XAD = ["npt", "lbrv", "svm-lock", "nrip-save", "tsc-scale", "vmcb-clean", "flushbyasid", "decodeassists"]

FEATURES: dict[str, tuple[int, int | None, str, int]] = {}
for _names, _leaf, _sub, _reg in ((_L1D, 1, None, "edx"), (_L1C, 1, None, "ecx"), (_L7B, 7, 0, "ebx"),
                                  (_L7C, 7, 0, "ecx"), (_X1C, 0x80000001, None, "ecx"),
                                  (_X1D, 0x80000001, None, "edx"), (_X8B, 0x80000008, None, "ebx"),
                                  (_XAD, 0x8000000A, None, "edx")):
    for _bit, _n in enumerate(_names):
        if _n is not None:
            FEATURES[_n] = (_leaf, _sub, _reg, _bit)
FEATURES.update({"spec-ctrl": (7, 0, "edx", 26), "arch-capabilities": (7, 0, "edx", 29),
                 "md-clear": (7, 0, "edx", 10)})
ALIASES = {"sse3": "pni", "sse4-1": "sse4.1", "sse4-2": "sse4.2", "lahf_lm": "lahf-lm", "i64": "lm",
           "tsc_deadline": "tsc-deadline", "sha_ni": "sha-ni", "tsc_adjust": "tsc-adjust", "nrip_save": "nrip-save"}
# Properties QEMU's -cpu takes that mean nothing more for hvm: hvm already gives the host's physical address
# width and never hides features because they do not migrate. (phys-bits=N, hv_* and the vmx-* controls are not
# here: hvm cannot give them, so they are refused.)
NOOP_PROPS = {"host-phys-bits": ("on", ""), "migratable": ("on", "off", "no", "yes", ""), "check": ("on", "off", ""),
              "enforce": ("on", "off", "")}


def _bits(names: str) -> dict[tuple[int, int | None, str], int]:
    out: dict[tuple[int, int | None, str], int] = {}
    for n in names.split():
        leaf, sub, reg, bit = FEATURES[n]
        out[(leaf, sub, reg)] = out.get((leaf, sub, reg), 0) | 1 << bit
    return out


_PPRO = "fpu de pse tsc msr mce cx8 pge cmov pat fxsr mmx sse sse2 pae sep apic"


@dataclass(frozen=True)
class ModelDef:
    name: str
    vendor: str
    level: int                  # highest basic leaf
    xlevel: int                 # highest extended leaf
    signature: int              # leaf 1 EAX: family/model/stepping
    features: dict              # (leaf, sub, reg) -> bits; leaves 1, 7, 0x80000001 limited to these


# QEMU's definitions (target/i386/cpu.c) plus what QEMU adds under KVM: the hypervisor bit, and for qemu64
# x2apic (kvm_default_props; svm is off under KVM).
MODELS: dict[str, ModelDef | None] = {
    "host": None, "max": None,
    "qemu64": ModelDef("qemu64", "AuthenticAMD", 0xD, 0x8000000A, (6 << 16) | (15 << 8) | (0xB << 4) | 1,   # family 15, model 107
                       _bits(f"{_PPRO} mtrr clflush mca pse36 pni cx16 x2apic hypervisor lm syscall nx lahf-lm")),
    "Opteron_G1": ModelDef("Opteron_G1", "AuthenticAMD", 5, 0x80000008, (15 << 8) | (6 << 4) | 1,   # family 15, model 6
                           _bits("vme sse2 sse fxsr mmx clflush pse36 pat cmov mca pge mtrr sep apic cx8 mce pae msr "
                                 "tsc pse de fpu pni hypervisor lm nx syscall")),
}
# Leaf 1 EDX bits AMD CPUs repeat in leaf 0x80000001 EDX (QEMU's CPUID_EXT2_AMD_ALIASES): fpu..apic, mtrr..pse36,
# mmx, fxsr. QEMU copies them for an AMD vendor.
AMD_ALIASES = 0x0183F3FF
MODEL_LEAVES = ((1, None, "ecx"), (1, None, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                (0x80000001, None, "ecx"), (0x80000001, None, "edx"), (0x80000008, None, "ebx"))


class CpuModelError(ValueError):
    """A -cpu/cpu: value hvm cannot give; str() is one line in QEMU's words where QEMU has them."""


@dataclass(frozen=True)
class CpuSpec:
    model: str = "host"
    vendor: str | None = None
    features: tuple[tuple[str, bool], ...] = ()     # (feature, on), in the order given

    def __str__(self) -> str:
        parts = [self.model] + ([f"vendor={self.vendor}"] if self.vendor else [])
        return ",".join(parts + [("+" if on else "-") + f for f, on in self.features])


def parse_cpu(text: str) -> CpuSpec:
    """'qemu64,+x2apic,-pcid,vendor=GenuineIntel,umip=on' -> CpuSpec; CpuModelError for what is not one."""
    if not isinstance(text, str) or not text or len(text) > 1000:
        raise CpuModelError("expected MODEL[,vendor=NAME][,+feature][,-feature][,feature=on|off]")
    model, *opts = text.split(",")
    if model not in MODELS:
        raise CpuModelError(f"unable to find CPU model '{model[:60]}' (hvm has {', '.join(MODELS)})")
    vendor = None
    features: list[tuple[str, bool]] = []
    for opt in opts:
        if not opt:
            continue
        if opt[0] in "+-":
            name, on = opt[1:], opt[0] == "+"
        else:
            name, eq, value = opt.partition("=")
            if name == "vendor":
                if value not in VENDORS:
                    raise CpuModelError(f"vendor={value[:40]}: hvm gives GenuineIntel or AuthenticAMD")
                vendor = value
                continue
            if name in NOOP_PROPS:
                if value not in NOOP_PROPS[name]:
                    raise CpuModelError(f"{name}={value[:40]}: hvm can give only {name}={NOOP_PROPS[name][0]} "
                                        "(the host's behaviour)")
                continue
            if value not in ("on", "off", "true", "false", "yes", "no") or not eq:
                if feature_name(name) is not None:
                    raise CpuModelError(f"Property '{model}-x86_64-cpu.{name[:40]}' doesn't take value "
                                        f"'{value[:40]}' (on or off)")
                raise CpuModelError(f"Property '{model}-x86_64-cpu.{name[:40]}' not found")
            on = value in ("on", "true", "yes")
        canonical = feature_name(name)
        if canonical is None:
            raise CpuModelError(f"Property '{model}-x86_64-cpu.{name[:40]}' not found")
        features.append((canonical, on))
    return CpuSpec(model, vendor, tuple(features))


def feature_name(name: str) -> str | None:
    n = ALIASES.get(name, name)
    n = ALIASES.get(n.replace("_", "-"), n.replace("_", "-"))
    return n if n in FEATURES else None


def describe(name: str) -> str:
    """QEMU's way of naming a feature bit: CPUID.07H:EBX.smap [bit 20]."""
    leaf, sub, reg, bit = FEATURES[name]
    return f"CPUID.{leaf:02X}H:{reg.upper()}.{name} [bit {bit}]"


def _entry(entries: list[dict], leaf: int, sub: int | None) -> dict | None:
    for e in entries:
        if e["function"] == leaf and (sub is None or e["index"] == sub):
            return e
    return None


def _vendor_regs(vendor: str) -> tuple[int, int, int]:
    b = vendor.encode()
    return tuple(int.from_bytes(b[i:i + 4], "little") for i in (0, 4, 8))   # ebx, edx, ecx


# /proc/cpuinfo's names where they are not QEMU's with '-' as '_'
LINUX_NAMES = {"tsc-deadline": "tsc_deadline_timer", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ds": "dts",
               "ds-cpl": "ds_cpl", "nodeid-msr": "nodeid_msr"}


def linux_flag(name: str) -> str:
    return LINUX_NAMES.get(name, name.replace("-", "_"))


def check_cpu(cpu: CpuSpec, kvm_supported: list[dict], hidden, honours, host_flags: set[str] = frozenset()) -> None:
    """Refuse a +feature KVM does not support or hvm hides here, and a -feature this backend does not let hvm
    hide while the guest would see it. `kvm_supported`: KVM_GET_SUPPORTED_CPUID; `hidden`: hvm's hidden
    features (hvm/host.py); `honours(leaf, reg, bit)`: whether the backend takes a cleared bit from hvm;
    `host_flags`: the flags (Linux's names) a guest sees where the backend does not take hvm's bits
    (hvm/host.py guest_default_flags)."""
    hidden_names = {n.replace("_", "-") for *_, n in hidden}
    hidden_bits = {(leaf, reg, bit) for leaf, _sub, reg, bit, _n in hidden}
    for name, on in cpu.features:
        leaf, sub, reg, bit = FEATURES[name]
        e = _entry(kvm_supported, leaf, sub)
        present = e is not None and e[reg] >> bit & 1
        if on and (not present or name in hidden_names or (leaf, reg, bit) in hidden_bits):
            raise CpuModelError(f"host doesn't support requested feature: {describe(name)}")
        # A cleared bit the backend does not take: the guest reads the backend's own view, the host's flags
        # (`host_flags`, less what the backend keeps from every guest), whatever hvm's table says.
        if not on and not honours(leaf, reg, bit) and linux_flag(name) in host_flags:
            raise CpuModelError(f"this KVM backend does not let hvm hide a feature the host has: {describe(name)} "
                                "(the guest would still see it)")


def apply_cpu_model(supported: list[dict], cpu: CpuSpec | None) -> list[dict]:
    """KVM_GET_SUPPORTED_CPUID-style entries with the model, vendor and +/- features applied (a new list).
    +features are only ever ones `supported` has (check_cpu refused the others before the VM was built)."""
    if cpu is None:
        return supported
    out = [dict(e) for e in supported]
    model = MODELS[cpu.model]
    if model is not None:
        out = [e for e in out if not (e["function"] < 0x40000000 and e["function"] > model.level
                                      or 0x80000000 <= e["function"] <= 0x8FFFFFFF and e["function"] > model.xlevel)]
        for e in out:
            if e["function"] == 0:
                e["eax"] = min(e["eax"], model.level)
            elif e["function"] == 0x80000000:
                e["eax"] = min(e["eax"], model.xlevel)
            elif e["function"] == 1:
                e["eax"] = model.signature
        for key in MODEL_LEAVES:
            e = _entry(out, key[0], key[1])
            if e is not None:
                e[key[2]] &= model.features.get(key, 0)
        # neither model has leaf 7's sub-leaves beyond 0 nor XSAVE state components (leaf 0xD)
        out = [e for e in out if not (e["function"] == 7 and e["index"] > 0)]
        for e in out:
            if e["function"] == 7:
                e["eax"] = 0
            elif e["function"] == 0xD:
                e["eax"] = e["ebx"] = e["ecx"] = e["edx"] = 0
    vendor = cpu.vendor or (model.vendor if model is not None else None)
    if model is not None and vendor == "AuthenticAMD":
        leaf1, ext1, kvm_ext1 = _entry(out, 1, None), _entry(out, 0x80000001, None), _entry(supported, 0x80000001, None)
        if leaf1 is not None and ext1 is not None and kvm_ext1 is not None:
            ext1["edx"] |= leaf1["edx"] & AMD_ALIASES & kvm_ext1["edx"]
    if vendor is not None:
        e = _entry(out, 0, None)
        if e is not None:
            e["ebx"], e["edx"], e["ecx"] = _vendor_regs(vendor)
    for name, on in cpu.features:
        leaf, sub, reg, bit = FEATURES[name]
        e = _entry(out, leaf, sub)
        if e is None:
            continue        # the model has no such leaf (its level is below it): nothing to set or clear
        if on:   # back if the model took it away; never a bit KVM does not support
            e[reg] |= (_entry(supported, leaf, sub) or {reg: 0})[reg] & (1 << bit)
        else:
            e[reg] &= ~(1 << bit)
    return out
