"""The CPU backend: lowbit._C (plain C++ kernels behind pybind11), called with raw pointers.

Checks here turn anything that would crash the C++ side into a Python exception; the C++
binding re-checks shapes and strides.

Two CPU paths compute ``linear``:

* ``"exact"`` (default): float32 activations times the exactly dequantized weights (the matmul of
  :func:`lowbit.reference.linear`, within :mod:`lowbit.testing`'s float32 tolerance).
* ``"fast"`` (opt-in until its perplexity cost is confirmed under 0.2% on every format): activations are quantized per row to int8 in blocks along K
  (16 columns for int8 weights, 8 for the 4-bit formats; scale = max |x| / 127, round half to
  even), and multiplied with the weight's integer codes by int8 dot-product instructions
  (vpdpbusd / vpmaddubsw / sdot) on a copy of the weight repacked once for this CPU (built on
  first use and cached in ``qw.cache``); the nf4 and fp4 codebooks become 14-bit integers
  (``round(S * value)``, S = :data:`lowbit.formats.CODE_SCALE`: 8128 for nf4, 8064 for fp4,
  whose codes are exact; two int8 terms). The error this adds is
  bounded by ``sum_k |w_k| * d_k / 2`` (d_k the scale of x_k's block; tests/test_fast_path.py)
  and is about 0.3% of |y| in relative L2 norm on Gaussian data; SmolLM2-135M's perplexity
  moves by less than 0.2% against the exact path. Weights whose group size is not a multiple
  of 32 (and not one group per row) take the exact path, as do int4 with float offsets
  (zero_point="float") and int8 with groups or zero-points.

Choose with ``LOWBIT_CPU_PATH=fast|exact`` or :func:`set_cpu_path` (which wins over the variable).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Optional

import torch

from .qweight import QuantizedWeight

try:
    from . import _C  # noqa: F401
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - only on a broken install
    _C = None
    _IMPORT_ERROR = e

# every ISA lowbit has kernels for (a build compiles those of its architecture)
ISAS = ("scalar", "avx2", "avx2vnni", "avx512", "avx512vnni", "avx512amx", "neon", "neon_dotprod")

DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/kernel_api.h DType
_FMT_IDS = {"int8": 0, "int4": 1, "nf4": 2, "fp4": 3}


def ext():
    """The compiled extension, or a clear error if it failed to build/import."""
    if _C is None:
        raise RuntimeError(f"lowbit's C++ extension lowbit._C is not available ({_IMPORT_ERROR}); "
                           "reinstall lowbit (pip install .) to build it")
    return _C


# os.environ.get encodes the key and decodes the value on every call (~1 us, a tenth of a small
# layer's kernel time); on POSIX CPython os.environ keeps its bytes-keyed dict in ``_data``, which
# every os.environ / monkeypatch update goes through, so reading it directly sees the same values.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None


def _getenv(name: str, key: bytes) -> Optional[str]:
    """os.environ.get(name) (key = name encoded), without the per-call encoding where possible."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    v = _ENV_DATA.get(key)
    return None if v is None else os.fsdecode(v)


def num_threads() -> int:
    """LOWBIT_NUM_THREADS if set, else torch.get_num_threads()."""
    if _ENV_DATA is not None and b"LOWBIT_NUM_THREADS" not in _ENV_DATA:  # (the common case, cheaply)
        return torch.get_num_threads()
    env = _getenv("LOWBIT_NUM_THREADS", b"LOWBIT_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"LOWBIT_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1 or n > 4096:
            raise ValueError(f"LOWBIT_NUM_THREADS must be a positive integer (at most 4096), "
                             f"got {env!r}")
        return n
    return torch.get_num_threads()


def _weight_args(qw: QuantizedWeight):
    N, K = qw.shape
    for name, t in qw.tensors().items():
        if t.device.type != "cpu":
            raise ValueError(f"weight tensor '{name}' is on {t.device}, expected cpu")
        if not t.is_contiguous():
            raise ValueError(f"weight tensor '{name}' must be contiguous")
    group = K if qw.group_size == -1 else qw.group_size

    def p(t):
        return 0 if t is None else t.data_ptr()

    return (_FMT_IDS[qw.fmt], N, K, group, qw.symmetric, qw.double_quant,
            qw.data.data_ptr(), qw.data.stride(0), qw.scales.data_ptr(), p(qw.zeros),
            p(qw.dq_scale), p(qw.dq_offset))


# ---- path selection ----------------------------------------------------------------------
CPU_PATHS = ("fast", "exact")
_DEFAULT_PATH = "exact"
_path_override: Optional[str] = None


def set_cpu_path(path: Optional[str]) -> None:
    """Use the ``"fast"`` (int8 activations; on AMX CPUs bfloat16 tiles from M = 8 / 12 / 16
    for nf4 and fp4 / int4 / int8) or ``"exact"`` (float32) CPU path for :func:`lowbit.linear` in this
    process; ``None`` goes back to ``LOWBIT_CPU_PATH`` (default ``"exact"``). Outputs of the
    exact path do not depend on this setting."""
    global _path_override
    if path is not None and path not in CPU_PATHS:
        raise ValueError(f"CPU path must be one of {CPU_PATHS} or None, got {path!r}")
    _path_override = path


@contextlib.contextmanager
def using_cpu_path(path: Optional[str]):
    """``with using_cpu_path("fast"): ...``: :func:`set_cpu_path` for the block, then the
    choice that was in force before (None: leave the path as it is)."""
    if path is None:
        yield
        return
    old = _path_override
    set_cpu_path(path)
    try:
        yield
    finally:
        set_cpu_path(old)


def cpu_path() -> str:
    """The CPU path in use: set_cpu_path's choice, else LOWBIT_CPU_PATH, else "exact"."""
    if _path_override is not None:
        return _path_override
    if _ENV_DATA is not None and b"LOWBIT_CPU_PATH" not in _ENV_DATA:
        return _DEFAULT_PATH
    env = _getenv("LOWBIT_CPU_PATH", b"LOWBIT_CPU_PATH")
    if not env:
        return _DEFAULT_PATH
    if env not in CPU_PATHS:
        raise ValueError(f"LOWBIT_CPU_PATH must be one of {CPU_PATHS}, got {env!r}")
    return env


# ---- packed weights for the fast path ------------------------------------------------------
class _Blob:
    """A weight's packed form for one ISA (``tensor`` None: that ISA's fast path does not
    support the weight, e.g. a group size that is not a multiple of 32)."""

    __slots__ = ("tensor", "ptr", "nbytes", "meta", "run")

    def __init__(self, tensor: Optional[torch.Tensor], meta, isa: str = "", float_offset: bool = False):
        self.tensor = tensor
        self.ptr = 0 if tensor is None else tensor.data_ptr()
        self.nbytes = 0 if tensor is None else tensor.numel()
        self.meta = meta
        # the C++ handle bound to this blob (kept alive by self.tensor): run(x, x_dtype, M, ldx,
        # bias, y, y_dtype, ldy, n_threads), linear_packed with fewer arguments to convert
        self.run = None if tensor is None else ext().PackedLinear(
            self.ptr, self.nbytes, *meta, isa, float_offset=float_offset)


def _tensors(qw: QuantizedWeight):
    """The weight's tensors the CPU kernels read (None where the format has none)."""
    return (qw.data, qw.scales, qw.zeros, qw.dq_scale, qw.dq_offset)


def _same_tensors(src, qw: QuantizedWeight) -> bool:
    """Whether qw holds the tensor objects ``src`` (a :func:`_tensors` of earlier)."""
    return (qw.data is src[0] and qw.scales is src[1] and qw.zeros is src[2]
            and qw.dq_scale is src[3] and qw.dq_offset is src[4])


def _versions(qw: QuantizedWeight):
    # Inference tensors (made under torch.inference_mode) have no version counter and can only
    # change in place inside inference mode; they are matched by identity alone (and never
    # through _SHARED).
    return tuple(-1 if t.is_inference() else t._version for t in _tensors(qw) if t is not None)


class _Entry:
    """qw.cache's entry: the blob, valid while qw's tensors are the same objects (held here)
    at the same versions (an in-place update such as load_state_dict's copy_ bumps them)."""

    __slots__ = ("blob", "src", "versions", "tracked", "present", "current")

    def __init__(self, qw: QuantizedWeight, blob: _Blob, versions):
        self.blob = blob
        self.src = _tensors(qw)
        self.versions = versions
        self.tracked = -1 not in versions
        self.present = tuple(t for t in self.src if t is not None)  # the tensors `versions` is of
        self.current = _version_reader(self.present) if self.tracked else None

    def valid_for(self, qw: QuantizedWeight) -> bool:
        # (an entry of qw.cache: reassigning a field of qw clears that dict, so the identity of
        # its data is a guard for an entry moved by hand; the versions catch in-place updates)
        if qw.data is not self.src[0]:
            return False
        return not self.tracked or self.current() == self.versions


def _version_reader(ts):
    """A function returning the tuple of the tensors' ``_version``s, written out for the common
    counts (a loop over them costs ~0.7 us per call, a tenth of a small layer's kernel)."""
    if len(ts) == 1:
        a, = ts
        return lambda: (a._version,)
    if len(ts) == 2:
        a, b = ts
        return lambda: (a._version, b._version)
    if len(ts) == 3:
        a, b, c = ts
        return lambda: (a._version, b._version, c._version)
    return lambda: tuple(t._version for t in ts)


# Packed forms also kept by the identity of the weight's data tensor, for callers that build a
# new QuantizedWeight around the same tensors on every call (the torch.library op path under
# autograd or torch.compile): (id(data), isa) -> (weakrefs to the tensors, versions, _Blob).
# Entries go away with the data tensor; they hold no strong reference to any weight tensor.
_SHARED: dict = {}


def _forget(key):
    _SHARED.pop(key, None)


def _meta(qw: QuantizedWeight):
    N, K = qw.shape
    group = K if qw.group_size == -1 else qw.group_size
    return (_FMT_IDS[qw.fmt], N, K, group, qw.symmetric, qw.double_quant)


def packed_weight(qw: QuantizedWeight, isa: str = "") -> Optional[torch.Tensor]:
    """The weight's packed form for ``isa`` (default: the active one) as a uint8 tensor, built
    on first use (thread-parallel) and cached in ``qw.cache``; None when that ISA's fast path
    does not support the weight (group size not a multiple of 32)."""
    return _packed(qw, isa or ext().active_isa()).tensor


def _packed(qw: QuantizedWeight, isa: str) -> _Blob:
    key = "cpu_packed:" + isa
    e = qw.cache.get(key)
    if e is not None and e.valid_for(qw):
        return e.blob
    versions = _versions(qw)
    tracked = -1 not in versions
    skey = (id(qw.data), isa)
    hit = _SHARED.get(skey) if tracked else None
    blob = None
    if hit is not None:
        refs, vers, b = hit
        if vers == versions and all((r is None and t is None) or (r is not None and r() is t)
                                    for r, t in zip(refs, _tensors(qw))):
            blob = b
    if blob is None:
        blob = _build_blob(qw, isa)
        if tracked:
            refs = tuple(None if t is None else weakref.ref(t) for t in _tensors(qw))
            _SHARED[skey] = (refs, versions, blob)
            weakref.finalize(qw.data, _forget, skey)
    qw.cache[key] = _Entry(qw, blob, versions)
    return blob


def _build_blob(qw: QuantizedWeight, isa: str) -> _Blob:
    C = ext()
    meta = _meta(qw)
    fo = qw.zero_point == "float"
    size = C.packed_size(*meta, isa, float_offset=fo)
    if size == 0:
        return _Blob(None, meta)
    blob = torch.empty(size, dtype=torch.uint8)
    C.pack(*_weight_args(qw), blob.data_ptr(), size, num_threads(), isa, float_offset=fo)
    return _Blob(blob, meta, isa, fo)


def linear(x2d: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor],
           out: torch.Tensor, isa: str = "", path: Optional[str] = None) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T + bias. x2d must have unit inner stride; bias float32 or None.

    ``isa`` forces one ISA for this call ("" = the active one); ``path`` forces "fast" or
    "exact" for this call (default: :func:`cpu_path`)."""
    M, K = x2d.shape
    sx = x2d.stride()
    # unit inner stride, and rows that do not overlap (an expanded x has row stride 0: the
    # kernels step rows by max(ldx, K) and would read past its storage)
    if (sx[1] != 1 and K > 1) or (M > 1 and sx[0] < K):
        x2d = x2d.contiguous()
        sx = x2d.stride()
    ldx = sx[0] if M > 1 else K
    N = out.shape[1]
    ldy = out.stride(0) if M > 1 else N
    return linear_rows(x2d, DTYPE_IDS[x2d.dtype], M, max(ldx, K), qw, bias, out, DTYPE_IDS[out.dtype],
                       ldy, isa, path)


def linear_rows(x: torch.Tensor, x_dt: int, M: int, ldx: int, qw: QuantizedWeight,
                bias: Optional[torch.Tensor], out: torch.Tensor, out_dt: int, ldy: int,
                isa: str = "", path: Optional[str] = None) -> torch.Tensor:
    """The kernel call of :func:`linear`, with its layout given: M rows of x ldx elements apart
    (any shape with that memory layout, unit inner stride; x_dt its dtype id, DTYPE_IDS), out
    rows ldy apart. Nothing is checked or queried here (lowbit.ops' eager lane calls it)."""
    C = _C if _C is not None else ext()
    b0 = 0 if bias is None else bias.data_ptr()
    fast = (path or cpu_path()) == "fast"
    if not isa:
        # the handle this weight last ran on for the active ISA (qw.cache "cpu_lane:<path>"):
        # no ISA name, cache key or packed-entry lookup per call; call_active declines (False)
        # when the active ISA is no longer the handle's
        lane = qw.cache.get("cpu_lane:fast" if fast else "cpu_lane:exact")
        if lane is not None and lane[1].valid_for(qw) and C.call_active(
                lane[0], x.data_ptr(), x_dt, M, ldx, b0, out.data_ptr(), out_dt, ldy, num_threads()):
            return out
    name = isa or C.active_isa()
    if fast:
        e = qw.cache.get("cpu_packed:" + name)
        if e is None or not e.valid_for(qw):
            _packed(qw, name)
            e = qw.cache["cpu_packed:" + name]
        if e.blob.run is not None:
            C.call(e.blob.run, x.data_ptr(), x_dt, M, ldx, b0, out.data_ptr(), out_dt, ldy, num_threads())
            if not isa:
                qw.cache["cpu_lane:fast"] = (e.blob.run, e)
            return out
    e = qw.cache.get("cpu_exact:" + name)
    if e is None or not e.valid_for(qw):
        e = _Exact(qw, name)
        qw.cache["cpu_exact:" + name] = e
    C.call(e.run, x.data_ptr(), x_dt, M, ldx, b0, out.data_ptr(), out_dt, ldy, num_threads())
    if not isa:
        qw.cache["cpu_lane:exact"] = (e.run, e)
    return out


class _Exact:
    """qw.cache's handle of the exact path: the C++ call with the weight's pointers bound
    (ExactLinear), valid while qw holds the same tensors at the same addresses."""

    __slots__ = ("run", "src", "ptrs")

    def __init__(self, qw: QuantizedWeight, isa: str):
        self.src = _tensors(qw)
        self.ptrs = tuple(0 if t is None else t.data_ptr() for t in self.src)
        self.run = ext().ExactLinear(*_weight_args(qw), isa, float_offset=qw.zero_point == "float")

    def valid_for(self, qw: QuantizedWeight) -> bool:
        # the same tensor objects, and (the handle holds raw pointers) at the same addresses:
        # set_() could have given one of them other storage
        return _same_tensors(self.src, qw) and all(
            t is None or t.data_ptr() == p for t, p in zip(self.src, self.ptrs))


def dequantize(qw: QuantizedWeight, dtype: torch.dtype, isa: str = "") -> torch.Tensor:
    out = torch.empty(qw.shape, dtype=dtype)
    ext().dequantize(*_weight_args(qw), out.data_ptr(), DTYPE_IDS[dtype], out.stride(0),
                     num_threads(), isa, float_offset=qw.zero_point == "float")
    return out
