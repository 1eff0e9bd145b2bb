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
