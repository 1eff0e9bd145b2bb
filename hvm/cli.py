"""hvm command line: `hvm run CONFIG.yaml [flags]` and friends. Flags override the YAML file,
QEMU-style (--kernel, --append, --initrd, --memory, --vcpus, --timeout, --serial)."""
from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from hvm._types import Callable
from hvm.boot import BootError
from hvm.config import ConfigError, load_yaml, merge, parse_spec
from hvm.files import HostFileError
from hvm.kvm import KvmError
from hvm.machine import EXIT_CONFIG, EXIT_HOST, EXIT_INTERNAL, Machine
from hvm.mmio import BusError

log = logging.getLogger("hvm")


class UsageError(Exception):
    """A command line argparse cannot parse; str() is the one line to print (status 2)."""


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns, the same way (COLUMNS, then stdout's terminal, else 80), without
    importing shutil: argparse's formatter would, and with it zlib, bz2 and lzma (~2 ms of every start)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is an exception (one line, status 2, from main) instead of the
    usage text and sys.exit: so bad flags read like every other input error, and tests parse in-process."""

    def __init__(self, *args, formatter_class=_Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        message = " ".join(message.split())
        if len(message) > 300:
            message = message[:300] + "..."
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _add_vm_flags(p) -> None:
    """The flags that describe the VM (merged over the YAML by spec_from_args): `hvm run`'s, and
    `hvm compare`'s, which runs one VM under both accelerators."""
    p.add_argument("--kernel", help="kernel to boot: a multiboot ELF, a Linux bzImage or a 64-bit vmlinux "
                   "(replaces the config's boot section)")
    p.add_argument("--append", help="kernel command line")
    p.add_argument("--initrd", action="append", help="Linux initrd, or a multiboot module (repeatable)")
    p.add_argument("-m", "--memory", help="guest RAM, e.g. 256M, 1G (default 128M)")
    p.add_argument("--vcpus", "--smp", type=int, help="number of vCPUs")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="watchdog: stop the guest after SECONDS, up to 1000000 (exit status 124)")
    p.add_argument("--serial", help="serial console output: stdio, none or file:PATH")
    p.add_argument("--machine", choices=("pc", "none"), help="pc: irqchip, PIT, ACPI, fw_cfg; none: bare")
    p.add_argument("--device", action="append", default=[], metavar="NAME[,OPTS]",
                   help="add a device: isa-debug-exit[,iobase=0xf4,iosize=4], or any device of the registry "
                        "by name with prop=value options (`--device help` lists them with their properties)")
    p.add_argument("--netdev", action="append", default=[], metavar="tap,ifname=NAME[,mac=MAC]",
                   help="add a virtio-net NIC on the existing host tap device NAME (repeatable; QEMU's id=, "
                        "script=no, downscript=no accepted and ignored)")
    p.add_argument("--drive", action="append", default=[], metavar="file=PATH[,format=raw][,readonly=on]",
                   help="add a virtio-blk disk on a raw image file (repeatable: vda, vdb, ...; QEMU's if=virtio, "
                        "id=, serial= accepted)")
    p.add_argument("--no-pit", action="store_true", help="no in-kernel PIT (QEMU's -machine pit=off)")
    p.add_argument("--cpu", metavar="MODEL[,vendor=V][,+feat][,-feat]",
                   help="CPU model as QEMU's -cpu: host, max, qemu64, Opteron_G1 (docs/config.md)")


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="boot a VM described by a YAML file and/or flags",
                       description="Boot a VM. Flags override the YAML file's fields.")
    p.add_argument("config", nargs="?", type=Path, help="YAML VM description (see docs/config.md)")
    _add_vm_flags(p)
    p.add_argument("--accel", choices=("kvm", "tcg", "auto"),
                   help="how the CPU runs, as QEMU's -accel: kvm (hardware assist), tcg (binary translation by "
                        "Unicorn: one vCPU, no interrupts; docs/tcg.md), auto (kvm when /dev/kvm works, else tcg; "
                        "the default)")
    p.add_argument("--script", type=Path, metavar="FILE",
                   help="run the script: steps in FILE (a YAML list) against the serial console, replacing the "
                        "config's (a failing step: exit status 8)")
    p.add_argument("--stats", action="store_true", help="print exit counters when the VM ends")
    p.add_argument("--trace", type=Path, metavar="FILE", help="record every VM exit as JSON lines in FILE")
    p.add_argument("--trace-filter", metavar="EXPR", help="only exits matching e.g. 'reason=io,port=0x3f8'")
    p.add_argument("--trace-ring", type=int, metavar="N", help="keep only the last N exits; write them at the end")
    p.add_argument("--trace-rip", action="store_true", help="record RIP per exit (one KVM_GET_REGS each)")
    p.add_argument("--incoming", metavar="file:PATH",
                   help="restore the VM saved in PATH (QMP migrate or Machine.snapshot) and run it on; "
                        "no config needed (--serial, --timeout, --trace, --stats, --script, --qmp may be given)")
    p.add_argument("--qmp", metavar="unix:PATH[,server=on][,wait=off]",
                   help="listen for QMP clients (QEMU Machine Protocol) on a UNIX socket; wait=on: boot once "
                        "a first client connected")
    p.add_argument("-S", dest="frozen", action="store_true",
                   help="as QEMU's -S: start with the vCPUs stopped before their first instruction; QMP `cont` "
                        "(or a script's resume step) starts them (needs --qmp or a script)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="log only errors (no unhandled-access warnings)")


def _add_ctl_parser(sub) -> None:
    p = sub.add_parser("ctl", help="send one QMP command to a running VM's socket (hvm run --qmp)",
                       description="Connect to a QMP socket, send COMMAND and print its return value as JSON. "
                                   "Status 0; 1 on a QMP error (its message on stderr); 2 when the socket "
                                   "or the arguments are unusable.")
    p.add_argument("socket", help="the socket path given to --qmp")
    p.add_argument("qmp_command", metavar="COMMAND", help="e.g. query-status, stop, cont, quit")
    p.add_argument("arguments", metavar="JSON-ARGS", nargs="?", help="the arguments, a JSON object")


def _kut_timeout(text: str) -> float:
    """`hvm kut --timeout`: finite, positive and at most a day (inf or nan would disarm the watchdog)."""
    from hvm.kut import MAX_TIMEOUT

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, {MAX_TIMEOUT:g}] seconds")
    return value


def _add_kut_parser(sub) -> None:
    p = sub.add_parser("kut", help="run kvm-unit-tests guests as upstream's runner runs them under QEMU",
                       description="Run the entries of DIR/unittests.cfg whose binaries are in DIR; or, when "
                       "DIR is a built upstream kvm-unit-tests tree (run_tests.sh, x86/unittests.cfg), run upstream's "
                       "own run_tests.sh on a copy of it with QEMU=hvm-qemu. Either way QEMU's results on this host "
                       "(DIR/RESULTS-QEMU.md) are printed beside hvm's.")
    p.add_argument("directory", type=Path, help="folder with unittests.cfg and the *.flat binaries, or an upstream "
                   "tree")
    # default=[]: without it argparse calls a '*' positional required in its error message
    p.add_argument("names", nargs="*", default=[], help="only these entries (default: all)")
    p.add_argument("-g", "--group", action="append", help="only entries in this group")
    p.add_argument("--timeout", type=_kut_timeout, metavar="SECONDS",
                   help="override every entry's timeout (seconds)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="print the output of failing entries")
    p.add_argument("--logs", type=Path, metavar="DIR", help="upstream tree: keep the runner's logs/ in DIR")
    p.add_argument("--accel", choices=("kvm", "tcg"), default="kvm",
                   help="run the guests on KVM (default) or on tcg, binary translation (upstream's ACCEL)")


def _add_trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="read a trace written by `hvm run --trace FILE`")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    s = tsub.add_parser("summary", help="counts, shares and handling times by reason, port, MMIO, device")
    s.add_argument("file", type=Path)
    pf = tsub.add_parser("perfetto", help="Chrome trace-event JSON for Perfetto / chrome://tracing")
    pf.add_argument("file", type=Path)
    pf.add_argument("-o", "--output", type=Path, required=True)
    pl = tsub.add_parser("plot", help="PNG: exit rate over time by reason, handling-time histogram")
    pl.add_argument("file", type=Path)
    pl.add_argument("-o", "--output", type=Path, required=True)


def _add_doctor_parser(sub) -> None:
    d = sub.add_parser("doctor", help="measure what this host's KVM can do (about a second)")
    d.add_argument("--json", action="store_true", help="also print the results as JSON")


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="run one guest under kvm and under tcg and show what differs",
                       description="Run the VM (config and/or the flags of `hvm run`) under accel kvm, then under "
                       "accel tcg, consoles captured, exits traced, and print side by side: serial output, exit "
                       "status, exits by reason and port/address, run time, instructions per second. Status 0: "
                       "serial output and exit status identical; 1: they differ; 2: bad input (docs/tcg.md).")
    p.add_argument("config", nargs="?", type=Path, help="YAML VM description (see docs/config.md)")
    _add_vm_flags(p)
    p.add_argument("--script", type=Path, metavar="FILE",
                   help="run the script: steps in FILE against each run's console, replacing the config's")
    p.add_argument("--trace", type=Path, metavar="PREFIX",
                   help="keep both exit traces: PREFIX.kvm.jsonl and PREFIX.tcg.jsonl (hvm's trace format)")
    p.add_argument("--diff-exits", "--exits", action="store_true",
                   help="also print the first difference of the two exit sequences, with context")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (for scripts)")
    p.add_argument("--no-count", action="store_true",
                   help="skip the third, untimed tcg run that counts instructions (instructions/s: n/a)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="log only errors (no unhandled-access warnings)")
    p.set_defaults(accel=None)     # compare sets the accelerator of each run


SUBPARSERS = {"run": _add_run_parser, "kut": _add_kut_parser, "trace": _add_trace_parser,
              "doctor": _add_doctor_parser, "ctl": _add_ctl_parser, "compare": _add_compare_parser}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only` just that subcommand under the main parser: argparse looks
    up message translations for every parser it builds (~1 ms each, 8 in all), and a run needs two.
    Usage lines and errors read the same either way."""
    parser = _Parser(prog="hvm", description="A small virtual machine monitor on Linux KVM.")
    # A partial parser still names every subcommand in its usage line (the full one does by default).
    metavar = None if only is None else "{" + ",".join(SUBPARSERS) + "}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=metavar)
    for name, add in SUBPARSERS.items():
        if only is None or name == only:
            add(sub)
    return parser


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from hvm.doctor import PROBE_IMAGE, diagnose

    if not PROBE_IMAGE.is_file():
        print(f"hvm: {PROBE_IMAGE} is missing: run `make firmware`", file=sys.stderr)
        return EXIT_CONFIG
    try:
        results = diagnose()
    except KvmError as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_HOST
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


# isa-debug-exit is built in (it is the exit status, on by default); every other --device NAME comes from the
# device registry (hvm/mmio/registry.py): its name or QEMU's alias, its properties or QEMU's option names.
DEBUG_EXIT_FLAG = ("isa-debug-exit", {"iobase": "port", "iosize": "size"}, {"iobase": "0xf4", "iosize": "4"})


def _device_overrides(devices: list[str], origins: dict[str, str]) -> dict:
    """--device flags (QEMU's -device syntax) -> the YAML devices mapping; each field set is recorded in
    `origins` with the flag and option it came from, for error messages. A repeated --device of a type that
    allows several instances adds one; of any other type, the last one wins (as a YAML key would)."""
    from hvm.mmio import registry

    out: dict = {}
    for spec in devices:
        name, _, opts = spec.partition(",")
        options: dict[str, str] = {}
        for o in opts.split(","):
            if not o:
                continue
            option, eq, value = o.partition("=")
            if not eq:
                raise ConfigError("command line", "--device", f"{name[:60]}: {o[:60]!r} is not option=value",
                                  flag="--device")
            options[option] = value
        if name == DEBUG_EXIT_FLAG[0]:
            fields = DEBUG_EXIT_FLAG[1]
            for option in options:
                if option not in fields:
                    raise ConfigError("command line", "--device", f"{name}: {option[:60]!r} is not an option of "
                                      f"{name} (options: iobase, iosize)", flag="--device")
            merged = dict(DEBUG_EXIT_FLAG[2], **options)
            out["debug_exit"] = {fields[o]: v for o, v in merged.items()}
            for o in fields:
                origins[f"devices.debug_exit.{fields[o]}"] = f"--device {name}: {o}"
            continue
        dt = registry.lookup(name)
        if dt is None:
            raise ConfigError("command line", "--device", f"{name[:60]!r} is not a device hvm has "
                              f"(isa-debug-exit, {registry.names_help()}; --device help lists them)", flag="--device")
        props: dict = {}
        spelled: dict[str, str] = {}
        for option, value in options.items():
            prop = dt.prop(option)
            if prop is None:
                allowed = ", ".join(p.name for p in dt.props) or "none"
                raise ConfigError("command line", "--device", f"{name}: {option[:60]!r} is not an option of "
                                  f"{name} (options: {allowed})", flag="--device")
            props[prop.name] = _flag_path(value) if prop.kind == "path" else value
            spelled[prop.name] = option
        if dt.multiple:
            entries = out.setdefault(dt.name, [])
            path = f"devices.{dt.name}[{len(entries)}]"
            entries.append(props)
        else:
            path = f"devices.{dt.name}"
            out[dt.name] = props or True
        origins[path] = f"--device {name}"
        for p in props:
            origins[f"{path}.{p}"] = f"--device {name}: {spelled[p]}"
    return out


NETDEV_IGNORED = {"id": None, "script": "no", "downscript": "no"}   # QEMU's options: the value hvm accepts


def netdev_entries(specs: list[str], flag: str = "--netdev") -> list[dict]:
    """--netdev tap,ifname=NAME[,mac=MAC] (QEMU's -netdev tap spelling) -> devices.virtio-net entries
    ({"tap": NAME[, "mac": MAC]}); the values are checked where the YAML's are (the device's declaration)."""
    out = []
    for spec in specs:
        kind, _, opts = spec.partition(",")
        if kind != "tap":
            raise ConfigError("command line", flag, f"{kind[:60]!r}: hvm has tap networking only "
                              "(tap,ifname=NAME[,mac=MAC])", flag=flag)
        entry: dict = {}
        for o in opts.split(","):
            if not o:
                continue
            option, eq, value = o.partition("=")
            if not eq:
                raise ConfigError("command line", flag, f"{o[:60]!r} is not OPTION=VALUE", flag=flag)
            if option in ("ifname", "mac"):
                entry["tap" if option == "ifname" else "mac"] = value
            elif option in NETDEV_IGNORED:
                wanted = NETDEV_IGNORED[option]
                if wanted is not None and value != wanted:
                    raise ConfigError("command line", flag, f"{option}={value[:60]}: hvm runs no network "
                                      f"scripts ({option}=no; make and configure the tap beforehand)", flag=flag)
            else:
                raise ConfigError("command line", flag, f"{option[:60]!r} is not an option of tap "
                                  "(ifname, mac, id, script=no, downscript=no)", flag=flag)
        if "tap" not in entry:
            raise ConfigError("command line", flag, "tap needs ifname=NAME (an existing tap device: "
                              "ip tuntap add NAME mode tap)", flag=flag)
        out.append(entry)
    return out


DRIVE_OPTIONS = {"file": "file", "format": "format", "readonly": "readonly", "read-only": "readonly",
                 "serial": "serial"}


def drive_entries(specs: list[str], flag: str = "--drive") -> list[tuple[dict, dict[str, str]]]:
    """--drive file=PATH[,format=raw][,readonly=on|off][,if=virtio][,id=X][,serial=S] (QEMU's -drive
    spelling) -> devices.virtio-blk entries, each with the option each property came from; the values are
    checked where the YAML's are (the device's declaration)."""
    out = []
    for spec in specs:
        entry: dict = {}
        spelled: dict[str, str] = {}
        for o in spec.split(","):
            if not o:
                continue
            option, eq, value = o.partition("=")
            if not eq:
                raise ConfigError("command line", flag, f"{o[:60]!r} is not OPTION=VALUE", flag=flag)
            if option in DRIVE_OPTIONS:
                prop = DRIVE_OPTIONS[option]
                entry[prop] = _flag_path(value) if prop == "file" and value else value
                spelled[prop] = option
            elif option == "if":
                if value != "virtio":
                    raise ConfigError("command line", flag, f"if={value[:60]}: hvm's disks are virtio-blk "
                                      "(if=virtio)", flag=flag)
            elif option != "id":
                raise ConfigError("command line", flag, f"{option[:60]!r} is not an option of --drive "
                                  "(file, format, readonly, serial, if=virtio, id)", flag=flag)
        if not entry.get("file"):
            raise ConfigError("command line", flag, "needs file=PATH (a raw disk image)", flag=flag)
        out.append((entry, spelled))
    return out


def overrides_from_args(args: argparse.Namespace, origins: dict[str, str] | None = None) -> dict:
    """The flags that override YAML fields, as a mapping of the YAML's shape. `origins` (if given) gets
    each overridden field's dotted path -> the flag, so that errors name the flag, not the YAML file."""
    origins = {} if origins is None else origins
    over: dict = {}
    for attr, key, flag in (("memory", "memory", "--memory"), ("vcpus", "vcpus", "--vcpus"),
                            ("timeout", "timeout", "--timeout"), ("machine", "machine", "--machine"),
                            ("cpu", "cpu", "--cpu"), ("accel", "accel", "--accel")):
        value = getattr(args, attr)
        if value is not None:
            over[key] = value
            origins[key] = flag
    if args.no_pit:
        over["pit"] = False
        origins["pit"] = "--no-pit"
    if getattr(args, "qmp", None) is not None:
        over["qmp"] = args.qmp
        origins["qmp"] = "--qmp"
    devices = _device_overrides(args.device, origins)
    nics = netdev_entries(getattr(args, "netdev", []) or [])
    if nics:
        entries = devices.setdefault("virtio-net", [])    # after any --device virtio-net ones
        for nic in nics:
            path = f"devices.virtio-net[{len(entries)}]"
            entries.append(nic)
            origins[path] = "--netdev"
            for prop, option in (("tap", "ifname"), ("mac", "mac")):
                if prop in nic:
                    origins[f"{path}.{prop}"] = f"--netdev: {option}"
    drives = drive_entries(getattr(args, "drive", []) or [])
    if drives:
        entries = devices.setdefault("virtio-blk", [])    # after any --device virtio-blk ones
        for disk, spelled in drives:
            path = f"devices.virtio-blk[{len(entries)}]"
            entries.append(disk)
            origins[path] = "--drive"
            for prop, option in spelled.items():
                origins[f"{path}.{prop}"] = f"--drive: {option}"
    if args.serial is not None:
        devices["serial"] = {"output": args.serial}
        origins["devices.serial.output"] = "--serial"
    if devices:
        over["devices"] = devices
    return over


def _flag_path(path: str) -> str:
    """A path given as a flag: absolute against the current directory, as QEMU does (no stat here: what
    the path is, is for the config's checks to say in one line)."""
    return path if "\0" in path else os.path.abspath(path)


def _merge_device_lists(data: dict, over: dict, origins: dict[str, str]) -> dict:
    """merge(), except that devices added by flags to a type with several instances (--drive, --netdev,
    a repeated --device) come after the config's, as QEMU's -drive adds a disk; `origins` renumbered."""
    devices_over = over.get("devices")
    devices = data.get("devices")
    if isinstance(devices_over, dict) and isinstance(devices, dict):
        for key, value in list(devices_over.items()):
            have = devices.get(key)
            if isinstance(value, list) and isinstance(have, list):
                devices_over = dict(devices_over, **{key: have + value})
                shift = len(have)
                for o in [o for o in origins if o.startswith(f"devices.{key}[")]:
                    index, _, rest = o[len(f"devices.{key}["):].partition("]")
                    origins[f"devices.{key}[{int(index) + shift}]{rest}"] = origins.pop(o)
        over = dict(over, devices=devices_over)
    return merge(data, over)


def spec_from_args(args: argparse.Namespace):
    """The VmSpec for `hvm run`: the YAML file (if any), the flags over it; a ConfigError names the flag
    or the file and field that is wrong."""
    origins: dict[str, str] = {}
    over = overrides_from_args(args, origins)
    if args.config is not None:
        data = load_yaml(args.config)
        source, base = str(args.config), Path(os.path.abspath(args.config)).parent
    else:
        if args.kernel is None:
            raise ConfigError("command line", "", "give a config file or --kernel")
        data, source, base = {}, "command line", Path.cwd()
    data = _merge_device_lists(data, over, origins)
    if args.kernel is not None:
        # --kernel replaces the whole boot section, resolved against the current directory as QEMU does.
        data["boot"] = {"kernel": _flag_path(args.kernel)}
        origins["boot.kernel"] = "--kernel"
        if args.initrd:
            data["boot"]["initrd"] = [_flag_path(p) for p in args.initrd]
    elif args.initrd:
        data.setdefault("boot", {})
        if isinstance(data["boot"], dict):
            data["boot"] = dict(data["boot"], initrd=[_flag_path(p) for p in args.initrd])
    if args.initrd:
        origins["boot.initrd"] = "--initrd"
    if args.append is not None:
        data.setdefault("boot", {})
        if isinstance(data["boot"], dict):
            data["boot"] = dict(data["boot"], cmdline=args.append)
            origins["boot.cmdline"] = "--append"
    if getattr(args, "script", None) is not None:
        from hvm.script import load_script

        # Steps checked here, so that errors name the script file; they replace the config's script.
        data["script"] = load_script(args.script)
        origins["script"] = str(args.script)
    return parse_spec(data, source, base, origins)


def _line_break(machine: Machine) -> str:
    """A newline before hvm's last words only where they would otherwise go on the guest's last, unfinished
    line on the terminal: not after a finished line, nor when the console went to a file or nowhere."""
    console = machine.console
    return "\n" if console.output == "stdio" and console.history[-1:] not in (b"", b"\n") else ""


# Flags that describe the VM: a restore takes the description from the snapshot, so they cannot be given.
INCOMING_CONFLICTS = (("config", "a config file"), ("kernel", "--kernel"), ("append", "--append"),
                      ("initrd", "--initrd"), ("memory", "--memory"), ("vcpus", "--vcpus"), ("machine", "--machine"),
                      ("device", "--device"), ("netdev", "--netdev"), ("drive", "--drive"),
                      ("no_pit", "--no-pit"), ("cpu", "--cpu"), ("accel", "--accel"))


def _incoming_console(args: argparse.Namespace):
    """--serial given anew for a restored VM: its console (None: the saved description's)."""
    if args.serial is None:
        return None
    from hvm.console import Console

    out = args.serial
    if out not in ("stdio", "none") and not (out.startswith("file:") and len(out) > 5 and "\0" not in out):
        raise ConfigError("command line", "", f"{out[:60]!r} is not one of: stdio, none, file:PATH", flag="--serial")
    return Console(out, "stdin" if out == "stdio" else "none", open_now=False)


def _restore_machine(args: argparse.Namespace, trace) -> tuple[Machine, tuple]:
    """The VM restored from --incoming file:PATH, and the --script steps to run against it (if given)."""
    from hvm.snapshot import parse_incoming

    for attr, flag in INCOMING_CONFLICTS:
        if getattr(args, attr, None):
            raise ConfigError("command line", "", f"{flag} cannot be given: the snapshot carries the VM "
                              "description", flag="--incoming")
    if args.timeout is not None and not (args.timeout >= 0 and args.timeout <= 1e6):
        raise ConfigError("command line", "", f"{args.timeout!r} is not a number of seconds in 0..1000000",
                          flag="--timeout")
    path = parse_incoming(args.incoming)
    script: tuple = ()
    if getattr(args, "script", None) is not None:
        from hvm.script import load_script

        script = tuple(load_script(args.script))
    return Machine.restore(path, console=_incoming_console(args), trace=trace, timeout=args.timeout), script


def cmd_run(args: argparse.Namespace) -> int:
    if "help" in args.device or "?" in args.device:     # QEMU's `-device help`
        from hvm.mmio import registry

        print("isa-debug-exit: QEMU's debug-exit port (built in, on by default): options iobase, iosize")
        print(registry.describe())
        return 0
    from hvm.snapshot import SnapshotError

    incoming = getattr(args, "incoming", None) is not None
    spec = None
    try:
        if not incoming:
            spec = spec_from_args(args)
        qmp_address = _qmp_address(args, spec)   # checked before the VM is built, like every flag
        if args.frozen and qmp_address is None and not (spec is not None and spec.script) and args.script is None:
            raise ConfigError("command line", "", "nothing could start the VM: give --qmp (then QMP `cont`) or "
                              "a script with a resume step", flag="-S")
    except ConfigError as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    trace = None
    if args.trace or args.trace_ring:
        from hvm.trace.filter import FilterError, parse_filter
        from hvm.trace.tracer import TraceConfig

        if args.trace_ring is not None and args.trace_ring <= 0:
            print("hvm: --trace-ring: N must be a positive number of exits", file=sys.stderr)
            return EXIT_CONFIG
        if args.trace_filter:
            try:
                parse_filter(args.trace_filter)
            except FilterError as e:
                print(f"hvm: {e}", file=sys.stderr)
                return EXIT_CONFIG
        trace = TraceConfig(path=args.trace, filter=args.trace_filter, ring=args.trace_ring, rip=args.trace_rip)
    try:
        if incoming:
            machine, script = _restore_machine(args, trace)
            spec = machine.spec       # what was saved (no script: or qmp: keys: those come from flags)
        else:
            machine, script = Machine(spec, trace=trace), spec.script
    except (ConfigError, BootError, BusError, HostFileError, SnapshotError) as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KvmError as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_HOST
    except OSError as e:
        if e.errno == errno.ENOMEM and spec is not None:  # the host cannot back the guest RAM asked for
            where = "--memory" if args.memory is not None else f"{spec.source}: memory"
            print(f"hvm: {where}: this host cannot provide {spec.memory >> 20} MiB of guest RAM "
                  f"({e.strerror})", file=sys.stderr)
        else:
            print(f"hvm: {e}", file=sys.stderr)
        return EXIT_CONFIG

    # SIGTERM/SIGHUP unwind like Ctrl-C: the handler only raises (taking the machine's locks in a handler
    # could deadlock with the main thread inside them), and the stop runs in ordinary code. Once the run
    # is over they are ignored, so nothing interrupts the teardown (terminal, fds, mappings).
    stop_signals = (signal.SIGTERM, signal.SIGHUP)

    def terminate(signo, frame):
        raise _Terminated(signo)

    qmp = None
    previous = {s: signal.signal(s, terminate) for s in stop_signals}
    failure = None
    try:
        with machine:
            if qmp_address is not None:
                # After the Machine is built (a VM that cannot be leaves no socket behind), before it runs,
                # with the stop signals handled (the socket file is removed whatever ends hvm).
                from hvm.qmp.server import QmpServer, QmpSocketError

                qmp = QmpServer(machine, qmp_address)
                try:
                    qmp.start()
                except QmpSocketError as e:
                    where = "--qmp" if args.qmp is not None else f"{spec.source}: qmp"
                    print(f"hvm: {where}: {e}", file=sys.stderr)
                    return EXIT_CONFIG
            try:
                if qmp is not None and qmp_address.wait:
                    print(f"hvm: waiting for a QMP client on {qmp_address.path}", file=sys.stderr)
                    qmp.wait_for_client()
                if script:
                    from hvm.script import run_script

                    result, failure = run_script(machine, script, paused=args.frozen)
                else:
                    result = machine.run(paused=args.frozen)
            except KeyboardInterrupt:
                result = _stop_or_end(machine, 130, "interrupted (Ctrl-C)")
            except _Terminated as t:
                result = _stop_or_end(machine, 128 + t.signo, f"terminated by signal {t.signo}")
            finally:
                for s in stop_signals:
                    signal.signal(s, signal.SIG_IGN)
                if qmp is not None:
                    qmp.close()     # clients get the SHUTDOWN event; the socket file is removed
    except _Terminated as t:  # before the run began: the machine is closed by now
        print(f"hvm: terminated by signal {t.signo}", file=sys.stderr)
        return 128 + t.signo
    finally:
        if qmp is not None:
            qmp.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failure is not None:
        from hvm.script import EXIT_SCRIPT, console_tail

        # One line naming the step, then what the guest said last.
        print(f"{_line_break(machine)}hvm: {failure}", file=sys.stderr)
        tail = console_tail(machine)
        print("hvm: last console lines:" if tail else "hvm: no console output", file=sys.stderr)
        for line in tail:
            print(f"  | {line}", file=sys.stderr)
    elif result.reason in ("crash", "timeout", "panic") or result.status >= 128:
        print(f"{_line_break(machine)}hvm: {result.message}", file=sys.stderr)
    else:
        log.info("%s (exit status %d)", result.message, result.status)
    if (result.reason == "panic" and machine.host.backend == "kvm_pvm"
            and b"Run /init as init process" in machine.console.history):
        print("hvm: Linux reached user space; on this host (kvm_pvm) user space cannot make system calls, "
              "so /init dies at its first one — run `hvm doctor` for the details", file=sys.stderr)
    if args.stats:
        print(machine.stats().format(), file=sys.stderr)
        print(f"run time: {result.seconds * 1000:.1f} ms", file=sys.stderr)
    if failure is not None:
        return EXIT_SCRIPT
    return result.status


def _qmp_address(args: argparse.Namespace, spec):
    """The QMP socket to listen on: the spec's (YAML `qmp:` or --qmp, validated with it), or, for a VM that
    has no spec from the command line (a restore), the --qmp flag's. None: no QMP."""
    if spec is not None:
        return spec.qmp
    if getattr(args, "qmp", None) is None:
        return None
    from hvm.qmp.address import QmpAddressError, parse_qmp_address

    try:
        return parse_qmp_address(args.qmp)
    except QmpAddressError as e:
        raise ConfigError("command line", "qmp", str(e), flag="--qmp") from None


def _stop_or_end(machine: Machine, status: int, message: str):
    """Ctrl-C or a stop signal: stop the VM; one still waiting for its first QMP client never started."""
    if machine.run_state in ("prelaunch", "inmigrate"):
        from hvm.machine import RunResult

        return RunResult(status, "stopped", message)
    return machine.stop(status, message, cause="host-signal")


def cmd_ctl(args: argparse.Namespace) -> int:
    from hvm.qmp.client import CtlError, ctl

    try:
        return ctl(args.socket, args.qmp_command, args.arguments)
    except CtlError as e:
        print(f"hvm: ctl: {e}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_trace(args: argparse.Namespace) -> int:
    """The trace tools read an untrusted file: lines that are not exit records are skipped and counted
    (one line on stderr); a file with no record at all, an unusable input or output, a failed write: one
    line, status 2. Outputs are opened without following symlinks, only once the input showed a record."""
    import os

    from hvm.trace.record import NoRecords, Skipped

    skipped = Skipped()
    output = getattr(args, "output", None)
    try:
        if output is not None and os.path.exists(output) and os.path.exists(args.file) \
                and os.path.samefile(args.file, output):
            raise HostFileError(f"{output}: the output would overwrite the trace it is made from")
        if args.trace_command == "summary":
            from hvm.trace.summary import format_summary, iter_lines, summarize

            s = summarize(iter_lines(args.file), skipped)
            if not s.total:
                raise NoRecords(args.file, skipped)
            text = format_summary(s)
        elif args.trace_command == "perfetto":
            from hvm.trace.perfetto import write_perfetto

            n = write_perfetto(args.file, output, skipped)
            text = None
        else:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:   # checked first: not the file's fault
                print("hvm: trace plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
                return EXIT_CONFIG
            from hvm.trace.plot import plot

            plot(args.file, output, skipped=skipped)
            text = None
    except (HostFileError, NoRecords) as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:  # a write that failed half way (a full disk, /dev/full)
        print(f"hvm: {e.filename or output or args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_CONFIG
    if skipped.count:
        print(f"hvm: {skipped.message(args.file)}", file=sys.stderr)
    if args.trace_command == "summary":
        print(text)
    elif args.trace_command == "perfetto":
        print(f"{n} exit slices written to {output} (open it in https://ui.perfetto.dev)", file=sys.stderr)
    return 0


def cmd_kut(args: argparse.Namespace) -> int:
    from hvm.kut import Interrupted, KutError, is_upstream_tree, run_all, run_upstream

    directory = args.directory
    upstream = directory.is_dir() and is_upstream_tree(directory)
    problem = ("no such directory" if not directory.exists() else "not a directory" if not directory.is_dir()
               else "no unittests.cfg there (nor run_tests.sh and x86/unittests.cfg: an upstream tree)"
               if not upstream and not (directory / "unittests.cfg").exists() else None)
    if problem:
        print(f"hvm: {directory}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.logs is not None and not upstream:
        print("hvm: kut: --logs: only for an upstream tree (run_tests.sh writes the logs)", file=sys.stderr)
        return EXIT_CONFIG

    def stop(signo, frame):  # unwinds run_all, which kills the running child's process group first
        raise Interrupted(signo)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if upstream:
            results = run_upstream(directory, args.names, args.group, args.timeout, verbose=bool(args.verbose),
                                   logs=args.logs, accel=args.accel)
        else:
            results = run_all(directory, args.names, args.group, args.timeout, verbose=bool(args.verbose),
                              accel=args.accel)
    except KutError as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("hvm: kut: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Interrupted as e:
        print(f"hvm: kut: terminated by signal {e.signo}", file=sys.stderr)
        return 128 + e.signo
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 1 if any(r.status == "FAIL" for r in results) else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hvm.compare import cmd_compare as run_compare

    return run_compare(args)


COMMANDS = {"run": cmd_run, "kut": cmd_kut, "doctor": cmd_doctor, "trace": cmd_trace, "ctl": cmd_ctl,
            "compare": cmd_compare}


class _Terminated(Exception):
    """SIGTERM or SIGHUP arrived during a run."""

    def __init__(self, signo: int):
        super().__init__(signo)
        self.signo = signo


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # A parent may have started hvm with stop signals blocked (the mask survives exec): hvm must hear them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    parser = build_parser(argv[0] if argv and argv[0] in SUBPARSERS else None)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    verbose = getattr(args, "verbose", 0)
    level = logging.ERROR if getattr(args, "quiet", False) else max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="hvm: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C before a VM runs (a run handles its own): no traceback
        print("hvm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in hvm: one line, the traceback only when asked for
        if verbose:
            log.exception("internal error")
        print(f"hvm: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def quiet_broken_pipe(run: Callable[[], int]) -> int:
    """run() with its output flushed; if the reader of stdout went away (`hvm --help | head -1`), the status a
    shell gives a process SIGPIPE ended (141), with no traceback: what other command-line tools do."""
    try:
        status = run()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python would try to flush stdout again at exit and report the same error: point it at /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def entry_point() -> None:
    # What start-up imported lives as long as the process: out of the collector's reach (hvm/__main__.py
    # turned it off while importing), then the collector on for what the run allocates.
    gc.freeze()
    gc.enable()
    status = quiet_broken_pipe(main)
    # The process ends here: move every live object out of the collector's reach, so the interpreter's
    # final collections skip them (20-30 ms of a ~150 ms `hvm run`). Teardown itself still runs.
    gc.freeze()
    sys.exit(status)
