"""Shared fixtures. Every guest a test runs is bounded twice: hvm's own watchdog (timeout in the
spec or --timeout) and a subprocess/wait timeout in the test."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property-based tests: a fixed, modest run in the test suite (deterministic, so CI sees what a developer saw);
# `make fuzz` selects the long profile (HVM_FUZZ=long), with fresh random examples each time.
settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("long" if os.environ.get("HVM_FUZZ") == "long" else "ci")

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware" / "build"
CONFIGS = ROOT / "configs"
GUEST_TIMEOUT = 20  # seconds: the outer bound on any single small guest run in the tests


@pytest.fixture(scope="session", autouse=True)
def firmware() -> Path:
    """Build the firmware once (make is a no-op when it is up to date)."""
    subprocess.run(["make", "-s", "firmware"], cwd=ROOT, check=True, timeout=120)
    return FIRMWARE


@dataclass
class HvmRun:
    status: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def run_hvm(*args: str, timeout: float = GUEST_TIMEOUT, input: bytes | None = b"", cwd: Path = ROOT) -> HvmRun:
    """Run the hvm CLI as a user would (python -m hvm), bounded by `timeout`."""
    proc = subprocess.run([sys.executable, "-m", "hvm", *args], cwd=cwd, input=input, capture_output=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return HvmRun(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


@pytest.fixture
def hvm():
    return run_hvm


def write_yaml(tmp_path: Path, text: str, name: str = "vm.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p
