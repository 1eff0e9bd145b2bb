"""Split virtqueues (hvm/mmio/virtio/queue.py) fed crafted rings: good chains come out checked, every
hostile one is a VirtqueueError with a one-line reason, and nothing outside guest RAM is ever touched."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from hvm.memory import GiB, MiB, GuestMemory
from hvm.mmio.virtio import Queue, VirtqueueError
from hvm.mmio.virtio import constants as vc
from virtio_driver import Arena, RingWriter

F_INDIRECT = 1 << vc.F_RING_INDIRECT_DESC
F_EVENT_IDX = 1 << vc.F_RING_EVENT_IDX
W, N, I = vc.VIRTQ_DESC_F_WRITE, vc.VIRTQ_DESC_F_NEXT, vc.VIRTQ_DESC_F_INDIRECT


class CheckedMemory(GuestMemory):
    """Guest RAM that records any access outside it (the queue code must never attempt one)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.outside: list[tuple[str, int, int]] = []

    def read(self, gpa: int, length: int) -> bytes:
        if not self.contains(gpa, length):
            self.outside.append(("read", gpa, length))
        return super().read(gpa, length)

    def write(self, gpa: int, data) -> None:
        if not self.contains(gpa, len(data)):
            self.outside.append(("write", gpa, len(data)))
        super().write(gpa, data)


@pytest.fixture(scope="module")
def big_memory():
    """3 GiB + 32 MiB: RAM below the PCI hole and 32 MiB above 4 GiB (MAP_NORESERVE: costs nothing)."""
    with CheckedMemory(3 * GiB + 32 * MiB) as mem:
        yield mem


@pytest.fixture
def memory():
    with CheckedMemory(16 * MiB) as mem:
        yield mem


def make(memory: GuestMemory, size: int = 8, features: int = F_INDIRECT, max_size: int = 256,
         start: int = 0x100000) -> tuple[Queue, RingWriter]:
    ring = RingWriter.create(memory, size, Arena(start))
    q = Queue(memory, 0, max_size, "test")
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, ring.desc, ring.avail, ring.used
    q.check()
    q.set_features(features)
    q.ready = True
    return q, ring


# --- good chains -----------------------------------------------------------------------------------
def test_direct_chain_read_write_and_used_ring(memory):
    q, ring = make(memory)
    head = ring.add([b"abc", b"defgh"], [4, 6])
    assert q.pending() == 1
    chain = q.pop()
    assert chain.head == head
    assert [n for _, n in chain.readable] == [3, 5] and [n for _, n in chain.writable] == [4, 6]
    assert (chain.readable_len, chain.writable_len) == (8, 10)
    assert chain.read() == b"abcdefgh"
    assert chain.read(4, offset=2) == b"cdef"        # across the two readable buffers
    assert chain.read(100, offset=6) == b"gh"        # fewer when the buffers end first
    assert chain.write(b"0123456789XYZ") == 10       # truncated to the writable room
    assert ring.written(head) == b"0123456789"
    assert chain.write(b"ab", offset=3) == 2         # straddles the first and second writable buffers
    assert ring.written(head) == b"012ab56789"
    assert q.pop() is None
    q.push_used(chain, 10)
    assert ring.take_used() == [(head, 10)]
    assert memory.outside == []


def test_indirect_chain(memory):
    q, ring = make(memory)
    head = ring.add([b"request"], [3, 5], indirect=True)
    chain = q.pop()
    assert chain.head == head
    assert chain.read() == b"request" and chain.writable_len == 8
    chain.write(b"ABCDEFGH")
    q.push_used(chain, 8)
    assert ring.take_used() == [(head, 8)] and ring.written(head) == b"ABCDEFGH"


def test_direct_descriptors_then_an_indirect_table(memory):
    q, ring = make(memory)
    arena = ring.arena
    hdr, data, status = arena.alloc(16), arena.alloc(512), arena.alloc(1)
    memory.write(hdr, b"H" * 16)
    table = arena.alloc(32)
    ring.write_desc(0, data, 512, W | N, 1, table=table)
    ring.write_desc(1, status, 1, W, table=table)
    ring.write_desc(3, hdr, 16, N, 5)
    ring.write_desc(5, table, 32, I)
    ring.publish(3)
    chain = q.pop()
    assert chain.readable == [(hdr, 16)] and chain.writable == [(data, 512), (status, 1)]


def test_write_flag_of_the_indirect_descriptor_itself_is_ignored(memory):
    q, ring = make(memory)
    buf, table = ring.arena.alloc(64), ring.arena.alloc(16)
    ring.write_desc(0, buf, 64, 0, table=table)
    ring.write_desc(0, table, 16, I | W)        # spec 2.7.5.3.2: the device ignores WRITE here
    ring.publish(0)
    assert q.pop().readable == [(buf, 64)]


def test_buffers_above_4g_are_guest_ram(big_memory):
    q, ring = make(big_memory)
    ring.write_desc(0, 4 * GiB + 0x1000, 4096, W)
    ring.publish(0)
    chain = q.pop()
    assert chain.write(b"\xaa" * 4096) == 4096
    assert big_memory.read(4 * GiB + 0x1000, 4) == b"\xaa" * 4


# --- hostile chains ------------------------------------------------------------------------------
BUF = 0x200000   # inside the 16 MiB test RAM, away from the rings


def _table_at(ring):
    return ring.arena.alloc(16 * 8)


HOSTILE = {
    # name: (setup(ring) -> head, expected message part)
    "loop": (lambda r: (r.write_desc(0, BUF, 8, N, 1), r.write_desc(1, BUF, 8, N, 0), 0)[-1],
             "descriptor 0 is visited twice (a loop)"),
    "self loop": (lambda r: (r.write_desc(2, BUF, 8, N, 2), 2)[-1], "descriptor 2 is visited twice"),
    "head outside the table": (lambda r: 8, "chain head 8 is outside the descriptor table of 8"),
    "next outside the table": (lambda r: (r.write_desc(0, BUF, 8, N, 9), 0)[-1],
                               "descriptor 0 names next 9, outside its table of 8"),
    "zero length": (lambda r: (r.write_desc(0, BUF, 0), 0)[-1], "descriptor 0 has length 0"),
    "huge length": (lambda r: (r.write_desc(0, BUF, 0xFFFF_FFFF), 0)[-1],
                    "descriptor 0 has length 4294967295 (at most 16777216)"),
    "past the end of RAM": (lambda r: (r.write_desc(0, 16 * MiB - 8, 16), 0)[-1],
                            "buffer 0xfffff8..0x1000008 is outside guest RAM"),
    "far outside RAM": (lambda r: (r.write_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x20), 0)[-1], "is outside guest RAM"),
    "PCI hole": (lambda r: (r.write_desc(0, 0xD000_0000, 0x1000, W), 0)[-1],
                 "buffer 0xd0000000..0xd0001000 is outside guest RAM"),
    "write-only before read-only": (lambda r: (r.write_desc(0, BUF, 8, W | N, 1), r.write_desc(1, BUF, 8), 0)[-1],
                                    "descriptor 1 is device-readable after a device-writable one"),
    "indirect with NEXT": (lambda r: (r.write_desc(0, _table_at(r), 16, I | N, 1), 0)[-1],
                           "descriptor 0 has both INDIRECT and NEXT"),
    "indirect of length 0": (lambda r: (r.write_desc(0, _table_at(r), 0, I), 0)[-1],
                             "indirect table length 0 is not a positive multiple of 16"),
    "indirect of odd length": (lambda r: (r.write_desc(0, _table_at(r), 24, I), 0)[-1],
                               "indirect table length 24 is not a positive multiple of 16"),
    "indirect table outside RAM": (lambda r: (r.write_desc(0, 0xC000_0000, 64, I), 0)[-1],
                                   "indirect table 0xc0000000..0xc0000040 is outside guest RAM"),
    "indirect table too long": (lambda r: (r.write_desc(0, BUF, 16 * 32769, I), 0)[-1],
                                "indirect table of 32769 descriptors (at most 32768)"),
}


def _indirect(r, entries):
    table = _table_at(r)
    for i, (addr, length, flags, nxt) in enumerate(entries):
        r.write_desc(i, addr, length, flags, nxt, table=table)
    r.write_desc(0, table, 16 * len(entries), I)
    return 0


HOSTILE.update({
    "nested indirect": (lambda r: _indirect(r, [(BUF, 16, I, 0)]), "indirect descriptor 0 is an indirect table "
                                                                  "inside an indirect table"),
    "loop inside an indirect table": (lambda r: _indirect(r, [(BUF, 8, N, 1), (BUF, 8, N, 0)]),
                                      "indirect descriptor 0 is visited twice (a loop)"),
    "next outside an indirect table": (lambda r: _indirect(r, [(BUF, 8, N, 2), (BUF, 8, 0, 0)]),
                                       "indirect descriptor 0 names next 2, outside its table of 2"),
    "zero length in an indirect table": (lambda r: _indirect(r, [(BUF, 8, N, 1), (BUF, 0, 0, 0)]),
                                         "indirect descriptor 1 has length 0"),
    "PCI hole in an indirect table": (lambda r: _indirect(r, [(0xFEE0_0000, 16, W, 0)]),
                                      "indirect descriptor 0 buffer 0xfee00000..0xfee00010 is outside guest RAM"),
    "writable before readable in an indirect table": (
        lambda r: _indirect(r, [(BUF, 8, W | N, 1), (BUF, 8, 0, 0)]),
        "indirect descriptor 1 is device-readable after a device-writable one"),
})


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_chain_is_refused(memory, case):
    setup, message = HOSTILE[case]
    q, ring = make(memory)
    ring.publish(setup(ring))
    with pytest.raises(VirtqueueError) as e:
        q.pop()
    text = str(e.value)
    assert message in text and text.startswith("test queue 0: ") and "\n" not in text
    assert q.last_avail_idx == 0          # the bad entry is not consumed
    assert ring.used_idx() == 0
    assert memory.outside == []           # nothing read or written outside guest RAM


def test_indirect_refused_when_not_negotiated(memory):
    q, ring = make(memory, features=0)
    ring.add([b"x"], [1], indirect=True)
    with pytest.raises(VirtqueueError, match="is indirect but VIRTIO_F_INDIRECT_DESC was not negotiated"):
        q.pop()


def test_chain_of_more_than_16_mib_in_all(big_memory):
    q, ring = make(big_memory, size=4)
    ring.write_desc(0, 0x1000_0000, 10 * MiB, N, 1)
    ring.write_desc(1, 0x2000_0000, 7 * MiB, W)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="chain 0: more than 16777216 bytes in all"):
        q.pop()


def test_buffer_straddling_the_start_of_the_pci_hole(big_memory):
    q, ring = make(big_memory)
    ring.write_desc(0, 3 * GiB - 8, 16, W)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match=r"buffer 0xbffffff8..0xc0000008 is outside guest RAM"):
        q.pop()
    assert big_memory.outside == []


def test_buffer_straddling_the_end_of_the_pci_hole(big_memory):
    q, ring = make(big_memory)
    ring.write_desc(0, 4 * GiB - 8, 16)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="outside guest RAM"):
        q.pop()


def test_a_chain_as_long_as_the_queue_is_accepted(memory):
    q, ring = make(memory, size=8)
    for i in range(8):
        ring.write_desc(i, BUF + 16 * i, 16, N if i < 7 else 0, i + 1)
    ring.publish(0)
    assert len(q.pop().readable) == 8


def test_available_index_jumping_past_the_queue_size(memory):
    q, ring = make(memory, size=8)
    ring.set_avail_idx(9)
    with pytest.raises(VirtqueueError, match="available index 9 is 9 entries ahead of the device's 0, "
                                             "more than the queue size 8"):
        q.pop()
    ring.set_avail_idx(0xFFFF)            # "behind" the device: 65535 ahead modulo 2^16
    with pytest.raises(VirtqueueError, match="65535 entries ahead"):
        q.pending()


def test_exactly_a_queue_size_ahead_is_fine(memory):
    q, ring = make(memory, size=4)
    for _ in range(4):
        ring.add([b"x"])
    assert q.pending() == 4
    assert [q.pop().head for _ in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("field,value,message", [
    ("size", 6, "size 6 is not a power of 2 in 1..256"),
    ("size", 0, "size 0 is not a power of 2"),
    ("size", 512, "size 512 is not a power of 2 in 1..256"),
    ("desc_addr", 0x100008, "descriptor table at 0x100008 is not 16-byte aligned"),
    ("avail_addr", 0x100001, "available ring at 0x100001 is not 2-byte aligned"),
    ("used_addr", 0x100002, "used ring at 0x100002 is not 4-byte aligned"),
    ("desc_addr", 16 * MiB - 64, "descriptor table 0xffffc0..0x1000040 is outside guest RAM"),
    ("avail_addr", 0xC000_0000, "available ring 0xc0000000..0xc0000016 is outside guest RAM"),
    ("used_addr", 1 << 40, "used ring 0x10000000000..0x10000000046 is outside guest RAM"),
])
def test_ring_checks_when_made_ready(memory, field, value, message):
    q = Queue(memory, 3, 256, "dev")
    q.size, q.desc_addr, q.avail_addr, q.used_addr = 8, 0x100000, 0x100100, 0x100200
    q.check()
    setattr(q, field, value)
    with pytest.raises(VirtqueueError, match="^dev queue 3: " + message.replace(".", r"\.")):
        q.check()


def test_used_length_beyond_the_writable_buffers_is_a_backend_bug(memory):
    q, ring = make(memory)
    ring.add([b"abc"], [2])
    chain = q.pop()
    with pytest.raises(ValueError, match="3 bytes written, its writable buffers hold 2"):
        q.push_used(chain, 3)


def test_broken_queue_gives_nothing_and_takes_nothing(memory):
    q, ring = make(memory)
    ring.add([b"abc"])
    chain = q.pop()
    ring.add([b"def"])
    q.broken = True
    assert q.pop() is None and q.pending() == 0
    q.push_used(chain, 0)
    assert ring.used_idx() == 0 and not q.needs_interrupt()


# --- notification suppression ----------------------------------------------------------------------
def test_no_interrupt_flag_without_event_idx(memory):
    q, ring = make(memory)
    ring.add([b"a"])
    q.push_used(q.pop(), 0)
    assert q.needs_interrupt()
    ring.set_avail_flags(vc.VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_interrupt()


def test_event_idx_used_event(memory):
    q, ring = make(memory, features=F_EVENT_IDX)
    ring.set_avail_flags(vc.VIRTQ_AVAIL_F_NO_INTERRUPT)   # ignored with EVENT_IDX
    ring.set_used_event(2)                                # interrupt when used idx passes 2
    for _ in range(4):
        ring.add([b"a"])
    q.push_used(q.pop(), 0)                               # used idx 1
    assert not q.needs_interrupt()
    q.push_used(q.pop(), 0)
    q.push_used(q.pop(), 0)                               # used idx 3: 2 was passed
    assert q.needs_interrupt()
    assert not q.needs_interrupt()                        # nothing new since the last decision
    q.push_used(q.pop(), 0)                               # used idx 4, event 2 already behind
    assert not q.needs_interrupt()
    ring.set_used_event(4)
    assert not q.needs_interrupt()                        # no push since: 4 is not in [4, 4)


def test_event_idx_avail_event_follows_the_device(memory):
    q, ring = make(memory, features=F_EVENT_IDX)
    assert q.pop() is None
    assert ring.avail_event() == 0                        # "notify me at the next buffer"
    ring.add([b"a"])
    ring.add([b"b"])
    q.pop()
    assert ring.avail_event() == 1
    q.pop()
    assert q.pop() is None
    assert ring.avail_event() == 2


def test_avail_event_is_not_written_without_event_idx(memory):
    q, ring = make(memory, features=0)
    ring.add([b"a"])
    q.pop()
    assert ring.avail_event() == 0


# --- 16-bit index wraparound ----------------------------------------------------------------------
def test_indices_wrap_around(memory):
    q, ring = make(memory, size=4, features=F_EVENT_IDX)
    start = 0xFFFE
    q.last_avail_idx = q.used_idx = q.signalled_used = start
    ring.avail_idx = ring.last_used = start
    ring.set_avail_idx(start)
    memory.write(ring.used + 2, struct.pack("<H", start))
    heads = [ring.add([bytes([i])]) for i in range(4)]    # one descriptor each: 4 in flight fill the table
    assert q.pending() == 4
    ring.set_used_event(0xFFFF)
    chains = [q.pop() for _ in range(4)]
    assert [c.head for c in chains] == heads
    assert [c.read() for c in chains] == [b"\0", b"\1", b"\2", b"\3"]
    assert q.last_avail_idx == 2 and ring.avail_event() == 2
    for c in chains:
        q.push_used(c, 0)
    assert q.used_idx == 2 and ring.used_idx() == 2
    assert ring.take_used() == [(h, 0) for h in heads]
    assert q.needs_interrupt()                            # 0xffff lies in [0xfffe, 2) modulo 2^16


# --- fuzz: random descriptor tables --------------------------------------------------------------
IN_RAM = st.integers(0x200000, 0x20FFFF)                 # buffers well inside RAM (drawn most often)
ADDRESSES = st.one_of(
    IN_RAM, IN_RAM, IN_RAM, IN_RAM,
    st.integers(16 * MiB - 64, 16 * MiB + 64),           # around the end of RAM
    st.integers(0xBFFF_FFF0, 0x1_0000_0010),             # the PCI hole and its edges
    st.integers(0, (1 << 64) - 1))
LENGTHS = st.one_of(st.integers(1, 64), st.integers(1, 64), st.integers(0, 0xFFFF_FFFF))
FLAGS = st.sampled_from([0, N, W, W | N, 0, N, W, W | N, I, I | N, I | W, 7])
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, FLAGS, st.integers(0, 8))


@pytest.mark.fuzz
@given(table=st.lists(DESCRIPTORS, min_size=8, max_size=8), heads=st.lists(st.integers(0, 8), min_size=1, max_size=8),
       indirect=st.lists(DESCRIPTORS, min_size=4, max_size=4), features=st.sampled_from([0, F_INDIRECT, F_INDIRECT | F_EVENT_IDX]))
def test_fuzz_random_descriptor_tables(table, heads, indirect, features):
    with CheckedMemory(16 * MiB) as memory:
        q, ring = make(memory, size=8, features=features)
        itable = ring.arena.alloc(64)
        for i, d in enumerate(indirect):
            ring.write_desc(i, *d, table=itable)
        for i, (addr, length, flags, nxt) in enumerate(table):
            if i == 7 and flags & I:      # one descriptor may point at the crafted indirect table
                addr, length = itable, 64
            ring.write_desc(i, addr, length, flags, nxt)
        for h in heads:
            ring.publish(h)
        while True:
            try:
                chain = q.pop()
            except VirtqueueError as e:
                assert str(e).startswith("test queue 0: ") and "\n" not in str(e)
                break
            if chain is None:
                break
            for gpa, n in chain.readable + chain.writable:
                assert 0 < n and memory.contains(gpa, n)
            assert chain.readable_len + chain.writable_len <= vc.MAX_CHAIN_BYTES
            assert len(chain.readable) + len(chain.writable) <= 8 + 4
            chain.write(b"\xee" * chain.writable_len)
            q.push_used(chain, chain.writable_len)
        assert memory.outside == []
