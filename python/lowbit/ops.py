"""torch.library custom ops and the public functional API (linear, dequantize, quantize_weight).

The ops take the QuantizedWeight's tensors plus plain attributes, so torch.compile and CUDA
graphs see ordinary tensor ops with fake (meta) implementations. Each op routes by device:
CPU -> lowbit._C kernels; CUDA -> Triton kernels when present (lowbit.kernels), else
dequantize + torch matmul. Nothing above this module knows which kernel ran.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op schema inference needs
# the annotations of the op functions as real types, not strings.
from typing import Optional

import torch

from . import _backend
from . import formats as F
from . import reference
from .qweight import QuantizedWeight

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- device routing -----------------------------------------------------------------------
def _gpu_kernels():
    """lowbit.kernels (Triton) if importable on this machine, else None (found once)."""
    if _GPU:
        return _GPU[0]
    try:
        from . import kernels  # noqa: F401
    except ImportError:
        return None
    except AttributeError as e:  # a Triton too old for the kernels (e.g. torch 2.4's Triton 3.0)
        global _GPU_WARNED
        if not _GPU_WARNED:
            _GPU_WARNED = True
            import warnings
            warnings.warn(f"lowbit.kernels cannot run with this Triton ({e}); GPU calls use "
                          "dequantize + torch matmul (upgrade triton for the fused kernels)",
                          RuntimeWarning, stacklevel=2)
        return None
    if not getattr(kernels, "AVAILABLE", False):
        return None
    _GPU.append(kernels)
    return kernels


_GPU_WARNED = False
_GPU: list = []  # lowbit.kernels once found usable (_gpu_kernels' memo)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not tensor subclasses (fake, distributed, ...)


def _linear_impl(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    N, K = qw.shape
    if x.is_cpu:
        # (a small layer's kernel takes microseconds: no reshape or conversion that is not needed)
        two_d = x.dim() == 2
        x2d = x if two_d else x.reshape(-1, K)
        out = x2d.new_empty(x2d.shape[0], N)  # x's dtype, on the CPU (the quickest allocation)
        b = None if bias is None else bias.to(torch.float32).contiguous()
        _backend.linear(x2d, qw, b, out)
        return out if two_d else out.reshape(*x.shape[:-1], N)
    kernels = _gpu_kernels() if x.device.type == "cuda" else None
    if kernels is not None:
        return kernels.linear(x, qw, bias)
    # Other devices: dequantize in the activation dtype, then the device's own matmul.
    w = reference.decode(qw, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _dequantize_impl(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    if qw.device.type == "cpu":
        return _backend.dequantize(qw, dtype)
    kernels = _gpu_kernels() if qw.device.type == "cuda" else None
    if kernels is not None:
        return kernels.dequantize(qw, dtype)
    return reference.decode(qw, dtype)


def _qw_from(data, scales, zeros, dq_scale, dq_offset, fmt, in_features, group_size, symmetric):
    # zero_point="float" is the one variant whose zeros are float32 (QuantizedWeight).
    # Validated: the ops are public (torch.ops.lowbit.*) and the kernels trust the layout.
    zp = "float" if zeros is not None and zeros.dtype == torch.float32 else "int"
    return QuantizedWeight(fmt, (data.shape[0], in_features), data, scales, zeros,
                           group_size=group_size, symmetric=symmetric,
                           double_quant=dq_scale is not None, dq_scale=dq_scale,
                           dq_offset=dq_offset, zero_point=zp, validate=True)


# ---- custom ops ---------------------------------------------------------------------------
@torch.library.custom_op("lowbit::linear", mutates_args=())
def linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
              zeros: Optional[torch.Tensor], dq_scale: Optional[torch.Tensor],
              dq_offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
              in_features: int, group_size: int, symmetric: bool) -> torch.Tensor:
    qw = _qw_from(data, scales, zeros, dq_scale, dq_offset, fmt, in_features, group_size, symmetric)
    return _linear_impl(x, qw, bias)


@linear_op.register_fake
def _(x, data, scales, zeros, dq_scale, dq_offset, bias, fmt, in_features, group_size, symmetric):
    return x.new_empty((*x.shape[:-1], data.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, data, scales, zeros, dq_scale, dq_offset, bias, fmt, in_features, group_size, symmetric = inputs
    ctx.save_for_backward(data, scales, zeros, dq_scale, dq_offset)
    ctx.meta = (fmt, in_features, group_size, symmetric)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    # The weight is frozen (quantized); gradients flow to x and bias, as in QLoRA.
    data, scales, zeros, dq_scale, dq_offset = ctx.saved_tensors
    w = dequantize_op(data, scales, zeros, dq_scale, dq_offset, *ctx.meta, grad.dtype)
    gx = grad @ w
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, None, None, None, None, None, gb, None, None, None, None


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize_op(data: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                  dq_scale: Optional[torch.Tensor], dq_offset: Optional[torch.Tensor], fmt: str,
                  in_features: int, group_size: int, symmetric: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    qw = _qw_from(data, scales, zeros, dq_scale, dq_offset, fmt, in_features, group_size, symmetric)
    return _dequantize_impl(qw, dtype)


@dequantize_op.register_fake
def _(data, scales, zeros, dq_scale, dq_offset, fmt, in_features, group_size, symmetric, dtype):
    return data.new_empty((data.shape[0], in_features), dtype=dtype)


def _op_args(qw: QuantizedWeight):
    return (qw.data, qw.scales, qw.zeros, qw.dq_scale, qw.dq_offset)


def _op_attrs(qw: QuantizedWeight):
    return (qw.fmt, qw.shape[1], qw.group_size, qw.symmetric)


# ---- public API ---------------------------------------------------------------------------
def _plain_f32_bias(bias, N: int) -> bool:
    """Whether ``bias`` can go to the kernels as it is: a plain float32 CPU tensor [N],
    contiguous, not needing grad (anything else takes the checked path)."""
    return (type(bias) in _PLAIN and bias.dtype is torch.float32 and not bias.requires_grad
            and bias.is_cpu and bias.dim() == 1 and bias.shape[0] == N and bias.is_contiguous()
            and not bias.is_neg())


def _check_qw(qw) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"expected a lowbit.QuantizedWeight, got {type(qw).__name__}")


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W stored as ``qw``: x is [..., K] (float32, bfloat16 or
    float16), the result [..., N] in x's dtype, accumulated in float32."""
    if type(x) in _PLAIN:
        if x.is_cpu:
            if (not torch.compiler.is_compiling() and not torch._C._get_tracing_state()
                    and type(qw) is QuantizedWeight and "plain_cpu" in qw.cache and not x.requires_grad
                    and (bias is None or _plain_f32_bias(bias, qw.shape[0]))):
                # The common eager CPU call (a decoding step calls every layer once per token): a
                # validated CPU weight with no input transform (qw.cache's "plain_cpu" stamp), x
                # on the CPU, no bias or a plain float32 one, nothing to record: the checks below
                # in their cheapest form (issue 3: the call within 2x of the kernel).
                shape = x.shape
                N, K = qw.shape
                dt = _backend.DTYPE_IDS.get(x.dtype)  # (None: not float32, bfloat16 or float16)
                if (dt is not None and len(shape) >= 2 and shape[-1] == K and x.is_contiguous()
                        and not x.is_neg()):
                    if len(shape) == 2:
                        M, out = shape[0], x.new_empty(shape[0], N)
                    else:
                        M, out = x.numel() // K, x.new_empty(*shape[:-1], N)  # (varargs: ~1 us less)
                    # (x and the fresh out are contiguous: rows K and N elements apart)
                    return _backend.linear_rows(x, dt, M, K, qw, bias, out, dt, N)
        elif x.is_cuda:
            if (bias is None or type(bias) in _PLAIN) and not torch.compiler.is_compiling():
                # a call with the signature of an earlier checked one: its bound launch
                # (lowbit.kernels)
                k = _gpu_kernels()
                if k is not None:
                    y = k.fast_linear(x, qw, bias)
                    if y is not None:
                        return y
    _check_qw(qw)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (traced: the op validates its tensors at run time)
        qw.ensure_valid()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    N, K = qw.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must equal in_features={K}, got shape {tuple(x.shape)}")
    if not (x.is_cpu and qw.data.is_cpu) and x.device != qw.device:  # (is_cpu: no device object)
        raise ValueError(f"x is on {x.device} but the weight is on {qw.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise TypeError("bias must be a float32, bfloat16 or float16 tensor")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if not compiling:  # (compiled graphs materialise their inputs)
        if x.is_neg():  # a lazily negated view (e.g. .conj().imag): the kernels read raw memory
            x = x.resolve_neg()
        if bias is not None and bias.is_neg():
            bias = bias.resolve_neg()
    if qw.has_input_transform:
        # (x / input_scale)[..., perm] as ordinary torch ops (autograd and torch.compile see
        # them); the kernels then multiply the stored weight. The division is float32; on the
        # CPU the kernels take the float32 result, elsewhere it goes back to x's dtype.
        out_dtype = x.dtype
        xt = qw.transform_input(x)
        if x.device.type != "cpu":
            xt = xt.to(out_dtype)
        return _linear_dispatch(xt, qw, bias, compiling).to(out_dtype)
    return _linear_dispatch(x, qw, bias, compiling)


def _linear_dispatch(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor],
                     compiling: bool) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad or compiling or torch.jit.is_tracing():
        # (torch.jit.trace records only ops it sees: the custom op, not the kernel call)
        return linear_op(x, *_op_args(qw), bias, *_op_attrs(qw))
    # Eager fast path: the op's own body without the dispatcher round trip.
    return _linear_impl(x, qw, bias)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] in ``dtype`` (float32, bfloat16 or float16); bit-exact against
    :func:`lowbit.reference.dequantize`."""
    _check_qw(qw)
    if not torch.compiler.is_compiling():
        qw.ensure_valid()
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if qw.has_input_transform:
        return qw.to_input_order(_decode(qw, torch.float32)).to(dtype)
    return _decode(qw, dtype)


def _decode(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight (input transforms ignored), by the device's kernels."""
    if torch.compiler.is_compiling():
        return dequantize_op(*_op_args(qw), *_op_attrs(qw), dtype)
    return _dequantize_impl(qw, dtype)


# Peak temporary memory of one quantization chunk (nf4's nearest-code search holds 16 floats
# per weight), so a large layer never needs more than this on top of its own size.
_QUANT_CHUNK_BYTES = 256 << 20


def _quantize_codebook_cpu(w: torch.Tensor, fmt: str, *, group_size: Optional[int] = None,
                           symmetric: Optional[bool] = None, double_quant: bool = False,
                           zero_point: Optional[str] = None) -> QuantizedWeight:
    """reference.quantize_weight for nf4 / fp4 on the CPU (quantize_weight has checked the
    options) with the code search in C++ (_C.codebook_codes: the same float32 division by the
    block's absmax and distances to the codebook, the lowest code on a tie; 0.22 s for a
    4096 x 4096 weight's codes against ~1.1 s), the scales by reference.codebook_scales. Equal
    to the reference bit for bit (tests/test_reference.py)."""
    spec = F.get_format(fmt)
    gs = F.check_group_size(spec, group_size)
    w32 = w.detach().to(torch.float32).contiguous()
    reference._check_finite(w32)
    N, K = w32.shape
    group = F.effective_group(gs, K)
    absmax, scales, dq_scale, dq_offset = reference.codebook_scales(reference.to_groups(w32, group), double_quant)
    absmax = absmax.contiguous()
    table = reference.CODEBOOK_TABLES[spec.name].contiguous()
    packed = torch.empty(N, (K + 1) // 2, dtype=torch.uint8)
    _backend.ext().codebook_codes(w32.data_ptr(), N, K, K, group, absmax.data_ptr(), table.data_ptr(),
                                  packed.data_ptr(), packed.shape[1], _backend.num_threads())
    return QuantizedWeight(spec.name, (N, K), packed, scales, group_size=gs, double_quant=double_quant,
                           dq_scale=dq_scale, dq_offset=dq_offset)


def quantize_weight(w: torch.Tensor, fmt: str = "int4", *, group_size: Optional[int] = None,
                    symmetric: Optional[bool] = None, double_quant: bool = False,
                    zero_point: Optional[str] = None) -> QuantizedWeight:
    """Quantize a float weight ``[out_features, in_features]`` into ``fmt`` on w's device.

    Options: ``group_size`` (int4 default 128, nf4 / fp4 block default 64, int8 default -1;
    -1 = one group per row), ``symmetric`` (int4 default False, int8 default True; nf4 / fp4
    are always symmetric), ``zero_point`` (asymmetric weights: "int", the default, an integer
    zero-point per group; "float", int4 only, a float32 offset per group: w = q * s + m, the
    GGUF Q4_1 / Q4_K form), ``double_quant`` (nf4 / fp4). Formats and formulas:
    :mod:`lowbit.formats`. Raises ValueError on NaN/Inf in w (after its conversion to
    float32) and, for the asymmetric variants, when a group's range max - min overflows float32
    (|w| near 3.4e38) instead of storing an infinite scale. Same result as
    :func:`lowbit.reference.quantize_weight`, computed in row chunks to bound memory.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    if w.is_meta:
        raise ValueError("w is on the meta device (shape only, no values): load or initialise "
                         "the weights before quantizing them")
    spec = F.get_format(fmt)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if double_quant and not spec.has_codebook:
        raise ValueError(f"double_quant applies to the codebook formats (nf4, fp4), not {spec.name}")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise TypeError("symmetric must be a bool or None")
    reference.resolve_options(spec, symmetric, zero_point)  # raises on a bad combination
    F.check_group_size(spec, group_size)
    N, K = w.shape
    opts = dict(group_size=group_size, symmetric=symmetric, double_quant=double_quant,
                zero_point=zero_point)
    rows = max(1, _QUANT_CHUNK_BYTES // (K * 4 * 20))
    quant = reference.quantize_weight
    if spec.has_codebook and w.device.type == "cpu" and _backend._C is not None:
        quant = _quantize_codebook_cpu
    if rows >= N:
        return quant(w, spec.name, **opts)
    parts = [quant(w[i:i + rows], spec.name, **opts) for i in range(0, N, rows)]
    first = parts[0]

    def cat(name):
        return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

    return QuantizedWeight(spec.name, (N, K), cat("data"), cat("scales"), cat("zeros"),
                           group_size=first.group_size, symmetric=first.symmetric,
                           double_quant=first.double_quant, dq_scale=cat("dq_scale"),
                           dq_offset=cat("dq_offset"), zero_point=first.zero_point)
