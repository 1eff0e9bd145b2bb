"""Property-based tests (Hypothesis) for the host's inputs (issue 11): the YAML loader on generated and
mutated texts and mappings, and `hvm run`'s flag parsing on argv lists built from the real flag set.
Every case ends in a VmSpec or a one-line error (ConfigError or a usage error: status 2) - never another
exception - in bounded time. In-process for speed; tests/conftest.py's profiles set the number of examples."""
from __future__ import annotations

import argparse
import time
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import CONFIGS, FIRMWARE
from hvm.cli import UsageError, build_parser, spec_from_args
from hvm.mmio import registry
from hvm.config import (BOOT_KEYS, DEBUG_EXIT_KEYS, device_keys, GP_REGS, SERIAL_KEYS, TOP_KEYS, ConfigError, VmSpec,
                        load_yaml, parse_spec, parse_yaml)

pytestmark = pytest.mark.fuzz

HELLO = FIRMWARE / "hello.bin"
BASE = FIRMWARE                     # relative paths in generated configs resolve here
PER_CASE_SECONDS = 2.0
PER_CASE_MB = 32                    # Python memory one case may allocate at its peak (tracemalloc): hvm's,
                                    # not Hypothesis's own, which grows with the number of examples

# --- values ------------------------------------------------------------------------------------------------

INTERESTING_STRINGS = ["", "0", "-1", "1", "64", "65", "0x10", "0xffffffffffffffff", "64M", "1G", "2T", "512MiB",
                       "12X", "inf", "nan", "-inf", "1e300", "1e-300", "auto", "on", "off", "pc", "none", "stdio",
                       "stdin", "real", "protected", "long", "file:", "file:/dev/null", "file:/dev/zero",
                       "file:~nosuchuser/x", "~nosuchuser/x", "~", "/", "/dev/zero", "/nonexistent", "hello.bin",
                       "../build/hello.bin", str(HELLO), "a\x00b", "x" * 5000, "9" * 5000, "é", "\n", "{", "*a"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.sampled_from([0, 1, 64, 65, 0xF4, 0x3F8]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.sampled_from(INTERESTING_STRINGS),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(TOP_KEYS + BOOT_KEYS + device_keys() + SERIAL_KEYS
                                                                    + GP_REGS)), inner, max_size=4)), max_leaves=20)


def mapping_of(keys: tuple[str, ...], value_strategy) -> st.SearchStrategy:
    """Mappings whose keys are mostly the real ones (so validation gets deep), sometimes not."""
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.text(max_size=8))
    return st.dictionaries(key, value_strategy, max_size=len(keys) + 1)


boots = st.one_of(
    st.fixed_dictionaries({"image": st.sampled_from([str(HELLO), "hello.bin", "nope.bin", "/dev/zero", "~x/y"])},
                          optional={"load": values, "entry": values, "mode": values,
                                    "regs": st.one_of(values, mapping_of(GP_REGS, values))}),
    st.fixed_dictionaries({"kernel": st.sampled_from([str(FIRMWARE / "mbtest.elf"), "hello.bin", "nope"])},
                          optional={"initrd": values, "cmdline": values}),
    mapping_of(BOOT_KEYS, values),
)
serials = st.one_of(values, mapping_of(SERIAL_KEYS, st.one_of(values, st.sampled_from(INTERESTING_STRINGS))))

# Every device of the registry, from its declaration: a new device is fuzzed without editing this file.
def _registry_device(dt) -> st.SearchStrategy:
    names = tuple(p.name for p in dt.props) or ("x",)
    one = st.one_of(values, mapping_of(names, values))
    return st.one_of(one, st.lists(mapping_of(names, values), max_size=3)) if dt.multiple else one


devices = st.one_of(values, st.fixed_dictionaries({}, optional={
    "serial": serials, "debug_exit": st.one_of(values, mapping_of(DEBUG_EXIT_KEYS, values)),
    **{name: _registry_device(dt) for name, dt in registry.device_types().items()}}))
configs = st.fixed_dictionaries({"boot": boots}, optional={
    "name": values, "memory": values, "vcpus": values, "timeout": values, "machine": values,
    "irqchip": values, "pit": values, "devices": devices, "junk": values})


def outcome(call):
    """Run one case: a VmSpec or a ConfigError with a one-line message; anything else fails the test."""
    t0 = time.monotonic()
    tracemalloc.start()
    try:
        result = call()
    except (ConfigError, UsageError) as e:
        message = str(e)
        assert "\n" not in message and len(message) < 1000, message
        result = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t0 < PER_CASE_SECONDS
    assert peak < PER_CASE_MB << 20, f"{peak >> 20} MB"
    return result


# --- the YAML loader ---------------------------------------------------------------------------------------

@given(configs)
def test_generated_mappings(data):
    result = outcome(lambda: parse_spec(data, "gen.yaml", BASE))
    assert isinstance(result, (VmSpec, ConfigError))


@given(configs)
def test_generated_mappings_through_yaml_text(data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        assume(False)
    result = outcome(lambda: _spec_from_text(text))
    assert isinstance(result, (VmSpec, ConfigError))


def _spec_from_text(text: str) -> VmSpec:
    data = parse_yaml(text, "gen.yaml")
    if not isinstance(data, dict):
        raise ConfigError("gen.yaml", "", "not a mapping")
    return parse_spec(data, "gen.yaml", BASE)


SEEDS = [p.read_text() for p in sorted(CONFIGS.glob("*.yaml"))] + [
    f"boot: {{image: {HELLO}}}\na: &a [1, 2]\nb: *a\n", "memory: [[[[1]]]]\n", "x: &x {y: *x}\n"]
YAML_BITS = ["&a ", "*a", "<<: ", "[", "]", "{", "}", ": ", "- ", "\n", "  ", "!!binary ", "!!timestamp ", "!!set ",
             "!!python/object ", "? ", "'", '"', "#", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "\t", "\\", ",",
             "0x", "1e400", ".nan", "2024-13-45", "9" * 300]


@st.composite
def mutated_texts(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        bit = draw(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=4)))
        if op == "insert":
            text = text[:at] + bit + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif op == "replace":
            text = text[:at] + bit + text[at + len(bit):]
        else:
            text = text[:at] + bit * draw(st.integers(2, 400)) + text[at:]
    return text


@given(st.one_of(mutated_texts(), st.text(max_size=200)))
def test_mutated_yaml_texts(text):
    result = outcome(lambda: _spec_from_text(text))
    assert isinstance(result, (VmSpec, ConfigError))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(mutated_texts().map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300)))
def test_mutated_yaml_files(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg", numbered=True) / "vm.yaml"
    path.write_bytes(raw)

    def load() -> VmSpec:
        return parse_spec(load_yaml(path), str(path), BASE)

    result = outcome(load)
    assert isinstance(result, (VmSpec, ConfigError))
    if isinstance(result, ConfigError):
        assert str(result).startswith(str(path))


# --- `hvm run` flags ---------------------------------------------------------------------------------------

def _run_flags() -> list[tuple[str, bool]]:
    """(option string, takes a value) for every flag of `hvm run` but --help, read from the real parser."""
    parser = build_parser("run")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = []
    for action in sub.choices["run"]._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        for opt in action.option_strings:
            flags.append((opt, action.nargs != 0))
    return flags


RUN_FLAGS = _run_flags()


def _spellings() -> dict[str, set[str]]:
    """Each flag's canonical name (as errors give it) -> every spelling argparse accepts (-m, --smp)."""
    parser = build_parser("run")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for action in sub.choices["run"]._actions:
        longest = max(action.option_strings, key=len, default=None)
        if longest:
            out[longest] = set(action.option_strings)
    return out


SPELLINGS = _spellings()
FLAG_VALUES = st.one_of(
    st.sampled_from(INTERESTING_STRINGS), st.text(max_size=20).filter(lambda s: "\x00" not in s),
    st.integers(-5, 100).map(str), st.floats().map(repr),
    st.builds(lambda dev, opts: dev + "".join("," + o for o in opts),
              st.sampled_from(["pc-testdev", "isa-debug-exit", "isa-debugcon", "pvconsole", "nic", "",
                               *registry.device_types()]),
              st.lists(st.sampled_from(["iobase=0xf4", "iosize=2", "iosize=3", "iobase=0x10000", "iobase=-1",
                                        "iobase=x", "iobase", "foo=1", ""]), max_size=3)),
)


@st.composite
def run_argvs(draw) -> list[str]:
    argv = ["run"]
    config = draw(st.sampled_from([None, "configs/hello.yaml", "configs/multiboot.yaml", "configs/linux.yaml",
                                   "/nonexistent.yaml", "/dev/null"]))
    if config:
        argv.append(config)
    for _ in range(draw(st.integers(0, 6))):
        opt, takes_value = draw(st.sampled_from(RUN_FLAGS))
        argv.append(opt)
        if takes_value:
            argv.append(draw(FLAG_VALUES))
    return argv


def parse_run(argv: list[str]) -> VmSpec:
    args = build_parser("run").parse_args(argv)
    return spec_from_args(args)


@given(run_argvs())
def test_run_flags(argv):
    from conftest import ROOT
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)                  # configs/... as a user in the repository types them
    try:
        result = outcome(lambda: parse_run(argv))
    finally:
        os.chdir(cwd)
    assert isinstance(result, (VmSpec, ConfigError, UsageError)), result
    if isinstance(result, ConfigError) and result.flag:
        flag = result.flag.split()[0]                    # an error blamed on a flag names one that was given
        assert SPELLINGS.get(flag, {flag}) & set(argv), (flag, argv)
    if isinstance(result, VmSpec) and result.timeout is not None:
        assert 0 < result.timeout <= 1e6


def test_run_flags_cover_the_real_flag_set():
    names = {opt for opt, _ in RUN_FLAGS}
    assert {"--kernel", "--append", "--initrd", "--memory", "--vcpus", "--timeout", "--serial", "--machine",
            "--device", "--no-pit"} <= names
