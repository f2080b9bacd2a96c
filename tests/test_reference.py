"""The reference quantizers against an independent element-by-element numpy statement of the
formats (lowbit/formats.py docstrings), round-trip bounds, packing, and the chunked public
quantizer against the reference."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit import formats as F
from lowbit import reference as R

from conftest import FORMAT_CASES, case_id

f32 = np.float32


def brute_int8(w):
    N, K = w.shape
    q = np.zeros((N, K), np.int8)
    s = np.zeros((N, 1), f32)
    for n in range(N):
        s[n, 0] = f32(np.abs(w[n]).max()) / f32(127)
        d = s[n, 0] if s[n, 0] != 0 else f32(1)
        for k in range(K):
            q[n, k] = np.clip(np.round(f32(w[n, k]) / d), -127, 127)
    return q, s


def brute_int4(w, group, symmetric):
    N, K = w.shape
    G = -(-K // group)
    codes = np.zeros((N, K), np.uint8)
    s = np.zeros((N, G), f32)
    z = np.zeros((N, G), np.uint8)
    for n in range(N):
        for g in range(G):
            seg = w[n, g * group:(g + 1) * group]
            if symmetric:
                s[n, g] = f32(np.abs(seg).max()) / f32(7)
                z[n, g] = 8
            else:
                lo, hi = min(f32(seg.min()), f32(0)), max(f32(seg.max()), f32(0))
                s[n, g] = (f32(hi) - f32(lo)) / f32(15)
            d = s[n, g] if s[n, g] != 0 else f32(1)
            if not symmetric:
                z[n, g] = np.clip(np.round(-f32(lo) / d), 0, 15)
            for i, v in enumerate(seg):
                if symmetric:
                    codes[n, g * group + i] = np.clip(np.round(f32(v) / d), -8, 7) + 8
                else:
                    codes[n, g * group + i] = np.clip(np.round(f32(v) / d) + z[n, g], 0, 15)
    return codes, s, z


def brute_nf4(w, group):
    N, K = w.shape
    G = -(-K // group)
    cb = np.array(F.NF4_CODEBOOK, f32)
    codes = np.zeros((N, K), np.uint8)
    a = np.zeros((N, G), f32)
    for n in range(N):
        for g in range(G):
            seg = w[n, g * group:(g + 1) * group]
            a[n, g] = np.abs(seg).max()
            d = a[n, g] if a[n, g] != 0 else f32(1)
            for i, v in enumerate(seg):
                dist = np.abs(f32(v) / d - cb)
                codes[n, g * group + i] = int(np.argmin(dist))  # first on a tie
    return codes, a


@pytest.mark.parametrize("K", [1, 5, 32, 33, 70, 130])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_int4_and_nf4_quantizers_match_brute_force(K, group):
    w = torch.randn(5, K) * torch.rand(5, 1)
    w[0, : min(K, 3)] = 0.0  # zeros and an all-zero row-start
    wn = w.numpy()
    gl = K if group == -1 else group
    for symmetric in (False, True):
        qw = R.quantize_weight(w, "int4", group_size=group, symmetric=symmetric)
        codes, s, z = brute_int4(wn, gl, symmetric)
        assert np.array_equal(R.unpack_nibbles(qw.data, K).numpy(), codes)
        assert np.array_equal(qw.scales.numpy(), s)
        if not symmetric:
            assert np.array_equal(qw.zeros.numpy(), z)
    qw = R.quantize_weight(w, "nf4", group_size=group)
    codes, a = brute_nf4(wn, gl)
    assert np.array_equal(R.unpack_nibbles(qw.data, K).numpy(), codes)
    assert np.array_equal(qw.scales.numpy(), a)


def test_int8_quantizer_matches_brute_force():
    w = torch.randn(7, 45)
    w[3] = 0
    qw = R.quantize_weight(w, "int8")
    q, s = brute_int8(w.numpy())
    assert np.array_equal(qw.data.numpy(), q) and np.array_equal(qw.scales.numpy(), s)


def test_double_quant_matches_brute_force():
    w = torch.randn(3, 16 * 300) * torch.linspace(0.1, 2, 16 * 300)  # 300 blocks: 2 chunks
    qw = R.quantize_weight(w, "nf4", group_size=16, double_quant=True)
    absmax = w.abs().reshape(3, 300, 16).amax(2).numpy()
    for n in range(3):
        for c, (b0, b1) in enumerate([(0, 256), (256, 300)]):
            seg = absmax[n, b0:b1]
            lo, step = f32(seg.min()), (f32(seg.max()) - f32(seg.min())) / f32(255)
            assert qw.dq_offset[n, c].item() == lo and qw.dq_scale[n, c].item() == step
            want = np.clip(np.round((seg - lo) / step), 0, 255)
            assert np.array_equal(qw.scales[n, b0:b1].numpy(), want.astype(np.uint8))
            decoded = (qw.scales[n, b0:b1].numpy().astype(f32) * step) + lo
            assert np.abs(decoded - seg).max() <= step / 2 * 1.0001 + 1e-7
    # and the weights were quantized against the decoded absmax
    dq_abs = R.decode_double_quant(qw.scales, qw.dq_scale, qw.dq_offset)
    cb = torch.tensor(F.NF4_CODEBOOK)
    scaled = (w.reshape(3, 300, 16) / dq_abs[..., None]).reshape(3, -1)
    want = (scaled[..., None] - cb).abs().argmin(-1)
    assert torch.equal(R.unpack_nibbles(qw.data, w.shape[1]).long(), want)


@pytest.mark.parametrize("case", FORMAT_CASES, ids=case_id)
@pytest.mark.parametrize("K", [1, 31, 64, 129, 576])
def test_round_trip_error_is_bounded(case, K):
    fmt, opts = case
    w = torch.randn(9, K)
    qw = R.quantize_weight(w, fmt, **opts)
    err = (R.dequantize(qw) - w).abs()
    group = K if qw.group_size == -1 else qw.group_size
    if fmt == "int8":
        bound = R.per_element(qw.scales, K, K) / 2
    elif fmt == "int4":
        bound = R.per_element(qw.scales, group, K) / 2
    else:
        absmax = R.per_element(R.to_groups(w, group).abs().amax(2), group, K)
        gaps = np.diff(np.array(F.NF4_CODEBOOK)).max() / 2  # worst half-gap of the codebook
        slack = 0.01 if qw.double_quant else 0.0  # absmax itself is 8-bit coded
        bound = absmax * (gaps + slack)
    assert (err <= bound * (1 + 1e-5) + 1e-6).all(), (err - bound).max()


@pytest.mark.parametrize("K", [1, 2, 3, 8, 9])
def test_pack_unpack_round_trip(K):
    codes = torch.randint(0, 16, (4, K), dtype=torch.uint8)
    packed = R.pack_nibbles(codes)
    assert packed.shape == (4, (K + 1) // 2)
    assert torch.equal(R.unpack_nibbles(packed, K), codes)
    assert (packed[:, 0] & 0x0F).tolist() == codes[:, 0].tolist()  # element 0 in the low nibble
    if K % 2:
        assert (packed[:, -1] >> 4).eq(0).all()  # padding nibble


@pytest.mark.parametrize("case", FORMAT_CASES, ids=case_id)
def test_public_quantizer_equals_reference_including_row_chunking(case, monkeypatch):
    fmt, opts = case
    w = torch.randn(37, 300)
    ref = R.quantize_weight(w, fmt, **opts)
    import lowbit.ops
    monkeypatch.setattr(lowbit.ops, "_QUANT_CHUNK_BYTES", 300 * 4 * 20 * 5)  # 5-row chunks
    got = lowbit.quantize_weight(w, fmt, **opts)
    assert got.config() == ref.config()
    for name, t in ref.tensors().items():
        assert torch.equal(getattr(got, name), t), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    for fmt in F.FORMATS:
        with pytest.raises(ValueError, match="NaN or Inf"):
            lowbit.quantize_weight(w, fmt)


def test_zero_weight_quantizes_to_zero():
    w = torch.zeros(3, 70)
    for fmt, opts in FORMAT_CASES:
        assert torch.equal(lowbit.dequantize(lowbit.quantize_weight(w, fmt, **opts)), w)


def test_half_precision_weights_are_accepted():
    w = torch.randn(8, 64)
    for dt in (torch.bfloat16, torch.float16):
        a = lowbit.quantize_weight(w.to(dt), "int4")
        b = lowbit.quantize_weight(w.to(dt).float(), "int4")
        assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
