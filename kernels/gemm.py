"""Tensor-core GEMM for larger M: decode weight tiles into fp16/bf16 registers, then tl.dot.

y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), W read from the GPU layout (kernels/layout.py),
x in float16 or bfloat16, float32 accumulation, output in x's dtype.

A program owns a [BM, BN] output tile (grouped launch order: GROUP_M row-tiles of x share each
weight column-tile while it is in L2) and a K range of layout blocks. Each K step loads a
[BN, W] tile of words (W = 16 * CB: CB blocks) and then, per plane i (one of the P codes of
every word), decodes a [BN, W] slice of the weight with one LOP3 and one FFMA
(_common.plane_value) and issues one tl.dot of K extent W against the matching [BM, W] slice
of x (plane i of block b holds the 16 consecutive elements b*KB + 16i .. +15). Plane-sized
dots keep the decoded tile small: no [BN, BK] float32 intermediate, no spills.

Scales (constexpr SCALE_MODE, chosen per weight, step and EXACT by gemm_scale_mode):
* SCALE_ROW (int8 and int4 with one group per row): the tile holds the exact integers
  q - z, which fp16/bf16 represent exactly (|q - z| <= 255 needs 8 significant bits, bf16
  has 8); the row scale multiplies the float32 accumulator at the end.
* SCALE_BLOCK (int4, group % BK == 0): as above per K step, into a second accumulator:
  acc += dot(x, q - z) * s[group]. These two modes are as accurate as float32 math on x.
* SCALE_BLOCK_W (nf4 with group % BK == 0; int4 with EXACT=False): the tile holds
  (q - z) * s (codebook[q] * absmax) rounded once to x's dtype, i.e. exactly
  ``reference.dequantize(qw, x.dtype)``: one accumulator (large tiles), and an error of that
  rounding (unit roundoff 2**-8 bf16, 2**-11 f16 per weight), as dequantize + cuBLAS has.
* SCALE_PLANE (groups smaller than the step): as SCALE_BLOCK_W with per-plane groups.

SWAP (for small M) computes the transposed product y^T = W x^T so the weight tile is the MMA's
M side (>= 64 rows on Hopper) and M only has to fill the N side (>= 8).
DOT_F32 exists for the Triton interpreter only, whose bf16 tl.dot is wrong: the bf16-rounded
tiles are multiplied in float32 (same products, same sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (FMT_IDS, MAGIC_BITS, SCALE_BLOCK, SCALE_BLOCK_W, SCALE_PLANE, SCALE_ROW,
                      TWO23, cast_out, codebook_lut, codebook_values, decode_absmax, hi_shift,
                      interpreting, k_split, launch, launch_x_prep, plane_value, rne_bf16,
                      splitk_reduce, tl_dtype)
from .gemv import _use_pdl, gdc_launch_dependents, gdc_wait, idot_enabled
from .layout import GPUWeight, group_const


@triton.jit
def _mn_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's [BM] rows of x and [BN] weight rows, in grouped launch order (GROUP_M
    row-tiles of x per weight column-tile), and their in-bounds masks."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _store_tile(acc, offs_m, offs_n, m_ok, n_ok, pid_k, M, N, stride_om, bias_ptr, out_ptr,
                ws_ptr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
                EMULATE_BF16: tl.constexpr):
    """The program's float32 tile (SWAP: [BN, BM], else [BM, BN]) plus the bias into out, or
    without it into split pid_k of the split-K workspace."""
    if SWAP:
        out_off = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        ws_off = (pid_k * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
        omask = n_ok[:, None] & m_ok[None, :]
        bias_b = offs_n[:, None]
    else:
        out_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        ws_off = (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        omask = m_ok[:, None] & n_ok[None, :]
        bias_b = offs_n[None, :]
    if not USE_WS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bias_b, mask=bias_b < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_off, cast_out(acc, out_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=omask)
    else:
        tl.store(ws_ptr + ws_off, acc, mask=omask)


@triton.jit
def _mma_acc(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.constexpr_function
def _planes_per_group(group, kb):
    """Consecutive 16-element planes of a layout block that share a group: group / 16 when the
    group divides the block into whole planes (4-bit groups of 16 / 32 / 64), else 1."""
    return group // 16 if group % 16 == 0 and kb % group == 0 else 1


@triton.jit
def _gemm_kernel(x_ptr, codes_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, bias_ptr, out_ptr,
                 ws_ptr, M, N, K, KW, G, stride_xm, stride_om, steps_per_split, zero_rt, magic,
                 FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 ZERO_CONST: tl.constexpr, DQ: tl.constexpr, SCALE_MODE: tl.constexpr,
                 GROUP: tl.constexpr,  # group length along K (unused in SCALE_ROW mode)
                 HAS_BIAS: tl.constexpr,
                 USE_WS: tl.constexpr,  # split K: write float32 partials to ws_ptr
                 K_EXACT: tl.constexpr,  # every step is full and inside K: no K masks
                 BM: tl.constexpr,  # rows of x per program
                 BN: tl.constexpr,  # weight rows (output columns) per program
                 CB: tl.constexpr,  # layout blocks per K step (BK = CB * 16 * 32 / BITS)
                 GROUP_M: tl.constexpr,  # x row-tiles launched together per weight tile
                 SWAP: tl.constexpr,  # compute y^T = W x^T (small M)
                 FULL_TILE: tl.constexpr,  # one [BN, BK] tile and one dot per step, not per plane
                 DOT_DTYPE: tl.constexpr,  # tl.float16 / tl.bfloat16
                 DOT_F32: tl.constexpr,  # interpreter only (see module docstring)
                 LUT_GATHER: tl.constexpr,  # codebook formats: _common.codebook_values
                 STEPS_CONST: tl.constexpr,  # interpreter only: steps_per_split as a constexpr
                 ):
    P: tl.constexpr = 32 // BITS  # codes per word = planes per block
    KB: tl.constexpr = 16 * P  # elements per layout block
    W: tl.constexpr = CB * 16  # words per row per K step = the K extent of one plane's dot
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = _mn_tile(M, N, BM, BN, GROUP_M)
    offs_j = tl.arange(0, W)  # word j of the step: block j // 16, word j % 16 of it
    offs_cb = tl.arange(0, CB)
    nblk = KW // 16
    b_begin = pid_k * (steps_per_split * CB)
    b_end = tl.minimum(b_begin + steps_per_split * CB, nblk)
    k_end = tl.minimum(b_end * KB, K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = codes_ptr + offs_n.to(tl.int64)[:, None] * KW
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    if FMT >= 2 and LUT_GATHER:
        lut16 = tl.load(lut_ptr + tl.arange(0, 16))
    else:
        lut16 = 0.0
    if SCALE_MODE == 0:
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
        else:
            z_row = ZERO_CONST
    # A fixed trip count (a kernel argument): the last split's surplus steps are masked.
    # Under the interpreter it comes as a constexpr (a run-time bound fails there, numpy >= 2.4).
    for step in range(0, STEPS_CONST if STEPS_CONST > 0 else steps_per_split):
        b0 = b_begin + step * CB
        j_ok = (b0 + offs_j // 16) < b_end
        if K_EXACT:
            wmask = n_ok[:, None]
        else:
            wmask = n_ok[:, None] & j_ok[None, :]
        words = tl.load(w_rows + b0 * 16 + offs_j[None, :], mask=wmask, other=0)
        hi = words >> hi_shift(BITS)
        if SCALE_MODE == 1 or SCALE_MODE == 3:  # the whole step lies in one group
            gidx_s = (b0 * KB) // GROUP
            g_ok = n_ok & (gidx_s < G)
            if DQ:
                cg = gidx_s // 256 * N + offs_n
                s_g = decode_absmax(tl.load(s_ptr + gidx_s * N + offs_n, mask=g_ok, other=0),
                                    tl.load(dqs_ptr + cg, mask=g_ok, other=0.0),
                                    tl.load(dqo_ptr + cg, mask=g_ok, other=0.0), zero_rt)
            else:
                s_g = tl.load(s_ptr + gidx_s * N + offs_n, mask=g_ok, other=0.0)
            if HAS_ZEROS:
                z_s = tl.load(z_ptr + gidx_s * N + offs_n, mask=g_ok, other=0).to(tl.float32)[:, None]
            else:
                z_s = ZERO_CONST
            if SCALE_MODE == 1:
                if SWAP:
                    part = tl.zeros([BN, BM], dtype=tl.float32)
                else:
                    part = tl.zeros([BM, BN], dtype=tl.float32)
        if FULL_TILE:
            # one [BN, BK] tile in K order and one dot per step (larger M): codes
            # [BN, CB, P, 16] -> [BN, BK], decoded by the magic-number FADD (_common)
            BKF: tl.constexpr = CB * KB
            shifts = tl.arange(0, P) * BITS
            codes = tl.reshape((words.reshape([BN, CB, 1, 16]) >> shifts[None, None, :, None]) & MASK,
                               [BN, BKF])
            if FMT >= 2:  # codebook (nf4, fp4)
                v = codebook_values(lut_ptr, lut16, codes, BN * BKF, LUT_GATHER)
            elif SCALE_MODE == 2:
                v = (codes | magic).to(tl.float32, bitcast=True) - TWO23
            elif SCALE_MODE == 0:
                v = (codes | magic).to(tl.float32, bitcast=True) - (z_row + TWO23)
            else:
                v = (codes | magic).to(tl.float32, bitcast=True) - (z_s + TWO23)
            if SCALE_MODE == 2:  # group per (block, slot): [BN, CB, S] -> per element
                # S slots per block of KB / S elements each: the block's whole groups when the
                # group divides the block (nf4 blocks of 64: 2 loads per block, not 8), else
                # one per plane
                S: tl.constexpr = KB // (16 * _planes_per_group(GROUP, KB))
                blk = b0 + offs_cb
                gidx = (blk[:, None] * KB + tl.arange(0, S)[None, :] * (KB // S)) // GROUP
                gptr = gidx[None, :, :] * N + offs_n[:, None, None]
                gmask = n_ok[:, None, None] & ((blk < b_end)[:, None] & (gidx < G))[None, :, :]
                if DQ:
                    cidx = gidx[None, :, :] // 256 * N + offs_n[:, None, None]
                    s3 = decode_absmax(tl.load(s_ptr + gptr, mask=gmask, other=0),
                                       tl.load(dqs_ptr + cidx, mask=gmask, other=0.0),
                                       tl.load(dqo_ptr + cidx, mask=gmask, other=0.0), zero_rt)
                else:
                    s3 = tl.load(s_ptr + gptr, mask=gmask, other=0.0)
                if HAS_ZEROS:
                    z3 = tl.load(z_ptr + gptr, mask=gmask, other=0).to(tl.float32)
                    v = v - tl.reshape(tl.broadcast_to(z3[:, :, :, None], [BN, CB, S, KB // S]),
                                       [BN, BKF])
                elif FMT < 2:
                    v = v - ZERO_CONST
                wf = v * tl.reshape(tl.broadcast_to(s3[:, :, :, None], [BN, CB, S, KB // S]),
                                    [BN, BKF])
            elif SCALE_MODE == 3:
                wf = v * s_g[:, None]
            else:
                wf = v
            kk = b0 * KB + tl.arange(0, BKF)
            if K_EXACT:
                xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
            else:
                xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < k_end)[None, :],
                             other=0.0)
            if DOT_F32:
                w = rne_bf16(wf)
                xt = xt.to(tl.float32)
            else:
                w = wf.to(DOT_DTYPE)
                xt = xt.to(DOT_DTYPE)
            if SWAP:
                a = w
                b = tl.trans(xt)
            else:
                a = xt
                b = tl.trans(w)
            if SCALE_MODE == 1:
                part = _mma_acc(a, b, part, DOT_F32)
            else:
                acc = _mma_acc(a, b, acc, DOT_F32)
        for i in tl.static_range(0 if FULL_TILE else P):
            # plane i: 16 consecutive elements per block, k = (b0 + j // 16) * KB + 16 i + j % 16
            kk = (b0 + offs_j // 16) * KB + i * 16 + offs_j % 16
            if K_EXACT:
                xi = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
            else:
                xi = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (j_ok & (kk < K))[None, :],
                             other=0.0)
            if SCALE_MODE == 2:
                # one group per (block, plane): load [BN, CB] and broadcast over the 16 words;
                # loaded at the group's first plane only (when the group divides the block,
                # e.g. nf4 blocks of 64: 2 loads per block, not 8, and with double
                # quantization 6 not 24)
                if i % _planes_per_group(GROUP, KB) == 0:
                    blk = b0 + offs_cb
                    gidx = (blk * KB + i * 16) // GROUP  # [CB]
                    gptr = gidx[None, :] * N + offs_n[:, None]
                    gmask = n_ok[:, None] & ((blk < b_end) & (gidx < G))[None, :]
                    if DQ:
                        cidx = gidx[None, :] // 256 * N + offs_n[:, None]
                        s_i = decode_absmax(tl.load(s_ptr + gptr, mask=gmask, other=0),
                                            tl.load(dqs_ptr + cidx, mask=gmask, other=0.0),
                                            tl.load(dqo_ptr + cidx, mask=gmask, other=0.0),
                                            zero_rt)
                    else:
                        s_i = tl.load(s_ptr + gptr, mask=gmask, other=0.0)
                    s_i = tl.reshape(tl.broadcast_to(s_i[:, :, None], [BN, CB, 16]), [BN, W])
                    if HAS_ZEROS:
                        z_i = tl.load(z_ptr + gptr, mask=gmask, other=0).to(tl.float32)
                        z_i = tl.reshape(tl.broadcast_to(z_i[:, :, None], [BN, CB, 16]), [BN, W])
                if FMT >= 2:  # codebook (nf4, fp4)
                    v = codebook_values(lut_ptr, lut16, (words >> (BITS * i)) & MASK, BN * W,
                                        LUT_GATHER)
                elif HAS_ZEROS:
                    v = plane_value(words, hi, z_i, magic, i, BITS)
                else:
                    v = plane_value(words, hi, ZERO_CONST, magic, i, BITS)
                wf = v * s_i  # the decoded weight, as reference.dequantize computes it
            elif SCALE_MODE == 3:
                if FMT >= 2:  # codebook (nf4, fp4)
                    v = codebook_values(lut_ptr, lut16, (words >> (BITS * i)) & MASK, BN * W,
                                        LUT_GATHER)
                else:
                    v = plane_value(words, hi, z_s, magic, i, BITS)
                wf = v * s_g[:, None]  # the decoded weight, as reference.dequantize computes it
            elif SCALE_MODE == 1:
                wf = plane_value(words, hi, z_s, magic, i, BITS)  # the exact integer q - z
            else:
                wf = plane_value(words, hi, z_row, magic, i, BITS)  # the exact integer q - z
            if DOT_F32:  # interpreter: bf16-rounded values multiplied in float32
                w = rne_bf16(wf)
                xi = xi.to(tl.float32)
            else:
                w = wf.to(DOT_DTYPE)
                xi = xi.to(DOT_DTYPE)
            if SWAP:
                a = w
                b = tl.trans(xi)
            else:
                a = xi
                b = tl.trans(w)
            if SCALE_MODE == 1:
                part = _mma_acc(a, b, part, DOT_F32)
            else:
                acc = _mma_acc(a, b, acc, DOT_F32)
        if SCALE_MODE == 1:
            if SWAP:
                acc += part * s_g[:, None]
            else:
                acc += part * s_g[None, :]
    if SCALE_MODE == 0:
        if DQ:
            s_row = decode_absmax(tl.load(s_ptr + offs_n, mask=n_ok, other=0),
                                  tl.load(dqs_ptr + offs_n, mask=n_ok, other=0.0),
                                  tl.load(dqo_ptr + offs_n, mask=n_ok, other=0.0), zero_rt)
        else:
            s_row = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        if SWAP:
            acc = acc * s_row[:, None]
        else:
            acc = acc * s_row[None, :]
    _store_tile(acc, offs_m, offs_n, m_ok, n_ok, pid_k, M, N, stride_om, bias_ptr, out_ptr,
                ws_ptr, SWAP, HAS_BIAS, USE_WS, DOT_F32)


def gemm_scale_mode(gw: GPUWeight, BK: int, exact: bool = True) -> int:
    """SCALE_ROW / SCALE_BLOCK keep the exact integers in the tile; SCALE_BLOCK_W / SCALE_PLANE
    put the decoded (rounded) weight there (module docstring). ``exact=False`` trades the
    second accumulator of SCALE_BLOCK for one rounding per weight (large tiles)."""
    one_group_per_step = gw.n_groups == 1 or gw.group % BK == 0
    if FMT_IDS[gw.fmt] >= 2:  # nf4 / fp4 values are not exact in 16 bits: scale before rounding
        return SCALE_BLOCK_W if one_group_per_step else SCALE_PLANE
    if gw.n_groups == 1:
        return SCALE_ROW
    if gw.group % BK == 0:
        return SCALE_BLOCK if exact else SCALE_BLOCK_W
    return SCALE_PLANE


def gemm(x2d: torch.Tensor, gw: GPUWeight, bias, out: torch.Tensor, *, BM: int, BN: int, CB: int,
         SPLIT_K: int = 1, GROUP_M: int = 8, SWAP: bool = False, EXACT: bool = True,
         FULL_TILE: bool = False, REGA: bool = False, IMMA: bool = False, ASM: bool = True,
         num_warps: int = 4, num_stages: int = 3, dot_f32: bool = False, LUT_GATHER: bool = True,
         bind=None, **_ignored) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T (+ bias); x2d float16/bfloat16 with unit stride along K.
    ``bind``: as for gemv(), ``post`` the split-K reduction's (Launcher, args, grid) or None,
    ``pre`` None. ``REGA``: the register-operand kernel (gemm_rega) where it takes the weight
    (else this kernel with the other parameters). ``IMMA``: the integer tensor-core GEMM on
    15-bit-quantized x (kernels/imma.py) where it takes the weight and LOWBIT_GPU_EXACT is not
    set (else REGA or this kernel)."""
    if IMMA:
        from .imma import gemm_imma, imma_supported  # (imma.py builds on this module's helpers)
        if imma_supported(gw, x2d.dtype) and idot_enabled(x2d.device):
            return gemm_imma(x2d, gw, bias, out, BM=BM, BN=BN, CB=CB, SPLIT_K=SPLIT_K,
                             GROUP_M=GROUP_M, num_warps=num_warps, num_stages=num_stages,
                             bind=bind)
    KW = gw.words_per_row
    nblk = KW // 16
    CB, SPLIT_K, steps = k_split(nblk, CB, SPLIT_K)
    if REGA and rega_supported(gw, x2d.dtype, CB):  # int4 at small M (gemm_rega, below)
        return gemm_rega(x2d, gw, bias, out, BM=BM, BN=BN, CB=CB, SPLIT_K=SPLIT_K,
                         GROUP_M=GROUP_M, num_warps=num_warps, num_stages=num_stages,
                         dot_f32=dot_f32, ASM=ASM, bind=bind)
    M, K = x2d.shape
    N = gw.shape[0]
    BK = CB * gw.block
    mode = gemm_scale_mode(gw, BK, EXACT)
    lut = codebook_lut(x2d.device, gw.fmt) if FMT_IDS[gw.fmt] >= 2 else gw.scales
    dummy = gw.scales
    ws = torch.empty((SPLIT_K, M, N), dtype=torch.float32, device=x2d.device) if SPLIT_K > 1 else out
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), SPLIT_K)
    args = (x2d, gw.codes, gw.scales, gw.zeros if gw.zeros is not None else dummy,
            gw.dq_scale if gw.dq_scale is not None else dummy,
            gw.dq_offset if gw.dq_offset is not None else dummy, lut,
            bias if bias is not None else dummy, out, ws, M, N, K, KW, gw.n_groups,
            x2d.stride(0), out.stride(0), steps, 0.0, MAGIC_BITS)
    consts = dict(
        FMT=FMT_IDS[gw.fmt], BITS=gw.bits, HAS_ZEROS=gw.zeros is not None,
        ZERO_CONST=128 if gw.fmt == "int8" else 8, DQ=gw.double_quant, SCALE_MODE=mode,
        GROUP=group_const(gw), HAS_BIAS=bias is not None and SPLIT_K == 1, USE_WS=SPLIT_K > 1,
        K_EXACT=K % gw.block == 0 and nblk % (steps * CB) == 0, BM=BM, BN=BN, CB=CB,
        GROUP_M=GROUP_M, SWAP=bool(SWAP), FULL_TILE=bool(FULL_TILE),
        DOT_DTYPE=tl_dtype(x2d.dtype), DOT_F32=bool(dot_f32),
        LUT_GATHER=bool(LUT_GATHER) and FMT_IDS[gw.fmt] >= 2,
        STEPS_CONST=steps if interpreting() else 0)
    launcher = launch(_gemm_kernel, grid, args, consts, num_warps, num_stages)
    post: list = []
    if SPLIT_K > 1:
        splitk_reduce(ws, bias, out, bind=post if bind is not None else None)
    if bind is not None and launcher is not None and (SPLIT_K == 1 or post):
        bind.append((launcher, args, grid, SPLIT_K, post[0] if post else None, None))
    return out


# ---- the register-operand GEMM for int4 at small M (REGA) -------------------------------------
# The GEMM above decodes each weight tile into a [BN, W] bf16 tensor in a blocked layout, and
# Triton then stores it to shared memory and reads it back in the wgmma operand layout before
# every MMA (one round trip and two barriers per plane). Triton hoists that conversion onto the
# load instead when the decode is a chain of elementwise ops from a load and constants only,
# with no op that narrows the element type (its OptimizeDotOperands pass, "MMAv3 hoist layout
# conversion"): the packed codes are then read from shared memory straight into the operand
# layout and decoded in registers, and the MMA takes its A operand (the weight, SWAP side) from
# registers. This kernel is written to fit that rule:
# * the codes are loaded as 16-bit halves of the layout's words (``codes.view(int16)``): half
#   p = 2w + h of a block's 32 holds planes 4h .. 4h + 3 of word w, i.e. its nibble i is the
#   code of element 64 h + 16 i + w of the block;
# * the code of nibble i is (half >> 4i) & 15, OR-ed into the bits of 128.0 (bf16) or 1024.0
#   (fp16) and reinterpreted: 128 + c (1024 + c), minus the constant: c, exactly. Four dots per
#   step (nibbles 0-3), each of K extent 32 per block;
# * the zero point (and the code offset 8 of symmetric int4) comes off per group as
#   z * sum(x) and the scale multiplies the group's partial sum, so neither enters the chain.
# x must then be read in the halves' order, which scatters element pairs 64 apart: a small
# kernel first (_xprep_kernel) writes x permuted per 128-element block (column p of dot i at
# 32 i + p, so every dot reads 32 contiguous elements, pipelined by cp.async like the codes) and
# the blocks' sums of x, into one int32 buffer (``xprep_numel``).


@triton.constexpr_function
def _dot_magic(is_f16):
    return 0x6400 if is_f16 else 0x4300


@triton.constexpr_function
def _dot_magic_f(is_f16):
    return 1024.0 if is_f16 else 128.0


@triton.constexpr_function
def _decode_asm(i, is_f16):
    """PTX for two codes of nibble i of two 16-bit halves (one 32-bit register) to two
    fp16/bf16 values c: shift, (t & 0x000F000F) | magic (one LOP3), minus the magic pair."""
    magic = f"0x{_dot_magic(is_f16):04X}{_dot_magic(is_f16):04X}"
    sub = "sub.rn.f16x2" if is_f16 else "sub.rn.bf16x2"
    shift = f"shr.b32 t, $1, {4 * i}; " if i else "mov.b32 t, $1; "
    return ("{ .reg .b32 t, c; " + shift + f"lop3.b32 t, t, 0x000F000F, {magic}, 0xEA; "
            f"mov.b32 c, {magic}; {sub} $0, t, c; }}")


def xprep_numel(M: int, nblk: int) -> int:
    """int32 elements of the REGA kernel's x buffer: the permuted x [M, nblk * 128] in x's
    16-bit dtype, then the float32 block sums [M, nblk]."""
    return M * nblk * 64 + M * nblk


@triton.jit
def _xprep_kernel(x_ptr, xq_ptr, M, K, NBLK, stride_xm, PDL: tl.constexpr):
    """One 128-element block of one row of x: the permuted copy and the block's sum (above)."""
    if PDL:
        gdc_launch_dependents()
    m = tl.program_id(0)
    b = tl.program_id(1)
    e = tl.arange(0, 128)
    p = e % 32
    k = b * 128 + 64 * (p % 2) + 16 * (e // 32) + p // 2  # source of position e
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k, mask=k < K, other=0.0)
    xp_ptr = xq_ptr.to(tl.pointer_type(x_ptr.dtype.element_ty))
    row = m.to(tl.int64) * NBLK + b
    tl.store(xp_ptr + row * 128 + e, x)
    xs_ptr = xq_ptr.to(tl.pointer_type(tl.float32)) + tl.cast(M, tl.int64) * NBLK * 64
    tl.store(xs_ptr + row, tl.sum(x.to(tl.float32), axis=0))


@triton.jit
def _gemm_rega_kernel(xq_ptr, c16_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, bias_ptr, out_ptr,
                      ws_ptr, M, N, KW, G, stride_om, steps_per_split,
                      HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr,
                      SCALE_MODE: tl.constexpr,  # SCALE_ROW or SCALE_BLOCK (a step in one group)
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
                      K_EXACT: tl.constexpr,  # every step is full: no block masks
                      BM: tl.constexpr, BN: tl.constexpr, CB: tl.constexpr,
                      GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      DOT_F32: tl.constexpr,  # interpreter: float32 products (same values)
                      STEPS_CONST: tl.constexpr, PDL: tl.constexpr,
                      ASM: tl.constexpr):  # decode two codes per instruction triple (PTX)
    """y^T[BN, BM] tiles of int4 weights times x prepared by _xprep_kernel (see above);
    dqs/dqo/lut are unused (the argument order of the other matmul kernels)."""
    H: tl.constexpr = CB * 32  # 16-bit halves per row per step
    if PDL:
        gdc_wait()
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = _mn_tile(M, N, BM, BN, GROUP_M)
    offs_p = tl.arange(0, H)
    nblk = KW // 16
    b_begin = pid_k * (steps_per_split * CB)
    b_end = tl.minimum(b_begin + steps_per_split * CB, nblk)
    xp_ptr = xq_ptr.to(tl.pointer_type(DOT_DTYPE))
    xs_ptr = xq_ptr.to(tl.pointer_type(tl.float32)) + tl.cast(M, tl.int64) * nblk * 64
    x_rows = xp_ptr + offs_m.to(tl.int64)[:, None] * (nblk * 128)
    xs_rows = xs_ptr + offs_m.to(tl.int64) * nblk
    c_rows = c16_ptr + offs_n.to(tl.int64)[:, None] * (2 * KW)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    xs_tot = tl.zeros([BM], dtype=tl.float32)
    MAGIC: tl.constexpr = _dot_magic(DOT_DTYPE == tl.float16)
    MAGIC_F: tl.constexpr = _dot_magic_f(DOT_DTYPE == tl.float16)
    for step in range(0, STEPS_CONST if STEPS_CONST > 0 else steps_per_split):
        b0 = b_begin + step * CB
        if K_EXACT:
            cmask = n_ok[:, None]
            xmask = m_ok[:, None]
        else:
            p_ok = (b0 + offs_p // 32) < b_end
            cmask = n_ok[:, None] & p_ok[None, :]
            xmask = m_ok[:, None] & p_ok[None, :]
        h16 = tl.load(c_rows + b0 * 32 + offs_p[None, :], mask=cmask, other=0)
        part = tl.zeros([BN, BM], dtype=tl.float32)
        for i in tl.static_range(4):
            xi = tl.load(x_rows + (b0 + offs_p // 32)[None, :] * 128 + i * 32 + (offs_p % 32)[None, :],
                         mask=xmask, other=0.0)
            if DOT_F32 or not ASM:
                if i == 0:
                    v = h16 & 0xF
                else:
                    v = (h16 >> (4 * i)) & 0xF
            if DOT_F32:
                part = tl.dot(v.to(tl.float32), tl.trans(xi.to(tl.float32)), part,
                              input_precision="ieee")
            elif ASM:  # the same values, two per 32-bit register and three instructions
                if DOT_DTYPE == tl.float16:
                    w = tl.inline_asm_elementwise(_decode_asm(i, True), "=r,r", [h16],
                                                  dtype=tl.float16, is_pure=True, pack=2)
                else:
                    w = tl.inline_asm_elementwise(_decode_asm(i, False), "=r,r", [h16],
                                                  dtype=tl.bfloat16, is_pure=True, pack=2)
                part = tl.dot(w, tl.trans(xi), part)
            else:
                w = (v | MAGIC).to(DOT_DTYPE, bitcast=True) - MAGIC_F
                part = tl.dot(w, tl.trans(xi), part)
        xs = tl.zeros([BM], dtype=tl.float32)
        for cb in tl.static_range(CB):
            xs += tl.load(xs_rows + b0 + cb, mask=m_ok & (b0 + cb < b_end), other=0.0)
        if SCALE_MODE == 1:
            gidx = (b0 * 128) // GROUP
            g_ok = n_ok & (gidx < G)
            s_g = tl.load(s_ptr + gidx * N + offs_n, mask=g_ok, other=0.0)
            if HAS_ZEROS:
                z_g = tl.load(z_ptr + gidx * N + offs_n, mask=g_ok, other=0).to(tl.float32)
            else:
                z_g = tl.full([BN], ZERO_CONST, tl.float32)
            acc += (part - z_g[:, None] * xs[None, :]) * s_g[:, None]
        else:
            acc += part
            xs_tot += xs
    if SCALE_MODE == 0:
        s_row = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        else:
            z_row = tl.full([BN], ZERO_CONST, tl.float32)
        acc = (acc - z_row[:, None] * xs_tot[None, :]) * s_row[:, None]
    _store_tile(acc, offs_m, offs_n, m_ok, n_ok, pid_k, M, N, stride_om, bias_ptr, out_ptr,
                ws_ptr, True, HAS_BIAS, USE_WS, DOT_F32)


def rega_supported(gw: GPUWeight, dtype: torch.dtype, CB: int = 1) -> bool:
    """Whether the register-operand GEMM takes this weight: int4 (symmetric or integer zero
    points), 16-bit activations, one group per row or groups of a multiple of 128 * CB."""
    return (gw.fmt == "int4" and dtype in (torch.float16, torch.bfloat16)
            and (gw.n_groups == 1 or gw.group % (128 * CB) == 0))


def gemm_rega(x2d: torch.Tensor, gw: GPUWeight, bias, out: torch.Tensor, *, BM: int, BN: int,
              CB: int, SPLIT_K: int = 1, GROUP_M: int = 8, num_warps: int = 4,
              num_stages: int = 3, dot_f32: bool = False, ASM: bool = True, bind=None,
              **_ignored) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T (+ bias) by _xprep_kernel then _gemm_rega_kernel (int4,
    see rega_supported). ``bind``: as for gemm(), with ``pre`` the x preparation's launch."""
    M, K = x2d.shape
    N = gw.shape[0]
    KW = gw.words_per_row
    nblk = KW // 16
    CB, SPLIT_K, steps = k_split(nblk, CB, SPLIT_K)
    if not rega_supported(gw, x2d.dtype, CB):
        raise ValueError(f"the register-operand GEMM does not take {gw.fmt} group {gw.group} "
                         f"with CB {CB} and {x2d.dtype} activations")
    dev = x2d.device
    pdl = _use_pdl(dev)
    xq, pre = launch_x_prep(_xprep_kernel, xprep_numel(M, nblk), x2d, nblk, dict(PDL=pdl), 4)
    dummy = gw.scales
    ws = torch.empty((SPLIT_K, M, N), dtype=torch.float32, device=dev) if SPLIT_K > 1 else out
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), SPLIT_K)
    args = (xq, gw.codes.view(torch.int16), gw.scales,
            gw.zeros if gw.zeros is not None else dummy, dummy, dummy, dummy,
            bias if bias is not None else dummy, out, ws, M, N, KW, gw.n_groups, out.stride(0),
            steps)
    consts = dict(HAS_ZEROS=gw.zeros is not None, ZERO_CONST=8,
                  SCALE_MODE=SCALE_ROW if gw.n_groups == 1 else SCALE_BLOCK,
                  GROUP=group_const(gw), HAS_BIAS=bias is not None and SPLIT_K == 1,
                  USE_WS=SPLIT_K > 1, K_EXACT=nblk % (steps * CB) == 0, BM=BM, BN=BN, CB=CB,
                  GROUP_M=GROUP_M, DOT_DTYPE=tl_dtype(x2d.dtype), DOT_F32=bool(dot_f32),
                  STEPS_CONST=steps if interpreting() else 0, PDL=pdl,
                  ASM=bool(ASM) and not interpreting())
    return launch_after_prep(_gemm_rega_kernel, grid, args, consts, num_warps, num_stages,
                             pre, pdl, ws, bias, out, bind)


def launch_after_prep(kernel, grid, args, consts: dict, num_warps: int, num_stages: int, pre,
                      pdl: bool, ws, bias, out, bind) -> torch.Tensor:
    """Launch a GEMM that reads a buffer its x preparation wrote (as its programmatic dependent
    when ``pdl``; ``pre``: that launch's (launcher, args, grid), None when not bindable), then
    the split-K reduction when its grid splits K (``ws`` is the workspace), and record the
    launches in ``bind`` (as gemm())."""
    if pdl:
        consts["launch_pdl"] = True  # a launch option (programmatic dependent launch)
    launcher = launch(kernel, grid, args, consts, num_warps, num_stages)
    split_k = grid[1]
    post: list = []
    if split_k > 1:
        splitk_reduce(ws, bias, out, bind=post if bind is not None else None)
    if bind is not None and launcher is not None and pre is not None and (split_k == 1 or post):
        bind.append((launcher, args, grid, split_k, post[0] if post else None, pre))
    return out
