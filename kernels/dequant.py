"""dequantize: canonical QuantizedWeight -> float [N, K], bit-exact against the reference.

One program writes a [BN, BK] tile of the output from the canonical layout (the kernels are
bound by the output write, 2-4 bytes per element against half a byte read). 4-bit formats:
the tile's bytes are loaded once as [BN, GT, GB] (GB bytes share one scale lookup: a whole
group when the group divides BK), both nibbles decoded, and tl.join interleaves them back
into K order. The math is the reference's: float32, one multiply (plus the two-rounding
absmax decode of double quant, and int4's float offset added after the product), then one
cast; the kernels are compiled with ``enable_fp_fusion=False`` so no multiply-add is ever
contracted into an FMA. Every format and variant: int8 per row or per group, with or without
int16 zero-points; int4 symmetric, with uint8 zero-points or float offsets; nf4 and fp4
(their codebook in lut_ptr), with or without double quant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit import formats as F
from lowbit.qweight import QuantizedWeight

from ._common import FMT_FP4, FMT_IDS, FMT_INT4, FMT_INT8, FMT_NF4, cast_out, codebook_lut, emulate_bf16

# Output tile: BN rows x BK columns per program (int8 / 4-bit formats).
BN_DEQ = 16
BK_DEQ = 256
BN_DEQ4 = 16
BK_DEQ4 = 256  # elements (128 bytes of codes) per row per program
WARPS_DEQ = 4


@triton.jit
def _dequant_kernel(data_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, out_ptr,
                    N, K, stride_d, G, C, zero_rt,
                    FMT: tl.constexpr, HAS_ZEROS: tl.constexpr, DQ: tl.constexpr,
                    OFFSET: tl.constexpr,  # int4 with float offsets (z_ptr holds them)
                    GROUP: tl.constexpr,  # group length (2**30 when the row is one group)
                    BN: tl.constexpr, BK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    row = offs_n[:, None].to(tl.int64)
    if FMT == 0:  # int8: w = float(q - z) * s per group (z = 0 without zero-points)
        q = tl.load(data_ptr + row * stride_d + offs_k[None, :], mask=mask, other=0)
        gidx = offs_k[None, :] // GROUP
        s = tl.load(s_ptr + row * G + gidx, mask=mask, other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_ptr + row * G + gidx, mask=mask, other=0).to(tl.int32)
            w = (q.to(tl.int32) - z).to(tl.float32) * s
        else:
            w = q.to(tl.float32) * s
    else:
        byte = tl.load(data_ptr + row * stride_d + offs_k[None, :] // 2, mask=mask, other=0)
        # element 2j is the low nibble of byte j, 2j+1 the high one
        code = (byte.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF
        gidx = offs_k[None, :] // GROUP
        sptr = row * G + gidx
        if FMT == 1 and OFFSET:  # int4 with float offsets: w = float(q) * s, then + m
            s = tl.load(s_ptr + sptr, mask=mask, other=0.0)
            m = tl.load(z_ptr + sptr, mask=mask, other=0.0)
            w = code.to(tl.float32) * s + m
        elif FMT == 1:  # int4: w = float(q - z) * s
            if HAS_ZEROS:
                z = tl.load(z_ptr + sptr, mask=mask, other=0).to(tl.int32)
            else:
                z = 8
            s = tl.load(s_ptr + sptr, mask=mask, other=0.0)
            w = (code - z).to(tl.float32) * s
        else:  # nf4 / fp4: w = codebook[q] * absmax
            v = tl.load(lut_ptr + code, mask=mask, other=0.0)
            if DQ:
                ca = tl.load(s_ptr + sptr, mask=mask, other=0)
                cptr = row * C + gidx // 256
                step = tl.load(dqs_ptr + cptr, mask=mask, other=0.0)
                lo = tl.load(dqo_ptr + cptr, mask=mask, other=0.0)
                t = ca.to(tl.float32) * step + zero_rt
                am = t + lo
            else:
                am = tl.load(s_ptr + sptr, mask=mask, other=0.0)
            w = v * am
    tl.store(out_ptr + row * K + offs_k[None, :], cast_out(w, out_ptr.dtype.element_ty, EMULATE_BF16),
             mask=mask)


@triton.jit
def _dequant4_kernel(data_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, out_ptr,
                     N, K, stride_d, G, C, zero_rt,
                     FMT: tl.constexpr, HAS_ZEROS: tl.constexpr, DQ: tl.constexpr,
                     OFFSET: tl.constexpr,  # int4 with float offsets (z_ptr holds them)
                     GROUP: tl.constexpr,  # group length (2**30 when the row is one group)
                     GB: tl.constexpr,  # bytes per scale lookup (see module docstring)
                     BN: tl.constexpr, BK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    BKB: tl.constexpr = BK // 2  # bytes per row per tile
    GT: tl.constexpr = BKB // GB  # scale lookups per row per tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    row = offs_n.to(tl.int64)
    first = pid_k * BKB + tl.arange(0, GT) * GB  # first byte of each lookup unit [GT]
    byte = first[:, None] + tl.arange(0, GB)[None, :]  # [GT, GB]
    bmask = n_ok[:, None, None] & (byte < (K + 1) // 2)[None, :, :]
    b = tl.load(data_ptr + row[:, None, None] * stride_d + byte[None, :, :], mask=bmask,
                other=0).to(tl.int32)
    lo = b & 0xF  # element 2j
    hi = b >> 4  # element 2j + 1 (same group: groups are even)
    gidx = (2 * first) // GROUP  # [GT]
    gmask = n_ok[:, None] & (2 * first < K)[None, :]
    sptr = row[:, None] * G + gidx[None, :]
    if FMT == 1 and OFFSET:  # int4 with float offsets: w = float(q) * s, then + m
        sc = tl.load(s_ptr + sptr, mask=gmask, other=0.0)[:, :, None]
        m = tl.load(z_ptr + sptr, mask=gmask, other=0.0)[:, :, None]
        w_lo = lo.to(tl.float32) * sc + m
        w_hi = hi.to(tl.float32) * sc + m
    elif FMT == 1:  # int4: w = float(q - z) * s
        if HAS_ZEROS:
            z = tl.load(z_ptr + sptr, mask=gmask, other=0).to(tl.int32)[:, :, None]
        else:
            z = 8
        sc = tl.load(s_ptr + sptr, mask=gmask, other=0.0)[:, :, None]
        w_lo = (lo - z).to(tl.float32) * sc
        w_hi = (hi - z).to(tl.float32) * sc
    else:  # nf4 / fp4: w = codebook[q] * absmax
        if DQ:
            ca = tl.load(s_ptr + sptr, mask=gmask, other=0)
            cptr = row[:, None] * C + gidx[None, :] // 256
            step = tl.load(dqs_ptr + cptr, mask=gmask, other=0.0)
            lo_c = tl.load(dqo_ptr + cptr, mask=gmask, other=0.0)
            t = ca.to(tl.float32) * step + zero_rt
            am = (t + lo_c)[:, :, None]
        else:
            am = tl.load(s_ptr + sptr, mask=gmask, other=0.0)[:, :, None]
        w_lo = tl.load(lut_ptr + lo) * am
        w_hi = tl.load(lut_ptr + hi) * am
    w = tl.reshape(tl.join(w_lo, w_hi), [BN, BK])  # [BN, GT, GB, 2] -> K order
    offs_k = pid_k * BK + tl.arange(0, BK)
    tl.store(out_ptr + row[:, None] * K + offs_k[None, :],
             cast_out(w, out_ptr.dtype.element_ty, EMULATE_BF16),
             mask=n_ok[:, None] & (offs_k < K)[None, :])


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor) -> torch.Tensor:
    """Decode ``qw`` into ``out`` (float32/bf16/f16, contiguous [N, K])."""
    N, K = qw.shape
    data = qw.data.contiguous()
    scales = qw.scales.contiguous()
    zeros = qw.zeros.contiguous() if qw.zeros is not None else None
    dqs = qw.dq_scale.contiguous() if qw.dq_scale is not None else None
    dqo = qw.dq_offset.contiguous() if qw.dq_offset is not None else None
    fmt = FMT_IDS[qw.fmt]
    offset = qw.zero_point == "float"
    lut = codebook_lut(data.device, qw.fmt) if fmt >= FMT_NF4 else scales
    G = qw.n_groups
    C = dqs.shape[1] if dqs is not None else 1
    GROUP = F.effective_group(qw.group_size, K) if G > 1 else 1 << 30
    if fmt != FMT_INT8:
        BK = BK_DEQ4
        # bytes sharing one scale lookup: a group when it divides the tile, the whole tile
        # when the tile lies in one group, else every byte looks its scale up
        GB = GROUP // 2 if BK % GROUP == 0 else (BK // 2 if GROUP % BK == 0 else 1)
        grid = (triton.cdiv(N, BN_DEQ4), triton.cdiv(K, BK))
        _dequant4_kernel[grid](
            data, scales, zeros if zeros is not None else scales,
            dqs if dqs is not None else scales, dqo if dqo is not None else scales, lut, out,
            N, K, data.stride(0), G, C, 0.0, FMT=fmt, HAS_ZEROS=zeros is not None,
            DQ=dqs is not None, OFFSET=offset, GROUP=GROUP, GB=GB, BN=BN_DEQ4, BK=BK,
            EMULATE_BF16=emulate_bf16(out.dtype), num_warps=WARPS_DEQ, enable_fp_fusion=False)
        return out
    grid = (triton.cdiv(N, BN_DEQ), triton.cdiv(K, BK_DEQ))
    _dequant_kernel[grid](
        data, scales, zeros if zeros is not None else scales, dqs if dqs is not None else scales,
        dqo if dqo is not None else scales, lut, out, N, K, data.stride(0), G, C, 0.0,
        FMT=fmt, HAS_ZEROS=zeros is not None, DQ=dqs is not None, OFFSET=offset,
        GROUP=F.effective_group(qw.group_size, K) if G > 1 else 1 << 30, BN=BN_DEQ, BK=BK_DEQ,
        EMULATE_BF16=emulate_bf16(out.dtype),
        num_warps=WARPS_DEQ, enable_fp_fusion=False)
    return out


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] in ``dtype``; bit-exact against lowbit.reference.dequantize."""
    out = torch.empty(qw.shape, dtype=dtype, device=qw.device)
    if out.numel():
        dequantize_into(qw, out)
    return out


assert FMT_INT8 == 0 and FMT_INT4 == 1 and FMT_NF4 == 2 and FMT_FP4 == 3  # tested by value
