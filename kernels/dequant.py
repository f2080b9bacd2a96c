"""dequantize: canonical QuantizedWeight -> float [N, K], bit-exact against the reference.

The kernels are bound by the output write (2-4 bytes per element against half a byte or one
byte read), so each is laid out for wide, coalesced stores (H200, bf16 output, median of CUDA
graph replays with L2 flushed; bytes read + written, copy bandwidth 4.22 TB/s):

* 4-bit formats, rows of whole 32-bit words (K % 8 == 0): ``_dequant4w_kernel`` reads the
  codes as int32 words, [BN, BW] per program, decodes the word's eight nibbles with shifts
  (one scale lookup per word: groups are multiples of 16), and interleaves them back into K
  order with a tree of tl.join, so that each thread stores 8 consecutive outputs. nf4 / fp4
  take their codebook value by tl.gather from the 16 values in registers. 28672 x 4096: int4
  g128 89 us (3.35 TB/s; the per-element kernel before it 107 us), nf4 b64 106 us (2.83 TB/s;
  was 182 us, a load per code from the table in memory).
* Other 4-bit rows (odd K, a row that is not word aligned): ``_dequant4_kernel``, one output
  element per lane from its byte.
* int8: ``_dequant8_kernel``, the scale (and zero-point) loaded once per row when the row is
  one group. 28672 x 4096: 96 us (3.69 TB/s; was 104).

The math is the reference's: float32, one multiply (plus the two-rounding absmax decode of
double quant, and int4's float offset added after the product), then one cast; the kernels are
compiled with ``enable_fp_fusion=False`` so no multiply-add is ever contracted into an FMA.
Every format and variant: int8 per row or per group, with or without int16 zero-points; int4
symmetric, with uint8 zero-points or float offsets; nf4 and fp4 (their codebook in lut_ptr),
with or without double quant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit import formats as F
from lowbit.qweight import QuantizedWeight

from ._common import FMT_FP4, FMT_IDS, FMT_INT4, FMT_INT8, FMT_NF4, cast_out, codebook_lut, emulate_bf16

# Launch shapes (H200 sweep over BN 4-32, BW 16-128 / BK 256-1024, 2-8 warps; these were
# best or within 3% of it on 28672 x 4096 and 4096 x 4096 for every format).
BN_DEQ4W, BW_DEQ4W, WARPS_DEQ4W = 4, 128, 4  # 4-bit words: 4 rows x 1024 elements
BN_DEQ4, BK_DEQ4, WARPS_DEQ4 = 16, 256, 4  # 4-bit fallback (per element)
BN_DEQ8, BK_DEQ8, WARPS_DEQ8 = 16, 512, 4  # int8


@triton.jit
def _absmax(s_ptr, dqs_ptr, dqo_ptr, sptr, row, C, gidx, mask, zero_rt, DQ: tl.constexpr):
    """The codebook formats' absmax of each group at ``sptr``: stored, or decoded from double
    quantization (code * step + zero_rt, then + the chunk's offset: two roundings)."""
    if DQ:
        ca = tl.load(s_ptr + sptr, mask=mask, other=0)
        cptr = row * C + gidx // 256
        step = tl.load(dqs_ptr + cptr, mask=mask, other=0.0)
        lo = tl.load(dqo_ptr + cptr, mask=mask, other=0.0)
        t = ca.to(tl.float32) * step + zero_rt
        return t + lo
    else:
        return tl.load(s_ptr + sptr, mask=mask, other=0.0)


@triton.jit
def _group_params(s_ptr, z_ptr, dqs_ptr, dqo_ptr, sptr, row, C, gidx, mask, zero_rt,
                  FMT: tl.constexpr, HAS_ZEROS: tl.constexpr, DQ: tl.constexpr,
                  OFFSET: tl.constexpr):
    """(s, z, m) of the 4-bit groups at ``sptr``: int4's scale with its zero point (8 when
    symmetric) or float offset m; the codebook formats' absmax as s."""
    z = 8  # int4 symmetric
    m = 0.0
    if FMT == 1:
        s = tl.load(s_ptr + sptr, mask=mask, other=0.0)
        if OFFSET:
            m = tl.load(z_ptr + sptr, mask=mask, other=0.0)
        elif HAS_ZEROS:
            z = tl.load(z_ptr + sptr, mask=mask, other=0).to(tl.int32)
    else:
        s = _absmax(s_ptr, dqs_ptr, dqo_ptr, sptr, row, C, gidx, mask, zero_rt, DQ)
    return s, z, m


@triton.jit
def _decode4(code, s, z, m, lut16, lut_ptr, FMT: tl.constexpr, OFFSET: tl.constexpr,
             GATHER: tl.constexpr, NUMEL: tl.constexpr):
    """float32 values of 4-bit codes (int32) given their group's parameters: int4
    float(q - z) * s, or float(q) * s + m with float offsets; nf4 / fp4 codebook[q] * s
    (s: the absmax)."""
    if FMT == 1:
        if OFFSET:
            return code.to(tl.float32) * s + m
        else:
            return (code - z).to(tl.float32) * s
    else:
        if GATHER:
            v = tl.reshape(tl.gather(lut16, tl.reshape(code, [NUMEL]), 0), code.shape)
        else:
            v = tl.load(lut_ptr + code)
        return v * s


@triton.jit
def _word_nibble(w, i: tl.constexpr, s, z, m, lut16, lut_ptr, ty: tl.constexpr, FMT: tl.constexpr,
                 OFFSET: tl.constexpr, NUMEL: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Output values (dtype ty) of nibble i of int32 words w: element 8 * word + i."""
    v = _decode4((w >> (4 * i)) & 0xF, s, z, m, lut16, lut_ptr, FMT, OFFSET, True, NUMEL)
    return cast_out(v, ty, EMULATE_BF16)


@triton.jit
def _dequant4w_kernel(words_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, out_ptr,
                      N, K, KW, G, C, zero_rt,
                      FMT: tl.constexpr, HAS_ZEROS: tl.constexpr, DQ: tl.constexpr,
                      OFFSET: tl.constexpr,  # int4 with float offsets (z_ptr holds them)
                      GROUP: tl.constexpr,  # group length (2**30 when the row is one group)
                      BN: tl.constexpr, BW: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """4-bit rows of whole int32 words (K % 8 == 0): a [BN, BW] tile of words -> [BN, 8 BW]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_w = pid_k * BW + tl.arange(0, BW)
    n_ok = offs_n < N
    row = offs_n.to(tl.int64)[:, None]
    mask = n_ok[:, None] & (offs_w < KW)[None, :]
    w = tl.load(words_ptr + row * KW + offs_w[None, :], mask=mask, other=0)
    gidx = (offs_w * 8)[None, :] // GROUP  # a word lies in one group (groups: multiples of 16)
    s, z, m = _group_params(s_ptr, z_ptr, dqs_ptr, dqo_ptr, row * G + gidx, row, C, gidx, mask,
                            zero_rt, FMT, HAS_ZEROS, DQ, OFFSET)
    if FMT == 1:
        lut16 = 0.0
    else:
        lut16 = tl.load(lut_ptr + tl.arange(0, 16))
    ty: tl.constexpr = out_ptr.dtype.element_ty
    NUMEL: tl.constexpr = BN * BW
    v0 = _word_nibble(w, 0, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v1 = _word_nibble(w, 1, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v2 = _word_nibble(w, 2, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v3 = _word_nibble(w, 3, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v4 = _word_nibble(w, 4, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v5 = _word_nibble(w, 5, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v6 = _word_nibble(w, 6, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    v7 = _word_nibble(w, 7, s, z, m, lut16, lut_ptr, ty, FMT, OFFSET, NUMEL, EMULATE_BF16)
    # tl.join appends an axis, so the first join's index ends up most significant: pairs
    # (i, i + 4), then (i, i + 2), then (i, i + 1) give element order 0..7.
    o = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    o = tl.reshape(o, [BN, BW * 8])
    offs_k = pid_k * (BW * 8) + tl.arange(0, BW * 8)
    tl.store(out_ptr + row * K + offs_k[None, :], o, mask=n_ok[:, None] & (offs_k < K)[None, :])


@triton.jit
def _dequant4_kernel(data_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, out_ptr,
                     N, K, stride_d, G, C, zero_rt,
                     FMT: tl.constexpr, HAS_ZEROS: tl.constexpr, DQ: tl.constexpr,
                     OFFSET: tl.constexpr, GROUP: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Any 4-bit rows: one output element per lane, from its byte (element 2j is the low
    nibble of byte j, 2j + 1 the high one)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    row = offs_n[:, None].to(tl.int64)
    byte = tl.load(data_ptr + row * stride_d + offs_k[None, :] // 2, mask=mask, other=0)
    code = (byte.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF
    gidx = offs_k[None, :] // GROUP
    s, z, m = _group_params(s_ptr, z_ptr, dqs_ptr, dqo_ptr, row * G + gidx, row, C, gidx, mask,
                            zero_rt, FMT, HAS_ZEROS, DQ, OFFSET)
    w = _decode4(code, s, z, m, 0.0, lut_ptr, FMT, OFFSET, False, BN * BK)
    tl.store(out_ptr + row * K + offs_k[None, :], cast_out(w, out_ptr.dtype.element_ty, EMULATE_BF16),
             mask=mask)


@triton.jit
def _dequant8_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_d, G,
                     HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """int8: w = float(q - z) * s per group (z = 0 without zero-points); with PER_ROW (one
    group per row) s and z are loaded once per row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    n_ok = offs_n < N
    row = offs_n.to(tl.int64)
    mask = n_ok[:, None] & (offs_k < K)[None, :]
    q = tl.load(q_ptr + row[:, None] * stride_d + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    if PER_ROW:
        s = tl.load(s_ptr + row, mask=n_ok, other=0.0)[:, None]
        if HAS_ZEROS:
            q = q - tl.load(z_ptr + row, mask=n_ok, other=0).to(tl.int32)[:, None]
    else:
        sptr = row[:, None] * G + (offs_k // GROUP)[None, :]
        s = tl.load(s_ptr + sptr, mask=mask, other=0.0)
        if HAS_ZEROS:
            q = q - tl.load(z_ptr + sptr, mask=mask, other=0).to(tl.int32)
    w = q.to(tl.float32) * s
    tl.store(out_ptr + row[:, None] * K + offs_k[None, :],
             cast_out(w, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor) -> torch.Tensor:
    """Decode ``qw`` into ``out`` (float32/bf16/f16, contiguous [N, K])."""
    N, K = qw.shape
    data = qw.data.contiguous()
    scales = qw.scales.contiguous()
    zeros = qw.zeros.contiguous() if qw.zeros is not None else None
    fmt = FMT_IDS[qw.fmt]
    G = qw.n_groups
    GROUP = F.effective_group(qw.group_size, K) if G > 1 else 1 << 30
    emulate = emulate_bf16(out.dtype)
    if fmt == FMT_INT8:
        grid = (triton.cdiv(N, BN_DEQ8), triton.cdiv(K, BK_DEQ8))
        _dequant8_kernel[grid](
            data, scales, zeros if zeros is not None else scales, out, N, K, data.stride(0), G,
            HAS_ZEROS=zeros is not None, GROUP=GROUP, PER_ROW=G == 1, BN=BN_DEQ8, BK=BK_DEQ8,
            EMULATE_BF16=emulate, num_warps=WARPS_DEQ8, enable_fp_fusion=False)
        return out
    dqs = qw.dq_scale.contiguous() if qw.dq_scale is not None else None
    dqo = qw.dq_offset.contiguous() if qw.dq_offset is not None else None
    offset = qw.zero_point == "float"
    lut = codebook_lut(data.device, qw.fmt) if fmt >= FMT_NF4 else scales
    C = dqs.shape[1] if dqs is not None else 1
    args = (scales, zeros if zeros is not None else scales,
            dqs if dqs is not None else scales, dqo if dqo is not None else scales, lut, out)
    flags = dict(FMT=fmt, HAS_ZEROS=zeros is not None, DQ=dqs is not None, OFFSET=offset,
                 GROUP=GROUP, EMULATE_BF16=emulate, enable_fp_fusion=False)
    if K % 8 == 0 and data.data_ptr() % 4 == 0:  # (data is contiguous: rows of K / 8 words)
        KW = K // 8
        grid = (triton.cdiv(N, BN_DEQ4W), triton.cdiv(KW, BW_DEQ4W))
        _dequant4w_kernel[grid](data.view(torch.int32), *args, N, K, KW, G, C, 0.0,
                                BN=BN_DEQ4W, BW=BW_DEQ4W, num_warps=WARPS_DEQ4W, **flags)
        return out
    grid = (triton.cdiv(N, BN_DEQ4), triton.cdiv(K, BK_DEQ4))
    _dequant4_kernel[grid](data, *args, N, K, data.stride(0), G, C, 0.0,
                           BN=BN_DEQ4, BK=BK_DEQ4, num_warps=WARPS_DEQ4, **flags)
    return out


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] in ``dtype``; bit-exact against lowbit.reference.dequantize."""
    out = torch.empty(qw.shape, dtype=dtype, device=qw.device)
    if out.numel():
        dequantize_into(qw, out)
    return out


assert FMT_INT8 == 0 and FMT_INT4 == 1 and FMT_NF4 == 2 and FMT_FP4 == 3  # tested by value
