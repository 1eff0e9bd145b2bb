"""SerialUart (16550A) register behaviour, with no VM: the device is KVM-free by design."""
from __future__ import annotations

from hvm.mmio import IrqLine, SerialUart
from hvm.mmio import uart16550 as u


def make():
    out = bytearray()
    levels = []
    irq = IrqLine(4, lambda n, level: levels.append(bool(level)))
    return SerialUart(out.extend, irq), out, levels


def test_transmit_goes_to_the_sink_and_thr_is_empty_again():
    uart, out, _ = make()
    for b in b"hi\n":
        assert uart.read(u.LSR, 1) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
        uart.write(u.RBR_THR_DLL, 1, b)
    assert bytes(out) == b"hi\n"
    assert uart.tx_bytes == 3


def test_divisor_latch_is_separate_from_data_and_ier():
    uart, out, _ = make()
    uart.write(u.LCR, 1, 0x83)      # DLAB + 8N1
    uart.write(u.RBR_THR_DLL, 1, 0x01)
    uart.write(u.IER_DLM, 1, 0x02)
    assert uart.read(u.RBR_THR_DLL, 1) == 0x01
    assert uart.read(u.IER_DLM, 1) == 0x02
    assert uart.divisor == 0x0201
    uart.write(u.LCR, 1, 0x03)
    assert uart.read(u.IER_DLM, 1) == 0  # IER untouched by the DLM write
    assert out == b""                     # DLL write transmitted nothing


def test_receive_fifo_and_data_ready():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.feed(b"abc")
    assert uart.read(u.LSR, 1) & u.LSR_DR
    assert bytes(uart.read(u.RBR_THR_DLL, 1) for _ in range(3)) == b"abc"
    assert not uart.read(u.LSR, 1) & u.LSR_DR


def test_input_beyond_the_fifo_waits_instead_of_overrunning():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    data = bytes(range(40))
    uart.feed(data)
    assert uart.read(u.LSR, 1) & u.LSR_DR
    assert len(uart.rx_fifo) == u.FIFO_SIZE
    got = bytes(uart.read(u.RBR_THR_DLL, 1) for _ in range(40))
    assert got == data
    assert not uart.read(u.LSR, 1) & u.LSR_OE


def test_interrupt_identification_and_irq_line():
    uart, _, levels = make()
    uart.write(u.MCR, 1, u.MCR_OUT2)
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_NO_INT
    uart.write(u.IER_DLM, 1, u.IER_THRI)   # enabling THRI with THR empty raises it
    assert levels == [True]
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_THRI
    assert levels == [True, False]          # reading IIR cleared it
    uart.write(u.IER_DLM, 1, u.IER_THRI | u.IER_RDI)
    uart.feed(b"x")
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_RDI  # received data outranks THRE
    assert levels[-1] is True
    uart.read(u.RBR_THR_DLL, 1)
    assert levels[-1] is False


def test_out2_gates_the_interrupt():
    uart, _, levels = make()
    uart.write(u.MCR, 1, 0)
    uart.write(u.IER_DLM, 1, u.IER_RDI)
    uart.feed(b"x")
    assert levels == []
    uart.write(u.MCR, 1, u.MCR_OUT2)
    assert levels == [True]


def test_loopback_as_linux_probes_it():
    uart, out, _ = make()
    uart.write(u.MCR, 1, u.MCR_LOOP | 0x0A)           # loop, RTS, OUT2
    assert uart.read(u.MSR, 1) & 0xF0 == 0x90          # CTS + DCD: what 8250 autoconfig checks
    uart.write(u.RBR_THR_DLL, 1, 0x55)
    assert out == b""                                   # nothing leaves the chip in loopback
    assert uart.read(u.RBR_THR_DLL, 1) == 0x55
    uart.write(u.MCR, 1, 0)
    assert uart.read(u.MSR, 1) & 0xF0 == u.MSR_CONNECTED


def test_scratch_register():
    uart, _, _ = make()
    uart.write(u.SCR, 1, 0xA5)
    assert uart.read(u.SCR, 1) == 0xA5


def test_input_that_arrives_before_driver_init_survives_the_fifo_reset():
    uart, out, _ = make()
    uart.feed(b"hi")                                   # host typed before the guest set the UART up
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE | u.FCR_CLEAR_RX | u.FCR_CLEAR_TX)
    assert uart.read(u.LSR, 1) & u.LSR_DR
    assert bytes(uart.read(u.RBR_THR_DLL, 1) for _ in range(2)) == b"hi"


def test_fifo_reset_drops_what_the_guest_could_see():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.feed(b"abc")
    assert uart.read(u.LSR, 1) & u.LSR_DR
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert not uart.read(u.LSR, 1) & u.LSR_DR


# --- hardening (issue 11) -------------------------------------------------------------------------------
import threading  # noqa: E402
import time  # noqa: E402


def test_reading_lsr_clears_an_overrun_and_its_interrupt():
    uart, _, levels = make()
    uart.read(u.LSR, 1)                                 # the receiver is in use (the polling fast path)
    uart.write(u.MCR, 1, u.MCR_LOOP | u.MCR_OUT2)
    uart.write(u.IER_DLM, 1, u.IER_RLSI)
    uart.write(u.RBR_THR_DLL, 1, 1)
    uart.write(u.RBR_THR_DLL, 1, 2)                     # no FIFO: one byte of room, so this one overruns
    assert levels[-1] is True
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_RLSI
    assert uart.read(u.LSR, 1) & u.LSR_OE
    assert levels[-1] is False                          # cleared with the error bit, by that same read
    assert uart.read(u.IIR_FCR, 1) & 0x0F == u.IIR_NO_INT


def test_toggling_fifo_enable_empties_the_fifo_and_data_ready():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.feed(b"abc")
    assert uart.read(u.LSR, 1) & u.LSR_DR
    uart.write(u.IIR_FCR, 1, 0)                         # FIFO off: both FIFOs reset
    assert not uart.read(u.LSR, 1) & u.LSR_DR           # no phantom byte to read
    assert uart.rx_fifo == type(uart.rx_fifo)()


def test_output_goes_to_the_sink_outside_the_uart_lock():
    held = []
    uart = SerialUart(lambda data: held.append(uart._lock.locked()))
    uart.write(u.RBR_THR_DLL, 1, 0x41)                  # the hot path
    uart.write(u.LCR, 1, 0x03)
    uart.write(u.IER_DLM, 1, u.IER_THRI)
    uart.write(u.RBR_THR_DLL, 1, 0x42)                  # through _write (interrupts on)
    assert held == [False, False]


def test_host_input_is_bounded_and_the_feeder_waits_for_the_guest():
    uart, _, _ = make()
    uart.write(u.IIR_FCR, 1, u.FCR_ENABLE)
    uart.read(u.LSR, 1)
    data = bytes(i & 0xFF for i in range(3 * u.INPUT_QUEUE_LIMIT))
    done = threading.Event()
    feeder = threading.Thread(target=lambda: (uart.feed(data), done.set()), daemon=True)
    feeder.start()
    time.sleep(0.3)
    assert not done.is_set()                                      # blocked: the queue is full
    assert len(uart._pending_input) == u.INPUT_QUEUE_LIMIT
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < len(data) and time.monotonic() < deadline:
        if uart.read(u.LSR, 1) & u.LSR_DR:
            got.append(uart.read(u.RBR_THR_DLL, 1))
        assert uart.input_pending <= u.INPUT_QUEUE_LIMIT + u.FIFO_SIZE
    assert bytes(got) == data                                     # nothing lost, in order
    assert done.wait(5)


def test_closing_the_uart_lets_a_blocked_feeder_go():
    uart, _, _ = make()
    done = threading.Event()
    threading.Thread(target=lambda: (uart.feed(bytes(2 * u.INPUT_QUEUE_LIMIT)), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    uart.close()
    assert done.wait(2)
    uart.feed(b"more")                                            # after close: dropped, never blocks
    assert len(uart._pending_input) == u.INPUT_QUEUE_LIMIT
