"""Tolerances for comparing a kernel's matmul with :func:`lowbit.reference.linear`.

Dequantization must be bit-exact (``torch.equal``); a matmul can't be, because kernels sum in a
different order (SIMD lanes, K tiles, threads) and may fold the scale into the sum. The bound
used here is the textbook forward-error bound of a float32 dot product, made elementwise so it
holds for outputs of very different sizes, plus the rounding of the output dtype::

    tol[m, n] = acc_rtol * mag[m, n] + out_eps * (|expected[m, n]| + acc_rtol * mag[m, n]) + floor

    mag[m, n] = sum_k |x[m, k]| * |W[n, k]| + |bias[n]|     (computed in float64)

* ``acc_rtol`` (accumulation): summing K float32 products in any order has an error of at most
  ``gamma_K = K * u * |..|`` with ``u = 2**-24`` for a sequential sum, measured against the sum of
  absolute terms ``mag`` (the condition number of a dot product). Kernels split K over 8 or 16
  SIMD lanes and blocks, so their worst case is about ``K / 8 * u``, and the rounding errors are
  random in practice (growth ~ sqrt(K) * u). We use ``acc_rtol = 8 * sqrt(K) * u`` with a floor of
  ``64 * u``: that is K/8 * u at K = 4096, and it also absorbs the few ulps per product that
  differ when a kernel computes ``s * sum((q - z) * x)`` per group, or uses FMA, instead of the
  reference's ``sum(((q - z) * s) * x)``. The reference itself is computed by torch's own
  blocked GEMM, whose error is inside the same bound. Relative to |y| this is loose for
  cancelling sums and tight (a few ulps) for same-sign ones, which is what we want: it flags a
  wrong scale, zero-point, nibble order or group index (errors of order |x| |w|), never
  summation order.
* ``out_eps`` (output rounding): for bfloat16 / float16 results both sides round a float32 sum
  to the output dtype; two float32 values a hair apart can round to neighbouring values, one
  ulp apart. One ulp is at most ``eps * |y|`` with eps = 2**-7 (bf16, 8 significant bits) or
  2**-10 (f16, 11 bits), i.e. twice the unit roundoff (2**-8, 2**-11). float32 output: 0 (its
  rounding is part of the accumulation term).
* ``floor``: the output dtype's smallest subnormal, so values that underflow compare equal.

A kernel that rounds activations or decoded weights to 16 bits before multiplying (e.g. bf16
dot-product instructions) needs a larger ``acc_rtol``; pass ``rtol=`` explicitly and say why
where it is used. Inputs are activations in float32 / bfloat16 / float16; the comparison is done
in float32 (float64 for ``mag``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

UNIT_ROUNDOFF_F32 = 2.0 ** -24


def accumulation_rtol(K: int) -> float:
    """Relative (to sum |x||w|) error allowed for a length-K float32 dot product."""
    return max(64.0, 8.0 * math.sqrt(K)) * UNIT_ROUNDOFF_F32


def output_eps(dtype: torch.dtype) -> float:
    """One ulp of the output dtype relative to the value (0 for float32, see module docstring)."""
    if dtype == torch.float32:
        return 0.0
    return float(torch.finfo(dtype).eps)


def _weight_f32(qw) -> torch.Tensor:
    from . import reference
    from .qweight import QuantizedWeight
    if isinstance(qw, QuantizedWeight):
        return reference.dequantize(qw, torch.float32)
    return qw.detach().to(torch.float32)


def linear_tolerance(x: torch.Tensor, qw, expected: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                     rtol: Optional[float] = None) -> torch.Tensor:
    """Elementwise absolute tolerance (float32, shape ``[..., N]``) for ``linear(x, qw, bias)``.

    ``qw`` is a :class:`lowbit.QuantizedWeight` (decoded with the reference) or a float weight
    ``[N, K]``. ``expected`` is the reference output (needed for the bf16/f16 output-rounding
    term; if omitted, ``mag`` stands in for |expected|, which is looser). ``out_dtype`` defaults to
    ``expected.dtype`` or ``x.dtype``. ``rtol`` overrides the accumulation term
    (:func:`accumulation_rtol`). See the module docstring for the reasoning.
    """
    w = _weight_f32(qw).to(torch.float64)
    K = w.shape[1]
    mag = x.detach().to(torch.float64).abs() @ w.abs().T
    if bias is not None:
        mag = mag + bias.detach().to(torch.float64).abs()
    if out_dtype is None:
        out_dtype = expected.dtype if expected is not None else x.dtype
    acc = (accumulation_rtol(K) if rtol is None else float(rtol)) * mag
    eps = output_eps(out_dtype)
    ref_mag = expected.detach().to(torch.float64).abs() if expected is not None else mag
    floor = float(torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps)
    tol = acc + eps * (ref_mag + acc) + floor
    return tol.to(torch.float32)


def linear_mismatch(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, qw,
                    bias: Optional[torch.Tensor] = None, rtol: Optional[float] = None,
                    tol: Optional[torch.Tensor] = None) -> dict:
    """How far ``actual`` is from ``expected`` in units of the tolerance.

    ``tol`` (optional) is a precomputed :func:`linear_tolerance` for these inputs, to reuse it
    across several kernels; ``x``, ``qw``, ``bias`` and ``rtol`` are then not looked at.
    Returns ``{"ok", "worst_ratio", "index", "actual", "expected", "tol", "n_bad"}``; ``ok`` is
    True when every element is within tolerance (``worst_ratio <= 1``) and nothing is NaN.
    """
    if actual.shape != expected.shape:
        return {"ok": False, "worst_ratio": math.inf, "index": None, "n_bad": -1,
                "reason": f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"}
    if actual.dtype != expected.dtype:
        return {"ok": False, "worst_ratio": math.inf, "index": None, "n_bad": -1,
                "reason": f"dtype {actual.dtype} != expected {expected.dtype}"}
    if tol is None:
        tol = linear_tolerance(x, qw, expected=expected, bias=bias, out_dtype=expected.dtype, rtol=rtol)
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    err = (a - e).abs()
    # Equal infinities (f16 overflow on both sides) are a match; NaN never is.
    err = torch.where(a == e, torch.zeros_like(err), err)
    ratio = err / tol.to(torch.float64)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    if ratio.numel() == 0:
        return {"ok": True, "worst_ratio": 0.0, "index": None, "n_bad": 0}
    flat = int(ratio.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    worst = float(ratio.reshape(-1)[flat])
    return {"ok": worst <= 1.0, "worst_ratio": worst, "index": idx,
            "n_bad": int((ratio > 1.0).sum()), "actual": float(a[idx]), "expected": float(e[idx]),
            "tol": float(tol[idx])}


def assert_linear_close(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, qw,
                        bias: Optional[torch.Tensor] = None, rtol: Optional[float] = None,
                        msg: str = "") -> None:
    """Raise AssertionError unless ``actual`` matches the reference ``expected`` output of
    ``linear(x, qw, bias)`` within :func:`linear_tolerance` everywhere."""
    r = linear_mismatch(actual, expected, x, qw, bias=bias, rtol=rtol)
    if r["ok"]:
        return
    prefix = f"{msg}: " if msg else ""
    if "reason" in r:
        raise AssertionError(prefix + r["reason"])
    raise AssertionError(
        f"{prefix}linear output differs from the reference beyond tolerance at {r['n_bad']} of "
        f"{expected.numel()} elements; worst at {r['index']}: got {r['actual']!r}, expected "
        f"{r['expected']!r}, |diff| = {abs(r['actual'] - r['expected']):.3g} > tol {r['tol']:.3g} "
        f"({r['worst_ratio']:.3g}x the tolerance)")


# ---- the activation-quantized CPU fast path ----------------------------------------------------
# The statement and the bound are those of tests/test_fast_path.py (and csrc/kernel_api.h), kept
# here so that `lowbit selftest` can check the fast path on a user's machine too.
# Activations are quantized per row in blocks of this many columns, by weight format; the
# extension's own table is lowbit._backend's C.QBLOCK (tests check they agree).
FAST_QBLOCK = {"int8": 16, "int4": 8, "nf4": 8, "fp4": 8}
FAST_QCHUNK = 32  # the quantized row is zero-padded to a multiple of this many columns


def codebook_absmax(qw) -> torch.Tensor:
    """float64 [N, K]: each nf4 / fp4 weight's block absmax (its scale decoded as nf4's code 15,
    value 1.0; double quantization included)."""
    from . import reference as R
    from .qweight import QuantizedWeight
    return R.dequantize(QuantizedWeight(
        "nf4", tuple(qw.shape), torch.full_like(qw.data, 0xFF), qw.scales,
        group_size=qw.group_size, double_quant=qw.double_quant, dq_scale=qw.dq_scale,
        dq_offset=qw.dq_offset)).double().abs()


def codebook_code_error(fmt: str) -> float:
    """max_i |c_i / S - cb_i|: how far the 14-bit codes of a codebook format (c_i =
    formats.codebook_int_codes, S = formats.CODE_SCALE; used by the CPU fast path and the GPU
    integer-dot GEMV) are from its codebook, in absmax (nf4 ~5e-5; fp4 only float32 rounding)."""
    from . import formats as F
    return max(abs(i / F.CODE_SCALE[fmt] - v)
               for i, v in zip(F.codebook_int_codes(fmt), F.CODEBOOKS[fmt]))


def _blocks_absmax_bits(x2d: torch.Tensor, block: int, length: int):
    """x [M, K] in float32, zero-padded to ``length`` columns, as [M, length / block, block]
    blocks, and the bits of each block's max |x| (int32: NaN > inf > any finite value)."""
    x = x2d.float()
    M, K = x.shape
    xp = torch.nn.functional.pad(x, (0, length - K)).reshape(M, length // block, block)
    return xp, (xp.view(torch.int32) & 0x7FFFFFFF).amax(-1)


def fast_quantize_activations(x2d: torch.Tensor, block: int):
    """The fast path's activation quantizer, in torch (csrc/kernel_api.h): ``x [M, K]`` ->
    ``q int8 [M, ldq]``, ``d float32 [M, nb]``, ``sum int32 [M, nb]``, the row zero-padded to
    ldq = ceil(K / 32) * 32 columns, nb = ldq / block blocks: a = max |x| over the block,
    d = a / 127, q = round_half_even(x * (127 / a)); a block with a < 2^-120 gives d = 0,
    q = 0; a non-finite block gives d = NaN, q = 0."""
    M, K = x2d.shape
    ldq = -(-K // FAST_QCHUNK) * FAST_QCHUNK
    nb = ldq // block
    xp, amax_bits = _blocks_absmax_bits(x2d, block, ldq)
    a = amax_bits.view(torch.float32)
    nonfinite = amax_bits >= 0x7F800000
    zero = amax_bits < 0x03800000
    d = a / torch.full_like(a, 127.0)
    inv = torch.full_like(a, 127.0) / a  # a true division (127.0 / a would use a reciprocal)
    q = torch.round(xp * inv[..., None])  # round half to even
    q = torch.where((nonfinite | zero)[..., None], torch.zeros_like(q), q)
    d = torch.where(zero, torch.zeros_like(d), d)
    d = torch.where(nonfinite, torch.full_like(d, math.nan), d)
    return q.to(torch.int8).reshape(M, nb * block), d, q.sum(-1).to(torch.int32)


def fast_linear_tolerance(x: torch.Tensor, qw, expected: torch.Tensor,
                          bias: Optional[torch.Tensor] = None,
                          out_dtype: Optional[torch.dtype] = None,
                          magnitude_only: bool = False) -> torch.Tensor:
    """Elementwise bound on |fast path - reference| for ``linear(x, qw, bias)`` (float32,
    the shape of ``expected``), derived from the activation quantization, not fitted::

        sum_k |w_k| (d_k / 2 + 1e-6 |x_k|)                  activation rounding (half a code)
      + sum_k |x_hat_k| absmax_k (e_cb + 1e-6)              nf4 / fp4: their 14-bit codes
      + 1e-5 (sum_k |w_k x_k| + sum_k |x_hat_k| |terms_k|)  float32 sums of the kernels' terms
      + the bf16/f16 output's ulp, as in :func:`linear_tolerance`

    d_k the scale of x_k's block (:data:`FAST_QBLOCK`), x_hat = q * d, e_cb =
    :func:`codebook_code_error`; the terms are the codes, zero-points and the largest
    constant an ISA adds to the codes to make them unsigned (int8 + 128, nf4 / fp4 + 128 * 129),
    taken back out in float32 with the activations' block sums. A worst case (all errors
    aligned); the typical error is far smaller. ``magnitude_only``: just the float32 term
    1e-5 * sum |terms| (two fast paths differ by no more).
    """
    from . import formats as F
    from . import reference as R
    N, K = qw.shape
    x2 = x.reshape(-1, K).float()
    B = FAST_QBLOCK[qw.fmt]
    q, d, _ = fast_quantize_activations(x2, B)
    d_el = d.repeat_interleave(B, dim=1)[:, :K].double()
    xh = q[:, :K].double() * d_el
    w = R.dequantize(qw).double()
    x64 = x2.double()
    tol = (0.5 * d_el + 1e-6 * x64.abs()) @ w.abs().T
    g = F.effective_group(qw.group_size, K)
    if qw.fmt == "int8":
        wmag = w.abs() + 128 * R.per_element(qw.scales, g, K).double().abs()
    elif qw.fmt == "int4":
        c = R.unpack_nibbles(qw.data, K).double()
        z = torch.full_like(qw.scales, 8.0) if qw.zeros is None else qw.zeros.double()
        wmag = (c + R.per_element(z, g, K).double()) * R.per_element(qw.scales, g, K).double().abs()
    else:  # nf4 / fp4: their 14-bit codes c (formats.codebook_int_codes), scale absmax / S
        absmax = codebook_absmax(qw)
        i16 = F.codebook_int_codes(qw.fmt)
        e_cb = codebook_code_error(qw.fmt)
        tol = tol + xh.abs() @ (absmax * (e_cb + 1e-6)).T
        c = R.unpack_nibbles(qw.data, K).long()
        wmag = ((torch.tensor(i16, dtype=torch.float64).abs()[c] + 128 * 129) * absmax
                / F.CODE_SCALE[qw.fmt])
    mag = x64.abs() @ w.abs().T + xh.abs() @ wmag.T
    if bias is not None:
        mag = mag + bias.double().abs()
    if magnitude_only:
        return (1e-5 * mag).reshape(*expected.shape).float()
    tol = tol + 1e-5 * mag
    out_dtype = out_dtype or expected.dtype
    eps = output_eps(out_dtype)
    floor = float(torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps)
    tol = tol + eps * (expected.reshape(-1, N).double().abs() + tol) + floor
    return tol.reshape(*expected.shape).float()


def fast_linear_mismatch(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, qw,
                         bias: Optional[torch.Tensor] = None) -> dict:
    """:func:`linear_mismatch` with the fast path's bound (:func:`fast_linear_tolerance`)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return linear_mismatch(actual, expected, x, qw, bias=bias)
    return linear_mismatch(actual, expected, x, qw, bias=bias,
                           tol=fast_linear_tolerance(x, qw, expected, bias))


def assert_fast_linear_close(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, qw,
                             bias: Optional[torch.Tensor] = None, msg: str = "") -> None:
    """AssertionError unless the fast path's ``actual`` is within its bound of the reference."""
    r = fast_linear_mismatch(actual, expected, x, qw, bias=bias)
    if not r["ok"]:
        prefix = f"{msg}: " if msg else ""
        raise AssertionError(prefix + (r.get("reason") or
                             f"fast path beyond its quantization bound at {r['n_bad']} elements; "
                             f"worst at {r['index']}: got {r['actual']!r}, expected {r['expected']!r} "
                             f"({r['worst_ratio']:.3g}x the bound)"))


# ---- the integer-dot GPU GEMV -------------------------------------------------------------------
# Its activations are quantized to 16-bit integers with a power-of-two scale per layout block
# (kernels/gemv.py, _xquant_kernel); this is that quantizer in torch, for tests and selftest.
GPU_XQ_BLOCK = {"int4": 128, "int8": 64, "nf4": 128, "fp4": 128}  # elements per block, by weight format
IMMA_XQ = dict(block=128, shift=13, qmax=1 << 14)  # the IMMA GEMM's x quantization (int4)


def gpu_quantize_activations(x2d: torch.Tensor, block: int, shift: int = 14,
                             qmax: int = 32767):
    """``x [M, K]`` -> ``(x_hat, q, scale)``: per block of ``block`` columns (the row
    zero-padded), E the exponent of max |x|, scale = 2**(E - shift),
    q = round_half_even(x / scale) clamped to +-qmax, x_hat = q * scale (float32, exact) [M, K].
    A block with max |x| below 2**-112 gives scale 0 and q = 0; a non-finite block gives scale
    NaN and q = 0. The integer-dot GEMV's scheme is the default (shift 14, qmax 32767); the IMMA
    GEMM's is ``IMMA_XQ`` (shift 13: |q| <= 2**14, no clamp)."""
    M, K = x2d.shape
    nb = -(-K // block)
    xp, bits = _blocks_absmax_bits(x2d, block, nb * block)
    E = (bits >> 23) - 127
    finite = bits < 0x7F800000
    live = finite & (E >= -112)
    e = torch.where(live, E - shift, torch.zeros_like(E))
    inv = ((127 - e) << 23).view(torch.float32)
    q = torch.round(xp * inv[..., None]).clamp(-qmax, qmax)
    q = torch.where(live[..., None], q, torch.zeros_like(q))
    scale = torch.where(live, ((127 + e) << 23).view(torch.float32),
                        torch.where(finite, torch.zeros_like(inv), torch.full_like(inv, math.nan)))
    x_hat = (q * scale[..., None]).reshape(M, nb * block)[:, :K]
    return x_hat, q.to(torch.int32), scale


def idot_linear_tolerance(x: torch.Tensor, qw, expected: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, xq: Optional[dict] = None
                          ) -> torch.Tensor:
    """Bound on |integer-dot kernel - reference| for ``linear(x, qw, bias)``: the float32
    tolerance of :func:`linear_tolerance` plus the activation rounding, sum_k |w_k| scale_k / 2
    (scale_k the quantization step of x_k's block; |x_k| where a block quantizes to zeros), not
    fitted. ``xq``: the kernel's quantization of x (:func:`gpu_quantize_activations`'
    arguments: ``IMMA_XQ`` for the IMMA GEMM; default the integer-dot GEMV's)."""
    from . import reference as R
    N, K = qw.shape
    x2 = x.reshape(-1, K)
    xq = xq or dict(block=GPU_XQ_BLOCK[qw.fmt])
    _, _, scale = gpu_quantize_activations(x2, **xq)
    s_el = scale.repeat_interleave(xq["block"], dim=1)[:, :K].double()
    tol = linear_tolerance(x, qw, expected=expected, bias=bias, out_dtype=expected.dtype)
    # a block quantized to zeros (max |x| below 2**-112) loses its whole contribution
    lost = torch.where(s_el == 0, x2.double().abs(), 0.5 * s_el)
    extra = lost @ R.dequantize(qw).double().abs().T
    from . import formats as F
    if qw.fmt in F.CODE_SCALE:
        # their 14-bit codes (at most e_cb absmax from the codebook) and the float32 sums of
        # terms up to (8192 + S) / S absmax per weight (the codes offset by 8192, taken back
        # out with the block sums; S = formats.CODE_SCALE)
        S = F.CODE_SCALE[qw.fmt]
        extra = extra + x2.double().abs() @ (codebook_absmax(qw) * (
            codebook_code_error(qw.fmt) + 1e-5 * (8192 + S) / S)).T
    eps = output_eps(expected.dtype)
    return (tol.double().reshape(-1, N) + extra * (1 + eps)).reshape(*expected.shape).float()


__all__ = ["accumulation_rtol", "output_eps", "linear_tolerance", "linear_mismatch",
           "assert_linear_close", "UNIT_ROUNDOFF_F32", "fast_quantize_activations",
           "fast_linear_tolerance", "fast_linear_mismatch", "assert_fast_linear_close",
           "GPU_XQ_BLOCK", "IMMA_XQ", "gpu_quantize_activations", "idot_linear_tolerance"]
