"""One thread per vCPU: the KVM_RUN loop and its dispatch table (kvmtool's kvm-cpu.c, in Python).

The hot path is: KVM_RUN (GIL released by cffi) -> read exit_reason from the mmapped kvm_run ->
index the dispatch table -> one handler -> bus -> device. Handlers read kvm_run through a
memoryview with precompiled struct formats; nothing is looked up twice. Behind the C fast loop, a single
port access or MMIO access skips the table, the handler and the bus view's method: _loop_fast does their
steps inline, so the device's read/write is the only Python call of such an exit.

Exits that need no Python at all -- repeated accesses to addresses no device claims, once the bus
has reported them -- never reach this loop: KVM_RUN is issued by the C fast loop (fastloop.py), which
re-enters the guest after those itself and returns every other exit here (and records exits for the
tracer, when asked). Source trees without the compiled module, `fast_loop=False`, and traces that must
reach Python as each exit ends (kept in memory, early callbacks, a ring over several vCPUs) use the
all-Python loops; the results are the same.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import threading
import time
from collections import deque

from hvm._types import Callable, Protocol
from hvm.kvm import KICK_SIGNAL, Vcpu, ffi
from hvm.kvm import constants as k
from hvm.kvm._ffi import API_MODE, lib
from hvm.kvm.ioctls import KVM_RUN
from hvm.mmio.bus import MASK, DeviceFault, MmioBus, PioBus
from hvm.memory import GuestMemoryError
from hvm.vcpu import fastloop
from hvm.vcpu.complete import Fault, SoftInterrupt, complete, fetch_bytes, page_writable
from hvm.vcpu.report import CrashReport

log = logging.getLogger(__name__)

# kvm_run layout (checked against <linux/kvm.h> by the cffi build): the exit union starts at 32.
_REASON_OFFSET = 8
_IO = struct.Struct("<BBHIQ")       # direction, size, port, count, data_offset
_MMIO = struct.Struct("<QQIB")      # phys_addr, data[8] (as u64), len, is_write
_EXIT_UNION = 32
_UINT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_UINT_BY_SIZE = [None, _UINT[1], _UINT[2], None, _UINT[4], None, None, None, _UINT[8]]
_CAST_BY_SIZE = [None, "B", "H", None, "I"]      # struct codes for string I/O elements
_IO_OF = _IO.unpack_from
_EXIT_IO = k.EXIT_IO
_EXIT_MMIO = k.EXIT_MMIO
LAST_EXITS = 16
RFLAGS_IF = 1 << 9


def _kvm_run_call():
    """The cheapest way to issue KVM_RUN: the compiled integer-argument wrapper, or libc's ioctl in ABI mode."""
    if API_MODE:
        return lib.hvm_ioctl_int, 0
    return lib.ioctl, ffi.NULL


class VmControl(Protocol):
    """What a vCPU thread needs from the machine that owns it."""

    stopping: bool
    pio: PioBus
    mmio: MmioBus

    def vcpu_halted(self, index: int) -> None: ...

    def vcpu_crashed(self, report: CrashReport) -> None: ...

    def device_fault(self, index: int, fault: DeviceFault) -> None: ...

    def host_error(self, index: int, message: str) -> None: ...

    def internal_error(self, index: int, message: str) -> None: ...

    def system_event(self, index: int, kind: int) -> None: ...

    def wait_while_paused(self, index: int) -> None: ...

    def vcpu_probed(self, index: int, activity: str) -> None: ...

    def vcpu_thread_ended(self, index: int) -> None: ...


class _VcpuCpu:
    """hvm/vcpu/complete.py's view of a vCPU: its registers (read once), paging through KVM_TRANSLATE, RAM or
    the MMIO bus by guest-physical address, the CPUID table the machine gave the guest, and its XCRs."""

    def __init__(self, vcpu: Vcpu, machine: VmControl, mmio) -> None:
        self.vcpu = vcpu
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self._memory = getattr(machine, "memory", None)
        self._mmio = mmio
        self._cpuid = getattr(machine, "cpuid", None) or []
        self._xsave: bytearray | None = None

    def translate(self, linear: int) -> int | None:
        found = self.vcpu.translate(linear)
        return None if found is None else found[0]

    def read_phys(self, gpa: int, length: int) -> bytes:
        mem = self._memory
        if mem is not None and mem.contains(gpa, length):
            return mem.read(gpa, length)
        if length in (1, 2, 4, 8):
            return self._mmio.read(gpa, length).to_bytes(length, "little")
        return bytes(self._mmio.read(gpa + i, 1) for i in range(length))

    def writable(self, linear: int) -> bool | None:
        """Supervisor-writable through the guest's 4-level page tables (None: not present); page-table
        reads outside RAM count as not present."""
        try:
            return page_writable(self._read_ram, self.sregs.cr3, linear)
        except GuestMemoryError:
            return None

    def _read_ram(self, gpa: int, length: int) -> bytes:
        mem = self._memory
        if mem is None or not mem.contains(gpa, length):
            raise GuestMemoryError(f"page table at {gpa:#x} outside RAM")
        return mem.read(gpa, length)

    def read_code(self, gpa: int, length: int) -> bytes | None:
        mem = self._memory
        return mem.read(gpa, length) if mem is not None and mem.contains(gpa, length) else None

    def write_phys(self, gpa: int, data: bytes) -> None:
        mem = self._memory
        if mem is not None and mem.contains(gpa, len(data)):
            mem.write(gpa, data)
        elif len(data) in (1, 2, 4, 8):
            self._mmio.write(gpa, len(data), int.from_bytes(data, "little"))
        else:
            for i, b in enumerate(data):
                self._mmio.write(gpa + i, 1, b)

    def has_feature(self, feature: tuple[int, int, str, int]) -> bool:
        leaf, sub, reg, bit = feature
        for e in self._cpuid:
            if e["function"] == leaf and (e["index"] == sub or not e["flags"] & 1):   # 1: index significant
                return bool(e[reg] >> bit & 1)
        return False

    def cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int] | None:
        for e in self._cpuid:
            if e["function"] == leaf and (e["index"] == sub or not e["flags"] & 1):
                return e["eax"], e["ebx"], e["ecx"], e["edx"]
        return None

    def xsave_area(self) -> bytearray:
        if self._xsave is None:
            self._xsave = bytearray(ffi.buffer(self.vcpu.get_xsave(self.vcpu.vm.xsave_size())))
        return self._xsave

    def write_xsave(self) -> None:
        self.vcpu.set_xsave(ffi.from_buffer(self._xsave))

    def xcr(self, index: int) -> int | None:
        xcrs = self.vcpu.get_xcrs()
        for i in range(min(xcrs.nr_xcrs, 16)):
            if xcrs.xcrs[i].xcr == index:
                return xcrs.xcrs[i].value
        return None


class _Routes:
    """Tells a vCPU's fast loop which ports or MMIO addresses are unclaimed (a bus RouteListener)."""

    def __init__(self, unclaimed: Callable[[int], None], claimed: Callable[[int, int], None]) -> None:
        self.unclaimed = unclaimed
        self.claimed = claimed


class VcpuThread(threading.Thread):
    def __init__(self, vcpu: Vcpu, machine: VmControl, complete_emulation: bool = True, fast_loop: bool = True):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.index = vcpu.index
        self.machine = machine
        self.exit_counts = [0] * k.NUM_EXIT_REASONS
        self.last_exits: deque[tuple] = deque(maxlen=LAST_EXITS)
        self._last_exit = self.last_exits.append
        # Bound once: the I/O handler is the hottest code in hvm. Each vCPU goes through a view of its own
        # of each bus (same routes, its own hit counters), so counts stay exact with several vCPUs.
        pio = self._pio = machine.pio.for_vcpu()
        self._mmio = machine.mmio.for_vcpu()
        self._pio_read = pio.read
        self._pio_write = pio.write
        self._pio_read_string = pio.read_string
        self._pio_write_string = pio.write_string
        self.halted = False
        # Set by probe(): the next kick also reports what the vCPU is doing (see activity()).
        self._probe_wanted = False
        # Emulation failures hvm completed itself, by instruction (see _complete_emulation).
        self.completed: dict[str, int] = {}
        self.complete_emulation = complete_emulation
        # Tracing: when set, the traced loop hands one raw record per exit to trace_sink (a deque append);
        # see hvm/trace/record.py for the tuple's layout. t0_ns is the VM's start time.
        self.trace_sink: Callable[[tuple], None] | None = None
        self.trace_rip = False
        # Record exits in C (the fast loop) rather than in the Python loop: same records, no Python per
        # exit; they reach the sink in batches (at least every 50 ms while exits come, and at the end).
        self.trace_in_c = True
        self.t0_ns = 0
        self.reselect = False    # set while parked: leave the run loop and choose it again (set_tracing)
        self._view = vcpu.run_view
        # One table keyed by exit reason; anything not listed is an unexpected exit.
        self.dispatch: list[Callable[[], bool]] = [self._exit_unexpected] * k.NUM_EXIT_REASONS
        self.dispatch[k.EXIT_IO] = self._exit_io
        self.dispatch[k.EXIT_MMIO] = self._exit_mmio
        self.dispatch[k.EXIT_HLT] = self._exit_hlt
        self.dispatch[k.EXIT_SHUTDOWN] = self._exit_shutdown
        self.dispatch[k.EXIT_FAIL_ENTRY] = self._exit_fail_entry
        self.dispatch[k.EXIT_INTERNAL_ERROR] = self._exit_internal_error
        self.dispatch[k.EXIT_SYSTEM_EVENT] = self._exit_system_event
        self.dispatch[k.EXIT_IRQ_WINDOW_OPEN] = self._exit_ignored
        self.dispatch[k.EXIT_INTR] = self._exit_ignored
        # The C fast loop, if compiled and wanted; the buses tell it which addresses are unclaimed.
        self.fast: fastloop.FastLoop | None = None
        if fast_loop and fastloop.AVAILABLE:
            fl = self.fast = fastloop.FastLoop(vcpu.fd, int(ffi.cast("uintptr_t", vcpu.run_struct)))
            machine.pio.attach(_Routes(fl.port_unclaimed, fl.ports_claimed), fl.port_hits)
            machine.mmio.attach(_Routes(fl.mmio_unclaimed, fl.mmio_claimed), fl.mmio_hits)
            fl.use_published(machine.pio.published)   # device registers answered in C (published.py)

    def resume_on(self, reason: int) -> None:
        """Enter the guest again at once after exits of this reason, without a handler (benchmarks: the
        bare loop's cost). In the fast loop this happens in C; otherwise the handler becomes a no-op."""
        self.dispatch[reason] = self._exit_ignored
        if self.fast is not None:
            self.fast.resume_on(reason)

    def total_exit_counts(self) -> list[int]:
        """Exits by reason: those this loop dispatched plus those the C fast loop handled itself."""
        if self.fast is None:
            return list(self.exit_counts)
        handled = self.fast.handled()
        return [n + (handled[r] if r < len(handled) else 0) for r, n in enumerate(self.exit_counts)]

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            # A VM started paused (QEMU's -S) runs no guest instruction before it is resumed.
            self.machine.wait_while_paused(self.index)
            # The loop is chosen once per pass; Machine.set_trace (QMP's x-hvm-trace) parks the vCPUs, swaps
            # the tracer and sets `reselect`, and the loop returns through its kick path (where nothing is
            # hot) to be chosen again. An untraced loop so pays nothing for tracing that may start later.
            while True:
                self.reselect = False
                self._run_loop()
                if not self.reselect or self.machine.stopping:
                    break
        except DeviceFault as e:
            # A device raised on a guest access (the bus caught it and named it): a bug in hvm, reported
            # in one line; the traceback only with -v.
            log.info("vCPU %d: device fault", self.index, exc_info=True)
            self.machine.device_fault(self.index, e)
        except Exception as e:  # a bug in the VMM itself: one line (traceback with -v), never a hang
            log.info("vCPU %d: internal error", self.index, exc_info=True)
            self.machine.internal_error(self.index, f"{type(e).__name__}: {e}")
        finally:
            # The last act of the thread: close() may have left the vCPU's mappings to it (it was still
            # running then); from here on the thread touches neither kvm_run nor guest memory.
            self.machine.vcpu_thread_ended(self.index)

    def _run_loop(self) -> None:
        if self.fast is not None and (self.trace_sink is None or self.trace_in_c):
            traced = self.trace_sink is not None
            if traced and not self.fast.tracing:
                self.fast.start_trace(self.trace_rip)
            try:
                self._loop_fast()
            finally:
                if traced and self.trace_sink is not None:
                    self._trace_flush()   # everything up to the last exit, crash or not
        elif self.trace_sink is not None:
            self._loop_traced()
        else:
            self._loop()

    def set_tracing(self, sink: Callable[[tuple], None] | None, rip: bool = False, in_c: bool = True) -> None:
        """Start or stop exit tracing on a vCPU that is parked (paused) or not started: the records the C
        loop holds go to the old sink first; the loop is chosen again when the vCPU runs on."""
        if self.fast is not None and self.fast.tracing:
            if self.trace_sink is not None:
                self._trace_flush()
            self.fast.stop_trace()
        self.trace_sink = sink
        self.trace_rip = rip
        self.trace_in_c = in_c
        self.reselect = True

    def _loop(self) -> None:
        fd = self.vcpu.fd
        ioctl, arg = _kvm_run_call()
        reason_of = _UINT[4].unpack_from
        view = self._view
        dispatch = self.dispatch
        counts = self.exit_counts
        machine = self.machine
        while not machine.stopping:
            if ioctl(fd, KVM_RUN, arg) < 0:
                if self._run_failed(ffi.errno) or self.reselect:
                    return
                continue
            reason = reason_of(view, _REASON_OFFSET)[0]
            counts[reason] += 1
            if dispatch[reason]():
                return  # the handler ended this vCPU (halt, crash, shutdown)

    def _loop_fast(self) -> None:
        """The same loop around the C fast loop, which returns only exits that need Python, -errno, or
        TRACE_FLUSH when it is recording exits and its buffer wants emptying.

        A single port access or an MMIO access -- what reaches Python most: a device's register -- is
        handled right here, not through the dispatch table, _exit_io/_exit_mmio and the bus view's read/write
        (the same steps, bound once per run: one Python call per exit, the device's). It records no
        last-exits tuple: the C loop's ring holds every exit. Anything else, string I/O included, goes
        through the dispatch table; so do port I/O and MMIO when their table entry was replaced (tests,
        benchmarks)."""
        fast = self.fast
        run, fd, run_address, state = fast.run, fast.fd, fast.run_address, fast.state
        dispatch = self.dispatch
        counts = self.exit_counts
        machine = self.machine
        view = self._view
        # -1 << 40 is no exit reason and no -errno: port I/O (MMIO) then takes the table's handler.
        io_reason = _EXIT_IO if dispatch[_EXIT_IO] == self._exit_io else -1 << 40
        mmio_reason = _EXIT_MMIO if dispatch[_EXIT_MMIO] == self._exit_mmio else -1 << 40
        mmio_of = _MMIO.unpack_from
        mmio = self._mmio
        # The MMIO view's route cache (cleared in place when a device registers), route lookup, own counts.
        routes, route_of, mmio_hits, mmio_fault = mmio._routes, mmio._route, mmio._hits, mmio._fault
        io_of = _IO_OF
        uint = _UINT_BY_SIZE
        mask = MASK
        pio = self._pio
        # The bus's own lists, changed in place when a device registers: bound once, always current.
        hits, handlers, offsets, fault = pio._hits, pio._handlers, pio._offsets, pio._fault
        while not machine.stopping:
            reason = run(fd, run_address, state)
            if reason == io_reason:
                counts[reason] += 1
                direction, size, port, count, offset = io_of(view, 32)   # 32: _EXIT_UNION
                if count == 1:
                    hits[port] += 1
                    # One byte (a UART's registers) through the byte view itself: half the cost of a Struct.
                    if direction:   # KVM_EXIT_IO_OUT; a value unpacked from `size` bytes needs no mask
                        value = view[offset] if size == 1 else uint[size].unpack_from(view, offset)[0]
                        try:
                            handlers[port][1](offsets[port], size, value)
                        except Exception as e:
                            raise fault(port, size, value, e) from e
                    else:
                        try:
                            value = handlers[port][0](offsets[port], size) & mask[size]
                        except Exception as e:
                            raise fault(port, size, None, e) from e
                        if size == 1:
                            view[offset] = value
                        else:
                            uint[size].pack_into(view, offset, value)
                    continue
                if self._exit_io():     # string I/O: counted above already
                    return
                continue
            if reason == mmio_reason:
                counts[reason] += 1
                addr, data, length, is_write = mmio_of(view, 32)   # 32: _EXIT_UNION
                route = routes.get(addr) or route_of(addr)
                key = route[3]
                mmio_hits[key] = mmio_hits.get(key, 0) + 1
                if is_write:
                    value = data & mask[length]
                    try:
                        route[1](route[2], length, value)
                    except Exception as e:
                        raise mmio_fault(addr, length, value, e) from e
                else:
                    try:
                        value = route[0](route[2], length) & mask[length]
                    except Exception as e:
                        raise mmio_fault(addr, length, None, e) from e
                    view[40:40 + length] = value.to_bytes(length, "little")   # the data, at _EXIT_UNION + 8
                continue
            if reason < 0:
                if reason == fastloop.TRACE_FLUSH:
                    self._trace_flush()
                elif self._run_failed(-reason) or self.reselect:
                    return
                continue
            counts[reason] += 1
            if dispatch[reason]():
                return

    def _loop_traced(self) -> None:
        """The same loop, recording each exit after its handler ran (so IN/MMIO-read data is the value the
        guest got). Kept separate so that the untraced loop pays nothing for tracing."""
        fd = self.vcpu.fd
        ioctl, arg = _kvm_run_call()
        reason_of = _UINT[4].unpack_from
        io_of = _IO.unpack_from
        mmio_of = _MMIO.unpack_from
        view = self._view
        dispatch = self.dispatch
        counts = self.exit_counts
        machine = self.machine
        sink = self.trace_sink
        clock = time.monotonic_ns
        t0 = self.t0_ns
        index = self.index
        want_rip = self.trace_rip
        get_regs = self.vcpu.get_regs
        EXIT_IO, EXIT_MMIO, EXIT_INTERNAL = k.EXIT_IO, k.EXIT_MMIO, k.EXIT_INTERNAL_ERROR
        while not machine.stopping:
            if ioctl(fd, KVM_RUN, arg) < 0:
                if self._run_failed(ffi.errno) or self.reselect:
                    return
                continue
            t = clock()
            reason = reason_of(view, _REASON_OFFSET)[0]
            counts[reason] += 1
            rip = get_regs().rip if want_rip else None
            if reason == EXIT_IO:
                direction, size, port, count, offset = io_of(view, _EXIT_UNION)
                end = dispatch[reason]()
                rec = (t - t0, index, reason, port, size, direction, count, bytes(view[offset:offset + size * count]),
                       clock() - t, rip)
            elif reason == EXIT_MMIO:
                addr, _data, length, is_write = mmio_of(view, _EXIT_UNION)
                end = dispatch[reason]()
                rec = (t - t0, index, reason, addr, length, is_write, 1,
                       bytes(view[_EXIT_UNION + 8:_EXIT_UNION + 8 + length]), clock() - t, rip)
            else:
                extra = rip
                if reason == EXIT_INTERNAL and not want_rip:
                    extra = _UINT[4].unpack_from(view, _EXIT_UNION)[0]
                end = dispatch[reason]()
                rec = (t - t0, index, reason, None, 0, 0, 0, b"", clock() - t, extra)
            sink(rec)
            if end:
                return

    def _trace_flush(self) -> None:
        """Hand the exits the fast loop recorded to the trace sink."""
        for rec in self.fast.take_trace(self.t0_ns, self.index):
            self.trace_sink(rec)

    def _run_failed(self, err: int) -> bool:
        """KVM_RUN returned -1: EINTR/EAGAIN is a kick (stop, pause): False, run on. Anything else (EFAULT,
        ENOMEM, ...) is the host failing, not the guest: the machine ends with status 6; True."""
        if err == errno.EINTR or err == errno.EAGAIN:
            self._kicked()
            return False
        self.machine.host_error(self.index, f"KVM_RUN failed on vCPU {self.index}: "
                                f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})")
        return True

    def _kicked(self) -> None:
        """KVM_RUN returned EINTR: someone wants this thread (stop, pause, probe). Clear the request flag."""
        self.vcpu.run_struct.immediate_exit = 0
        if self._probe_wanted:
            self._probe_wanted = False
            self.machine.vcpu_probed(self.index, self.activity())
        if not self.machine.stopping:
            self.machine.wait_while_paused(self.index)

    def probe(self) -> None:
        """Ask this thread to report its vCPU's activity (Machine.vcpu_probed). Answered from the thread
        itself: another thread's vCPU ioctl would wait for KVM_RUN to return."""
        self._probe_wanted = True
        self.kick()

    def activity(self) -> str:
        """From this thread, between two KVM_RUNs: "waiting" (never started: the vCPU waits for INIT/SIPI),
        "halted" (HLT with interrupts off: only an NMI, INIT or SIPI from another vCPU could wake it), or
        "running" (anything else, including HLT with interrupts on: a timer may wake it)."""
        try:
            mp_state = self.vcpu.get_mp_state()
            if mp_state in (k.MP_STATE_UNINITIALIZED, k.MP_STATE_INIT_RECEIVED):
                return "waiting"
            if mp_state == k.MP_STATE_HALTED and not self.vcpu.get_regs().rflags & RFLAGS_IF:
                return "halted"
        except OSError as e:   # a host that will not say: the VM is not ended on a guess
            log.debug("vCPU %d: activity unknown: %s", self.index, e)
        return "running"

    def kick(self) -> None:
        """Make KVM_RUN return soon: set immediate_exit (covers the window before the next KVM_RUN)
        and signal the thread (interrupts a KVM_RUN in progress)."""
        run = self.vcpu.run_struct
        if run is not None:
            run.immediate_exit = 1
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    # --- handlers: return True to end this vCPU's loop ----------------------------------------------
    def _exit_io(self) -> bool:
        view = self._view
        direction, size, port, count, offset = _IO_OF(view, _EXIT_UNION)
        fmt = _UINT_BY_SIZE[size]
        if direction:  # KVM_EXIT_IO_OUT
            if count == 1:
                value = fmt.unpack_from(view, offset)[0]
                self._pio_write(port, size, value)
            else:  # string I/O (rep outs): count elements back to back, one exit (one access counted)
                # (unpacked into a tuple: no view of kvm_run may outlive the exit, e.g. in a fault's traceback)
                self._pio_write_string(port, size, struct.unpack_from(f"<{count}{_CAST_BY_SIZE[size]}", view, offset))
        elif count == 1:
            value = self._pio_read(port, size)
            fmt.pack_into(view, offset, value)
        else:  # rep ins
            values = self._pio_read_string(port, size, count)
            struct.pack_into(f"<{count}{_CAST_BY_SIZE[size]}", view, offset, *values)
        self._last_exit((_EXIT_IO, port, direction, size, count, value if count == 1 else None))
        return False

    def _exit_mmio(self) -> bool:
        view = self._view
        addr, data, length, is_write = _MMIO.unpack_from(view, _EXIT_UNION)
        mmio = self._mmio
        if is_write:   # masked here for the record of this exit; the bus masks reads itself
            value = data & MASK[length]
            mmio.write(addr, length, value)
        else:
            value = mmio.read(addr, length)
            view[_EXIT_UNION + 8:_EXIT_UNION + 8 + length] = value.to_bytes(length, "little")
        self.last_exits.append((k.EXIT_MMIO, addr, is_write, length, 1, value))
        return False

    def _exit_hlt(self) -> bool:
        # Only seen without an in-kernel irqchip: nothing can ever interrupt this vCPU again.
        self.last_exits.append((k.EXIT_HLT,))
        self.halted = True
        self.machine.vcpu_halted(self.index)
        return True

    def _exit_ignored(self) -> bool:
        return False

    def _exit_shutdown(self) -> bool:
        self.machine.vcpu_crashed(self.crash_report(
            "SHUTDOWN (triple fault)", "the guest took an exception while delivering a double fault; "
            "a real PC would reset here"))
        return True

    def _exit_fail_entry(self) -> bool:
        fe = self.vcpu.run_struct.fail_entry
        self.machine.vcpu_crashed(self.crash_report(
            "FAIL_ENTRY", f"hardware entry failure reason {fe.hardware_entry_failure_reason:#x} on host CPU {fe.cpu}"
            " (invalid guest state)"))
        return True

    def _exit_internal_error(self) -> bool:
        ie = self.vcpu.run_struct.internal
        sub = ie.suberror
        detail = f"suberror {sub}: {k.INTERNAL_ERROR_NAMES.get(sub, 'unknown')}"
        if sub == k.INTERNAL_ERROR_EMULATION and ie.ndata >= 2:
            # struct emulation_failure overlay: flags in data[0], insn_size + bytes from data[1]
            raw = ffi.buffer(ffi.addressof(ie, "data"), 8 * ie.ndata)[:]
            if ie.data[0] & 1:
                insn = raw[9:9 + raw[8]]
                if self.complete_emulation and self._complete_emulation(insn):
                    return False
                detail += f"; instruction bytes: {insn.hex(' ')}"
        elif ie.ndata:
            detail += "; data: " + " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
        self.machine.vcpu_crashed(self.crash_report("INTERNAL_ERROR", detail))
        return True

    def _complete_emulation(self, insn: bytes) -> bool:
        """Finish, as the CPU would, an instruction which the host's instruction emulator gave up on (seen
        on the kvm_pvm backend): decoded and applied by hvm/vcpu/complete.py. Returns True if done (the
        effect applied or the architectural fault injected); False: not an instruction hvm completes."""
        try:
            cpu = _VcpuCpu(self.vcpu, self.machine, self._mmio)
            done = complete(insn, cpu, fetch=lambda: fetch_bytes(cpu, insn))
            if done is None:
                return False
            vcpu = self.vcpu
            if done.regs_changed:
                vcpu.set_regs(cpu.regs)
            if done.xsave_changed:
                cpu.write_xsave()
            event = done.event
            if event is not None:
                if isinstance(event, Fault) and event.cr2 is not None:
                    cpu.sregs.cr2 = event.cr2
                    vcpu.set_sregs(cpu.sregs)
                events = vcpu.get_vcpu_events()
                events.flags = 0
                if isinstance(event, SoftInterrupt):
                    # A software interrupt (not an exception: KVM takes only vectors 0-31 there), RIP already
                    # past the INT n; complete.py made INT n's IDT gate and code-segment checks first.
                    events.interrupt.injected = 1
                    events.interrupt.nr = event.vector
                    events.interrupt.soft = 1
                else:
                    code = event.error_code if isinstance(event, Fault) else None
                    events.exception.injected = 1
                    events.exception.nr = event.vector
                    events.exception.has_error_code = int(code is not None)
                    events.exception.error_code = code or 0
                vcpu.set_vcpu_events(events)
        except (OSError, GuestMemoryError) as e:   # the host refused a vCPU ioctl: reported as not completed
            log.info("vCPU %d: completing %s failed: %s", self.index, insn.hex(" "), e)
            return False
        log.debug("vCPU %d: completed %s (%s)", self.index, done.name, insn.hex(" "))
        self.completed[done.name] = self.completed.get(done.name, 0) + 1
        return True

    def _exit_system_event(self) -> bool:
        kind = self.vcpu.run_struct.system_event.type
        self.machine.system_event(self.index, kind)
        return True

    def _exit_unexpected(self) -> bool:
        reason = _UINT[4].unpack_from(self._view, _REASON_OFFSET)[0]
        self.machine.vcpu_crashed(self.crash_report(
            f"unexpected exit {k.EXIT_REASON_NAMES.get(reason, reason)}", "hvm has no handler for this exit"))
        return True

    # --- reporting --------------------------------------------------------------------------------
    def describe_last_exits(self) -> list[str]:
        # The fast loop's ring holds every exit (also the ones handled in C) once it has run.
        exits = self.fast.last_exits() if self.fast is not None and self.fast.state.seq else self.last_exits
        return describe_exits(exits)

    def crash_report(self, reason: str, detail: str = "") -> CrashReport:
        report = CrashReport(vcpu=self.index, reason=reason, detail=detail, last_exits=self.describe_last_exits())
        try:
            r = self.vcpu.get_regs()
            report.regs = {n: getattr(r, n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8",
                                                      "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")}
            s = self.vcpu.get_sregs()
            report.sregs = {"cs": s.cs.selector, "cs.base": s.cs.base, "ss": s.ss.selector, "cr0": s.cr0,
                            "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "efer": s.efer,
                            "idt.base": s.idt.base, "idt.limit": s.idt.limit}
        except OSError as e:
            report.detail += f" (registers unavailable: {e})"
        return report


def describe_exits(exits) -> list[str]:
    """A crash report's lines for a vCPU's last exits ((reason, where, direction, size, count, value) tuples,
    as the run loops and the C ring record them; the tcg vCPU records the same)."""
    out = []
    for e in exits:
        if e[0] == k.EXIT_IO:
            _, port, direction, size, count, value = e
            what = "out" if direction == k.EXIT_IO_OUT else "in"
            val = f" value={value:#x}" if value is not None else ""
            out.append(f"IO {what} port={port:#06x} size={size} count={count}{val}")
        elif e[0] == k.EXIT_MMIO:
            _, addr, is_write, size, _count, value = e
            val = f" value={value:#x}" if value is not None else ""
            out.append(f"MMIO {'write' if is_write else 'read'} addr={addr:#x} size={size}{val}")
        else:
            out.append(k.EXIT_REASON_NAMES.get(e[0], str(e[0])))
    return out
