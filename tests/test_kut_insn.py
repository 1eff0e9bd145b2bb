"""Upstream kvm-unit-tests entries that pass under hvm because it completes the instructions the kvm_pvm
backend cannot emulate (CLAC/STAC: smap; RDPRU's #UD: rdpru; XGETBV and the AVX moves: xsave). Run by
upstream's own runner (run_tests.sh) on a temporary copy of the shared tree, with hvm-qemu as QEMU."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

UPSTREAM = next((d for d in (ROOT.parent / "shared" / "kvm-unit-tests" / "upstream",
                             ROOT.parent.parent / "shared" / "kvm-unit-tests" / "upstream")
                 if (d / "run_tests.sh").is_file()), None)


@pytest.fixture(scope="module")
def kut_copy(tmp_path_factory):
    if UPSTREAM is None:
        pytest.skip("no upstream kvm-unit-tests tree beside the checkout")
    dest = tmp_path_factory.mktemp("kut") / "upstream"
    shutil.copytree(UPSTREAM, dest)
    cfg = dest / "config.mak"
    cfg.write_text("".join(f"ERRATATXT={dest}/errata.txt\n" if line.startswith("ERRATATXT=") else line
                           for line in cfg.read_text().splitlines(keepends=True)))
    shim = dest / "bin" / "hvm-qemu"        # this tree's shim, as .hvmbin/hvm-qemu
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -c '
                    f'"import sys; from hvm.qemu_shim import entry_point; entry_point()" "$@"\n')
    shim.chmod(0o755)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("entry,tests", [("smap", 18), ("rdpru", 1), ("xsave", 386)])
def test_entry_passes(kut_copy, entry, tests):
    env = dict(os.environ, PATH=f"{kut_copy / 'bin'}:{os.environ['PATH']}", QEMU="hvm-qemu", TIMEOUT="60")
    proc = subprocess.run(["./run_tests.sh", "-v", entry], cwd=kut_copy, env=env, capture_output=True, text=True,
                          timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    assert f"PASS\x1b[0m {entry} ({tests} tests)" in last, (last, (kut_copy / "logs" / f"{entry}.log").read_text())
