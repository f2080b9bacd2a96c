"""The Triton kernels (lowbit.kernels) against the reference: every kernel x format x edge shape.

Here (no GPU) they run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors, at tiny
shapes: the interpreter executes each program in numpy. With LOWBIT_TEST_REAL_GPU=1 on a CUDA
machine the same tests compile the kernels and run them on the GPU at real sizes, plus CUDA
graph and torch.compile checks.

Tolerances (lowbit.testing.assert_linear_close):
* GEMV (float32 math on any activation dtype) and the tensor-core GEMM in its exact modes
  (int8 and int4 whose group is a multiple of the K step: the tile holds the integers q - z,
  exact in fp16/bf16, and the scale multiplies the float32 accumulator): the default
  float32-accumulation tolerance.
* The GEMM where the tile holds the decoded weight (nf4; int4 with small groups) and
  dequantize + matmul: each weight is rounded once to x's dtype (relative error <= u, the unit
  roundoff: 2**-8 bf16, 2**-11 f16), so sum_k |x_k| |w_k| * u is added to the accumulation
  term: rtol = accumulation_rtol(K) + u. This is the worst case of that rounding, not a fudge.
Interpreter gaps handled by the kernels themselves: bf16 tl.dot is wrong there (the GEMM
multiplies the bf16-rounded tiles in float32 instead, DOT_F32) and float32 -> bf16 casts
truncate there (rounded explicitly, _common.rne_bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import reference as R
from lowbit.testing import accumulation_rtol, assert_linear_close, linear_mismatch

from conftest import FORMAT_CASES, NEW_FORMAT_CASES, case_id

ALL_CASES = FORMAT_CASES + NEW_FORMAT_CASES
# the fused GEMV / GEMM take every variant but int4's float offsets (dequantize + matmul)
FUSED_CASES = [c for c in ALL_CASES if c[1].get("zero_point") != "float"]

triton = pytest.importorskip("triton", reason="Triton is not installed")

import lowbit.kernels as LK  # noqa: E402
from lowbit.kernels import layout  # noqa: E402
from lowbit.kernels import select as S  # noqa: E402
from lowbit.kernels.gemm import gemm, gemm_rega, gemm_scale_mode, rega_supported  # noqa: E402
from lowbit.kernels.gemv import gemv  # noqa: E402

REAL_GPU = bool(os.environ.get("LOWBIT_TEST_REAL_GPU"))
if REAL_GPU:
    if not torch.cuda.is_available():
        pytest.skip("LOWBIT_TEST_REAL_GPU is set but CUDA is not available", allow_module_level=True)
    DEV = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEV = torch.device("cpu")
else:
    pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it) or LOWBIT_TEST_REAL_GPU=1",
                allow_module_level=True)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.float16, torch.bfloat16)

# (N, K) edge shapes: N not a multiple of any block, odd K, K below one group, ragged last
# groups (300 = 2 * 128 + 44; 300 % 32 = 12), K not a multiple of the layout block (128).
if REAL_GPU:
    SHAPES = ((1000, 4096), (4096, 4160), (17, 33), (300, 1000), (2048, 5504))
    GEMV_MS = (1, 3)
    GEMM_MS = (5, 64, 300)
else:
    SHAPES = ((17, 33), (5, 300))
    GEMV_MS = (1, 2)
    GEMM_MS = (3,)
DEQ_EXTRA_SHAPES = ((6, 200), (3, 1096))


def quantized(N, K, fmt, opts, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.5
    return lowbit.quantize_weight(w.to(DEV), fmt, **opts)


def make_x(M, K, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype).to(DEV)


def gemm_rtol(qw, gw, K, dtype, BK, exact=True):
    if gemm_scale_mode(gw, BK, exact) in (2, 3):  # the tile holds the rounded weight
        return accumulation_rtol(K) + torch.finfo(dtype).eps / 2
    return None


def poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype, device=DEV)


# ---- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_gpu_layout_round_trip(case):
    fmt, opts = case
    for N, K in ((3, 7), (5, 130), (4, 300)):
        qw = quantized(N, K, fmt, opts)
        gw = layout.repack(qw)
        assert gw.codes.dtype == torch.int32 and gw.codes.shape[1] % 16 == 0
        codes = layout.unpack(gw)
        if fmt == "int8":
            want = (qw.data.to(torch.int16) + 128).to(torch.uint8)
        else:
            want = R.unpack_nibbles(qw.data, K)
        assert torch.equal(codes, want)
        assert torch.equal(gw.scales, qw.scales.t())
        if qw.zeros is not None:  # int8: z + 128, matching its codes q + 128
            shift = 128 if fmt == "int8" else 0
            assert torch.equal(gw.zeros.to(torch.int32), (qw.zeros.to(torch.int32) + shift).t())


def test_gpu_layout_cache_invalidation():
    qw = quantized(8, 256, "int4", {})
    a = layout.gpu_weight(qw)
    assert layout.gpu_weight(qw) is a  # cached
    view = lowbit.QuantizedWeight("int4", qw.shape, qw.data[:], qw.scales, qw.zeros,
                                  group_size=qw.group_size, symmetric=False)
    assert layout.gpu_weight(view) is a  # a view of the same codes hits too
    qw.scales.mul_(2)  # an in-place update (e.g. load_state_dict) must force a repack
    b = layout.gpu_weight(qw)
    assert b is not a and torch.equal(b.scales, qw.scales.t())
    layout.forget(qw)
    assert layout.gpu_weight(qw) is not b


# ---- dequantize ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_dequantize_bit_exact(case):
    # 4-bit rows of whole words (K % 8 == 0) take the word kernel, other K the per-element
    # one; (3, 1096): more than one word tile per row, a ragged last group
    fmt, opts = case
    for i, (N, K) in enumerate(SHAPES + DEQ_EXTRA_SHAPES):
        qw = quantized(N, K, fmt, opts, seed=i)
        for dt in (DTYPES if i == 0 or REAL_GPU else (DTYPES[i % 3],)):
            got = LK.dequantize(qw, dt)
            want = R.dequantize(qw.to("cpu"), dt)
            assert got.dtype == dt and got.shape == (N, K)
            bits = torch.int32 if dt == torch.float32 else torch.int16  # -0.0 (fp4) must match
            assert torch.equal(got.cpu().view(bits), want.view(bits)), (fmt, opts, N, K, dt)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_dequantize_unaligned_codes(fmt):
    # codes at an odd byte address (a view into a larger buffer): the 4-bit word kernel needs
    # 4-byte aligned rows, so this takes the per-element kernel; same bits either way
    N, K = 6, 200
    qw = quantized(N, K, fmt, {}, seed=3)
    buf = torch.zeros(qw.data.numel() + 1, dtype=qw.data.dtype, device=qw.data.device)
    data = buf[1:].view(qw.data.shape)
    data.copy_(qw.data)
    odd = lowbit.QuantizedWeight(fmt, (N, K), data, qw.scales, qw.zeros, group_size=qw.group_size,
                                 symmetric=qw.symmetric)
    assert odd.data.data_ptr() % 4 != 0
    want = R.dequantize(qw.to("cpu"), torch.float32)
    assert torch.equal(LK.dequantize(odd, torch.float32).cpu(), want)


# ---- GEMV ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_gemv_matches_reference(case):
    fmt, opts = case
    for i, (N, K) in enumerate(SHAPES):
        qw = quantized(N, K, fmt, opts, seed=i)
        gw = layout.gpu_weight(qw)
        # interpreter: one M per shape (M = 1, then M > 1) to stay fast; GPU: all of them
        for j, M in enumerate(GEMV_MS if REAL_GPU else GEMV_MS[i % 2:i % 2 + 1]):
            j += 0 if REAL_GPU else i % 2
            dt = DTYPES[(i + j) % 3]
            x = make_x(M, K, dt, seed=i + j)
            bias = make_x(1, N, torch.float32, seed=7)[0] if j % 2 == 0 else None
            # one program column, with and without split-K (SPLIT_K=2 also covers the reduction)
            params = dict(BN=32, CB=2, SPLIT_K=2) if (i + j) % 2 else dict(BN=16, CB=1, SPLIT_K=1)
            if REAL_GPU:
                params = dict(BN=64, CB=1, SPLIT_K=4 if j else 1, num_warps=4)
            out = gemv(x, gw, bias, poisoned(M, N, dt), IDOT=False, **params)
            assert_linear_close(out, R.linear(x, qw, bias), x, qw, bias=bias,
                                msg=f"gemv {fmt} {opts} M={M} N={N} K={K} {dt} {params}")


# the integer-dot GEMV: int4 / int8 whose groups hold whole layout blocks, nf4 / fp4 with blocks
# of 64 or whole layout blocks; 16-bit activations
IDOT_CASES = [("int4", {}), ("int4", {"symmetric": True}), ("int4", {"group_size": 256}),
              ("int4", {"group_size": 64}), ("int4", {"group_size": 64, "symmetric": True}),
              ("int4", {"group_size": -1, "symmetric": True}), ("int8", {}),
              ("int8", {"symmetric": False}), ("int8", {"group_size": 128}),
              ("int8", {"group_size": 64, "symmetric": False}), ("nf4", {}),
              ("nf4", {"double_quant": True}), ("fp4", {}), ("fp4", {"double_quant": True}),
              ("fp4", {"group_size": 128})]


@pytest.mark.parametrize("case", IDOT_CASES, ids=case_id)
def test_gemv_idot_matches_reference(case):
    """Two statements: on the activations as quantized (testing.gpu_quantize_activations) the
    kernel is the float32 GEMV (exact integer dots, float32 scaling: the default tolerance);
    against the reference on x itself it is within the bound of that quantization
    (testing.idot_linear_tolerance)."""
    from lowbit.kernels.gemv import idot_supported
    from lowbit.testing import GPU_XQ_BLOCK, gpu_quantize_activations, idot_linear_tolerance
    fmt, opts = case
    shapes = SHAPES if REAL_GPU else ((17, 300), (40, 256), (3, 64))
    for i, (N, K) in enumerate(shapes):
        qw = quantized(N, K, fmt, opts, seed=i)
        gw = layout.gpu_weight(qw)
        for j, M in enumerate(GEMV_MS):
            dt = HALF[(i + j) % 2]
            assert idot_supported(gw, dt)
            g = torch.Generator().manual_seed(100 + i + j)
            # activations with an outlier column and a spread of magnitudes within blocks
            x = torch.randn(M, K, generator=g) * torch.rand(M, K, generator=g) * 2
            x[:, (7 * i) % K] *= 40
            if K > 128 and j == 0 and dt == torch.bfloat16:  # below 2**-112: quantized to zeros
                x[:, 128:256] = 1e-36
            x = x.to(dt).to(DEV)
            bias = make_x(1, N, torch.float32, seed=7)[0] if j % 2 == 0 else None
            params = dict(BN=32, CB=2, SPLIT_K=2) if (i + j) % 2 else dict(BN=16, CB=1, SPLIT_K=1)
            if REAL_GPU:
                params = dict(BN=64, CB=1, SPLIT_K=4 if j else 1, num_warps=4)
            out = gemv(x, gw, bias, poisoned(M, N, dt), IDOT=True, **params)
            msg = f"idot {fmt} {opts} M={M} N={N} K={K} {dt} {params}"
            x_hat, _, _ = gpu_quantize_activations(x, GPU_XQ_BLOCK[fmt])
            if fmt != "nf4":  # (nf4 also rounds its codebook to 14 bits: the bound below;
                # fp4's 14-bit codes are its codebook up to float32 rounding)
                assert_linear_close(out, R.linear(x_hat, qw, bias).to(dt), x_hat, qw, bias=bias,
                                    msg=msg)
            want = R.linear(x, qw, bias)
            r = linear_mismatch(out, want, x, qw, bias=bias,
                                tol=idot_linear_tolerance(x, qw, want, bias))
            assert r["ok"], (msg, r)


# ---- tensor-core GEMM ---------------------------------------------------------------------
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_gemm_matches_reference(case):
    fmt, opts = case
    for i, (N, K) in enumerate(SHAPES):
        qw = quantized(N, K, fmt, opts, seed=i)
        gw = layout.gpu_weight(qw)
        for j, M in enumerate(GEMM_MS):
            dt = HALF[(i + j) % 2]
            x = make_x(M, K, dt, seed=3 + i + j)
            bias = make_x(1, N, torch.bfloat16, seed=9)[0] if (i + j) % 2 == 0 else None
            if REAL_GPU:
                params = [dict(BM=16, BN=128, CB=1, SWAP=True, SPLIT_K=2),
                          dict(BM=64, BN=64, CB=2, SWAP=False, SPLIT_K=1, num_warps=4,
                               FULL_TILE=i % 2 == 1),
                          dict(BM=128, BN=128, CB=1, SWAP=False, SPLIT_K=1, num_warps=8,
                               EXACT=False, FULL_TILE=i % 2 == 0)][j]
            else:
                full = (FUSED_CASES.index(case) + i) % 2 == 0
                params = dict(BM=16, BN=16, CB=1 + int(full and j == 1), SWAP=bool(i % 2),
                              SPLIT_K=1 + (i + j) % 2, EXACT=bool(i % 2), FULL_TILE=full,
                              dot_f32=dt == torch.bfloat16)
            out = gemm(x, gw, bias, poisoned(M, N, dt), **params)
            rtol = gemm_rtol(qw, gw, K, dt, params["CB"] * gw.block, params.get("EXACT", True))
            assert_linear_close(out, R.linear(x, qw, bias), x, qw, bias=bias, rtol=rtol,
                                msg=f"gemm {fmt} {opts} M={M} N={N} K={K} {dt} {params}")


# int4 cases the register-operand GEMM takes (one group per row or groups of 128 * CB)
REGA_CASES = [c for c in FUSED_CASES if c[0] == "int4"]


@pytest.mark.parametrize("case", REGA_CASES, ids=case_id)
def test_gemm_rega_matches_reference(case, monkeypatch):
    """The register-operand GEMM (int4, small M): x permuted and summed per block by its
    preparation kernel, the integer codes in the MMA, zero points off as z * sum(x), scales on
    the float32 partial sums: the float32-accumulation tolerance, like the exact GEMM modes.
    Weights it does not take (groups that split a 128-element block) fall back to the GEMM
    with the other parameters, which is checked too."""
    from lowbit.kernels import gemm as GM
    from lowbit.kernels._common import k_split
    ran = []  # calls of the register-operand kernel through gemm(REGA=True)
    monkeypatch.setattr(GM, "gemm_rega", lambda *a, **k: ran.append(1) or gemm_rega(*a, **k))
    fmt, opts = case
    Ms = (1, 5, 16, 64) if REAL_GPU else (1, 3, 17)  # (M = 1: Triton makes it a constant)
    for i, (N, K) in enumerate(SHAPES):
        qw = quantized(N, K, fmt, opts, seed=20 + i)
        gw = layout.gpu_weight(qw)
        for j, M in enumerate(Ms):
            dt = HALF[(i + j) % 2]
            x = make_x(M, K, dt, seed=30 + i + j)
            bias = make_x(1, N, torch.bfloat16, seed=31)[0] if (i + j) % 2 else None
            for CB, split, BM in ((1, 1 + (i + j) % 3, max(16, 1 << (M - 1).bit_length())),
                                  (2, 1, 16)):  # (BM 16: several row tiles of x when M > 16)
                params = dict(BM=BM, BN=128 if REAL_GPU else 16,
                              CB=CB, SWAP=True, REGA=True, SPLIT_K=split,
                              dot_f32=not REAL_GPU and dt == torch.bfloat16)
                ran.clear()
                out = gemm(x, gw, bias, poisoned(M, N, dt), **params)
                took = rega_supported(gw, dt, k_split(gw.words_per_row // 16, CB, split)[0])
                assert len(ran) == int(took), (params, took)
                rtol = None if took else gemm_rtol(qw, gw, K, dt, CB * gw.block)
                assert_linear_close(out, R.linear(x, qw, bias), x, qw, bias=bias, rtol=rtol,
                                    msg=f"gemm REGA {fmt} {opts} M={M} N={N} K={K} {dt} {params} "
                                        f"(register-operand kernel: {took})")


def test_gemm_rega_rejects_what_it_cannot_take():
    qw = quantized(16, 256, "nf4", {"group_size": 64})
    x = make_x(2, 256, torch.bfloat16)
    with pytest.raises(ValueError, match="register-operand"):
        gemm_rega(x, layout.gpu_weight(qw), None, poisoned(2, 16, x.dtype), BM=16, BN=16, CB=1)
    qw = quantized(16, 256, "int4", {"group_size": 64})
    with pytest.raises(ValueError, match="register-operand"):
        gemm_rega(x, layout.gpu_weight(qw), None, poisoned(2, 16, x.dtype), BM=16, BN=16, CB=1)
    qw = quantized(16, 256, "int4", {"group_size": 128})
    xf = make_x(2, 256, torch.float32)
    with pytest.raises(ValueError, match="register-operand"):
        gemm_rega(xf, layout.gpu_weight(qw), None, poisoned(2, 16, xf.dtype), BM=16, BN=16, CB=1)


# (groups of 16 and 96 do not split a 128-element block into halves or quarters: the GEMM)
IMMA_CASES = REGA_CASES + [("int4", {"group_size": 16}), ("int4", {"group_size": 96})]


@pytest.mark.parametrize("case", IMMA_CASES, ids=case_id)
def test_gemm_imma_matches_reference(case, monkeypatch):
    """The integer tensor-core GEMM (int4, kernels/imma.py), like the integer-dot GEMV's test:
    on x as the kernel quantizes it (15-bit, testing.IMMA_XQ) it is float32 math on the
    dequantized weight (exact integer sums, float32 scaling: the default tolerance); against
    the reference on x itself it is within the bound of that quantization. Groups of 32 and 64
    (two or four per block: x copied once per group with the other groups' bytes zeroed) are
    taken; weights it does not take (groups of 16 or 96) go to the GEMM with the other
    parameters, checked too."""
    from lowbit.kernels import imma as IM
    from lowbit.testing import IMMA_XQ, gpu_quantize_activations, idot_linear_tolerance
    ran, orig = [], IM.gemm_imma
    monkeypatch.setattr(IM, "gemm_imma", lambda *a, **k: ran.append(1) or orig(*a, **k))
    fmt, opts = case
    Ms = (1, 5, 16, 64, 300) if REAL_GPU else (1, 3, 17)
    shapes = SHAPES if REAL_GPU else ((17, 300), (40, 256), (5, 128))
    for i, (N, K) in enumerate(shapes):
        qw = quantized(N, K, fmt, opts, seed=40 + i)
        gw = layout.gpu_weight(qw)
        for j, M in enumerate(Ms):
            dt = HALF[(i + j) % 2]
            g = torch.Generator().manual_seed(50 + i + j)
            # activations with an outlier column and a spread of magnitudes within blocks
            x = torch.randn(M, K, generator=g) * torch.rand(M, K, generator=g) * 2
            x[:, (7 * i) % K] *= 40
            if K > 128 and j == 0:  # a block below 2**-112: quantized to zeros
                x[:, 128:256] = 1e-36
            x = x.to(dt).to(DEV)
            bias = make_x(1, N, torch.bfloat16, seed=51)[0] if (i + j) % 2 else None
            BM = 16 if j % 2 else min(64, max(16, 1 << (M - 1).bit_length()))
            params = dict(BM=BM, BN=(64, 128)[j % 2] if REAL_GPU else 16,
                          CB=(1, 2, 4)[(i + 2 * j) % 3], SWAP=True,
                          IMMA=True, SPLIT_K=1 + (i + j) % 3, num_warps=4 + 4 * (j % 2),
                          dot_f32=not REAL_GPU and dt == torch.bfloat16)
            ran.clear()
            out = gemm(x, gw, bias, poisoned(M, N, dt), **params)
            took = IM.imma_supported(gw, dt)
            assert len(ran) == int(took), (params, took)
            msg = f"gemm IMMA {fmt} {opts} M={M} N={N} K={K} {dt} {params} (IMMA kernel: {took})"
            if not took:
                assert_linear_close(out, R.linear(x, qw, bias), x, qw, bias=bias,
                                    rtol=gemm_rtol(qw, gw, K, dt, gw.block), msg=msg)
                continue
            x_hat, _, _ = gpu_quantize_activations(x, **IMMA_XQ)
            assert_linear_close(out, R.linear(x_hat, qw, bias).to(dt), x_hat, qw, bias=bias,
                                msg=msg)
            want = R.linear(x, qw, bias)
            r = linear_mismatch(out, want, x, qw, bias=bias,
                                tol=idot_linear_tolerance(x, qw, want, bias, xq=IMMA_XQ))
            assert r["ok"], (msg, r)


def test_gemm_imma_rejects_what_it_cannot_take():
    from lowbit.kernels.imma import gemm_imma
    x = make_x(2, 256, torch.bfloat16)
    for fmt, opts in (("nf4", {}), ("int4", {"group_size": 16}), ("int4", {"group_size": 96}),
                      ("int8", {})):
        qw = quantized(16, 256, fmt, opts)
        with pytest.raises(ValueError, match="IMMA"):
            gemm_imma(x, layout.gpu_weight(qw), None, poisoned(2, 16, x.dtype), BM=16, BN=16)
    qw = quantized(16, 256, "int4", {})
    xf = make_x(2, 256, torch.float32)
    with pytest.raises(ValueError, match="IMMA"):
        gemm_imma(xf, layout.gpu_weight(qw), None, poisoned(2, 16, xf.dtype), BM=16, BN=16)


def test_odd_group_sizes():
    """Groups that are multiples of 16 but not powers of two (48, 80): every kernel."""
    for fmt, g in (("int4", 48), ("nf4", 80), ("int8", 48), ("fp4", 80)):
        N, K = (300, 1000) if REAL_GPU else (5, 200)
        qw = quantized(N, K, fmt, {"group_size": g})
        for dt in DTYPES:
            assert torch.equal(LK.dequantize(qw, dt).cpu(), R.dequantize(qw.to("cpu"), dt))
        gw = layout.gpu_weight(qw)
        x = make_x(2, K, torch.float16)
        assert_linear_close(gemv(x, gw, None, poisoned(2, N, x.dtype), BN=16, CB=1), R.linear(x, qw),
                            x, qw)
        for full in (False, True):
            out = gemm(x, gw, None, poisoned(2, N, x.dtype), BM=16, BN=16 if not REAL_GPU else 64,
                       CB=1, FULL_TILE=full)
            assert_linear_close(out, R.linear(x, qw), x, qw, rtol=gemm_rtol(qw, gw, K, x.dtype, 128))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_gather_matches_load(fmt):
    """Codebook values by tl.gather from registers (the default) and by a load from the table in
    memory, in the GEMV and the GEMM: both against the reference (the values are the same, but
    compiled code may contract multiply-adds differently, so outputs can differ in the last
    bit on a GPU; under the interpreter they are identical)."""
    N, K = (1000, 4096) if REAL_GPU else (17, 300)
    qw = quantized(N, K, fmt, {"group_size": 64, "double_quant": fmt == "nf4"}, seed=11)
    gw = layout.gpu_weight(qw)
    for M, dt in ((1, torch.bfloat16), (2, torch.float32)):
        x = make_x(M, K, dt, seed=12)
        outs = [gemv(x, gw, None, poisoned(M, N, dt), BN=16, CB=2, SPLIT_K=2, LUT_GATHER=g)
                for g in (True, False)]
        if not REAL_GPU:
            assert torch.equal(outs[0], outs[1])
        for out in outs:
            assert_linear_close(out, R.linear(x, qw), x, qw, msg=f"gemv {fmt} M={M} {dt}")
    x = make_x(3, K, torch.float16, seed=13)
    for full in (False, True):
        outs = [gemm(x, gw, None, poisoned(3, N, x.dtype), BM=16, BN=16 if not REAL_GPU else 64,
                     CB=1, FULL_TILE=full, LUT_GATHER=g) for g in (True, False)]
        if not REAL_GPU:
            assert torch.equal(outs[0], outs[1])
        for out in outs:
            assert_linear_close(out, R.linear(x, qw), x, qw, rtol=gemm_rtol(qw, gw, K, x.dtype, 128))


@pytest.mark.skipif(not REAL_GPU, reason="the direct launch path is for compiled kernels only")
def test_fast_launch_matches_triton_launch():
    """Repeated launches go through the compiled kernel's launcher (_common.launch); results are
    identical to Triton's own launch path, including when an argument's alignment changes
    (a different specialization, so a different compiled kernel)."""
    from lowbit.kernels import _common as C
    N, K = 1000, 4096
    qw = quantized(N, K, "int4", {"group_size": 128}, seed=21)
    gw = layout.gpu_weight(qw)
    xb = make_x(2, K + 8, torch.bfloat16, seed=22)
    for x in (xb[:, :K], xb[:, 1:K + 1]):  # 16-byte aligned rows, then a 2-byte offset view
        before = C.FAST_LAUNCHES[0]
        outs = [gemv(x, gw, None, poisoned(2, N, x.dtype), BN=32, CB=1, SPLIT_K=s)
                for s in (1, 4) for _ in range(3)]
        assert C.FAST_LAUNCHES[0] >= before + 4  # the 2nd and 3rd launch of each config
        C._FAST_ON = False
        try:
            slow = [gemv(x, gw, None, poisoned(2, N, x.dtype), BN=32, CB=1, SPLIT_K=s)
                    for s in (1, 4)]
        finally:
            C._FAST_ON = True
        for o in outs[:3]:
            assert torch.equal(o, slow[0])
        for o in outs[3:]:
            assert torch.equal(o, slow[1])
        assert_linear_close(slow[0], R.linear(x, qw), x, qw)


@pytest.mark.skipif(not REAL_GPU, reason="bound launches are for compiled kernels only")
def test_bound_calls_match_full_path():
    """Repeated M = 1 calls of a layer go through its bound launch (lowbit.kernels.fast_linear)
    and give what the full path gives; in-place weight changes, another alignment of x, a
    bias, autograd and input transforms are all honoured."""
    torch.manual_seed(31)
    N, K = 1000, 4096
    lin = torch.nn.Linear(K, N).to(DEV)
    ql = lowbit.QuantLinear.from_linear(lin, "int4", group_size=128).to(DEV)
    buf = torch.randn(2 * K + 8, device=DEV).to(torch.bfloat16)
    xb = buf[:2 * K].view(2, K)
    with torch.no_grad():
        for x in (xb[:1], buf[1:K + 1].view(1, K), xb[1:]):  # aligned, a 2-byte offset, a row view
            before = LK.BOUND_CALLS[0]
            ys = [ql(x) for _ in range(3)]
            assert LK.BOUND_CALLS[0] >= before + 2
            for y in ys:
                assert torch.equal(y, ys[0])
            assert_linear_close(ys[0], R.linear(x, ql.qweight, ql.bias), x, ql.qweight,
                                bias=ql.bias)
        y2 = ql(xb[:1])
        before = LK.BOUND_CALLS[0]
        y3 = [ql(xb[:1].view(1, 1, K)) for _ in range(2)]  # 3-D input: bound as its 2-D view
        assert LK.BOUND_CALLS[0] >= before + 2
        for y in y3:
            assert y.shape == (1, 1, N) and torch.equal(y.view(1, N), y2)
        x = xb[:1, :K]
        ql.weight_scales.mul_(2)  # in place: the bound call must see it
        y = ql(x)
        assert_linear_close(y, R.linear(x, ql.qweight, ql.bias), x, ql.qweight, bias=ql.bias)
    xg = xb[:1, :K].clone().requires_grad_(True)  # autograd: the full path (custom op)
    y = ql(xg)
    y.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    qw = ql.qweight
    perm = torch.randperm(K, device=DEV)
    qp = lowbit.QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scales, qw.zeros,
                                group_size=qw.group_size, symmetric=qw.symmetric, perm=perm)
    x = xb[:1, :K]
    with torch.no_grad():
        outs = [lowbit.linear(x, qp) for _ in range(3)]
    for o in outs:
        assert_linear_close(o, R.linear(x, qp), x, qp)


@pytest.mark.skipif(not REAL_GPU, reason="bound launches are for compiled kernels only")
@pytest.mark.parametrize("M", [4, 16, 64])
def test_bound_gemm_calls_match_full_path(M, monkeypatch):
    """Repeated calls at M > 1 (a short prompt, a small batch) are bound too when they run the
    GEMV or the GEMM (with split K: the GEMM and its reduction), 2-D or any contiguous N-D x,
    with and without a bias, and give exactly what the full path gives."""
    from lowbit.kernels import _common as C
    torch.manual_seed(37 + M)
    N, K = 3072, 1024
    lin = torch.nn.Linear(K, N).to(DEV)
    ql = lowbit.QuantLinear.from_linear(lin, "int4", group_size=128).to(DEV)
    q128 = ql.qweight
    # (int4 groups of 64: the IMMA GEMM with two groups per block, kernels/imma.py)
    q64 = lowbit.QuantLinear.from_linear(lin, "int4", group_size=64).to(DEV).qweight
    for qw, shape, bias, split, extra in ((q128, (M, K), ql.bias, None, {}),
                                          (q128, (2, M, K), None, None, {}),
                                          (q128, (M, K), ql.bias, 4, {}),
                                          (q128, (M, K), None, 4, {}),
                                          (q128, (M, K), ql.bias, 2, {"REGA": True}),
                                          (q128, (M, K), ql.bias, 1, {"IMMA": True}),
                                          (q128, (M, K), None, 2, {"IMMA": True}),
                                          (q64, (M, K), ql.bias, 2, {"IMMA": True})):
        x = torch.randn(*shape, device=DEV).to(torch.bfloat16)
        qw.cache.pop(LK._BOUND, None)  # (a shape bound in an earlier round)
        ch = LK.plan(x, qw, x.numel() // K)
        if split is not None:  # force the GEMM with split K (its own reduction launch), the
            # register-operand GEMM or the IMMA GEMM (each with its x preparation launch)
            ch = S.Choice("gemm", dict(BM=16, BN=64, CB=1, SWAP=True, SPLIT_K=split, **extra),
                          "test")
        assert ch.kernel in ("gemv", "gemm"), ch
        monkeypatch.setattr(LK, "plan", lambda *a, **k: ch)
        with torch.no_grad():
            monkeypatch.setattr(C, "_FAST_ON", False)  # the full path: Triton's own launches
            full = lowbit.linear(x, qw, bias)
            monkeypatch.setattr(C, "_FAST_ON", True)
            before = LK.BOUND_CALLS[0]
            ys = [lowbit.linear(x, qw, bias) for _ in range(3)]
        monkeypatch.undo()
        assert LK.BOUND_CALLS[0] >= before + 2, (shape, ch)
        for y in ys:
            assert y.shape == (*shape[:-1], N)
            assert torch.equal(y, full), (shape, ch)
        if ch.params.get("IMMA"):  # x quantized to 15 bits (test_gemm_imma_matches_reference)
            from lowbit.testing import IMMA_XQ, idot_linear_tolerance
            want = R.linear(x, qw, bias)
            r = linear_mismatch(full, want, x, qw, bias=bias,
                                tol=idot_linear_tolerance(x, qw, want, bias, xq=IMMA_XQ))
            assert r["ok"], (shape, ch, r)
        else:
            assert_linear_close(full, R.linear(x, qw, bias), x, qw, bias=bias)


def test_launcher_direct_path_assembles_the_arguments(monkeypatch):
    """_common.launch without a GPU, on a stand-in kernel: the first launch of a configuration
    goes through kernel[grid] and later ones through the compiled launcher with every parameter
    in signature order (constexprs bound, run-time arguments replaced); another argument
    specialization (alignment) or a launch hook takes Triton's path again."""
    from types import SimpleNamespace
    from lowbit.kernels import _common as C

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def __init__(self):
            self.calls = []

        def run(self, *a):
            self.calls.append(a)

    class Kernel:
        params = [SimpleNamespace(name=n, is_constexpr=c)
                  for n, c in (("x", False), ("A", True), ("n", False), ("B", True))]
        arg_names = ["x", "A", "n", "B"]

        def __init__(self):
            self.slow = 0

        def __getitem__(self, grid):
            def go(*args, **kw):
                self.slow += 1
                return compiled
            return go

    compiled, kernel = Compiled(), Kernel()
    monkeypatch.setattr(C, "interpreting", lambda: False)
    monkeypatch.setattr(C, "_FAST_ON", True)
    monkeypatch.setattr(C, "_FAST", {})
    streams = []
    monkeypatch.setattr(C, "_driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda d: streams.append(d) or 77)))
    x = torch.zeros(8)
    consts = {"A": 3, "B": "b"}
    assert C.launch(kernel, (5,), (x, 32), consts, 4, 1) is not None
    assert kernel.slow == 1 and compiled.calls == []
    x2 = torch.ones(8)
    C.launch(kernel, (5, 2), (x2, 48), consts, 4, 1)
    assert kernel.slow == 1
    assert compiled.calls == [(5, 2, 1, 77, "fn", "meta", None, None, None, x2, 3, 48, "b")]
    C.launch(kernel, (5,), (x2[1:], 48), consts, 4, 1)  # 4-byte offset: another specialization
    assert kernel.slow == 2 and len(compiled.calls) == 1
    C.launch(kernel, (5,), (x2, 7), consts, 4, 1)  # 7 is not a multiple of 16: another one
    assert kernel.slow == 3
    hooks = C._knobs.runtime.launch_enter_hook if C._knobs is not None else None
    if hooks is not None and hasattr(hooks, "add"):
        hook = lambda *a: None  # noqa: E731
        hooks.add(hook)
        try:
            C.launch(kernel, (5,), (x2, 48), consts, 4, 1)
            assert kernel.slow == 4  # a profiler hook: Triton's own path
        finally:
            hooks.remove(hook)


def test_launcher_raw_entry_only_without_scratch():
    """Launcher.raw(): the C launch function with the fixed arguments that Triton's Python
    launcher would pass (no scratch memory), or None where that launcher does more."""
    from types import SimpleNamespace
    from lowbit.kernels import _common as C

    def compiled(**run_attrs):
        run = SimpleNamespace(launch=lambda *a: a, launch_cooperative_grid=False, launch_pdl=True,
                              global_scratch_size=0, profile_scratch_size=0)
        for k, v in run_attrs.items():
            setattr(run, k, v)
        return SimpleNamespace(run=run, function="fn", packed_metadata="meta")

    fn, fixed = C.Launcher(compiled(), [], []).raw()
    assert fixed == ("fn", False, True, None, None, "meta", None, None, None)
    assert fn(1, 2, 3, 77, *fixed, 5) == (1, 2, 3, 77) + fixed + (5,)
    assert C.Launcher(compiled(global_scratch_size=64), [], []).raw() is None
    assert C.Launcher(compiled(profile_scratch_size=8), [], []).raw() is None
    assert C.Launcher(compiled(launch=None), [], []).raw() is None
    assert C.Launcher(compiled(launch_pdl=None), [], []).raw() is None


# ---- public entry point (select + run) ----------------------------------------------------
def test_linear_routes_every_kernel():
    """lowbit.kernels.linear through select(): gemv, gemm and dequant_mm, leading dims, bias."""
    N, K = (600, 1000) if REAL_GPU else (20, 160)
    qw = quantized(N, K, "int4", {"group_size": 32})
    bias = make_x(1, N, torch.float16, seed=5)[0]
    seen = set()
    for M, dt in ((1, torch.float16), (2, torch.float32), (24, torch.bfloat16),
                  (24, torch.float32), (3000, torch.bfloat16)):
        if not REAL_GPU and M > 100:
            M = 40
            table = {}  # force dequant_mm with a one-record table
            rec = dict(format="int4", variant="asym", group=32, N=N, K=K, M_bucket=S.m_bucket(M),
                       act="16bit", kernel="dequant_mm", params={})
            table = S.choices_for([rec])
            choice = S.select(M, N, K, "int4", 32, "interpreter", dtype=dt, variant="asym",
                              table=table)
        else:
            choice = LK.plan(make_x(1, K, dt), qw, M)
        seen.add(choice.kernel)
        x = make_x(M, K, dt, seed=M).reshape(1, M, K)
        x2d = x.reshape(M, K)
        out = LK.run_choice(choice, x2d, qw, bias, poisoned(M, N, dt))
        y = LK.linear(x, qw, bias) if choice.source != "tuned" else out.reshape(1, M, N)
        assert y.shape == (1, M, N) and y.dtype == dt
        want = R.linear(x2d, qw, bias)
        rtol = None
        if choice.kernel == "dequant_mm" and dt != torch.float32:
            rtol = accumulation_rtol(K) + torch.finfo(dt).eps / 2
        if choice.kernel == "gemm":
            rtol = gemm_rtol(qw, layout.gpu_weight(qw), K, dt, choice.params["CB"] * 128,
                             choice.params.get("EXACT", True))
        for got in (out, y.reshape(M, N)):
            assert_linear_close(got, want, x2d, qw, bias=bias, rtol=rtol, msg=f"{choice} M={M} {dt}")
        if dt == torch.float32:
            assert choice.kernel != "gemm"  # no tensor cores (no TF32) for float32 activations
    assert seen == {"gemv", "gemm", "dequant_mm"}


def test_float_offset_int4_runs_as_dequantize_and_matmul():
    """int4 with float offsets (GGUF Q4_1 / Q4_K) has no fused-kernel layout: plan() picks
    dequant_mm, prepare() makes nothing, the fused kernels' layout refuses it by name."""
    N, K = (300, 1000) if REAL_GPU else (9, 96)
    qw = quantized(N, K, "int4", {"zero_point": "float", "group_size": 32})
    for M, dt in ((1, torch.float32), (3, torch.float16)):
        x = make_x(M, K, dt, seed=M)
        choice = LK.plan(x, qw)
        assert choice.kernel == "dequant_mm" and choice.source == "variant"
        rtol = None if dt == torch.float32 else accumulation_rtol(K) + torch.finfo(dt).eps / 2
        assert_linear_close(LK.linear(x, qw), R.linear(x, qw), x, qw, rtol=rtol)
    assert LK.prepare(qw) is None
    with pytest.raises(ValueError, match="float offsets"):
        layout.gpu_weight(qw)


def test_linear_odd_inputs():
    N, K = 12, 70
    qw = quantized(N, K, "nf4", {"double_quant": True, "group_size": 16})
    base = make_x(4, 200, torch.float16)
    x = base[:, 5:5 + K]  # row stride 200, offset view
    rtol = None
    if LK.plan(x, qw).kernel != "gemv":  # nf4 tiles hold the f16-rounded weight
        rtol = accumulation_rtol(K) + torch.finfo(torch.float16).eps / 2
    assert_linear_close(LK.linear(x, qw), R.linear(x, qw), x, qw, rtol=rtol)
    assert LK.linear(make_x(0, K, torch.float16), qw).shape == (0, N)
    v = make_x(1, K, torch.float32)[0]
    assert LK.linear(v, qw).shape == (N,)


# ---- select() and the tuned configs -------------------------------------------------------
def test_select_tuned_nearest_heuristic():
    rec = dict(format="int4", variant="asym", group=128, N=4096, K=4096, M_bucket=1, act="16bit",
               kernel="gemv", params={"BN": 64, "CB": 2, "SPLIT_K": 2, "num_warps": 4})
    table = S.choices_for([rec])
    c = S.select(1, 4096, 4096, "int4", 128, "x", variant="asym", table=table)
    assert (c.kernel, c.source, c.params["BN"]) == ("gemv", "tuned", 64)
    c = S.select(2, 11008, 4096, "int4", 128, "x", variant="sym", table=table)
    assert (c.kernel, c.source) == ("gemv", "nearest")
    c = S.select(64, 4096, 4096, "int4", 128, "x", variant="asym", table=table)
    assert c.source == "heuristic"  # 64x away in M: not borrowed
    c = S.select(4, 4096, 4096, "int4", 128, "x", variant="asym", table=table)
    assert c.source == "heuristic"  # a GEMV config (M <= 2) is not lent to a GEMM's M
    gemm4 = dict(rec, M_bucket=4, kernel="gemm", params={"BM": 16, "BN": 64, "CB": 1})
    c = S.select(1, 4096, 4096, "int4", 128, "x", variant="asym", table=S.choices_for([gemm4]))
    assert c.source == "heuristic" and c.kernel == "gemv"  # nor a GEMM config to M = 1
    assert S.select(1, 4096, 4096, "int4", 128, "x", dtype=torch.float32, table=table).kernel == "gemv"
    # int4 at small M with 16-bit activations: the register-operand GEMM; nf4 / groups of 64 not
    for M in (3, 16, 64):
        assert S.heuristic(M, 4096, 4096, "int4", 128, torch.bfloat16).params.get("REGA")
        assert not S.heuristic(M, 4096, 4096, "int4", 64, torch.bfloat16).params.get("REGA")
        assert not S.heuristic(M, 4096, 4096, "nf4", 64, torch.bfloat16).params.get("REGA")
    # an M bucket halfway between two tuned ones: the smaller one's record, in any file order
    lo = dict(rec, M_bucket=64, kernel="gemm", params={"BM": 64, "BN": 64, "CB": 1})
    hi = dict(rec, M_bucket=256, kernel="dequant_mm", params={})
    for recs in ([lo, hi], [hi, lo]):
        c = S.select(128, 3072, 1024, "int4", 128, "x", variant="asym", table=S.choices_for(recs))
        assert (c.kernel, c.source) == ("gemm", "nearest")
    # fp4 runs nf4's kernels with another table: it borrows nf4's records (and nf4 fp4's), but
    # a record of its own, even a farther one, wins over its twin's at the same distance
    nf = dict(rec, format="nf4", variant="plain", group=64, M_bucket=16, kernel="gemm",
              params={"BM": 16, "BN": 128, "CB": 1})
    c = S.select(16, 4096, 4096, "fp4", 64, "x", variant="plain", table=S.choices_for([nf]))
    assert (c.kernel, c.source, c.params["BN"]) == ("gemm", "nearest", 128)
    own = dict(nf, format="fp4", params={"BM": 16, "BN": 64, "CB": 1})
    for recs in ([nf, own], [own, nf]):
        c = S.select(16, 4096, 4096, "fp4", 64, "x", variant="plain", table=S.choices_for(recs))
        assert (c.source, c.params["BN"]) == ("tuned", 64)
        c = S.select(16, 5000, 4096, "fp4", 64, "x", variant="plain", table=S.choices_for(recs))
        assert (c.source, c.params["BN"]) == ("nearest", 64)
    c = S.select(16, 4096, 4096, "int4", 64, "x", variant="asym", table=S.choices_for([nf]))
    assert c.source == "heuristic"  # other formats do not borrow
    for M in (1, 2, 7, 16, 64, 300, 5000):
        for dt in DTYPES:
            c = S.select(M, 1000, 3000, "nf4", 64, "no such card", dtype=dt)
            assert c.kernel in S.KERNELS and c.source == "heuristic"
            if dt == torch.float32:
                assert c.kernel != "gemm"


def test_shipped_configs_are_valid():
    """Every configs/*.json loads, names its key fields, and selects its own records."""
    files = [f for f in os.listdir(S.CONFIG_DIR) if f.endswith(".json")] \
        if os.path.isdir(S.CONFIG_DIR) else []
    for f in files:
        import json
        with open(os.path.join(S.CONFIG_DIR, f)) as fh:
            doc = json.load(fh)
        assert doc["gpu"] and isinstance(doc["configs"], list)
        table = S.choices_for(doc["configs"])
        for key, r in table.items():
            assert r["kernel"] in S.KERNELS
            assert r["format"] in lowbit.FORMATS
            dt = torch.float32 if r["act"] == "fp32" else torch.bfloat16
            c = S.select(r["M_bucket"], r["N"], r["K"], r["format"], r["group"], doc["gpu"],
                         dtype=dt, variant=r["variant"], table=table)
            assert c.source == "tuned"


def test_tuner_formats_name_variants():
    """bench/tune_gpu.py's --formats takes a variant (int4 sym, nf4 / fp4 double quant) whose
    weights give records of that variant (select.variant_of), and refuses an unknown one."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "tune_gpu.py")
    spec = importlib.util.spec_from_file_location("tune_gpu", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    got = tune.parse_formats("int4:128,nf4:64:dq,int4:128:sym,int8:-1")
    assert got == [("int4", {"group_size": 128}), ("nf4", {"group_size": 64, "double_quant": True}),
                   ("int4", {"group_size": 128, "symmetric": True}), ("int8", {})]
    variants = []
    for fmt, opts in got:
        qw = lowbit.quantize_weight(torch.randn(8, 128), fmt, **opts)
        variants.append(S.variant_of(fmt, qw.symmetric, qw.double_quant, qw.zero_point))
    assert variants == ["asym", "dq", "sym", "-"]
    with pytest.raises(SystemExit, match="unknown variant"):
        tune.parse_formats("nf4:64:double")


def test_gpu_bench_table_and_optional_variant_rows():
    """The GPU benchmark's optional rows name real variants (fp4, int4 sym, nf4 double quant),
    and its table keeps long row names whole, one aligned column each."""
    from lowbit import gpu_bench as GB
    want = {"lowbit-fp4-b64": "plain", "lowbit-int4-g128-sym": "sym", "lowbit-nf4-b64-dq": "dq"}
    for name, variant in want.items():
        fmt, opts = GB.OPTIONAL_LOWBIT[name]
        qw = lowbit.quantize_weight(torch.randn(8, 256), fmt, **opts)
        assert S.variant_of(fmt, qw.symmetric, qw.double_quant, qw.zero_point) == variant
    rows = [dict(impl="torch-bf16", N=64, K=128, M=1, us=10.0)]
    for i, name in enumerate(["lowbit-int4-g128", "lowbit-int4-g128-sym", "lowbit-nf4-b64-dq"]):
        rows.append(dict(impl=name, N=64, K=128, M=1, us=5.0 + i, speedup=10.0 / (5.0 + i)))
    res = {"rows": rows, "env": {"gpu": "test card"}, "copy_gbs": 1000.0}
    lines = GB.format_gpu_table(res).splitlines()
    assert "lowbit-int4-g128-sym" in lines[1] and "lowbit-nf4-b64-dq" in lines[1]
    assert len(lines[1]) == len(lines[2])  # the data row lines up with the header
    assert "2.00x" in lines[2] and "1.67x" in lines[2] and "1.43x" in lines[2]


def test_import_without_triton():
    """Triton is optional: lowbit imports, and lowbit.kernels says it is unavailable."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lowbit, lowbit.kernels as K\n"
            "assert K.AVAILABLE is False\n"
            "from lowbit import ops; assert ops._gpu_kernels() is None\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---- real GPU only: CUDA graphs and torch.compile -----------------------------------------
needs_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs a CUDA GPU (LOWBIT_TEST_REAL_GPU=1)")


@needs_gpu
@pytest.mark.parametrize("M", (1, 16, 300))
def test_cuda_graph_capture(M):
    lin = torch.nn.Linear(1024, 768).cuda()
    q = lowbit.QuantLinear.from_linear(lin, "int4").cuda()
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    eager = q(x)  # warm-up: compiles the kernels, repacks the weight
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = q(static_x)
    for _ in range(2):
        new = torch.randn_like(x)
        static_x.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, q(new))
    assert torch.equal(eager, q(x))


@needs_gpu
def test_torch_compile_fullgraph():
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(),
                                torch.nn.Linear(1024, 256)).cuda()
    for i in (0, 2):
        model[i] = lowbit.QuantLinear.from_linear(model[i], ("int4", "nf4")[i // 2]).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=2e-3, atol=2e-3)
    n = layout.REPACKS[0]
    compiled(x)
    compiled(x)
    assert layout.REPACKS[0] == n  # the compiled graph hits the per-weight layout cache


def test_idot_selection_and_exact_switch(monkeypatch):
    """The heuristics take the integer-dot GEMV for int4 / int8 / nf4 / fp4 weights whose groups
    hold whole layout blocks (or groups of 64 for the 4-bit formats), 16-bit activations only;
    LOWBIT_GPU_EXACT=1 runs the float32 GEMV even where a config asks for it."""
    c = S.heuristic(1, 14336, 4096, "int4", 128, torch.bfloat16)
    assert c.kernel == "gemv" and c.params.get("IDOT") is True
    assert not S.heuristic(1, 14336, 4096, "int4", 128, torch.float32).params.get("IDOT")
    assert not S.heuristic(1, 14336, 4096, "int4", 32, torch.bfloat16).params.get("IDOT")
    assert S.heuristic(1, 14336, 4096, "int4", 64, torch.bfloat16).params.get("IDOT")
    assert S.heuristic(1, 4096, 4096, "int4", 128, torch.bfloat16).params.get("IDOT")
    assert S.heuristic(2, 4096, 11008, "int8", -1, torch.float16).params.get("IDOT")
    assert S.heuristic(1, 4096, 4096, "int8", 128, torch.bfloat16).params.get("IDOT")
    assert not S.heuristic(1, 4096, 4096, "int8", 32, torch.bfloat16).params.get("IDOT")
    assert S.heuristic(1, 4096, 4096, "nf4", 64, torch.bfloat16).params.get("IDOT")
    assert not S.heuristic(1, 4096, 4096, "nf4", 32, torch.bfloat16).params.get("IDOT")
    assert S.heuristic(1, 4096, 4096, "fp4", 64, torch.bfloat16).params.get("IDOT")
    assert not S.heuristic(2, 4096, 4096, "fp4", 32, torch.bfloat16).params.get("IDOT")
    assert not S.heuristic(3, 4096, 4096, "int4", 128, torch.bfloat16).params.get("IDOT")
    from lowbit.kernels import _common as C
    from lowbit.kernels import gemv as G
    ran = []
    real_launch = C.launch

    def spy(kernel, *a, **k):
        ran.append(kernel)
        return real_launch(kernel, *a, **k)

    # (the x quantization is launched through _common.launch_x_prep)
    monkeypatch.setattr(G, "launch", spy)
    monkeypatch.setattr(C, "launch", spy)
    qw = quantized(40, 256, "int4", {})
    gw = layout.gpu_weight(qw)
    x = make_x(1, 256, torch.bfloat16, seed=5)
    gemv(x, gw, None, poisoned(1, 40, x.dtype), BN=16, CB=1, IDOT=True)
    assert ran == [G._xquant_kernel, G._gemv_idot_kernel]
    ran.clear()
    monkeypatch.setenv("LOWBIT_GPU_EXACT", "1")
    gemv(x, gw, None, poisoned(1, 40, x.dtype), BN=16, CB=1, IDOT=True)
    assert ran == [G._gemv_kernel]
    monkeypatch.delenv("LOWBIT_GPU_EXACT")
    # the integer-dot GEMV does not take float32 activations, nf4 / fp4 with blocks of 32 or
    # groups that split a layout block: those run the float32 GEMV with the same parameters
    for fmt, opts, dt in (("int4", {}, torch.float32), ("fp4", {"group_size": 32}, torch.bfloat16),
                          ("nf4", {"group_size": 32}, torch.bfloat16),
                          ("int4", {"group_size": 32}, torch.float16)):
        qw = quantized(40, 256, fmt, opts)
        gw = layout.gpu_weight(qw)
        x = make_x(1, 256, dt, seed=6)
        ran.clear()
        a = gemv(x, gw, None, poisoned(1, 40, dt), BN=16, CB=1, IDOT=True)
        assert ran == [G._gemv_kernel], (fmt, opts, dt)
        assert_linear_close(a, R.linear(x, qw), x, qw, msg=f"{fmt} {opts} {dt}")
