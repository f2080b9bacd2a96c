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
# The codebook of each codebook format, float32 in code order (fp4's code 8 is -0.0).
CODEBOOK_TABLES = {name: torch.tensor(cb, dtype=torch.float32) for name, cb in F.CODEBOOKS.items()}


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


def _check_range(scale: torch.Tensor, what: str) -> torch.Tensor:
    """An asymmetric scale (max - min) / levels overflows float32 when a group spans more than
    3.4e38: refuse it rather than store an infinite scale that decodes to NaN."""
    if not torch.isfinite(scale).all():
        raise ValueError(f"{what}: a group's range max(w) - min(w) overflows float32 (|w| near "
                         "3.4e38); rescale the weight or use a symmetric variant")
    return scale


def _safe(s: torch.Tensor) -> torch.Tensor:
    """Divisor for a scale that may be 0 (an all-zero group): any nonzero value decodes to 0."""
    return torch.where(s == 0, torch.ones_like(s), s)


# ---- quantizers ---------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, group: Optional[int] = None, symmetric: bool = True):
    """-> (q int8 [N, K], scale [N, G], zero int16 [N, G] or None); group None = the row."""
    N, K = w.shape
    g = to_groups(w, K if group is None else group)
    if symmetric:
        scale = g.abs().amax(dim=2) / 127
        q = torch.clamp(torch.round(g / _safe(scale)[..., None]), -127, 127)
        zero = None
    else:
        lo = torch.clamp(g.amin(dim=2), max=0)
        hi = torch.clamp(g.amax(dim=2), min=0)
        scale = _check_range((hi - lo) / 255, "asymmetric int8")
        zu = torch.clamp(torch.round(-lo / _safe(scale)), 0, 255)
        qu = torch.clamp(torch.round(g / _safe(scale)[..., None]) + zu[..., None], 0, 255)
        q = qu - 128  # unsigned codes 0..255 stored as signed bytes
        zero = (zu - 128).to(torch.int16)
    q = q.reshape(N, -1)[:, :K].to(torch.int8)
    return q, scale, zero


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
        scale = _check_range((hi - lo) / 15, "asymmetric int4")
        zero = torch.clamp(torch.round(-lo / _safe(scale)), 0, 15)
        q = torch.clamp(torch.round(g / _safe(scale)[..., None]) + zero[..., None], 0, 15)
        zero = zero.to(torch.uint8)
    codes = q.reshape(N, -1)[:, :K].to(torch.uint8)
    return pack_nibbles(codes), scale, zero


def quantize_int4_offset(w: torch.Tensor, group: int):
    """int4 with a float offset per group (zero_point="float"): min/max over the group (the
    ragged last group's padding excluded), s = (hi - lo) / 15, m = lo,
    q = clamp(round((w - m) / s), 0, 15) -> (packed, scale, offset)."""
    N, K = w.shape
    G = -(-K // group)
    padded = torch.nn.functional.pad(w, (0, G * group - K), value=float("nan")).reshape(N, G, group)
    lo = torch.nan_to_num(padded, nan=float("inf")).amin(dim=2)
    hi = torch.nan_to_num(padded, nan=float("-inf")).amax(dim=2)
    scale = _check_range((hi - lo) / 15, "int4 with float zero-points")
    g = to_groups(w, group)
    q = torch.clamp(torch.round((g - lo[..., None]) / _safe(scale)[..., None]), 0, 15)
    codes = q.reshape(N, -1)[:, :K].to(torch.uint8)
    return pack_nibbles(codes), scale, lo


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


def nearest_code(scaled: torch.Tensor, fmt: str = "nf4") -> torch.Tensor:
    """Index of the nearest value of ``fmt``'s codebook (the first one on a tie): the argmin
    over the codebook of ``|scaled - value|`` computed in float32,
    ``(scaled[..., None] - table).abs().argmin(-1)``.

    Computed without the [..., 16] distance tensor: a binary search in the sorted codebook
    finds the two neighbouring values, and the same float32 distances to those two decide
    (the lower code index on a tie; equal values, fp4's +0 and -0, count as their lowest
    index). Only a neighbour can be nearest, and the codes are at least 0.005 apart, so no
    other code can tie after rounding while |scaled| <= 2 (what quantizing w / absmax gives);
    larger or non-finite values take the full argmin. tests/test_reference.py checks the two
    against each other on the midpoints, their neighbouring floats and random values."""
    table = CODEBOOK_TABLES[fmt].to(scaled.device)
    vals, first = _sorted_codebook(fmt, scaled.device)
    v = scaled.to(torch.float32)
    p = torch.searchsorted(vals, v.contiguous())
    last = vals.numel() - 1
    lo = (p - 1).clamp(0, last)
    hi = p.clamp(max=last)
    dlo = (v - vals[lo]).abs()
    dhi = (v - vals[hi]).abs()
    ilo, ihi = first[lo], first[hi]
    idx = torch.where((dhi < dlo) | ((dhi == dlo) & (ihi < ilo)), ihi, ilo)
    far = ~(v.abs() <= 2.0)  # (NaN included)
    if bool(far.any()):
        idx[far] = (v[far][..., None] - table).abs().argmin(dim=-1)
    return idx.to(torch.uint8)


_SORTED_CODEBOOKS: dict = {}


def _sorted_codebook(fmt: str, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the codebook's distinct values ascending, the lowest code index of each)."""
    key = (fmt, str(device))
    hit = _SORTED_CODEBOOKS.get(key)
    if hit is None:
        pairs = sorted((float(v), i) for i, v in enumerate(CODEBOOK_TABLES[fmt].tolist()))
        vals, first = [], []
        for v, i in pairs:
            if vals and v == vals[-1]:
                first[-1] = min(first[-1], i)
            else:
                vals.append(v)
                first.append(i)
        hit = (torch.tensor(vals, dtype=torch.float32, device=device),
               torch.tensor(first, dtype=torch.int64, device=device))
        _SORTED_CODEBOOKS[key] = hit
    return hit


def nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 codebook value (the first one on a tie)."""
    return nearest_code(scaled, "nf4")


def codebook_scales(g: torch.Tensor, double_quant: bool):
    """nf4 / fp4's per-block scales of the blocks g [N, G, block] (to_groups): (the absmax the
    codes are searched against [N, G], the stored scales, dq_scale, dq_offset). With double
    quantization the codes are searched against the decoded absmax (what is stored) and the
    stored scales are its codes."""
    absmax = g.abs().amax(dim=2)
    if not double_quant:
        return absmax, absmax, None, None
    codes_a, dq_scale, dq_offset = double_quantize_absmax(absmax)
    return decode_double_quant(codes_a, dq_scale, dq_offset), codes_a, dq_scale, dq_offset


def quantize_codebook(w: torch.Tensor, block: int, double_quant: bool, fmt: str = "nf4"):
    """nf4 / fp4: block absmax (optionally double-quantized) and the nearest codebook index."""
    N, K = w.shape
    g = to_groups(w, block)
    absmax, scales, dq_scale, dq_offset = codebook_scales(g, double_quant)
    q = nearest_code(g / _safe(absmax)[..., None], fmt)
    packed = pack_nibbles(q.reshape(N, -1)[:, :K])
    return packed, scales, dq_scale, dq_offset


def quantize_nf4(w: torch.Tensor, block: int, double_quant: bool):
    return quantize_codebook(w, block, double_quant, "nf4")


def resolve_options(spec: F.FormatSpec, symmetric: Optional[bool],
                    zero_point: Optional[str]) -> Tuple[bool, str]:
    """(symmetric, zero_point) from quantize_weight's options: int4 defaults to asymmetric with
    an integer zero-point, everything else to symmetric; zero_point="float" implies asymmetric."""
    if zero_point is not None and zero_point not in F.ZERO_POINTS:
        raise ValueError(f"zero_point must be one of {F.ZERO_POINTS} or None, got {zero_point!r}")
    if zero_point == "float" and not spec.has_float_offset:
        raise ValueError(f"zero_point='float' (a float offset per group) applies to int4 only, not {spec.name}")
    if zero_point == "float" and symmetric:
        raise ValueError("zero_point='float' is an asymmetric variant: symmetric must be False or None")
    if symmetric is None:
        symmetric = spec.name != "int4" and zero_point is None
    if not symmetric and not spec.has_zero_point:
        raise ValueError(f"{spec.name} is always symmetric")
    if symmetric and zero_point is not None:
        raise ValueError("zero_point applies to asymmetric weights (symmetric=False)")
    return symmetric, zero_point or "int"


def quantize_weight(w: torch.Tensor, fmt: str = "int4", *, group_size: Optional[int] = None,
                    symmetric: Optional[bool] = None, double_quant: bool = False,
                    zero_point: Optional[str] = None) -> QuantizedWeight:
    """Quantize a float weight [N, K] (computed in float32 on w's device)."""
    spec = F.get_format(fmt)
    group_size = F.check_group_size(spec, group_size)
    symmetric, zero_point = resolve_options(spec, symmetric, zero_point)
    if double_quant and not spec.has_codebook:
        raise ValueError(f"double_quant applies to the codebook formats (nf4, fp4), not {spec.name}")
    # contiguous: elementwise results follow w's memory layout, and a transposed w would give
    # codes the kernels cannot take
    w = w.detach().to(torch.float32).contiguous()
    _check_finite(w)
    N, K = w.shape
    group = F.effective_group(group_size, K)
    if spec.name == "int8":
        q, scale, zero = quantize_int8(w, group, symmetric)
        return QuantizedWeight("int8", (N, K), q, scale, zero, group_size=group_size,
                               symmetric=symmetric)
    if spec.name == "int4":
        if zero_point == "float":
            packed, scale, offset = quantize_int4_offset(w, group)
            return QuantizedWeight("int4", (N, K), packed, scale, offset, group_size=group_size,
                                   symmetric=False, zero_point="float")
        packed, scale, zero = quantize_int4(w, group, symmetric)
        return QuantizedWeight("int4", (N, K), packed, scale, zero, group_size=group_size,
                               symmetric=symmetric)
    packed, scales, dq_scale, dq_offset = quantize_codebook(w, group, double_quant, spec.name)
    return QuantizedWeight(spec.name, (N, K), packed, scales, group_size=group_size,
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
        q = qw.data.to(torch.int32)
        if not qw.symmetric:
            q = q - per_element(qw.zeros.to(torch.int32), group, K)
        w = q.to(torch.float32) * per_element(qw.scales, group, K)
        return w.to(dtype)
    codes = unpack_nibbles(qw.data, K)
    if qw.fmt == "int4":
        if qw.zero_point == "float":  # w = q * s + m: two roundings, multiply then add
            t = codes.to(torch.float32) * per_element(qw.scales, group, K)
            return (t + per_element(qw.zeros, group, K)).to(dtype)
        zero = torch.full_like(qw.scales, F.INT4_SYMMETRIC_ZERO, dtype=torch.int32) if qw.symmetric \
            else qw.zeros.to(torch.int32)
        q = codes.to(torch.int32) - per_element(zero, group, K)
        w = q.to(torch.float32) * per_element(qw.scales, group, K)
        return w.to(dtype)
    absmax = decode_double_quant(qw.scales, qw.dq_scale, qw.dq_offset) if qw.double_quant else qw.scales
    values = CODEBOOK_TABLES[qw.fmt].to(codes.device)[codes.long()]
    w = values * per_element(absmax, group, K)
    return w.to(dtype)


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, dequantize(qw), bias) computed in float32, returned in x's dtype."""
    w = dequantize(qw, torch.float32)  # input transforms included
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)
