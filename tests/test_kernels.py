"""Every CPU kernel (each ISA this machine runs) against the reference: dequantize bit-exact,
linear within lowbit.testing's named tolerance, over edge shapes and activation dtypes.

These are the exact path's kernels (float32 activations): every test here runs with the CPU
path pinned to "exact"; the activation-quantized fast path has tests/test_fast_path.py."""

import threading

import pytest
import torch

import lowbit
from lowbit import _backend
from lowbit import reference as R
from lowbit.testing import assert_linear_close

from conftest import FORMAT_CASES, NEW_FORMAT_CASES, case_id

ALL_CASES = FORMAT_CASES + NEW_FORMAT_CASES

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# K below / equal / above / multiples of the groups, odd, ragged last groups (576 % 128 = 64).
KS = (1, 2, 7, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 576, 1000)
NS = (1, 3, 17, 40)
MS = (1, 2, 4, 5, 9)


@pytest.fixture(autouse=True)
def _exact(exact_cpu_path):
    return exact_cpu_path


def run_linear(isa, x, qw, bias=None):
    """lowbit.linear's CPU path with one ISA forced for this call."""
    N, K = qw.shape
    x2d = x.reshape(-1, K)
    out = torch.empty(x2d.shape[0], N, dtype=x.dtype)
    b = None if bias is None else bias.float().contiguous()
    _backend.linear(x2d, qw, b, out, isa=isa, path="exact")
    return out.reshape(*x.shape[:-1], N)


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_dequantize_bit_exact(isa, case):
    fmt, opts = case
    for K in KS:
        for N in (1, 17):
            qw = lowbit.quantize_weight(torch.randn(N, K) * 3, fmt, **opts)
            for dt in DTYPES:
                got = _backend.dequantize(qw, dt, isa=isa)
                want = R.dequantize(qw, dt)
                # bit patterns, so that -0.0 (fp4's code 8) must match too
                bits = torch.int32 if dt == torch.float32 else torch.int16
                assert torch.equal(got.view(bits), want.view(bits)), (isa, fmt, opts, N, K, dt)


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_linear_matches_reference(isa, case):
    fmt, opts = case
    for K in KS:
        N = NS[K % len(NS)]
        qw = lowbit.quantize_weight(torch.randn(N, K), fmt, **opts)
        for M in MS:
            dt = DTYPES[(K + M) % 3]
            x = torch.randn(M, K).to(dt)
            bias = torch.randn(N) if M % 2 else None
            assert_linear_close(run_linear(isa, x, qw, bias), R.linear(x, qw, bias), x, qw,
                                bias=bias)


@pytest.mark.parametrize("fmt,opts", [("int8", {}), ("int4", {}), ("nf4", {"double_quant": True}),
                                      ("int8", {"symmetric": False, "group_size": 32}),
                                      ("int4", {"zero_point": "float", "group_size": 32}),
                                      ("fp4", {})])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_linear_larger_shapes_all_dtypes(isa, fmt, opts, dt):
    if isa == "scalar":
        pytest.skip("the scalar path is covered on small shapes; large ones only take time")
    qw = lowbit.quantize_weight(torch.randn(300, 1536), fmt, **opts)
    for M in (1, 3, 8, 33):
        x = torch.randn(M, 1536).to(dt)
        assert_linear_close(run_linear(isa, x, qw), R.linear(x, qw), x, qw)


@pytest.mark.parametrize("fmt,opts", [("int8", {}), ("int4", {}), ("int4", {"group_size": 64, "symmetric": True}),
                                      ("int4", {"group_size": None}), ("int4", {"group_size": 96}),
                                      ("nf4", {}), ("nf4", {"double_quant": True}), ("fp4", {"group_size": 32})])
def test_linear_across_the_exact_tile_thresholds(isa, fmt, opts):
    """M on both sides of the exact path's tile thresholds (AMX CPUs: int8 / int4 from 16 rows,
    nf4 / fp4 from 48, csrc/kernels/avx512amx/table.cpp) and past several panels, ragged K and N,
    activations with a large common offset (what a cancelling float32 sum looks like), rows of
    very different magnitudes, and a row with an infinity (the whole call then takes the exact
    kernels; the reference's inf / nan pattern must come out)."""
    if isa == "scalar":
        pytest.skip("the scalar path is covered on small shapes; large ones only take time")
    N, K = 70, 1000
    qw = lowbit.quantize_weight(torch.randn(N, K), fmt, **opts)
    for M in (15, 16, 17, 47, 48, 49, 64, 97, 130):
        for dt in (torch.float32, torch.bfloat16):
            x = (torch.randn(M, K) + 3.0)
            x[1] *= 1e-30
            x[2] *= 1e30
            x[3, ::7] *= 1e-20
            x = x.to(dt)
            assert_linear_close(run_linear(isa, x, qw), R.linear(x, qw), x, qw, msg=f"M={M} {dt}")
    x = torch.randn(50, K)
    x[5, 3] = float("inf")
    got, want = run_linear(isa, x, qw), R.linear(x, qw)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf])  # the infinities' signs too
    fin = torch.isfinite(want)
    assert_linear_close(torch.where(fin, got, 0), torch.where(fin, want, 0), torch.where(torch.isfinite(x), x, 0), qw)


def test_public_linear_leading_dims_strides_and_dtypes():
    qw = lowbit.quantize_weight(torch.randn(24, 96), "int4", group_size=32)
    bias = torch.randn(24)
    base = torch.randn(2, 3, 200)
    cases = {
        "3d": torch.randn(2, 3, 96),
        "non-contiguous rows": base[..., 10:106],  # offset view, row stride 200
        "transposed": torch.randn(96, 6).t(),      # inner stride != 1
        "single row": torch.randn(96),
        "empty": torch.randn(0, 96),
    }
    for name, x in cases.items():
        for dt in DTYPES:
            xd = x.to(dt)
            y = lowbit.linear(xd, qw, bias)
            assert y.dtype == dt and y.shape == (*x.shape[:-1], 24), name
            assert_linear_close(y, R.linear(xd, qw, bias), xd, qw, bias=bias)


def test_bias_of_another_dtype_is_applied_in_float32():
    qw = lowbit.quantize_weight(torch.randn(16, 64), "int8")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    bias = torch.randn(16, dtype=torch.float16)
    assert_linear_close(lowbit.linear(x, qw, bias), R.linear(x, qw, bias), x, qw, bias=bias)


def test_threads_give_identical_results(monkeypatch):
    qw = lowbit.quantize_weight(torch.randn(1000, 512), "nf4")
    x = torch.randn(7, 512)
    monkeypatch.setenv("LOWBIT_NUM_THREADS", "1")
    one = lowbit.linear(x, qw)
    for n in ("2", "3", "8"):
        monkeypatch.setenv("LOWBIT_NUM_THREADS", n)
        assert torch.equal(lowbit.linear(x, qw), one)


def test_concurrent_python_threads_match_serial():
    qw = lowbit.quantize_weight(torch.randn(512, 768), "int4")
    xs = [torch.randn(1 + i % 4, 768) for i in range(8)]
    serial = [lowbit.linear(x, qw) for x in xs]
    results = [None] * 8

    def work(i):
        for _ in range(5):
            results[i] = lowbit.linear(xs[i], qw)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):
        assert torch.equal(a, b)


def test_bad_thread_env_is_a_clear_error(monkeypatch):
    qw = lowbit.quantize_weight(torch.randn(4, 32), "int8")
    monkeypatch.setenv("LOWBIT_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="LOWBIT_NUM_THREADS"):
        lowbit.linear(torch.randn(1, 32), qw)


def test_set_isa_unknown_or_unsupported_is_refused():
    C = _backend.ext()
    with pytest.raises(RuntimeError, match="unknown ISA"):
        C.set_isa("sse9")
    for isa in ("avx512amx", "avx512vnni", "avx512", "avx2vnni", "avx2", "neon_dotprod", "neon"):
        if isa not in C.supported_isas():
            with pytest.raises(RuntimeError, match=isa):
                C.set_isa(isa)


def test_lowbit_isa_env_forces_and_refuses(tmp_path):
    import subprocess
    import sys
    code = "import lowbit, json; print(json.dumps(lowbit.backend_info()))"
    import json
    for isa in _backend.ext().supported_isas():
        out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "LOWBIT_ISA": isa},
                             capture_output=True, text=True, check=True).stdout
        info = json.loads(out)
        assert info["cpu_isa"] == isa and "LOWBIT_ISA" in info["cpu_isa_reason"]
    missing = [i for i in ("avx512vnni", "avx512", "avx2", "neon") if i not in _backend.ext().supported_isas()]
    if missing:
        code = ("import lowbit, torch\n"
                "qw = lowbit.quantize_weight(torch.randn(4, 32), 'int8')\n"
                "lowbit.linear(torch.randn(1, 32), qw)\n")
        r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "LOWBIT_ISA": missing[0]},
                           capture_output=True, text=True)
        assert r.returncode != 0 and missing[0] in r.stderr


def test_backend_info_reports_choice():
    info = lowbit.backend_info()
    for key in ("cpu_isa", "cpu_isa_reason", "supported_isas", "num_threads", "cuda_available",
                "triton", "gpu_backend"):
        assert key in info
    assert info["cpu_isa"] in info["supported_isas"]


@pytest.mark.parametrize("case", NEW_FORMAT_CASES, ids=case_id)
def test_interop_variants_through_quantlinear_ops_and_transforms(case):
    """The interop variants everywhere a QuantizedWeight goes: QuantLinear's state dict (bit
    for bit, into a layer built with other settings), the custom op under autograd (which
    rebuilds the weight from its tensors), and the optional input transforms."""
    from torch import nn

    from lowbit import QuantLinear, QuantizedWeight
    fmt, opts = case
    lin = nn.Linear(100, 12)
    q = QuantLinear.from_linear(lin, fmt, **opts)
    q2 = QuantLinear(100, 12, fmt="nf4")
    q2.load_state_dict(q.state_dict())
    assert q2.qweight.config() == q.qweight.config()
    for name, t in q.qweight.tensors().items():
        got = getattr(q2.qweight, name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    x = torch.randn(3, 100)
    assert torch.equal(q2(x), q(x))
    assert_linear_close(q(x), R.linear(x, q.qweight, q.bias), x, q.qweight, bias=q.bias)
    # autograd: the custom op rebuilds the weight (its zero_point from the zeros' dtype)
    xg = x.clone().requires_grad_()
    y = lowbit.linear(xg, q.qweight)
    assert torch.equal(y.detach(), lowbit.linear(x, q.qweight))
    y.sum().backward()
    assert torch.allclose(xg.grad, R.dequantize(q.qweight).sum(0).expand(3, -1), atol=1e-5)
    # input transforms: (x / input_scale)[..., perm] times the stored weight
    qw = q.qweight
    perm, scale = torch.randperm(100), torch.rand(100) + 0.5
    qt = QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scales, qw.zeros, group_size=qw.group_size,
                         symmetric=qw.symmetric, zero_point=qw.zero_point,
                         double_quant=qw.double_quant, dq_scale=qw.dq_scale,
                         dq_offset=qw.dq_offset, perm=perm, input_scale=scale)
    ws = R.decode(qw)
    w_in = torch.empty_like(ws)
    w_in[:, perm] = ws / scale[perm]
    assert torch.equal(lowbit.dequantize(qt), w_in)
    assert_linear_close(lowbit.linear(x, qt), R.linear(x, qt), x, qt)
    qt2 = QuantLinear(100, 12, bias=False, fmt="int4")
    qt2.load_state_dict(QuantLinear.from_quantized(qt).state_dict())
    assert torch.equal(qt2(x), lowbit.linear(x, qt))
