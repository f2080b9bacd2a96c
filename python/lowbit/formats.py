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
* All scales are float32: exact for every source format (GPTQ/AWQ fp16, bitsandbytes fp32).
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

# Double quantization of NF4 absmax values: this many consecutive blocks of one row share
# one float32 (scale, offset) pair.
NF4_DOUBLE_QUANT_CHUNK = 256

# Symmetric int4 stores q + 8 (q in [-8, 7]) so its codes decode like asymmetric ones with
# the constant zero-point 8.
INT4_SYMMETRIC_ZERO = 8


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table (mirrored by ``kFormatTraits`` in csrc/formats.cpp)."""

    name: str
    id: int  # the C++ ``Format`` enum value
    bits: int  # bits per stored code
    default_group: int  # default group/block size along K; -1 = one group per row
    packed_nibbles: bool  # two codes per byte (see module docstring)
    has_zero_point: bool  # the asymmetric variant stores a uint8 zero-point per group
    has_codebook: bool  # codes index NF4_CODEBOOK
    fixed_group: bool  # group size is not an option (int8: always per row)
    doc: str


INT8 = FormatSpec(
    name="int8", id=0, bits=8, default_group=-1, packed_nibbles=False, has_zero_point=False,
    has_codebook=False, fixed_group=True,
    doc="""Symmetric int8, one scale per output row.

    data   int8    [N, K]   q = clamp(round(w / s), -127, 127)
    scales float32 [N, 1]   s = absmax(row) / 127 (0 for an all-zero row)
    decode w = float(q) * s
    """,
)

INT4 = FormatSpec(
    name="int4", id=1, bits=4, default_group=128, packed_nibbles=True, has_zero_point=True,
    has_codebook=False, fixed_group=False,
    doc="""Group-wise 4-bit along K (default group 128), asymmetric by default.

    data   uint8   [N, ceil(K/2)]  codes 0..15, element 2j low nibble, 2j+1 high nibble
    scales float32 [N, n_groups]
    zeros  uint8   [N, n_groups]   asymmetric only, values 0..15 (None when symmetric)
    asymmetric: lo = min(group, 0), hi = max(group, 0), s = (hi - lo) / 15,
                z = clamp(round(-lo / s), 0, 15), q = clamp(round(w / s) + z, 0, 15)
    symmetric:  s = absmax(group) / 7, q = clamp(round(w / s), -8, 7) + 8, z = 8 implied
    decode w = float(q - z) * s
    """,
)

NF4 = FormatSpec(
    name="nf4", id=2, bits=4, default_group=64, packed_nibbles=True, has_zero_point=False,
    has_codebook=True, fixed_group=False,
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

FORMATS = {f.name: f for f in (INT8, INT4, NF4)}
FORMATS_BY_ID = {f.id: f for f in FORMATS.values()}


def get_format(fmt) -> FormatSpec:
    """The registry row for ``fmt`` (a name or a FormatSpec); ValueError if unknown."""
    if isinstance(fmt, FormatSpec):
        return fmt
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def check_group_size(spec: FormatSpec, group_size: Optional[int]) -> int:
    """The group size to store (-1 = one group per row), validating the user's choice.

    Allowed for int4/nf4: -1 or a multiple of 16 between 16 and 8192 (32, 64, 128, 256 are
    the usual ones). int8 is always per row.
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
