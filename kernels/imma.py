"""Integer tensor-core GEMM (IMMA) for int4 weights at small and medium M.

The bf16 register-operand GEMM (gemm.py, ``gemm_rega``) decodes every code to a bf16 value
(three instructions per two weights) and runs one wgmma per nibble plane. Here the codes stay
integers: a byte of the GPU layout holds two codes, and ``byte & 0x0F`` / ``byte >> 4 & 0x0F``
are already the int8 operands of an s8 x s8 -> s32 wgmma (one LOP3 per four weights, no
conversion). x is quantized per 128-element layout block to 15-bit integers with a
power-of-two scale (the integer-dot GEMV's scheme, gemv.py, one bit narrower so the split
below stays signed): q = round(x / 2**e), e = E - 13 with E the exponent of the block's
max |x|, so |q| <= 2**14 and |x - q 2**e| <= 2**-14 max|x|, 32x finer than the bf16 rounding
of the block's largest element. Each q is split into two signed bytes, q = 256 h + l with
h = (q + 128) >> 8 and l in [-128, 127], and the wgmma's N side holds h and l of each row of
x side by side (columns 2m and 2m + 1), so one integer dot per nibble plane gives both halves
of the exact integer sum sum_k code_k q_k. Per block, in float32:

    y[m, n] += s[n, g] * 2**e[m, b] * (256 H + L - zero[n] * sum_k q[m, k])

(H, L the two halves, exact in int32: |256 H + L| <= 15 * 128 * 2**14 < 2**31). The only
error next to float32 math on the dequantized weight is x's 15-bit rounding.

Byte j (0..63) of a 128-element block is byte j % 4 of word j // 4, so its low nibble is
element 32 (j % 4) + j // 4 and its high nibble element 32 (j % 4) + 16 + j // 4
(kernels/layout.py); the x preparation (_xq8_kernel) writes x in that order, so the codes
are loaded as plain contiguous bytes.

Groups: one per row, a multiple of 128 (GB = 1 group per block), or 64 / 32 (GB = 2 / 4):
byte j's elements lie in group slot (j % 4) // (4 / GB) of its block, so the x preparation
writes GB copies of each block, copy u holding only slot u's bytes (the others zero), with
the sums of q per slot; the copies sit side by side on the N side (column 2 BM u + 2 i + t:
slot outermost, so every slot of a thread's accumulator columns is in that thread), and per
slot

    y[m, n] += 2**e[m, b] * sum_u s[n, g_u] * (256 H_u + L_u - zero[n, g_u] * sum_{k in u} q[m, k])

Other group sizes (16, 48, 96, ...) take the bf16 GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import emulate_bf16, interpreting, k_split, launch_x_prep, pow2_block_quantize
from .gemm import _mn_tile, _store_tile, launch_after_prep
from .gemv import _use_pdl, gdc_launch_dependents, gdc_wait
from .layout import GPUWeight, group_const


def xq8_numel(M: int, nblk: int, GB: int = 1) -> int:
    """int32 elements of the prepared x: bytes [M, nblk, plane 2, group slot GB, half 2, 64],
    then the float32 block scales [M, nblk] and the int32 sums of q [M, nblk, GB]."""
    return M * nblk * 64 * GB + M * nblk + M * nblk * GB


@triton.jit
def _xq8_kernel(x_ptr, xq_ptr, M, K, NBLK, stride_xm, GB: tl.constexpr, PDL: tl.constexpr):
    """One 128-element block of one row of x: quantize, split and reorder (module docstring);
    with GB > 1 groups per block, one copy per group slot u holding only the bytes of the
    block's u-th group (zeros elsewhere), and the sums of q per group."""
    if PDL:
        gdc_launch_dependents()
    m = tl.program_id(0)
    b = tl.program_id(1)
    p = tl.arange(0, 2)[:, None]
    j = tl.arange(0, 64)[None, :]
    k = b * 128 + 32 * (j % 4) + 16 * p + j // 4  # [2, 64]: plane p, byte j
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    r, scale, live = pow2_block_quantize(x, 13)
    q = tl.where(live, r, 0.0).to(tl.int32)
    row = m.to(tl.int64) * NBLK + b
    tail = xq_ptr + tl.cast(M, tl.int64) * NBLK * 64 * GB
    tl.store(tail.to(tl.pointer_type(tl.float32)) + row, scale)
    qs_ptr = tail + tl.cast(M, tl.int64) * NBLK + row * GB
    for u in tl.static_range(GB):
        # byte j holds elements 32 (j % 4) + 16 p + j // 4: group slot (j % 4) // (4 // GB)
        qu = q if GB == 1 else tl.where((j % 4) // (4 // GB) == u, q, 0)
        h = (qu + 128) >> 8
        lo = qu - 256 * h
        dst = xq_ptr.to(tl.pointer_type(tl.int8)) + row * (256 * GB) + p * (128 * GB) + u * 128 + j
        tl.store(dst, h.to(tl.int8))
        tl.store(dst + 64, lo.to(tl.int8))
        tl.store(qs_ptr + u, tl.sum(tl.sum(qu, axis=1), axis=0))


@triton.jit
def _plane(c, i: tl.constexpr, EMU: tl.constexpr):
    """Codes of nibble plane i (0: low, 1: high) of int8 code bytes, as int8 0..15."""
    if EMU:
        if i == 0:
            return c & 0x0F
        else:
            return (c >> 4) & 0x0F
    else:  # four bytes per register, one instruction (pure unary asm: still hoisted into
        # the wgmma's register operand, no shared-memory round trip of the decoded tile)
        if i == 0:
            asm: tl.constexpr = "and.b32 $0, $1, 0x0F0F0F0F;"
        else:
            asm: tl.constexpr = "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }"
        return tl.inline_asm_elementwise(asm, "=r,r", [c], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _idot(a, b, acc, EMU: tl.constexpr):
    if EMU:  # the interpreter: the same integers through float32 (all sums < 2**24: exact)
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(tl.int32)
    else:
        return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit
def _block_consts(b, ok, xs_rows, qs_rows, s_ptr, z_ptr, offs_n, offs_u, m_ok, n_ok, N, G,
                  HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr, GROUP: tl.constexpr,
                  BN: tl.constexpr, GB: tl.constexpr):
    """Block b's x scales [BM] and sums of q, and its groups' weight scales and zero points
    (zeros where not ok: past the program's K range). GB == 1: sums [BM], scales and zero
    points [BN]; else sums [GB, BM], scales and zero points [BN, GB] (group slot u of the
    block is group b * GB + u)."""
    xs = tl.load(xs_rows + b, mask=m_ok & ok, other=0.0)
    if GB == 1:
        qs = tl.load(qs_rows + b, mask=m_ok & ok, other=0)
        g = (b * 128) // GROUP
        s_g = tl.load(s_ptr + g * N + offs_n, mask=n_ok & ok, other=0.0)
        if HAS_ZEROS:
            z_g = tl.load(z_ptr + g * N + offs_n, mask=n_ok & ok, other=0).to(tl.int32)
        else:
            z_g = tl.full([BN], ZERO_CONST, tl.int32)
    else:
        qs = tl.load(qs_rows[None, :] + b * GB + offs_u[:, None], mask=m_ok[None, :] & ok, other=0)
        g = b * GB + offs_u  # [GB]
        gm = n_ok[:, None] & (g < G)[None, :] & ok
        s_g = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=gm, other=0.0)
        if HAS_ZEROS:
            z_g = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=gm, other=0).to(tl.int32)
        else:
            z_g = tl.full([BN, GB], ZERO_CONST, tl.int32)
    return xs, qs, s_g, z_g


@triton.jit
def _gemm_imma_kernel(xq_ptr, c8_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, lut_ptr, bias_ptr, out_ptr,
                      ws_ptr, M, N, KW, G,
                      stride_om, stride_xq, steps_per_split,
                      HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr, GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr, K_EXACT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, CB: tl.constexpr,
                      GB: tl.constexpr,  # weight groups per 128-element block (1, 2 or 4)
                      GROUP_M: tl.constexpr, EMU: tl.constexpr, EMULATE_BF16: tl.constexpr,
                      STEPS_CONST: tl.constexpr, PDL: tl.constexpr):
    """y^T[BN, BM] tiles of int4 weights times x prepared by _xq8_kernel, CB 128-element
    blocks per step (module docstring). dqs/dqo/lut are unused: the argument order of the other
    matmul kernels, whose per-call slots (x, bias, out, workspace) lowbit.kernels binds."""
    if PDL:
        gdc_wait()
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = _mn_tile(M, N, BM, BN, GROUP_M)
    nblk = KW // 16
    b_begin = pid_k * steps_per_split * CB
    b_end = tl.minimum(b_begin + steps_per_split * CB, nblk)
    offs_j = tl.arange(0, 64)
    offs_u = tl.arange(0, GB)
    # the wgmma's N side: column 2 BM u + 2 i + t is half t (0: h, 1: l) of group slot u of x
    # row offs_m[i] (group slot outermost: a thread's accumulator registers then hold every
    # slot of its columns, so the sum over slots stays in the thread)
    c_r = tl.arange(0, 2 * GB * BM)
    m_r = tl.min(offs_m, axis=0) + (c_r // 2) % BM  # (offs_m: BM consecutive rows)
    u_r = c_r // (2 * BM)
    t_r = c_r % 2
    r_ok = m_r < M
    x8 = xq_ptr.to(tl.pointer_type(tl.int8))
    # (stride_xq = nblk * 256 * GB bytes, an argument so that Triton sees its divisibility by
    # 16: 16-byte cp.async of x)
    x_rows = x8 + (m_r.to(tl.int64) * stride_xq + u_r * 128 + t_r * 64)[:, None] + offs_j[None, :]
    tail = xq_ptr + tl.cast(M, tl.int64) * nblk * 64 * GB
    xs_rows = tail.to(tl.pointer_type(tl.float32)) + offs_m.to(tl.int64) * nblk
    qs_rows = tail + tl.cast(M, tl.int64) * nblk + offs_m.to(tl.int64) * (nblk * GB)
    c_rows = c8_ptr + offs_n.to(tl.int64)[:, None] * (4 * KW) + offs_j[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    # the block's scales, zero points and x sums are loaded one step ahead (registers): loaded
    # in the step that uses them, their latency stalled every step (SASS: the loads issued at
    # the top of the loop, consumed after the MMAs)
    xs, qs, s_g, z_g = _block_consts(b_begin, b_begin < b_end, xs_rows, qs_rows, s_ptr, z_ptr,
                                     offs_n, offs_u, m_ok, n_ok, N, G, HAS_ZEROS, ZERO_CONST,
                                     GROUP, BN, GB)
    for step in range(0, STEPS_CONST if STEPS_CONST > 0 else steps_per_split):
        # CB blocks per step, unrolled: the loop's own work (pipeline waits and barriers, the
        # loop counter, the load bookkeeping) is shared by CB blocks' dots and epilogues
        for j in tl.static_range(CB):
            b = b_begin + step * CB + j
            if K_EXACT:
                cmask = n_ok[:, None]
                xmask = r_ok[:, None]
            else:
                live = b < b_end
                cmask = n_ok[:, None] & live
                xmask = r_ok[:, None] & live
            c = tl.load(c_rows + b * 64, mask=cmask, other=0)
            x0 = tl.load(x_rows + b * (256 * GB), mask=xmask, other=0)
            x1 = tl.load(x_rows + b * (256 * GB) + 128 * GB, mask=xmask, other=0)
            xs_n, qs_n, s_n, z_n = _block_consts(b + 1, b + 1 < b_end, xs_rows, qs_rows, s_ptr,
                                                 z_ptr, offs_n, offs_u, m_ok, n_ok, N, G,
                                                 HAS_ZEROS, ZERO_CONST, GROUP, BN, GB)
            part = tl.zeros([BN, 2 * GB * BM], dtype=tl.int32)
            part = _idot(_plane(c, 0, EMU), tl.trans(x0), part, EMU)
            part = _idot(_plane(c, 1, EMU), tl.trans(x1), part, EMU)
            if GB == 1:  # (the measured, tuned form; the general one below is not timed for it)
                hsum, lsum = tl.split(tl.reshape(part, [BN, BM, 2]))
                dot = hsum * 256 + lsum - z_g[:, None] * qs[None, :]
                acc += dot.to(tl.float32) * (s_g[:, None] * xs[None, :])
            else:  # per group slot, then summed (the block's x scale is common to its groups)
                hsum, lsum = tl.split(tl.reshape(part, [BN, GB, BM, 2]))
                dot = hsum * 256 + lsum - z_g[:, :, None] * qs[None, :, :]
                acc += tl.sum(dot.to(tl.float32) * s_g[:, :, None], axis=1) * xs[None, :]
            xs, qs, s_g, z_g = xs_n, qs_n, s_n, z_n
    _store_tile(acc, offs_m, offs_n, m_ok, n_ok, pid_k, M, N, stride_om, bias_ptr, out_ptr,
                ws_ptr, True, HAS_BIAS, USE_WS, EMULATE_BF16)


def imma_supported(gw: GPUWeight, dtype: torch.dtype) -> bool:
    """Whether the IMMA GEMM takes this weight: int4 (symmetric or integer zero points) with
    one group per row, groups of 32 or 64, or a multiple of 128, and 16-bit activations."""
    return (gw.fmt == "int4" and dtype in (torch.float16, torch.bfloat16)
            and (gw.n_groups == 1 or gw.group % 128 == 0 or gw.group in (32, 64)))


def groups_per_block(gw: GPUWeight) -> int:
    """Weight groups per 128-element layout block (1, 2 or 4) for the IMMA GEMM."""
    return 128 // gw.group if gw.n_groups > 1 and gw.group < 128 else 1


def gemm_imma(x2d: torch.Tensor, gw: GPUWeight, bias, out: torch.Tensor, *, BM: int, BN: int,
              CB: int = 1, SPLIT_K: int = 1, GROUP_M: int = 8, num_warps: int = 4,
              num_stages: int = 3, bind=None, **_ignored) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T (+ bias) by _xq8_kernel then _gemm_imma_kernel (int4, see
    imma_supported). ``bind``: as for gemm.gemm, with ``pre`` the x preparation's launch."""
    M, K = x2d.shape
    N = gw.shape[0]
    KW = gw.words_per_row
    nblk = KW // 16
    if not imma_supported(gw, x2d.dtype):
        raise ValueError(f"the IMMA GEMM does not take {gw.fmt} group {gw.group} with "
                         f"{x2d.dtype} activations")
    CB, SPLIT_K, steps = k_split(nblk, CB, SPLIT_K)
    dev = x2d.device
    pdl = _use_pdl(dev)
    emu = interpreting()
    GB = groups_per_block(gw)
    xq, pre = launch_x_prep(_xq8_kernel, xq8_numel(M, nblk, GB), x2d, nblk,
                            dict(GB=GB, PDL=pdl), 1)
    dummy = gw.scales
    ws = torch.empty((SPLIT_K, M, N), dtype=torch.float32, device=dev) if SPLIT_K > 1 else out
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), SPLIT_K)
    args = (xq, gw.codes.view(torch.int8), gw.scales,
            gw.zeros if gw.zeros is not None else dummy, dummy, dummy, dummy,
            bias if bias is not None else dummy, out, ws, M, N, KW, gw.n_groups, out.stride(0),
            nblk * 256 * GB, steps)
    consts = dict(HAS_ZEROS=gw.zeros is not None, ZERO_CONST=8, GROUP=group_const(gw),
                  HAS_BIAS=bias is not None and SPLIT_K == 1, USE_WS=SPLIT_K > 1,
                  K_EXACT=nblk % (steps * CB) == 0, BM=BM, BN=BN, CB=CB, GB=GB,
                  GROUP_M=GROUP_M, EMU=emu,
                  EMULATE_BF16=emulate_bf16(out.dtype),
                  STEPS_CONST=steps if emu else 0, PDL=pdl)
    return launch_after_prep(_gemm_imma_kernel, grid, args, consts, num_warps, num_stages,
                             pre, pdl, ws, bias, out, bind)
