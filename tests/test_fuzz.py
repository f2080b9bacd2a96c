"""Property tests (hypothesis): every CPU kernel, the fast path and the Triton kernels (under
the interpreter) against lowbit.reference, on random formats x group sizes x shapes x
activation dtypes x memory layouts.

Drawn per example: the format (int8; int4 asymmetric / symmetric; nf4; nf4 double-quant), the
group size (-1, 16 .. 256, multiples of 16 that need not divide K: ragged last groups), N and K
from 1 (odd K, K below / above one group), M from 0, leading dims (none: a 1-D x; one; two),
the activation dtype (float32 / bfloat16 / float16), the bias (none, or float32 / bf16 / f16),
the ISA (every one this CPU runs, forced with lowbit.set_isa), and x's layout:

* ``contiguous``;
* ``offset``: a slice of a wider tensor (row stride > K, storage offset);
* ``transposed``: x built as [K, M] and transposed (inner stride != 1);
* ``unaligned``: x starts one element into its storage (data pointer off by 2 or 4 bytes
  from the allocator's alignment, so no SIMD load is aligned);
* ``row_step``: every other row of a taller tensor.

The weight's own tensors may also start one element into their storage (``weight_offset``),
which makes the kernels' code loads unaligned.

Checks: dequantize bit-exact (torch.equal); linear within lowbit.testing's float32 tolerance on
the exact path, and bit-identical to the same call on a contiguous copy of x (a layout must not
change a single bit); the fast path within its own quantization bound (tests/test_fast_path.py).

Settings: a fixed seed (``FUZZ_SEED``) and bounded example counts so CI sees the same examples
every run; ``LOWBIT_FUZZ_SEED`` / ``LOWBIT_FUZZ_SCALE`` (a multiplier on the example counts)
explore further, e.g. ``LOWBIT_FUZZ_SCALE=20 LOWBIT_FUZZ_SEED=$RANDOM pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, seed, settings
from hypothesis import strategies as st

import lowbit
from lowbit import _backend
from lowbit import reference as R
from lowbit.testing import accumulation_rtol, assert_linear_close

from test_fast_path import assert_fast_close, supported as fast_supported

FUZZ_SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "20240917"))
SCALE = float(os.environ.get("LOWBIT_FUZZ_SCALE", "1"))

settings.register_profile(
    "lowbit-fuzz", deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("lowbit-fuzz")


def n_examples(n: int) -> int:
    return max(1, int(n * SCALE))


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VARIANTS = ("int8", "int4-asym", "int4-sym", "nf4", "nf4-dq")
GROUPS = (-1, 16, 32, 48, 64, 80, 128, 256)
LAYOUTS = ("contiguous", "offset", "transposed", "unaligned", "row_step")


def supported_isas():
    return list(_backend.ext().supported_isas())


def quantize(variant: str, N: int, K: int, group: int, wseed: int, scale: float,
             zero_rows: bool, weight_offset: bool) -> lowbit.QuantizedWeight:
    g = torch.Generator().manual_seed(wseed)
    w = torch.randn(N, K, generator=g) * scale
    if zero_rows:  # all-zero rows / groups: scale 0 (the quantizers' 0/0 guard)
        w[::3] = 0
        w[:, : min(K, 16)] = 0
    fmt, _, kind = variant.partition("-")
    opts = {}
    if fmt != "int8":
        opts["group_size"] = group
    if kind == "sym":
        opts["symmetric"] = True
    if kind == "dq":
        opts["double_quant"] = True
    qw = lowbit.quantize_weight(w, fmt, **opts)
    if weight_offset:
        qw = _offset_copy(qw)
    return qw


def _offset_copy(qw: lowbit.QuantizedWeight) -> lowbit.QuantizedWeight:
    """The same weight with every tensor starting one element into a larger storage."""
    def shifted(t):
        if t is None:
            return None
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    return lowbit.QuantizedWeight(qw.fmt, qw.shape, shifted(qw.data), shifted(qw.scales),
                                  shifted(qw.zeros), group_size=qw.group_size,
                                  symmetric=qw.symmetric, double_quant=qw.double_quant,
                                  dq_scale=shifted(qw.dq_scale), dq_offset=shifted(qw.dq_offset))


def make_x(lead, K: int, dtype, layout: str, xseed: int, scale: float) -> torch.Tensor:
    """Activations of shape [*lead, K] in ``dtype`` with the given memory layout."""
    g = torch.Generator().manual_seed(xseed)
    M = 1
    for d in lead:
        M *= d

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if layout == "offset":
        base = rnd(*lead, K + 13)
        x = base[..., 5:5 + K]
    elif layout == "transposed" and len(lead) == 1:
        x = rnd(K, lead[0]).t()
    elif layout == "unaligned":
        buf = rnd(M * K + 1)
        x = buf[1:].view(*lead, K)
    elif layout == "row_step" and len(lead) >= 1:
        x = rnd(*lead[:-1], 2 * lead[-1], K)[..., ::2, :]
    else:
        x = rnd(*lead, K)
    assert tuple(x.shape) == (*lead, K)
    return x


@st.composite
def weights(draw):
    variant = draw(st.sampled_from(VARIANTS))
    K = draw(st.one_of(st.integers(1, 80), st.integers(81, 700),
                       st.sampled_from([15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 576])))
    N = draw(st.one_of(st.integers(1, 20), st.integers(21, 70)))
    group = -1 if variant == "int8" else draw(st.sampled_from(GROUPS))
    return dict(variant=variant, N=N, K=K, group=group, wseed=draw(st.integers(0, 2**31 - 1)),
                scale=draw(st.sampled_from([1e-3, 1.0, 50.0])), zero_rows=draw(st.booleans()),
                weight_offset=draw(st.booleans()))


@st.composite
def activations(draw):
    lead = draw(st.one_of(st.just(()),                                   # 1-D x
                          st.tuples(st.integers(0, 9)),                  # [M, K], M = 0 included
                          st.tuples(st.integers(0, 3), st.integers(1, 5)),  # [a, b, K]
                          st.tuples(st.integers(10, 40))))
    return dict(lead=lead, dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)),
                xseed=draw(st.integers(0, 2**31 - 1)), scale=draw(st.sampled_from([1e-2, 1.0, 30.0])),
                bias=draw(st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16])))


class forced_isa:
    """lowbit.set_isa(isa) for a block, then back to the ISA that was active before."""

    def __init__(self, isa: str):
        self.isa = isa

    def __enter__(self):
        self.prev = _backend.ext().active_isa()
        lowbit.set_isa(self.isa)

    def __exit__(self, *exc):
        lowbit.set_isa(self.prev)


class cpu_path:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        _backend.set_cpu_path(self.path)

    def __exit__(self, *exc):
        _backend.set_cpu_path(None)


def build(wcase, acase):
    qw = quantize(**wcase)
    N, K = qw.shape
    x = make_x(acase["lead"], K, acase["dtype"], acase["layout"], acase["xseed"], acase["scale"])
    bias = None
    if acase["bias"] is not None:
        bias = torch.randn(N, generator=torch.Generator().manual_seed(acase["xseed"] + 1)).to(acase["bias"])
    if x.dtype == torch.float16:
        # keep float16 outputs clear of overflow (65504): a sum a hair either side of 65520
        # rounds to inf on one side only, which says nothing about the kernel
        y32 = R.linear(x.float(), qw, None if bias is None else bias.float())
        assume(y32.numel() == 0 or float(y32.abs().max()) < 6.0e4)
    return qw, x, bias


EDGE_W = [dict(variant="int4-asym", N=3, K=1, group=16, wseed=1, scale=1.0, zero_rows=False, weight_offset=True),
          dict(variant="nf4-dq", N=17, K=577, group=16, wseed=2, scale=1.0, zero_rows=True, weight_offset=False),
          dict(variant="int8", N=1, K=33, group=-1, wseed=3, scale=50.0, zero_rows=False, weight_offset=True)]
EDGE_X = [dict(lead=(0,), dtype=torch.bfloat16, layout="offset", xseed=4, scale=1.0, bias=torch.float32),
          dict(lead=(), dtype=torch.float16, layout="unaligned", xseed=5, scale=1.0, bias=None),
          dict(lead=(2, 3), dtype=torch.float32, layout="row_step", xseed=6, scale=30.0, bias=torch.float16)]


# ---- the exact CPU path, every ISA ----------------------------------------------------------------
@settings(FUZZ, max_examples=n_examples(300))
@seed(FUZZ_SEED)
@given(w=weights(), a=activations(), isa=st.sampled_from(supported_isas()))
@example(w=EDGE_W[0], a=EDGE_X[0], isa="scalar")
@example(w=EDGE_W[1], a=EDGE_X[1], isa=supported_isas()[0])
@example(w=EDGE_W[2], a=EDGE_X[2], isa=supported_isas()[0])
def test_linear_any_layout_matches_reference(w, a, isa):
    qw, x, bias = build(w, a)
    N, K = qw.shape
    with cpu_path("exact"), forced_isa(isa):
        y = lowbit.linear(x, qw, bias)
        y_contig = lowbit.linear(x.contiguous(), qw, bias)
    assert y.dtype == x.dtype and tuple(y.shape) == (*x.shape[:-1], N)
    assert_linear_close(y, R.linear(x, qw, bias), x, qw, bias=bias, msg=f"{isa} {w} {a}")
    # the layout of x must not change a bit of the result
    assert torch.equal(y, y_contig), f"{isa}: layout {a['layout']} changed the result"


@settings(FUZZ, max_examples=n_examples(200))
@seed(FUZZ_SEED)
@given(w=weights(), dtype=st.sampled_from(DTYPES), isa=st.sampled_from(supported_isas()))
@example(w=EDGE_W[1], dtype=torch.bfloat16, isa="scalar")
def test_dequantize_bit_exact(w, dtype, isa):
    qw = quantize(**w)
    with forced_isa(isa):
        got = lowbit.dequantize(qw, dtype)
    assert got.dtype == dtype and tuple(got.shape) == qw.shape
    assert torch.equal(got, R.dequantize(qw, dtype)), f"{isa} {w} {dtype}"


# ---- the fast (int8-activation) CPU path ---------------------------------------------------------
@settings(FUZZ, max_examples=n_examples(200))
@seed(FUZZ_SEED)
@given(w=weights(), a=activations(), isa=st.sampled_from(supported_isas()))
@example(w=EDGE_W[2], a=EDGE_X[2], isa=supported_isas()[0])
def test_fast_path_any_layout_within_bound(w, a, isa):
    qw, x, bias = build(w, a)
    with cpu_path("fast"), forced_isa(isa):
        y = lowbit.linear(x, qw, bias)
        y_contig = lowbit.linear(x.contiguous(), qw, bias)
    with cpu_path("exact"), forced_isa(isa):
        y_exact = lowbit.linear(x, qw, bias)
    assert tuple(y.shape) == (*x.shape[:-1], qw.shape[0]) and y.dtype == x.dtype
    assert torch.equal(y, y_contig), f"{isa}: layout {a['layout']} changed the fast path's result"
    if not fast_supported(qw):  # group not a multiple of 32: the exact path, bit for bit
        assert torch.equal(y, y_exact)
    elif y.numel():
        assert_fast_close(y, R.linear(x, qw, bias), x, qw, bias, msg=f"{isa} {w} {a}")


# ---- the Triton kernels under the interpreter (tiny shapes) ------------------------------------
@pytest.fixture(scope="module")
def triton_kernels():
    pytest.importorskip("triton", reason="Triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 here (tests/conftest.py sets it)")
    import lowbit.kernels as LK
    if not LK.AVAILABLE:
        pytest.skip("lowbit.kernels reports no Triton backend")
    return LK


@st.composite
def tiny_weights(draw):
    variant = draw(st.sampled_from(VARIANTS))
    group = -1 if variant == "int8" else draw(st.sampled_from((-1, 16, 32, 48, 64)))
    return dict(variant=variant, N=draw(st.integers(1, 20)), K=draw(st.integers(1, 150)), group=group,
                wseed=draw(st.integers(0, 2**31 - 1)), scale=1.0, zero_rows=draw(st.booleans()),
                weight_offset=False)


@settings(FUZZ, max_examples=n_examples(15))
@seed(FUZZ_SEED)
@given(w=tiny_weights(), dtype=st.sampled_from(DTYPES), M=st.integers(0, 5),
       layout=st.sampled_from(LAYOUTS), xseed=st.integers(0, 1000))
def test_triton_kernels_interpreted(triton_kernels, w, dtype, M, layout, xseed):
    LK = triton_kernels
    qw = quantize(**w)
    N, K = qw.shape
    got = LK.dequantize(qw, dtype)
    assert torch.equal(got, R.dequantize(qw, dtype)), f"triton dequantize {w} {dtype}"
    x = make_x((M,), K, dtype, layout, xseed, 1.0)
    y = LK.linear(x, qw)
    assert tuple(y.shape) == (M, N) and y.dtype == dtype
    if M == 0:
        return
    choice = LK.plan(x, qw, M)
    rtol = None
    if dtype != torch.float32 and choice.kernel != "gemv":
        # kernels whose tile holds the weight rounded to x's dtype (tests/test_gpu_kernels.py):
        # each product carries one more rounding of at most half an ulp of that dtype
        rtol = accumulation_rtol(K) + torch.finfo(dtype).eps / 2
    assert_linear_close(y, R.linear(x, qw), x, qw, rtol=rtol, msg=f"triton {choice.kernel} {w} {dtype} {layout}")
