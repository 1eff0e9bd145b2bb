"""virtio 1.x numbers (OASIS "Virtual I/O Device (VIRTIO) Version 1.2"): device IDs, feature bits, device
status bits, the virtio-mmio (version 2) register offsets, and split-virtqueue layout and flags.

Only numbers live here, so backends, the transport, tests and guest-side tools can share them.
"""
from __future__ import annotations

# --- device IDs (spec 5 "Device Types") -------------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# --- reserved (transport-independent) feature bits (spec 6) -----------------------------------------
F_RING_INDIRECT_DESC = 28      # VIRTIO_F_INDIRECT_DESC: descriptors may point at a table of descriptors
F_RING_EVENT_IDX = 29          # VIRTIO_F_EVENT_IDX: used_event / avail_event notification suppression
F_VERSION_1 = 32               # a "modern" (virtio 1.x) device; the transport requires it
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38

# The bits the transport itself offers on top of a backend's device_features().
TRANSPORT_FEATURES = (1 << F_VERSION_1) | (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX)

# --- device status bits (spec 2.1) ------------------------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# --- virtio-mmio registers, layout version 2 (spec 4.2.2) -------------------------------------------
MMIO_MAGIC_VALUE = 0x000        # R  0x74726976 ("virt")
MMIO_VERSION = 0x004            # R  2
MMIO_DEVICE_ID = 0x008          # R
MMIO_VENDOR_ID = 0x00C          # R
MMIO_DEVICE_FEATURES = 0x010    # R  32 bits of the device features, chosen by DEVICE_FEATURES_SEL
MMIO_DEVICE_FEATURES_SEL = 0x014  # W
MMIO_DRIVER_FEATURES = 0x020    # W  32 bits of the driver features, chosen by DRIVER_FEATURES_SEL
MMIO_DRIVER_FEATURES_SEL = 0x024  # W
MMIO_QUEUE_SEL = 0x030          # W
MMIO_QUEUE_NUM_MAX = 0x034      # R  0: the selected queue does not exist
MMIO_QUEUE_NUM = 0x038          # W
MMIO_QUEUE_READY = 0x044        # RW
MMIO_QUEUE_NOTIFY = 0x050       # W  the queue index
MMIO_INTERRUPT_STATUS = 0x060   # R
MMIO_INTERRUPT_ACK = 0x064      # W
MMIO_STATUS = 0x070             # RW
MMIO_QUEUE_DESC_LOW = 0x080     # W
MMIO_QUEUE_DESC_HIGH = 0x084    # W
MMIO_QUEUE_DRIVER_LOW = 0x090   # W  the available ring
MMIO_QUEUE_DRIVER_HIGH = 0x094  # W
MMIO_QUEUE_DEVICE_LOW = 0x0A0   # W  the used ring
MMIO_QUEUE_DEVICE_HIGH = 0x0A4  # W
MMIO_SHM_SEL = 0x0AC            # W  shared memory regions: none here
MMIO_SHM_LEN_LOW = 0x0B0        # R  all ones: no such region
MMIO_SHM_LEN_HIGH = 0x0B4
MMIO_SHM_BASE_LOW = 0x0B8
MMIO_SHM_BASE_HIGH = 0x0BC
MMIO_QUEUE_RESET = 0x0C0        # RW (VIRTIO_F_RING_RESET, not offered): reads 0
MMIO_CONFIG_GENERATION = 0x0FC  # R
MMIO_CONFIG = 0x100             # RW device-specific configuration space

MMIO_MAGIC = 0x74726976         # "virt", little-endian
MMIO_VERSION_2 = 2              # the modern register layout
MMIO_VENDOR = int.from_bytes(b"HVM\0", "little")   # as QEMU reports "QEMU"
MMIO_SIZE = 0x1000              # one slot

# InterruptStatus / InterruptACK bits
INT_USED_BUFFER = 1             # a queue's used ring was updated
INT_CONFIG_CHANGE = 2           # the configuration changed (or the device needs a reset)

# --- split virtqueues (spec 2.7) --------------------------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # the driver asks for no used-buffer interrupts (ignored with EVENT_IDX)
VIRTQ_USED_F_NO_NOTIFY = 1      # the device asks for no notifications (ignored with EVENT_IDX)

DESC_SIZE = 16                  # le64 addr, le32 len, le16 flags, le16 next
USED_ELEM_SIZE = 8              # le32 id, le32 len
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
QUEUE_SIZE_MAX = 32768          # split rings: a power of two <= 32768

# Bounds on what one guest chain may make the VMM do (CONTRACT.md part B).
MAX_CHAIN_BYTES = 16 << 20      # total bytes of one descriptor chain


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] of {id, len}, avail_event."""
    return 6 + USED_ELEM_SIZE * num
