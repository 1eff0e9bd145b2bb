"""hvm-qemu: accepts the qemu-system-x86_64 command line kvm-unit-tests' runner uses and runs it with hvm,
so that upstream's `QEMU=hvm-qemu ./run_tests.sh` drives hvm. Flags with no meaning for hvm (display,
vnc, accel, reboot policy, PIT tick policy) are accepted and ignored; anything else it cannot honour
is an error, never silently dropped."""
from __future__ import annotations

import os
import sys

from hvm.cli import main as hvm_main
from hvm.mmio import registry

VERSION = "QEMU emulator version 7.2.0 (hvm-qemu: hvm's QEMU command-line shim)"
DEVICES_HELP = """Misc devices:
name "isa-debug-exit", bus ISA
name "pc-testdev", bus ISA
name "pci-testdev", bus PCI
name "virtio-serial-device", bus virtio-bus
name "virtconsole", bus virtio-serial-bus
"""
IGNORED_WITH_VALUE = {"-vnc", "-display", "-global", "-name", "-boot", "-chardev", "-mon", "-monitor", "-accel"}
IGNORED_FLAGS = {"-nodefaults", "-no-reboot", "--no-reboot", "-nographic", "-enable-kvm", "-no-shutdown", "-S"}


class ShimError(Exception):
    pass


def translate(argv: list[str]) -> list[str]:
    """QEMU arguments -> `hvm run` arguments."""
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
            if name == "pci-testdev":
                pass  # not emulated: guests find no PCI device and skip what needs it
            elif name in ("virtio-serial-device", "virtio-serial"):
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
            elif name == "isa-debug-exit" or registry.lookup(name) is not None:
                out += ["--device", v]     # the device registry: QEMU's names are its aliases
            else:
                raise ShimError(f"-device {name}: not a device hvm has")
        elif a in ("-machine", "-M"):
            for opt in value().split(","):
                if opt == "pit=off":
                    out.append("--no-pit")
                elif opt in ("pc", "q35", "accel=kvm", "pit=on") or opt.startswith("accel="):
                    continue
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
            value()  # hvm always gives the guest the host's supported CPUID
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
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-version"], ["-h"], ["--help"], ["-help"]):
        print(VERSION)
        if "version" not in argv[0]:
            print("usage: hvm-qemu [-kernel FILE] [-append ARGS] [-initrd FILE] [-smp N] [-m SIZE] "
                  "[-device pc-testdev|isa-debug-exit,...] [-device virtio-serial-device -device virtconsole[,chardev=ID]] "
                  "[-chardev stdio|null,id=ID] [-machine pit=off] [-serial stdio|none] "
                  "[-qmp unix:PATH,server=on,wait=off] [-S]")
        return 0
    if len(argv) == 2 and argv[0] == "-device" and argv[1] in ("?", "help"):
        print(DEVICES_HELP, end="")
        for dt in registry.device_types().values():
            for name in (*dt.aliases, dt.name):
                if name not in DEVICES_HELP:
                    print(f'name "{name}", bus {"virtio-bus" if dt.virtio else "ISA"}, desc "{dt.help}"')
        return 0
    if len(argv) == 2 and argv[0] in ("-machine", "-M") and argv[1] in ("?", "help"):
        print("Supported machines are:\npc                   Standard PC (hvm)")
        return 0
    try:
        args = translate(argv)
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
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
