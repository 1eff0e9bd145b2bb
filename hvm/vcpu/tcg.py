"""The first technique: a vCPU run by binary translation (Unicorn, i.e. QEMU's TCG as a library) instead of KVM.

QEMU offers `-accel kvm` and `-accel tcg`; hvm does the same (`accel: tcg`, `--accel tcg`). Everything but
the CPU is shared with the KVM path: the guest RAM is hvm's own GuestMemory mapped into Unicorn without a
copy (uc_mem_map_ptr), every address that is not RAM is one MMIO region whose callbacks go to the same MmioBus,
IN/OUT (string forms included: Unicorn calls the hook once per element) go to the same PioBus, and each of them
is counted, remembered and traced as the KVM loop does it, under KVM's exit-reason numbers (hvm.kvm.constants),
so --stats, traces, crash reports and `hvm compare` read both the same way.

Two classes, as the KVM side has hvm/kvm's Vcpu and hvm/vcpu/runner.py's VcpuThread:
- `TcgCpu`: the small accelerator interface: create over guest memory, set a BootState, run until an exit
  that ends the loop (HLT, a kick, a fault Unicorn cannot deliver), kick from another thread, registers for
  crash reports.
- `TcgVcpuThread`: the thread around it, with the surface the Machine uses of a VcpuThread (start, kick,
  probe, pause parking, tracing, statistics, crash reports).

What Unicorn cannot do, hvm does not pretend: it delivers no exception or interrupt through the guest's IDT
(its interrupt hook is called instead, and its EIP is unreliable there for faults), and it has no interrupt
controller (so hvm's tcg has none: device IRQs go nowhere). hvm delivers #UD and software interrupts itself,
the two cases with a precise RIP (hvm/vcpu/tcg_idt.py); a guest that raises anything else stops with a crash
report naming the vector and this limitation (status 4), never a hang; a HLT ends the vCPU as one does under KVM without an
in-kernel irqchip, and is a crash report where KVM would wait for an interrupt (an irqchip machine, IF set).
Unicorn steps over SYSCALL and SYSENTER without entering the kernel: those stop the guest too. One vCPU.
Checked on this kvm_pvm host (docs/tcg.md has what runs; tests/test_tcg.py compares every firmware program).

Where Unicorn differs from KVM in what the VMM sees, hvm evens it out: MMIO accesses are made in memory hooks,
as the guest made them (Unicorn's MMIO callbacks see them split); after an access that ends the VM no further
access of the same translation block reaches a device (Unicorn finishes the block after a stop request); and
one 64-bit engine runs every boot mode, so the PC survives mode switches across slices and kicks.
"""
from __future__ import annotations

import logging
import threading
import time
from functools import partial
from collections import deque
from dataclasses import dataclass
from typing import Callable

from hvm.boot.state import BootState
from hvm.kvm import constants as k
from hvm.mmio.bus import MASK, DeviceFault
from hvm.vcpu.tcg_idt import UD_VECTOR, DeliveryError, deliver, software_vector

log = logging.getLogger(__name__)

LAST_EXITS = 16
# Unicorn runs in slices of this many milliseconds: a kick (stop, pause) that lands just before emulation
# starts (uc_emu_stop is then a no-op) is seen at the next slice boundary at the latest.
SLICE_MS = 50
# Never reached: emulation ends on HLT, a kick, a slice's end or a fault, not at an address.
_UNTIL = 0xFFFF_FFFF_FFFF_FFFF
# Physical addresses Unicorn's qemu64 CPU can form (40 bits): every non-RAM page below is MMIO.
PHYS_TOP = 1 << 40
MSR_EFER = 0xC0000080

VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM"}
LIMITATION = ("Unicorn does not deliver exceptions or interrupts through the guest's IDT "
              "(hvm's tcg accelerator stops the guest here)")


IRQ_LIMITATION = ("hvm's tcg accelerator has no interrupt controller: no device interrupt can wake a halted "
                  "vCPU (under KVM it would wait for one)")


def unavailable() -> str | None:
    """Why the tcg accelerator cannot run here (None: it can)."""
    try:
        import unicorn  # noqa: F401
    except ImportError as e:
        return f"the unicorn package is not installed ({e}); pip install unicorn"
    return None


@dataclass
class TcgIo:
    """Where a TcgCpu's port and MMIO accesses go (a vCPU's bus views, with its accounting)."""
    pio_read: Callable[[int, int], int]
    pio_write: Callable[[int, int, int], None]
    mmio_read: Callable[[int, int], int]
    mmio_write: Callable[[int, int, int], None]


@dataclass
class TcgStop:
    """Why TcgCpu.run() returned: "halt" (HLT), "kick" (kick() or a slice ended: run again unless told
    otherwise) or "fault" (what Unicorn could not go on with; `reason` and `detail` for the crash report)."""
    kind: str
    reason: str = ""
    detail: str = ""


class TcgCpu:
    """One x86 CPU emulated by Unicorn over hvm's guest memory. Use as a context manager (close() frees
    Unicorn's state; the guest memory stays hvm's)."""

    def __init__(self, memory, mode: str, io: TcgIo) -> None:
        from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
        from unicorn import x86_const as x

        self._x = x
        # Always Unicorn's 64-bit mode, whatever mode the guest starts in: TCG follows CR0/EFER/CS as the guest
        # switches modes itself (firmware/modes.S: real -> protected -> long), but Unicorn's 16- and 32-bit
        # modes name only the E registers and truncate the PC they read or write (16-bit: uc_emu_start keeps
        # only IP; 32-bit: EIP), so a guest that left the mode it booted in and ran above 64 KiB (or 4 GiB)
        # went to a wrong address after every slice or kick. A real- or protected-mode boot state is set up
        # on a 32-bit engine, whose register writes load the segments' hidden parts (see set_boot_state).
        self.mode = mode
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._ram = [(r.gpa, r.size, r.host_addr) for r in memory.regions]
        self._kicked = False
        self._fault: TcgStop | None = None
        self._vector: int | None = None
        self.memory = memory
        self._read: tuple[int, int, int] = (0, 0, 0)     # the last MMIO read: (address, size, value)
        self.io = io
        try:
            self._set_up(memory, x)
        except BaseException:    # half built: Unicorn is closed now, not when the hooks' cycle is collected
            self.close()
            raise

    def _set_up(self, memory, x) -> None:
        """Guest RAM, MMIO regions and the hooks."""
        from unicorn import UC_HOOK_INSN, UC_HOOK_INTR, UC_PROT_ALL

        uc = self.uc
        regions = sorted(self._ram)
        at = 0
        for gpa, size, host in regions:
            if gpa > at:
                self._map_mmio(at, gpa - at)
            uc.mem_map_ptr(gpa, size, UC_PROT_ALL, host)     # hvm's own pages: no copy
            at = gpa + size
        if at < PHYS_TOP:
            self._map_mmio(at, PHYS_TOP - at)
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, x.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, x.UC_X86_INS_OUT)
        # Unicorn does not execute SYSCALL and SYSENTER: it calls these hooks and steps over the instruction
        # (no switch to the kernel's entry point), which a guest would take as a system call that returned at
        # once. hvm stops the guest there instead.
        uc.hook_add(UC_HOOK_INSN, self._skipped, "SYSCALL", 1, 0, x.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._skipped, "SYSENTER", 1, 0, x.UC_X86_INS_SYSENTER)
        uc.hook_add(UC_HOOK_INTR, self._interrupt)
        self._pc_reg = x.UC_X86_REG_RIP
        self._gprs = [(n, getattr(x, f"UC_X86_REG_{n.upper()}"))
                      for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")]
        self._gprs += [(f"r{i}", getattr(x, f"UC_X86_REG_R{i}")) for i in range(8, 16)]
        self._flags_reg = x.UC_X86_REG_RFLAGS

    def _map_mmio(self, base: int, size: int) -> None:
        """One MMIO region. Unicorn (QEMU's memory API with 4-byte MMIO callbacks) splits what reaches the
        region's callbacks: an 8-byte access becomes two 4-byte ones, an unaligned write single bytes, an
        unaligned read the aligned words around it (reading registers the guest never named). KVM hands the
        VMM the access as the guest made it (address, size 1..8). So the device access is made in memory hooks
        on the region, which Unicorn calls once per guest access with its physical address, size and value,
        before the split; the region's callbacks then only serve the pieces of a read from that value (and
        drop the pieces of a write)."""
        from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE

        # Unicorn hands the callbacks the offset into the region; the hooks get the guest-physical address.
        self.uc.mmio_map(base, size, lambda _uc, off, n, _d: self._read_piece(base + off, n), None,
                         lambda _uc, off, n, value, _d: None, None)
        self.uc.hook_add(UC_HOOK_MEM_READ, self._mmio_read, None, base, base + size - 1)
        self.uc.hook_add(UC_HOOK_MEM_WRITE, self._mmio_write, None, base, base + size - 1)

    def _mmio_read(self, _uc, _access, addr: int, size: int, _value, _data) -> None:
        self._read = (addr, size, self.io.mmio_read(addr, size))

    def _mmio_write(self, _uc, _access, addr: int, size: int, value: int, _data) -> None:
        self.io.mmio_write(addr, size, value & MASK[size])

    def _read_piece(self, addr: int, n: int) -> int:
        """The bytes [addr, addr + n) of the read the hook made (bytes outside it: 0; Unicorn discards them)."""
        at, size, value = self._read
        if addr + n <= at & ~7 or addr >= (at + size + 7) & ~7:
            # not a piece of the last hooked read (nor of the aligned words around it): an access Unicorn made
            # without the memory hooks (a page walk through MMIO, say): made as it comes
            return self.io.mmio_read(addr, n)
        piece = 0
        for i in range(n):
            j = addr + i - at
            if 0 <= j < size:
                piece |= (value >> (8 * j) & 0xFF) << (8 * i)
        return piece

    # --- the hooks: run on the vCPU thread, inside emu_start ---------------------------------------
    def _in(self, _uc, port: int, size: int, _data) -> int:
        return self.io.pio_read(port, size)

    def _out(self, _uc, port: int, size: int, value: int, _data) -> None:
        self.io.pio_write(port, size, value & MASK[size])

    def _skipped(self, uc, name: str) -> None:
        self._fault = TcgStop("fault", f"tcg: {name} (Unicorn steps over it)",
                              f"Unicorn does not execute {name} (no entry to the kernel): hvm's tcg accelerator "
                              "stops the guest here; RIP is the next instruction")
        uc.emu_stop()

    def _interrupt(self, uc, vector: int, _data) -> None:
        name = VECTOR_NAMES.get(vector, "")
        what = f"vector {vector:#x}" + (f" ({name} or INT {vector:#x})" if name else f" (INT {vector:#x})")
        self._fault = TcgStop("fault", f"tcg: exception or interrupt {what}", LIMITATION)
        self._vector = vector
        uc.emu_stop()

    # --- the interface ---------------------------------------------------------------------------
    def set_boot_state(self, state: BootState) -> None:
        """The CPU state a loader asks for (what apply_boot_state gives a KVM vCPU). Unicorn loads a segment
        register's hidden part (base, limit, 16/32-bit) on a register write only in its 16- and 32-bit modes
        (from the GDT the loader wrote, or real mode's selector * 16); its 64-bit mode, which starts in flat
        long mode, stores just the selector. So a real- or protected-mode state is written into a 32-bit
        engine over the same RAM and its CPU state moved into this one (the same QEMU x86-64 CPU structure)."""
        from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc

        if state.mode != self.mode:
            raise ValueError(f"a {self.mode}-mode TcgCpu cannot start in {state.mode} mode")
        if state.mode == "long":
            self._write_state(self.uc, state, wide=True)
            return
        staging = Uc(UC_ARCH_X86, UC_MODE_32)
        try:
            for gpa, size, host in self._ram:
                staging.mem_map_ptr(gpa, size, UC_PROT_ALL, host)
            self._write_state(staging, state, wide=False)
            self.uc.context_restore(staging.context_save())
        finally:
            _close_uc(staging)

    def _write_state(self, uc, state: BootState, wide: bool) -> None:
        x = self._x
        uc.reg_write(x.UC_X86_REG_GDTR, (0, state.gdt[0], state.gdt[1], 0))
        uc.reg_write(x.UC_X86_REG_IDTR, (0, state.idt[0], state.idt[1], 0))
        uc.reg_write(x.UC_X86_REG_CR3, state.cr3)
        uc.reg_write(x.UC_X86_REG_CR4, state.cr4)
        uc.msr_write(MSR_EFER, state.efer)
        uc.reg_write(x.UC_X86_REG_CR0, state.cr0)      # (real mode: PE clear, before the segments are loaded)
        for reg in (x.UC_X86_REG_DS, x.UC_X86_REG_ES, x.UC_X86_REG_FS, x.UC_X86_REG_GS, x.UC_X86_REG_SS):
            uc.reg_write(reg, state.data.selector)
        uc.reg_write(x.UC_X86_REG_CS, state.cs.selector)
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"]
        names += [f"r{i}" for i in range(8, 16)] if wide else []
        for name in names:      # (a 32-bit engine names E registers: a boot state below long mode has no more)
            reg = getattr(x, f"UC_X86_REG_{name.upper()}" if wide else f"UC_X86_REG_E{name[1:].upper()}")
            uc.reg_write(reg, state.regs.get(name, 0) & (MASK[8] if wide else MASK[4]))
        uc.reg_write(x.UC_X86_REG_RFLAGS if wide else x.UC_X86_REG_EFLAGS, state.rflags)
        uc.reg_write(x.UC_X86_REG_RIP if wide else x.UC_X86_REG_EIP, state.rip)

    def run(self) -> TcgStop:
        """Run until HLT, a kick, the end of a slice (both "kick") or a fault."""
        from unicorn import UC_QUERY_TIMEOUT, UcError

        if self._kicked:
            self._kicked = False
            return TcgStop("kick")
        self._fault = None
        self._vector = None
        try:
            # (Unicorn's 64-bit mode writes `begin` into RIP: the offset in CS, real mode included)
            self.uc.emu_start(self.pc(), _UNTIL, timeout=int(SLICE_MS * 1000))
        except UcError as e:
            from unicorn import UC_ERR_INSN_INVALID

            if e.errno == UC_ERR_INSN_INVALID:     # RIP is at the instruction: #UD is delivered precisely
                return self._invalid()
            return TcgStop("fault", f"tcg: {_describe_error(e)}", self._error_detail(e))
        if self._fault is not None:
            vector = self._vector
            if vector is not None and software_vector(self, self.memory, vector):   # INT n/INT3/INTO/INT1: RIP is the return address
                return self._deliver(vector, True, f"tcg: software interrupt {vector:#x}")
            return self._fault
        if self._kicked:
            self._kicked = False
            return TcgStop("kick")
        if self.uc.query(UC_QUERY_TIMEOUT):
            return TcgStop("kick")
        if not self._after_hlt():
            # Unicorn (2.1) also returns without an error, RIP at the instruction, when it runs into an invalid
            # instruction again (seen with a #UD handler that raises #UD: its second #UD ended the VM as
            # "halted", status 0; running again from RIP returns the same way, so a retry would spin). No HLT,
            # no kick, no slice's end, no hook: that is the #UD.
            return self._invalid()
        return TcgStop("halt")

    def _invalid(self) -> TcgStop:
        """Unicorn stopped at an instruction it does not execute, RIP at it: #UD, except for INT1 (ICEBP, F1),
        which Unicorn stops at the same way and a CPU executes: #DB (vector 1) with the next instruction's
        address pushed, and no DPL check (SDM vol. 3, 6.12.1.1)."""
        from hvm.vcpu.tcg_idt import linear_byte

        if linear_byte(self, self.memory, 0) == 0xF1:
            self.uc.reg_write(self._pc_reg, self.pc() + 1)
            stop = self._deliver(1, False, "tcg: software interrupt 0x1 (INT1)")
            if stop.kind == "delivered":
                return TcgStop("delivered", "INT 0x1")
            self.uc.reg_write(self._pc_reg, self.pc() - 1)   # the crash report's RIP: the INT1
            return stop
        return self._deliver(UD_VECTOR, False, "tcg: invalid instruction (#UD)")

    def _after_hlt(self) -> bool:
        """Whether the byte before RIP (where Unicorn leaves RIP after a HLT) is HLT's opcode (or cannot be
        read, e.g. code in an LDT segment: then the HLT it was before)."""
        from hvm.vcpu.tcg_idt import linear_byte

        return linear_byte(self, self.memory, -1) in (0xF4, None)

    def _deliver(self, vector: int, software: bool, what: str) -> TcgStop:
        """Deliver `vector` through the guest's IDT/IVT (hvm/vcpu/tcg_idt.py): "delivered", or the fault."""
        try:
            deliver(self, self.memory, vector, software)
        except DeliveryError as e:
            return TcgStop("fault", what, f"hvm could not deliver it as the CPU would: {e}")
        name = VECTOR_NAMES.get(vector, "") if not software else f"INT {vector:#x}"
        return TcgStop("delivered", name or f"vector {vector:#x}")

    def _error_detail(self, e) -> str:
        from unicorn import UC_ERR_INSN_INVALID

        if e.errno == UC_ERR_INSN_INVALID:
            return "an instruction Unicorn cannot execute (a CPU would raise #UD); " + LIMITATION
        return f"at PC {self.pc():#x}"

    def kick(self) -> None:
        """From any thread: make run() return soon (emu_stop now, or the slice's end at the latest)."""
        self._kicked = True
        try:
            self.uc.emu_stop()
        except Exception:   # not running: the flag is seen before the next emu_start
            pass

    def interrupts_enabled(self) -> bool:
        """RFLAGS.IF: whether a HLT now waits for an interrupt (KVM's halt rule with an irqchip)."""
        return bool(self.uc.reg_read(self._flags_reg) & 0x200)

    def pc(self) -> int:
        return self.uc.reg_read(self._pc_reg)

    def registers(self) -> tuple[dict[str, int], dict[str, int]]:
        """General registers (RIP, RFLAGS, ...) and the control state, for a CrashReport (all 64 bits, in any
        mode: the engine is Unicorn's 64-bit one)."""
        x, uc = self._x, self.uc
        regs = {name: uc.reg_read(reg) for name, reg in self._gprs}
        for i in range(8, 16):
            regs.setdefault(f"r{i}", 0)
        regs["rip"] = self.pc()
        regs["rflags"] = uc.reg_read(self._flags_reg)
        idtr = uc.reg_read(x.UC_X86_REG_IDTR)
        sregs = {"cs": uc.reg_read(x.UC_X86_REG_CS), "ss": uc.reg_read(x.UC_X86_REG_SS),
                 "cr0": uc.reg_read(x.UC_X86_REG_CR0), "cr2": uc.reg_read(x.UC_X86_REG_CR2),
                 "cr3": uc.reg_read(x.UC_X86_REG_CR3), "cr4": uc.reg_read(x.UC_X86_REG_CR4),
                 "efer": uc.msr_read(MSR_EFER), "idt.base": idtr[1], "idt.limit": idtr[2]}
        return regs, sregs

    def close(self) -> None:
        uc, self.uc = self.uc, None
        if uc is not None:
            _close_uc(uc)

    def __enter__(self) -> "TcgCpu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_uc(uc) -> None:
    """uc_close now (the binding's own finalizer, idempotent), not whenever the hooks' reference cycle is
    collected: Unicorn maps guest memory that the Machine is about to unmap."""
    finalize = getattr(uc, "_Uc__finalizer", None)
    if finalize is not None:
        finalize()


def _describe_error(e) -> str:
    import unicorn as u

    return {u.UC_ERR_INSN_INVALID: "invalid instruction",
            u.UC_ERR_READ_UNMAPPED: "read beyond the physical address space",
            u.UC_ERR_WRITE_UNMAPPED: "write beyond the physical address space",
            u.UC_ERR_FETCH_UNMAPPED: "instruction fetch beyond the physical address space",
            u.UC_ERR_FETCH_PROT: "instruction fetch from a non-executable page",
            u.UC_ERR_EXCEPTION: "unhandled CPU exception"}.get(e.errno, str(e))


class TcgVcpuThread(threading.Thread):
    """A vCPU thread whose CPU is a TcgCpu: what hvm/vcpu/runner.py's VcpuThread is for a KVM vCPU, with the
    same counters, last-exits history, trace records and crash reports."""

    def __init__(self, index: int, machine, memory, boot_state: BootState) -> None:
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.index = index
        self.machine = machine
        self.exit_counts = [0] * k.NUM_EXIT_REASONS
        self.last_exits: deque[tuple] = deque(maxlen=LAST_EXITS)
        self.completed: dict[str, int] = {}      # (KVM's emulation failures hvm completes: none here)
        self.halted = False
        self.fast = None
        self.trace_sink: Callable[[tuple], None] | None = None
        self.trace_rip = False
        self.trace_in_c = False
        self.t0_ns = 0
        self.reselect = False
        self._resume_on_halt = False
        self._error: Exception | None = None    # what a bus access raised (see _ending)
        self._pio = machine.pio.for_vcpu()
        self._mmio = machine.mmio.for_vcpu()
        pio, mmio = self._pio, self._mmio
        io = TcgIo(partial(self._read, pio.read, k.EXIT_IO, k.EXIT_IO_IN),
                   partial(self._write, pio.write, k.EXIT_IO, k.EXIT_IO_OUT),
                   partial(self._read, mmio.read, k.EXIT_MMIO, 0),
                   partial(self._write, mmio.write, k.EXIT_MMIO, 1))
        self.cpu = TcgCpu(memory, boot_state.mode, io)
        try:
            self.cpu.set_boot_state(boot_state)
        except BaseException:   # the Machine never holds this thread: its Unicorn is closed here
            self.close()
            raise

    # --- accesses, accounted as KVM exits ------------------------------------------------------------
    def _record(self, reason: int, where, size: int, direction: int, value: int | None, t: int) -> None:
        self.exit_counts[reason] += 1
        self.last_exits.append((reason, where, direction, size, 1, value))
        sink = self.trace_sink
        if sink is not None:
            now = time.monotonic_ns()
            rip = self.cpu.pc() if self.trace_rip else None
            sink((t - self.t0_ns, self.index, reason, where, size, direction, 1,
                  value.to_bytes(size, "little"), now - t, rip))

    # Unicorn runs the rest of a translation block after a stop request (uc_emu_stop takes effect at the next
    # block), so a guest access that ends the VM (debug-exit, ACPI S3/S5, i8042 reset) or that a device fails
    # on can be followed by more accesses before the vCPU stops, where KVM makes no exit after it. Once the
    # VM is stopping or an access failed, the vCPU stops Unicorn and makes no more bus accesses (reads see
    # all ones): nothing reaches a device, the console or the counters after the end. A failure is raised
    # again on the vCPU loop (device fault: status 70), as the KVM loop raises it.
    def _ending(self) -> bool:
        if self._error is not None or self.machine.stopping:
            self.cpu.kick()
            return True
        return False

    def _failed(self, e: Exception) -> None:
        self._error = e
        self.cpu.kick()

    def _read(self, bus_read: Callable[[int, int], int], reason: int, direction: int, where: int,
              size: int) -> int:
        """A port or MMIO read on the bus, accounted as its KVM exit; all ones once the VM ends or a device failed."""
        if self._ending():
            return MASK[size]
        t = time.monotonic_ns()
        try:
            value = bus_read(where, size)
            self._record(reason, where, size, direction, value, t)
        except Exception as e:
            self._failed(e)
            return MASK[size]
        self._ending()
        return value

    def _write(self, bus_write: Callable[[int, int, int], None], reason: int, direction: int, where: int,
               size: int, value: int) -> None:
        """A port or MMIO write on the bus, accounted as its KVM exit; dropped once the VM ends or a device failed."""
        if self._ending():
            return
        t = time.monotonic_ns()
        try:
            bus_write(where, size, value)
            self._record(reason, where, size, direction, value, t)
        except Exception as e:
            self._failed(e)
            return
        self._ending()

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        machine = self.machine
        try:
            machine.wait_while_paused(self.index)
            while not machine.stopping:
                stop = self.cpu.run()
                if self._error is not None:
                    raise self._error
                if stop.kind == "delivered":      # an exception or INT n hvm delivered through the IDT
                    name = f"{stop.reason} delivered"
                    self.completed[name] = self.completed.get(name, 0) + 1
                    continue
                if stop.kind == "kick":
                    if not machine.stopping:
                        machine.wait_while_paused(self.index)
                    continue
                if stop.kind == "halt":
                    self.exit_counts[k.EXIT_HLT] += 1
                    self.last_exits.append((k.EXIT_HLT,))
                    if self.trace_sink is not None:
                        rip = self.cpu.pc() if self.trace_rip else None
                        self.trace_sink((time.monotonic_ns() - self.t0_ns, self.index, k.EXIT_HLT, None, 0, 0, 0,
                                         b"", 0, rip))
                    if self._resume_on_halt:
                        continue
                    if machine.spec.irqchip and self.cpu.interrupts_enabled():
                        # Under KVM (in-kernel irqchip) this vCPU would wait for an interrupt; tcg has no
                        # interrupt controller, so none can come: say so rather than end as a clean halt.
                        machine.vcpu_crashed(self.crash_report("tcg: HLT with interrupts enabled (the guest waits "
                                                               "for an interrupt)", IRQ_LIMITATION))
                        return
                    self.halted = True
                    machine.vcpu_halted(self.index)
                    return
                machine.vcpu_crashed(self.crash_report(stop.reason, stop.detail))
                return
        except DeviceFault as e:
            log.info("vCPU %d: device fault", self.index, exc_info=True)
            machine.device_fault(self.index, e)
        except Exception as e:  # a bug in hvm: one line (traceback with -v), never a hang
            log.info("vCPU %d: internal error", self.index, exc_info=True)
            machine.internal_error(self.index, f"{type(e).__name__}: {e}")
        finally:
            machine.vcpu_thread_ended(self.index)

    # --- what the Machine asks of a vCPU thread --------------------------------------------------------
    def resume_on(self, reason: int) -> None:
        """Benchmarks' HLT loop: go on after HLT instead of ending the vCPU."""
        if reason == k.EXIT_HLT:
            self._resume_on_halt = True

    def total_exit_counts(self) -> list[int]:
        return list(self.exit_counts)

    def set_tracing(self, sink: Callable[[tuple], None] | None, rip: bool = False, in_c: bool = True) -> None:
        self.trace_sink = sink
        self.trace_rip = rip

    def kick(self) -> None:
        cpu = self.cpu
        if cpu is not None and cpu.uc is not None:
            cpu.kick()

    def probe(self) -> None:
        self.machine.vcpu_probed(self.index, self.activity())

    def activity(self) -> str:
        return "halted" if self.halted else "running"

    def describe_last_exits(self) -> list[str]:
        from hvm.vcpu.runner import describe_exits

        return describe_exits(self.last_exits)

    def crash_report(self, reason: str, detail: str = ""):
        from hvm.vcpu.report import CrashReport

        report = CrashReport(vcpu=self.index, reason=reason, detail=detail, last_exits=self.describe_last_exits())
        try:
            report.regs, report.sregs = self.cpu.registers()
        except Exception as e:   # Unicorn refused a register read: the report still goes out
            report.detail += f" (registers unavailable: {e})"
        return report

    def close(self) -> None:
        cpu, self.cpu = self.cpu, None
        if cpu is not None:
            cpu.close()
