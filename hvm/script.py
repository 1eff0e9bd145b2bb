"""`script:` steps: a VM's lifecycle as a list in its YAML config (or `hvm run --script FILE`), run by
`hvm run` against the serial console, in order, from the main thread while the VM runs.

Steps are parsed and validated before boot, like every config field: each error is a one-line
ConfigError naming the step's number (status 2). Matching is pexpect's, through the console's own pexpect
side (hvm/console.py): the runner calls console.expect as a Python user would. A failing step stops the
VM; `hvm run` then exits with EXIT_SCRIPT (8), printing one line naming the step, then the last console
lines (docs/lifecycle.md)."""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvm.config import MAX_TIMEOUT, ConfigError, _kind, _show, _user_path, load_yaml_document

if TYPE_CHECKING:
    from hvm.machine import Machine, RunResult

log = logging.getLogger(__name__)

EXIT_SCRIPT = 8
DEFAULT_TIMEOUT = 30.0      # seconds, for the steps that wait
TAIL_LINES = 10             # console lines printed after a failing step
STEPS = ("expect", "expect_not", "send", "sleep", "pause", "resume", "snapshot", "qmp", "exit")
BARE_STEPS = ("pause", "resume")              # may be written as a plain `- pause`
TIMED_STEPS = ("expect", "expect_not", "send", "pause", "exit")   # what `timeout:` bounds
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.|$)", re.DOTALL)
_SIMPLE_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\", "0": b"\0", "e": b"\x1b", "a": b"\a",
                   "b": b"\b", '"': b'"', "'": b"'"}


@dataclass(frozen=True)
class Step:
    number: int                 # 1-based, as messages name it
    kind: str                   # one of STEPS
    value: Any = None           # expect/expect_not: compiled bytes regex; send: bytes; sleep: seconds;
                                # snapshot: Path; exit: status; qmp: (command, arguments); pause/resume: None
    timeout: float = DEFAULT_TIMEOUT
    text: str = ""              # the step as the user wrote it, for messages
    returns: Any = None         # qmp: what the reply's "return" must contain (None: anything)

    def __str__(self) -> str:
        return self.text


class ScriptFailure(Exception):
    """A step failed while the VM ran. str(): "script step N (TEXT) failed: WHY"."""

    def __init__(self, step: Step, why: str):
        self.step = step
        self.why = why
        super().__init__(f"script step {step.number} ({step.text}) failed: {why}")


# --- parsing ---------------------------------------------------------------------------------------
def parse_steps(raw: Any, source: str, field: str = "script") -> tuple[Step, ...]:
    """A YAML list of steps -> Steps; a ConfigError naming `source` and the step number otherwise."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(source, field, f"expected a list of steps, got {_kind(raw)}")
    return tuple(_parse_step(item, n, source) for n, item in enumerate(raw, 1))


def _parse_step(item: Any, number: int, source: str) -> Step:
    where = f"script step {number}"

    def error(message: str) -> ConfigError:
        return ConfigError(source, where, message)

    if isinstance(item, str):
        if item in BARE_STEPS:
            return Step(number, item, text=item)
        if item in STEPS:
            raise error(f"{item!r} needs a value ({item}: ...)")
        raise error(f"unknown step {_show(item)} (steps: {', '.join(STEPS)})")
    if not isinstance(item, dict):
        raise error(f"expected a step (e.g. expect: PATTERN), got {_kind(item)}")
    kinds = [k for k in item if k in STEPS]
    unknown = [k for k in item if k not in STEPS and k not in ("timeout", "return")]
    if unknown:
        key = unknown[0]
        raise error(f"unknown step {_show(key) if isinstance(key, str) else _kind(key)} "
                    f"(steps: {', '.join(STEPS)}; and timeout)")
    if len(kinds) != 1:
        got = " and ".join(kinds) if kinds else "only timeout" if "timeout" in item else "an empty mapping"
        raise error("expected one step per list item, got " + got)
    kind = kinds[0]
    value = item[kind]
    if "return" in item and kind != "qmp":
        raise error(f"return applies to a qmp step, not to {kind}")
    timeout = DEFAULT_TIMEOUT
    if "timeout" in item:
        if kind not in TIMED_STEPS:
            raise error(f"timeout does not apply to a {kind} step (it applies to: {', '.join(TIMED_STEPS)})")
        timeout = _seconds(item["timeout"], lambda m: error(f"timeout: {m}"))
    text = f"{kind}: {_show(value)}" if value is not None else kind
    if kind in ("expect", "expect_not"):
        if not isinstance(value, str) or not value:
            raise error(f"{kind}: expected a regular expression (a non-empty string), got {_kind(value)}")
        try:
            pattern = re.compile(value.encode("utf-8"))  # console output is bytes; a str regex's text as UTF-8
        except re.error as e:
            raise error(f"{kind}: not a valid regular expression: {e}") from None
        return Step(number, kind, pattern, timeout, text)
    if kind == "send":
        if not isinstance(value, str) or not value:
            raise error(f"send: expected a string of input, got {_kind(value)}")
        return Step(number, kind, _unescape(value, lambda m: error(f"send: {m}")), timeout, text)
    if kind == "sleep":
        return Step(number, kind, _seconds(value, lambda m: error(f"sleep: {m}")), timeout, text)
    if kind in BARE_STEPS:
        if value is not None:
            raise error(f"{kind} takes no value, got {_kind(value)}")
        return Step(number, kind, None, timeout, kind)
    if kind == "snapshot":
        if not isinstance(value, str) or not value:
            raise error(f"snapshot: expected a file path, got {_kind(value)}")
        # relative to the current directory, as every output file (--serial file:, --trace)
        path = _user_path(value, Path.cwd(), lambda m: error(f"snapshot: {m}"))
        return Step(number, kind, path, timeout, text)
    if kind == "qmp":
        return _parse_qmp_step(item, number, value, text, error)
    assert kind == "exit"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise error(f"exit: expected an exit status 0..255, got {_kind(value)}")
    return Step(number, kind, value, timeout, text)


def _parse_qmp_step(item: dict, number: int, value: Any, text: str, error) -> Step:
    """`qmp: {execute: NAME, arguments: {...}}` (or `qmp: NAME`), optional `return:`: the command is checked
    against hvm's QMP schema now, so a typo is a config error before boot, not a failure mid-run."""
    from hvm.qmp.commands import SCHEMA, QmpError, check_arguments

    if isinstance(value, str):
        value = {"execute": value}
    if not isinstance(value, dict) or "execute" not in value or set(value) - {"execute", "arguments"}:
        raise error("qmp: expected a command name or {execute: NAME, arguments: {...}}, got "
                    f"{_show(value)}")
    name, args = value["execute"], value.get("arguments", {})
    if not isinstance(name, str) or name not in SCHEMA or name == "qmp_capabilities":
        raise error(f"qmp: unknown command {_show(name)} (commands: "
                    f"{', '.join(n for n in SCHEMA if n != 'qmp_capabilities')})")
    if not isinstance(args, dict):
        raise error(f"qmp: arguments: expected a mapping, got {_kind(args)}")
    try:
        check_arguments(name, args)
    except QmpError as e:
        raise error(f"qmp: {name}: {e.desc}") from None
    text = f"qmp: {name}" + (f" {_json(args)}" if args else "")
    return Step(number, "qmp", (name, args), DEFAULT_TIMEOUT, text, item.get("return"))


def _json(value: Any, limit: int = 200) -> str:
    """A QMP value in a message: JSON, as a QMP user reads it, shortened."""
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _contains(actual: Any, expected: Any) -> bool:
    """A qmp step's `return:`: mappings match when every expected key matches (others may be there too)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    return actual == expected


def _seconds(value: Any, error) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"expected seconds (a number >= 0), got {_kind(value)}")
    if not (math.isfinite(value) and 0 <= value <= MAX_TIMEOUT):
        raise error(f"{_show(value)} is not a number of seconds in 0..{MAX_TIMEOUT:.0f}")
    return float(value)


def _unescape(text: str, error) -> bytes:
    """send's text -> bytes: UTF-8, with the escapes \\n \\r \\t \\e \\0 \\\\ \\xHH (a byte) read even where
    YAML left them as they were (plain or single-quoted strings)."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8")
        code = m.group(1)
        if code.startswith("x") and len(code) == 3:
            out.append(int(code[1:], 16))
        elif code in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[code]
        else:
            raise error(f"unknown escape {_show(m.group(0))} (escapes: \\n \\r \\t \\e \\0 \\\\ \\xHH)")
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def load_script(path: Path | str) -> tuple[Step, ...]:
    """`hvm run --script FILE`: a YAML list of steps (or a mapping with just `script:`)."""
    source = str(path)
    data = load_yaml_document(Path(path))
    if isinstance(data, dict):
        extra = [k for k in data if k != "script"]
        if extra:
            raise ConfigError(source, str(extra[0])[:60], "unknown key (a script file is a list of steps, or "
                              "a mapping with just script:)")
        data = data.get("script")
    if not isinstance(data, list) or not data:
        raise ConfigError(source, "", f"expected a list of script steps, got {_kind(data)}")
    return parse_steps(data, source)


def check_steps(steps: tuple[Step, ...], has_serial: bool, source: str) -> None:
    """What depends on the rest of the VM: input needs a serial port."""
    if has_serial:
        return
    for step in steps:
        if step.kind == "send":
            raise ConfigError(source, f"script step {step.number}", "send needs a serial port "
                              "(devices.serial is off)")


# --- running ---------------------------------------------------------------------------------------
def run_script(machine: Machine, steps: tuple[Step, ...],
               paused: bool = False) -> tuple[RunResult, ScriptFailure | None]:
    """Start the VM (paused=True: frozen until a resume step, as QEMU's -S) and run the steps in order. All
    pass: wait for the guest to end, its status stands. A step fails: stop the VM with EXIT_SCRIPT and
    return the failure (the caller prints it)."""
    machine.start(paused)
    qmp: dict = {}    # the QMP commands object of qmp steps, made by the first: migrate's state lasts across steps
    try:
        for step in steps:
            log.debug("script step %d: %s", step.number, step.text)
            _run_step(machine, step, qmp)
    except ScriptFailure as failure:
        log.debug("%s", failure)
        return machine.stop(EXIT_SCRIPT, str(failure)), failure
    result = machine.wait()
    assert result is not None
    return result, None


def _ended(machine: Machine) -> str:
    result = machine.result
    return f"status {result.status}: {result.message}" if result is not None else "stopped"


def _run_step(machine: Machine, step: Step, qmp: dict) -> None:
    from pexpect import EOF, TIMEOUT

    console = machine.console
    kind = step.kind
    if kind in ("send", "pause", "resume", "snapshot", "qmp") and machine.result is not None:
        raise ScriptFailure(step, f"the guest ended before this step ({_ended(machine)})")
    if kind == "expect":
        try:
            console.expect(step.value, timeout=step.timeout)
        except TIMEOUT:
            raise ScriptFailure(step, f"no match within {step.timeout:g} s") from None
        except EOF:
            raise ScriptFailure(step, f"the guest ended before a match ({_ended(machine)})") from None
    elif kind == "expect_not":
        # TIMEOUT and EOF are the passing outcomes; pexpect keeps the bytes read for the next expect
        if console.expect([step.value, TIMEOUT, EOF], timeout=step.timeout) == 0:
            raise ScriptFailure(step, f"matched {_show(console.after.decode('utf-8', 'replace'))}")
    elif kind == "send":
        console._log(step.value, "send")     # to console.logfile / logfile_send, as send() does
        try:
            console._send_bytes(step.value, step.timeout)
        except TIMEOUT:
            raise ScriptFailure(step, f"the guest did not read its input within {step.timeout:g} s") from None
    elif kind == "sleep":
        _sleep(machine, step.value)
    elif kind == "pause":
        try:
            machine.pause(timeout=step.timeout)
        except (RuntimeError, TimeoutError) as e:
            raise ScriptFailure(step, str(e) or "the vCPUs did not pause") from None
    elif kind == "resume":
        try:
            machine.resume()
        except RuntimeError as e:
            raise ScriptFailure(step, str(e)) from None
    elif kind == "snapshot":
        from hvm.snapshot import SnapshotError

        try:
            machine.snapshot(str(step.value), resume=True)
        except (RuntimeError, OSError, SnapshotError) as e:
            raise ScriptFailure(step, str(e)) from None
    elif kind == "qmp":
        _run_qmp_step(machine, step, qmp)
    elif kind == "exit":
        result = machine.wait(step.timeout)
        if result is None:
            raise ScriptFailure(step, f"the guest was still running after {step.timeout:g} s")
        if result.status != step.value:
            raise ScriptFailure(step, f"the guest ended with status {result.status} ({result.message}), "
                                f"not {step.value}")


def _run_qmp_step(machine: Machine, step: Step, qmp: dict) -> None:
    """One command through the QMP server's own command code (hvm/qmp/commands.py), without a socket."""
    from hvm.qmp.commands import Commands, QmpError

    commands = qmp.get("commands")
    if commands is None:
        commands = qmp["commands"] = Commands(machine, lambda event, data: None)
    name, args = step.value
    try:
        returned = commands.execute(name, dict(args))
    except QmpError as e:
        raise ScriptFailure(step, f"QMP error {e.cls}: {e.desc}") from None
    if name == "quit":
        commands.after_quit()
    log.info("script step %d: %s returned %s", step.number, name, returned)
    if step.returns is not None and not _contains(returned, step.returns):
        raise ScriptFailure(step, f"returned {_json(returned)}, not {_json(step.returns)}")


def _sleep(machine: Machine, seconds: float) -> None:
    time.sleep(seconds)


def console_tail(machine: Machine, lines: int = TAIL_LINES) -> list[str]:
    """The last console lines, for a failure report."""
    text = bytes(machine.console.history[-16384:]).decode("utf-8", "replace")
    return text.splitlines()[-lines:]
