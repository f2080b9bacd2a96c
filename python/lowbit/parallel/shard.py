"""Sharding a QuantizedWeight for tensor parallelism, without dequantizing.

A weight ``[N, K]`` is cut along one axis at ``bounds = [0, b_1, ..., b_w = size]``; rank ``r``
keeps ``[b_r, b_{r+1})``:

* dim 0 (N, column-parallel): every stored tensor has one row per output feature, so rows are
  sliced and nothing else changes. The input transforms (``perm``, ``input_scale``) describe
  the input, which every rank sees whole: they are copied.
* dim 1 (K, row-parallel): each field is sliced by how it lies along K, read from
  :data:`FIELD_K_LAYOUT` and the format table (``n_groups``, ``packed_cols``, the double-quant
  chunk), so a new format only needs its layout here. A cut must keep groups and packed bytes
  whole (:func:`k_alignment`); a ragged last group stays last. ``group_size=-1`` (one scale per
  row, int8's default) can be cut anywhere a byte boundary allows: every shard keeps the row's
  scale. Double quantization (nf4, fp4): each local chunk of 256 blocks must lie inside one
  stored chunk to keep its (dq_scale, dq_offset); shards are re-chunked that way when possible
  (always when a row has at most 256 blocks, e.g. K=14336 with block 64). Otherwise the shard
  stores its absmax values decoded to float32, ``absmax' = float(c) * dq_scale + dq_offset``
  exactly as the decoder computes them, so it dequantizes bit for bit the same (3 more bytes per
  block on that shard); ``dq_fallback="error"`` raises a ValueError instead.

Every shard dequantizes to exactly (bit for bit) the matching slice of the unsharded weight's
:func:`lowbit.dequantize` (tests/test_parallel.py proves it for every format).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import formats as F
from .. import reference as R
from ..qweight import CODE_FIELDS, TENSOR_FIELDS, QuantizedWeight

# How each QuantizedWeight tensor field lies along K (the row-parallel axis):
#   "codes"    [N, packed_cols(K)]  packed codes: a K range maps to a byte range
#   "groups"   [N, n_groups]        one value per group (scales, zero-points, dq absmax codes)
#   "chunks"   [N, n_chunks]        one value per double-quant chunk of groups
#   "perm"     [K]                  input transform: stored column j reads input feature perm[j]
#   "features" [K]                  input transform in input-feature order (input_scale)
# A format with a new field adds it here; an unknown field is refused with a clear error.
FIELD_K_LAYOUT: Dict[str, str] = {
    "data": "codes",
    "scales": "groups",
    "zeros": "groups",
    "dq_scale": "chunks",
    "dq_offset": "chunks",
    "perm": "perm",
    "input_scale": "features",
}

_DIMS = {0: 0, 1: 1, "column": 0, "row": 1, "N": 0, "K": 1}


def _dim(dim) -> int:
    if dim not in _DIMS:
        raise ValueError(f"dim must be 0 / 'column' (split N) or 1 / 'row' (split K), got {dim!r}")
    return _DIMS[dim]


def dq_chunk(spec: F.FormatSpec) -> int:
    """Groups per double-quant chunk of ``spec`` (a format row may name its own)."""
    return int(getattr(spec, "dq_chunk", F.NF4_DOUBLE_QUANT_CHUNK))


# ---- split points ---------------------------------------------------------------------------
def even_bounds(size: int, world_size: int) -> List[int]:
    """``[0, size/w, 2 size/w, ..., size]``; ValueError unless ``world_size`` divides ``size``."""
    _check_world(world_size)
    if size % world_size:
        raise ValueError(f"cannot split {size} evenly over world_size={world_size} "
                         f"({size} % {world_size} = {size % world_size})")
    step = size // world_size
    return [r * step for r in range(world_size + 1)]


def balanced_bounds(size: int, world_size: int, unit: int = 1) -> List[int]:
    """Split points on multiples of ``unit`` (the last unit may be ragged: ``size`` need not be a
    multiple), as even as possible: the first ``n_units % world_size`` ranks get one unit more.
    ValueError when there are fewer units than ranks."""
    _check_world(world_size)
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    units = -(-size // unit)
    if units < world_size:
        raise ValueError(f"cannot give each of {world_size} ranks a share of {size} in whole units "
                         f"of {unit} (only {units} unit{'s' if units != 1 else ''})")
    base, extra = divmod(units, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(min(size, bounds[-1] + (base + (r < extra)) * unit))
    return bounds


def _check_world(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def check_bounds(bounds: Sequence[int], size: int, what: str = "size") -> List[int]:
    """Validate split points: ints, start 0, end ``size``, strictly increasing."""
    b = [int(v) for v in bounds]
    if len(b) < 2 or b[0] != 0 or b[-1] != size or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"bounds {list(bounds)} must rise strictly from 0 to {what}={size}")
    return b


def k_alignment(qw: QuantizedWeight) -> int:
    """The step at which a K (row-parallel) cut keeps this weight's groups and packed bytes whole:
    lcm(group size, codes per byte); ``group_size=-1`` adds no constraint."""
    spec = qw.spec
    codes_per_byte = 8 // math.gcd(8, spec.bits)
    g = 1 if qw.group_size == -1 else qw.group_size
    return math.lcm(g, codes_per_byte)


def _describe(qw: QuantizedWeight) -> str:
    s = f"{qw.fmt} weight [N={qw.shape[0]}, K={qw.shape[1]}]"
    return s + (" (one group per row)" if qw.group_size == -1 else f" (group_size={qw.group_size})")


def check_k_bounds(qw: QuantizedWeight, bounds: Sequence[int]) -> List[int]:
    """ValueError naming the sizes when a K cut would split a group or a packed byte."""
    K = qw.shape[1]
    b = check_bounds(bounds, K, "K")
    a = k_alignment(qw)
    bad = [v for v in b[1:-1] if v % a]
    if bad:
        why = (f"cuts a group of {qw.group_size}" if qw.group_size != -1 and bad[0] % qw.group_size
               else f"cuts a byte of {8 // math.gcd(8, qw.spec.bits)} packed codes")
        hint = ""
        try:
            hint = f"; e.g. balanced_bounds({K}, {len(b) - 1}, {a}) = {balanced_bounds(K, len(b) - 1, a)}"
        except ValueError:
            pass
        raise ValueError(f"row-parallel split of a {_describe(qw)} at K = {bad[0]} {why}: K cuts "
                         f"must be multiples of {a} (bounds {b}){hint}")
    return b


def default_bounds(qw: QuantizedWeight, dim, world_size: int) -> List[int]:
    """Even split points for ``dim``, checked against the format (ValueError naming the sizes)."""
    d = _dim(dim)
    size = qw.shape[d]
    try:
        b = even_bounds(size, world_size)
    except ValueError as e:
        raise ValueError(f"{'column' if d == 0 else 'row'}-parallel split of a {_describe(qw)}: {e}; "
                         "pass bounds= (e.g. from balanced_bounds) for uneven shards") from None
    return check_k_bounds(qw, b) if d == 1 else b


# ---- slicing --------------------------------------------------------------------------------
def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy (a view would keep the whole unsharded tensor alive)."""
    return t.clone(memory_format=torch.contiguous_format)


def _build(qw: QuantizedWeight, shape: Tuple[int, int], fields: Dict[str, Optional[torch.Tensor]],
           double_quant: Optional[bool] = None) -> QuantizedWeight:
    """A weight with qw's settings (every non-tensor attribute, whatever the format has), the
    given shape and tensor fields, validated against the format's layout."""
    out = copy.copy(qw)
    out.shape = (int(shape[0]), int(shape[1]))
    for k in TENSOR_FIELDS:
        setattr(out, k, fields.get(k))
    if double_quant is not None:
        out.double_quant = double_quant
    out.cache = {}
    out.validate()
    return out


def _check_fields(qw: QuantizedWeight) -> None:
    for name in TENSOR_FIELDS:
        if getattr(qw, name, None) is not None and name not in FIELD_K_LAYOUT:
            raise ValueError(f"lowbit.parallel does not know how field {name!r} of a {qw.fmt} weight "
                             "lies along K; add it to lowbit.parallel.shard.FIELD_K_LAYOUT")


def shard_rows(qw: QuantizedWeight, n0: int, n1: int) -> QuantizedWeight:
    """Output features ``[n0, n1)`` (column-parallel shard): rows of every stored tensor; the
    input transforms are copied."""
    _check_fields(qw)
    N, K = qw.shape
    if not 0 <= n0 < n1 <= N:
        raise ValueError(f"row range [{n0}, {n1}) is not inside N={N}")
    fields = {}
    for name in TENSOR_FIELDS:
        t = getattr(qw, name)
        if t is None:
            continue
        fields[name] = _own(t) if name not in CODE_FIELDS else _own(t[n0:n1])
    return _build(qw, (n1 - n0, K), fields)


def _check_k_range(qw: QuantizedWeight, k0: int, k1: int) -> None:
    K = qw.shape[1]
    if not 0 <= k0 < k1 <= K:
        raise ValueError(f"column range [{k0}, {k1}) is not inside K={K}")
    check_k_bounds(qw, sorted({0, k0, k1, K}))


def _group_range(qw: QuantizedWeight, k0: int, k1: int) -> Tuple[int, int]:
    if qw.group_size == -1:
        return 0, 1  # one group per row: every shard keeps the row's values
    g = qw.group_size
    return k0 // g, -(-k1 // g)


def _rechunk(qw: QuantizedWeight, g0: int, g1: int) -> Optional[List[int]]:
    """For local groups [g0, g1): the stored chunk each local chunk lies in, or None when a
    local chunk straddles two stored chunks (their constants differ in general)."""
    ch = dq_chunk(qw.spec)
    idx = []
    for start in range(g0, g1, ch):
        end = min(start + ch, g1)
        lo, hi = start // ch, (end - 1) // ch
        if lo != hi:
            return None
        idx.append(lo)
    return idx


def shard_cols(qw: QuantizedWeight, k0: int, k1: int, *,
               dq_fallback: str = "expand") -> QuantizedWeight:
    """Input features ``[k0, k1)`` (row-parallel shard) of a weight whose perm, if any, keeps
    those features within stored columns ``[k0, k1)`` (ValueError otherwise; see
    :func:`shard_cols_gathered` for the alternative). ``dq_fallback``: "expand" or "error" (see
    the module docstring)."""
    _check_fields(qw)
    if dq_fallback not in ("expand", "error"):
        raise ValueError(f"dq_fallback must be 'expand' or 'error', got {dq_fallback!r}")
    N, K = qw.shape
    _check_k_range(qw, k0, k1)
    perm = qw.perm
    local_perm = None
    if perm is not None:
        p = perm[k0:k1]
        if not bool(((p >= k0) & (p < k1)).all()):
            raise ValueError(
                f"perm moves input features across the row-parallel split: stored columns "
                f"[{k0}, {k1}) of a {_describe(qw)} read input features outside [{k0}, {k1}), which "
                "this rank does not receive. Use RowParallelQuantLinear(..., gather_input=True) / "
                "shard_model(..., act_order='gather') (the rank gathers its whole input), or "
                "re-quantize with the permutation kept within shards")
        local_perm = _own(p - k0)
    fields = _slice_codes(qw, k0, k1, dq_fallback)
    if local_perm is not None:
        fields["perm"] = local_perm
    if qw.input_scale is not None:
        fields["input_scale"] = _own(qw.input_scale[k0:k1])
    return _build(qw, (N, k1 - k0), fields, double_quant=fields.pop("_double_quant"))


def _slice_codes(qw: QuantizedWeight, k0: int, k1: int, dq_fallback: str) -> dict:
    """The code fields (stored columns [k0, k1), no transforms) and the shard's double_quant."""
    spec = qw.spec
    N, K = qw.shape
    g0, g1 = _group_range(qw, k0, k1)
    fields: Dict[str, object] = {"_double_quant": qw.double_quant}
    chunk_idx = None
    if qw.double_quant:
        chunk_idx = _rechunk(qw, g0, g1)
        if chunk_idx is None:
            if dq_fallback == "error":
                ch = dq_chunk(spec)
                raise ValueError(
                    f"row-parallel shard K [{k0}, {k1}) of a double-quantized {_describe(qw)} spans "
                    f"groups [{g0}, {g1}), which re-chunk into chunks of {ch} groups straddling "
                    f"stored chunks (boundaries at multiples of {ch} groups = {ch * qw.group_size} "
                    "K); pass dq_fallback='expand' to store this shard's absmax in float32")
            absmax = R.decode_double_quant(qw.scales, qw.dq_scale, qw.dq_offset)
            fields["_double_quant"] = False
    for name in CODE_FIELDS:
        t = getattr(qw, name)
        if t is None:
            continue
        kind = FIELD_K_LAYOUT[name]
        if kind == "codes":
            fields[name] = _own(t[:, F.packed_cols(spec, k0):F.packed_cols(spec, k1)])
        elif kind == "groups":
            if name == "scales" and qw.double_quant and chunk_idx is None:
                fields[name] = _own(absmax[:, g0:g1])
            else:
                fields[name] = _own(t[:, g0:g1])
        elif kind == "chunks":
            if chunk_idx is not None:
                fields[name] = _own(t[:, chunk_idx])
        else:
            raise ValueError(f"field {name!r} has K layout {kind!r}, which a code field cannot have")
    return fields


def shard_cols_gathered(qw: QuantizedWeight, k0: int, k1: int, *, dq_fallback: str = "expand"):
    """Stored columns ``[k0, k1)`` for a rank that sees the whole input (any perm).

    Returns ``(local, index, scale)``: ``local`` holds the stored columns with no input
    transforms; the layer computes ``linear(x[..., index] / scale, local)`` (``scale`` None when
    the weight has no input_scale), the same as ``(x / input_scale)[..., perm]`` restricted to
    these stored columns. ``index`` is ``perm[k0:k1]`` (``arange`` without perm).
    """
    _check_fields(qw)
    N, K = qw.shape
    _check_k_range(qw, k0, k1)
    fields = _slice_codes(qw, k0, k1, dq_fallback)
    dq = fields.pop("_double_quant")
    local = _build(qw, (N, k1 - k0), {**fields, "perm": None, "input_scale": None}, double_quant=dq)
    device = qw.data.device
    index = _own(qw.perm[k0:k1]) if qw.perm is not None else torch.arange(k0, k1, device=device)
    scale = _own(qw.input_scale[index]) if qw.input_scale is not None else None
    return local, index, scale


def shard_weight(qw: QuantizedWeight, dim: Union[int, str], world_size: int, rank: int, *,
                 bounds: Optional[Sequence[int]] = None, dq_fallback: str = "expand") -> QuantizedWeight:
    """Rank ``rank``'s shard of ``qw`` split along ``dim`` (0 / "column": N; 1 / "row": K).

    ``bounds`` (``world_size + 1`` split points) defaults to an even split; an even split that
    would cut a group, or a size not divisible by ``world_size``, raises ValueError naming the
    sizes (uneven bounds on group boundaries come from :func:`balanced_bounds`).
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"shard_weight expects a lowbit.QuantizedWeight, got {type(qw).__name__}")
    d = _dim(dim)
    _check_world(world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if bounds is None:
        b = default_bounds(qw, d, world_size)
    else:
        b = check_bounds(bounds, qw.shape[d], "N" if d == 0 else "K")
        if len(b) != world_size + 1:
            raise ValueError(f"bounds {b} must have world_size + 1 = {world_size + 1} entries")
        if d == 1:
            check_k_bounds(qw, b)
    lo, hi = b[rank], b[rank + 1]
    return shard_rows(qw, lo, hi) if d == 0 else shard_cols(qw, lo, hi, dq_fallback=dq_fallback)


def shard_tensor(t: torch.Tensor, dim: int, lo: int, hi: int) -> torch.Tensor:
    """A float weight/bias slice as its own contiguous tensor."""
    return _own(t.narrow(dim, lo, hi - lo))
