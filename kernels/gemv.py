"""GEMV / split-K GEMV for small M on CUDA cores, float32 throughout.

y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), W read from the GPU layout (kernels/layout.py).

Grid: (M, cdiv(N, BN), SPLIT_K); m varies fastest so the programs that share a weight tile run
together and the second..M-th reads of it hit L2. A program owns BN rows and a K range of
``BLOCKS_PER_SPLIT`` layout blocks; each step loads a [CB, BN, 16] tile of words (CB blocks of
16 words for each of BN rows, 16-byte loads; blocks first, so that a thread holds one block of
several rows and needs that block's x only) and, for each of the P codes per word ("planes"),
decodes one [CB, BN, 16] slice with a shift, a mask, an OR and one FADD (code - zero, see
_common.MAGIC_BITS) and multiplies it with one contiguous [CB, 16] slice of x. Scales are
applied after the sum over the part of K they cover (a block, a plane, or the whole row), not
per element. The integer-dot GEMV below (IDOT) shares the grid, the split and the epilogue.

SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N] that _common.splitk_reduce sums in a fixed
order (deterministic), adds the bias and casts; SPLIT_K == 1 writes the output directly.
Everything is float32: x is upcast on load, so float32 activations are exact products too.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
try:  # programmatic dependent launch (Hopper and newer; Triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False

from ._common import (FMT_IDS, MAGIC_BITS, SCALE_BLOCK, SCALE_PLANE, SCALE_ROW, cast_out,
                      codebook_lut, codebook_values, decode_absmax, device_table, emulate_bf16,
                      hi_shift, interpreting, k_split, launch, launch_x_prep, plane_value,
                      pow2_block_quantize, split_counters, splitk_reduce)
from .layout import GPUWeight, group_const
from lowbit.formats import CODE_SCALE


@triton.jit
def _tile(N, KW, steps_per_split, BN: tl.constexpr, CB: tl.constexpr):
    """A GEMV program's place in the grid (M, N tiles, K splits) and the ranges it covers: its
    BN rows (and which exist), block and word offsets within a step, the row's block count and
    the [b_begin, b_end) blocks of its K split."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nblk = KW // 16
    b_begin = pid_k * (steps_per_split * CB)
    b_end = tl.minimum(b_begin + steps_per_split * CB, nblk)
    return (m, pid_n, pid_k, offs_n, offs_n < N, tl.arange(0, CB), tl.arange(0, 16), nblk,
            b_begin, b_end)


@triton.jit
def _gemv_kernel(x_ptr, codes_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, bias_ptr, out_ptr,
                 ws_ptr, cnt_ptr, M, N, K, KW, G, stride_xm, stride_om, steps_per_split, split_k,
                 zero_rt, magic,
                 FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 ZERO_CONST: tl.constexpr, DQ: tl.constexpr, SCALE_MODE: tl.constexpr,
                 GROUP: tl.constexpr,  # group length along K (layout.group_const)
                 HAS_BIAS: tl.constexpr,
                 USE_WS: tl.constexpr,  # split K: write float32 partials to ws_ptr
                 FIXUP: tl.constexpr,  # split K: the last program of a tile sums the partials
                 K_EXACT: tl.constexpr,  # every step is full and inside K: no K masks
                 PREFETCH: tl.constexpr,  # load the next step's words before using this one's
                 LUT_GATHER: tl.constexpr,  # codebook formats: tl.gather from registers, not a load
                 BN: tl.constexpr,  # weight rows per program
                 CB: tl.constexpr,  # layout blocks (16 words each) per K step
                 EMULATE_BF16: tl.constexpr,  # interpreter only (_common.rne_bf16)
                 STEPS_CONST: tl.constexpr,  # interpreter only: steps_per_split as a constexpr
                 SPLIT_CONST: tl.constexpr,  # interpreter only: split_k as a constexpr
                 ):
    P: tl.constexpr = 32 // BITS  # codes per word = planes per block
    KB: tl.constexpr = 16 * P  # elements per layout block
    MASK: tl.constexpr = (1 << BITS) - 1
    m, pid_n, pid_k, offs_n, n_ok, offs_b, offs_w, nblk, b_begin, b_end = _tile(
        N, KW, steps_per_split, BN, CB)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w_rows = codes_ptr + offs_n.to(tl.int64)[None, :, None] * KW
    acc = tl.zeros([CB, BN, 16], dtype=tl.float32)
    if FMT >= 2 and LUT_GATHER:
        lut16 = tl.load(lut_ptr + tl.arange(0, 16))
    else:
        lut16 = 0.0
    if SCALE_MODE == 0:  # one group per row: zero point per row, scale applied at the end
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :, None]
        else:
            z_row = ZERO_CONST
    # A fixed trip count (a kernel argument): the last split's surplus steps are masked.
    # Under the interpreter it comes as a constexpr (a run-time bound fails there, numpy >= 2.4).
    w_ptrs = w_rows + (b_begin + offs_b)[:, None, None] * 16 + offs_w[None, None, :]
    if PREFETCH:  # registers hold the next step's words while this one is computed
        if K_EXACT:
            nxt = tl.load(w_ptrs, mask=n_ok[None, :, None], other=0)
        else:
            nxt = tl.load(w_ptrs, mask=n_ok[None, :, None] & ((b_begin + offs_b) < b_end)[:, None, None],
                          other=0)
    for step in range(0, STEPS_CONST if STEPS_CONST > 0 else steps_per_split):
        b0 = b_begin + step * CB
        blk = b0 + offs_b
        b_ok = blk < b_end
        if PREFETCH:
            words = nxt
            pmask = n_ok[None, :, None] & ((blk + CB) < b_end)[:, None, None]
            nxt = tl.load(w_ptrs + (step + 1) * CB * 16, mask=pmask, other=0)
        else:
            if K_EXACT:
                wmask = n_ok[None, :, None]
            else:
                wmask = n_ok[None, :, None] & b_ok[:, None, None]
            words = tl.load(w_ptrs + step * CB * 16, mask=wmask, other=0)
        hi = words >> hi_shift(BITS)
        if SCALE_MODE == 1:  # each block lies in one group
            gidx = (blk * KB) // GROUP
            gptr = gidx[:, None] * N + offs_n[None, :]
            gmask = n_ok[None, :] & b_ok[:, None]
            if DQ:
                cidx = gidx[:, None] // 256 * N + offs_n[None, :]
                s_blk = decode_absmax(tl.load(s_ptr + gptr, mask=gmask, other=0),
                                      tl.load(dqs_ptr + cidx, mask=gmask, other=0.0),
                                      tl.load(dqo_ptr + cidx, mask=gmask, other=0.0), zero_rt)
            else:
                s_blk = tl.load(s_ptr + gptr, mask=gmask, other=0.0)
            if HAS_ZEROS:
                z_blk = tl.load(z_ptr + gptr, mask=gmask, other=0).to(tl.float32)[:, :, None]
            else:
                z_blk = ZERO_CONST
            part = tl.zeros([CB, BN, 16], dtype=tl.float32)
        for i in tl.static_range(P):
            kk = blk[:, None] * KB + i * 16 + offs_w[None, :]  # [CB, 16] element indices
            if K_EXACT:
                xi = tl.load(x_row + kk).to(tl.float32)[:, None, :]
            else:
                xi = tl.load(x_row + kk, mask=(kk < K) & b_ok[:, None], other=0.0).to(tl.float32)[:, None, :]
            if SCALE_MODE == 2:  # the group changes from plane to plane
                gidx = (blk * KB + i * 16) // GROUP
                gptr = gidx[:, None] * N + offs_n[None, :]
                gmask = n_ok[None, :] & b_ok[:, None] & (gidx < G)[:, None]
                if DQ:
                    cidx = gidx[:, None] // 256 * N + offs_n[None, :]
                    s_i = decode_absmax(tl.load(s_ptr + gptr, mask=gmask, other=0),
                                        tl.load(dqs_ptr + cidx, mask=gmask, other=0.0),
                                        tl.load(dqo_ptr + cidx, mask=gmask, other=0.0), zero_rt)
                else:
                    s_i = tl.load(s_ptr + gptr, mask=gmask, other=0.0)
                if FMT >= 2:  # codebook (nf4, fp4)
                    v = codebook_values(lut_ptr, lut16, (words >> (BITS * i)) & MASK, BN * CB * 16,
                                        LUT_GATHER)
                else:
                    if HAS_ZEROS:
                        z_i = tl.load(z_ptr + gptr, mask=gmask, other=0).to(tl.float32)
                        v = plane_value(words, hi, z_i[:, :, None], magic, i, BITS)
                    else:
                        v = plane_value(words, hi, ZERO_CONST, magic, i, BITS)
                acc += (v * xi) * s_i[:, :, None]
            else:
                if FMT >= 2:  # codebook (nf4, fp4)
                    v = codebook_values(lut_ptr, lut16, (words >> (BITS * i)) & MASK, BN * CB * 16,
                                        LUT_GATHER)
                elif SCALE_MODE == 1:
                    v = plane_value(words, hi, z_blk, magic, i, BITS)
                else:
                    v = plane_value(words, hi, z_row, magic, i, BITS)
                if SCALE_MODE == 1:
                    part += v * xi
                else:
                    acc += v * xi
        if SCALE_MODE == 1:
            acc += part * s_blk[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=0)
    if SCALE_MODE == 0:
        if DQ:
            s_row = decode_absmax(tl.load(s_ptr + offs_n, mask=n_ok, other=0),
                                  tl.load(dqs_ptr + offs_n, mask=n_ok, other=0.0),
                                  tl.load(dqo_ptr + offs_n, mask=n_ok, other=0.0), zero_rt)
        else:
            s_row = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        y = y * s_row
    _finish(y, m, pid_n, pid_k, offs_n, n_ok, M, N, stride_om, split_k, bias_ptr, out_ptr,
            ws_ptr, cnt_ptr, BN, HAS_BIAS, USE_WS, FIXUP, EMULATE_BF16, SPLIT_CONST)


@triton.jit
def _finish(y, m, pid_n, pid_k, offs_n, n_ok, M, N, stride_om, split_k, bias_ptr, out_ptr, ws_ptr,
            cnt_ptr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
            FIXUP: tl.constexpr, EMULATE_BF16: tl.constexpr, SPLIT_CONST: tl.constexpr):
    """Store a program's float32 row sums ``y`` [BN]: with the bias into the output, or (split
    K) as a partial into the workspace, the last program of the tile summing them (FIXUP)."""
    if not USE_WS:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n,
                 cast_out(y, out_ptr.dtype.element_ty, EMULATE_BF16), mask=n_ok)
    else:
        tl.store(ws_ptr + (pid_k * M + m).to(tl.int64) * N + offs_n, y, mask=n_ok)
        if FIXUP:
            # The program that arrives last at this (m, n-tile) adds the split_k partials in a
            # fixed order (deterministic), stores the output and re-arms the counter.
            # acq_rel: the other programs' partials are visible once their increments are.
            tile = m * tl.num_programs(1) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == split_k - 1:
                tot = tl.zeros([BN], dtype=tl.float32)
                for s in range(0, SPLIT_CONST if SPLIT_CONST > 0 else split_k):
                    tot += tl.load(ws_ptr + (s * M + m).to(tl.int64) * N + offs_n, mask=n_ok,
                                   other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n,
                         cast_out(tot, out_ptr.dtype.element_ty, EMULATE_BF16), mask=n_ok)
                tl.atomic_xchg(cnt_ptr + tile, 0)


# ---- the integer-dot GEMV (IDOT) ---------------------------------------------------------------
# For 16-bit activations and integer codes (int4, int8) whose groups hold whole layout blocks,
# and the codebook formats nf4 / fp4 (blocks of 64 or whole layout blocks) with their codebooks
# as 14-bit integers (codebook_idot_codes: the CPU fast path's codes, lowbit.formats.CODE_SCALE;
# nf4 at most 0.5 / 8128 of absmax from its float codebook, fp4 exact), looked up per nibble by
# PRMT from two 16-byte tables (_quad_asm_nf4).
# x is first quantized to 16-bit integers per layout block (_xquant_kernel): a block of KB
# elements (128 for 4-bit codes, 64 for int8) gets a power-of-two scale 2**e with e = E - 14,
# E the exponent of the block's max |x|, so q = round(x / 2**e) (exact: a power-of-two scaling,
# then one rounding to the nearest integer, ties to even) lies in [-32767, 32767] and
# |x - q 2**e| <= 2**-15 max|x|: 64x finer than the bfloat16 rounding of the block's largest
# element, 8x finer than float16's. Each q is split into a signed high byte h = q >> 8 and an
# unsigned low byte l = q & 255 (q = 256 h + l), and the bytes of the elements one weight word
# multiplies are packed as the four-byte operands of dp4a. The GEMV then does, per 32-bit word
# of codes, two byte masks and four dp4a (int4: 8 codes) or two dp4a (int8: 4 codes), the
# integer dot sum_i code_i * q_i, exactly, instead of decoding each code to float: about 1.3
# instead of 3-5 instructions per weight. Per block: y += s_w * 2**e * (sum - zero * sum_i q_i).
# Under the Triton interpreter (no inline PTX) the same integers come from shifts and products.
# float32 activations keep the float32 GEMV (exact products); LOWBIT_GPU_EXACT=1 turns IDOT off.


def idot_ops(bits: int) -> int:
    """dp4a operands per word position and layout block: 4-bit codes: (high, low bytes) x
    (even, odd planes); int8: high and low bytes."""
    return 4 if bits == 4 else 2


def xq_numel(M: int, nblk: int, bits: int) -> int:
    """int32 elements of the quantized-x buffer: [M, nblk, ops, 16] operands, then the float32
    scales [M, nblk] (as int32 bits), then the integer sums [M, nblk, halves] (4-bit codes:
    the sums of the block's two halves, elements 0-63 and 64-127)."""
    return M * nblk * (idot_ops(bits) * 16 + 1 + (2 if bits == 4 else 1))


@triton.jit
def _xquant_kernel(x_ptr, xq_ptr, M, K, NBLK, stride_xm, P: tl.constexpr, GROUPED: tl.constexpr,
                   PDL: tl.constexpr):
    """One layout block of one row of x: quantize (see above) and pack the dp4a operands.
    GROUPED (4-bit codes, groups of 64): operands of planes 0-3 and 4-7 (the block's two
    groups) instead of the even and odd planes. PDL: let the GEMV that reads the result launch
    now (programmatic dependent launch: its programs start loading weights and wait for this
    grid before they read xq)."""
    NOPS: tl.constexpr = 4 if P == 8 else 2
    NSUM: tl.constexpr = 2 if P == 8 else 1
    if PDL:
        gdc_launch_dependents()
    m = tl.program_id(0)
    b = tl.program_id(1)
    ii = tl.arange(0, P)[:, None]
    jj = tl.arange(0, 16)[None, :]
    k = b * (16 * P) + ii * 16 + jj  # [P, 16]: plane i, word j
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    r, scale, live = pow2_block_quantize(x, 14)
    q = tl.where(live, tl.minimum(tl.maximum(r, -32767.0), 32767.0), 0.0).to(tl.int32)
    hi = (q >> 8) & 255
    lo = q & 255
    row = m.to(tl.int64) * NBLK + b
    dst = xq_ptr + row * (NOPS * 16)
    tail = xq_ptr + tl.cast(M, tl.int64) * NBLK * (NOPS * 16)
    sums = tail + tl.cast(M, tl.int64) * NBLK + row * NSUM
    if P == 8:
        if GROUPED:  # byte t of operand g: plane 4g + t
            sh = (tl.arange(0, 4) * 8)[None, :, None]
            ph = tl.sum(tl.reshape(hi, [2, 4, 16]) << sh, axis=1)  # disjoint bytes: sum = OR
            pl = tl.sum(tl.reshape(lo, [2, 4, 16]) << sh, axis=1)
        else:  # byte t of operand p: plane 2t + p, the nibble the byte mask leaves
            sh = (tl.arange(0, 4) * 8)[:, None, None]
            ph = tl.sum(tl.reshape(hi, [4, 2, 16]) << sh, axis=0)
            pl = tl.sum(tl.reshape(lo, [4, 2, 16]) << sh, axis=0)
        pp = tl.arange(0, 2)[:, None] * 16 + tl.arange(0, 16)[None, :]
        tl.store(dst + pp, ph)
        tl.store(dst + 32 + pp, pl)
        # the sums of the two halves (planes 0-3, 4-7)
        tl.store(sums + tl.arange(0, 2), tl.sum(tl.reshape(q, [2, 64]), axis=1))
    else:  # int8: byte t = plane t
        sh = (tl.arange(0, 4) * 8)[:, None]
        tl.store(dst + tl.arange(0, 16), tl.sum(hi << sh, axis=0))
        tl.store(dst + 16 + tl.arange(0, 16), tl.sum(lo << sh, axis=0))
        tl.store(sums, tl.sum(tl.sum(q, axis=1), axis=0))
    tl.store(tail + row, scale.to(tl.int32, bitcast=True))


@triton.jit
def _sbyte(v, t: tl.constexpr):
    return (v << (24 - 8 * t)) >> 24


@triton.jit
def _ubyte(v, t: tl.constexpr):
    return (v >> (8 * t)) & 255


@triton.jit
def _idot(words, xa, xb, xc, xd, BITS: tl.constexpr, EMU: tl.constexpr):
    """Per word: sum over its codes of code * q (int32, exact). 4-bit: xa / xb the high bytes
    of the even / odd planes' q, xc / xd their low bytes; int8: xa high, xb low bytes."""
    if BITS == 4:
        if EMU:
            ev = words & 0x0F0F0F0F
            od = (words >> 4) & 0x0F0F0F0F
            h = tl.zeros_like(words)
            lo = tl.zeros_like(words)
            for t in tl.static_range(4):
                we = _ubyte(ev, t)
                wo = _ubyte(od, t)
                h += we * _sbyte(xa, t) + wo * _sbyte(xb, t)
                lo += we * _ubyte(xc, t) + wo * _ubyte(xd, t)
            return h * 256 + lo
        else:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 ev, od, h, l;
                and.b32 ev, $1, 0x0F0F0F0F;
                shr.u32 od, $1, 4;
                and.b32 od, od, 0x0F0F0F0F;
                mov.b32 h, 0;
                mov.b32 l, 0;
                dp4a.u32.s32 h, ev, $2, h;
                dp4a.u32.s32 h, od, $3, h;
                dp4a.u32.u32 l, ev, $4, l;
                dp4a.u32.u32 l, od, $5, l;
                mad.lo.s32 $0, h, 256, l;
                }""",
                "=r,r,r,r,r,r", [words, xa, xb, xc, xd], dtype=tl.int32, is_pure=True, pack=1)
    else:
        if EMU:
            h = tl.zeros_like(words)
            lo = tl.zeros_like(words)
            for t in tl.static_range(4):
                w = _ubyte(words, t)
                h += w * _sbyte(xa, t)
                lo += w * _ubyte(xb, t)
            return h * 256 + lo
        else:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 h, l;
                mov.b32 h, 0;
                mov.b32 l, 0;
                dp4a.u32.s32 h, $1, $2, h;
                dp4a.u32.u32 l, $1, $3, l;
                mad.lo.s32 $0, h, 256, l;
                }""",
                "=r,r,r,r", [words, xa, xb], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _idot_scale(s_ptr, dqs_ptr, dqo_ptr, gptr, cptr, mask, CODE_SCALE: tl.constexpr,
                DQ: tl.constexpr):
    """The weight scale of groups ``gptr`` as the integer dots need it: int4 / int8 the stored
    scale; nf4 / fp4 absmax / CODE_SCALE (their codes are codebook_idot_codes), absmax decoded
    from its uint8 code when double-quantized (``cptr``: the chunk's dq_scale / dq_offset)."""
    if DQ:
        s = decode_absmax(tl.load(s_ptr + gptr, mask=mask, other=0),
                          tl.load(dqs_ptr + cptr, mask=mask, other=0.0),
                          tl.load(dqo_ptr + cptr, mask=mask, other=0.0), 0.0)
    else:
        s = tl.load(s_ptr + gptr, mask=mask, other=0.0)
    if CODE_SCALE > 0:
        s = s * (1.0 / CODE_SCALE)
    return s


@triton.jit
def _idot_step_loads(ops_m, sx_m, sum_m, s_ptr, z_ptr, dqs_ptr, dqo_ptr, offs_n, n_ok, blk, b_ok,
                     offs_w, N, G, BITS: tl.constexpr, SCALE_MODE: tl.constexpr,
                     HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr, GROUP: tl.constexpr,
                     CODE_SCALE: tl.constexpr, DQ: tl.constexpr):
    """The small loads of one K step of _gemv_idot_kernel (blocks ``blk``, valid where
    ``b_ok``): the x operands [CB, 1, 16], x's block scales and sums [CB], and the weight
    scales and zero-points [CB, BN] (SCALE_BLOCK; SCALE_PLANE: groups of 64, the first half's
    here and the second half's with its x sums in the last three values; else placeholders)."""
    NOPS: tl.constexpr = 4 if BITS == 4 else 2
    KB: tl.constexpr = 16 * (32 // BITS)
    # loaded as [CB, 16] and expanded: Triton then moves these small tensors into the words'
    # layout (a [CB, 1, 16] load would make it move the words instead)
    op = ops_m + blk[:, None] * (NOPS * 16) + offs_w[None, :]  # [CB, 16]
    omask = b_ok[:, None]
    xa = tl.load(op, mask=omask, other=0)[:, None, :]
    xb = tl.load(op + 16, mask=omask, other=0)[:, None, :]
    if BITS == 4:
        xc = tl.load(op + 32, mask=omask, other=0)[:, None, :]
        xd = tl.load(op + 48, mask=omask, other=0)[:, None, :]
        qs = tl.load(sum_m + 2 * blk, mask=b_ok, other=0).to(tl.float32)
        qs2 = tl.load(sum_m + 2 * blk + 1, mask=b_ok, other=0).to(tl.float32)
        if SCALE_MODE != 2:
            qs = qs + qs2
    else:
        xc = xa
        xd = xb
        qs = tl.load(sum_m + blk, mask=b_ok, other=0).to(tl.float32)
        qs2 = qs
    sx = tl.load(sx_m + blk, mask=b_ok, other=0).to(tl.float32, bitcast=True)
    sw2 = tl.full([1, 1], 0.0, tl.float32)
    zz2 = tl.full([1, 1], 0.0, tl.float32)
    if SCALE_MODE == 0:
        sw = sx[:, None]
        zz = tl.full([1, 1], 0.0, tl.float32)
    else:
        if SCALE_MODE == 1:
            g = (blk * KB) // GROUP
        else:  # groups of 64: the block's first half
            g = 2 * blk
        gptr = g[:, None] * N + offs_n[None, :]  # [CB, BN]: scales are stored [G, N]
        gmask = b_ok[:, None] & n_ok[None, :]
        sw = _idot_scale(s_ptr, dqs_ptr, dqo_ptr, gptr, g[:, None] // 256 * N + offs_n[None, :],
                         gmask, CODE_SCALE, DQ)
        if HAS_ZEROS:
            zz = tl.load(z_ptr + gptr, mask=gmask, other=0).to(tl.float32)
        else:
            zz = tl.full([1, 1], ZERO_CONST, tl.float32)
        if SCALE_MODE == 2:  # the second half (past K in a ragged last block: zeros)
            gmask2 = gmask & ((g + 1) < G)[:, None]
            sw2 = _idot_scale(s_ptr, dqs_ptr, dqo_ptr, gptr + N,
                              (g[:, None] + 1) // 256 * N + offs_n[None, :], gmask2, CODE_SCALE, DQ)
            if HAS_ZEROS:
                zz2 = tl.load(z_ptr + gptr + N, mask=gmask2, other=0).to(tl.float32)
            else:
                zz2 = tl.full([1, 1], ZERO_CONST, tl.float32)
    return xa, xb, xc, xd, sx, qs, sw, zz, qs2, sw2, zz2


def _quad_asm(bits: int, halves: bool = False) -> str:
    """PTX of _idot_quad: the integer dots of 4 words with their x operands, chained through
    one pair of dp4a accumulators (high and low bytes of q) per output. Inputs (after the
    outputs): the 4 words, then each operand's 4 values (4-bit: xa, xb, xc, xd; int8: xa, xb)."""
    nout = 2 if halves else 1
    w = lambda i: f"${nout + i}"
    x = lambda j, i: f"${nout + 4 + 4 * j + i}"
    lines = [".reg .b32 ev, od, a, b, h, l, h2, l2;", "mov.b32 h, 0;", "mov.b32 l, 0;",
             "mov.b32 h2, 0;", "mov.b32 l2, 0;"]
    for i in range(4):
        if bits == 8:  # byte t of a word: plane t; xa high, xb low bytes of q
            lines += [f"dp4a.u32.s32 h, {w(i)}, {x(0, i)}, h;", f"dp4a.u32.u32 l, {w(i)}, {x(1, i)}, l;"]
            continue
        lines += [f"and.b32 ev, {w(i)}, 0x0F0F0F0F;", f"shr.u32 od, {w(i)}, 4;",
                  "and.b32 od, od, 0x0F0F0F0F;"]
        if halves:  # planes 0-3 and 4-7 regathered (see _idot_halves)
            lines += ["prmt.b32 a, ev, od, 0x5140;", "prmt.b32 b, ev, od, 0x7362;",
                      f"dp4a.u32.s32 h, a, {x(0, i)}, h;", f"dp4a.u32.u32 l, a, {x(2, i)}, l;",
                      f"dp4a.u32.s32 h2, b, {x(1, i)}, h2;", f"dp4a.u32.u32 l2, b, {x(3, i)}, l2;"]
        else:
            lines += [f"dp4a.u32.s32 h, ev, {x(0, i)}, h;", f"dp4a.u32.s32 h, od, {x(1, i)}, h;",
                      f"dp4a.u32.u32 l, ev, {x(2, i)}, l;", f"dp4a.u32.u32 l, od, {x(3, i)}, l;"]
    lines.append("mad.lo.s32 $0, h, 256, l;")
    if halves:
        lines.append("mad.lo.s32 $1, h2, 256, l2;")
    return "{\n" + "\n".join(lines) + "\n}"


_QUAD4_ASM = tl.constexpr(_quad_asm(4))
_QUAD8_ASM = tl.constexpr(_quad_asm(8))
_QUADH_ASM = tl.constexpr(_quad_asm(4, halves=True))


def codebook_idot_codes(fmt: str):
    """nf4 / fp4 as the integer-dot GEMV multiplies them: code i -> w'_i = c_i + 8192 with c_i
    = round(S cb_i) (lowbit.formats.codebook_int_codes, S = CODE_SCALE: 8128 / 8064), in
    [64, 16320], as two 7-bit bytes h_i = w'_i >> 7 and l_i = w'_i & 127 (w' = 128 h + l). The
    8192 comes off as a zero point (8192 * sum q); the scale is absmax / S. nf4's 14-bit code
    is at most 0.5 / 8128 of absmax from its float codebook, fp4's is exact (the CPU fast
    path's codes)."""
    from lowbit.formats import codebook_int_codes
    return [c + 8192 for c in codebook_int_codes(fmt)]


def _quad_asm_nf4() -> str:
    """PTX of _idot_quad_nf4: 4 words of nf4 / fp4 codes (planes 0-3 / 4-7 = the block's two groups of
    64) against the GROUPED x operands. Each nibble is looked up in two 16-byte tables (h, l of
    codebook_idot_codes) by PRMT: its selector reads the low 16 bits as four nibbles, so a word's
    planes 0-3 select directly and planes 4-7 after a shift; codes 0-7 come from the first 8
    table bytes, codes 8-15 from the last 8 with the selector's bit 3 flipped (PRMT's sign mode
    then returns 0x00 for the other half, as every table byte is < 128), and an OR merges them.
    Then four dp4a per half (h and l bytes of the code against the high and low bytes of q).
    Outputs: per half, A = sum h q and B = sum l q (int32; the value is 128 A + B)."""
    word = lambda i: f"${4 + i}"
    x = lambda j, i: f"${8 + 4 * j + i}"  # xa, xb, xc, xd: high a, high b, low a, low b
    lines = [".reg .b32 s0, s1, x0, x1, t, u, h, l;",
             ".reg .b32 hha, hla, lha, lla, hhb, hlb, lhb, llb;"]
    # the tables come in as operands $24-$31, loaded once per program (as immediates inside the
    # asm the SASS was the same: ptxas copies one table word into a register per PRMT pair)
    tables = {f"H{j}": f"${24 + j}" for j in range(4)}
    tables.update({f"L{j}": f"${28 + j}" for j in range(4)})
    lines += [f"mov.b32 {r}, 0;" for r in ("hha", "hla", "lha", "lla", "hhb", "hlb", "lhb", "llb")]
    for i in range(4):
        lines += [f"mov.b32 s0, {word(i)};", f"shr.u32 s1, {word(i)}, 16;",
                  "xor.b32 x0, s0, 0x8888;", "xor.b32 x1, s1, 0x8888;"]
        for half, sel, selx, xh, xl in (("a", "s0", "x0", x(0, i), x(2, i)),
                                        ("b", "s1", "x1", x(1, i), x(3, i))):
            T = tables
            lines += [f"prmt.b32 t, {T['H0']}, {T['H1']}, {sel};",
                      f"prmt.b32 u, {T['H2']}, {T['H3']}, {selx};", "or.b32 h, t, u;",
                      f"prmt.b32 t, {T['L0']}, {T['L1']}, {sel};",
                      f"prmt.b32 u, {T['L2']}, {T['L3']}, {selx};", "or.b32 l, t, u;",
                      f"dp4a.u32.s32 hh{half}, h, {xh}, hh{half};", f"dp4a.u32.u32 hl{half}, h, {xl}, hl{half};",
                      f"dp4a.u32.s32 lh{half}, l, {xh}, lh{half};", f"dp4a.u32.u32 ll{half}, l, {xl}, ll{half};"]
    lines += ["mad.lo.s32 $0, hha, 256, hla;", "mad.lo.s32 $1, lha, 256, lla;",
              "mad.lo.s32 $2, hhb, 256, hlb;", "mad.lo.s32 $3, lhb, 256, llb;"]
    return "{\n" + "\n".join(lines) + "\n}"


def _nf4_tables(fmt: str):
    """The 8 table words of _quad_asm_nf4 for ``fmt``: h of codes 0-3, 4-7, 8-11, 12-15, then
    l's."""
    w = codebook_idot_codes(fmt)
    pack = lambda vals: [sum(v << (8 * t) for t, v in enumerate(vals[4 * j:4 * j + 4])) for j in range(4)]
    return pack([v >> 7 for v in w]) + pack([v & 127 for v in w])


_QUADN_ASM = tl.constexpr(_quad_asm_nf4())


@triton.jit
def _quads(t, D0: tl.constexpr, D1: tl.constexpr):
    """[D0, D1, 16] -> four [D0, D1, 4]: elements 4i, 4i + 2, 4i + 1, 4i + 3 of each run of 4
    (split along a thread's own registers: the 4 words of one 16-byte load)."""
    a, b = tl.split(tl.reshape(t, [D0, D1, 4, 2, 2]))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, a1, b0, b1


@triton.jit
def _idot_quad(words, xa, xb, xc, xd, CB: tl.constexpr, BN: tl.constexpr, BITS: tl.constexpr,
               HALVES: tl.constexpr, EMU: tl.constexpr):
    """_idot (or, HALVES, _idot_halves) summed over each run of 4 neighbouring words:
    [CB, BN, 16] words and [CB, 1, 16] operands -> [CB, BN, 4] int32 (and the second half's).
    The runs are split out explicitly, so one asm statement chains the dp4a of 4 words through
    one accumulator pair: per 4 words one final multiply-add instead of four, no adds, and a
    4x smaller float accumulator. Exact: |sum| < 2**24 for 4-bit codes, < 2**28 for int8."""
    w0, w1, w2, w3 = _quads(words, CB, BN)
    a0, a1, a2, a3 = _quads(xa, CB, 1)
    b0, b1, b2, b3 = _quads(xb, CB, 1)
    if EMU:  # the interpreter: the same pairing of words and operands, dots by _idot
        c0, c1, c2, c3 = _quads(xc, CB, 1)
        e0, e1, e2, e3 = _quads(xd, CB, 1)
        if HALVES:
            p0, q0 = _idot_halves(w0, a0, b0, c0, e0, EMU)
            p1, q1 = _idot_halves(w1, a1, b1, c1, e1, EMU)
            p2, q2 = _idot_halves(w2, a2, b2, c2, e2, EMU)
            p3, q3 = _idot_halves(w3, a3, b3, c3, e3, EMU)
            return p0 + p1 + p2 + p3, q0 + q1 + q2 + q3
        else:
            d = _idot(w0, a0, b0, c0, e0, BITS, EMU) + _idot(w1, a1, b1, c1, e1, BITS, EMU)
            d += _idot(w2, a2, b2, c2, e2, BITS, EMU) + _idot(w3, a3, b3, c3, e3, BITS, EMU)
            return d, d
    elif BITS == 8:
        d = tl.inline_asm_elementwise(
            _QUAD8_ASM, "=r" + ",r" * 12, [w0, w1, w2, w3, a0, a1, a2, a3, b0, b1, b2, b3],
            dtype=tl.int32, is_pure=True, pack=1)
        return d, d
    else:
        c0, c1, c2, c3 = _quads(xc, CB, 1)
        e0, e1, e2, e3 = _quads(xd, CB, 1)
        args = [w0, w1, w2, w3, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3]
        if HALVES:
            return tl.inline_asm_elementwise(_QUADH_ASM, "=r,=r" + ",r" * 20, args,
                                             dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            d = tl.inline_asm_elementwise(_QUAD4_ASM, "=r" + ",r" * 20, args, dtype=tl.int32,
                                          is_pure=True, pack=1)
            return d, d


@triton.jit
def _idot_quad_nf4(words, xa, xb, xc, xd, lut_ptr, CB: tl.constexpr, BN: tl.constexpr,
                   EMU: tl.constexpr):
    """nf4 / fp4 codes (see _quad_asm_nf4) summed over each run of 4 words: [CB, BN, 16] words and
    [CB, 1, 16] GROUPED operands -> (A, B) of the first group of 64 and (A, B) of the second,
    [CB, BN, 4] int32 each (the dot is 128 A + B). |A|, |B| < 2**27. ``lut_ptr``: codebook_idot_lut
    (its codes for the interpreter's emulation, its table words as the asm's operands)."""
    w0, w1, w2, w3 = _quads(words, CB, BN)
    a0, a1, a2, a3 = _quads(xa, CB, 1)
    b0, b1, b2, b3 = _quads(xb, CB, 1)
    c0, c1, c2, c3 = _quads(xc, CB, 1)
    e0, e1, e2, e3 = _quads(xd, CB, 1)
    if EMU:
        r0 = _nf4_word_emu(w0, a0, b0, c0, e0, lut_ptr)
        r1 = _nf4_word_emu(w1, a1, b1, c1, e1, lut_ptr)
        r2 = _nf4_word_emu(w2, a2, b2, c2, e2, lut_ptr)
        r3 = _nf4_word_emu(w3, a3, b3, c3, e3, lut_ptr)
        return (r0[0] + r1[0] + r2[0] + r3[0], r0[1] + r1[1] + r2[1] + r3[1],
                r0[2] + r1[2] + r2[2] + r3[2], r0[3] + r1[3] + r2[3] + r3[3])
    args = [w0, w1, w2, w3, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3,
            tl.load(lut_ptr + 16), tl.load(lut_ptr + 17), tl.load(lut_ptr + 18),
            tl.load(lut_ptr + 19), tl.load(lut_ptr + 20), tl.load(lut_ptr + 21),
            tl.load(lut_ptr + 22), tl.load(lut_ptr + 23)]
    return tl.inline_asm_elementwise(_QUADN_ASM, "=r,=r,=r,=r" + ",r" * 28, args,
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def _idot_whole(words, xa, xb, xc, xd, lut_ptr, CB: tl.constexpr, BN: tl.constexpr,
                BITS: tl.constexpr, CODEBOOK: tl.constexpr, EMU: tl.constexpr):
    """The dot of each run of 4 words over all its planes, float32 [CB, BN, 4] (one group
    covers the whole layout block)."""
    if CODEBOOK:
        aa, ba, ab, bb = _idot_quad_nf4(words, xa, xb, xc, xd, lut_ptr, CB, BN, EMU)
        return (aa + ab).to(tl.float32) * 128.0 + (ba + bb).to(tl.float32)
    else:
        d, _ = _idot_quad(words, xa, xb, xc, xd, CB, BN, BITS, False, EMU)
        return d.to(tl.float32)


@triton.jit
def _nf4_word_emu(words, xa, xb, xc, xd, lut_ptr):
    """The interpreter's statement of one word of _quad_asm_nf4: (A, B) of planes 0-3 and of
    planes 4-7."""
    aa = tl.zeros_like(words)
    ba = tl.zeros_like(words)
    ab = tl.zeros_like(words)
    bb = tl.zeros_like(words)
    for t in tl.static_range(4):
        wa = tl.load(lut_ptr + ((words >> (4 * t)) & 15))
        wb = tl.load(lut_ptr + ((words >> (16 + 4 * t)) & 15))
        qa = _sbyte(xa, t) * 256 + _ubyte(xc, t)
        qb = _sbyte(xb, t) * 256 + _ubyte(xd, t)
        aa += (wa >> 7) * qa
        ba += (wa & 127) * qa
        ab += (wb >> 7) * qb
        bb += (wb & 127) * qb
    return aa, ba, ab, bb


@triton.jit
def _idot_halves(words, xa, xb, xc, xd, EMU: tl.constexpr):
    """4-bit codes, GROUPED operands: per word the dots of planes 0-3 and of planes 4-7 (the
    two groups of 64 of its block), int32 each. xa / xb: high bytes of the two halves' q, xc /
    xd: their low bytes. The bytes of each half are gathered with one PRMT."""
    if EMU:
        ha = tl.zeros_like(words)
        la = tl.zeros_like(words)
        hb = tl.zeros_like(words)
        lb = tl.zeros_like(words)
        for t in tl.static_range(4):
            wa = (words >> (4 * t)) & 15
            wb = (words >> (16 + 4 * t)) & 15
            ha += wa * _sbyte(xa, t)
            la += wa * _ubyte(xc, t)
            hb += wb * _sbyte(xb, t)
            lb += wb * _ubyte(xd, t)
        return ha * 256 + la, hb * 256 + lb
    else:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 ev, od, a, b, h, l;
            and.b32 ev, $2, 0x0F0F0F0F;
            shr.u32 od, $2, 4;
            and.b32 od, od, 0x0F0F0F0F;
            prmt.b32 a, ev, od, 0x5140;
            prmt.b32 b, ev, od, 0x7362;
            mov.b32 h, 0;
            mov.b32 l, 0;
            dp4a.u32.s32 h, a, $3, h;
            dp4a.u32.u32 l, a, $5, l;
            mad.lo.s32 $0, h, 256, l;
            mov.b32 h, 0;
            mov.b32 l, 0;
            dp4a.u32.s32 h, b, $4, h;
            dp4a.u32.u32 l, b, $6, l;
            mad.lo.s32 $1, h, 256, l;
            }""",
            "=r,=r,r,r,r,r,r", [words, xa, xb, xc, xd], dtype=(tl.int32, tl.int32),
            is_pure=True, pack=1)


@triton.jit
def _gemv_idot_kernel(xq_ptr, codes_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, bias_ptr,
                      out_ptr, ws_ptr, cnt_ptr, M, N, KW, G, stride_om, steps_per_split,
                      split_k,
                      BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr,
                      SCALE_MODE: tl.constexpr,  # SCALE_ROW, SCALE_BLOCK, SCALE_PLANE (groups of 64)
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr,
                      FIXUP: tl.constexpr, K_EXACT: tl.constexpr,
                      BN: tl.constexpr, CB: tl.constexpr, EMU: tl.constexpr,
                      CODE_SCALE: tl.constexpr,  # nf4 / fp4: codebook_idot_codes' scale, else 0
                      DQ: tl.constexpr,  # nf4 / fp4 double quantization
                      PDL: tl.constexpr,  # launched as a programmatic dependent of _xquant_kernel
                      EMULATE_BF16: tl.constexpr, STEPS_CONST: tl.constexpr,
                      SPLIT_CONST: tl.constexpr):
    """The GEMV of _gemv_kernel (same grid, split K and epilogue) on x quantized by
    _xquant_kernel (xq_ptr): integer dots per word, one float scale per block (see above).
    dqs_ptr / dqo_ptr: nf4 / fp4 double quantization; lut_ptr: codebook_idot_lut (same argument
    order as _gemv_kernel; unused for integer codes). nf4 / fp4 use GROUPED x operands."""
    CODEBOOK: tl.constexpr = CODE_SCALE > 0
    NOPS: tl.constexpr = 4 if BITS == 4 else 2
    m, pid_n, pid_k, offs_n, n_ok, offs_b, offs_w, nblk, b_begin, b_end = _tile(
        N, KW, steps_per_split, BN, CB)
    ops_m = xq_ptr + m.to(tl.int64) * nblk * (NOPS * 16)
    tail = xq_ptr + tl.cast(M, tl.int64) * nblk * (NOPS * 16)
    sx_m = tail + m.to(tl.int64) * nblk
    sum_m = tail + tl.cast(M, tl.int64) * nblk + m.to(tl.int64) * nblk * (2 if BITS == 4 else 1)
    # Tiles are [CB, BN, 16] (blocks, rows, words), not [BN, CB, 16]: Triton then lays the
    # words out so that a thread holds one block's 4 word positions for several rows, and the
    # x operands it needs are 4 per operand instead of 4 per block (registers: 241 -> 168 at
    # BN 32, CB 4, 2 warps).
    w_rows = codes_ptr + offs_n.to(tl.int64)[None, :, None] * KW
    acc = tl.zeros([CB, BN, 4], dtype=tl.float32)
    if SCALE_MODE != 0:
        zacc = tl.zeros([CB, BN], dtype=tl.float32)
    else:
        zacc = tl.zeros([CB], dtype=tl.float32)
    w_ptrs = w_rows + (b_begin + offs_b)[:, None, None] * 16 + offs_w[None, None, :]
    # Everything a step reads is loaded one step ahead (PREFETCH; registers): the weight words
    # and the small per-block loads (x operands, scales, zeros), so that no step waits on a
    # global load issued in the same step.
    blk = b_begin + offs_b
    b_ok = blk < b_end
    if K_EXACT:
        words = tl.load(w_ptrs, mask=n_ok[None, :, None], other=0)
    else:
        words = tl.load(w_ptrs, mask=b_ok[:, None, None] & n_ok[None, :, None], other=0)
    if PDL:  # the weights above do not depend on the x quantization; what follows does
        gdc_wait()
    xa, xb, xc, xd, sx, qs, sw, zz, qs2, sw2, zz2 = _idot_step_loads(
        ops_m, sx_m, sum_m, s_ptr, z_ptr, dqs_ptr, dqo_ptr, offs_n, n_ok, blk, b_ok, offs_w, N, G,
        BITS, SCALE_MODE, HAS_ZEROS, ZERO_CONST, GROUP, CODE_SCALE, DQ)
    for step in range(0, STEPS_CONST if STEPS_CONST > 0 else steps_per_split):
        nxt_blk = blk + CB
        nb_ok = nxt_blk < b_end
        nwords = tl.load(w_ptrs + (step + 1) * CB * 16,
                         mask=nb_ok[:, None, None] & n_ok[None, :, None], other=0)
        nxa, nxb, nxc, nxd, nsx, nqs, nsw, nzz, nqs2, nsw2, nzz2 = _idot_step_loads(
            ops_m, sx_m, sum_m, s_ptr, z_ptr, dqs_ptr, dqo_ptr, offs_n, n_ok, nxt_blk, nb_ok,
            offs_w, N, G, BITS, SCALE_MODE, HAS_ZEROS, ZERO_CONST, GROUP, CODE_SCALE, DQ)
        if SCALE_MODE == 2:  # groups of 64: each block holds two
            if CODEBOOK:
                aa, ba, ab, bb = _idot_quad_nf4(words, xa, xb, xc, xd, lut_ptr, CB, BN, EMU)
                da = aa.to(tl.float32) * 128.0 + ba.to(tl.float32)
                db = ab.to(tl.float32) * 128.0 + bb.to(tl.float32)
            else:
                da, db = _idot_quad(words, xa, xb, xc, xd, CB, BN, BITS, True, EMU)
            sc = sw * sx[:, None]
            sc2 = sw2 * sx[:, None]
            acc += da.to(tl.float32) * sc[:, :, None]  # (nf4 / fp4: float already)
            acc += db.to(tl.float32) * sc2[:, :, None]
            zacc += sc * (zz * qs[:, None]) + sc2 * (zz2 * qs2[:, None])
        elif SCALE_MODE == 1:  # each block lies in one group
            d = _idot_whole(words, xa, xb, xc, xd, lut_ptr, CB, BN, BITS, CODEBOOK, EMU)
            sc = sw * sx[:, None]  # [CB, BN]
            acc += d * sc[:, :, None]
            zacc += sc * (zz * qs[:, None])
        else:  # one group per row: the row's scale and zero after the sum
            d = _idot_whole(words, xa, xb, xc, xd, lut_ptr, CB, BN, BITS, CODEBOOK, EMU)
            acc += d * sx[:, None, None]
            zacc += sx * qs
        blk = nxt_blk
        words, xa, xb, xc, xd, sx, qs, sw, zz = nwords, nxa, nxb, nxc, nxd, nsx, nqs, nsw, nzz
        qs2, sw2, zz2 = nqs2, nsw2, nzz2
    if SCALE_MODE != 0:
        y = tl.sum(tl.sum(acc, axis=2), axis=0) - tl.sum(zacc, axis=0)
    else:
        s_row = _idot_scale(s_ptr, dqs_ptr, dqo_ptr, offs_n, offs_n, n_ok, CODE_SCALE, DQ)
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        else:
            z_row = ZERO_CONST
        y = (tl.sum(tl.sum(acc, axis=2), axis=0) - z_row * tl.sum(zacc, axis=0)) * s_row
    _finish(y, m, pid_n, pid_k, offs_n, n_ok, M, N, stride_om, split_k, bias_ptr, out_ptr,
            ws_ptr, cnt_ptr, BN, HAS_BIAS, USE_WS, FIXUP, EMULATE_BF16, SPLIT_CONST)


@functools.lru_cache(maxsize=None)
def _idot_lut_values(fmt: str):
    """codebook_idot_lut's values: codebook_idot_codes(fmt), then _nf4_tables(fmt) as int32."""
    words = [v - (1 << 32) if v >= 1 << 31 else v for v in _nf4_tables(fmt)]
    return tuple(codebook_idot_codes(fmt) + words)


def codebook_idot_lut(device: torch.device, fmt: str) -> torch.Tensor:
    """int32 on ``device`` (cached): codebook_idot_codes(fmt) (16, for the interpreter's
    emulation), then _nf4_tables(fmt) (8 words, which the kernel loads once per program and
    passes to the asm as operands)."""
    return device_table(fmt + "-idot", device, _idot_lut_values(fmt), torch.int32)


def idot_supported(gw: GPUWeight, dtype: torch.dtype) -> bool:
    """Whether the integer-dot GEMV takes this weight and activation dtype."""
    if (gw.fmt not in ("int4", "int8") and gw.fmt not in CODE_SCALE) or \
            dtype not in (torch.float16, torch.bfloat16):
        return False
    mode = scale_mode(gw, gw.block)
    if gw.fmt in CODE_SCALE:  # groups of 64 (the layout block's two halves) or whole blocks
        return mode in (SCALE_ROW, SCALE_BLOCK) or (mode == SCALE_PLANE and gw.group == 64)
    return mode in (SCALE_ROW, SCALE_BLOCK) or (mode == SCALE_PLANE and gw.fmt == "int4"
                                                and gw.group == 64)


_PDL_CAP: dict = {}  # device -> compute capability >= 9


def _use_pdl(dev) -> bool:
    """Programmatic dependent launch of the integer-dot GEMV after its x quantization: compiled
    kernels on Hopper or newer (the instructions are no-ops without it, but older GPUs lack
    them); LOWBIT_GPU_PDL=0 turns it off."""
    if not _HAS_GDC or interpreting() or dev.type != "cuda":
        return False
    if os.environ.get("LOWBIT_GPU_PDL", "1") in ("0", ""):
        return False
    key = str(dev)
    if key not in _PDL_CAP:
        _PDL_CAP[key] = torch.cuda.get_device_capability(dev)[0] >= 9
    return _PDL_CAP[key]


def idot_enabled(dev: Optional[torch.device] = None) -> bool:
    """LOWBIT_GPU_EXACT is not set, and the device is an NVIDIA GPU (the kernel's inline PTX)
    or the Triton interpreter (which runs its integer emulation)."""
    if os.environ.get("LOWBIT_GPU_EXACT", "0") not in ("", "0"):
        return False
    return dev is None or dev.type != "cuda" or torch.version.hip is None


def scale_mode(gw: GPUWeight, step_elems: int) -> int:
    """How the kernels apply scales for K steps of ``step_elems`` elements (see _common)."""
    if gw.n_groups == 1:
        return SCALE_ROW
    if gw.group % step_elems == 0:
        return SCALE_BLOCK
    return SCALE_PLANE


def zero_const(gw: GPUWeight) -> int:
    return 128 if gw.fmt == "int8" else (8 if gw.fmt == "int4" else 0)


MAX_PLANS = 64  # launch plans kept per weight (one per call shape and parameter set)


def gemv(x2d: torch.Tensor, gw: GPUWeight, bias, out: torch.Tensor, *, BN: int, CB: int,
         SPLIT_K: int = 1, num_warps: int = 4, num_stages: int = 1, PREFETCH: bool = True,
         FIXUP: bool = True, LUT_GATHER: bool = True, IDOT: bool = False,
         bind: Optional[list] = None, **_ignored) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T (+ bias) for x2d with unit stride along K. ``IDOT``: the
    integer-dot kernel on 16-bit-quantized x (see above) where it applies (idot_supported) and
    LOWBIT_GPU_EXACT is not set; else (and by default) the float32 kernel. ``bind``: a list
    that receives (_common.Launcher, args, grid, split_k, post, pre) of a launch that can be
    repeated directly (lowbit.kernels binds repeated calls to it; ``post`` is always None here;
    ``pre``: None, or the x-quantization launch (Launcher, args, grid) that runs first,
    writing the buffer the main launch reads in place of x)."""
    M, K = x2d.shape
    N = gw.shape[0]
    dev = x2d.device
    idot = bool(IDOT) and idot_supported(gw, x2d.dtype) and idot_enabled(dev)
    key = ("gemv", M, K, dev, out.dtype, bias is None, BN, CB, SPLIT_K, num_warps, num_stages,
           PREFETCH, FIXUP, LUT_GATHER, idot)
    plan = gw.plans.get(key)
    if plan is None:
        if len(gw.plans) >= MAX_PLANS:
            gw.plans.clear()
        plan = gw.plans[key] = _gemv_plan(gw, M, K, dev, out.dtype, bias is not None, BN, CB,
                                          SPLIT_K, PREFETCH, LUT_GATHER, idot)
    split_k, grid, steps, lut, consts, xq_consts = plan
    dummy = gw.scales
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=dev) if split_k > 1 else out
    cnt = split_counters(dev, M * grid[1]) if (split_k > 1 and FIXUP) else None
    pre = None
    if idot:
        nblk = gw.words_per_row // 16
        xq, pre = launch_x_prep(_xquant_kernel, xq_numel(M, nblk, gw.bits), x2d, nblk,
                                xq_consts, 1)
        args = (xq, gw.codes, gw.scales, gw.zeros if gw.zeros is not None else dummy,
                gw.dq_scale if gw.dq_scale is not None else dummy,
                gw.dq_offset if gw.dq_offset is not None else dummy,
                codebook_idot_lut(dev, gw.fmt) if gw.fmt in CODE_SCALE else dummy,
                bias if bias is not None else dummy, out, ws,
                cnt if cnt is not None else dummy, M, N, gw.words_per_row, gw.n_groups,
                out.stride(0), steps, split_k)
        kernel = _gemv_idot_kernel
    else:
        args = (x2d, gw.codes, gw.scales, gw.zeros if gw.zeros is not None else dummy,
                gw.dq_scale if gw.dq_scale is not None else dummy,
                gw.dq_offset if gw.dq_offset is not None else dummy, lut,
                bias if bias is not None else dummy, out, ws, cnt if cnt is not None else dummy,
                M, N, K, gw.words_per_row, gw.n_groups, x2d.stride(0), out.stride(0), steps,
                split_k, 0.0, MAGIC_BITS)
        kernel = _gemv_kernel
    launcher = launch(kernel, grid, args, consts[cnt is not None], num_warps, num_stages)
    if split_k > 1 and cnt is None:
        splitk_reduce(ws, bias, out)
    elif bind is not None and launcher is not None and (not idot or pre is not None):
        bind.append((launcher, args, grid, split_k, None, pre))
    return out


def _gemv_plan(gw: GPUWeight, M: int, K: int, dev, out_dtype, has_bias: bool, BN: int, CB: int,
               SPLIT_K: int, PREFETCH: bool, LUT_GATHER: bool, idot: bool = False):
    """(split_k, grid, steps per split, codebook table, constexprs by 'split-K counters
    available', the x quantization's constexprs or None) for one call shape: everything
    gemv() launches with but the tensors."""
    N = gw.shape[0]
    nblk = gw.words_per_row // 16
    CB, SPLIT_K, steps = k_split(nblk, CB, SPLIT_K)
    fmt = FMT_IDS[gw.fmt]
    lut = codebook_lut(dev, gw.fmt) if fmt >= 2 else gw.scales
    grid = (M, triton.cdiv(N, BN), SPLIT_K)
    interp = interpreting()
    pdl = idot and _use_pdl(dev)
    consts = {}
    for fixup in (False, True):
        c = dict(BITS=gw.bits, HAS_ZEROS=gw.zeros is not None, ZERO_CONST=zero_const(gw),
                 SCALE_MODE=scale_mode(gw, gw.block), GROUP=group_const(gw),
                 HAS_BIAS=has_bias and (SPLIT_K == 1 or fixup), USE_WS=SPLIT_K > 1, FIXUP=fixup,
                 K_EXACT=K % gw.block == 0 and nblk % (steps * CB) == 0, BN=BN, CB=CB,
                 EMULATE_BF16=emulate_bf16(out_dtype), STEPS_CONST=steps if interp else 0,
                 SPLIT_CONST=SPLIT_K if interp else 0)
        if idot:  # (always loads one step ahead)
            cbook = gw.fmt in CODE_SCALE
            c.update(EMU=interp, PDL=pdl, CODE_SCALE=CODE_SCALE.get(gw.fmt, 0),
                     DQ=cbook and gw.double_quant)
            if cbook:
                c["ZERO_CONST"] = 8192  # codebook_idot_codes' offset, taken off as a zero point
            if pdl:
                c["launch_pdl"] = True  # a launch option (programmatic dependent launch)
        else:
            c.update(FMT=fmt, DQ=gw.double_quant, PREFETCH=bool(PREFETCH),
                     LUT_GATHER=bool(LUT_GATHER) and fmt >= 2)
        consts[fixup] = c
    # the x quantization's constexprs (integer-dot GEMV only)
    xq_consts = dict(P=gw.per_word, GROUPED=(scale_mode(gw, gw.block) == SCALE_PLANE
                                             or gw.fmt in CODE_SCALE),  # (always halves)
                     PDL=pdl) if idot else None
    return SPLIT_K, grid, steps, lut, consts, xq_consts
