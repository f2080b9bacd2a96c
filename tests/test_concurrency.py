"""Concurrency: one layer called from 8 Python threads at once gives exactly (torch.equal) the
results of serial calls, on both CPU paths and for every format, including the first calls
that build the fast path's packed weight; and the kernels release the GIL (another Python
thread keeps running while a kernel call is in flight).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import lowbit
from lowbit import _backend

THREADS = 8
FORMATS = [("int8", {}), ("int4", {"group_size": 64}), ("int4", {"symmetric": True, "group_size": 32}),
           ("int4", {"group_size": 48}), ("nf4", {}), ("nf4", {"double_quant": True, "group_size": 32})]
IDS = ["int8", "int4-asym", "int4-sym", "int4-g48", "nf4", "nf4-dq"]


@pytest.fixture(params=["exact", "fast"])
def path(request):
    _backend.set_cpu_path(request.param)
    yield request.param
    _backend.set_cpu_path(None)


def run_threads(fns):
    """Start every fn in its own thread at the same moment (barrier); re-raise any error."""
    barrier = threading.Barrier(len(fns))
    errors = []

    def wrap(fn):
        def go():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
        return go

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("case", FORMATS, ids=IDS)
def test_shared_layer_from_8_threads_equals_serial(case, path):
    fmt, opts = case
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 260)
    # inputs of different sizes and dtypes, so that concurrent calls use different scratch sizes,
    # thread counts and conversion paths
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    xs = [torch.randn(1 + (7 * i) % 40, 384).to(dtypes[i % 3]) for i in range(THREADS)]
    xs[3] = torch.randn(2, 5, 384)  # leading dims
    serial_layer = lowbit.QuantLinear.from_linear(lin, fmt, **opts)
    serial = [serial_layer(x) for x in xs]
    # a fresh layer: the first calls race to build the packed weight (fast path)
    layer = lowbit.QuantLinear.from_linear(lin, fmt, **opts)
    results = [[None] * 6 for _ in range(THREADS)]

    def work(i):
        order = list(range(6))
        random.Random(i).shuffle(order)
        for r in order:
            results[i][r] = layer(xs[(i + r) % THREADS])

    run_threads([lambda i=i: work(i) for i in range(THREADS)])
    for i in range(THREADS):
        for r in range(6):
            j = (i + r) % THREADS
            assert torch.equal(results[i][r], serial[j]), (fmt, opts, path, i, r)


def test_dequantize_and_mixed_layers_from_8_threads():
    """Different layers (formats) and dequantize, all at once, on the same thread pool."""
    torch.manual_seed(1)
    layers = [lowbit.QuantLinear.from_linear(torch.nn.Linear(256, 200), f, **o) for f, o in FORMATS]
    xs = [torch.randn(9, 256) for _ in layers]
    want_y = [layer(x) for layer, x in zip(layers, xs)]
    want_w = [layer.dequantize(torch.bfloat16) for layer in layers]
    out = {}

    def work(i):
        k = i % len(layers)
        for r in range(4):
            out[i, r, "y"] = layers[k](xs[k])
            out[i, r, "w"] = layers[k].dequantize(torch.bfloat16)

    run_threads([lambda i=i: work(i) for i in range(THREADS)])
    for (i, r, kind), v in out.items():
        k = i % len(layers)
        assert torch.equal(v, want_y[k] if kind == "y" else want_w[k]), (i, r, kind)


# ---- the GIL --------------------------------------------------------------------------------------
def ticks_during(call):
    """Run call() in a worker thread while this thread counts loop iterations. Returns (the
    call's duration, the longest stretch of it during which this thread made no progress)."""
    done = threading.Event()
    span = {}
    ticks = []

    def worker():
        span["t0"] = time.perf_counter()
        call()
        span["t1"] = time.perf_counter()
        done.set()

    th = threading.Thread(target=worker)
    th.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    th.join()
    t0, t1 = span["t0"], span["t1"]
    inside = [t0] + [t for t in ticks if t0 < t < t1] + [t1]
    gap = max(b - a for a, b in zip(inside, inside[1:]))
    return t1 - t0, gap


def assert_gil_released(call, what):
    """With the GIL held the watcher stalls for the whole call (gap ~ duration, see the control
    below); released, only the OS scheduler can stall it. A loaded machine may deschedule the
    watcher for a while, hence the margin and the retries."""
    for attempt in range(5):
        dur, gap = ticks_during(call)
        assert dur > 0.05, f"{what}: the call took only {dur:.3f} s; make it longer"
        if gap < 0.75 * dur:
            return
    raise AssertionError(f"{what}: no other Python thread ran for {gap:.3f} s of a {dur:.3f} s "
                         "kernel call: the GIL is held")


def test_gil_measure_detects_a_held_gil():
    """The measure itself: list.sort holds the GIL for its whole C loop, so the watching thread
    stalls for (almost) the whole call."""
    rng = random.Random(0)
    data = [rng.random() for _ in range(1_000_000)]
    dur, gap = ticks_during(lambda: sorted(data))
    assert dur > 0.05 and gap > 0.9 * dur, (dur, gap)


def test_kernels_release_the_gil(monkeypatch):
    monkeypatch.setenv("LOWBIT_NUM_THREADS", "1")  # one core for the kernel, one for the watcher
    C = _backend.ext()
    torch.manual_seed(2)
    qw = lowbit.quantize_weight(torch.randn(1024, 1024), "int4", group_size=64)
    x = torch.randn(16, 1024)
    y = torch.empty(16, 1024)
    args = _backend._weight_args(qw)
    # one binding call that runs the kernel `repeat` times, so that the call lasts a while
    per = C.linear(*args, x.data_ptr(), 0, 16, 1024, 0, y.data_ptr(), 0, 1024, 1, "", 1)
    rep = max(2, int(0.3 / max(per, 1e-6)))
    assert_gil_released(lambda: C.linear(*args, x.data_ptr(), 0, 16, 1024, 0, y.data_ptr(), 0, 1024, 1,
                                         "", rep), "exact linear")
    blob = _backend.packed_weight(qw)
    meta = _backend._meta(qw)
    per = C.linear_packed(blob.data_ptr(), blob.numel(), *meta, x.data_ptr(), 0, 16, 1024, 0,
                          y.data_ptr(), 0, 1024, 1, "", 1)
    rep = max(2, int(0.3 / max(per, 1e-6)))
    assert_gil_released(lambda: C.linear_packed(blob.data_ptr(), blob.numel(), *meta, x.data_ptr(), 0, 16,
                                                1024, 0, y.data_ptr(), 0, 1024, 1, "", rep), "fast linear")
    big = lowbit.QuantizedWeight("nf4", (2048, 4096), torch.randint(0, 256, (2048, 2048), dtype=torch.uint8),
                                 torch.rand(2048, 64), group_size=64)
    # repeat each call so that it lasts ~0.3 s on any machine (assert_gil_released needs > 0.05 s)
    for what, fn in (("dequantize", lambda: lowbit.dequantize(big)),
                     ("fast-path packing", lambda: _backend._build_blob(big, C.active_isa()))):
        t0 = time.perf_counter()
        fn()
        rep = max(2, int(0.3 / max(time.perf_counter() - t0, 1e-3)))
        assert_gil_released(lambda: [fn() for _ in range(rep)], what)
