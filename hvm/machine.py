"""Machine: builds a VM from a VmSpec (KVM objects, memory, loader, buses, devices, vCPU threads)
and owns its lifecycle: start, pause, resume, stop, wait, close.

Exit status, as QEMU with isa-debug-exit: a guest write of V to the debug-exit port ends the VM
with (V << 1) | 1; all vCPUs halted (or an ACPI-style poweroff) ends it with 0; the watchdog with 124;
a guest crash with 4 and a report; a failing KVM_RUN (EFAULT, ENOMEM, ...) with 6; a device or VMM bug
(an exception in hvm's own code, which no guest may be able to cause) with 70.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from hvm._types import TYPE_CHECKING, Callable
from hvm.boot import BootError, BootState
from hvm.plain import Record
from hvm.config import FlatBoot, VmSpec
from hvm.console import Console
from hvm.host import detect as detect_host
from hvm.host import HostProfile
from hvm.kvm import Kvm, KvmError
from hvm.kvm import constants as kc
from hvm.memory import GuestMemory
from hvm.mmio import MmioBus, PioBus, SerialUart
from hvm.mmio import registry
from hvm.mmio.acpi_pm import WAKE_STATUS, AcpiPm
from hvm.mmio.rtc import Rtc
from hvm.vcpu import CrashReport, VcpuThread, apply_boot_state

if TYPE_CHECKING:
    from hvm.snapshot.format import SnapshotFile
    from hvm.trace.tracer import TraceConfig, Tracer

log = logging.getLogger(__name__)
BAD_WAKEUP_LOG_LIMIT = 8

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CRASH = 4
EXIT_HOST = 6
EXIT_TIMEOUT = 124
EXIT_INTERNAL = 70  # a bug in hvm itself (EX_SOFTWARE)
JOIN_TIMEOUT = 2.0  # seconds to wait, in all, for the vCPU threads once the VM has ended
SAVE_WAIT = 60.0    # seconds close() waits for a snapshot/system reset on another thread to finish
# Several vCPUs with the in-kernel irqchip: how often the vCPUs are asked whether they all halted (HLT
# sleeps in the kernel there, so hvm must ask), how long an answer may take, and how many rounds in a row
# must find them all halted (a vCPU woken by an IPI between two answers is seen in the next round).
HALT_POLL = 0.1
PROBE_TIMEOUT = 1.0
HALT_ROUNDS = 2
SUSPEND_TIMEOUT = 5.0   # seconds the vCPUs get to stop for an ACPI S3 suspend (else the guest runs on)
WAKE_WAIT = 10.0        # seconds wakeup(wait=True) waits for the wake-up to complete
REAL_MODE_LIMIT = 0x100000   # a waking vector is entered in real mode: CS:IP reaches below 1 MiB only

# Console lines whose first appearance --stats reports, in the spirit of Firecracker's boot timer:
# the last one is the kernel handing over to user space.
BOOT_MILESTONES = ("Linux version", "Freeing SMP alternatives", "Freeing unused kernel", "Run /init as init process")


# How the VM ended (RunResult.reason) -> QMP RunState after it, and the ShutdownCause of its SHUTDOWN event.
_END_STATE = {"crash": "guest-panicked", "panic": "guest-panicked", "device-fault": "internal-error",
              "internal-error": "internal-error", "host-error": "internal-error"}
ENDED_STATES = ("shutdown", "guest-panicked", "internal-error")   # the run states _finish leaves
_GUEST_CAUSE = {"halt": "guest-shutdown", "poweroff": "guest-shutdown", "debug-exit": "guest-shutdown",
                "reset": "guest-reset", "crash": "guest-panic", "panic": "guest-panic"}


class RunResult(Record):
    """How a run ended. status: the process exit status hvm uses; reason: "debug-exit", "halt", "poweroff",
    "reset", "timeout", "crash", "stopped", ... (plain: hvm/plain.py says why)."""
    _fields = ("status", "reason", "message", "crash", "seconds")

    def __init__(self, status: int, reason: str, message: str = "", crash: CrashReport | None = None,
                 seconds: float = 0.0):
        self._set(status=status, reason=reason, message=message, crash=crash, seconds=seconds)


class ExitStats(Record):
    """Exit counters (Machine.stats()). other_mmio: accesses to unclaimed MMIO addresses beyond the first
    hvm.mmio.bus.TRACKED_ADDRESSES distinct ones; completed: emulation failures hvm finished; milestones:
    console line -> ms since start; device_counters: registry devices' stats()."""
    _fields = ("by_reason", "by_port", "by_device", "by_mmio", "unhandled_ports", "unhandled_mmio", "other_mmio",
               "completed", "milestones", "device_counters")

    def __init__(self, by_reason: dict[str, int] | None = None, by_port: dict[int, int] | None = None,
                 by_device: dict[str, int] | None = None, by_mmio: dict[int, int] | None = None,
                 unhandled_ports: dict[int, int] | None = None, unhandled_mmio: dict[int, int] | None = None,
                 other_mmio: int = 0, completed: dict[str, int] | None = None,
                 milestones: dict[str, float] | None = None,
                 device_counters: dict[str, dict[str, int]] | None = None):
        self._set(by_reason={} if by_reason is None else by_reason, by_port={} if by_port is None else by_port,
                  by_device={} if by_device is None else by_device, by_mmio={} if by_mmio is None else by_mmio,
                  unhandled_ports={} if unhandled_ports is None else unhandled_ports,
                  unhandled_mmio={} if unhandled_mmio is None else unhandled_mmio, other_mmio=other_mmio,
                  completed={} if completed is None else completed,
                  milestones={} if milestones is None else milestones,
                  device_counters={} if device_counters is None else device_counters)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def format(self) -> str:
        lines = [f"exits: {self.total} total"]
        for name, n in sorted(self.by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<16} {n:>10}")
        # Exits per port (a string I/O exit counts once, as in a trace), unclaimed ports included and marked.
        ports = {**{p: (n, "") for p, n in self.by_port.items()},
                 **{p: (n, "  (no device)") for p, n in self.unhandled_ports.items()}}
        if ports:
            lines.append("by port:")
            for port, (n, mark) in sorted(ports.items()):
                lines.append(f"  {port:#06x}           {n:>10}{mark}")
        if self.by_device:
            lines.append("by device:")
            for name, n in sorted(self.by_device.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {name:<16} {n:>10}")
        if self.completed:
            lines.append("emulation failures completed by hvm:")
            for name, n in sorted(self.completed.items()):
                lines.append(f"  {name:<16} {n:>10}")
        for name, counters in self.device_counters.items():
            shown = "  ".join(f"{k} {v}" for k, v in counters.items())
            lines.append(f"device {name}: {shown}")
        if self.milestones:
            lines.append("boot milestones (ms since start):")
            for name, ms in self.milestones.items():
                lines.append(f"  {ms:>10.1f}  {name}")
        if self.unhandled_mmio or self.other_mmio:
            lines.append("MMIO with no device:")
            for addr, n in sorted(self.unhandled_mmio.items()):
                lines.append(f"  {addr:#012x}     {n:>10}")
            if self.other_mmio:
                lines.append(f"  {'other addresses':<16} {self.other_mmio:>10}")
        return "\n".join(lines)


class Machine:
    """One VM. Construct, then `run()` (start + wait), or drive it: start/pause/resume/stop/wait.
    Always close() it (or use `with`), which releases every fd and mapping."""

    def __init__(self, spec: VmSpec, console: Console | None = None, adapt_to_host: bool = True,
                 trace: TraceConfig | None = None, fast_loop: bool = True, *, _snapshot: SnapshotFile | None = None):
        """adapt_to_host=False runs the guest on the backend as it is: no CPUID features hidden, no kernel
        command-line additions, no emulation failures completed (what `hvm doctor` needs to measure).
        fast_loop=False keeps every exit in the all-Python run loop (for comparisons; same results)."""
        self.spec = spec
        self.adapt_to_host = adapt_to_host
        self.fast_loop = fast_loop
        self.trace_config = trace
        self.tracer: Tracer | None = None
        self.stopping = False
        # QMP's RunState (qapi/run-state.json): "prelaunch", "inmigrate", "running", "paused", "postmigrate",
        # "suspended" (ACPI S3), "shutdown", "guest-panicked", "internal-error". Changed under _lifecycle, or
        # by _finish (once).
        self.run_state = "prelaunch"
        self.listeners: list[Callable[[str, dict], None]] = []
        self.result: RunResult | None = None
        self.kvm: Kvm | None = None
        self.vm = None
        # "kvm" or "tcg" (hvm/vcpu/tcg.py), spec.accel resolved by the builder ("auto": KVM if it works)
        self.accel = "kvm"
        self.memory: GuestMemory | None = None
        self.vcpus = []
        self.cpuid: list[dict[str, int]] = []    # the CPUID table the vCPUs were given (hvm/builder.py)
        self.threads: list[VcpuThread] = []
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.uart: SerialUart | None = None
        self.acpi_pm: AcpiPm | None = None   # machine: pc only (its power button is system_powerdown's)
        self._bad_wakeups = 0                 # S3 wake-ups without a usable waking vector (logged up to a limit)
        self.rtc: Rtc | None = None          # machine: pc only (its alarm wakes the machine)
        self.pci = None                       # machine: pc only: PCI bus 0 (hvm/mmio/pci.py PciBus)
        # Registry devices (hvm/builder.py) by instance name, what they asked to run at close (LIFO), and
        # the device that takes the console's input instead of the UART (virtio-console): (feed, pending, release).
        self.devices: dict[str, object] = {}
        self.device_closers: list[Callable[[], None]] = []
        self.console_input: tuple[Callable[[bytes], None], Callable[[], int], Callable[[], None] | None] | None = None
        self.ioevents = None      # hvm.ioevents.IoEvents, made when a device asks for its first ioeventfd
        self.boot_state: BootState | None = None
        self.host = detect_host() if adapt_to_host else HostProfile("as-is", False)
        self.is_linux = False
        # Restore (Machine.restore): the open snapshot the VM is built from, only during construction.
        self._snapshot = _snapshot
        # What system_reset() puts back: each vCPU's and the VM's KVM state as created, before any boot state.
        self._reset_vcpu_states: list[dict] = []
        self._reset_vm_state: dict | None = None
        self._msrs: list[int] | None = None
        # One snapshot or system reset at a time (QMP clients, scripts and Python may ask concurrently).
        self._save_lock = threading.Lock()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._pause_cond = threading.Condition()
        # Serializes start/pause/resume (and snapshots): callers on several threads (QMP, a script, Python)
        # see one transition at a time. Re-entrant: a snapshot pauses while holding it.
        self._lifecycle = threading.RLock()
        self._launched = False     # start() ran (the vCPU threads exist), paused or not
        self._paused = False
        self._parked = 0
        self._halted = 0
        self._timer: threading.Timer | None = None
        self._halt_watch: threading.Thread | None = None
        self._vm_teardown_pending = False   # close() left the VM objects to the last vCPU thread
        # ACPI S3: a suspend the guest asked for and a wake-up, each on its way (guarded by _pause_cond).
        self._suspending = False
        self._waking = False
        # Counts the machine resets (system_reset, S3 wake-ups): a suspend the guest asked for before a reset
        # is void after it (the reset machine runs a guest that never asked).
        self._resets = 0
        self._threads_ended: set[int] = set()   # vCPU threads past their last use of kvm_run and guest RAM
        self._probe_cond = threading.Condition()
        self._probes: dict[int, str] = {}
        self._started_at = 0.0
        self._joined = False
        if console is None:
            serial = spec.serial
            if serial is None:
                # debugcon, pvconsole, virtio-console write to the console too: without a serial it is this terminal
                other = any(getattr(registry.lookup(d.type), "uses_console", False) for d in spec.devices)
                # and stdin is its input, for a device that takes input (virtio-console: console=hvc0 alone)
                console = Console("stdio" if other else "none", "stdin" if other and not spec.script else "none",
                                  open_now=False)
            else:
                inp = serial.input
                if inp == "auto":   # a script: steps drive the input, not the terminal
                    inp = "stdin" if serial.output == "stdio" and not spec.script else "none"
                console = Console(serial.output, inp, open_now=False)
        self.console = console
        try:
            self._build()
            self._attach_console()
            self._open_outputs()
        except BaseException:
            self.close()
            raise

    # --- construction ------------------------------------------------------------------------------
    def _build(self) -> None:
        from hvm.builder import build_pc   # the assembly (Firecracker's builder.rs); this class runs the VM

        build_pc(self)

    def _attach_console(self) -> None:
        """The console's pexpect side (hvm/console.py): send() feeds the UART (blocking while its input queue
        is full, let go when the VM stops); EOF once the VM ended and no vCPU can write any more."""
        target = self._input_target()     # a virtio-console takes the input, as QEMU's console=hvc0
        self.console.attach(target[0] if target else None, target[1] if target else None, self._ended_status)

    def _ended_status(self) -> int | None:
        """The exit status once the VM ended and its vCPU threads are gone (all output written), else None."""
        result = self.result
        if result is None or not self._done.is_set() or any(t.is_alive() for t in self.threads):
            return None
        return result.status

    def _open_outputs(self) -> None:
        """The output files last, once the VM is built: a VM that cannot be (status 2) leaves an old console
        log and an old trace as they were."""
        self.console.open()
        if self.trace_config is not None:
            from hvm.trace.tracer import Tracer  # the trace package (json, filters, a writer) only for traced runs

            self.tracer = Tracer(self.trace_config, self._device_at)
            for t in self.threads:
                t.trace_sink = self.tracer.append
                t.trace_rip = self.trace_config.rip

    def _device_at(self, reason: int, where: int) -> str | None:
        bus = self.pio if reason == kc.EXIT_IO else self.mmio
        r = bus.find(where)
        return r.device.name if r else None

    # --- lifecycle -------------------------------------------------------------------------------
    # QMP RunState -> the coarse state older callers read (Machine.state).
    _COARSE_STATE = {"prelaunch": "created", "inmigrate": "created", "running": "running", "paused": "paused",
                     "postmigrate": "paused", "suspended": "paused"}

    @property
    def state(self) -> str:
        """"created", "running", "paused" or "stopped" (run_state has QMP's finer names)."""
        return self._COARSE_STATE.get(self.run_state, "stopped")

    def _describe_state(self) -> str:
        return self.state if self.state == self.run_state else f"{self.state} ({self.run_state})"

    def _set_run_state(self, name: str) -> None:
        self.run_state = name

    def add_listener(self, callback: Callable[[str, dict], None]) -> None:
        """Call `callback(event, data)` for each lifecycle event, with QMP's event names and data: STOP,
        RESUME, SHUTDOWN {"guest", "reason"}, RESET, GUEST_PANICKED, MIGRATION. It runs on the thread that
        made the change, with no machine lock held; it must not block (queue the event and return)."""
        self.listeners.append(callback)

    def remove_listener(self, callback: Callable[[str, dict], None]) -> None:
        try:
            self.listeners.remove(callback)
        except ValueError:
            pass

    def _emit(self, event: str, data: dict | None = None) -> None:
        for callback in list(self.listeners):
            try:
                callback(event, data or {})
            except Exception:   # a listener's bug must not change the VM's course
                log.exception("event listener %r failed on %s", callback, event)

    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads. paused=True is QEMU's -S: the threads start but run no guest instruction
        until resume() (QMP `cont`); the VM stays "prelaunch" until then."""
        with self._lifecycle:
            if self._launched or self.run_state not in ("prelaunch", "inmigrate"):
                raise RuntimeError(f"cannot start a VM that is {self._describe_state()}")
            incoming = self.run_state == "inmigrate"
            self._launched = True
            if paused:
                with self._pause_cond:
                    self._paused = True    # each vCPU thread parks before its first KVM_RUN
                self.run_state = "inmigrate" if incoming else "prelaunch"
                # Device threads too (a NIC's reader): no guest-memory writes until `cont`, as in a pause,
                # so a snapshot of the frozen VM sees a consistent device.
                self._devices_call("pause")
            else:
                self.run_state = "running"
            self._start()
        if incoming and not paused:   # as QEMU when an incoming migration's VM starts
            self._emit("RESUME")

    def _start(self) -> None:
        self._started_at = time.monotonic()
        t0 = time.monotonic_ns()
        for t in self.threads:
            t.t0_ns = t0
            if self.tracer is not None:
                # Traces are recorded in C (the fast loop) and reach the tracer in batches, except where
                # records must reach Python as each exit ends: exits kept for scripts (exits()), callbacks
                # registered before start, and a ring over several vCPUs (their records interleaved in time).
                cfg = self.trace_config
                t.trace_in_c = not (cfg.memory or self.tracer.callbacks or (cfg.ring and len(self.threads) > 1))
        if self.spec.timeout:
            # Before anything that could take time (host input is streamed by the console's own thread):
            # the watchdog bounds the whole run.
            self._timer = threading.Timer(self.spec.timeout, self._watchdog)
            self._timer.daemon = True
            self._timer.start()
        for t in self.threads:
            t.start()
        if len(self.threads) > 1 and self.spec.irqchip:
            # HLT never leaves the kernel with the in-kernel LAPIC: ask the vCPUs now and then (see
            # _watch_halts) so that a guest whose started vCPUs all halted ends as a one-vCPU one does.
            self._halt_watch = threading.Thread(target=self._watch_halts, name="halt-watch", daemon=True)
            self._halt_watch.start()
        # Host input last, from the console's own thread: it reads only as far ahead of the guest as the
        # UART's pending input allows, and a feed may block (the UART's input queue is bounded) until the
        # guest reads; the watchdog and the vCPUs already run then, and a stop lets a blocked feed go.
        target = self._input_target()
        if target is not None:
            self.console.on_quit = lambda: self._finish(EXIT_OK, "stopped", "quit from the console (Ctrl-A x)",
                                                        cause="host-ui")
            self.console.start_input(target[0], pending=target[1])

    def _input_target(self) -> tuple[Callable[[bytes], None], Callable[[], int]] | None:
        """Where console input goes: a device that asked for it (virtio-console), else the UART."""
        if self.console_input is not None:
            return self.console_input[0], self.console_input[1]
        uart = self.uart
        if uart is not None:
            return uart.feed, lambda: uart.input_pending
        return None

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Wait until the VM ends (or `timeout` seconds pass: then None). Joins the vCPU threads."""
        if not self._done.wait(timeout):
            return None
        # One deadline for all the joins, and only once: a vCPU that does not stop (it cannot, in a blocking
        # host call) is reported, not waited for again by close(). Console output, the usual suspect, gives
        # up on a stalled sink within hvm.console.STALL_POLL once the machine stops (see _finish).
        if not self._joined:
            deadline = time.monotonic() + JOIN_TIMEOUT
            for t in self.threads:
                if t is threading.current_thread() or t.ident is None:   # this thread, or never started
                    continue
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    log.error("vCPU thread %s did not stop", t.name)
            self._joined = True   # after the joins: a Ctrl-C during one leaves them to the next wait()
            self.pio.log_summary()
            self.mmio.log_summary()
        if self.tracer is not None:
            self.tracer.close()  # everything recorded up to the last exit is out, crash or not
        return self.result

    def run(self, paused: bool = False) -> RunResult:
        self.start(paused)
        result = self.wait()
        assert result is not None
        return result

    def request_stop(self, status: int = EXIT_OK, message: str = "stopped by request",
                     cause: str = "host-qmp-quit") -> None:
        """Ask the VM to stop without waiting (from any thread). `cause` is QMP's ShutdownCause for the
        SHUTDOWN event ("host-qmp-quit", "host-signal", ...)."""
        self._finish(status, "stopped", message, cause=cause)

    def stop(self, status: int = EXIT_OK, message: str = "stopped by request",
             cause: str = "host-qmp-quit") -> RunResult:
        self._finish(status, "stopped", message, cause=cause)
        result = self.wait()
        assert result is not None
        return result

    def pause(self, timeout: float = 5.0) -> None:
        """Stop all vCPUs at an instruction boundary; they stay stopped until resume(). A paused VM stays
        paused (no-op). If the vCPUs do not all stop within `timeout`, they are let go again, the VM is still
        running, and TimeoutError is raised: a pause never leaves the machine half paused."""
        if self._pause(timeout):
            self._emit("STOP")

    def _pause(self, timeout: float) -> bool:
        """pause() without the STOP event (system_reset's, which QEMU reports as RESET alone); True when
        the VM was running and is paused now."""
        with self._lifecycle:
            if self.run_state in ("paused", "postmigrate", "suspended") or \
                    (self.run_state in ("prelaunch", "inmigrate") and self._launched):
                return False     # (started with -S: frozen already; suspended: stopped already, as QEMU's stop)
            if self.run_state != "running" or self._done.is_set():
                raise RuntimeError(f"cannot pause a VM that is {self._describe_state()}")
            with self._pause_cond:
                self._paused = True
            for t in self.threads:
                if t.is_alive() and not t.halted:
                    t.kick()
            deadline = time.monotonic() + timeout
            with self._pause_cond:
                # Re-counted each round: a vCPU that ends (halts, crashes) instead of parking is not waited for.
                while self._parked < sum(1 for t in self.threads if t.is_alive() and not t.halted):
                    left = deadline - time.monotonic()
                    if left <= 0 or self.stopping:
                        self._paused = False
                        self._pause_cond.notify_all()
                        if self.stopping:
                            raise RuntimeError("cannot pause a VM that is stopping")
                        raise TimeoutError(f"vCPUs did not pause within {timeout:g} s; the VM runs on")
                    self._pause_cond.wait(min(left, 0.05))
            self.run_state = "paused"
            self._devices_call("pause")    # no device thread writes guest memory while paused (snapshots)
        return True

    def _devices_call(self, method: str) -> None:
        """pause() / resume() of every registry device that has one (devices with threads of their own), of
        the RTC's timer, and of the ioevent thread."""
        if self.ioevents is not None:
            getattr(self.ioevents, method)()
        if self.rtc is not None:
            getattr(self.rtc, method)()
        for device in self.devices.values():
            fn = getattr(device, method, None)
            if callable(fn):
                fn()

    def resume(self) -> None:
        """Run a paused (or postmigrate) VM on; a running VM is left as it is."""
        if self._resume():
            self._emit("RESUME")

    def _resume(self) -> bool:
        """resume() without the RESUME event; True when the VM was paused and runs now."""
        with self._lifecycle:
            if self.run_state == "running" and not self._done.is_set():
                return False
            frozen_at_start = self.run_state in ("prelaunch", "inmigrate") and self._launched   # -S
            if not (self.run_state in ("paused", "postmigrate") or frozen_at_start) or self._done.is_set():
                raise RuntimeError(f"cannot resume a VM that is {self._describe_state()}")
            self._run_on()
        return True

    def _run_on(self) -> None:
        """Let the parked vCPUs and the paused device threads go (under _lifecycle): "running"."""
        self._devices_call("resume")     # (paused by pause(), or by start(paused=True))
        with self._pause_cond:
            self._paused = False
            self._pause_cond.notify_all()
        self.run_state = "running"

    def set_trace(self, config: TraceConfig | None, pause_timeout: float = 5.0) -> None:
        """Start exit tracing to `config` (None: stop it) while the VM runs (QMP's x-hvm-trace). The vCPUs
        are parked, their run loops handed the new tracer (or none) and chosen again as they run on; a VM
        that was paused stays paused. The trace file is opened first: a bad path changes nothing
        (HostFileError). Stopping writes out everything recorded and closes the file."""
        from hvm.trace.tracer import Tracer

        if self.stopping or self.state == "stopped":
            raise RuntimeError("the VM has ended")
        if config is None and self.tracer is None:
            return
        new = Tracer(config, self._device_at) if config is not None else None
        # A paused (or postmigrate) VM's vCPUs are parked already, and not started ones pick the loop when
        # they start; only a running VM is paused for the swap (its clients see STOP and RESUME).
        park = self.run_state == "running"
        try:
            if park:
                self.pause(timeout=pause_timeout)
        except BaseException:
            if new is not None:
                new.close()
            raise
        old = self.tracer
        try:
            in_c = new is not None and not (config.memory or (config.ring and len(self.threads) > 1))
            for t in self.threads:
                t.set_tracing(new.append if new is not None else None, config.rip if config else False, in_c)
            self.tracer = new
            self.trace_config = config
        finally:
            if park:
                self.resume()
        if old is not None:
            old.close()     # after the vCPUs handed it their last records

    def system_powerdown(self) -> None:
        """QMP system_powerdown: press the ACPI power button and emit POWERDOWN (as QEMU does). The guest
        decides what to do (Linux needs its ACPI button driver and user space acting on the key); the VM runs
        on meanwhile. A paused VM sees the press when it resumes."""
        if self.acpi_pm is None:
            raise RuntimeError("system_powerdown needs the ACPI power button of machine: pc")
        if self._done.is_set() or self.vm is None:
            raise RuntimeError("cannot press the power button of a VM that has ended")
        self._emit("POWERDOWN", {})
        # A sleeping (S3) machine wakes up on its power button, which it then reports in PM1 status
        # (PWRBTN_STS with WAK_STS): the press is the wake event, not a request to power off.
        if not self.wakeup("powerbutton", wait=True):
            self.acpi_pm.press_power_button()

    @property
    def running(self) -> bool:
        return self.run_state in ("running", "paused", "postmigrate", "suspended") and not self._done.is_set()

    @property
    def ended(self) -> bool:
        """The VM ended: run_state is one of ENDED_STATES (shutdown, guest-panicked, internal-error)."""
        return self.run_state in ENDED_STATES

    def exits(self):
        """The recorded exits (ExitRecord), when the VM was made with TraceConfig(memory=True)."""
        if self.tracer is None or not self.trace_config.memory:
            raise RuntimeError("exit records are kept only with trace=TraceConfig(memory=True)")
        return iter(self.tracer.records)

    def on_exit(self, callback) -> None:
        """Call `callback(ExitRecord)` for every recorded exit, on the trace thread. Registered before start(),
        each record arrives shortly after its exit; registered later, the vCPUs record in C and hand records
        over in batches (every 50 ms while exits come, and when the VM ends)."""
        if self.tracer is None:
            raise RuntimeError("exit callbacks need tracing: Machine(..., trace=TraceConfig())")
        self.tracer.callbacks.append(callback)

    def wait_for_console(self, pattern, timeout: float = 10.0, start: int = 0):
        """Wait until the guest's serial output matches `pattern` (bytes, str or compiled regex)."""
        return self.console.wait_for(pattern, timeout, start, stopped=self._done.is_set)

    # --- called from vCPU threads and devices -----------------------------------------------------
    def wait_while_paused(self, index: int) -> None:
        with self._pause_cond:
            if not self._paused:
                return
            self._parked += 1
            self._pause_cond.notify_all()
            while self._paused and not self.stopping:
                self._pause_cond.wait()
            self._parked -= 1

    def vcpu_halted(self, index: int) -> None:
        with self._lock:
            self._halted += 1
            everyone = self._halted == len(self.threads)
        log.info("vCPU %d halted", index)
        if everyone:
            self._finish(EXIT_OK, "halt", "all vCPUs halted")

    def vcpu_probed(self, index: int, activity: str) -> None:
        """A vCPU thread's answer to VcpuThread.probe(): "waiting", "halted" or "running"."""
        with self._probe_cond:
            self._probes[index] = activity
            self._probe_cond.notify_all()

    def _watch_halts(self) -> None:
        """The halt rule with several vCPUs (docs/config.md): the VM ends with status 0 ("halt") once every
        vCPU that was started halted with interrupts off, vCPUs still waiting for INIT/SIPI not counting as
        running (nothing is left to start them). Checked every HALT_POLL s by asking each vCPU thread, which
        answers between two KVM_RUNs; HALT_ROUNDS rounds in a row must agree. A paused VM is not asked."""
        rounds = 0
        while not self._done.wait(HALT_POLL):
            if self.run_state != "running" or self.stopping:
                rounds = 0
                continue
            with self._probe_cond:
                self._probes = {}
            for t in self.threads:
                t.probe()
            deadline = time.monotonic() + PROBE_TIMEOUT
            with self._probe_cond:
                while len(self._probes) < len(self.threads) and not self._done.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._probe_cond.wait(left)
                answers = dict(self._probes)
            activities = list(answers.values())
            if (len(answers) == len(self.threads) and "running" not in activities and "halted" in activities):
                rounds += 1
            else:
                rounds = 0
            if rounds >= HALT_ROUNDS:
                waiting = activities.count("waiting")
                detail = f" ({waiting} never started: waiting for INIT/SIPI)" if waiting else ""
                self._finish(EXIT_OK, "halt", f"all started vCPUs halted{detail}")
                return

    def vcpu_crashed(self, report: CrashReport) -> None:
        panic = self._panic_report() if report.reason.startswith("SHUTDOWN") else None
        if panic:  # a panicked kernel rebooting by triple fault: the panic is the news
            self._finish(EXIT_CRASH, "panic", panic, report)
        else:
            self._finish(EXIT_CRASH, "crash", report.format(), report)

    def device_fault(self, index: int | None, fault: BaseException) -> None:
        # A device raised on a guest access: a bug in hvm (no guest may be able to do that), so status 70,
        # "internal error", not 4: the guest did nothing wrong by touching a register.
        where = "the ioevent thread" if index is None else f"vCPU {index}"
        message = f"device fault on {where}: {fault} (a bug in hvm)"
        log.error("%s", message)
        self._finish(EXIT_INTERNAL, "device-fault", message)

    def internal_error(self, index: int, message: str) -> None:
        message = f"internal error on vCPU {index}: {message} (a bug in hvm; -v shows the traceback)"
        log.error("%s", message)
        self._finish(EXIT_INTERNAL, "internal-error", message)

    def host_error(self, index: int, message: str) -> None:
        # KVM_RUN itself failed (EFAULT, ENOMEM, ...): the host, not the guest, so status 6.
        log.error("%s", message)
        self._finish(EXIT_HOST, "host-error", message)

    def system_event(self, index: int, kind: int) -> None:
        if kind == kc.SYSTEM_EVENT_SHUTDOWN:
            self._finish(EXIT_OK, "poweroff", "guest powered off")
        elif kind == kc.SYSTEM_EVENT_RESET:
            self._cpu_reset()
        else:
            self._finish(EXIT_CRASH, "crash", f"guest reported a crash (system event {kind})")

    def _panic_report(self) -> str | None:
        """If the guest kernel panicked (and is now resetting or faulting), the last console lines."""
        tail = bytes(self.console.history[-8192:])
        at = tail.rfind(b"Kernel panic - not syncing")
        if at < 0:
            return None
        lines = tail.decode("utf-8", "replace").splitlines()
        return "guest kernel panicked; last console lines:\n" + "\n".join("  " + ln for ln in lines[-12:])

    def _cpu_reset(self) -> None:
        panic = self._panic_report()
        if panic:
            self._finish(EXIT_CRASH, "panic", panic)
        else:
            self._finish(EXIT_OK, "reset", "guest reset the machine (i8042); hvm does not reboot")

    def _acpi_poweroff(self) -> None:
        self._finish(EXIT_OK, "poweroff", "guest powered off (ACPI S5)")

    def _debug_exit(self, status: int) -> None:
        self._finish(status, "debug-exit", f"guest wrote to the debug-exit port: status {status}")

    def _watchdog(self) -> None:
        # QMP has no "timeout" cause: the watchdog acts for the host, as a signal from it would.
        self._finish(EXIT_TIMEOUT, "timeout", f"timeout: the guest was still running after {self.spec.timeout:g} s",
                     cause="host-signal")

    def _finish(self, status: int, reason: str, message: str, crash: CrashReport | None = None,
                cause: str | None = None) -> None:
        """End the VM (the first call wins). `cause`: QMP's ShutdownCause when the host ends it; a guest's
        own end takes its cause from `reason`."""
        with self._lock:
            if self.result is not None:
                return  # the first reason to stop wins
            self.result = RunResult(status, reason, message, crash, time.monotonic() - self._started_at)
            self.stopping = True
            self.run_state = _END_STATE.get(reason, "shutdown")
        with self._pause_cond:
            self._pause_cond.notify_all()
        # Nothing may keep a vCPU from seeing the stop: a host feeder blocked on a full UART queue is let go,
        # and console output stuck on a sink that takes nothing (a pipe nobody reads) is dropped.
        if self.uart is not None:
            self.uart.close()
        if self.console_input is not None and self.console_input[2] is not None:
            self.console_input[2]()       # the input device lets a blocked feed go, as the UART's close()
        self.console.abandon_stalled_output()
        for t in self.threads:
            if t is not threading.current_thread():
                t.kick()
        self._done.set()
        if self.run_state == "guest-panicked":
            self._emit("GUEST_PANICKED", {"action": "poweroff"})
        self._emit("SHUTDOWN", {"guest": cause is None and reason in _GUEST_CAUSE,
                                "reason": cause or _GUEST_CAUSE.get(reason, "host-error")})

    # --- snapshot, restore, reset (hvm/snapshot/) -------------------------------------------------------
    def snapshot(self, path: str | os.PathLike, *, resume: bool = False) -> None:
        """Save the whole VM to `path` (QEMU's migrate to file:). A running VM is paused for the save; then
        with resume=True it runs on, otherwise it stays stopped ("postmigrate": resume() runs it on). Raises
        SnapshotError; a failed save leaves no file and the VM as it was (a running VM runs on)."""
        # _lifecycle too, for the whole save: a resume() from another thread (QMP cont, a script's resume
        # step) must not run the vCPUs while their state and guest memory are being written.
        with self._save_lock, self._lifecycle:
            self._snapshot_locked(path, resume)

    def _snapshot_locked(self, path: str | os.PathLike, resume: bool) -> None:
        from hvm.snapshot import SnapshotError, save_machine

        if self.result is not None or self.state == "stopped" or self.memory is None:
            reason = self.result.reason if self.result is not None else "closed"
            raise SnapshotError(f"{path}: the VM has ended ({reason}): there is nothing to save")
        if self.accel != "kvm":
            raise SnapshotError(f"{path}: the VM runs on accel {self.accel}: hvm saves the state of KVM vCPUs only")
        if self.run_state == "suspended" or self._suspending or self._waking:
            raise SnapshotError(f"{path}: the guest is suspended (ACPI S3): hvm does not save a sleeping VM; "
                                "wake it first (system_wakeup)")
        for d in self.spec.devices:
            dt = registry.lookup(d.type)
            if dt is not None and not dt.snapshot:
                raise SnapshotError(f"{path}: the VM has a {d.type} device ({d.name}): hvm cannot save a VM that "
                                    "holds host files or devices (disk images, taps) yet")
        was_running = self.state == "running"
        if was_running:
            try:
                self.pause()
            except TimeoutError as e:
                raise SnapshotError(f"{path}: the vCPUs did not stop for the save ({e})") from None
            except RuntimeError as e:   # ended meanwhile
                raise SnapshotError(f"{path}: {e}") from None
        # A VM never started has its device threads running (pause() and start(paused=True) stop them):
        # hold them for the save, so a NIC's reader does not write guest memory between the RAM and the device.
        hold = not self._launched
        if hold:
            self._devices_call("pause")
        t0 = time.monotonic()
        try:
            size = save_machine(self, path)
        except BaseException:
            if was_running and self.result is None:
                self.resume()
            raise
        finally:
            if hold:
                self._devices_call("resume")
        log.info("snapshot %s: %d bytes in %.1f ms", path, size, (time.monotonic() - t0) * 1000)
        if self.state == "paused":
            if not resume:
                self._snapshot_stopped()
            elif was_running:   # a VM paused before the save (a script's pause step, QMP stop) stays paused
                self.resume()

    def _snapshot_stopped(self) -> None:
        """After a save without resume: QMP's "postmigrate" (stopped; resume() runs on)."""
        self._set_run_state("postmigrate")

    @classmethod
    def restore(cls, path: str | os.PathLike, *, console: Console | None = None, trace: TraceConfig | None = None,
                timeout: float | None = None, fast_loop: bool = True) -> "Machine":
        """A Machine built from a snapshot file alone (it carries the VM description), not started
        ("inmigrate"): start() runs the guest on from the saved instruction. `timeout` (seconds; 0 for
        none) replaces the saved watchdog. Raises SnapshotError for any problem with the file, having
        released everything it opened."""
        from hvm.snapshot import spec_from_snapshot
        from hvm.snapshot.format import SnapshotFile

        with SnapshotFile(path) as snap:
            spec = spec_from_snapshot(snap)
            if spec.serial is not None and spec.serial.input.startswith("file:"):
                # The file was read up to some point the snapshot does not record (the bytes the guest had
                # not taken yet are in the UART's saved state): reading it again from its start would
                # give the guest its input twice. A restored VM's input comes only from what is given anew.
                log.info("%s: the saved serial input %s is not read again", path, spec.serial.input)
                spec = spec.replace(serial=spec.serial.replace(input="none"))
            if console is None and spec.serial is not None and spec.serial.output.startswith("file:"):
                # A snapshot may come from anywhere: hvm never opens (and truncates) a host path named inside
                # one. Output goes to this terminal unless --serial / console= says where.
                log.warning("%s: the saved serial output %s is not reopened (give --serial file:PATH); "
                            "console output goes to stdout", path, spec.serial.output)
                spec = spec.replace(serial=spec.serial.replace(output="stdio"))
            if timeout is not None:
                spec = spec.replace(timeout=timeout or None)
            adapt = snap.description.get("adapt_to_host", True) is not False
            machine = cls(spec, console=console, adapt_to_host=adapt, trace=trace, fast_loop=fast_loop,
                          _snapshot=snap)
        machine._snapshot = None        # closed with the file; the mappings hold what they need
        machine._set_run_state("inmigrate")
        return machine

    def _restore_memory(self, snap: SnapshotFile) -> GuestMemory:
        from hvm.memory import ram_layout

        mem = snap.map_memory(ram_layout(self.spec.memory))
        try:
            snap.verify_memory(mem)
        except BaseException:
            mem.close()
            raise
        return mem

    def _restore_vm_state(self, snap: SnapshotFile) -> None:
        from hvm.snapshot import SnapshotError
        from hvm.snapshot import kvmstate

        desc = snap.description
        self.is_linux = desc.get("is_linux") is True
        if desc.get("host") != self.host.backend:
            log.warning("%s: saved on a %s host, restored on %s", snap.path, desc.get("host"), self.host.backend)
        try:
            kvmstate.restore_vm(self.vm, snap.vm_state if isinstance(snap.vm_state, dict) else {},
                                self.spec.irqchip, self.spec.irqchip and self.spec.pit)
        except (ValueError, OSError) as e:
            raise SnapshotError(f"{snap.path}: section vm: {e}") from None

    def _restore_vcpus_and_devices(self, snap: SnapshotFile) -> None:
        from hvm.snapshot import SnapshotError, load_devices
        from hvm.snapshot import kvmstate

        xsave_size = self.vm.xsave_size()
        for vcpu, state in zip(self.vcpus, snap.vcpu_states):
            if not isinstance(state, dict) or state.get("index") != vcpu.index:
                raise SnapshotError(f"{snap.path}: section vcpu{vcpu.index}: malformed")
            try:
                kvmstate.restore_vcpu(vcpu, state, xsave_size, self.spec.irqchip)
            except (ValueError, OSError) as e:
                raise SnapshotError(f"{snap.path}: section vcpu{vcpu.index}: {e}") from None
        load_devices(self, snap.devices, snap.path)

    def _save_vcpu_state(self, vcpu) -> dict:
        from hvm.snapshot import kvmstate

        if self._msrs is None:
            self._msrs = kvmstate.msrs_to_save(self.kvm)
        return kvmstate.save_vcpu(vcpu, self._msrs, self.vm.xsave_size(), self.spec.irqchip)

    def _save_vm_state(self) -> dict:
        from hvm.snapshot import kvmstate

        return kvmstate.save_vm(self.vm, self.spec.irqchip, self.spec.irqchip and self.spec.pit)

    def system_reset(self) -> None:
        """QMP system_reset: the machine starts again from its boot state: guest RAM zeroed and the boot
        image loaded again, the irqchip, PIT and every vCPU as created (vCPU 0 then given the boot state),
        devices reset. A running VM runs on from the reset; a paused one stays paused; a suspended (S3) one
        becomes "prelaunch" and waits for resume() / `cont`, as QEMU's does. Emits RESET."""
        with self._save_lock, self._lifecycle:   # as snapshot(): no resume() from elsewhere mid-reset
            self._system_reset_locked()

    def _system_reset_locked(self, guest: bool = False) -> None:
        """guest=True: the reset is the firmware's (an S3 wake-up without a usable waking vector): a
        suspended VM runs from the reset, and RESET says the guest did it."""
        from hvm.builder import bios_state, load_boot, write_tables
        from hvm.snapshot import kvmstate

        if self.result is not None or self.state == "stopped" or self.memory is None:
            raise RuntimeError("cannot reset a VM that has ended")
        if self.accel != "kvm":
            raise RuntimeError(f"cannot reset a VM on accel {self.accel}: hvm resets KVM vCPUs only")
        # The boot image is loaded again: check it is still there before anything is zeroed (a restored VM
        # never needed it until now), so a failed reset leaves the VM as it was.
        boot = self.spec.boot
        paths = [boot.image] if isinstance(boot, FlatBoot) else [boot.kernel, *boot.initrd]
        for p in paths:
            if not os.access(p, os.R_OK):
                raise RuntimeError(f"cannot reset: the boot image {p} is not readable any more")
        was_running = self.state == "running"
        suspended = self.run_state == "suspended"
        self._resets += 1
        if was_running:   # no STOP/RESUME around it: QEMU's system_reset reports RESET alone
            self._pause(5.0)
        try:
            mem = self.memory
            mem.reset_to_zero()
            write_tables(self, mem)
            self.boot_state = load_boot(self, mem)
            if self._reset_vm_state is not None:
                kvmstate.restore_vm(self.vm, self._reset_vm_state, self.spec.irqchip,
                                    self.spec.irqchip and self.spec.pit)
            if self.spec.machine == "pc":
                bios_state(self, mem)
            xsave_size = self.vm.xsave_size()
            for vcpu, state in zip(self.vcpus, self._reset_vcpu_states):
                kvmstate.restore_vcpu(vcpu, state, xsave_size, self.spec.irqchip)
                if vcpu.index == 0:
                    apply_boot_state(vcpu, self.boot_state)
            for _, device in _devices(self):
                reset = getattr(device, "reset", None)
                if callable(reset):
                    reset()
        finally:
            if was_running and self.result is None:
                self._resume()
            elif suspended and self.result is None:
                if guest:
                    self._run_on()
                else:   # QEMU: a machine reset while not running waits in prelaunch for `cont`
                    self.run_state = "prelaunch"
                    if self.rtc is not None:
                        self.rtc.pause()      # held with the other devices until `cont` (running while asleep)
        self._emit("RESET", {"guest": guest, "reason": "guest-reset" if guest else "host-qmp-system-reset"})

    # --- ACPI S3: suspend to RAM and wake-up (hvm/mmio/acpi_pm.py; docs/lifecycle.md) -----------------
    def _acpi_suspend(self) -> None:
        """The guest wrote SLP_TYP=S3 | SLP_EN (AcpiPm, on the writing vCPU's thread). As QEMU's
        qemu_system_suspend_request, that vCPU stops at once: it parks before its next KVM_RUN. The rest (every
        vCPU parked, device threads paused, "suspended", SUSPEND) runs on a thread of its own: a vCPU thread
        must never wait for the lifecycle lock, which a pause or a snapshot holds while waiting for it."""
        if self.accel != "kvm":   # waking needs the KVM vCPU reset: under tcg, S3 is a power-off (one line)
            message = f"guest asked for ACPI S3, which hvm does not do on accel {self.accel}: powered off"
            log.warning("%s", message)      # (a power-off says nothing by default; this one is not what was asked)
            self._finish(EXIT_OK, "poweroff", message)
            return
        with self._pause_cond:
            if self._suspending or self.run_state == "suspended" or self.stopping:
                return
            self._suspending = True
            self._paused = True
            resets = self._resets
        for t in self.threads:
            if t.is_alive() and not t.halted:
                t.kick()     # this thread too: immediate_exit, so its next KVM_RUN returns at once
        threading.Thread(target=self._complete_suspend, args=(resets,), name="s3-suspend", daemon=True).start()

    def _complete_suspend(self, resets: int) -> None:
        suspended = False
        try:
            with self._lifecycle:
                if self._done.is_set() or self._resets != resets:   # (reset meanwhile: the request is void)
                    return
                if self.run_state == "running":
                    try:
                        self._pause(SUSPEND_TIMEOUT)     # no STOP event: QEMU's suspend sends SUSPEND alone
                    except (TimeoutError, RuntimeError) as e:
                        log.warning("ACPI S3: the vCPUs did not stop for the suspend (%s); the guest runs on", e)
                        return
                elif self.run_state not in ("paused", "postmigrate"):    # (stopped meanwhile: parked already)
                    return
                self.run_state = "suspended"
                suspended = True
                if self.rtc is not None:
                    # The RTC runs on while the machine sleeps (it is on the battery well; QEMU's runs on the
                    # host clock): its alarm is a wake-up event.
                    self.rtc.resume()
        finally:
            with self._pause_cond:
                self._suspending = False
        if suspended:
            log.info("ACPI S3: the guest is suspended to RAM")
            self._emit("SUSPEND")

    def wakeup(self, reason: str, wait: bool = False) -> bool:
        """Wake a suspended (ACPI S3) machine: reason "rtc" (the RTC alarm), "powerbutton" or "qmp" (QMP
        system_wakeup). True if it was suspended and wakes up; False (nothing done) otherwise. Safe from any
        thread (a device's, a vCPU's): the wake-up runs on a thread of its own; wait=True (callers that may
        block: the QMP command thread) returns once it is done. The wake-up is a reset of the CPUs and
        chipset with RAM kept: see _wake_locked."""
        if reason not in WAKE_STATUS:
            raise ValueError(f"unknown wake-up reason {reason!r}")
        with self._pause_cond:
            if self.run_state != "suspended" or self._waking or self.stopping:
                return False
            self._waking = True
        t = threading.Thread(target=self._wake, args=(reason,), name="s3-wakeup", daemon=True)
        t.start()
        if wait:
            t.join(WAKE_WAIT)
        return True

    def _wake(self, reason: str) -> None:
        try:
            with self._save_lock, self._lifecycle:   # as system_reset: nothing else changes the VM meanwhile
                if self.run_state != "suspended" or self.result is not None:
                    return
                self._wake_locked(reason)
        except Exception as e:   # a KVM ioctl failing on the reset: the host's trouble, reported, never raised
            log.error("ACPI S3 wake-up failed: %s: %s", type(e).__name__, e)
            log.debug("ACPI S3 wake-up", exc_info=True)
            self._finish(EXIT_HOST, "host-error", f"ACPI S3 wake-up failed: {e}")
        finally:
            with self._pause_cond:
                self._waking = False

    def waking_vector(self) -> tuple[int, str | None]:
        """The FACS's firmware waking vector and, when it cannot be used, why (the guest wrote it: checked
        as hostile input). 0 is "no vector": SeaBIOS then reboots, as hvm does."""
        from hvm.boot.acpi import FACS_ADDR, FACS_WAKING_VECTOR

        mem = self.memory
        if mem is None or not mem.contains(FACS_ADDR, 64) or mem.read(FACS_ADDR, 4) != b"FACS":
            return 0, "the FACS is gone (its signature was overwritten)"
        vector = mem.read_u32(FACS_ADDR + FACS_WAKING_VECTOR)
        if vector == 0:
            return 0, "no firmware waking vector (0) in the FACS"
        if vector >= REAL_MODE_LIMIT or not mem.contains(vector, 1):
            return vector, f"the firmware waking vector {vector:#x} is not in RAM below 1 MiB"
        return vector, None

    def _wake_locked(self, reason: str) -> None:
        """As QEMU's pc wake-up (a machine reset that keeps RAM) followed by SeaBIOS's S3 resume path: the
        irqchip and PIT as at power-on (the VM clock runs on), then as the firmware leaves them; every vCPU
        as created (the APs wait for INIT/SIPI again); devices reset, PM1 status given WAK_STS and the wake
        source's bit; vCPU 0 in real mode at the waking vector (CS = vector >> 4, IP = vector & 0xF). No
        usable vector: the firmware reboots, so the machine gets a full reset (one warning line)."""
        from hvm.builder import bios_chipset_state
        from hvm.snapshot import kvmstate

        self._resets += 1
        vector, problem = self.waking_vector()
        if problem is not None:
            self._emit("WAKEUP")     # the wake-up happened; then the firmware resets (RESET follows)
            # A guest can repeat this once a second (RTC alarm wake-ups): the first few are logged, then
            # one line saying the rest are not, so the log stays bounded.
            self._bad_wakeups += 1
            if self._bad_wakeups <= BAD_WAKEUP_LOG_LIMIT:
                log.warning("ACPI S3 wake-up: %s: resetting the machine%s", problem,
                            "; further ones are not logged" if self._bad_wakeups == BAD_WAKEUP_LOG_LIMIT else "")
            self._system_reset_locked(guest=True)
            return
        irqchip, pit = self.spec.irqchip, self.spec.irqchip and self.spec.pit
        if self._reset_vm_state is not None:
            state = dict(self._reset_vm_state)
            state["clock"] = kvmstate.save_vm(self.vm, False, False)["clock"]
            kvmstate.restore_vm(self.vm, state, irqchip, pit)
        if self.spec.machine == "pc":
            bios_chipset_state(self)
        xsave_size = self.vm.xsave_size()
        for vcpu, saved in zip(self.vcpus, self._reset_vcpu_states):
            kvmstate.restore_vcpu(vcpu, saved, xsave_size, irqchip)
        _enter_real_mode(self.vcpus[0], vector >> 4, vector & 0xF)
        for _, device in _devices(self):
            reset = getattr(device, "reset", None)
            # The RTC and its CMOS live on the battery well through S3: time and CMOS bytes are kept (hvm's
            # Rtc.reset() is a new chip: its clock offset would go); its interrupt enables are not, as QEMU's
            # system reset on wake-up turns off PIE/AIE/SQWE (Rtc.wake_reset()).
            if device is self.rtc:
                self.rtc.wake_reset()
            elif callable(reset):
                reset()
        if self.acpi_pm is not None:
            self.acpi_pm.wake(reason)
        log.info("ACPI S3: woken up by %s; resuming at %04x:%04x", reason, vector >> 4, vector & 0xF)
        self._run_on()
        self._emit("WAKEUP")

    # --- results ---------------------------------------------------------------------------------
    def stats(self) -> ExitStats:
        by_reason: dict[str, int] = {}
        for t in self.threads:
            for reason, n in enumerate(t.total_exit_counts()):
                if n:
                    name = kc.EXIT_REASON_NAMES.get(reason, str(reason))
                    by_reason[name] = by_reason.get(name, 0) + n
        by_device = self.pio.counts_by_device()
        for name, n in self.mmio.counts_by_device().items():
            by_device[name] = by_device.get(name, 0) + n
        completed: dict[str, int] = {}
        for t in self.threads:
            for name, n in t.completed.items():
                completed[name] = completed.get(name, 0) + n
        milestones = {}
        for text in BOOT_MILESTONES:
            t = self.console.time_of(text.encode())
            if t is not None and self._started_at:
                milestones[text] = (t - self._started_at) * 1000
        counters = {}
        for name, device in self.devices.items():
            fn = getattr(device, "stats", None)
            if callable(fn):
                counters[name] = dict(fn())
        return ExitStats(by_reason, dict(self.pio.counts), by_device, dict(self.mmio.counts),
                         dict(self.pio.unhandled), dict(self.mmio.unhandled), self.mmio.other, completed, milestones,
                         counters)

    # --- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release every fd and mapping. Every step runs even when one raises (each failure logged; the first
        re-raised at the end). A vCPU thread still alive after the join deadline may be inside KVM_RUN or the
        C loop, using its kvm_run mapping and guest memory: then the vCPU fds and mappings, guest memory and
        the VM fd are deliberately left open (one log line), and the last vCPU thread to end closes them."""
        errors: list[BaseException] = []

        def step(what: str, fn) -> None:
            try:
                fn()
            except BaseException as e:   # a Ctrl-C in one step must not skip the others either
                log.error("close: %s failed: %s: %s", what, type(e).__name__, e)
                log.debug("close: %s", what, exc_info=True)
                errors.append(e)

        if self.threads and any(t.is_alive() for t in self.threads):
            step("stopping the vCPUs", self._stop_for_close)
        step("the watchdog", self._cancel_watchdog)
        step("the halt watch", self._join_halt_watch)
        # Device threads and fds (a NIC's reader, a disk image) go before guest memory is unmapped; the
        # ioevent thread first, which calls into the devices.
        if self.ioevents is not None:
            step("the ioevent thread", self.ioevents.close)
            self.ioevents = None
        closers, self.device_closers = self.device_closers, []
        for fn in reversed(closers):
            step(f"device {getattr(fn, '__qualname__', fn)}", fn)
        # A snapshot or system reset on another thread (QMP migrate, a script) reads and writes guest memory
        # and the vCPU/VM fds until it returns: wait for it (the VM has ended, so it ends soon) before
        # unmapping anything; if it does not, leave the VM objects as for a vCPU that did not stop.
        saving = not self._save_lock.acquire(timeout=SAVE_WAIT)
        try:
            with self._lock:
                alive = [t.name for t in self._unfinished_threads()]
                self._vm_teardown_pending = bool(alive) and not saving
            if saving:
                log.error("close: a snapshot or system reset still runs after %g s: leaving the vCPU fds, "
                          "guest memory and the VM fd open", SAVE_WAIT)
            elif alive:
                log.error("close: vCPU thread%s %s still running: leaving %s kvm_run mapping%s, vCPU fds, guest "
                          "memory and the VM fd open until %s", "s" if len(alive) > 1 else "", ", ".join(alive),
                          "its" if len(alive) == 1 else "their", "" if len(alive) == 1 else "s",
                          "it ends" if len(alive) == 1 else "the last of them ends")
            else:   # under _save_lock: no snapshot or reset can start on what is being unmapped
                self._close_vm_objects(step)
        finally:
            if not saving:
                self._save_lock.release()
        if self.kvm is not None:   # /dev/kvm: a VM fd keeps what it needs of it
            step("/dev/kvm", self.kvm.close)
            self.kvm = None
        if self.tracer is not None:
            step("the tracer", self.tracer.close)
        step("the console", self.console.close)
        if errors:
            raise errors[0]

    def _stop_for_close(self) -> None:
        self._finish(EXIT_OK, "stopped", "closed", cause="host-qmp-quit")   # as stop() (docs/lifecycle.md)
        self.wait(5.0)

    def _join_halt_watch(self) -> None:
        """The halt watch kicks the vCPU threads (writing their kvm_run): it must be gone before they are
        closed, and close() leaves no thread of the machine behind."""
        t = self._halt_watch
        if t is None or t is threading.current_thread() or t.ident is None:
            return
        with self._probe_cond:
            self._probe_cond.notify_all()     # a round waiting for answers sees the VM ended at once
        t.join(PROBE_TIMEOUT + HALT_POLL + 1.0)
        if t.is_alive():
            log.error("close: the halt watch did not stop")

    def _cancel_watchdog(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_vm_objects(self, step) -> None:
        """What a running vCPU thread may touch: the vCPUs (fd, kvm_run mapping; a tcg vCPU's Unicorn), the
        VM fd, guest memory."""
        for t in self.threads:
            close = getattr(t, "close", None)     # a TcgVcpuThread: its Unicorn maps guest memory
            if close is not None:
                step(f"tcg vCPU {t.index}", close)
        vcpus, self.vcpus = self.vcpus, []
        for vcpu in vcpus:
            step(f"vCPU {vcpu.index}", vcpu.close)
        if self.vm is not None:
            step("the VM fd", self.vm.close)
            self.vm = None
        if self.memory is not None:
            step("guest memory", self.memory.close)
            self.memory = None

    def _unfinished_threads(self) -> list[VcpuThread]:
        """vCPU threads started and not yet past vcpu_thread_ended (call with self._lock held)."""
        return [t for t in self.threads if t.ident is not None and t.index not in self._threads_ended
                and t.is_alive()]

    def vcpu_thread_ended(self, index: int) -> None:
        """Called by each vCPU thread as its last act. If close() left the VM objects to the vCPU threads,
        the last one to end closes them (no thread can touch them any more)."""
        with self._lock:
            self._threads_ended.add(index)
            if not self._vm_teardown_pending or self._unfinished_threads():
                return
            self._vm_teardown_pending = False

        def step(what: str, fn) -> None:
            try:
                fn()
            except Exception as e:
                log.error("closing %s after vCPU %d ended: %s: %s", what, index, type(e).__name__, e)

        self._close_vm_objects(step)
        log.info("vCPU %d ended: closed the vCPUs, VM fd and guest memory close() had left open", index)

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _enter_real_mode(vcpu, segment: int, offset: int) -> None:
    """A vCPU in its power-on state, made to start at segment:offset in real mode with every general register
    0 and interrupts off: how SeaBIOS's S3 resume path far-calls the waking vector."""
    sregs = vcpu.get_sregs()
    sregs.cs.selector = segment
    sregs.cs.base = segment << 4
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        setattr(regs, name, 0)
    regs.rip = offset
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def _devices(machine: Machine):
    from hvm.snapshot import devices_of

    return devices_of(machine)


__all__ = ["EXIT_CONFIG", "EXIT_CRASH", "EXIT_HOST", "EXIT_OK", "EXIT_TIMEOUT", "ExitStats", "Machine",
           "RunResult", "BootError", "KvmError"]
