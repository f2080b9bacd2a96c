"""Pieces shared by the Triton kernels: format ids, code decoding, the split-K reduction."""

from __future__ import annotations

import os

from typing import Optional

import torch
import triton
import triton.language as tl

# Format ids (constexpr in the kernels); FMT >= FMT_NF4: a codebook format (lut_ptr holds its
# 16 values, codebook_lut).
FMT_INT8, FMT_INT4, FMT_NF4, FMT_FP4 = 0, 1, 2, 3
FMT_IDS = {"int8": FMT_INT8, "int4": FMT_INT4, "nf4": FMT_NF4, "fp4": FMT_FP4}

# Scale modes of the matmul kernels (constexpr).
SCALE_ROW = 0  # one group per row (int8, group -1, group >= K): scale once after the sum
SCALE_BLOCK = 1  # group % (elements per K step) == 0: a K step lies in one group
SCALE_PLANE = 2  # anything else: one group per 16-element plane (groups are multiples of 16)
SCALE_BLOCK_W = 3  # GEMM only: as SCALE_BLOCK, but the scale goes into the (rounded) weight

# Decoding integer codes without int->float conversions (slow on NVIDIA GPUs): OR-ing a bit
# field into the mantissa of 2**23 (bits 0x4B000000) gives the float f = 2**23 + code * 2**SH
# exactly, and one FFMA f * 2**-SH - (2**(23-SH) + zero) leaves code - zero exactly (the
# product is a power-of-two scaling, the sum of two exact integers below 2**24). A plane's
# code is read *in place* at bit offset SH (one LOP3: mask and OR), not shifted down first.
# Fields must stay below bit 23: 4-bit planes 0-4 are read at 4i, planes 5-7 at 4i - 12 from
# words >> 12; 8-bit planes 0-1 at 8i, planes 2-3 at 8i - 16 from words >> 16.
MAGIC_BITS = 0x4B000000
TWO23 = tl.constexpr(8388608.0)


@triton.constexpr_function
def hi_shift(bits):
    """Shift giving the word whose low bits hold the upper planes (see above)."""
    return 12 if bits == 4 else 16


@triton.constexpr_function
def plane_from_hi(i, bits):
    return i >= (5 if bits == 4 else 2)


@triton.constexpr_function
def plane_shift(i, bits):
    """Bit offset SH at which plane i's code is read (in words, or in words >> hi_shift)."""
    return bits * i - (hi_shift(bits) if plane_from_hi(i, bits) else 0)


@triton.constexpr_function
def plane_unscale(i, bits):
    """2**-SH, the exact factor applied to plane i's x values."""
    return 1.0 / (1 << plane_shift(i, bits))


@triton.jit
def plane_value(words, hi, z, magic, i: tl.constexpr, BITS: tl.constexpr):
    """float32 code - z of plane i (words: int32 tile; hi = words >> hi_shift(BITS); z: the
    zero point, a constexpr or a float32 tensor broadcastable to words), exactly.

    ``magic`` is MAGIC_BITS passed as a run-time kernel argument: as a register operand the
    mask and the OR fuse into one LOP3 (SASS takes one immediate per LOP3), where two
    immediates cost two instructions per code."""
    FIELD: tl.constexpr = ((1 << BITS) - 1) << plane_shift(i, BITS)
    if plane_from_hi(i, BITS):
        src = hi
    else:
        src = words
    f = ((src & FIELD) | magic).to(tl.float32, bitcast=True)  # 2**23 + code * 2**SH
    return f * plane_unscale(i, BITS) - (z + TWO23 * plane_unscale(i, BITS))

@triton.jit
def codebook_values(lut_ptr, lut16, codes, NUMEL: tl.constexpr, GATHER: tl.constexpr):
    """float32 codebook values of integer codes (any shape, NUMEL elements). GATHER: tl.gather
    from ``lut16``, the 16 values loaded once into registers (warp shuffles): 1.5-1.9x faster
    nf4 GEMV on an H200 than the default, a load per code from the 64-byte table in memory
    (``lut_ptr``, served by L1 but one gather instruction per code)."""
    if GATHER:
        flat = tl.gather(lut16, tl.reshape(codes, [NUMEL]), 0)
        return tl.reshape(flat, codes.shape)
    else:
        return tl.load(lut_ptr + codes)


_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tl_dtype(dt: torch.dtype):
    return _TORCH_TO_TL[dt]


@triton.jit
def decode_absmax(codes, step, lo, zero_rt):
    """Double-quantized nf4 absmax: float(c) * step + lo with two float32 roundings.

    ``zero_rt`` is a run-time 0.0 the compiler can't see through: c * step + 0.0 may become
    fma(c, step, 0.0), which rounds exactly like the product alone, and the following add of
    ``lo`` then has no multiply left to contract with. This keeps the reference's rounding
    without turning off FMA contraction for the whole kernel.
    """
    t = codes.to(tl.float32) * step + zero_rt
    return t + lo


XQ_MIN_EXP = tl.constexpr(-112)  # a block whose max |x| is below 2**-112 quantizes to zeros


@triton.jit
def pow2_block_quantize(x, SHIFT: tl.constexpr):
    """One block of activations (float32, 2-D) -> (r, scale, live) for the integer kernels:
    E the exponent of the block's max |x|, e = E - SHIFT, r = x / 2**e rounded to the nearest
    integer (ties to even; exact steps: a power-of-two scaling, then one rounding), as float32
    with |r| <= 2**(SHIFT + 1); scale = 2**e. A block below 2**XQ_MIN_EXP is not ``live``
    (the caller zeroes it; scale 0); a non-finite block has scale NaN."""
    amax = tl.max(tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0)
    E = (amax >> 23) - 127
    finite = amax < 0x7F800000
    live = finite & (E >= XQ_MIN_EXP)
    e = tl.where(live, E - SHIFT, 0)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e
    v = x * inv  # exact
    r = (v + 12582912.0) - 12582912.0  # nearest integer, ties to even (|v| < 2**22)
    scale = tl.where(live, ((127 + e) << 23).to(tl.float32, bitcast=True),
                     tl.where(finite, 0.0, float("nan")))
    return r, scale, live


@triton.jit
def rne_bf16(x):
    """float32 rounded to the nearest bfloat16 (ties to even), kept in float32.

    Only for the Triton interpreter, whose float32 -> bfloat16 cast truncates: after this the
    cast is exact. Compiled kernels use the hardware conversion (round to nearest even).
    """
    b = x.to(tl.uint32, bitcast=True)
    b = b + (((b >> 16) & 1) + 0x7FFF)
    return (b & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def cast_out(y, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """y.to(dtype), with round-to-nearest-even bfloat16 under the interpreter (EMULATE_BF16)."""
    if EMULATE_BF16:
        y = rne_bf16(y)
    return y.to(dtype)


def emulate_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def k_split(nblk: int, CB: int, SPLIT_K: int):
    """(CB, SPLIT_K, steps per split) of a matmul over ``nblk`` layout blocks: CB clamped to
    the blocks there are (a power of two), the split to the steps there are, then recomputed
    from whole steps per split so that no split is empty."""
    CB = max(1, min(CB, triton.next_power_of_2(nblk)))
    split = max(1, min(SPLIT_K, triton.cdiv(nblk, CB)))
    steps = triton.cdiv(triton.cdiv(nblk, CB), split)
    return CB, triton.cdiv(nblk, steps * CB), steps


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, stride_om,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                          EMULATE_BF16: tl.constexpr):
    """out[m, n] = sum_s ws[s, m, n] (+ bias[n]), cast to out's dtype (fixed order: deterministic)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    m = offs // N
    tl.store(out_ptr + m * stride_om + n, cast_out(acc, out_ptr.dtype.element_ty, EMULATE_BF16),
             mask=mask)


def splitk_reduce(ws: torch.Tensor, bias, out: torch.Tensor, bind: Optional[list] = None) -> None:
    """out = sum of ws over its first dimension (+ bias), in out's dtype. ``bind``: receives
    (Launcher, args, grid) of the launch (its argument order: ws, bias or ws, out, ...)."""
    split_k, M, N = ws.shape
    BLOCK = 1024
    grid = (triton.cdiv(M * N, BLOCK),)
    # through launch() (defined below): Triton's own launch path would cost more host time
    # than the reduction itself takes on the GPU
    args = (ws, bias if bias is not None else ws, out, M, N, out.stride(0))
    launcher = launch(_splitk_reduce_kernel, grid, args,
                      dict(SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=BLOCK,
                           EMULATE_BF16=emulate_bf16(out.dtype)), 4, 3)
    if bind is not None and launcher is not None:
        bind.append((launcher, args, grid))


_STAGES: dict = {}

# ---- launching ------------------------------------------------------------------------------
# Triton's own launch path (JITFunction.run) binds every argument and recomputes the kernel's
# specialization key on each call: about 45-60 us of host time per launch on the H200 machine's
# CPU, several times the GEMV's own 12-40 us. The first launch of each distinct configuration
# goes through it (compiling if needed) and returns the CompiledKernel; later launches with the
# same configuration call that kernel's launcher directly. "Same configuration" is everything
# Triton specializes on: the kernel, the constexpr values, num_warps / num_stages, the device,
# and for each run-time argument its kind: a tensor's dtype and 16-byte alignment, an int's
# width, divisibility by 16 and equality to 1 (_arg_spec). Kernels are keyed by id() (they are
# module-level objects; JITFunction's own hash costs ~2 us). Launch hooks (profilers) and the
# interpreter always take Triton's path. LOWBIT_TRITON_FAST_LAUNCH=0 turns this off.
_FAST: dict = {}
_FAST_ON = os.environ.get("LOWBIT_TRITON_FAST_LAUNCH", "1") not in ("0", "")
FAST_LAUNCHES = [0]  # launches that took the direct path (tests check it is used)


def _arg_spec(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31, a >= 0)
    return type(a)


class Launcher:
    """A compiled kernel with its parameter list bound except for the run-time arguments:
    ``launcher(grid, launcher.values(args))`` launches it without Triton's binder."""

    __slots__ = ("compiled", "tmpl", "pos")

    def __init__(self, compiled, tmpl, pos):
        self.compiled, self.tmpl, self.pos = compiled, tmpl, pos

    @classmethod
    def make(cls, kernel, compiled, constexprs: dict, n_args: int):
        """The launcher of ``compiled`` (``kernel`` with these constexprs), or None when the
        direct path can't take it (a constexpr left to its default, another Triton)."""
        if compiled is None or not hasattr(compiled, "run") or compiled.function is None:
            return None
        if any(p.is_constexpr and p.name not in constexprs for p in kernel.params):
            return None
        pos = [i for i, p in enumerate(kernel.params) if not p.is_constexpr]
        if len(pos) != n_args:
            return None
        return cls(compiled, [constexprs.get(n) for n in kernel.arg_names], pos)

    def values(self, args) -> list:
        """Every parameter's value in signature order, with ``args`` as the run-time ones."""
        vals = list(self.tmpl)
        for i, a in zip(self.pos, args):
            vals[i] = a
        return vals

    def __call__(self, grid, vals) -> None:
        c = self.compiled
        c.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
              _driver.active.get_current_stream(_driver.active.get_current_device()),
              c.function, c.packed_metadata, None, None, None, *vals)

    def raw(self):
        """``(launch, fixed)`` to call the compiled kernel's C launch function without Triton's
        Python launcher, as ``launch(gx, gy, gz, stream, *fixed, *vals)``, where the kernel
        needs no scratch memory (that launcher would allocate it per call); else None.
        Pointer parameters may then be passed as plain integers (device addresses), which the
        C function takes without calling ``data_ptr()`` and ``cuPointerGetAttribute``."""
        run = self.compiled.run
        fn = getattr(run, "launch", None)
        coop = getattr(run, "launch_cooperative_grid", None)
        pdl = getattr(run, "launch_pdl", None)
        if (not callable(fn) or coop is None or pdl is None
                or getattr(run, "global_scratch_size", 1) != 0
                or getattr(run, "profile_scratch_size", 1) != 0):
            return None
        return fn, (self.compiled.function, coop, pdl, None, None, self.compiled.packed_metadata,
                    None, None, None)


from triton.runtime.driver import driver as _driver

try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: never take the direct path
    _knobs = None


def _hook_active(h) -> bool:
    calls = getattr(h, "calls", None)  # Triton >= 3.5: a HookChain, empty when unused
    return bool(calls) if calls is not None else h is not None


def _launch_hooks_set() -> bool:
    if _knobs is None:
        return True
    rt = _knobs.runtime
    return _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)


def launch(kernel, grid, args, constexprs: dict, num_warps: int, num_stages: int):
    """kernel[grid](*args, **constexprs, ...) (directly through the compiled kernel's launcher
    once this configuration has run; see above), retrying with fewer pipeline stages when the
    config needs more shared memory than this GPU has (remembered per config). Returns the
    configuration's Launcher (None where the direct path does not apply)."""
    key = None
    if _STAGES:  # some config needed fewer stages: look this one up (rare, so keyed lazily)
        key = _stage_key(kernel, constexprs, num_warps, num_stages)
        num_stages = _STAGES.get(key, num_stages)
    fast = _FAST_ON and not interpreting()
    if fast:
        fkey = (id(kernel), _driver.active.get_current_device(), num_warps, num_stages,
                tuple(constexprs.items()), tuple(map(_arg_spec, args)))
        launcher = _FAST.get(fkey)
        if launcher is not None and not _launch_hooks_set():
            launcher(grid, launcher.values(args))
            FAST_LAUNCHES[0] += 1
            return launcher
    while True:
        try:
            compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            break
        except triton.runtime.errors.OutOfResources:
            if num_stages <= 1:
                raise
            if key is None:
                key = _stage_key(kernel, constexprs, num_warps, num_stages)
            num_stages -= 1
            _STAGES[key] = num_stages
    if not fast:
        return None
    launcher = Launcher.make(kernel, compiled, constexprs, len(args))
    if launcher is not None and len(_FAST) < 4096:
        _FAST[fkey] = launcher
    return launcher


def launch_x_prep(kernel, numel: int, x2d: torch.Tensor, nblk: int, constexprs: dict,
                  num_warps: int):
    """The x preparation of the integer-dot GEMV and the register-operand / IMMA GEMMs: one
    program per (row of x, layout block) writes an int32 buffer of ``numel`` elements that the
    matmul then reads in x's place. Returns (buffer, (Launcher, args, grid) for binding, or
    None when the launch has no reusable launcher)."""
    M, K = x2d.shape
    xq = torch.empty(numel, dtype=torch.int32, device=x2d.device)
    args = (x2d, xq, M, K, nblk, x2d.stride(0))
    launcher = launch(kernel, (M, nblk), args, constexprs, num_warps, 1)
    return xq, ((launcher, args, (M, nblk)) if launcher is not None else None)


def _stage_key(kernel, constexprs, num_warps, num_stages):
    return (id(kernel), tuple(sorted((k, str(v)) for k, v in constexprs.items())), num_warps,
            num_stages)


_COUNTERS: dict = {}
MAX_COUNTERS = 1 << 16


def split_counters(device: torch.device, n: int):
    """Zeroed int32 arrival counters for in-kernel split-K reductions (kernels re-arm them to 0
    after use), one buffer per device, made on first use; None when ``n`` exceeds it or the
    first use would happen during CUDA-graph capture (callers then reduce in a second kernel).
    Launches on several streams at once would share them: lowbit runs each layer on one."""
    if n > MAX_COUNTERS:
        return None
    key = str(device)
    t = _COUNTERS.get(key)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        t = _COUNTERS[key] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return t


_LUTS = {}


def device_table(name: str, device: torch.device, values, dtype: torch.dtype) -> torch.Tensor:
    """A small constant table on ``device``, cached per (name, device). Written by fills, not a
    host copy, so that a first call inside CUDA-graph capture is safe."""
    key = (str(device), name)
    t = _LUTS.get(key)
    if t is None:
        t = torch.empty(len(values), dtype=dtype, device=device)
        for i, v in enumerate(values):
            t[i].fill_(v)  # (fill_ keeps the sign of fp4's -0.0)
        _LUTS[key] = t
    return t


def codebook_lut(device: torch.device, fmt: str = "nf4") -> torch.Tensor:
    """The codebook of ``fmt`` (nf4 / fp4) as a float32 tensor on ``device`` (cached)."""
    from lowbit.formats import CODEBOOKS
    return device_table(fmt, device, CODEBOOKS[fmt], torch.float32)


def nf4_lut(device: torch.device) -> torch.Tensor:
    """The NF4 codebook as a float32 tensor on ``device`` (codebook_lut(device, "nf4"))."""
    return codebook_lut(device, "nf4")
