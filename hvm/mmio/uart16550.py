"""A 16550A UART (COM1-style): all eight registers, DLAB divisor latch, 16-byte FIFOs, loopback,
and a level-triggered interrupt. Transmission is instantaneous: a byte written to THR goes straight
to the output sink, so THR/TSR are always empty again when the guest next looks.

Modelled on the National Semiconductor PC16550D data sheet; the same behaviour QEMU's serial.c and
rust-vmm's vm-superio give Linux's 8250 driver.
"""
from __future__ import annotations

import threading
from collections import deque

from hvm._types import Callable
from hvm.mmio.device import InputGate, IrqLine, StateReader
from hvm.mmio.published import Latch

COM1_PORT = 0x3F8
COM1_IRQ = 4
FIFO_SIZE = 16
# Host input waiting for room in the receive FIFO. When it is full, feed() blocks (the host feeder stops
# reading stdin or the file: backpressure) until the guest reads or the UART is closed.
INPUT_QUEUE_LIMIT = 4096

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01   # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08   # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA = 0x0F
# Outside loopback the other end is always there: carrier, data set ready and clear to send.
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

RX_TRIGGER_LEVELS = (1, 4, 8, 14)
_BYTE = [bytes((i,)) for i in range(256)]  # preallocated one-byte objects for the transmit path


class SerialUart:
    """16550A UART. `output(bytes)` receives what the guest transmits; `feed(bytes)` queues input."""

    name = "uart16550"

    def __init__(self, output: Callable[[bytes], None] | None = None, irq: IrqLine | None = None,
                 name: str = "uart16550"):
        self.name = name
        self._output = output
        self.irq = irq or IrqLine(COM1_IRQ)
        self._lock = threading.Lock()
        self._input = InputGate(self._lock)            # a feeder waits here for room in the input queue
        self.rx_fifo: deque[int] = deque()
        self._pending_input: deque[int] = deque()  # host input not yet in the FIFO (bounded; see feed)
        # SCR is a published latch (hvm/mmio/published.py): the fast loop answers its one-byte IN/OUT in C
        # from the same memory this object reads and writes; other sizes come here, as before.
        self._scr = Latch(1)
        self.published_registers = [(SCR, self._scr)]
        self._power_on()
        self.tx_bytes = 0
        self.rx_bytes = 0

    def _power_on(self) -> None:
        """The registers as a PC BIOS leaves them (the state after power-on and after reset())."""
        self.ier = 0
        self.lcr = 0x03  # 8N1 as left by a PC BIOS
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_CONNECTED
        self.scr = 0
        self.fcr = 0
        self.divisor = 12  # 9600 baud from the 1.8432 MHz clock
        self.rx_fifo.clear()
        self._thr_interrupt = False
        # Host input is held back until the guest first looks at the receiver (reads RBR/LSR/IIR or
        # enables the receive interrupt), so the FIFO reset every driver does at init cannot eat it.
        self._rx_active = False

    @property
    def scr(self) -> int:
        return self._scr.value

    @scr.setter
    def scr(self, value: int) -> None:
        self._scr.value = value

    # --- device state (hvm.mmio.device: save/load/reset) -----------------------------------------
    # tx_bytes/rx_bytes are this process's statistics, not state. The IRQ level is saved and driven
    # again by load(): KVM's irqchip state does not carry the levels of the lines into it.
    STATE_FIELDS = ("ier", "lcr", "mcr", "lsr", "msr", "scr", "fcr", "divisor", "rx_fifo", "pending_input",
                    "thr_interrupt", "rx_active", "irq_level")

    def save(self) -> dict:
        with self._lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "lsr": self.lsr, "msr": self.msr,
                    "scr": self.scr, "fcr": self.fcr, "divisor": self.divisor, "rx_fifo": bytes(self.rx_fifo),
                    "pending_input": bytes(self._pending_input), "thr_interrupt": self._thr_interrupt,
                    "rx_active": self._rx_active, "irq_level": self.irq.level}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, self.STATE_FIELDS)
        regs = {key: r.integer(key, 0, 0xFF) for key in ("lcr", "lsr", "msr", "scr")}
        ier = r.integer("ier", 0, 0x0F)
        mcr = r.integer("mcr", 0, 0x1F)
        fcr = r.integer("fcr", 0, 0xFF)
        if fcr & ~(FCR_ENABLE | 0xC0):
            raise r.fail("fcr", f"{fcr:#x} has bits the register does not keep (only {FCR_ENABLE | 0xC0:#x})")
        divisor = r.integer("divisor", 0, 0xFFFF)
        # the receive FIFO holds 16 bytes in FIFO mode, one (the holding register) in 16450 mode
        rx_fifo = r.blob("rx_fifo", FIFO_SIZE if fcr & FCR_ENABLE else 1)
        pending = r.blob("pending_input", INPUT_QUEUE_LIMIT)
        thr_interrupt, rx_active, irq_level = r.flag("thr_interrupt"), r.flag("rx_active"), r.flag("irq_level")
        with self._lock:
            self.lcr, self.lsr, self.msr, self.scr = regs["lcr"], regs["lsr"], regs["msr"], regs["scr"]
            self.ier, self.mcr, self.fcr, self.divisor = ier, mcr, fcr, divisor
            self.rx_fifo = deque(rx_fifo)
            self._pending_input = deque(pending)
            self._thr_interrupt, self._rx_active = thr_interrupt, rx_active
            self.irq.set_level(irq_level)
            self._input.wake()

    def reset(self) -> None:
        """Power-on registers, empty FIFOs, IRQ low. Host input not yet taken is dropped with them: what the
        host sends next waits, as at boot, until the new guest looks at the receiver."""
        with self._lock:
            self._power_on()
            self._pending_input.clear()
            self.irq.set_level(False)
            self._input.wake()

    # --- host side -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue bytes from the host (stdin, a pipe, a test) for the guest to receive. Blocks while
        INPUT_QUEUE_LIMIT bytes are waiting (the guest is not reading): never grows without bound, never
        drops what the guest has not refused. Returns at once, dropping the rest, once close() is called."""
        view = memoryview(bytes(data))
        with self._lock:
            while view and not self._input.closed:
                room = INPUT_QUEUE_LIMIT - len(self._pending_input)
                if room <= 0:
                    self._input.wait()
                    continue
                self._pending_input.extend(view[:room])
                view = view[room:]
                self._refill_rx()
                self._update_irq()

    def close(self) -> None:
        """The machine is stopping: let blocked feeders go; later input is dropped. Never blocks (it may run
        in a signal handler that interrupted a thread holding the lock): a feeder looks at the flag at least
        every 0.5 s, and is woken at once when the lock is free."""
        self._input.close()

    @property
    def input_pending(self) -> int:
        return len(self._pending_input) + len(self.rx_fifo)

    def _fifo_capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _refill_rx(self) -> None:
        if self.mcr & MCR_LOOP or not self._rx_active:
            return  # in loopback the receiver is disconnected from the line
        cap = self._fifo_capacity()
        pending = self._pending_input
        if pending and len(self.rx_fifo) < cap:
            while pending and len(self.rx_fifo) < cap:
                self.rx_fifo.append(pending.popleft())
            self._input.wake()
        if self.rx_fifo:
            self.lsr |= LSR_DR

    def _receive(self, byte: int) -> None:
        """A byte arriving at the receiver (loopback path)."""
        if len(self.rx_fifo) >= self._fifo_capacity():
            self.lsr |= LSR_OE
        else:
            self.rx_fifo.append(byte)
        self.lsr |= LSR_DR

    # --- interrupt logic ------------------------------------------------------------------------
    def _iir(self) -> int:
        """The highest-priority pending interrupt, as IIR encodes it."""
        fifo_bits = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        if self.ier & IER_RLSI and self.lsr & (LSR_OE | LSR_BI):
            return IIR_RLSI | fifo_bits
        if self.ier & IER_RDI and self.rx_fifo:
            if self.fcr & FCR_ENABLE and len(self.rx_fifo) < RX_TRIGGER_LEVELS[self.fcr >> 6]:
                # Below the trigger level the real chip raises a character timeout after 4 character
                # times; with no line timing to model, it is reported at once.
                return IIR_CTI | fifo_bits
            return IIR_RDI | fifo_bits
        if self.ier & IER_THRI and self._thr_interrupt:
            return IIR_THRI | fifo_bits
        if self.ier & IER_MSI and self.msr & MSR_DELTA:
            return IIR_MSI | fifo_bits
        return IIR_NO_INT | fifo_bits

    def _update_irq(self) -> None:
        if not self.ier and not self.irq.level:
            return  # interrupts off and the line already low: the common case for polling drivers
        # OUT2 gates the interrupt onto the ISA bus on a PC; Linux sets it before enabling interrupts.
        pending = not (self._iir() & IIR_NO_INT)
        self.irq.set_level(pending and bool(self.mcr & MCR_OUT2))

    # --- guest side ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == LSR and self._rx_active:
            # The hot path of a polling driver: LSR before every byte. With no error bit set the read changes
            # nothing, so it takes no lock: reading one attribute is atomic, and the value is what the lock
            # would give just before or just after whatever another thread (host input) does under it.
            value = self.lsr
            if not value & (LSR_OE | LSR_BI):
                return value
        # acquire/release, not `with`: the guest's register accesses are hvm's hottest code, and a `with`
        # block costs about twice as much as the two calls (the special-method lookups, __exit__'s arguments).
        lock = self._lock
        lock.acquire()
        try:
            if offset == LSR and self._rx_active:
                value = self.lsr
                if value & (LSR_OE | LSR_BI):
                    self.lsr = value & ~(LSR_OE | LSR_BI)   # error bits clear on read ...
                    self._update_irq()                       # ... and with them a line-status interrupt
                return value
            value = self._read(offset)
            if self.ier or self.irq.level:   # else _update_irq has nothing to do (saves the call)
                self._update_irq()
            return value
        finally:
            lock.release()

    def write(self, offset: int, size: int, value: int) -> None:
        # What the guest transmits goes to the output sink after the lock is released: a sink that blocks
        # (a stalled terminal or pipe) then holds up this vCPU only, never another thread taking the lock
        # (host input, a second vCPU polling LSR).
        lock = self._lock
        lock.acquire()      # not `with`: see read()
        try:
            if offset == RBR_THR_DLL and not (self.lcr & LCR_DLAB or self.mcr & MCR_LOOP):
                # The hot path: one byte to transmit.
                self.tx_bytes += 1
                self.lsr |= LSR_THRE | LSR_TEMT
                self._thr_interrupt = True
                if self.ier or self.irq.level:
                    self._update_irq()
                sent = _BYTE[value & 0xFF]
            else:
                sent = self._write(offset, value & 0xFF)
                if self.ier or self.irq.level:   # else _update_irq has nothing to do (saves the call)
                    self._update_irq()
        finally:
            lock.release()
        if sent is not None and self._output is not None:
            self._output(sent)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if not self._rx_active and not dlab and offset in (RBR_THR_DLL, IIR_FCR, LSR):
            self._rx_active = True
            self._refill_rx()
        if offset == RBR_THR_DLL:
            if dlab:
                return self.divisor & 0xFF
            byte = 0
            if self.rx_fifo:
                byte = self.rx_fifo.popleft()
                self.rx_bytes += 1
            self._refill_rx()
            if not self.rx_fifo:
                self.lsr &= ~LSR_DR
            return byte
        if offset == IER_DLM:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thr_interrupt = False  # reading IIR clears a THRE interrupt it reports
            return iir
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr
            self.lsr &= ~(LSR_OE | LSR_BI)  # error bits clear on read
            return value
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback wires the modem outputs back to the inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
                value = ((self.mcr & MCR_RTS) << 3 | (self.mcr & MCR_DTR) << 5
                         | (self.mcr & MCR_OUT1) << 4 | (self.mcr & MCR_OUT2) << 4)
                return value | (self.msr & MSR_DELTA)
            value = self.msr
            self.msr &= ~MSR_DELTA
            return value
        return self.scr  # SCR

    def _write(self, offset: int, value: int) -> bytes | None:
        """A register write (under the lock); returns the byte to send to the output sink, if any."""
        dlab = self.lcr & LCR_DLAB
        sent = None
        if offset == RBR_THR_DLL:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return None
            self.tx_bytes += 1
            if self.mcr & MCR_LOOP:
                self._receive(value)
            else:
                sent = _BYTE[value]
            # Sent at once: the holding register is empty again and says so.
            self.lsr |= LSR_THRE | LSR_TEMT
            self._thr_interrupt = True
        elif offset == IER_DLM:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return None
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_RDI and not self._rx_active:
                self._rx_active = True
                self._refill_rx()
            if self.ier & IER_THRI and not was & IER_THRI and self.lsr & LSR_THRE:
                self._thr_interrupt = True  # enabling THRI with THR empty raises it (as the 16550 does)
        elif offset == IIR_FCR:
            if (value ^ self.fcr) & FCR_ENABLE or value & FCR_CLEAR_RX:
                # Changing FIFO mode resets both FIFOs; CLEAR_RX the receive one. Nothing left: no data
                # ready (host input still waiting refills it below).
                self.rx_fifo.clear()
                self.lsr &= ~LSR_DR
            self.fcr = value & (FCR_ENABLE | 0xC0)
            self._refill_rx()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            was_loop = self.mcr & MCR_LOOP
            self.mcr = value & 0x1F
            if was_loop and not self.mcr & MCR_LOOP:
                self._refill_rx()
        elif offset == LSR:
            pass  # read-only (factory test only)
        elif offset == MSR:
            pass  # read-only
        else:
            self.scr = value
        return sent
