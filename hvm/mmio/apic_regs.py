"""The local APIC's register page for a vCPU that has no APIC: the tcg accelerator's (hvm/vcpu/tcg.py).

Under KVM the in-kernel LAPIC answers at 0xFEE00000. Unicorn has no APIC, and without one a guest that sets
its APIC up (every kvm-unit-tests guest does: "enabling apic") reads all ones and waits forever for an ICR
delivery that never completes. This is the register file of an xAPIC (SDM vol. 3, 11.4) without the
interrupt logic: ID, version, TPR/APR/PPR, LDR/DFR, SVR, the LVT entries (masked at reset), the timer's
registers and the ICR read back as written, with the delivery status always idle (bit 12 clear). An IPI is
accepted and dropped (logged once), EOI does nothing, IRR/ISR/TMR read zero, the timer never counts. What a
guest learns from it is true of hvm's tcg: one CPU whose APIC delivers nothing.
"""
from __future__ import annotations

import logging

from hvm.mmio.device import StateReader

log = logging.getLogger(__name__)

APIC_BASE = 0xFEE00000
APIC_SIZE = 0x1000
APIC_VERSION = 0x50014          # version 0x14 (integrated xAPIC), 6 LVT entries (max LVT index 5)

ID, VERSION, TPR, APR, PPR, EOI, LDR, DFR, SVR, ESR = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0, 0x280
ICR_LOW, ICR_HIGH = 0x300, 0x310
LVT = (0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370)   # CMCI, timer, thermal, perf, LINT0, LINT1, error
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0
LVT_MASKED = 1 << 16
ICR_DELIVERY_PENDING = 1 << 12
# Registers a guest may write and read back (the rest read as their fixed or zero values).
_WRITABLE = (TPR, LDR, DFR, SVR, ESR, ICR_LOW, ICR_HIGH, *LVT, TIMER_INITIAL, TIMER_DIVIDE)
# The saved state: one 32-bit field per register a guest can write
_FIELDS = {"tpr": TPR, "ldr": LDR, "dfr": DFR, "svr": SVR, "esr": ESR, "icr_low": ICR_LOW, "icr_high": ICR_HIGH,
           **{f"lvt_{n}": r for n, r in zip(("cmci", "timer", "thermal", "perf", "lint0", "lint1", "error"), LVT)},
           "timer_initial": TIMER_INITIAL, "timer_divide": TIMER_DIVIDE}


class ApicRegisters:
    name = "apic"

    def __init__(self) -> None:
        self._regs: dict[int, int] = {}
        self._ipis_logged = False
        self.reset()

    def reset(self) -> None:
        self._regs = {r: 0 for r in _WRITABLE}
        self._regs[DFR] = 0xFFFFFFFF
        self._regs[SVR] = 0xFF
        for r in LVT:
            self._regs[r] = LVT_MASKED

    def read(self, offset: int, size: int) -> int:
        reg, shift = offset & ~0xF, (offset & 0xF) * 8
        if shift + size * 8 > 32:         # registers are 32 bits wide at 16-byte strides
            return 0
        if reg == ID:
            value = 0                     # the one vCPU's APIC id
        elif reg == VERSION:
            value = APIC_VERSION
        elif reg == PPR:
            value = self._regs[TPR] & 0xF0
        else:
            value = self._regs.get(reg, 0)
        return (value >> shift) & ((1 << (size * 8)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        reg = offset & ~0xF
        if offset & 0xF or reg not in self._regs:
            return                        # EOI, read-only and reserved registers: the write does nothing
        if reg == ICR_LOW:
            value &= ~ICR_DELIVERY_PENDING   # "sent" at once: nothing is delivered, nothing is pending
            if not self._ipis_logged:
                self._ipis_logged = True
                log.info("apic: an IPI (ICR %#x) was dropped: the tcg accelerator has one vCPU and delivers no "
                         "interrupts", value)
        self._regs[reg] = value & 0xFFFFFFFF

    def save(self) -> dict:
        return {name: self._regs[reg] for name, reg in _FIELDS.items()}

    def load(self, state: dict) -> None:
        reader = StateReader(self.name, state, tuple(_FIELDS))
        values = {reg: reader.integer(name, 0, 0xFFFFFFFF) for name, reg in _FIELDS.items()}
        self._regs = values
