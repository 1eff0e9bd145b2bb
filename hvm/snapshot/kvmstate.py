"""The KVM side of a snapshot: every vCPU's state and the VM's (irqchip, PIT, clock), as plain values.

Struct contents are kept as the raw bytes of the kernel's own structs (a stable ABI: the same layout
<linux/kvm.h> defines, which the cffi build checks), so nothing is lost by translating field by field.

The order of the calls follows the KVM API's rules (as Firecracker and QEMU order them):
- save: MP state, regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs, vCPU events; the VM's
  clock, PIC master/slave, IOAPIC and PIT2. The vCPUs are stopped (out of KVM_RUN, which completed any
  pending I/O: see Machine.snapshot), so vCPU events are consistent.
- restore, on a freshly created VM: clock, irqchips, PIT2 (before the vCPUs run), then per vCPU (its
  CPUID already set): MP state, regs, sregs, XSAVE, XCRs, debug registers, LAPIC (after sregs, which
  restore the APIC base MSR), MSRs (after the LAPIC: the TSC deadline MSR needs it), vCPU events last
  (KVM_SET_REGS clears pending exceptions that the events restore).

On the kvm_pvm backend every one of these ioctls is accepted, but a write of IA32_TSC (MSR 0x10) is
ignored: the guest's TSC reads the host's TSC, so a restored guest sees its TSC jump by the time the
host ran in between (as after a long pause). The kvmclock base (KVM_SET_CLOCK) is taken.
"""
from __future__ import annotations

import logging

from hvm._types import Any
from hvm.kvm import Kvm, ffi
from hvm.kvm.vcpu import Vcpu
from hvm.kvm.vm import Vm

log = logging.getLogger(__name__)

# MSRs hvm writes at boot that KVM_GET_MSR_INDEX_LIST may not list (it lists what KVM itself migrates;
# MTRR_DEF_TYPE is absent on kvm_pvm): saved too when the vCPU reads them.
EXTRA_MSRS = (0x2FF,)
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

_STRUCTS = {
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "xcrs": "struct kvm_xcrs",
    "debugregs": "struct kvm_debugregs",
    "lapic": "struct kvm_lapic_state",
    "events": "struct kvm_vcpu_events",
}


class StateError(ValueError):
    """A saved KVM state does not fit this host's structs (wrong length or missing field)."""


def _bytes(obj) -> bytes:
    return bytes(ffi.buffer(obj))


def _struct(ctype: str, data: Any, what: str):
    size = ffi.sizeof(ctype)
    if not isinstance(data, bytes) or len(data) != size:
        got = f"{len(data)} bytes" if isinstance(data, bytes) else type(data).__name__
        raise StateError(f"{what}: expected {size} bytes of {ctype}, got {got}")
    obj = ffi.new(ctype + " *")
    ffi.memmove(obj, data, size)
    return obj


def msrs_to_save(kvm: Kvm) -> list[int]:
    indices = kvm.msr_index_list()
    return indices + [i for i in EXTRA_MSRS if i not in indices]


def save_vcpu(vcpu: Vcpu, msr_indices: list[int], xsave_size: int, lapic: bool = True) -> dict[str, Any]:
    """`lapic`: the VM has the in-kernel irqchip (without it there is no LAPIC to save)."""
    state: dict[str, Any] = {"index": vcpu.index, "mp_state": vcpu.get_mp_state()}
    state["regs"] = _bytes(vcpu.get_regs())
    state["sregs"] = _bytes(vcpu.get_sregs())
    state["xsave"] = bytes(ffi.buffer(vcpu.get_xsave(xsave_size)))
    state["xcrs"] = _bytes(vcpu.get_xcrs())
    state["debugregs"] = _bytes(vcpu.get_debugregs())
    state["lapic"] = _bytes(vcpu.get_lapic()) if lapic else None
    # One MSR at a time would be 40 ioctls; KVM_GET_MSRS stops at the first MSR it cannot read, so read in
    # one batch and retry past a refused index.
    msrs: dict[int, int] = {}
    pending = list(msr_indices)
    while pending:
        got = vcpu.get_msrs(pending)
        msrs.update(got)
        n = len(got)
        if n < len(pending):
            log.debug("vCPU %d: MSR %#x not readable, not saved", vcpu.index, pending[n])
        pending = pending[n + 1:]
    state["msrs"] = [[i, v] for i, v in msrs.items()]
    state["events"] = _bytes(vcpu.get_vcpu_events())
    return state


def restore_vcpu(vcpu: Vcpu, state: dict[str, Any], xsave_size: int, lapic: bool = True) -> None:
    structs = {k: _struct(c, state.get(k), f"vCPU {vcpu.index} {k}") for k, c in _STRUCTS.items()
               if k != "lapic" or lapic}
    xsave = state.get("xsave")
    if not isinstance(xsave, bytes) or len(xsave) < 4096:
        raise StateError(f"vCPU {vcpu.index} xsave: expected at least 4096 bytes")
    size = max(xsave_size, len(xsave))
    xbuf = ffi.new("char[]", size)
    ffi.memmove(xbuf, xsave, len(xsave))
    mp_state = state.get("mp_state")
    msrs = state.get("msrs")
    # Within the kernel structs' fields (u32 mp_state, u32 index, u64 data): a larger value would make cffi
    # raise OverflowError, which is no error in the file to the caller.
    if not isinstance(mp_state, int) or not 0 <= mp_state < 1 << 32 or not isinstance(msrs, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) for x in e)
            and 0 <= e[0] < 1 << 32 and 0 <= e[1] < 1 << 64 for e in msrs):
        raise StateError(f"vCPU {vcpu.index}: mp_state or msrs malformed")
    vcpu.set_mp_state(mp_state)
    vcpu.set_regs(structs["regs"])
    vcpu.set_sregs(structs["sregs"])
    vcpu.set_xsave(xbuf)
    vcpu.set_xcrs(structs["xcrs"])
    vcpu.set_debugregs(structs["debugregs"])
    if lapic:
        vcpu.set_lapic(structs["lapic"])
    values = {i: v for i, v in msrs}
    # The TSC deadline after the LAPIC (done); the TSC itself first, so that a deadline is relative to it.
    _set_msrs(vcpu, sorted(values.items(), key=lambda kv: kv[0] != MSR_IA32_TSC))
    vcpu.set_vcpu_events(structs["events"])


def _set_msrs(vcpu: Vcpu, items: list[tuple[int, int]]) -> None:
    """KVM_SET_MSRS in one batch; it stops at the first MSR it refuses. Some MSRs KVM lists are writable
    only in some configurations (MSR_KVM_ASYNC_PF_INT needs the in-kernel LAPIC): a refused MSR whose
    fresh value already is the saved one is skipped; any other refusal is an error naming the MSR."""
    while items:
        n = vcpu.set_msrs_partial(items)
        if n == len(items):
            return
        index, value = items[n]
        current = vcpu.get_msrs([index]).get(index)
        if current != value:
            raise StateError(f"KVM_SET_MSRS refused MSR {index:#x} = {value:#x} (this vCPU has {current!r})")
        log.debug("vCPU %d: MSR %#x refused, already %#x", vcpu.index, index, value)
        items = items[n + 1:]


def save_vm(vm: Vm, irqchip: bool, pit: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"clock": _bytes(vm.get_clock())}
    if irqchip:
        state["irqchip"] = [_bytes(vm.get_irqchip(chip)) for chip in (0, 1, 2)]
    if pit:
        state["pit2"] = _bytes(vm.get_pit2())
    return state


def restore_vm(vm: Vm, state: dict[str, Any], irqchip: bool, pit: bool) -> None:
    clock = _struct("struct kvm_clock_data", state.get("clock"), "VM clock")
    chips = []
    if irqchip:
        raw = state.get("irqchip")
        if not isinstance(raw, list) or len(raw) != 3:
            raise StateError("VM irqchip: expected the PIC master, PIC slave and IOAPIC states")
        chips = [_struct("struct kvm_irqchip", r, f"irqchip {i}") for i, r in enumerate(raw)]
        for i, chip in enumerate(chips):
            if chip.chip_id != i:
                raise StateError(f"irqchip {i}: saved as chip {chip.chip_id}")
    pit2 = _struct("struct kvm_pit_state2", state.get("pit2"), "PIT") if pit else None
    # Only the clock value: KVM_SET_CLOCK refuses flags it does not take (KVM_CLOCK_REALTIME needs the
    # host's realtime clock to mean the same thing, which it does not across hosts).
    clock.flags = 0
    clock.realtime = 0
    clock.host_tsc = 0
    vm.set_clock(clock)
    for chip in chips:
        vm.set_irqchip(chip)
    if pit2 is not None:
        vm.set_pit2(pit2)
