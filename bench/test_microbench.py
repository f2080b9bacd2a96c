"""Per-kernel micro-benchmarks (pytest-benchmark), kept out of the test run:

    .venv/bin/python -m pytest bench/ [--benchmark-json out.json] [-k int4]

Each benchmark times one call of a lowbit CPU kernel (linear on the exact and fast paths,
dequantize) or its torch baseline on a small LLM-like shape, after checking the output against
lowbit.reference once (a wrong kernel is not worth timing). Weights here fit the caches: these
are kernel micro-benchmarks; the bandwidth-bound figures with weights rotated past the L3 are
``lowbit bench`` / bench/cpu.py.
"""

import pytest
import torch

import lowbit
from lowbit import _backend
from lowbit import reference as R
from lowbit.testing import assert_linear_close

pytest.importorskip("pytest_benchmark")

SHAPES = [(2048, 2048)]  # (K, N)
MS = [1, 16]
FORMATS = [("int8", {}), ("int4", {"group_size": 128}), ("nf4", {"group_size": 64})]


def _id(fmt_opts):
    fmt, opts = fmt_opts
    return fmt + "".join(f"-g{v}" for v in opts.values())


@pytest.fixture(params=["exact", "fast"])
def cpu_path(request):
    _backend.set_cpu_path(request.param)
    yield request.param
    _backend.set_cpu_path(None)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt_opts", FORMATS, ids=_id)
def test_linear(benchmark, cpu_path, K, N, M, fmt_opts):
    fmt, opts = fmt_opts
    torch.manual_seed(0)
    qw = lowbit.quantize_weight(torch.randn(N, K) * 0.02, fmt, **opts)
    x = torch.randn(M, K)
    y = lowbit.linear(x, qw)
    if cpu_path == "exact":
        assert_linear_close(y, R.linear(x, qw), x, qw)
    else:  # int8-activation path: its own documented bound (tests/test_fast_path.py)
        ref = R.linear(x, qw)
        assert float((y - ref).norm() / ref.norm()) < 2e-2
    benchmark.extra_info.update(fmt=fmt, M=M, K=K, N=N, path=cpu_path)
    benchmark(lowbit.linear, x, qw)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("fmt_opts", FORMATS, ids=_id)
def test_dequantize(benchmark, K, N, fmt_opts):
    fmt, opts = fmt_opts
    qw = lowbit.quantize_weight(torch.randn(N, K), fmt, **opts)
    assert torch.equal(lowbit.dequantize(qw), R.dequantize(qw))
    benchmark(lowbit.dequantize, qw)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_linear_baseline(benchmark, K, N, M, dtype):
    w = torch.randn(N, K).to(dtype)
    x = torch.randn(M, K).to(dtype)
    benchmark(torch.nn.functional.linear, x, w)


def test_linear_call_overhead_small_layer(benchmark):
    """lowbit.linear on a small layer (576x576 int4 g64 at M = 1: the bundled SmolLM2's size) on
    the fast path, beside the kernel's own time (the C++ call repeated with no Python in
    between); issue 3 asks for a ratio <= 2. Both and the ratio land in extra_info."""
    import statistics
    import time

    C = _backend.ext()
    _backend.set_cpu_path("fast")
    try:
        torch.manual_seed(0)
        qw = lowbit.quantize_weight(torch.randn(576, 576) * 0.02, "int4", group_size=64)
        x = torch.randn(1, 576)
        y = lowbit.linear(x, qw)
        ref = R.linear(x, qw)
        assert float((y - ref).norm() / ref.norm()) < 2e-2
        b = _backend._packed(qw, C.active_isa())
        out = torch.empty(1, 576)
        nt = _backend.num_threads()
        # kernel and call timed in alternating rounds (this VM's speed drifts by up to 1.5x
        # over seconds: timing one after the other skewed the ratio either way)
        kernels, calls = [], []
        for _ in range(15):
            kernels.append(C.linear_packed(b.ptr, b.nbytes, *b.meta, x.data_ptr(), 0, 1, 576, 0,
                                           out.data_ptr(), 0, 576, nt, C.active_isa(), 500))
            t0 = time.perf_counter()
            for _ in range(500):
                lowbit.linear(x, qw)
            calls.append((time.perf_counter() - t0) / 500)
        kernel_s, call_s = min(kernels), min(calls)
        benchmark.extra_info.update(kernel_us=kernel_s * 1e6, call_us=call_s * 1e6, ratio=call_s / kernel_s,
                                    median_call_us=statistics.median(calls) * 1e6)
        benchmark(lowbit.linear, x, qw)
    finally:
        _backend.set_cpu_path(None)
