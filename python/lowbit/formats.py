"""Weight formats: one registry row per format, the single source of truth.

Every weight is ``[N, K] = [out_features, in_features]`` like ``nn.Linear.weight``; groups
(blocks) run along K. ``csrc/formats.h`` mirrors this table (``tests/test_formats.py`` proves
the two agree). Adding a format means one row here, one traits row in C++, its reference
functions in ``reference.py`` and its kernels; the table-driven tests pick it up.

Shared conventions
------------------
* 4-bit codes are packed two per byte along K into ``uint8 [N, ceil(K/2)]``: element ``2j``
  in the low nibble of byte ``j``, element ``2j+1`` in the high nibble. For odd K the last
  high nibble is 0 and never read.
* Groups: ``n_groups = ceil(K / group_size)``; the last group is shorter when the group size
  does not divide K (e.g. K=576 with group 128 gives 4 full groups and one of 64). Per-group
  tensors are ``[N, n_groups]``, row-major.
* All scales are float32: exact for every source format (GPTQ/AWQ fp16, bitsandbytes fp32,
  GGUF fp16 and fp16 x 6-bit products).
* Zero-points (the ``zero_point`` option of a QuantizedWeight, for the formats that have an
  asymmetric variant): ``"int"``, an integer z per group with ``w = float(q - z) * s`` (int4:
  uint8 0..15, int8: int16), or ``"float"`` (int4 only), a float32 offset m per group with
  ``w = float(q) * s + m`` (two float32 roundings: multiply, then add). Both live in the
  QuantizedWeight's ``zeros`` field; symmetric weights have none.
* Codebook formats (nf4, fp4) decode ``w = codebook[q] * absmax``; ``CODEBOOKS`` maps each
  to its 16 float32 values in code order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

# The 16 NormalFloat-4 values (QLoRA), ascending; identical to bitsandbytes' NF4 table.
NF4_CODEBOOK: Tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982251167297,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit; no inf/nan), in code order (not
# ascending): codes 0..7 are 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by 12 (float32 division, as
# bitsandbytes builds its table), codes 8..15 the same values negated; code 8 is -0.0, as
# bitsandbytes' dequantize returns it (its kernels multiply by the sign).
FP4_CODEBOOK: Tuple[float, ...] = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    -0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)

# Double quantization of codebook (NF4 / FP4) absmax values: this many consecutive blocks of one row share
# one float32 (scale, offset) pair.
NF4_DOUBLE_QUANT_CHUNK = 256

# Symmetric int4 stores q + 8 (q in [-8, 7]) so its codes decode like asymmetric ones with
# the constant zero-point 8.
INT4_SYMMETRIC_ZERO = 8

# Zero-point kinds (QuantizedWeight.zero_point; module docstring).
ZERO_POINTS = ("int", "float")


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table (mirrored by ``kFormatTraits`` in csrc/formats.cpp)."""

    name: str
    id: int  # the C++ ``Format`` enum value
    bits: int  # bits per stored code
    default_group: int  # default group/block size along K; -1 = one group per row
    packed_nibbles: bool  # two codes per byte (see module docstring)
    has_zero_point: bool  # has an asymmetric variant with an integer zero-point per group
    has_float_offset: bool  # has the zero_point="float" variant (float32 offset per group)
    has_codebook: bool  # codes index CODEBOOKS[name]
    fixed_group: bool  # group size is not an option
    doc: str


INT8 = FormatSpec(
    name="int8", id=0, bits=8, default_group=-1, packed_nibbles=False, has_zero_point=True,
    has_float_offset=False, has_codebook=False, fixed_group=False,
    doc="""int8, one scale per output row by default (group_size -1), or per group along K;
    symmetric by default, optionally with an integer zero-point per group.

    data   int8    [N, K]         the codes q
    scales float32 [N, n_groups]  (n_groups = 1 for the default per-row scale)
    zeros  int16   [N, n_groups]  asymmetric only (zero_point "int"; None when symmetric)
    symmetric:  s = absmax(group) / 127 (0 for an all-zero group),
                q = clamp(round(w / s), -127, 127), z = 0 implied
    asymmetric: lo = min(group, 0), hi = max(group, 0), s = (hi - lo) / 255,
                z' = clamp(round(-lo / s), 0, 255), q' = clamp(round(w / s) + z', 0, 255),
                stored as q = q' - 128 and z = z' - 128
    decode w = float(q - z) * s   (q - z computed exactly as an integer)
    Sources: GGUF Q8_0 is symmetric group 32 (s = the fp16 d); GPTQ 8-bit is asymmetric with
    q = q_gptq - 128 and z = z_gptq - 128 (v1 checkpoints store z_gptq - 1, so z_gptq may be
    256: z = 128 fits int16).
    """,
)

INT4 = FormatSpec(
    name="int4", id=1, bits=4, default_group=128, packed_nibbles=True, has_zero_point=True,
    has_float_offset=True, has_codebook=False, fixed_group=False,
    doc="""Group-wise 4-bit along K (default group 128), asymmetric by default.

    data   uint8   [N, ceil(K/2)]  codes 0..15, element 2j low nibble, 2j+1 high nibble
    scales float32 [N, n_groups]
    zeros  uint8   [N, n_groups]   asymmetric, zero_point "int" (the default): values 0..15
           float32 [N, n_groups]   asymmetric, zero_point "float": the offsets m
           None when symmetric
    asymmetric: lo = min(group, 0), hi = max(group, 0), s = (hi - lo) / 15,
                z = clamp(round(-lo / s), 0, 15), q = clamp(round(w / s) + z, 0, 15)
    symmetric:  s = absmax(group) / 7, q = clamp(round(w / s), -8, 7) + 8, z = 8 implied
    decode w = float(q - z) * s
    zero_point "float" (GGUF's "min" formats): lo = min(group), hi = max(group),
                s = (hi - lo) / 15, m = lo, q = clamp(round((w - m) / s), 0, 15)
    decode w = float(q) * s + m   (two float32 roundings: multiply, then add; no FMA)
    Sources: GGUF Q4_1 is group 32 with s = d, m = the fp16 min; Q4_K is group 32 (its
    sub-blocks) with s = d * sc and m = -(dmin * mn) (float32 products, exact; q * s + m then
    equals gguf's q * s - dmin * mn bit for bit); Q4_0 is symmetric group 32 with s = d.
    """,
)

NF4 = FormatSpec(
    name="nf4", id=2, bits=4, default_group=64, packed_nibbles=True, has_zero_point=False,
    has_float_offset=False, has_codebook=True, fixed_group=False,
    doc="""NormalFloat-4: block-wise absmax along K (default block 64) and a 16-value codebook.

    data   uint8   [N, ceil(K/2)]  codebook indices, element 2j low nibble, 2j+1 high nibble
    scales float32 [N, n_blocks]   absmax of each block
           or, with double_quant, uint8 [N, n_blocks] codes c of the absmax values, and
    dq_scale, dq_offset float32 [N, ceil(n_blocks / 256)]: for each 256 consecutive blocks of
           a row, lo = min(absmax), step = (max(absmax) - lo) / 255,
           c = clamp(round((absmax - lo) / step), 0, 255), absmax' = float(c) * step + lo
           (two float32 roundings: multiply, then add)
    q = index of the codebook value nearest to w / absmax' (the first on a tie)
    decode w = NF4_CODEBOOK[q] * absmax'
    """,
)

FP4 = FormatSpec(
    name="fp4", id=3, bits=4, default_group=64, packed_nibbles=True, has_zero_point=False,
    has_float_offset=False, has_codebook=True, fixed_group=False,
    doc="""bitsandbytes FP4: nf4's layout and rules with FP4_CODEBOOK (code order, not ascending).

    data   uint8   [N, ceil(K/2)]  codebook indices, element 2j low nibble, 2j+1 high nibble
    scales float32 [N, n_blocks]   absmax of each block
           or, with double_quant, uint8 codes and dq_scale, dq_offset exactly as nf4
    q = index of the codebook value nearest to w / absmax' (the first on a tie, so 0 -> code 0)
    decode w = FP4_CODEBOOK[q] * absmax'
    """,
)

FORMATS = {f.name: f for f in (INT8, INT4, NF4, FP4)}
CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK}
FORMATS_BY_ID = {f.id: f for f in FORMATS.values()}

# The codebooks as the integer kernels multiply them (the CPU fast path, the GPU integer-dot
# GEMV): code i -> c_i = round(CODE_SCALE * codebook[i]), a 14-bit integer, with the weight's
# scale absmax / CODE_SCALE. 14 bits split into two int8 terms c = 128 hi + lo with hi, lo in
# [-64, 64] (csrc/formats.h). nf4: 8128 = 127 * 64, at most 0.5 / 8128 of absmax from the
# codebook; fp4: 8064 = 42 * 192, exact (its values are multiples of 1/192: 0, 1, 32, 48, 64,
# 96, 128 and 192 / 192; the float32 table differs from them by float32 rounding only).
CODE_SCALE = {"nf4": 8128, "fp4": 8064}


def codebook_int_codes(fmt: str) -> Tuple[int, ...]:
    """The 16 integer codes of a codebook format (see CODE_SCALE), in code order."""
    return tuple(round(CODE_SCALE[fmt] * v) for v in CODEBOOKS[fmt])


def get_format(fmt) -> FormatSpec:
    """The registry row for ``fmt`` (a name or a FormatSpec); ValueError if unknown."""
    if isinstance(fmt, FormatSpec):
        return fmt
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def check_group_size(spec: FormatSpec, group_size: Optional[int]) -> int:
    """The group size to store (-1 = one group per row), validating the user's choice.

    Allowed for every format: -1 or a multiple of 16 between 16 and 8192 (32, 64, 128, 256 are
    the usual ones).
    """
    if group_size is None:
        return spec.default_group
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if spec.fixed_group:
        if group_size != -1:
            raise ValueError(f"{spec.name} uses one scale per output row; group_size must be None or -1, got {group_size}")
        return -1
    if group_size == -1:
        return -1
    if group_size < 16 or group_size > 8192 or group_size % 16:
        raise ValueError(
            f"unsupported group_size {group_size} for {spec.name}: use -1 (one group per row) "
            "or a multiple of 16 between 16 and 8192, e.g. 32, 64, 128, 256")
    return group_size


def effective_group(group_size: int, K: int) -> int:
    """The group length along K the kernels use (-1 means the whole row)."""
    return K if group_size == -1 else group_size


def n_groups(group_size: int, K: int) -> int:
    return math.ceil(K / effective_group(group_size, K))


def packed_cols(spec: FormatSpec, K: int) -> int:
    """Bytes per row of the packed data tensor."""
    return (K + 1) // 2 if spec.packed_nibbles else K
