"""The C fast loop (hvm/vcpu/fastloop.py): exits to unclaimed addresses handled without Python, with the
same guest-visible behaviour, statistics and crash-report history as the all-Python loop.
Checked on the kvm_pvm host; nothing here depends on the backend."""
from __future__ import annotations

import time

import pytest

from conftest import FIRMWARE, Latch
from hvm import Machine
from hvm.config import FlatBoot, VmSpec
from hvm.console import Console
from hvm.kvm import constants as k
from hvm.vcpu import fastloop

pytestmark = pytest.mark.skipif(not fastloop.AVAILABLE, reason="the fast loop is not compiled (pip install -e .)")

# Real mode at 0x7c00: 20 OUTs of 20..1 to port 0x80 (nobody there), one IN from it, then
# `out 3` to the debug-exit port (status 7) and hlt.
PORT80_LOOP = bytes([
    0xBA, 0x80, 0x00,        # mov dx, 0x80
    0xB9, 0x14, 0x00,        # mov cx, 20
    0x88, 0xC8,              # l: mov al, cl
    0xEE,                    # out dx, al
    0xE2, 0xFB,              # loop l
    0xEC,                    # in al, dx
    0xBA, 0xF4, 0x00,        # mov dx, 0xf4
    0xB0, 0x03,              # mov al, 3
    0xEE,                    # out dx, al
    0xF4,                    # hlt
])

# Real mode: `out` to port 0x80 forever (bounded by the test's stop and the watchdog).
PORT80_FOREVER = bytes([0xBA, 0x80, 0x00, 0xEE, 0xEB, 0xFD])   # mov dx,0x80; l: out dx,al; jmp l


def spec_for(tmp_path, code: bytes, timeout: float = 10) -> VmSpec:
    image = tmp_path / "guest.bin"
    image.write_bytes(code)
    return VmSpec(name="fastloop", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  timeout=timeout, irqchip=False)


def run(spec: VmSpec, fast_loop: bool):
    with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop) as vm:
        result = vm.run()
        t = vm.threads[0]
        return result, vm.stats(), t.describe_last_exits(), (t.fast.handled() if t.fast else None)


def test_same_results_as_the_python_loop(tmp_path):
    spec = spec_for(tmp_path, PORT80_LOOP)
    fast = run(spec, fast_loop=True)
    slow = run(spec, fast_loop=False)
    for result, stats, _, _ in (fast, slow):
        assert (result.status, result.reason) == (7, "debug-exit")
        assert stats.by_reason == {"IO": 22}
        assert stats.unhandled_ports == {0x80: 21}
        assert stats.by_port == {0xF4: 1}
    assert fast[2] == slow[2]
    # the 16 newest exits, oldest first: OUTs of 14..1, the IN (all ones), the debug-exit write
    assert fast[2] == ([f"IO out port=0x0080 size=1 count=1 value={v:#x}" for v in range(14, 0, -1)]
                       + ["IO in port=0x0080 size=1 count=1 value=0xff",
                          "IO out port=0x00f4 size=1 count=1 value=0x3"])
    # Python saw the first access to port 0x80 (and logged it); C handled the other 19 OUTs and the IN.
    assert fast[3][k.EXIT_IO] == 20
    assert slow[3] is None


def test_unclaimed_mmio_is_handled_in_c(tmp_path):
    """bench_mmio: a protected-mode loop of 4-byte stores to 0xd0000000, then the debug-exit write."""
    from bench.exits import LOOPS, patch_image

    loop = next(lp for lp in LOOPS if lp.key == "exit.mmio")
    image = patch_image(loop, 500, tmp_path)
    spec = VmSpec(name="mmio", boot=FlatBoot(image, 0x100000, 0x100000, "protected"), memory=16 << 20,
                  timeout=10, irqchip=False)
    results = {}
    for fast_loop in (True, False):
        result, stats, last, handled = run(spec, fast_loop)
        assert result.reason == "debug-exit"
        assert stats.by_reason == {"MMIO": 500, "IO": 1}
        assert stats.unhandled_mmio == {0xD0000000: 500}
        results[fast_loop] = last
        if fast_loop:
            assert handled[k.EXIT_MMIO] == 499
    assert results[True] == results[False]
    assert results[True][0].startswith("MMIO write addr=0xd0000000 size=4 value=")


def test_stop_and_pause_reach_a_vcpu_looping_in_c(tmp_path):
    """A guest that only ever exits to an unclaimed port never returns to Python on its own: the kick
    (immediate_exit and a signal) must still pause and stop it."""
    with Machine(spec_for(tmp_path, PORT80_FOREVER, timeout=20), console=Console("none", "none")) as vm:
        vm.start()
        deadline = time.monotonic() + 10
        while vm.stats().unhandled_ports.get(0x80, 0) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.threads[0].fast.handled()[k.EXIT_IO] >= 999
        vm.pause()
        frozen = vm.stats().unhandled_ports[0x80]
        time.sleep(0.2)
        assert vm.stats().unhandled_ports[0x80] == frozen
        vm.resume()
        while vm.stats().unhandled_ports[0x80] == frozen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.stats().unhandled_ports[0x80] > frozen
        result = vm.stop()
        assert (result.status, result.reason) == (0, "stopped")
        assert not vm.threads[0].is_alive()


def test_watchdog_ends_a_vcpu_looping_in_c(tmp_path):
    with Machine(spec_for(tmp_path, PORT80_FOREVER, timeout=0.5), console=Console("none", "none")) as vm:
        result = vm.run()
        assert (result.status, result.reason) == (124, "timeout")
        assert vm.stats().by_reason["IO"] == vm.stats().unhandled_ports[0x80] > 100


def test_a_device_claiming_a_port_takes_it_back_from_c(tmp_path):
    """Routes follow the bus: once a device registers a port the fast loop had as unclaimed, its exits
    reach the device again."""
    with Machine(spec_for(tmp_path, PORT80_LOOP), console=Console("none", "none")) as vm:
        fast = vm.threads[0].fast
        vm.pio.write(0x80, 1, 0)           # a miss before start: the bus logs it and tells the fast loop
        assert fast.state.pio_unclaimed[0x80 >> 3] & 1
        latch = Latch()
        vm.pio.register(0x80, 1, latch)
        assert not fast.state.pio_unclaimed[0x80 >> 3] & 1
        result = vm.run()
        assert result.reason == "debug-exit"
        assert latch.writes == list(range(20, 0, -1))
        assert fast.handled()[k.EXIT_IO] == 0


def test_fast_loop_with_a_real_guest_matches(tmp_path):
    """mbtest (multiboot, machine pc): unclaimed MMIO and port accesses among device I/O."""
    from hvm.config import KernelBoot

    spec = VmSpec(name="mbtest", boot=KernelBoot(FIRMWARE / "mbtest.elf"), machine="pc", timeout=10)
    outs = []
    for fast_loop in (True, False):
        with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop) as vm:
            result = vm.run()
            outs.append((result.status, vm.console.text(), vm.stats().by_reason, vm.stats().unhandled_mmio,
                         vm.stats().unhandled_ports))
    assert outs[0] == outs[1]
    assert outs[0][0] == 1 and "exiting through port 0xf4" in outs[0][1]


def traced(spec: VmSpec, tmp_path, fast_loop: bool, rip: bool = False) -> list[dict]:
    import json

    from hvm.trace import TraceConfig

    path = tmp_path / f"trace-{fast_loop}-{rip}.jsonl"
    with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop,
                 trace=TraceConfig(path=path, rip=rip)) as vm:
        vm.run()
        assert vm.threads[0].fast is not None if fast_loop else vm.threads[0].fast is None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:   # times differ from run to run
        assert r.pop("t") >= 0 and r.pop("handle_ns") >= 0
    return records


@pytest.mark.parametrize("rip", [False, True])
def test_exits_recorded_in_c_match_the_python_recorder(tmp_path, rip):
    """mbtest's trace (device I/O, rep insb, unclaimed MMIO and ports) recorded by the fast loop in C
    is the one the Python loop records, record for record, RIP included."""
    from hvm.config import KernelBoot

    kernel = FIRMWARE / "mbtest.elf"
    spec = VmSpec(name="mbtest", boot=KernelBoot(kernel), machine="pc", timeout=10)
    in_c, in_python = traced(spec, tmp_path, True, rip), traced(spec, tmp_path, False, rip)
    # mbtest prints its multiboot command line, which starts with the kernel's path (as GRUB and QEMU
    # pass it): one UART exit per byte, so the count depends on where the tree is checked out.
    assert len(in_c) == 244 + len(str(kernel))
    assert in_c == in_python
    assert {"vcpu": 0, "reason": "MMIO", "addr": 0xD0000000, "size": 4, "dir": "read", "data": "ffffffff", "device": None} \
        in [{k_: v for k_, v in r.items() if k_ != "rip"} for r in in_c]
    if rip:
        assert all(0x200000 <= r["rip"] < 0x300000 for r in in_c)   # mbtest is linked at 2 MiB


def test_trace_buffer_flushes_keep_every_record_in_order(tmp_path, monkeypatch):
    """With a buffer of 4 records, the 22 exits of PORT80_LOOP take several flushes: none lost."""
    monkeypatch.setattr(fastloop, "TRACE_RECORDS", 4)
    spec = spec_for(tmp_path, PORT80_LOOP)
    in_c = traced(spec, tmp_path, True)
    assert in_c == traced(spec, tmp_path, False)
    assert [r["data"] for r in in_c] == [f"{v:02x}" for v in range(20, 0, -1)] + ["ff", "03"]


@pytest.mark.parametrize("vcpus, in_c", [(1, True), (2, False)])
def test_ring_trace_recorder(tmp_path, vcpus, in_c):
    """A ring over several vCPUs is recorded by the Python loop (records interleaved as they happen);
    with one vCPU the fast loop records it. Either way the ring holds the run's last exits."""
    import json

    from hvm.config import KernelBoot
    from hvm.trace import TraceConfig

    spec = VmSpec(name="ring", boot=KernelBoot(FIRMWARE / "mbtest.elf", (), "exit=5"), machine="pc",
                  memory=32 << 20, vcpus=vcpus, timeout=20)
    path = tmp_path / "ring.jsonl"
    with Machine(spec, console=Console("none", "none"), trace=TraceConfig(path=path, ring=2)) as vm:
        assert vm.run().status == 11
        assert [t.trace_in_c for t in vm.threads] == [in_c] * vcpus
    last = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["port"], r["data"]) for r in last] == [(0x3F8, "0a"), (0xF4, "05000000")]


class _Sink:
    name = "sink"

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_counts_stay_when_a_device_claims_an_address_later(tmp_path):
    """Accesses C counted at an unclaimed address stay counted once a device owns it (then under the
    device), as the bus keeps its own counts: the same figures as the all-Python loop."""
    from bench.exits import LOOPS, patch_image

    loop = next(lp for lp in LOOPS if lp.key == "exit.mmio")
    spec = VmSpec(name="mmio", boot=FlatBoot(patch_image(loop, 500, tmp_path), 0x100000, 0x100000, "protected"),
                  memory=16 << 20, timeout=10, irqchip=False)
    seen = []
    for fast_loop in (True, False):
        with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop) as vm:
            assert vm.run().reason == "debug-exit"
            vm.mmio.register(0xD0000000, 4, _Sink())
            stats = vm.stats()
            seen.append((stats.by_mmio, stats.unhandled_mmio, stats.by_device.get("sink")))
    assert seen[0] == seen[1] == ({0xD0000000: 500}, {}, 500)


def test_a_stale_miss_after_a_claim_does_not_unclaim(tmp_path):
    """A vCPU that fetched the miss handler before a device registered may report its first miss after
    the registration: the fast loop must keep sending that port to Python (to the device)."""
    with Machine(spec_for(tmp_path, PORT80_LOOP), console=Console("none", "none")) as vm:
        vm.pio.register(0x80, 1, _Sink())
        vm.pio._miss_write(0x80, 1, 0)   # the stale route's first miss, as it would arrive late
        assert not vm.threads[0].fast.state.pio_unclaimed[0x80 >> 3] & 1


def test_per_port_counts_are_64_bit(tmp_path):
    """`rep insb` counts every element: a 32-bit counter would wrap within a minute at this host's rate."""
    with Machine(spec_for(tmp_path, PORT80_LOOP), console=Console("none", "none")) as vm:
        fast = vm.threads[0].fast
        fast.port_unclaimed(0x1F0)
        fast.state.pio_hits[0x1F0] = (1 << 32) + 5
        assert vm.stats().unhandled_ports == {0x1F0: (1 << 32) + 5}
