"""Assembling a PC-like machine from a VmSpec (or a snapshot): KVM objects, guest memory, firmware tables
(ACPI, MP), the boot image, the buses and every device, IRQ routing, CPUID, the vCPUs.

This is Firecracker's builder.rs to hvm/machine.py's Vmm: the Machine calls build_pc() once from its
constructor and afterwards only runs the VM (start, pause, snapshot, reset, exit status). A system reset
uses write_tables(), bios_state() and load_boot() again.

Devices: the serial port and debug-exit are built in (they are the console and the exit status); every
other device comes from its declaration in the registry (hvm/mmio/registry.py) and is created here in the
order of spec.devices, virtio-mmio devices in 4 KiB slots from 0xd0000000 with their IRQs.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from hvm._types import TYPE_CHECKING, Callable
from hvm.boot import BootError, BootState, Module, bios, is_multiboot, load_flat, load_multiboot
from hvm.boot.acpi import ACPI_BASE, write_acpi_tables
from hvm.boot.bios import write_real_mode_ivt
from hvm.boot.mptable import write_mp_table
from hvm.config import FlatBoot, KernelBoot, VmSpec
from hvm.host import cpu_flags, denied_feature_msrs, guest_default_flags, guest_visible_cpuid, hide_features
from hvm.kvm import Kvm, KvmError, install_kick_handler
from hvm.memory import GuestMemory
from hvm.mmio import DebugExit, IrqLine, SerialUart
from hvm.mmio import registry
from hvm.mmio.acpi_pm import PM_BASE, PM_LEN, SCI_IRQ, AcpiPm
from hvm.mmio.fw_cfg import FW_CFG_PORT, FwCfg
from hvm.mmio.i8042 import I8042, I8042_CMD_PORT, I8042_DATA_PORT
from hvm.mmio.pci import ECAM_BASE, ECAM_SIZE, PCI_CONFIG_LEN, PCI_CONFIG_PORT, PciBus, PciEcam
from hvm.mmio.registry import DeviceConfig, DeviceContext, VirtioSlot
from hvm.mmio.rtc import RTC_IRQ, RTC_LEN, RTC_PORT, Rtc
from hvm.vcpu import VcpuThread, apply_boot_state, cpuid_for_vcpu

if TYPE_CHECKING:
    from hvm.machine import Machine

log = logging.getLogger(__name__)


def virtio_slots(spec: VmSpec) -> list[tuple[DeviceConfig, VirtioSlot]]:
    """The virtio-mmio slot of each virtio device of `spec`, in order: the same on every build of the same
    spec (a snapshot's devices are found again at the same addresses)."""
    slots = []
    for d in spec.devices:
        dt = registry.lookup(d.type)
        if dt is not None and dt.virtio:
            n = len(slots)
            slots.append((d, VirtioSlot(registry.VIRTIO_MMIO_BASE + n * registry.VIRTIO_MMIO_SLOT,
                                        registry.VIRTIO_IRQS[n])))
    return slots


def virtio_cmdline(spec: VmSpec) -> list[str]:
    """`virtio_mmio.device=4K@0xd0000000:5` for each virtio device (Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES),
    as Firecracker adds them; the DSDT describes the same devices for kernels without that option."""
    return [f"virtio_mmio.device={slot.size // 1024}K@{slot.base:#x}:{slot.irq}" for _, slot in virtio_slots(spec)]


def virtio_on_cmdline(spec: VmSpec) -> bool:
    """Whether load_boot() adds `virtio_mmio.device=` options: a Linux kernel (not multiboot) with
    `virtio_cmdline` on (the default) and virtio devices."""
    if not spec.virtio_cmdline or not isinstance(spec.boot, KernelBoot) or not virtio_slots(spec):
        return False
    return not is_multiboot(_read_head(spec.boot.kernel))


def resolve_accel(m: "Machine") -> str:
    """The accelerator `m` runs on: spec.accel, with "auto" made "kvm" when /dev/kvm opens and answers (the
    Kvm handle is kept in m.kvm for the build), else "tcg" with a one-line notice (QEMU's -accel kvm:tcg).
    A restore is KVM's (snapshots hold KVM state): "auto" is then "kvm" without a probe."""
    requested = m.spec.accel
    if requested == "kvm" or (requested == "auto" and m._snapshot is not None):
        return "kvm"
    if requested == "auto":
        try:
            m.kvm = Kvm()
            return "kvm"
        except KvmError as e:
            kvm_error = e
    # tcg (Unicorn's side of hvm, imported only here: a KVM VM never needs it)
    from hvm.vcpu.tcg import unavailable as tcg_unavailable

    if requested == "auto":
        if tcg_unavailable() is not None:
            raise kvm_error
        log.warning("KVM is not usable here (%s): running on tcg (binary translation, docs/tcg.md)", kvm_error)
    why = tcg_unavailable()
    if why is not None:
        raise BootError(f"accel tcg: {why}")
    if m._snapshot is not None:
        raise BootError("accel tcg: hvm restores snapshots on KVM only")
    return "tcg"


def build_pc(m: "Machine") -> None:
    """Build `m` from m.spec (or from m._snapshot): what Machine.__init__ used to do inline."""
    spec = m.spec
    m.accel = resolve_accel(m)
    if m.accel == "tcg":
        return build_tcg(m)
    install_kick_handler()
    if m.kvm is None:
        m.kvm = Kvm()
    m.vm = vm = m.kvm.create_vm()
    vm.set_identity_map_address()
    vm.set_tss_address()
    if m.host.disabled_quirks:
        disabled = vm.disable_quirks(m.host.disabled_quirks)
        log.debug("KVM quirks disabled: %#x of %#x", disabled, m.host.disabled_quirks)
    if spec.irqchip:
        vm.create_irqchip()
        if spec.pit:
            vm.create_pit2()
    snap = m._snapshot
    if snap is None:
        m.memory = mem = GuestMemory(spec.memory)
    else:   # restore: RAM mapped copy-on-write from the snapshot, checked before anything runs
        m.memory = mem = m._restore_memory(snap)
    for slot, region in enumerate(mem.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
    if spec.irqchip:
        m._reset_vm_state = m._save_vm_state()

    if snap is not None:
        m._restore_vm_state(snap)
    else:
        write_tables(m, mem)
        m.boot_state = load_boot(m, mem)
        log.info("%s", m.boot_state.description)

    irq_setter = vm.set_irq_line if spec.irqchip else None
    build_devices(m, mem, irq_setter)

    hidden = m.host.hidden_features + (m.host.smp_hidden_features if spec.vcpus > 1 else [])
    raw_cpuid = m.kvm.supported_cpuid()
    supported = hide_features(raw_cpuid, hidden)
    if spec.cpu is not None:    # (hvm/cpu_model.py is imported only for a VM that names a CPU model)
        from hvm.cpu_model import CpuModelError, apply_cpu_model, check_cpu

        try:
            check_cpu(spec.cpu, raw_cpuid, hidden, m.host.honours_clear, guest_default_flags(m.host))
        except CpuModelError as e:
            raise BootError(f"cpu {spec.cpu}: {e}") from None
        supported = apply_cpu_model(supported, spec.cpu)
    # The guest's CPUID: instructions hvm completes (hvm/vcpu/complete.py) read its feature bits here (with
    # the host's bits this backend shows the guest although hvm hid them: the guest's view is what counts).
    m.cpuid = guest_visible_cpuid(supported, hidden, m.host.hiding_ignored & cpu_flags(), raw_cpuid) \
        if m.host.hiding_ignored else supported
    for index in range(spec.vcpus):
        vcpu = vm.create_vcpu(index)
        m.vcpus.append(vcpu)
        vcpu.set_cpuid2(cpuid_for_vcpu(supported, index))
        m._reset_vcpu_states.append(m._save_vcpu_state(vcpu))
        if index == 0 and snap is None:
            apply_boot_state(vcpu, m.boot_state)
        # Other vCPUs stay in their reset state: with the in-kernel LAPIC they wait for INIT/SIPI.
    if m.host.filter_feature_msrs:
        denied = denied_feature_msrs(supported)
        if denied:
            vm.deny_msrs(denied)
            log.debug("MSRs denied (no CPUID feature for them): %s", ", ".join(f"{b:#x}" for b, _ in denied))
    if snap is not None:
        m._restore_vcpus_and_devices(snap)
    m.threads = [VcpuThread(v, m, complete_emulation=m.adapt_to_host, fast_loop=m.fast_loop) for v in m.vcpus]


def build_devices(m: "Machine", mem: GuestMemory, irq_setter: Callable[[int, int], None] | None) -> None:
    """The buses' devices, the same under either accelerator: the built-in serial port and debug-exit, the
    PC's devices (machine: pc), then every registry device of the spec."""
    spec = m.spec
    snap = m._snapshot
    if spec.serial is not None:
        m.uart = SerialUart(m.console.write, IrqLine(spec.serial.irq, irq_setter), name="com1")
        m.pio.register(spec.serial.port, 8, m.uart)
    if spec.debug_exit is not None:
        m.pio.register(spec.debug_exit.port, spec.debug_exit.size, DebugExit(m._debug_exit))
    if spec.machine == "pc":
        if snap is None:
            bios_state(m, mem)
        m.pio.register(FW_CFG_PORT, 2, FwCfg.for_machine(spec.memory, spec.vcpus))
        m.acpi_pm = AcpiPm(m._acpi_poweroff, sci=IrqLine(SCI_IRQ, irq_setter), on_suspend=m._acpi_suspend)
        m.pio.register(PM_BASE, PM_LEN, m.acpi_pm)
        m.rtc = Rtc(irq=IrqLine(RTC_IRQ, irq_setter))
        m.rtc.on_alarm = lambda: m.wakeup("rtc")    # the alarm wakes a machine suspended to RAM (ACPI S3)
        m.pio.register(RTC_PORT, RTC_LEN, m.rtc)
        m.device_closers.append(m.rtc.close)    # its timer thread (made when the guest enables an interrupt)
        kbc = I8042(m._cpu_reset)
        m.pio.register(I8042_DATA_PORT, 1, kbc.port(I8042_DATA_PORT))
        m.pio.register(I8042_CMD_PORT, 1, kbc.port(I8042_CMD_PORT))
        # PCI bus 0 with the host bridge, as on QEMU's pc machine (hvm/mmio/pci.py)
        m.pci = PciBus(m.pio, m.mmio, [(r.gpa, r.size) for r in mem.regions])
        m.pio.register(PCI_CONFIG_PORT, PCI_CONFIG_LEN, m.pci)
        m.mmio.register(ECAM_BASE, ECAM_SIZE, PciEcam(m.pci))
    create_devices(m, irq_setter)
    if m.pci is not None:
        try:   # the firmware's part: every device is on the bus now
            m.pci.assign_bars()
        except ValueError as e:
            raise BootError(str(e)) from None


def build_tcg(m: "Machine") -> None:
    """The machine on the binary-translation accelerator (hvm/vcpu/tcg.py): the same memory, tables, boot
    image and devices, one Unicorn vCPU instead of KVM's, and no interrupt controller (Unicorn has none to
    deliver an IRQ through), so device IRQ lines go nowhere."""
    from hvm.vcpu.tcg import TcgVcpuThread

    spec = m.spec
    m.memory = mem = GuestMemory(spec.memory)
    write_tables(m, mem)
    m.boot_state = load_boot(m, mem)
    log.info("%s", m.boot_state.description)
    if spec.machine == "pc" and spec.irqchip:
        log.info("accel tcg: no interrupt controller or PIT (device interrupts are not delivered)")
    build_devices(m, mem, None)
    if spec.machine == "pc":
        # Unicorn has no local APIC: its register page without the interrupt logic (what KVM's in-kernel
        # LAPIC answers at the same address), so that guests which set their APIC up run on.
        from hvm.mmio.apic_regs import APIC_BASE, APIC_SIZE, ApicRegisters

        m.mmio.register(APIC_BASE, APIC_SIZE, ApicRegisters())
    m.threads = [TcgVcpuThread(0, m, mem, m.boot_state)]


def create_devices(m: "Machine", irq_setter: Callable[[int, int], None] | None) -> None:
    """Every registry device of the spec, in order, through its type's create()."""
    slots = {id(d): slot for d, slot in virtio_slots(m.spec)}

    def set_console_input(feed: Callable[[bytes], None], pending: Callable[[], int],
                          release: Callable[[], None] | None = None) -> None:
        m.console_input = (feed, pending, release)

    def ioevent(addr: int, length: int, datamatch: int | None, callback: Callable[[], None]) -> bool:
        if m.vm is None:
            return False
        if m.ioevents is None:
            from hvm.ioevents import IoEvents

            m.ioevents = IoEvents(m.vm, on_error=lambda e: m.device_fault(None, e))
        m.ioevents.add(addr, length, datamatch, callback)
        return True

    for d in m.spec.devices:
        dt = registry.lookup(d.type)
        if dt is None:    # parse_spec and the snapshot codec only let registered types through
            raise BootError(f"device {d.type!r} is not a device hvm has")
        ctx = DeviceContext(name=d.name, index=d.index, memory=m.memory, console=m.console, pio=m.pio,
                            mmio=m.mmio, slot=slots.get(id(d)), irq_line=lambda irq: IrqLine(irq, irq_setter),
                            on_close=m.device_closers.append, set_console_input=set_console_input,
                            irq_setter=irq_setter, ioevent=ioevent, machine=m, pci=m.pci)
        device = dt.create(ctx, d.values)
        m.devices[d.name] = device


def write_tables(m: "Machine", mem: GuestMemory) -> None:
    """ACPI and MP tables of a PC: the CPUs, the interrupt routing, and the virtio-mmio devices."""
    spec = m.spec
    if spec.machine != "pc":
        return
    slots = [slot for _, slot in virtio_slots(spec)]
    # A device described both on the command line and in the DSDT is probed twice by Linux (the second
    # probe fails with -EBUSY on the same MMIO range), so the DSDT describes the slots only when the
    # command line does not: as QEMU's microvm (command line only with -no-acpi) and Firecracker (DSDT
    # instead of the command line). `virtio_cmdline: false` makes the DSDT the only description.
    in_dsdt = [] if virtio_on_cmdline(spec) else slots
    write_acpi_tables(mem, spec.vcpus, PM_BASE, virtio_slots=[(s.base, s.size, s.irq) for s in in_dsdt],
                      level_irqs=[s.irq for s in slots], pci_host=True)
    # the same CPUs and interrupts for guests without ACPI
    write_mp_table(mem, spec.vcpus, level_irqs=[s.irq for s in slots])


def bios_state(m: "Machine", mem: GuestMemory) -> None:
    """Leave the machine as a PC BIOS would before jumping to a kernel (see hvm/boot/bios.py)."""
    write_real_mode_ivt(mem)
    bios_chipset_state(m)


def bios_chipset_state(m: "Machine") -> None:
    """The PICs (vector bases, masks) and PIT channel 0 as a PC BIOS leaves them: what its S3 resume path
    programs again too (SeaBIOS's s3_resume: pic_setup) before jumping to the waking vector; guest RAM (the
    IVT included) is left alone."""
    if not m.spec.irqchip or m.vm is None:     # (accel tcg: no irqchip to program)
        return
    for chip, base, imr in ((0, bios.PIC_MASTER_BASE, bios.PIC_MASTER_IMR),
                            (1, bios.PIC_SLAVE_BASE, bios.PIC_SLAVE_IMR)):
        state = m.vm.get_pic(chip)
        pic = state.chip.pic
        pic.irq_base = base
        pic.imr = imr
        pic.init4 = 1
        pic.init_state = 0
        m.vm.set_pic(state)
    if m.spec.pit:
        pit = m.vm.get_pit2()
        ch0 = pit.channels[0]
        ch0.count = bios.PIT_BIOS_COUNT
        ch0.mode = bios.PIT_MODE_RATE_GENERATOR
        ch0.rw_mode = 3       # low byte then high byte
        ch0.read_state = 3
        ch0.write_state = 3
        ch0.gate = 1
        m.vm.set_pit2(pit)


def load_boot(m: "Machine", mem: GuestMemory) -> BootState:
    """Load the spec's boot image into `mem`; the vCPU state to start it with."""
    spec = m.spec
    boot = spec.boot
    if isinstance(boot, FlatBoot):
        state = load_flat(mem, boot.image, boot.load, boot.entry, boot.mode)
        state.regs.update(dict(boot.regs))
        return state
    assert isinstance(boot, KernelBoot)
    head = _read_head(boot.kernel)
    # The order QEMU's -kernel uses: a multiboot header wins, then a Linux setup header, then ELF.
    if is_multiboot(head):
        modules = tuple(Module(p) for p in boot.initrd)
        return load_multiboot(mem, boot.kernel, boot.cmdline, modules)
    from hvm.boot.linux import kernel_kind, load_linux  # not needed by flat images and multiboot kernels

    kind = kernel_kind(head)
    if kind == "elf" and not (len(head) > 4 and head[4] == 2):
        raise BootError(f"{boot.kernel}: a 32-bit ELF file without a multiboot header (hvm boots multiboot "
                        "ELF kernels and 64-bit vmlinux; use boot.image for a flat binary)")
    if kind is None:
        raise BootError(f"{boot.kernel}: not a kernel hvm can boot (no multiboot header, not ELF, "
                        "not a bzImage)")
    if len(boot.initrd) > 1:
        raise BootError(f"{boot.kernel}: a Linux kernel takes one initrd, not {len(boot.initrd)}")
    cmdline = boot.cmdline
    words = cmdline.split()
    if spec.virtio_cmdline:
        # Devices the user described on the command line already are not described twice.
        cmdline = " ".join([cmdline, *(o for o in virtio_cmdline(spec) if o not in words)]).strip()
    missing = []
    if m.host.linux_cmdline:
        missing = [o for o in m.host.linux_cmdline if o.split("=")[0] + "=" not in cmdline
                   and o not in cmdline.split()]
        if missing:
            cmdline = (cmdline + " " + " ".join(missing)).strip()
    m.is_linux = True
    state = load_linux(mem, boot.kernel, cmdline, boot.initrd[0] if boot.initrd else None,
                       acpi_rsdp=ACPI_BASE if spec.machine == "pc" else 0)
    if missing:   # said once the kernel loaded: a refused kernel gets its one line and nothing else
        log.warning("%s host: added to the kernel command line: %s", m.host.backend, " ".join(missing))
    return state


def _read_head(path: Path, n: int = 16384) -> bytes:
    """The first `n` bytes of a kernel. The config checked it is a regular file; O_NONBLOCK and the fstat
    keep a path swapped for a FIFO since then from hanging the open or the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise BootError(f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BootError(f"{path}: not a regular file")
        return os.pread(fd, n, 0)
    except OSError as e:
        raise BootError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
