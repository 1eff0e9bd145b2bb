"""KVM constants hvm uses: exit reasons, capabilities, MP states."""
from __future__ import annotations

# exit reasons (linux/kvm.h)
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_SET_TPR = 11
EXIT_TPR_ACCESS = 12
EXIT_NMI = 16
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
EXIT_IOAPIC_EOI = 26

EXIT_REASON_NAMES = {v: k[5:] for k, v in dict(globals()).items() if k.startswith("EXIT_") and isinstance(v, int)}
NUM_EXIT_REASONS = 64  # size of the run loop's dispatch table

EXIT_IO_IN = 0
EXIT_IO_OUT = 1

INTERNAL_ERROR_EMULATION = 1
INTERNAL_ERROR_SIMUL_EX = 2
INTERNAL_ERROR_DELIVERY_EV = 3
INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
INTERNAL_ERROR_NAMES = {
    1: "emulation failure",
    2: "exception while delivering an exception",
    3: "error while delivering an event",
    4: "unexpected exit reason",
}

SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# capabilities
CAP_IRQCHIP = 0
CAP_HLT = 1
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_EXT_CPUID = 7
CAP_NR_VCPUS = 9
CAP_MP_STATE = 14
CAP_COALESCED_MMIO = 15
CAP_IRQFD = 32
CAP_PIT2 = 33
CAP_IOEVENTFD = 36
CAP_SET_IDENTITY_MAP_ADDR = 37
CAP_INTERNAL_ERROR_DATA = 40
CAP_VCPU_EVENTS = 41
CAP_MAX_VCPUS = 66
CAP_READONLY_MEM = 81
CAP_IMMEDIATE_EXIT = 136

CAP_NAMES = {v: k[4:] for k, v in dict(globals()).items() if k.startswith("CAP_") and isinstance(v, int)}

MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3
MP_STATE_SIPI_RECEIVED = 4
