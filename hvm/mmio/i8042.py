"""Just enough of the i8042 keyboard controller for what operating systems ask of it on a PC without a
keyboard: the status and command ports (0x60 data, 0x64 status/command), the controller self-test and
command byte, and the CPU reset line (command 0xFE), which Linux's `reboot` uses."""
from __future__ import annotations

import threading
from collections import deque

from hvm._types import Callable
from hvm.mmio.device import StateReader, state_lock

I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64

STATUS_OBF = 0x01      # output buffer full: data for the CPU at 0x60
STATUS_SYS = 0x04      # system flag: self-test passed
STATUS_CMD = 0x08      # last write was a command

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_PULSE_RESET = 0xFE
# The real controller holds one byte for the CPU; like QEMU's PS/2 queue, hvm keeps a few, the oldest
# overwritten when the guest issues commands without reading the answers (a command flood stays bounded).
OUT_QUEUE = 16


class I8042:
    """Register it twice on the PIO bus: at 0x60 (length 1) and 0x64 (length 1); offsets differ by port."""

    name = "i8042"

    def __init__(self, on_reset: Callable[[], None] | None = None):
        self._on_reset = on_reset
        # Several vCPUs may use the ports at once: the ports take it around each access (the reset
        # callback runs after it is released: it stops the machine, which needs no device lock).
        self._lock = threading.Lock()
        self._power_on()

    def _power_on(self) -> None:
        self.ctr = 0x61              # keyboard interrupt on, translation, system flag
        self.status = STATUS_SYS
        self.out: deque[int] = deque(maxlen=OUT_QUEUE)
        self._pending_write: int | None = None   # a command waiting for its data byte at 0x60

    # --- device state (hvm.mmio.device); the two port objects delegate here --------------------------
    STATE_FIELDS = ("ctr", "status", "out", "pending_write")

    def save(self) -> dict:
        with state_lock(self):
            return {"ctr": self.ctr, "status": self.status, "out": bytes(self.out),
                    "pending_write": self._pending_write}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, self.STATE_FIELDS)
        ctr = r.integer("ctr", 0, 0xFF)
        status = r.integer("status", 0, 0xFF)
        out = r.blob("out", OUT_QUEUE)
        pending = r.optional_int("pending_write", (CMD_WRITE_CTR, CMD_WRITE_OUTPUT))
        with state_lock(self):
            self.ctr, self.status, self._pending_write = ctr, status, pending
            self.out = deque(out, maxlen=OUT_QUEUE)

    def reset(self) -> None:
        with state_lock(self):
            self._power_on()

    def port(self, which: int) -> "_Port":
        return _Port(self, which)

    def _push(self, byte: int) -> None:
        self.out.append(byte)

    def read_data(self) -> int:
        return self.out.popleft() if self.out else 0

    def read_status(self) -> int:
        return self.status | (STATUS_OBF if self.out else 0)

    def write_data(self, value: int) -> bool:
        """Returns True when the write asks for a CPU reset (the caller calls on_reset, unlocked)."""
        self.status &= ~STATUS_CMD
        cmd, self._pending_write = self._pending_write, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTPUT:
            return not value & 1          # bit 0 low = CPU reset
        # A byte for the (absent) keyboard itself: nobody answers, as with no keyboard plugged in.
        return False

    def write_command(self, value: int) -> bool:
        """Returns True when the command asks for a CPU reset (see write_data)."""
        self.status |= STATUS_CMD
        if value == CMD_READ_CTR:
            self._push(self.ctr)
        elif value in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT):
            self._pending_write = value
        elif value == CMD_SELF_TEST:
            self._push(0x55)
        elif value in (CMD_TEST_KBD, CMD_TEST_AUX):
            self._push(0x00)
        elif value == CMD_READ_OUTPUT:
            self._push(0x01)  # reset line high (not in reset), A20 as the machine has it
        elif value == CMD_PULSE_RESET:
            return True
        return False

    def reset_requested(self) -> None:
        if self._on_reset:
            self._on_reset()


class _Port:
    def __init__(self, chip: I8042, which: int):
        self.chip = chip
        self.which = which
        self.name = chip.name

    # Both ports save the whole chip (a snapshot keys state by bus range, so it is loaded twice: the same).
    def save(self) -> dict:
        return self.chip.save()

    def load(self, state: dict) -> None:
        self.chip.load(state)

    def reset(self) -> None:
        self.chip.reset()

    def read(self, offset: int, size: int) -> int:
        chip = self.chip
        with chip._lock:
            return chip.read_data() if self.which == I8042_DATA_PORT else chip.read_status()

    def write(self, offset: int, size: int, value: int) -> None:
        chip = self.chip
        with chip._lock:
            if self.which == I8042_DATA_PORT:
                reset = chip.write_data(value & 0xFF)
            else:
                reset = chip.write_command(value & 0xFF)
        if reset:
            chip.reset_requested()
