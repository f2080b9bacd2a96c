"""The reference quantizers against an independent element-by-element numpy statement of the
formats (lowbit/formats.py docstrings), round-trip bounds, packing, and the chunked public
quantizer against the reference."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit import formats as F
from lowbit import reference as R

from conftest import FORMAT_CASES, NEW_FORMAT_CASES, case_id

ALL_CASES = FORMAT_CASES + NEW_FORMAT_CASES

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


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
@pytest.mark.parametrize("K", [1, 31, 64, 129, 576])
def test_round_trip_error_is_bounded(case, K):
    fmt, opts = case
    w = torch.randn(9, K)
    qw = R.quantize_weight(w, fmt, **opts)
    err = (R.dequantize(qw) - w).abs()
    group = K if qw.group_size == -1 else qw.group_size
    if fmt in ("int8", "int4"):
        bound = R.per_element(qw.scales, group, K) / 2
    else:
        absmax = R.per_element(R.to_groups(w, group).abs().amax(2), group, K)
        gaps = np.diff(np.sort(np.array(F.CODEBOOKS[fmt]))).max() / 2  # worst half-gap
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


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
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
    for fmt, opts in ALL_CASES:
        assert torch.equal(lowbit.dequantize(lowbit.quantize_weight(w, fmt, **opts)), w)


def test_half_precision_weights_are_accepted():
    w = torch.randn(8, 64)
    for dt in (torch.bfloat16, torch.float16):
        a = lowbit.quantize_weight(w.to(dt), "int4")
        b = lowbit.quantize_weight(w.to(dt).float(), "int4")
        assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)


# ---- the interop variants: quantizers against brute force ------------------------------------
def brute_int8_groups(w, group, symmetric):
    N, K = w.shape
    G = -(-K // group)
    q = np.zeros((N, K), np.int8)
    s = np.zeros((N, G), f32)
    z = np.zeros((N, G), np.int16)
    for n in range(N):
        for g in range(G):
            seg = w[n, g * group:(g + 1) * group]
            if symmetric:
                s[n, g] = f32(np.abs(seg).max()) / f32(127)
            else:
                lo, hi = min(f32(seg.min()), f32(0)), max(f32(seg.max()), f32(0))
                s[n, g] = (f32(hi) - f32(lo)) / f32(255)
            d = s[n, g] if s[n, g] != 0 else f32(1)
            zu = 0 if symmetric else int(np.clip(np.round(-f32(lo) / d), 0, 255))
            z[n, g] = 0 if symmetric else zu - 128
            for i, v in enumerate(seg):
                if symmetric:
                    q[n, g * group + i] = np.clip(np.round(f32(v) / d), -127, 127)
                else:
                    q[n, g * group + i] = int(np.clip(np.round(f32(v) / d) + zu, 0, 255)) - 128
    return q, s, z


def brute_int4_offset(w, group):
    N, K = w.shape
    G = -(-K // group)
    codes = np.zeros((N, K), np.uint8)
    s = np.zeros((N, G), f32)
    m = np.zeros((N, G), f32)
    for n in range(N):
        for g in range(G):
            seg = w[n, g * group:(g + 1) * group]  # the real elements only (no padding)
            lo, hi = f32(seg.min()), f32(seg.max())
            s[n, g], m[n, g] = (hi - lo) / f32(15), lo
            d = s[n, g] if s[n, g] != 0 else f32(1)
            for i, v in enumerate(seg):
                codes[n, g * group + i] = np.clip(np.round((f32(v) - lo) / d), 0, 15)
    return codes, s, m


@pytest.mark.parametrize("K", [1, 5, 32, 33, 70, 130])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_interop_quantizers_match_brute_force(K, group):
    w = torch.randn(5, K) * torch.rand(5, 1)
    w[0, : min(K, 3)] = 0.0
    w[1] = w[1].abs() + 0.5  # a row with no negative value (min/max offset != min(., 0))
    wn = w.numpy()
    gl = K if group == -1 else group
    for symmetric in (True, False):
        qw = R.quantize_weight(w, "int8", group_size=group, symmetric=symmetric)
        q, s, z = brute_int8_groups(wn, gl, symmetric)
        assert np.array_equal(qw.data.numpy(), q) and np.array_equal(qw.scales.numpy(), s)
        if not symmetric:
            assert np.array_equal(qw.zeros.numpy(), z)
        # decode: float(q - z) * s per element
        want = (q.astype(np.int32) - np.repeat(z, gl, axis=1)[:, :K]).astype(f32) * np.repeat(s, gl, axis=1)[:, :K]
        assert np.array_equal(R.dequantize(qw).numpy(), want)
    qw = R.quantize_weight(w, "int4", group_size=group, zero_point="float")
    codes, s, m = brute_int4_offset(wn, gl)
    assert np.array_equal(R.unpack_nibbles(qw.data, K).numpy(), codes)
    assert np.array_equal(qw.scales.numpy(), s) and np.array_equal(qw.zeros.numpy(), m)
    want = codes.astype(f32) * np.repeat(s, gl, axis=1)[:, :K] + np.repeat(m, gl, axis=1)[:, :K]
    assert np.array_equal(R.dequantize(qw).numpy(), want)
    qw = R.quantize_weight(w, "fp4", group_size=group)
    cb = np.array(F.FP4_CODEBOOK, f32)
    a = np.zeros((5, -(-K // gl)), f32)
    for n in range(5):
        for g in range(a.shape[1]):
            seg = wn[n, g * gl:(g + 1) * gl]
            a[n, g] = np.abs(seg).max()
            d = a[n, g] if a[n, g] != 0 else f32(1)
            for i, v in enumerate(seg):
                code = int(np.argmin(np.abs(f32(v) / d - cb)))  # first on a tie
                assert R.unpack_nibbles(qw.data, K)[n, g * gl + i] == code
    assert np.array_equal(qw.scales.numpy(), a)


def test_gptq_v1_zero_of_256_is_representable():
    """GPTQ v1 stores z - 1, so an 8-bit zero-point can be 256: z = 256 - 128 = 128 (int16)."""
    from lowbit import QuantizedWeight
    q_gptq = torch.tensor([[0, 255, 128, 7]], dtype=torch.int32)
    z_gptq, s = 256, torch.tensor([[0.5]])
    qw = QuantizedWeight("int8", (1, 4), (q_gptq - 128).to(torch.int8), s,
                         torch.tensor([[z_gptq - 128]], dtype=torch.int16), group_size=-1,
                         symmetric=False)
    want = (q_gptq - z_gptq).float() * 0.5
    assert torch.equal(R.dequantize(qw), want)


# ---- GGUF tensors decode bit for bit as the gguf package's numpy dequantize --------------------
def _fp16_bits(rng, n):
    """Random finite fp16 values (normal, subnormal, zero, both signs) as uint16."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # no inf / NaN
    bits[:4] = [0x0000, 0x8000, 0x0001, 0x3C00]
    return bits.astype(np.uint16)


def _gguf_dequant(cls, raw, K):
    return cls.dequantize_rows(raw.reshape(raw.shape[0], -1)).reshape(raw.shape[0], K)


def _nibbles_32(qs):
    """GGUF's 16-byte nibble run [..., 16] -> codes [..., 32]: element j in the low nibble of
    byte j, element 16 + j in its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _lowbit_nibbles(codes):
    return R.pack_nibbles(torch.from_numpy(codes.astype(np.uint8)))


def _bits_equal(a, b):
    return torch.equal(torch.as_tensor(a).view(torch.int32), torch.as_tensor(b).view(torch.int32))


N_ROWS, K_GGUF = 3, 512


def test_gguf_q8_0_is_int8_group_32():
    gq = pytest.importorskip("gguf.quants")
    rng = np.random.default_rng(1)
    nb = N_ROWS * K_GGUF // 32
    d = _fp16_bits(rng, nb)
    qs = rng.integers(-128, 128, (nb, 32), dtype=np.int8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), qs.view(np.uint8)], axis=1)
    want = _gguf_dequant(gq.Q8_0, raw.reshape(N_ROWS, -1), K_GGUF)
    from lowbit import QuantizedWeight
    qw = QuantizedWeight("int8", (N_ROWS, K_GGUF), torch.from_numpy(qs.reshape(N_ROWS, K_GGUF).copy()),
                         torch.from_numpy(d.view(np.float16).astype(np.float32).reshape(N_ROWS, -1)),
                         group_size=32)
    assert _bits_equal(R.dequantize(qw), want)
    assert _bits_equal(lowbit.dequantize(qw), want)


def test_gguf_q4_0_is_int4_symmetric_group_32():
    gq = pytest.importorskip("gguf.quants")
    rng = np.random.default_rng(2)
    nb = N_ROWS * K_GGUF // 32
    d = _fp16_bits(rng, nb)
    qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), qs], axis=1)
    want = _gguf_dequant(gq.Q4_0, raw.reshape(N_ROWS, -1), K_GGUF)
    from lowbit import QuantizedWeight
    codes = _nibbles_32(qs).reshape(N_ROWS, K_GGUF)
    qw = QuantizedWeight("int4", (N_ROWS, K_GGUF), _lowbit_nibbles(codes),
                         torch.from_numpy(d.view(np.float16).astype(np.float32).reshape(N_ROWS, -1)),
                         group_size=32, symmetric=True)
    assert _bits_equal(R.dequantize(qw), want)
    assert _bits_equal(lowbit.dequantize(qw), want)


def test_gguf_q4_1_is_int4_float_offset_group_32():
    gq = pytest.importorskip("gguf.quants")
    rng = np.random.default_rng(3)
    nb = N_ROWS * K_GGUF // 32
    d, m = _fp16_bits(rng, nb), _fp16_bits(rng, nb)[::-1].copy()
    qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), qs], axis=1)
    want = _gguf_dequant(gq.Q4_1, raw.reshape(N_ROWS, -1), K_GGUF)
    from lowbit import QuantizedWeight
    codes = _nibbles_32(qs).reshape(N_ROWS, K_GGUF)
    f16 = lambda b: torch.from_numpy(b.view(np.float16).astype(np.float32).reshape(N_ROWS, -1))  # noqa: E731
    qw = QuantizedWeight("int4", (N_ROWS, K_GGUF), _lowbit_nibbles(codes), f16(d), f16(m),
                         group_size=32, symmetric=False, zero_point="float")
    assert _bits_equal(R.dequantize(qw), want)
    assert _bits_equal(lowbit.dequantize(qw), want)


def test_gguf_q4_k_is_int4_float_offset_group_32():
    gq = pytest.importorskip("gguf.quants")
    rng = np.random.default_rng(4)
    nsb = N_ROWS * K_GGUF // 256  # super-blocks of 256 = 8 sub-blocks of 32
    d, dmin = _fp16_bits(rng, nsb), _fp16_bits(rng, nsb)[::-1].copy()
    sc_bytes = rng.integers(0, 256, (nsb, 12), dtype=np.uint8)
    qs = rng.integers(0, 256, (nsb, 128), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(nsb, 2), dmin.view(np.uint8).reshape(nsb, 2),
                          sc_bytes, qs], axis=1)
    want = _gguf_dequant(gq.Q4_K, raw.reshape(N_ROWS, -1), K_GGUF)
    sc, mn = gq.Q4_K.get_scale_min(sc_bytes)  # the 6-bit sub-block scales and mins [nsb, 8]
    d32 = d.view(np.float16).astype(np.float32)[:, None]
    dmin32 = dmin.view(np.float16).astype(np.float32)[:, None]
    scale = d32 * sc.astype(np.float32)  # exact float32 products (11 x 6 bits)
    offset = -(dmin32 * mn.astype(np.float32))
    # 4 runs of 32 bytes per super-block: run c holds sub-block 2c (low nibbles) and 2c+1 (high)
    runs = qs.reshape(nsb, 4, 32)
    codes = np.stack([runs & 15, runs >> 4], axis=2).reshape(N_ROWS, K_GGUF)
    from lowbit import QuantizedWeight
    qw = QuantizedWeight("int4", (N_ROWS, K_GGUF), _lowbit_nibbles(codes),
                         torch.from_numpy(scale.reshape(N_ROWS, -1)),
                         torch.from_numpy(offset.reshape(N_ROWS, -1)),
                         group_size=32, symmetric=False, zero_point="float")
    assert _bits_equal(R.dequantize(qw), want)
    assert _bits_equal(lowbit.dequantize(qw), want)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_nearest_code_equals_the_exhaustive_argmin(fmt):
    """R.nearest_code (a binary search and two float32 distances) returns exactly what the
    argmin over the whole codebook of |x - value| returns, ties to the lower code index
    included: on every code value, on the midpoints of neighbouring values and the 8 floats on
    each side of them, on +-0 and tiny values, on random values inside and far outside the
    codebook's range, and on inf / nan."""
    table = R.CODEBOOK_TABLES[fmt]
    vals = torch.unique(table)  # (sorted)
    mids = (vals[1:] + vals[:-1]) / 2
    probes = [table, mids, -mids, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 2.0, -2.0,
                                                2.0000002, 3e30, -3e30, float("inf"), float("-inf"),
                                                float("nan")])]
    for base in (mids, vals):
        up, down = base.clone(), base.clone()
        for _ in range(8):
            up = torch.nextafter(up, torch.full_like(up, float("inf")))
            down = torch.nextafter(down, torch.full_like(down, float("-inf")))
            probes += [up.clone(), down.clone()]
    g = torch.Generator().manual_seed(0)
    probes += [torch.rand(200_000, generator=g) * 5 - 2.5, torch.randn(100_000, generator=g),
               torch.randn(10_000, generator=g) * 1e6, torch.randn(10_000, generator=g) * 1e9]
    x = torch.cat(probes)
    want = (x[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)
    got = R.nearest_code(x, fmt)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(float(x[i]), int(got[i]), int(want[i])) for i in bad[:10]]
    # any shape: the [N, G, block] tensors the quantizers pass
    x3 = torch.randn(7, 5, 64, generator=g)
    assert torch.equal(R.nearest_code(x3, fmt), (x3[..., None] - table).abs().argmin(dim=-1).to(torch.uint8))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_cpu_codebook_quantizer_is_the_reference_bit_for_bit(fmt, dq):
    """lowbit.quantize_weight's C++ code search for nf4 / fp4 (ops._quantize_codebook_cpu)
    gives the reference's codes, scales and double-quantization fields exactly: odd K, a ragged
    last block, all-zero rows and blocks, values on the codebook's midpoints (ties), tiny and
    huge magnitudes, bf16 input."""
    from lowbit import ops
    g = torch.Generator().manual_seed(3)
    mids = (torch.unique(R.CODEBOOK_TABLES[fmt])[1:] + torch.unique(R.CODEBOOK_TABLES[fmt])[:-1]) / 2
    for N, K, block in ((7, 301, 64), (33, 256, 32), (5, 1000, 256), (3, 64, 64)):
        w = torch.randn(N, K, generator=g)
        w[1] = 0.0                               # an all-zero row
        w[2, : min(K, block)] = 0.0              # an all-zero block
        w[0, :mids.numel()] = mids               # ties: w / absmax lands on a midpoint (absmax 1)
        w[0, mids.numel()] = 1.0
        if N > 3:
            w[3] *= 1e-30
            w[4] *= 1e30
        for x in (w, w.to(torch.bfloat16)):
            got = ops._quantize_codebook_cpu(x, fmt, group_size=block, double_quant=dq)
            want = R.quantize_weight(x, fmt, group_size=block, double_quant=dq)
            for name in ("data", "scales", "dq_scale", "dq_offset"):
                a, b = getattr(got, name), getattr(want, name)
                assert (a is None) == (b is None), name
                if a is not None:
                    assert a.dtype == b.dtype and torch.equal(a, b), (name, N, K, block)
            assert got.group_size == want.group_size and got.double_quant == want.double_quant
