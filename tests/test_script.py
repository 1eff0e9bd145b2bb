"""`script:` steps (hvm/script.py): validated before boot (status 2, one line naming the step), run by
`hvm run` against the serial console; a failing step stops the VM with status 8 and names the step.
Guests: firmware/echo.S (echoes input upper-cased; 'q' prints "bye" and halts: status 0), ticker (never
ends), hello. Every run is bounded by hvm's --timeout and run_hvm's subprocess timeout."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, FIRMWARE, ROOT, run_hvm, write_yaml
from hvm import Machine
from hvm.config import ConfigError, FlatBoot, VmSpec, parse_spec
from hvm.console import Console
from hvm.script import EXIT_SCRIPT, STEPS, load_script, parse_steps, run_script


def config(tmp_path: Path, image: str, steps: str, timeout: float = 20, extra: str = "") -> Path:
    text = f"boot:\n  image: {FIRMWARE / (image + '.bin')}\ntimeout: {timeout}\n{extra}script:\n{steps}"
    return write_yaml(tmp_path, text)


def failure_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("hvm: script step")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_example_config_passes():
    run = run_hvm("run", str(CONFIGS / "echo-script.yaml"), "--timeout", "20")
    assert run.status == 0, run.stderr
    assert "HELLO, SCRIPT" in run.out and run.out.endswith("bye\n")
    assert "script step" not in run.stderr


def test_a_passing_script_ends_with_the_guests_own_status(tmp_path):
    path = config(tmp_path, "ticker", '  - expect: "tick\\n"\n  - expect_not: "tock"\n    timeout: 0.3\n'
                                      '  - pause\n  - sleep: 0.1\n  - resume\n  - expect: tick\n', timeout=2)
    run = run_hvm("run", str(path), "--serial", "none")
    assert run.status == 124, run.stderr        # every step passed; the ticker ran on to the watchdog
    assert "script step" not in run.stderr


def test_send_escapes_and_exit(tmp_path):
    # single quotes: YAML leaves the escapes to hvm
    path = config(tmp_path, "echo", "  - send: 'hi\\x21\\n'\n  - expect: 'HI!\\n'\n  - send: q\n  - exit: 0\n")
    run = run_hvm("run", str(path))
    assert run.status == 0, run.stderr
    assert run.stdout == b"HI!\nbye\n"


@pytest.mark.parametrize("image, steps, number, line", [
    ("ticker", '  - expect: tick\n  - expect: tock\n    timeout: 0.5\n', 2,
     "script step 2 (expect: 'tock') failed: no match within 0.5 s"),
    ("hello", '  - expect: "never printed"\n', 1,
     "script step 1 (expect: 'never printed') failed: the guest ended before a match (status 0: all vCPUs halted)"),
    ("echo", '  - send: q\n  - exit: 3\n', 2,
     "script step 2 (exit: 3) failed: the guest ended with status 0 (all vCPUs halted), not 3"),
    ("ticker", '  - exit: 0\n    timeout: 0.3\n', 1,
     "script step 1 (exit: 0) failed: the guest was still running after 0.3 s"),
    ("ticker", '  - expect: tick\n  - expect_not: "ti+ck"\n    timeout: 5\n', 2,
     "script step 2 (expect_not: 'ti+ck') failed: matched 'tick'"),
    ("hello", '  - exit: 0\n  - send: "x"\n', 2,
     "script step 2 (send: 'x') failed: the guest ended before this step (status 0: all vCPUs halted)"),
    ("hello", '  - exit: 0\n  - pause\n', 2,
     "script step 2 (pause) failed: the guest ended before this step (status 0: all vCPUs halted)"),
])
def test_a_failing_step_is_status_8_and_named(tmp_path, image, steps, number, line):
    t0 = time.monotonic()
    run = run_hvm("run", str(config(tmp_path, image, steps)), "--serial", "none")
    assert run.status == EXIT_SCRIPT, run.stderr
    assert failure_line(run.stderr) == f"hvm: {line}"
    assert time.monotonic() - t0 < 10                  # the VM was stopped, not left to its 20 s watchdog
    if image == "ticker":
        assert "hvm: last console lines:\n  | tick\n" in run.stderr


def test_a_guest_that_never_reads_fails_the_send_step(tmp_path):
    path = config(tmp_path, "ticker", '  - send: "%s"\n    timeout: 0.5\n' % ("z" * 5000))
    run = run_hvm("run", str(path), "--serial", "none")
    assert run.status == EXIT_SCRIPT, run.stderr
    assert failure_line(run.stderr).endswith("failed: the guest did not read its input within 0.5 s")


def test_the_watchdog_during_a_step(tmp_path):
    run = run_hvm("run", str(config(tmp_path, "ticker", "  - expect: tock\n")), "--serial", "none",
                  "--timeout", "0.5")
    assert run.status == EXIT_SCRIPT
    assert failure_line(run.stderr) == ("hvm: script step 1 (expect: 'tock') failed: the guest ended before a "
                                        "match (status 124: timeout: the guest was still running after 0.5 s)")


def test_pause_stops_the_output_and_resume_restarts_it(monkeypatch):
    """The steps drive Machine.pause/resume: while paused (a sleep step), the console does not grow."""
    import hvm.script as script

    sizes = []

    def sleep(machine, seconds):
        history = machine.console.history
        time.sleep(0.05)                        # output already in flight lands
        sizes.append((len(history), machine.state))
        time.sleep(seconds)
        sizes.append((len(history), machine.state))

    monkeypatch.setattr(script, "_sleep", sleep)
    steps = parse_steps([{"expect": "tick"}, "pause", {"sleep": 0.4}, "resume",
                         {"expect": "(tick\n){3}"}], "test")
    spec = VmSpec(name="ticker", boot=FlatBoot(FIRMWARE / "ticker.bin", 0x7C00, 0x7C00, "real"),
                  memory=4 << 20, timeout=5, irqchip=False, script=steps)
    with Machine(spec, console=Console("none", "none")) as machine:
        result, failure = run_script(machine, steps)
        assert failure is None
        assert result.status == 124
        assert machine.console.history.count(b"tick\n") >= sizes[1][0] // 5 + 3
    assert len(sizes) == 2 and sizes[0] == sizes[1] and sizes[0][0] > 0 and sizes[0][1] == "paused"


def test_script_file_flag_replaces_the_configs_script(tmp_path):
    path = config(tmp_path, "echo", "  - expect: never\n")     # would fail: replaced
    steps = write_yaml(tmp_path, '- send: "abc"\n- expect: ABC\n- send: q\n- expect: bye\n- exit: 0\n',
                       "steps.yaml")
    run = run_hvm("run", str(path), "--script", str(steps))
    assert run.status == 0, run.stderr
    assert run.stdout == b"ABCbye\n"
    # and for a config without a script
    steps = write_yaml(tmp_path, '- expect: "real mode"\n- expect: ABC\n', "steps2.yaml")
    run = run_hvm("run", str(CONFIGS / "hello.yaml"), "--script", str(steps), "--serial", "none")
    assert run.status == EXIT_SCRIPT
    assert failure_line(run.stderr) == ("hvm: script step 2 (expect: 'ABC') failed: the guest ended before a "
                                        "match (status 0: all vCPUs halted)")


def test_script_file_errors_name_the_file(tmp_path):
    steps = write_yaml(tmp_path, '- send: "abc"\n- expct: ABC\n', "steps.yaml")
    run = run_hvm("run", str(CONFIGS / "hello.yaml"), "--script", str(steps))
    assert run.status == 2
    assert run.stderr == (f"hvm: {steps}: script step 2: unknown step 'expct' (steps: {', '.join(STEPS)}; "
                          "and timeout)\n")
    write_yaml(tmp_path, "name: x\n", "steps.yaml")
    run = run_hvm("run", str(CONFIGS / "hello.yaml"), "--script", str(steps))
    assert (run.status, run.stderr) == (2, f"hvm: {steps}: name: unknown key (a script file is a list of steps, "
                                           "or a mapping with just script:)\n")
    run = run_hvm("run", str(CONFIGS / "hello.yaml"), "--script", str(tmp_path / "missing.yaml"))
    assert (run.status, run.stderr) == (2, f"hvm: {tmp_path / 'missing.yaml'}: file not found\n")


@pytest.mark.parametrize("steps, message", [
    ([{"expct": "x"}], "script step 1: unknown step 'expct' (steps: %s; and timeout)" % ", ".join(STEPS)),
    (["expect: x", "reboot"], "script step 1: unknown step 'expect: x' (steps: %s)" % ", ".join(STEPS)),
    ([{"expect": "a"}, {"expect": 5}], "script step 2: expect: expected a regular expression (a non-empty "
                                       "string), got a number (5)"),
    ([{"expect": "(unclosed"}], "script step 1: expect: not a valid regular expression: missing ), "
                                "unterminated subpattern at position 0"),
    ([{"expect_not": "x", "timeout": -1}], "script step 1: timeout: -1 is not a number of seconds in 0..1000000"),
    ([{"expect": "x", "timeout": "soon"}], "script step 1: timeout: expected seconds (a number >= 0), got a "
                                           "string ('soon')"),
    ([{"sleep": 1, "timeout": 2}], "script step 1: timeout does not apply to a sleep step (it applies to: "
                                   "expect, expect_not, send, pause, exit)"),
    ([{"sleep": float("inf")}], "script step 1: sleep: inf is not a number of seconds in 0..1000000"),
    ([{"exit": 256}], "script step 1: exit: expected an exit status 0..255, got a number (256)"),
    ([{"exit": True}], "script step 1: exit: expected an exit status 0..255, got a boolean (True)"),
    ([{"send": "a\\q"}], "script step 1: send: unknown escape '\\\\q' (escapes: \\n \\r \\t \\e \\0 \\\\ \\xHH)"),
    ([{"send": "x", "expect": "y"}], "script step 1: expected one step per list item, got send and expect"),
    ([{"timeout": 3}], "script step 1: expected one step per list item, got only timeout"),
    ([{}], "script step 1: expected one step per list item, got an empty mapping"),
    (["expect"], "script step 1: 'expect' needs a value (expect: ...)"),
    ([{"pause": 3}], "script step 1: pause takes no value, got a number (3)"),
    ([{"snapshot": None}], "script step 1: snapshot: expected a file path, got nothing"),
    ([["expect", "x"]], "script step 1: expected a step (e.g. expect: PATTERN), got a list"),
    ({"expect": "x"}, "script: expected a list of steps, got a mapping"),
])
def test_validation_errors_name_the_step(steps, message):
    with pytest.raises(ConfigError) as e:
        parse_spec({"boot": {"image": str(FIRMWARE / "echo.bin")}, "script": steps}, "vm.yaml")
    assert str(e.value) == f"vm.yaml: {message}"


def test_send_needs_a_serial_port():
    with pytest.raises(ConfigError) as e:
        parse_spec({"boot": {"image": str(FIRMWARE / "echo.bin")}, "devices": {"serial": "none"},
                    "script": [{"expect": "x"}, {"send": "y"}]}, "vm.yaml")
    assert str(e.value) == "vm.yaml: script step 2: send needs a serial port (devices.serial is off)"


def test_a_bad_step_is_status_2_before_boot(tmp_path):
    out = tmp_path / "serial.log"
    run = run_hvm("run", str(config(tmp_path, "ticker", "  - expect: tick\n  - sleep: -2\n")),
                  "--serial", f"file:{out}")
    assert run.status == 2
    assert run.stderr == (f"hvm: {tmp_path / 'vm.yaml'}: script step 2: sleep: -2 is not a number of seconds in "
                          "0..1000000\n")
    assert not out.exists()                              # refused before anything was built or opened


def test_parsed_steps():
    steps = parse_steps([{"expect": "login: ", "timeout": 20}, {"send": "root\\n\\x03"}, "pause", {"sleep": 0.5},
                         {"snapshot": "~/vm.snap"}, {"exit": 0}], "vm.yaml")
    assert [(s.number, s.kind) for s in steps] == [(1, "expect"), (2, "send"), (3, "pause"), (4, "sleep"),
                                                   (5, "snapshot"), (6, "exit")]
    assert steps[0].value.pattern == b"login: " and steps[0].timeout == 20
    assert steps[1].value == b"root\n\x03" and steps[1].timeout == 30
    assert steps[4].value == Path.home() / "vm.snap"
    assert str(steps[0]) == "expect: 'login: '"


def test_load_script_accepts_a_list_or_a_script_mapping(tmp_path):
    a = write_yaml(tmp_path, "- expect: x\n", "a.yaml")
    b = write_yaml(tmp_path, "script:\n  - expect: x\n", "b.yaml")
    assert load_script(a) == load_script(b)
    with pytest.raises(ConfigError, match="expected a list of script steps, got nothing"):
        load_script(write_yaml(tmp_path, "", "c.yaml"))


def test_snapshot_step(tmp_path):
    if not hasattr(Machine, "snapshot"):
        pytest.skip("needs Machine.snapshot")
    snap = tmp_path / "echo.snap"
    path = config(tmp_path, "echo", f'  - send: "ab"\n  - expect: AB\n  - snapshot: {snap}\n'
                                    '  - send: "cd"\n  - expect: CD\n  - send: q\n  - exit: 0\n')
    run = run_hvm("run", str(path))
    assert run.status == 0, run.stderr
    assert run.stdout == b"ABCDbye\n"
    assert snap.stat().st_size > 0
    # the snapshot continues in a new process from where it was taken
    cont = write_yaml(tmp_path, '- send: "ef"\n- expect: EF\n- send: q\n- exit: 0\n', "cont.yaml")
    run = run_hvm("run", "--incoming", f"file:{snap}", "--script", str(cont))
    assert run.status == 0, run.stderr
    assert run.stdout.endswith(b"EFbye\n")


def test_the_readme_python_example(tmp_path):
    """The README's pexpect example (boot, expect, send, snapshot, restore, stop), run as printed."""
    if not hasattr(Machine, "snapshot"):
        pytest.skip("needs Machine.snapshot")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    code = next(b for b in blocks if "Machine.restore" in b)
    for name in ("configs", "firmware"):
        (tmp_path / name).symlink_to(ROOT / name)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr
    assert run.stdout == "b'\\nbye\\n' 0\n"
    assert (tmp_path / "echo.snap").stat().st_size > 0


def test_expect_not_reads_nothing_away(tmp_path):
    path = config(tmp_path, "echo", '  - send: "ab"\n  - expect_not: Z\n    timeout: 0.3\n  - expect: "^AB$"\n'
                                    '  - send: q\n  - exit: 0\n')
    run = run_hvm("run", str(path), "--serial", "none")
    assert run.status == 0, run.stderr


def test_hvm_run_without_a_script_does_not_import_pexpect():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hvm", "run", str(CONFIGS / "hello.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "Hello from real mode!\n"
    assert "| hvm.cli" in proc.stderr and "pexpect" not in proc.stderr


# --- qmp steps: one command through the QMP server's own command code ---------------------------------

def test_qmp_steps_stop_query_cont_and_quit(tmp_path):
    steps = ('  - expect: "tick\\n"\n'
             '  - qmp: stop\n'
             '  - qmp: {execute: query-status}\n'
             '    return: {running: false, status: paused}\n'
             '  - expect_not: tick\n    timeout: 0.5\n'          # a stopped guest prints nothing
             '  - qmp: cont\n'
             '  - expect: "tick\\n"\n'
             '  - qmp: {execute: query-status}\n'
             '    return: {status: running}\n'
             '  - qmp: quit\n'
             '  - exit: 0\n')
    run = run_hvm("run", str(config(tmp_path, "ticker", steps)), "--serial", "none")
    assert run.status == 0, run.stderr
    assert "script step" not in run.stderr


def test_a_qmp_step_whose_return_differs_fails_with_status_8(tmp_path):
    steps = '  - qmp: {execute: query-status}\n    return: {status: paused}\n'
    run = run_hvm("run", str(config(tmp_path, "ticker", steps)), "--serial", "none")
    assert run.status == EXIT_SCRIPT, run.stderr
    assert failure_line(run.stderr) == ("hvm: script step 1 (qmp: query-status) failed: returned "
                                        '{"running": true, "status": "running"}, not {"status": "paused"}')


def test_a_qmp_step_that_gets_a_qmp_error_fails(tmp_path):
    # system_powerdown needs the ACPI PM device of a pc machine: a flat ticker has none
    run = run_hvm("run", str(config(tmp_path, "ticker", "  - qmp: system_powerdown\n")), "--serial", "none")
    assert run.status == EXIT_SCRIPT, run.stderr
    assert failure_line(run.stderr).startswith("hvm: script step 1 (qmp: system_powerdown) failed: QMP error "
                                               "GenericError: ")


@pytest.mark.parametrize("step, message", [
    ("qmp: query-stauts", "qmp: unknown command 'query-stauts' (commands: query-status, stop, cont"),
    ("qmp: {execute: migrate}", "qmp: migrate: Parameter 'uri' is missing"),
    ("qmp: {execute: migrate, arguments: {uri: 5}}", "qmp: migrate: Invalid parameter type for 'uri', expected: string"),
    ("qmp: {execute: stop, argument: {}}", "qmp: expected a command name or {execute: NAME, arguments: {...}}"),
    ("qmp: [stop]", "qmp: expected a command name or {execute: NAME, arguments: {...}}"),
    ("expect: x\n    return: {}", "return applies to a qmp step, not to expect"),
])
def test_qmp_step_validation_before_boot(tmp_path, step, message):
    run = run_hvm("run", str(config(tmp_path, "ticker", f"  - {step}\n")), "--serial", "none")
    assert run.status == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "script step 1" in run.stderr and message in run.stderr, run.stderr


@pytest.mark.parametrize("serial", ["none", "stdio"])
def test_the_failure_is_the_first_line_on_stderr(tmp_path, serial):
    # No blank line before it: the console went elsewhere, or its last line was finished ("bye\n").
    run = run_hvm("run", str(config(tmp_path, "echo", "  - send: q\n  - exit: 3\n")), "--serial", serial)
    assert run.status == EXIT_SCRIPT, run.stderr
    assert run.stderr.splitlines()[0] == ("hvm: script step 2 (exit: 3) failed: the guest ended with status 0 "
                                          "(all vCPUs halted), not 3")
    assert run.out == ("bye\n" if serial == "stdio" else "")


def test_dash_S_with_a_script_that_resumes(tmp_path):
    # frozen at start: nothing printed within 0.5 s, then the resume step starts the guest
    steps = '  - expect_not: tick\n    timeout: 0.5\n  - resume\n  - expect: "tick\\n"\n  - qmp: quit\n'
    run = run_hvm("run", str(config(tmp_path, "ticker", steps)), "--serial", "none", "-S")
    assert run.status == 0, run.stderr
