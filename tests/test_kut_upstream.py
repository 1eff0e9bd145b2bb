"""Upstream kvm-unit-tests' own runner (run_tests.sh) driving hvm through hvm-qemu: `hvm kut UPSTREAM-TREE`.

The tree is ../shared/kvm-unit-tests/upstream (1da1819e49fc, 75 x86 entries, QEMU's results on this host in its
RESULTS-QEMU.md); hvm kut runs it from a temporary copy. Checked on the kvm_pvm host (no VT-x/AMD-V)."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from conftest import ROOT, shared_tree
from hvm.kut import is_upstream_tree, parse_qemu_results, parse_unittests_cfg, run_upstream

UPSTREAM = shared_tree("kvm-unit-tests/upstream", is_upstream_tree)
needs_upstream = pytest.mark.skipif(not is_upstream_tree(UPSTREAM), reason=f"{UPSTREAM} is not there")


@needs_upstream
def test_upstream_results_and_cfg_parse():
    refs = parse_qemu_results(UPSTREAM / "RESULTS-QEMU.md")
    assert len(refs) == 75
    assert refs["setjmp"].result == "PASS (10 tests)" and refs["setjmp"].seconds is None
    assert refs["smap"].result == "SKIP (QEMU Aborted)"
    assert sorted(n for n, r in refs.items() if r.result.startswith("PASS")) == [
        "idt_test", "intel_iommu", "realmode", "setjmp", "smptest", "vmexit_cpuid", "vmexit_inl_pmtimer",
        "vmexit_ipi", "vmexit_mov_from_cr8"]
    names = [e.name for e in parse_unittests_cfg(UPSTREAM / "x86" / "unittests.cfg")]
    assert len(names) == 75 and set(names) == set(refs)


@needs_upstream
def test_hvm_kut_runs_upstreams_runner(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hvm", "kut", str(UPSTREAM), "setjmp", "cmpxchg8b", "--logs",
                           str(tmp_path / "logs")], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # upstream's result lines, in unittests.cfg's order, without the colour codes
    assert proc.stdout.splitlines()[:2] == ["SKIP cmpxchg8b (i386 only)", "PASS setjmp (10 tests)"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| entry")}
    assert rows["setjmp"][1] == "PASS (10 tests)" and rows["setjmp"][3:] == ["PASS (10 tests)", "-", "yes"]
    assert rows["cmpxchg8b"][3] == "SKIP (i386 only)"
    assert "1 PASS, 0 FAIL, 1 SKIP of 2; every entry QEMU passes here, hvm passes: 1/1" in proc.stdout
    # the runner's own log of the entry: the hvm-qemu command line it ran, and the guest's output
    log = (tmp_path / "logs" / "setjmp.log").read_text()
    assert "hvm-qemu" in log and "SUMMARY: 10 tests" in log
    assert not (UPSTREAM / "logs").exists() or (UPSTREAM / "logs").is_dir()   # the shared tree is not written


@needs_upstream
def test_a_failing_upstream_entry_is_a_fail_with_its_log(tmp_path):
    """An entry hvm cannot pass: the runner's FAIL line, and -v prints the log's tail."""
    out = io.StringIO()
    results = run_upstream(UPSTREAM, ["vmexit_vmcall"], timeout=5, out=out, verbose=True)
    assert [(r.entry.name, r.status) for r in results] == [("vmexit_vmcall", "FAIL")]
    # kvm_pvm: VMCALL is no hypercall there; with KVM's fix-hypercall quirk off (hvm/host.py) the guest gets
    # #UD at once instead of hanging until the timeout
    assert results[0].detail == ""
    assert "vmcall" in out.getvalue() and "Unhandled exception 6 #UD" in out.getvalue()


def test_not_an_upstream_tree_message(tmp_path):
    (tmp_path / "x86").mkdir()
    proc = subprocess.run([sys.executable, "-m", "hvm", "kut", str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"hvm: {tmp_path}: no unittests.cfg there (nor run_tests.sh and x86/unittests.cfg:"
                                   " an upstream tree)")


# Entries upstream's runner reports PASS for under hvm on this host (docs/kvm-unit-tests.md has the whole table):
# every entry QEMU passes here but intel_iommu (q35 + intel-iommu + edu: refused by hvm-qemu, a SKIP), then those
# QEMU does not pass here.
PASSING = {"smptest": "(1 tests)", "vmexit_cpuid": "", "vmexit_mov_from_cr8": "", "vmexit_inl_pmtimer": "",
           "vmexit_ipi": "", "idt_test": "(4 tests)", "realmode": "", "setjmp": "(10 tests)",
           # QEMU aborts on these here (-cpu max: MSR 0x10a); hvm completes CLAC/STAC, RDPRU's #UD, XGETBV and
           # the AVX moves that the kvm_pvm backend cannot emulate (hvm/vcpu/complete.py)
           "smap": "(18 tests)", "rdpru": "(1 tests)", "xsave": "(386 tests)", "memory": "(7 tests, 1 skipped)",
           # the kvm_pvm backend lets a guest use SPEC_CTRL/PRED_CMD/FLUSH_CMD its CPUID lacks; hvm's MSR filter
           # gives the #GP a CPU would (hvm/host.py FEATURE_MSRS)
           "msr": "(1904 tests)", "msr64": "(1904 tests)",
           "pcid-disabled": "(2 tests)"}        # INVPCID without INVPCID in CPUID: hvm raises the #UD
SLOW = {"realmode"}


@needs_upstream
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in PASSING])
def test_upstream_entry_passes(name):
    out = io.StringIO()
    results = run_upstream(UPSTREAM, [name], out=out, verbose=True)
    assert [r.line() for r in results] == [f"PASS {name} {PASSING[name]}".rstrip()], out.getvalue()[-3000:]


@needs_upstream
def test_logs_that_cannot_be_written_is_one_line(tmp_path):
    """--logs naming a regular file: one line, status 2, after the results and the table (not a traceback)."""
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "hvm", "kut", str(UPSTREAM), "cmpxchg8b", "--logs",
                           str(tmp_path / "file")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.splitlines()[0] == "SKIP cmpxchg8b (i386 only)" and "| cmpxchg8b" in proc.stdout
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"hvm: kut: --logs {tmp_path / 'file'}: cannot copy the runner's logs: ")
    assert (tmp_path / "file").read_text() == "x"


@needs_upstream
def test_the_doc_table_has_every_entry_and_the_passing_ones():
    """docs/kvm-unit-tests.md keeps the whole table: one row per upstream entry, QEMU's column as RESULTS-QEMU.md
    says, the entries this file checks as PASS, and a reason for every entry hvm does not pass."""
    refs = parse_qemu_results(UPSTREAM / "RESULTS-QEMU.md")
    rows = {}
    for line in (ROOT / "docs" / "kvm-unit-tests.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in refs:
            rows[cells[0]] = cells
    assert set(rows) == set(refs)
    for name, (_, qemu, hvm, why) in rows.items():
        assert qemu == refs[name].result, name
        assert hvm.strip("*").startswith("PASS") == (name in PASSING), name
        assert why or hvm.startswith("PASS"), f"{name}: no reason given for {hvm}"
