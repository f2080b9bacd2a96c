"""The GPU weight layout: the canonical format repacked once per weight for the Triton matmuls.

Why repack: the canonical 4-bit layout puts element ``8w + i`` in nibble ``i`` of 32-bit word
``w``, so the i-th nibbles of consecutive words are elements 8 apart and the activations they
multiply must be gathered with stride 8. The GPU layout interleaves each block of 16 words
instead, so that nibble ``i`` of the 16 words covers 16 *consecutive* elements: a kernel
unpacks one "plane" (one shift and mask for 16 words) and multiplies it with one contiguous,
vectorised load of x, and ``(words[:, None, :] >> shifts[:, None]) & mask`` reshaped to
``[BN, BK]`` is plain K order for the tensor-core kernel. Per-group tensors are transposed so
the BN rows of one group a program reads are contiguous.

Layout (``GPUWeight``; N = out_features, K = in_features, G = groups, C = ceil(G / 256)):

    codes   int32 [N, KW]   BITS = 4 (int4, nf4) or 8 (int8); P = 32 / BITS codes per word;
                            a block is 16 words = KB = 16 * P elements (128 or 64).
                            Word ``16 * b + w``, bits ``[BITS*i, BITS*(i+1))`` hold the code of
                            element ``k = KB * b + 16 * i + w`` (0 past K). KW = 16 * ceil(K / KB).
                            int8 codes are stored as q + 128 (0..254), so every integer format
                            decodes as (code - zero) * scale, int8 with the constant zero 128.
    scales  [G, N]          the canonical scales transposed (float32; uint8 absmax codes for
                            double-quantized nf4)
    zeros   [G, N]          asymmetric int4: uint8 z; int8 with zero-points: int16 z + 128
                            (the codes' own offset, so code - zero = q - z)
    dq_scale, dq_offset     float32 [C, N] (double-quantized nf4 / fp4 only)

int4 with float offsets (zero_point="float") has no layout here: the fused kernels decode
``code - zero`` and scale after the sum, which a float offset does not fit; lowbit.kernels runs
those weights as dequantize + torch matmul (``supports_fused``).

It is produced by :func:`repack` and cached per weight by :func:`gpu_weight`: in the
QuantizedWeight's own ``cache`` dict (QuantLinear keeps one object across calls) and in a
module-level table keyed on where the canonical codes live, which serves the fresh
QuantizedWeight objects that the torch.compile custom op builds; both are invalidated when any
field is modified in place. The canonical QuantizedWeight stays untouched: it is what is
saved, and what ``dequantize`` reads. Memory: the repacked copy is as large as the canonical
codes, so a weight on the GPU takes about twice its packed size while both exist
(``forget(qw)`` drops the repacked one).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from lowbit import formats as F
from lowbit.qweight import TENSOR_FIELDS, QuantizedWeight

# Rows repacked at a time: bounds the temporary int64 words to ~256 MB for any layer.
_REPACK_ROWS_ELEMS = 32 << 20


@dataclass
class GPUWeight:
    """A weight in the GPU layout (see the module docstring); built by :func:`repack`."""

    fmt: str
    shape: Tuple[int, int]
    group_size: int  # as stored (-1 = one group per row)
    group: int  # effective group length along K
    n_groups: int
    symmetric: bool
    double_quant: bool
    bits: int  # bits per code: 4 or 8
    codes: torch.Tensor  # int32 [N, KW]
    scales: torch.Tensor  # [G, N]
    zeros: Optional[torch.Tensor]  # uint8 [G, N] or None
    dq_scale: Optional[torch.Tensor]  # float32 [C, N] or None
    dq_offset: Optional[torch.Tensor]
    # launch plans of the matmul wrappers (grid, constexprs, ...) per call shape, so a repeated
    # call does no per-call arithmetic beyond a dict lookup (kernels/gemv.py); bounded
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def block(self) -> int:
        """Elements per block of 16 words (128 for 4-bit codes, 64 for int8)."""
        return 16 * self.per_word

    @property
    def words_per_row(self) -> int:
        return self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.codes, self.scales, self.zeros, self.dq_scale, self.dq_offset) if t is not None)


def group_const(gw) -> int:
    """The group length the kernels take as a constexpr (divisions by it become shifts for
    powers of two); 2**30 (> any K) when the row is one group, so k // GROUP is always 0."""
    return gw.group if gw.n_groups > 1 else 1 << 30


def _codes_u8(qw: QuantizedWeight, rows: slice) -> torch.Tensor:
    """Unsigned codes [rows, K] (int4 / nf4 nibbles; int8 as q + 128)."""
    N, K = qw.shape
    d = qw.data[rows]
    if qw.fmt == "int8":
        return (d.to(torch.int16) + 128).to(torch.uint8)
    low, high = d & 0x0F, d >> 4
    return torch.stack([low, high], dim=2).reshape(d.shape[0], -1)[:, :K]


def interleave_blocks(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [n, K] -> int32 words [n, KW]: word 16b + w, slot i = element KB*b + 16i + w.

    One shift-and-mask of 16 words then yields 16 consecutive elements (module docstring).
    """
    n, K = codes.shape
    P = 32 // bits
    KB = 16 * P
    nblk = -(-K // KB)
    c = torch.nn.functional.pad(codes, (0, nblk * KB - K)).to(torch.int64)
    c = c.reshape(n, nblk, P, 16)  # [n, block, slot i, word w]
    shifts = (torch.arange(P, device=codes.device, dtype=torch.int64) * bits).reshape(1, 1, P, 1)
    words = (c << shifts).sum(dim=2)  # disjoint bit fields: the sum is a bitwise OR
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement int32
    return words.to(torch.int32).reshape(n, nblk * 16)


def supports_fused(qw: QuantizedWeight) -> bool:
    """Whether the fused GEMV / GEMM kernels take ``qw`` (all but int4's float offsets)."""
    return qw.zero_point != "float"


def repack(qw: QuantizedWeight) -> GPUWeight:
    """The GPU layout of ``qw`` (on qw's device), computed with plain torch ops."""
    if not supports_fused(qw):
        raise ValueError("int4 with float offsets (zero_point='float') has no GPU layout for the "
                         "fused kernels; lowbit.kernels.linear runs it as dequantize + matmul")
    N, K = qw.shape
    bits = 8 if qw.fmt == "int8" else 4
    P = 32 // bits
    KW = 16 * (-(-K // (16 * P)))
    codes = torch.empty((N, KW), dtype=torch.int32, device=qw.device)
    step = max(1, _REPACK_ROWS_ELEMS // max(1, KW * P))
    for r in range(0, N, step):
        rows = slice(r, min(N, r + step))
        codes[rows] = interleave_blocks(_codes_u8(qw, rows), bits)

    def t(x):
        return None if x is None else x.t().contiguous()

    zeros = qw.zeros
    if qw.fmt == "int8" and zeros is not None:  # the codes are q + 128: so is the zero-point
        zeros = (zeros.to(torch.int32) + 128).to(torch.int16)
    return GPUWeight(fmt=qw.fmt, shape=(N, K), group_size=qw.group_size,
                     group=F.effective_group(qw.group_size, K), n_groups=qw.n_groups,
                     symmetric=qw.symmetric, double_quant=qw.double_quant, bits=bits, codes=codes,
                     scales=t(qw.scales), zeros=t(zeros), dq_scale=t(qw.dq_scale),
                     dq_offset=t(qw.dq_offset))


def unpack(gw: GPUWeight) -> torch.Tensor:
    """Inverse of the code interleave: uint8 codes [N, K] (int8 as q + 128). For tests."""
    N, K = gw.shape
    P, bits = gw.per_word, gw.bits
    w = gw.codes.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(N, -1, 1, 16)
    shifts = (torch.arange(P, device=w.device) * bits).reshape(1, 1, P, 1)
    c = (w >> shifts) & ((1 << bits) - 1)
    return c.reshape(N, -1)[:, :K].to(torch.uint8)


# ---- cache ----------------------------------------------------------------------------------
# Keyed on where the canonical codes live (data_ptr, device, shape, strides), so a view of the
# same tensor (torch.compile may hand the custom op one) hits too. Each entry holds a weak
# reference to the tensor it was made from and dies with it, so memory that is freed and
# reused for another weight can never hit a stale entry; an in-place update of any field
# (load_state_dict) bumps that field's version counter (shared by views) and forces a repack.
_CACHE: Dict[tuple, tuple] = {}
_LOCK = threading.Lock()
_CACHE_NAME = "triton_gpu_layout"  # key in QuantizedWeight.cache (a per-object fast path)
REPACKS = [0]  # number of repacks so far (tests check the cache is hit)


def _version(t: Optional[torch.Tensor]):
    if t is None:
        return None
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors carry no version counter (and can't be mutated)
        return (t.data_ptr(), -1)


def _versions(qw: QuantizedWeight):
    return tuple(_version(getattr(qw, k)) for k in TENSOR_FIELDS)


def _key(qw: QuantizedWeight):
    d = qw.data
    return (d.data_ptr(), str(d.device), tuple(d.shape), tuple(d.stride()), qw.fmt, qw.group_size)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def gpu_weight(qw: QuantizedWeight) -> GPUWeight:
    """The cached GPU layout of ``qw``, repacking on first use (or after an in-place change).

    Repacking costs one pass over the weight; do it before CUDA-graph capture (call
    :func:`prepare` or run one eager forward). A repack that happens during capture is not
    cached (its tensors would live in the graph's private pool): the graph then repacks on every
    replay, which is correct but slow.
    """
    ver = _versions(qw)
    own = getattr(qw, "cache", None)  # QuantizedWeight.cache: the fast path for a kept object
    hit = own.get(_CACHE_NAME) if own is not None else None
    if hit is not None and hit[0] == ver:
        return hit[1]
    key = _key(qw)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is not None and entry[1] == ver:
        gw = entry[2]
    else:
        gw = repack(qw)
        REPACKS[0] += 1
        if _capturing(qw.device):
            return gw
        with _LOCK:
            _CACHE[key] = (weakref.ref(qw.data, lambda _r, k=key: _CACHE.pop(k, None)), ver, gw)
    if own is not None:
        own[_CACHE_NAME] = (ver, gw)
    return gw


def prepare(qw: QuantizedWeight) -> Optional[GPUWeight]:
    """Repack ``qw`` for the GPU now (e.g. right after moving a model to CUDA); None for the
    weights the fused kernels do not take (:func:`supports_fused`), which need no layout.
    Also validates the weight (once; lowbit.linear would do it on its first call, which may
    then be inside a CUDA-graph capture)."""
    qw.ensure_valid()
    return gpu_weight(qw) if supports_fused(qw) else None


def forget(qw: Optional[QuantizedWeight] = None) -> None:
    """Drop the cached GPU layout of ``qw`` (all of them if None), freeing its memory."""
    with _LOCK:
        if qw is None:
            _CACHE.clear()
        else:
            _CACHE.pop(_key(qw), None)
            if getattr(qw, "cache", None) is not None:
                qw.cache.pop(_CACHE_NAME, None)


def cache_size() -> int:
    return len(_CACHE)
