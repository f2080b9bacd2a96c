"""The reference implementation: plain, readable PyTorch. This module is the spec.

Every kernel (C++ per ISA, Triton) is tested against these functions: dequantization
bit-exact, matmul within a named tolerance. Nothing here is optimised, and nothing here calls
a kernel. Formulas and layouts are documented on the registry rows in :mod:`lowbit.formats`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import formats as F
from .qweight import QuantizedWeight

NF4_TABLE = torch.tensor(F.NF4_CODEBOOK, dtype=torch.float32)


# ---- packing ------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> uint8 [N, ceil(K/2)]; element 2j low nibble, 2j+1 high."""
    N, K = codes.shape
    if K % 2:
        codes = torch.cat([codes, codes.new_zeros(N, 1)], dim=1)
    low, high = codes[:, 0::2], codes[:, 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 codes [N, K] (inverse of pack_nibbles)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :K]


# ---- groups -------------------------------------------------------------------------------
def to_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, n_groups, group], zero-padding the ragged last group.

    Zero padding never changes a group's absmax, nor min(.,0) / max(.,0), which is all the
    quantizers look at.
    """
    N, K = w.shape
    G = -(-K // group)
    w = torch.nn.functional.pad(w, (0, G * group - K))
    return w.reshape(N, G, group)


def per_element(t: torch.Tensor, group: int, K: int) -> torch.Tensor:
    """Per-group values [N, G] -> per-element [N, K] (each repeated over its group)."""
    return t.repeat_interleave(group, dim=1)[:, :K]


def _check_finite(w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; lowbit refuses to quantize non-finite values")


def _safe(s: torch.Tensor) -> torch.Tensor:
    """Divisor for a scale that may be 0 (an all-zero group): any nonzero value decodes to 0."""
    return torch.where(s == 0, torch.ones_like(s), s)


# ---- quantizers ---------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = absmax / 127
    q = torch.clamp(torch.round(w / _safe(scale)), -127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool):
    N, K = w.shape
    g = to_groups(w, group)
    if symmetric:
        scale = g.abs().amax(dim=2) / 7
        q = torch.clamp(torch.round(g / _safe(scale)[..., None]), -8, 7) + F.INT4_SYMMETRIC_ZERO
        zero = None
    else:
        lo = torch.clamp(g.amin(dim=2), max=0)
        hi = torch.clamp(g.amax(dim=2), min=0)
        scale = (hi - lo) / 15
        zero = torch.clamp(torch.round(-lo / _safe(scale)), 0, 15)
        q = torch.clamp(torch.round(g / _safe(scale)[..., None]) + zero[..., None], 0, 15)
        zero = zero.to(torch.uint8)
    codes = q.reshape(N, -1)[:, :K].to(torch.uint8)
    return pack_nibbles(codes), scale, zero


def double_quantize_absmax(absmax: torch.Tensor):
    """absmax float32 [N, G] -> (codes uint8 [N, G], step [N, C], lo [N, C]), C = ceil(G/256)."""
    N, G = absmax.shape
    chunk = F.NF4_DOUBLE_QUANT_CHUNK
    C = -(-G // chunk)
    padded = torch.nn.functional.pad(absmax, (0, C * chunk - G), value=float("nan"))
    chunks = padded.reshape(N, C, chunk)
    lo = torch.nan_to_num(chunks, nan=float("inf")).amin(dim=2)
    hi = torch.nan_to_num(chunks, nan=float("-inf")).amax(dim=2)
    step = (hi - lo) / 255
    c = torch.round((absmax - per_element(lo, chunk, G)) / per_element(_safe(step), chunk, G))
    codes = torch.clamp(c, 0, 255).to(torch.uint8)
    return codes, step, lo


def decode_double_quant(codes: torch.Tensor, step: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """absmax' = float(c) * step + lo, two float32 roundings (the kernels do the same)."""
    G = codes.shape[1]
    chunk = F.NF4_DOUBLE_QUANT_CHUNK
    t = codes.to(torch.float32) * per_element(step, chunk, G)
    return t + per_element(lo, chunk, G)


def nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 codebook value (the first one on a tie)."""
    table = NF4_TABLE.to(scaled.device)
    return (scaled[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, block: int, double_quant: bool):
    N, K = w.shape
    g = to_groups(w, block)
    absmax = g.abs().amax(dim=2)
    dq_scale = dq_offset = None
    if double_quant:
        codes_a, dq_scale, dq_offset = double_quantize_absmax(absmax)
        absmax = decode_double_quant(codes_a, dq_scale, dq_offset)  # quantize against what is stored
    q = nearest_nf4(g / _safe(absmax)[..., None])
    packed = pack_nibbles(q.reshape(N, -1)[:, :K])
    scales = codes_a if double_quant else absmax
    return packed, scales, dq_scale, dq_offset


def quantize_weight(w: torch.Tensor, fmt: str = "int4", *, group_size: Optional[int] = None,
                    symmetric: Optional[bool] = None, double_quant: bool = False) -> QuantizedWeight:
    """Quantize a float weight [N, K] (computed in float32 on w's device)."""
    spec = F.get_format(fmt)
    group_size = F.check_group_size(spec, group_size)
    if symmetric is None:
        symmetric = spec.name != "int4"
    w = w.detach().to(torch.float32)
    _check_finite(w)
    N, K = w.shape
    group = F.effective_group(group_size, K)
    if spec.name == "int8":
        q, scale = quantize_int8(w)
        return QuantizedWeight("int8", (N, K), q, scale, group_size=-1)
    if spec.name == "int4":
        packed, scale, zero = quantize_int4(w, group, symmetric)
        return QuantizedWeight("int4", (N, K), packed, scale, zero, group_size=group_size,
                               symmetric=symmetric)
    packed, scales, dq_scale, dq_offset = quantize_nf4(w, group, double_quant)
    return QuantizedWeight("nf4", (N, K), packed, scales, group_size=group_size,
                           double_quant=double_quant, dq_scale=dq_scale, dq_offset=dq_offset)


# ---- decode -------------------------------------------------------------------------------
def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] a QuantizedWeight stands for, in input-feature order (float32
    math, then cast): the stored codes decoded (:func:`decode`), then the input transforms
    undone (QuantizedWeight.to_input_order)."""
    if not qw.has_input_transform:
        return decode(qw, dtype)
    return qw.to_input_order(decode(qw, torch.float32)).to(dtype)


def decode(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored weight [N, K] (columns in stored order, input transforms ignored)."""
    N, K = qw.shape
    group = F.effective_group(qw.group_size, K)
    if qw.fmt == "int8":
        w = qw.data.to(torch.float32) * qw.scales
        return w.to(dtype)
    codes = unpack_nibbles(qw.data, K)
    if qw.fmt == "int4":
        zero = torch.full_like(qw.scales, F.INT4_SYMMETRIC_ZERO, dtype=torch.int32) if qw.symmetric \
            else qw.zeros.to(torch.int32)
        q = codes.to(torch.int32) - per_element(zero, group, K)
        w = q.to(torch.float32) * per_element(qw.scales, group, K)
        return w.to(dtype)
    absmax = decode_double_quant(qw.scales, qw.dq_scale, qw.dq_offset) if qw.double_quant else qw.scales
    values = NF4_TABLE.to(codes.device)[codes.long()]
    w = values * per_element(absmax, group, K)
    return w.to(dtype)


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, dequantize(qw), bias) computed in float32, returned in x's dtype."""
    w = dequantize(qw, torch.float32)  # input transforms included
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)
