"""hvm.mmio: buses (PioBus, MmioBus) and emulated devices. Nothing here imports hvm.kvm."""
from hvm.mmio.bus import BusError, DeviceFault, MmioBus, PioBus
from hvm.mmio.debug_exit import DebugExit
from hvm.mmio.device import Device, DeviceStateError, IrqLine
from hvm.mmio.uart16550 import SerialUart

__all__ = ["BusError", "DeviceFault", "DebugExit", "Device", "DeviceStateError", "IrqLine", "MmioBus", "PioBus", "SerialUart"]
