"""The activation-quantized CPU fast path (lowbit._backend, csrc/kernel_api.h "fast path").

What it computes: each activation row is quantized in blocks of B along K (QBLOCK: 16 columns
for int8 weights, 8 for int4, nf4 and fp4),

    a = max |x| over the block,  d = a / 127,  q = round_half_even(x * (127 / a))  in [-127, 127]

(float32 operations; a block with a < 2^-120 quantizes to 0), and y = x_hat @ W_fast^T with
x_hat = q * d and W_fast the weight as integer codes times its scales: int8 and int4 exactly
the reference's weights, nf4 and fp4 with the codebook as 14-bit integers (round(S * value),
times absmax / S, S = lowbit.formats.CODE_SCALE: 8128 for nf4, rounded; 8064 for fp4, exact;
the kernels take them as two int8 terms).

Tolerance (fast_tolerance below), derived from that quantization, not fitted:

    |y_fast - y_ref| <= sum_k |w_k| * (d_k / 2 + 1e-6 |x_k|)                 activation rounding
                      + sum_k |x_hat_k| * absmax_k * (e_cb + 1e-6)           nf4 / fp4 integer codes
                      + 1e-5 * (sum_k |w_k x_k| + sum_k |x_hat_k| |c_k + z_k| |s_k|)  float sums

where d_k is the scale of x_k's block, e_cb = max_i |round(S cb_i) / S - cb_i| (nf4 < 0.5 / 8128;
fp4 only the float32 rounding of its table)
and the last term is the float32 accumulation (as lowbit.testing allows the exact path, with
the zero-point kept apart from the codes as the kernels do). Rounding x * 127/a is off by at
most half a code (d / 2) plus the roundings of d and 127/a (the 1e-6 |x| term). This is a
worst-case bound (all errors aligned); the typical error is far smaller (test_accuracy_figures).
bf16 / f16 outputs add one ulp of the output, as in lowbit.testing.
"""

import math

import pytest
import torch

import lowbit
from lowbit import _backend
from lowbit import formats as F
from lowbit import reference as R
from lowbit import testing as T

from conftest import FORMAT_CASES, NEW_FORMAT_CASES, case_id

# fp4 (bitsandbytes' default 4-bit type) takes the fast path wherever nf4 does: every nf4 case of
# FORMAT_CASES again as fp4 (blocks of 32 / 64 / 128, one per row, double quant, blocks of 16 on
# the exact path).
FP4_CASES = [("fp4", opts) for fmt, opts in FORMAT_CASES if fmt == "nf4"]
FAST_CASES = FORMAT_CASES + FP4_CASES
# the variants without a fast-path kernel
EXACT_ONLY_CASES = [c for c in NEW_FORMAT_CASES if c[0] != "fp4"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KS = (1, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129, 257, 576, 1000)
NS = (1, 3, 17, 40)
MS = (1, 2, 3, 5, 9)
# The spec in torch and its bound live in lowbit.testing (`lowbit selftest` checks the fast path
# with them on a user's machine); these tests hold the kernels to them.
QBLOCK = T.FAST_QBLOCK  # activation block per weight format
QCHUNK = T.FAST_QCHUNK  # weight-code chunk: groups must be whole chunks, or one group per row
# the codebook formats' fast-path codes, round(CODE_SCALE * codebook)
CODEBOOK_CODES = {fmt: list(F.codebook_int_codes(fmt)) for fmt in F.CODE_SCALE}
quantize_activations = T.fast_quantize_activations
fast_tolerance = T.fast_linear_tolerance


@pytest.fixture(autouse=True)
def _default_path(monkeypatch):
    # The fast path is opt-in (the default is exact): these tests exercise it through the
    # variable, as a user would.
    monkeypatch.setenv("LOWBIT_CPU_PATH", "fast")
    _backend.set_cpu_path(None)
    yield
    _backend.set_cpu_path(None)


def supported(qw) -> bool:
    """The fast path takes one group per row or groups that are a multiple of 32."""
    K = qw.shape[1]
    g = F.effective_group(qw.group_size, K)
    return qw.n_groups == 1 or g % QCHUNK == 0


def assert_fast_close(got, expected, x, qw, bias=None, msg=""):
    tol = fast_tolerance(x, qw, expected, bias)
    err = (got.double() - expected.double()).abs()
    ratio = (err / tol.double()).nan_to_num(math.inf)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    assert worst <= 1.0, f"{msg}: fast path beyond its quantization bound ({worst:.3g}x)"


def run(isa, x, qw, bias=None, path="fast"):
    N, K = qw.shape
    x2d = x.reshape(-1, K)
    out = torch.empty(x2d.shape[0], N, dtype=x.dtype)
    b = None if bias is None else bias.float().contiguous()
    _backend.linear(x2d, qw, b, out, isa=isa, path=path)
    return out.reshape(*x.shape[:-1], N)


def assert_tile_close(got, x, qw, msg=""):
    """The tile path (csrc/kernel_api.h, AMX): x rounded to bf16 (within 2^-9 |x|), integer
    codes exact, float32 sums: 2^-9 sum |w x| + 1e-5 of the sum of |terms| (codes and
    zero-points apart), plus nf4's / fp4's 14-bit codes as in the fast bound."""
    N, K = qw.shape
    x64 = x.reshape(-1, K).double()
    w = R.dequantize(qw).double()
    g = F.effective_group(qw.group_size, K)
    extra = 0.0
    if qw.fmt == "int4":
        c = R.unpack_nibbles(qw.data, K).double()
        z = torch.full_like(qw.scales, 8.0) if qw.zeros is None else qw.zeros.double()
        wmag = (c + R.per_element(z, g, K).double()) * R.per_element(qw.scales, g, K).double().abs()
    elif qw.fmt in F.CODE_SCALE:  # nf4 / fp4
        # absmax per element: the scales decoded as nf4's code 15 (1.0), whatever the format
        from lowbit.qweight import QuantizedWeight
        amax = R.dequantize(QuantizedWeight(
            "nf4", (N, K), torch.full_like(qw.data, 0xFF), qw.scales, group_size=qw.group_size,
            double_quant=qw.double_quant, dq_scale=qw.dq_scale, dq_offset=qw.dq_offset)).double().abs()
        S = F.CODE_SCALE[qw.fmt]
        e_cb = max(abs(i / S - v) for i, v in zip(CODEBOOK_CODES[qw.fmt], F.CODEBOOKS[qw.fmt]))
        wmag = w.abs()
        extra = x64.abs() @ (amax * (e_cb + 1e-6)).T
    else:
        wmag = w.abs()
    tol = 2.0 ** -9 * (x64.abs() @ w.abs().T) + 1e-5 * (x64.abs() @ wmag.T) + extra + 1e-30
    err = (got.reshape(-1, N).double() - R.linear(x, qw).reshape(-1, N).double()).abs()
    assert bool((err <= tol).all()), (msg, float((err / tol).max()))


# ---- the activation quantizer ------------------------------------------------------------------
@pytest.mark.parametrize("block", (8, 16))
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_activation_quantizer_matches_spec_bit_for_bit(isa, dt, block):
    C = _backend.ext()
    assert C.QBLOCK == QBLOCK
    for K in (1, 5, 31, 32, 33, 100, 1000):
        x = (torch.randn(7, K) * torch.logspace(-3, 3, 7)[:, None]).to(dt)
        x[1, :] = 0
        x[2, :] = x[2, :] * 1e-38  # subnormal / tiny blocks
        x[3, 0] = 127.0  # exact .5 ties after scaling
        x[3, 1:] = torch.arange(K - 1).to(x.dtype) % 255 - 127 + 0.5
        if K > 40:
            x[4, 40] = math.inf
            x[5, 33] = math.nan
            x[6, 16:32] = 0
        ldq = -(-K // QCHUNK) * QCHUNK
        nb = ldq // block
        q = torch.empty(7, ldq, dtype=torch.int8)
        d = torch.empty(7, nb)
        s = torch.empty(7, nb, dtype=torch.int32)
        C.quantize_activations(x.data_ptr(), _backend.DTYPE_IDS[dt], 7, K, K, block, q.data_ptr(),
                               d.data_ptr(), s.data_ptr(), isa)
        wq, wd, ws = quantize_activations(x, block)
        assert torch.equal(q, wq), (isa, K)
        assert torch.equal(s, ws), (isa, K)
        assert torch.equal(d.isnan(), wd.isnan()) and torch.equal(d.nan_to_num(), wd.nan_to_num()), (isa, K)


# ---- linear through the fast path --------------------------------------------------------------
@pytest.mark.parametrize("case", FAST_CASES, ids=case_id)
def test_fast_linear_within_quantization_bound(isa, case):
    fmt, opts = case
    for K in KS:
        N = NS[K % len(NS)]
        qw = lowbit.quantize_weight(torch.randn(N, K), fmt, **opts)
        for M in MS:
            dt = DTYPES[(K + M) % 3]
            x = torch.randn(M, K).to(dt)
            bias = torch.randn(N) if M % 2 else None
            got = run(isa, x, qw, bias)
            if not supported(qw):  # falls back to the exact path, bit for bit
                assert torch.equal(got, run(isa, x, qw, bias, path="exact")), (fmt, opts, K)
                continue
            assert_fast_close(got, R.linear(x, qw, bias), x, qw, bias, msg=f"{isa} {fmt} {opts} K={K} M={M}")


def test_every_format_has_a_fast_path(isa):
    C = _backend.ext()
    for fmt in ("int8", "int4", "nf4", "fp4"):
        assert C.has_fast_path(fmt, isa) is True, (isa, fmt)
    for fmt, opts in [("fp4", {}), ("fp4", {"double_quant": True}), ("fp4", {"group_size": -1})]:
        assert _backend.packed_weight(lowbit.quantize_weight(torch.randn(17, 96), fmt, **opts), isa) is not None


@pytest.mark.parametrize("case", EXACT_ONLY_CASES, ids=case_id)
def test_interop_variants_take_the_exact_path(isa, case):
    """No fast-path kernel for int8 with groups / zero-points and int4 float offsets: no packed
    form, and lowbit.linear on the fast path gives the exact path's result bit for bit (a
    symmetric int8 weight with one group is plain per-row int8, which has one)."""
    fmt, opts = case
    for K in (1, 33, 64, 129, 576):
        qw = lowbit.quantize_weight(torch.randn(17, K), fmt, **opts)
        if fmt == "int8" and qw.symmetric and qw.n_groups == 1:
            assert _backend.packed_weight(qw, isa) is not None
            continue
        assert _backend.packed_weight(qw, isa) is None, (fmt, opts, K)
        for M in (1, 5):
            x = torch.randn(M, K)
            assert torch.equal(run(isa, x, qw), run(isa, x, qw, path="exact")), (fmt, opts, K, M)


@pytest.mark.parametrize("fmt,opts", [("int8", {}), ("int4", {}), ("int4", {"symmetric": True, "group_size": 32}),
                                      ("nf4", {}), ("nf4", {"double_quant": True}),
                                      ("fp4", {}), ("fp4", {"double_quant": True, "group_size": 128})])
def test_every_isa_matches_scalar_fast_path_tightly(isa, fmt, opts):
    """Same quantized activations, exact integer dots: only float summation order differs."""
    qw = lowbit.quantize_weight(torch.randn(100, 1000), fmt, **opts)
    tile_m = _backend.ext().tile_min_m(isa, fmt)
    for M in (1, 4, 9, 33):
        x = torch.randn(M, 1000)
        got, gen = run(isa, x, qw), run("scalar", x, qw)
        if tile_m and M >= tile_m:
            assert_tile_close(got, x, qw, msg=f"{isa} {fmt} M={M}")
            continue
        tol = fast_tolerance(x, qw, gen)
        tight = fast_tolerance(x, qw, gen, magnitude_only=True).double()
        err = (got.double() - gen.double()).abs()
        assert bool((err <= tight + 1e-30).all()), (isa, fmt, float((err / tight).max()))
        assert bool((err <= tol.double()).all())


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_larger_shapes_all_dtypes(isa, dt):
    if isa == "scalar":
        pytest.skip("the scalar path is covered on small shapes")
    for fmt, opts in [("int8", {}), ("int4", {}), ("nf4", {"double_quant": True}), ("fp4", {}),
                      ("fp4", {"double_quant": True, "group_size": 32})]:
        qw = lowbit.quantize_weight(torch.randn(300, 1536), fmt, **opts)
        for M in (1, 3, 8, 33):
            x = torch.randn(M, 1536).to(dt)
            assert_fast_close(run(isa, x, qw), R.linear(x, qw), x, qw, msg=f"{isa} {fmt} M={M}")


def test_public_linear_leading_dims_strides_and_dtypes():
    qw = lowbit.quantize_weight(torch.randn(24, 96), "int4", group_size=32)
    bias = torch.randn(24)
    base = torch.randn(2, 3, 200)
    cases = {
        "3d": torch.randn(2, 3, 96),
        "non-contiguous rows": base[..., 10:106],
        "transposed": torch.randn(96, 6).t(),
        "single row": torch.randn(96),
        "empty": torch.randn(0, 96),
    }
    for name, x in cases.items():
        for dt in DTYPES:
            xd = x.to(dt)
            y = lowbit.linear(xd, qw, bias)
            assert y.dtype == dt and y.shape == (*x.shape[:-1], 24), name
            if xd.numel():
                assert_fast_close(y, R.linear(xd, qw, bias), xd, qw, bias, msg=name)


def test_bias_dtype_and_quantlinear_forward():
    lin = torch.nn.Linear(200, 48)
    for fmt, opts in [("int8", {}), ("int4", {"group_size": 64}), ("nf4", {}), ("fp4", {})]:
        q = lowbit.QuantLinear.from_linear(lin, fmt, **opts)
        x = torch.randn(3, 5, 200)
        qw = lowbit.quantize_weight(lin.weight, fmt, **opts)
        assert_fast_close(q(x), R.linear(x, qw, lin.bias), x, qw, lin.bias, msg=fmt)
    qw = lowbit.quantize_weight(torch.randn(16, 64), "int8")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    b16 = torch.randn(16, dtype=torch.float16)
    assert_fast_close(lowbit.linear(x, qw, b16), R.linear(x, qw, b16), x, qw, b16)


def test_non_finite_activations_give_nan():
    qw = lowbit.quantize_weight(torch.randn(16, 64), "int4", group_size=32)
    x = torch.randn(2, 64)
    x[0, 5] = math.inf
    y = lowbit.linear(x, qw)
    assert bool(y[0].isnan().all()) and bool(y[1].isfinite().all())


@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
def test_threads_give_identical_results(monkeypatch, fmt):
    qw = lowbit.quantize_weight(torch.randn(1000, 512), fmt)
    for M in (1, 7):
        x = torch.randn(M, 512)
        monkeypatch.setenv("LOWBIT_NUM_THREADS", "1")
        one = lowbit.linear(x, qw)
        for n in ("2", "3", "8"):
            monkeypatch.setenv("LOWBIT_NUM_THREADS", n)
            assert torch.equal(lowbit.linear(x, qw), one), (fmt, M, n)


# ---- path selection, the exact path, the packed-weight cache -----------------------------------
def test_both_paths_selectable_and_exact_path_unchanged(monkeypatch):
    C = _backend.ext()
    qw = lowbit.quantize_weight(torch.randn(40, 256), "int4")
    x = torch.randn(5, 256)
    direct = torch.empty(5, 40)
    # the exact kernel called directly, as lowbit.linear did before the fast path existed
    C.linear(*_backend._weight_args(qw), x.data_ptr(), 0, 5, 256, 0, direct.data_ptr(), 0, 40,
             _backend.num_threads(), "")
    monkeypatch.delenv("LOWBIT_CPU_PATH", raising=False)
    assert _backend.cpu_path() == "exact"  # the default
    assert torch.equal(lowbit.linear(x, qw), direct)
    monkeypatch.setenv("LOWBIT_CPU_PATH", "fast")
    fast = lowbit.linear(x, qw)
    assert not torch.equal(fast, direct)  # the activations were quantized
    monkeypatch.setenv("LOWBIT_CPU_PATH", "exact")
    assert _backend.cpu_path() == "exact"
    assert torch.equal(lowbit.linear(x, qw), direct)
    _backend.set_cpu_path("fast")  # wins over the variable
    assert torch.equal(lowbit.linear(x, qw), fast)
    _backend.set_cpu_path("exact")
    monkeypatch.setenv("LOWBIT_CPU_PATH", "fast")
    assert torch.equal(lowbit.linear(x, qw), direct)
    _backend.set_cpu_path(None)
    assert torch.equal(lowbit.linear(x, qw), fast)
    with pytest.raises(ValueError, match="CPU path"):
        _backend.set_cpu_path("fastest")
    monkeypatch.setenv("LOWBIT_CPU_PATH", "bogus")
    with pytest.raises(ValueError, match="LOWBIT_CPU_PATH"):
        lowbit.linear(x, qw)
    assert lowbit.backend_info()["cpu_path"].startswith("invalid")  # info still answers


def test_public_cpu_path_switch(monkeypatch):
    """lowbit.set_cpu_path / lowbit.cpu_path are the public face of the switch, and
    backend_info reports the path in force."""
    monkeypatch.delenv("LOWBIT_CPU_PATH", raising=False)
    qw = lowbit.quantize_weight(torch.randn(24, 128), "nf4")
    x = torch.randn(3, 128)
    try:
        assert lowbit.cpu_path() == "exact" and lowbit.backend_info()["cpu_path"] == "exact"
        exact = lowbit.linear(x, qw)
        lowbit.set_cpu_path("fast")
        assert lowbit.cpu_path() == "fast" and lowbit.backend_info()["cpu_path"] == "fast"
        fast = lowbit.linear(x, qw)
        assert not torch.equal(fast, exact)
        T.assert_fast_linear_close(fast, R.linear(x, qw), x, qw)
        with pytest.raises(ValueError, match="CPU path"):
            lowbit.set_cpu_path("turbo")
        assert lowbit.cpu_path() == "fast"  # a refused value changes nothing
    finally:
        lowbit.set_cpu_path(None)
    assert lowbit.cpu_path() == "exact" and torch.equal(lowbit.linear(x, qw), exact)


def test_using_cpu_path_restores_the_choice_in_force(monkeypatch):
    """_backend.using_cpu_path (the benchmark's, eval's and the demo's temporary switch) puts
    back the earlier choice, an error in the block included; None changes nothing."""
    monkeypatch.setenv("LOWBIT_CPU_PATH", "fast")
    _backend.set_cpu_path("exact")
    try:
        with _backend.using_cpu_path("fast"):
            assert _backend.cpu_path() == "fast"
            with pytest.raises(RuntimeError):
                with _backend.using_cpu_path("exact"):
                    assert _backend.cpu_path() == "exact"
                    raise RuntimeError("inside")
            assert _backend.cpu_path() == "fast"
        assert _backend.cpu_path() == "exact"
        with _backend.using_cpu_path(None):
            assert _backend.cpu_path() == "exact"
        _backend.set_cpu_path(None)
        with _backend.using_cpu_path("exact"):
            assert _backend.cpu_path() == "exact"
        assert _backend.cpu_path() == "fast"  # back to LOWBIT_CPU_PATH, not pinned
    finally:
        _backend.set_cpu_path(None)


def test_packed_weight_cached_per_isa_and_rebuilt_on_change():
    C = _backend.ext()
    qw = lowbit.quantize_weight(torch.randn(40, 256), "int4")
    x = torch.randn(3, 256)
    y0 = lowbit.linear(x, qw)
    active = C.active_isa()
    blob = qw.cache["cpu_packed:" + active].blob.tensor
    assert blob is not None and blob.dtype == torch.uint8
    lowbit.linear(x, qw)
    assert qw.cache["cpu_packed:" + active].blob.tensor is blob  # built once
    for isa in C.supported_isas():  # forcing another ISA packs for it too
        run(isa, x, qw)
        assert qw.cache["cpu_packed:" + isa].blob.tensor is not None
    assert qw.cache["cpu_packed:" + active].blob.tensor is blob
    # a fresh QuantizedWeight around the same tensors (the torch.library op path) reuses it
    qw2 = lowbit.QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scales, qw.zeros, group_size=qw.group_size,
                                 symmetric=qw.symmetric)
    assert torch.equal(lowbit.linear(x, qw2), y0)
    assert qw2.cache["cpu_packed:" + active].blob.tensor is blob
    # an in-place update of the weight (load_state_dict copies into the buffers) repacks
    other = lowbit.quantize_weight(torch.randn(40, 256), "int4")
    for f in ("data", "scales", "zeros"):
        getattr(qw, f).copy_(getattr(other, f))
    assert torch.equal(lowbit.linear(x, qw), lowbit.linear(x, other))
    assert qw.cache["cpu_packed:" + active].blob.tensor is not blob
    # unsupported group size: no blob, the exact path
    for fmt in ("nf4", "fp4"):
        qw16 = lowbit.quantize_weight(torch.randn(8, 64), fmt, group_size=16)
        assert _backend.packed_weight(qw16) is None
        assert torch.equal(lowbit.linear(x[:, :64], qw16), run("", x[:, :64], qw16, path="exact"))


def test_packed_linear_handle_matches_and_checks():
    """The per-call handle (_Blob.run, C.PackedLinear) computes what linear_packed does and keeps
    its checks: a null blob, a blob of another weight, a bad stride are refused."""
    C = _backend.ext()
    qw = lowbit.quantize_weight(torch.randn(40, 256), "int4", group_size=64)
    x = torch.randn(3, 256)
    y = lowbit.linear(x, qw)
    isa = C.active_isa()
    b = qw.cache["cpu_packed:" + isa].blob
    ref = torch.empty(3, 40)
    C.linear_packed(b.ptr, b.nbytes, *b.meta, x.data_ptr(), 0, 3, 256, 0, ref.data_ptr(), 0, 40, 1, isa)
    assert torch.equal(y, ref)
    out = torch.empty(3, 40)
    b.run(x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 2)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="null packed"):
        C.PackedLinear(0, b.nbytes, *b.meta, isa)
    fmt, N, K, group, sym, dq = b.meta
    wrong = C.PackedLinear(b.ptr, b.nbytes, fmt, N, K, 128, sym, dq, isa)  # group 128, blob of 64
    with pytest.raises(ValueError, match="packed weight"):
        wrong(x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 1)
    with pytest.raises(ValueError, match="row stride"):
        b.run(x.data_ptr(), 0, 3, 100, 0, out.data_ptr(), 0, 40, 1)
    # the vectorcall entry (lowbit._backend's per-call lane): same result, same checks, and
    # call_active declines a handle of another ISA than the active one
    out.zero_()
    assert C.call(b.run, x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 2) is None
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="packed weight"):
        C.call(wrong, x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 1)
    with pytest.raises(ValueError, match="row stride"):
        C.call(b.run, x.data_ptr(), 0, 3, 100, 0, out.data_ptr(), 0, 40, 1)
    with pytest.raises(ValueError, match="dtype"):
        C.call(b.run, x.data_ptr(), 7, 3, 256, 0, out.data_ptr(), 0, 40, 1)
    with pytest.raises(TypeError, match="10 arguments"):
        C.call(b.run, x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40)
    with pytest.raises(TypeError, match="must be an int"):
        C.call(b.run, x.data_ptr(), 0, 3.0, 256, 0, out.data_ptr(), 0, 40, 1)
    with pytest.raises(TypeError, match="PackedLinear or ExactLinear"):
        C.call(object(), x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 1)
    with pytest.raises(OverflowError):
        C.call(b.run, x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 2**70)
    out.zero_()
    assert C.call_active(b.run, x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 1) is True
    assert torch.equal(out, ref)
    if isa != "avx2" and "avx2" in C.supported_isas():
        other = _backend._packed(qw, "avx2")
        out.zero_()
        assert C.call_active(other.run, x.data_ptr(), 0, 3, 256, 0, out.data_ptr(), 0, 40, 1) is False
        assert not out.any()
        # and lowbit.linear after an ISA switch runs the new ISA's kernels, not the cached lane
        prev = isa
        lowbit.set_isa("avx2")
        try:
            assert torch.equal(lowbit.linear(x, qw), _backend.linear(x, qw, None, torch.empty(3, 40), isa="avx2"))
        finally:
            lowbit.set_isa(prev)


def test_autograd_and_compile_use_the_fast_path():
    lin = torch.nn.Linear(64, 32)
    q = lowbit.QuantLinear.from_linear(lin, "int4", group_size=32)
    x = torch.randn(4, 64, requires_grad=True)
    y = q(x)  # through the custom op: a new QuantizedWeight around the same buffers
    assert torch.equal(y.detach(), q(x.detach()))
    y.sum().backward()
    assert x.grad is not None
    compiled = torch.compile(q, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x.detach()), q(x.detach()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
def test_inference_mode_weights(fmt):
    with torch.inference_mode():
        qw = lowbit.quantize_weight(torch.randn(32, 128), fmt)
        x = torch.randn(2, 128)
        y = lowbit.linear(x, qw)
        assert torch.equal(lowbit.linear(x, qw), y)
    assert_fast_close(y, R.linear(x, qw), x, qw)


# ---- accuracy on realistic data ----------------------------------------------------------------
@pytest.mark.parametrize("fmt,opts", [("int8", {}), ("int4", {"group_size": 128}), ("nf4", {}), ("fp4", {})])
def test_accuracy_figures(fmt, opts, capsys):
    """Relative error of the fast path against the reference on Gaussian weights and
    activations with a few outlier channels (as in transformer activations): printed with -s,
    asserted loosely (an error of order 1/127 of |y| would mean a broken scale)."""
    torch.manual_seed(1)
    qw = lowbit.quantize_weight(torch.randn(512, 2048) * 0.02, fmt, **opts)
    x = torch.randn(16, 2048)
    x[:, ::97] *= 20  # outlier channels
    ref = R.linear(x, qw)
    got = lowbit.linear(x, qw)
    rel_l2 = float((got - ref).norm() / ref.norm())
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-3 * float(ref.abs().mean())))
    with capsys.disabled():
        print(f"\n  fast path {fmt} {opts}: relative L2 {rel_l2:.2e}, "
              f"max rel {float(rel.max()):.2e}, mean rel {float(rel.mean()):.2e}")
    assert rel_l2 < 0.03
    assert_fast_close(got, ref, x, qw)


def test_codebook_tables():
    """The kernels' integer codes (csrc/formats.h kCodebookI16) are lowbit.formats' for every
    codebook format, fp4's exactly its codebook times 8064."""
    C = _backend.ext()
    assert C.CODE_SCALE == F.CODE_SCALE == {"nf4": 8128, "fp4": 8064}
    for fmt, codes in CODEBOOK_CODES.items():
        assert C.codebook_i16(fmt) == codes, fmt
    assert [c / 8064 for c in CODEBOOK_CODES["fp4"]] == pytest.approx(F.CODEBOOKS["fp4"], abs=1e-7)
    for bad in ("int4", "bogus"):
        with pytest.raises(ValueError):
            C.codebook_i16(bad)
