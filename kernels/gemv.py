"""GEMV / split-K GEMV for small M on CUDA cores, float32 throughout.

y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), W read from the GPU layout (kernels/layout.py).

Grid: (M, cdiv(N, BN), SPLIT_K); m varies fastest so the programs that share a weight tile run
together and the second..M-th reads of it hit L2. A program owns BN rows and a K range of
``BLOCKS_PER_SPLIT`` layout blocks; each step loads a [BN, CB, 16] tile of words (CB blocks of
16 words, 16-byte loads) and, for each of the P codes per word ("planes"), decodes one
[BN, CB, 16] slice with a shift, a mask, an OR and one FADD (code - zero, see _common.MAGIC_BITS)
and multiplies it with one contiguous [CB, 16] slice of x. Scales are applied after the sum over
the part of K they cover (a block, a plane, or the whole row), not per element.

SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N] that _common.splitk_reduce sums in a fixed
order (deterministic), adds the bias and casts; SPLIT_K == 1 writes the output directly.
Everything is float32: x is upcast on load, so float32 activations are exact products too.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (FMT_IDS, MAGIC_BITS, SCALE_BLOCK, SCALE_PLANE, SCALE_ROW, cast_out,
                      codebook_lut, codebook_values, decode_absmax, emulate_bf16, hi_shift,
                      interpreting, launch, plane_value, split_counters, splitk_reduce)
from .layout import GPUWeight, group_const


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
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    offs_b = tl.arange(0, CB)
    offs_w = tl.arange(0, 16)
    nblk = KW // 16
    b_begin = pid_k * (steps_per_split * CB)
    b_end = tl.minimum(b_begin + steps_per_split * CB, nblk)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w_rows = codes_ptr + offs_n.to(tl.int64)[:, None, None] * KW
    acc = tl.zeros([BN, CB, 16], dtype=tl.float32)
    if FMT >= 2 and LUT_GATHER:
        lut16 = tl.load(lut_ptr + tl.arange(0, 16))
    else:
        lut16 = 0.0
    if SCALE_MODE == 0:  # one group per row: zero point per row, scale applied at the end
        if HAS_ZEROS:
            z_row = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None, None]
        else:
            z_row = ZERO_CONST
    # A fixed trip count (a kernel argument): the last split's surplus steps are masked.
    # Under the interpreter it comes as a constexpr (a run-time bound fails there, numpy >= 2.4).
    w_ptrs = w_rows + (b_begin + offs_b)[None, :, None] * 16 + offs_w[None, None, :]
    if PREFETCH:  # registers hold the next step's words while this one is computed
        if K_EXACT:
            nxt = tl.load(w_ptrs, mask=n_ok[:, None, None], other=0)
        else:
            nxt = tl.load(w_ptrs, mask=n_ok[:, None, None] & ((b_begin + offs_b) < b_end)[None, :, None],
                          other=0)
    for step in range(0, STEPS_CONST if STEPS_CONST > 0 else steps_per_split):
        b0 = b_begin + step * CB
        blk = b0 + offs_b
        b_ok = blk < b_end
        if PREFETCH:
            words = nxt
            pmask = n_ok[:, None, None] & ((blk + CB) < b_end)[None, :, None]
            nxt = tl.load(w_ptrs + (step + 1) * CB * 16, mask=pmask, other=0)
        else:
            if K_EXACT:
                wmask = n_ok[:, None, None]
            else:
                wmask = n_ok[:, None, None] & b_ok[None, :, None]
            words = tl.load(w_ptrs + step * CB * 16, mask=wmask, other=0)
        hi = words >> hi_shift(BITS)
        if SCALE_MODE == 1:  # each block lies in one group
            gidx = (blk * KB) // GROUP
            gptr = gidx[None, :] * N + offs_n[:, None]
            gmask = n_ok[:, None] & b_ok[None, :]
            if DQ:
                cidx = gidx[None, :] // 256 * N + offs_n[:, None]
                s_blk = decode_absmax(tl.load(s_ptr + gptr, mask=gmask, other=0),
                                      tl.load(dqs_ptr + cidx, mask=gmask, other=0.0),
                                      tl.load(dqo_ptr + cidx, mask=gmask, other=0.0), zero_rt)
            else:
                s_blk = tl.load(s_ptr + gptr, mask=gmask, other=0.0)
            if HAS_ZEROS:
                z_blk = tl.load(z_ptr + gptr, mask=gmask, other=0).to(tl.float32)[:, :, None]
            else:
                z_blk = ZERO_CONST
            part = tl.zeros([BN, CB, 16], dtype=tl.float32)
        for i in tl.static_range(P):
            kk = blk[:, None] * KB + i * 16 + offs_w[None, :]  # [CB, 16] element indices
            if K_EXACT:
                xi = tl.load(x_row + kk).to(tl.float32)[None, :, :]
            else:
                xi = tl.load(x_row + kk, mask=(kk < K) & b_ok[:, None], other=0.0).to(tl.float32)[None, :, :]
            if SCALE_MODE == 2:  # the group changes from plane to plane
                gidx = (blk * KB + i * 16) // GROUP
                gptr = gidx[None, :] * N + offs_n[:, None]
                gmask = n_ok[:, None] & b_ok[None, :] & (gidx < G)[None, :]
                if DQ:
                    cidx = gidx[None, :] // 256 * N + offs_n[:, None]
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
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SCALE_MODE == 0:
        if DQ:
            s_row = decode_absmax(tl.load(s_ptr + offs_n, mask=n_ok, other=0),
                                  tl.load(dqs_ptr + offs_n, mask=n_ok, other=0.0),
                                  tl.load(dqo_ptr + offs_n, mask=n_ok, other=0.0), zero_rt)
        else:
            s_row = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        y = y * s_row
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
         FIXUP: bool = True, LUT_GATHER: bool = True, bind: Optional[list] = None,
         **_ignored) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T (+ bias) for x2d with unit stride along K. ``bind``: a list
    that receives (_common.Launcher, args, grid, split_k, None) of a single-kernel launch that
    can be repeated directly (lowbit.kernels binds repeated calls to it; None: no second
    launch)."""
    M, K = x2d.shape
    N = gw.shape[0]
    dev = x2d.device
    key = ("gemv", M, K, dev, out.dtype, bias is None, BN, CB, SPLIT_K, num_warps, num_stages,
           PREFETCH, FIXUP, LUT_GATHER)
    plan = gw.plans.get(key)
    if plan is None:
        if len(gw.plans) >= MAX_PLANS:
            gw.plans.clear()
        plan = gw.plans[key] = _gemv_plan(gw, M, K, dev, out.dtype, bias is not None, BN, CB,
                                          SPLIT_K, PREFETCH, LUT_GATHER)
    split_k, grid, steps, lut, consts = plan
    dummy = gw.scales
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=dev) if split_k > 1 else out
    cnt = split_counters(dev, M * grid[1]) if (split_k > 1 and FIXUP) else None
    args = (x2d, gw.codes, gw.scales, gw.zeros if gw.zeros is not None else dummy,
            gw.dq_scale if gw.dq_scale is not None else dummy,
            gw.dq_offset if gw.dq_offset is not None else dummy, lut,
            bias if bias is not None else dummy, out, ws, cnt if cnt is not None else dummy,
            M, N, K, gw.words_per_row, gw.n_groups, x2d.stride(0), out.stride(0), steps, split_k,
            0.0, MAGIC_BITS)
    launcher = launch(_gemv_kernel, grid, args, consts[cnt is not None], num_warps, num_stages)
    if split_k > 1 and cnt is None:
        splitk_reduce(ws, bias, out)
    elif bind is not None and launcher is not None:
        bind.append((launcher, args, grid, split_k, None))
    return out


def _gemv_plan(gw: GPUWeight, M: int, K: int, dev, out_dtype, has_bias: bool, BN: int, CB: int,
               SPLIT_K: int, PREFETCH: bool, LUT_GATHER: bool):
    """(split_k, grid, steps per split, codebook table, constexprs by 'split-K counters
    available') for one call shape: everything gemv() launches with but the tensors."""
    N = gw.shape[0]
    nblk = gw.words_per_row // 16
    CB = max(1, min(CB, triton.next_power_of_2(nblk)))
    SPLIT_K = max(1, min(SPLIT_K, triton.cdiv(nblk, CB)))
    steps = triton.cdiv(triton.cdiv(nblk, CB), SPLIT_K)
    blocks_per_split = steps * CB
    SPLIT_K = triton.cdiv(nblk, blocks_per_split)
    fmt = FMT_IDS[gw.fmt]
    lut = codebook_lut(dev, gw.fmt) if fmt >= 2 else gw.scales
    grid = (M, triton.cdiv(N, BN), SPLIT_K)
    interp = interpreting()
    consts = {}
    for fixup in (False, True):
        consts[fixup] = dict(
            FMT=fmt, BITS=gw.bits, HAS_ZEROS=gw.zeros is not None, ZERO_CONST=zero_const(gw),
            DQ=gw.double_quant, SCALE_MODE=scale_mode(gw, gw.block), GROUP=group_const(gw),
            HAS_BIAS=has_bias and (SPLIT_K == 1 or fixup), USE_WS=SPLIT_K > 1, FIXUP=fixup,
            K_EXACT=K % gw.block == 0 and nblk % blocks_per_split == 0, PREFETCH=bool(PREFETCH),
            LUT_GATHER=bool(LUT_GATHER) and fmt >= 2, BN=BN, CB=CB,
            EMULATE_BF16=emulate_bf16(out_dtype), STEPS_CONST=steps if interp else 0,
            SPLIT_CONST=SPLIT_K if interp else 0)
    return SPLIT_K, grid, steps, lut, consts
