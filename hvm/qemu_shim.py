"""hvm-qemu: accepts the qemu-system-x86_64 command line kvm-unit-tests' runner uses and runs it with hvm,
so that upstream's `QEMU=hvm-qemu ./run_tests.sh` drives hvm. Flags with no meaning for hvm (display,
vnc, accel, reboot policy, PIT tick policy) are accepted and ignored; anything else it cannot honour
is an error, never silently dropped."""
from __future__ import annotations

import os
import sys

from hvm.cli import main as hvm_main
from hvm.cli import quiet_broken_pipe
from hvm.mmio import registry

VERSION = "QEMU emulator version 7.2.0 (hvm-qemu: hvm's QEMU command-line shim)"
DEVICES_HELP = """Misc devices:
name "isa-debug-exit", bus ISA
name "pc-testdev", bus ISA
name "pci-testdev", bus PCI
name "virtio-serial-device", bus virtio-bus
name "virtconsole", bus virtio-serial-bus
"""
IGNORED_WITH_VALUE = {"-vnc", "-display", "-global", "-name", "-boot", "-chardev", "-mon", "-monitor"}
IGNORED_FLAGS = {"-nodefaults", "-no-reboot", "--no-reboot", "-nographic", "-no-shutdown", "-S"}
# QEMU's accelerator names -> hvm's --accel; "kvm:tcg" (QEMU's fallback list) is hvm's auto.
ACCELS = {"kvm": "kvm", "tcg": "tcg", "kvm:tcg": "auto"}


class ShimError(Exception):
    pass


NET_DEVICES = ("virtio-net-device", "virtio-net")


def _options(text: str) -> tuple[str, dict[str, str]]:
    """'tap,id=n0,ifname=tap0' -> ('tap', {'id': 'n0', 'ifname': 'tap0'})."""
    head, _, rest = text.partition(",")
    opts = {}
    for o in rest.split(","):
        if o:
            k, _, v = o.partition("=")
            opts[k] = v
    return head, opts


def _netdev(kind: str, opts: dict[str, str], mac: str | None, what: str) -> str:
    """A QEMU tap backend's options -> hvm's --netdev value (hvm checks ifname, script=no and the rest)."""
    if kind != "tap":
        raise ShimError(f"{what} {kind}: hvm has tap networking only")
    parts = ["tap"] + [f"{k}={v}" for k, v in opts.items() if k != "id"]
    if mac is not None:
        parts.append(f"mac={mac}")
    return ",".join(parts)


def _translate_net(argv: list[str]) -> tuple[list[str], list[str]]:
    """-netdev tap,id=X,... with -device virtio-net-device,netdev=X[,mac=..], and -nic tap,...,model=...:
    each NIC as hvm's --netdev; returns (argv without them, the --netdev arguments)."""
    rest, netdevs, nics, out = [], {}, [], []
    i = 0
    while i < len(argv):
        a = argv[i][1:] if argv[i].startswith("--") else argv[i]
        if a in ("-netdev", "-nic") or (a == "-device" and i + 1 < len(argv)
                                         and argv[i + 1].split(",")[0] in NET_DEVICES):
            if i + 1 >= len(argv):
                raise ShimError(f"{argv[i]} needs a value")
            kind, opts = _options(argv[i + 1])
            if a == "-netdev":
                if not opts.get("id"):
                    raise ShimError("-netdev needs id=NAME (for -device virtio-net-device,netdev=NAME)")
                netdevs[opts["id"]] = (kind, opts)
            elif a == "-nic":
                model = opts.pop("model", None)
                if model not in NET_DEVICES:
                    raise ShimError(f"-nic model={model}: hvm's NIC is virtio-net-device (model=virtio-net-device)")
                mac = opts.pop("mac", None)
                nics.append(_netdev(kind, opts, mac, "-nic"))
            else:
                nics.append(opts)
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    used = set()
    for opts in nics:     # in command-line order: the NICs' order is their index (MAC, slot)
        if isinstance(opts, str):
            out += ["--netdev", opts]
            continue
        unknown = set(opts) - {"netdev", "mac", "id"}
        if unknown:
            raise ShimError(f"-device virtio-net-device: {sorted(unknown)[0]}: not an option hvm has (netdev, mac)")
        nd = opts.get("netdev")
        if nd is None:
            raise ShimError("-device virtio-net-device: needs netdev=ID (of a -netdev tap,id=ID,ifname=NAME)")
        if nd not in netdevs:
            raise ShimError(f"-device virtio-net-device: netdev={nd} names no -netdev id")
        used.add(nd)
        out += ["--netdev", _netdev(*netdevs[nd], opts.get("mac"), "-netdev")]
    for nd in netdevs:
        if nd not in used:
            raise ShimError(f"-netdev id={nd}: no -device virtio-net-device,netdev={nd} uses it")
    return rest, out


BLK_DEVICES = ("virtio-blk-device", "virtio-blk")
DRIVE_KEPT = ("file", "format", "readonly", "read-only", "serial")   # hvm's --drive checks their values


def _drive(opts: dict[str, str], what: str) -> str:
    parts = []
    for k, v in opts.items():
        if k in DRIVE_KEPT:
            parts.append(f"{k}={v}")
        elif k not in ("id", "if"):
            raise ShimError(f"{what}: {k}: not an option hvm has ({', '.join(DRIVE_KEPT)}, if, id)")
    return ",".join(parts)


def _translate_blk(argv: list[str]) -> tuple[list[str], list[str]]:
    """-drive file=..,if=virtio, and -drive id=X,file=..,if=none with -device virtio-blk-device,drive=X:
    each disk as hvm's --drive, in command-line order; returns (argv without them, the --drive arguments)."""
    rest, drives, disks, out = [], {}, [], []
    i = 0
    while i < len(argv):
        a = argv[i][1:] if argv[i].startswith("--") else argv[i]
        if a == "-drive" or (a == "-device" and i + 1 < len(argv) and argv[i + 1].split(",")[0] in BLK_DEVICES):
            if i + 1 >= len(argv):
                raise ShimError(f"{argv[i]} needs a value")
            if a == "-drive":
                opts = _options("," + argv[i + 1])[1]
                iface = opts.get("if")
                if iface == "virtio":
                    disks.append(_drive(opts, "-drive"))
                elif iface == "none":
                    if not opts.get("id"):
                        raise ShimError("-drive if=none needs id=NAME (for -device virtio-blk-device,drive=NAME)")
                    drives[opts["id"]] = opts
                else:
                    raise ShimError(f"-drive if={iface or 'ide (the default)'}: hvm's disks are virtio-blk "
                                    "(if=virtio, or if=none with -device virtio-blk-device,drive=ID)")
            else:
                disks.append(_options(argv[i + 1])[1])
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    used = set()
    for disk in disks:
        if isinstance(disk, str):
            out += ["--drive", disk]
            continue
        unknown = set(disk) - {"drive", "serial", "id"}
        if unknown:
            raise ShimError(f"-device virtio-blk-device: {sorted(unknown)[0]}: not an option hvm has (drive, serial)")
        d = disk.get("drive")
        if d is None:
            raise ShimError("-device virtio-blk-device: needs drive=ID (of a -drive id=ID,file=PATH,if=none)")
        if d not in drives:
            raise ShimError(f"-device virtio-blk-device: drive={d} names no -drive id")
        if d in used:
            raise ShimError(f"-device virtio-blk-device: drive={d} is used twice")
        used.add(d)
        opts = dict(drives[d])
        if "serial" in disk:
            opts["serial"] = disk["serial"]
        out += ["--drive", _drive(opts, "-drive")]
    for d in drives:
        if d not in used:
            raise ShimError(f"-drive id={d}: no -device virtio-blk-device,drive={d} uses it")
    return rest, out


def translate(argv: list[str]) -> list[str]:
    """QEMU arguments -> `hvm run` arguments."""
    argv, net_args = _translate_net(argv)
    argv, blk_args = _translate_blk(argv)
    # Quiet like QEMU: upstream's runner takes anything on stderr as a sign that QEMU failed.
    out = ["run", "--quiet", "--machine", "pc", "--serial", "none"]
    i = 0
    chardevs: dict[str, str] = {}          # -chardev id -> backend (stdio, null, ...)
    console_chardev: list[str] = []        # virtconsole's chardev=, resolved once every -chardev is read
    serial_bus = False

    def value() -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise ShimError(f"{argv[i]} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a not in IGNORED_FLAGS:
            a = a[1:]  # QEMU accepts -opt and --opt alike
        if a == "-kernel":
            out += ["--kernel", value()]
        elif a == "-append":
            out += ["--append", value()]
        elif a == "-initrd":
            out += ["--initrd", value()]
        elif a == "-smp":
            out += ["--vcpus", value().split(",")[0].replace("cpus=", "")]
        elif a == "-m":
            out += ["--memory", value().split(",")[0].replace("size=", "")]
        elif a == "-serial":
            v = value()
            out += ["--serial", {"stdio": "stdio", "none": "none", "null": "none"}.get(v, v)]
        elif a == "-device":
            v = value()
            name = v.split(",")[0]
            if name in ("virtio-serial-device", "virtio-serial"):
                serial_bus = True   # the bus a virtconsole sits on: hvm's virtio-console is both
            elif name == "virtconsole":
                if not serial_bus:
                    raise ShimError("-device virtconsole: no virtio-serial bus (give -device virtio-serial-device "
                                    "before it)")
                if "--device" in out and "virtio-console" in out:
                    raise ShimError("-device virtconsole: hvm's virtio-console has one port")
                for opt in v.split(",")[1:]:
                    key, _, val = opt.partition("=")
                    if key == "chardev":
                        console_chardev.append(val)
                    elif key not in ("id", "name", "nr"):
                        raise ShimError(f"-device virtconsole: {key}: property not supported by hvm")
                out += ["--device", "virtio-console"]
            elif name in ("intel-iommu", "edu", "amd-iommu", "virtio-iommu", "virtio-iommu-pci"):
                raise ShimError(f"-device {name}: not a device hvm has (hvm has no IOMMU and no 'edu' PCI device)")
            elif name == "isa-debug-exit" or registry.lookup(name) is not None:
                out += ["--device", v]     # the device registry: QEMU's names are its aliases
            else:
                raise ShimError(f"-device {name}: not a device hvm has")
        elif a in ("-machine", "-M"):
            for opt in value().split(","):
                if opt == "pit=off":
                    out.append("--no-pit")
                elif opt.startswith("accel="):
                    out += ["--accel", _accel(opt[6:], f"-machine {opt}")]
                elif opt in ("pc", "pit=on"):
                    continue
                elif opt.startswith("q35") or opt.startswith("pc-q35") or opt == "type=q35":
                    # q35 is another chipset (ICH9, PCIe, no ISA PIIX): the guest would be told a machine
                    # hvm does not have
                    raise ShimError(f"-machine {opt}: hvm emulates the i440FX-era 'pc' machine only, not q35")
                else:
                    raise ShimError(f"-machine {opt}: not supported by hvm")
        elif a == "-qmp":
            v = value()
            if not v.startswith("unix:"):
                raise ShimError(f"-qmp {v[:60]}: hvm's QMP listens on a UNIX socket (-qmp unix:PATH,server=on,wait=off)")
            out += ["--qmp", v]   # QEMU's syntax, also the older `unix:PATH,server,nowait`
        elif a == "-S":
            out.append("-S")     # frozen until a QMP `cont`
        elif a == "-cpu":
            out += ["--cpu", value()]   # checked against KVM and the backend before the kernel (check_cpu_arg)
        elif a == "-accel":
            name, *_props = value().split(",")    # properties (thread=, tb-size=, ...) tune QEMU's TCG: ignored
            out += ["--accel", _accel(name, f"-accel {name}")]
        elif a == "-enable-kvm":
            out += ["--accel", "kvm"]
        elif a == "-chardev":
            backend, *opts = value().split(",")
            for opt in opts:
                if opt.startswith("id="):
                    chardevs[opt[3:]] = backend
        elif a in IGNORED_WITH_VALUE:
            value()
        elif a in IGNORED_FLAGS:
            pass
        else:
            raise ShimError(f"{a}: option not supported by hvm-qemu")
        i += 1
    for ident in console_chardev:
        backend = chardevs.get(ident)
        if backend is None:
            raise ShimError(f"-device virtconsole: chardev {ident!r} not found (no -chardev ...,id={ident})")
        if backend == "stdio":
            out[out.index("--serial") + 1] = "stdio"   # the console's output (all console devices share it)
        elif backend != "null":
            raise ShimError(f"-chardev {backend}: hvm-qemu gives a virtconsole stdio or null only")
    return out + net_args + blk_args


def _accel(name: str, spelled: str) -> str:
    """QEMU's accelerator name as hvm's --accel value; ShimError for one hvm does not have (hvf, whpx, xen)."""
    accel = ACCELS.get(name)
    if accel is None:
        raise ShimError(f"{spelled[:80]}: invalid accelerator {name[:40]} (hvm has kvm and tcg)")
    return accel


def drop_tcg_cpu(args: list[str]) -> None:
    """`hvm run` flags for accel tcg: Unicorn's CPU is QEMU's qemu64 model, so `--cpu qemu64` is what tcg runs
    anyway (dropped); any other -cpu is refused (ShimError: upstream's runner makes it a SKIP)."""
    if "--cpu" in args and "--accel" in args and args[args.index("--accel") + 1] == "tcg":
        at = args.index("--cpu")
        if args[at + 1] != "qemu64":
            raise ShimError(f"-cpu {args[at + 1][:100]}: accel tcg runs Unicorn's qemu64 CPU only")
        del args[at:at + 2]


def check_cpu_arg(value: str) -> None:
    """The -cpu value refused now, as QEMU refuses a bad -cpu before it looks at the kernel: upstream's runner
    first runs the VMM with a kernel that does not exist and SKIPs the test if the error is anything else."""
    from hvm.cpu_model import CpuModelError, check_cpu, parse_cpu
    from hvm.host import detect, guest_default_flags
    from hvm.kvm import Kvm

    try:
        cpu = parse_cpu(value)
    except CpuModelError as e:
        raise ShimError(f"-cpu {value[:100]}: {e}") from None
    host = detect()
    try:
        with Kvm() as kvm:
            supported = kvm.supported_cpuid()
    except OSError as e:    # KvmError is one; no /dev/kvm: hvm run then says so in its own words
        raise ShimError(f"-cpu {value[:100]}: cannot ask KVM what it supports: {e}") from None
    try:
        check_cpu(cpu, supported, host.hidden_features, host.honours_clear, guest_default_flags(host))
    except CpuModelError as e:
        raise ShimError(f"-cpu {value[:100]}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-version"], ["-h"], ["--help"], ["-help"]):
        print(VERSION)
        if "version" not in argv[0]:
            print("usage: hvm-qemu [-kernel FILE] [-append ARGS] [-initrd FILE] [-smp N] [-m SIZE] "
                  "[-device pc-testdev|isa-debug-exit,...] [-device virtio-serial-device -device virtconsole[,chardev=ID]] "
                  "[-chardev stdio|null,id=ID] [-machine pit=off] [-serial stdio|none] "
                  "[-cpu host|max|qemu64|Opteron_G1[,vendor=V][,+feat][,-feat]] "
                  "[-qmp unix:PATH,server=on,wait=off] [-S]")
        return 0
    if len(argv) == 2 and argv[0] == "-device" and argv[1] in ("?", "help"):
        print(DEVICES_HELP, end="")
        for dt in registry.device_types().values():
            for name in (*dt.aliases, dt.name):
                if name not in DEVICES_HELP:
                    print(f'name "{name}", bus {"virtio-bus" if dt.virtio else "ISA"}, desc "{dt.help}"')
        return 0
    if len(argv) == 2 and argv[0] == "-cpu" and argv[1] in ("?", "help"):
        from hvm.cpu_model import FEATURES, MODELS

        print("Available CPUs:")
        for name in MODELS:
            print(f"x86 {name}")
        print("\nRecognized CPUID flags:\n  " + " ".join(sorted(FEATURES)))
        return 0
    if len(argv) == 2 and argv[0] in ("-machine", "-M") and argv[1] in ("?", "help"):
        print("Supported machines are:\npc                   Standard PC (hvm)")
        return 0
    try:
        args = translate(argv)
        drop_tcg_cpu(args)
        if "--cpu" in args:
            check_cpu_arg(args[args.index("--cpu") + 1])
        if "--kernel" in args:
            # Fail as QEMU does, in the words upstream's runner looks for.
            kernel = args[args.index("--kernel") + 1]
            try:
                # O_NONBLOCK: a FIFO must not hang the check (hvm then refuses it as not a regular file)
                os.close(os.open(kernel, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            except OSError as e:
                print(f"qemu-system-x86_64: could not load kernel '{kernel}': {e.strerror}", file=sys.stderr)
                return 1
        return hvm_main(args)
    except ShimError as e:
        print(f"hvm-qemu: {e}", file=sys.stderr)
        return 2


def entry_point() -> None:
    sys.exit(quiet_broken_pipe(main))


if __name__ == "__main__":
    entry_point()
