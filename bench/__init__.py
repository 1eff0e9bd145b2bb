"""hvm's benchmark suite: `make bench` (or `python -m bench [--quick]` from the repository root).

bench/cref.c is the C reference VMM, firmware/bench_*.S the guest loops, docs/performance.md what the
figures mean. Raw results go to bench/results/ (not in git)."""
