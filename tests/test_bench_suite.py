"""The pytest-benchmark suite in bench/ (kept out of this run: `pytest bench/`) still runs:
one of its benchmarks, timing disabled, in a subprocess. A pytest / pytest-benchmark version
mismatch once broke every benchmark in the fixture's setup, before any timing; this catches
that kind of break."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_suite_runs():
    pytest.importorskip("pytest_benchmark")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join("bench", "test_microbench.py"), "-k", "small_layer",
                        "--benchmark-disable"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:])
    assert "1 passed" in r.stdout, r.stdout[-2000:]
