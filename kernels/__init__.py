"""lowbit.kernels: Triton kernels for NVIDIA GPUs (optional; needs the ``triton`` package).

Files, one kernel family each:
  layout.py   the GPU weight layout, repacked once per weight and cached (``prepare``)
  dequant.py  dequantize, bit-exact against lowbit.reference
  gemv.py     CUDA-core GEMV / split-K GEMV (small M, any activation dtype, float32 math), and
              the integer-dot GEMV (16-bit activations quantized per block to 16-bit
              integers, dp4a on the codes; int4 / int8; LOWBIT_GPU_EXACT=1 turns it off)
  gemm.py     fused tensor-core GEMM (fp16/bf16 activations), and the register-operand GEMM
              for int4 at small M (gemm_rega: the decoded codes reach the MMA in registers)
  imma.py     integer tensor-core GEMM for int4 (x quantized per block to 15-bit integers,
              s8 x s8 wgmma on the codes; groups of 32, 64 or multiples of 128; a tuned choice
              where it wins, the heuristics' for groups of 64; LOWBIT_GPU_EXACT=1 turns it off)
  select.py   select(): kernel + parameters per (M, N, K, format, group, GPU) from the tuned
              JSON in configs/ (written by bench/tune_gpu.py) or heuristics
  _common.py  decode helpers and the split-K reduction

``AVAILABLE`` is true when Triton imports and there is a CUDA device (or TRITON_INTERPRET=1,
under which the kernels run on CPU tensors for tests). lowbit.ops calls ``linear`` and
``dequantize``; importing this package without Triton works and leaves AVAILABLE false.

Activation dtypes: float16 / bfloat16 use every path. float32 activations use the float32 GEMV
(exact float32 products) for small M and, above it, dequantize to float32 + torch's float32
matmul, never a tensor-core kernel: no TF32 unless the user enabled
``torch.backends.cuda.matmul.allow_tf32`` themselves.

Formats: every format and variant of lowbit.formats. ``dequantize`` is bit-exact for all of
them; the GEMV and GEMM take int8 (per row or grouped, with or without zero-points), int4
(symmetric or with integer zero-points), nf4 and fp4 (with or without double quant). int4 with
float offsets (zero_point="float", GGUF Q4_1 / Q4_K) always runs as Triton dequantize + torch
matmul (plan() returns the ``dequant_mm`` choice with source "variant"): its w = q * s + m does
not fit the fused kernels' "scale after the sum of (code - zero) * x".

CUDA graphs / torch.compile: no host synchronisation, no .item(); outputs and split-K
workspaces come from torch's caching allocator (capturable). The GPU layout of a weight is made
on its first use: run one eager call (or ``prepare(qw)``) before capturing a graph.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
    _TRITON_ERROR: Optional[BaseException] = None
except ImportError as e:  # triton is an optional dependency
    triton = None
    _TRITON_ERROR = e


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


AVAILABLE = triton is not None and (torch.cuda.is_available() or _interpreting())

if triton is not None:
    from . import dequant as _dequant
    from . import gemm as _gemm
    from . import gemv as _gemv
    from . import select as _select
    from . import layout as _layout
    from .layout import forget, gpu_weight, prepare  # noqa: F401
    from ._common import _FAST_ON, _launch_hooks_set, interpreting

__all__ = ["AVAILABLE", "linear", "dequantize", "prepare", "forget", "plan"]


def _require():
    if triton is None:
        raise RuntimeError(f"lowbit.kernels needs Triton (pip install 'lowbit[gpu]'): {_TRITON_ERROR}")


def plan(x: torch.Tensor, qw, M: Optional[int] = None):
    """The select() choice ``linear(x, qw)`` would run (kernel, parameters, source)."""
    _require()
    from lowbit.kernels.select import card_name, sm_count, variant_of
    N, K = qw.shape
    if M is None:
        M = x.numel() // K if x.dim() else 1
    if not _layout.supports_fused(qw):  # int4 float offsets: dequantize + matmul
        return _select.Choice("dequant_mm", {}, "variant")
    return _select.select(M, N, K, qw.fmt, qw.group_size, card_name(x.device), dtype=x.dtype,
                          variant=variant_of(qw.fmt, qw.symmetric, qw.double_quant, qw.zero_point),
                          sms=sm_count(x.device))


def run_choice(choice, x2d: torch.Tensor, qw, bias: Optional[torch.Tensor],
               out: torch.Tensor, bind: Optional[list] = None) -> torch.Tensor:
    """Run one select() choice: out[M, N] = x2d @ W^T (+ bias). For tools (tune, bench, tests)."""
    if choice.kernel == "dequant_mm":
        w = _dequant.dequantize(qw, x2d.dtype)
        if bias is None:
            torch.mm(x2d, w.t(), out=out)
        elif x2d.dtype == torch.float32:
            torch.addmm(bias.to(torch.float32), x2d, w.t(), out=out)
        else:  # add the bias in float32, as the reference does
            out.copy_(torch.mm(x2d, w.t()).float().add_(bias.float()))
        return out
    gw = gpu_weight(qw)
    params = dict(choice.params)
    if choice.kernel == "gemv":
        return _gemv.gemv(x2d, gw, bias, out, bind=bind, **params)
    if choice.kernel == "gemm":
        if x2d.dtype == torch.float32:
            raise ValueError("the tensor-core GEMM takes float16/bfloat16 activations")
        params.setdefault("dot_f32", _interpreting() and x2d.dtype == torch.bfloat16)
        return _gemm.gemm(x2d, gw, bias, out, bind=bind, **params)
    raise ValueError(f"unknown kernel {choice.kernel!r}")


def linear(x: torch.Tensor, qw, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W = qw, float32 accumulation, output in x's dtype."""
    _require()
    qw.ensure_valid()  # (once per set of fields: the kernels trust the layout)
    N, K = qw.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) < K):
        x2d = x2d.contiguous()
    M = x2d.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    choice = plan(x, qw, M)
    # x2d must be x's own memory (no copy made above): 2-D as it came, or any contiguous x
    if (choice.kernel in ("gemv", "gemm") and x2d.data_ptr() == x.data_ptr()
            and ((x.dim() == 2 and (M == 1 or x2d.stride() == x.stride()))
                 or (x.dim() > 2 and x.is_contiguous()))
            and _bindable(qw)):
        rec: list = []
        run_choice(choice, x2d, qw, bias, out, bind=rec)
        if rec:
            _bind(qw, x, bias, rec[0])
        return out.reshape(*lead, N)
    run_choice(choice, x2d, qw, bias, out)
    return out.reshape(*lead, N)


# ---- bound calls ------------------------------------------------------------------------------
# Decoding one token runs every linear layer at M = 1, where the GEMV takes 5-40 us on an H200
# and the host-side path above (argument checks, select(), the launch) takes several times
# that in Python; a short prompt or a small batch (the GEMM at M = 2-64) is in the same range.
# A call that ran the GEMV or the GEMM on x's own memory (2-D, or any contiguous x) is
# therefore bound once per layer and call signature: fast_linear() then checks only what could
# differ between two calls with the same signature (the weight's tensors changed in place;
# launch hooks; autograd; torch.compile tracing) and calls the compiled kernels' launchers with
# the new x / output pointers. The signature is everything the bound launch depends on: x's shape, strides,
# dtype, device and 16-byte alignment, and the bias's presence, dtype and alignment.
_BOUND = "triton_bound_calls"
MAX_BOUND = 16  # signatures kept per weight
BOUND_CALLS = [0]  # calls served by a bound launch (tests check it is used)


# the current CUDA stream of a device index as an integer (what Triton's launcher gets too)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _bindable(qw) -> bool:
    # weights with input transforms are excluded: their x arrives here already transformed
    return (_FAST_ON and not interpreting() and getattr(qw, "cache", None) is not None
            and not qw.has_input_transform)


def _signature(x: torch.Tensor, bias: Optional[torch.Tensor]):
    if bias is None:
        b = None
    else:
        b = (bias.dtype, bias.data_ptr() & 15, bias.stride(), bias.get_device())
    return (x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() & 15, b)


# positions of the per-call arguments in the argument tuples of gemv and gemm (both kernels
# start x, codes, s, z, dqs, dqo, lut, bias, out, ws, ...) and of the split-K reduction
# (ws, bias or ws, out, ...); what each takes per call: x, out, the workspace, the bias
_MAIN_SLOTS = ((0, "x"), (7, "bias"), (8, "out"), (9, "ws"))
_REDUCE_SLOTS = ((0, "ws"), (1, "bias_or_ws"), (2, "out"))
# the integer-dot GEMV (kernels/gemv.py): x is quantized into a buffer first (x, xq, ...),
# which the main launch reads in x's place
_XQ_SLOTS = ((0, "x"), (1, "xq"))
_MAIN_XQ_SLOTS = ((0, "xq"), (7, "bias"), (8, "out"), (9, "ws"))


class _Launch:
    """One bound kernel launch: its argument values with the per-call slots left open."""
    __slots__ = ("launcher", "vals", "grid", "slots", "raw", "fixed", "keep")

    def __init__(self, launcher, args, grid, slots, has_bias: bool):
        self.launcher = launcher
        self.vals = launcher.values(args)
        pos = launcher.pos
        # (a bias slot without a bias keeps its bound dummy)
        self.slots = tuple((pos[i], src) for i, src in slots if src != "bias" or has_bias)
        for i, _ in self.slots:  # set per call: no reference kept to this call's tensors
            self.vals[i] = None
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.raw, self.fixed, self.keep = None, None, None
        direct = launcher.raw() if _raw_stream is not None else None
        if direct is not None:
            # The C launch function directly, every pointer as an integer: the weight's tensors
            # (kept alive here, and their versions checked per call) once, x / out / bias / the
            # workspace per call. This skips, per pointer, a data_ptr() call and a driver query.
            self.raw, self.fixed = direct
            self.keep = [v for v in self.vals if isinstance(v, torch.Tensor)]
            self.vals = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in self.vals]

    def __call__(self, t: dict, stream) -> None:
        vals = list(self.vals)
        if self.raw is not None:
            for i, src in self.slots:
                vals[i] = t[src].data_ptr()
            g = self.grid
            self.raw(g[0], g[1], g[2], stream, *self.fixed, *vals)
        else:
            for i, src in self.slots:
                vals[i] = t[src]
            self.launcher(self.grid, vals)


class _Bound:
    __slots__ = ("ver", "launches", "out_shape", "ws_shape", "xq_numel", "dtype", "device")


def _bind(qw, x: torch.Tensor, bias, rec) -> None:
    # post: the split-K reduction's (launcher, args, grid) when it is a launch of its own;
    # pre: the x quantization of the integer-dot GEMV (launcher, args, grid), or None
    launcher, args, grid, split_k, post, pre = rec
    b = _Bound()
    b.ver = _layout._versions(qw)
    b.launches = []
    b.xq_numel = 0
    if pre is not None:
        b.launches.append(_Launch(pre[0], pre[1], pre[2], _XQ_SLOTS, False))
        b.xq_numel = pre[1][1].numel()
    b.launches.append(_Launch(launcher, args, grid, _MAIN_XQ_SLOTS if pre is not None
                              else _MAIN_SLOTS, bias is not None))
    if post is not None:
        b.launches.append(_Launch(post[0], post[1], post[2], _REDUCE_SLOTS, bias is not None))
    N, K = qw.shape
    b.out_shape = (*x.shape[:-1], N)
    b.ws_shape = (split_k, x.numel() // K, N) if split_k > 1 else None
    b.dtype = x.dtype
    b.device = x.device
    calls = qw.cache.setdefault(_BOUND, {})
    if len(calls) >= MAX_BOUND:
        calls.clear()
    calls[_signature(x, bias)] = b


def fast_linear(x: torch.Tensor, qw, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The result of ``linear(x, qw, bias)`` through a bound launch (see above), or None when
    this call has none (the caller then takes the full path, which binds it for next time)."""
    cache = getattr(qw, "cache", None)
    calls = cache.get(_BOUND) if cache is not None else None
    if not calls:
        return None
    b = calls.get(_signature(x, bias))
    if b is None:
        return None
    if (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))) \
            or torch.compiler.is_compiling():
        return None
    if _launch_hooks_set() or b.ver != _layout._versions(qw):
        calls.clear()
        return None
    out = torch.empty(b.out_shape, dtype=b.dtype, device=b.device)
    # split K: a fresh float32 workspace; else the kernel's unused workspace argument is out
    ws = out if b.ws_shape is None else torch.empty(b.ws_shape, dtype=torch.float32,
                                                    device=b.device)
    t = {"x": x, "out": out, "ws": ws, "bias": bias, "bias_or_ws": bias if bias is not None else ws}
    if b.xq_numel:
        t["xq"] = torch.empty(b.xq_numel, dtype=torch.int32, device=b.device)
    stream = _raw_stream(b.device.index) if _raw_stream is not None else None
    for launch_ in b.launches:
        launch_(t, stream)
    BOUND_CALLS[0] += 1
    return out


def dequantize(qw, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] in ``dtype``, bit-exact against lowbit.reference.dequantize."""
    _require()
    qw.ensure_valid()
    return _dequant.dequantize(qw, dtype)
