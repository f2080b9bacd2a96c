"""CPU matmul benchmark: lowbit ``linear`` per format beside torch's F.linear, same process.

Used by ``lowbit bench``, ``lowbit demo`` and ``bench/cpu.py``. A benchmark is not a test: it
prints figures and writes JSON, and asserts nothing about speed.

Method (see DESIGN.md, "Measuring"):

* Weights are rotated: each case builds several copies of its weight, enough that together
  they exceed twice the last-level cache (32 MB here), and successive calls cycle through them,
  so every call streams its weight from memory as in a real model, instead of from the cache.
* Each call is timed alone (``time.perf_counter``); the figure is the median over the
  repetitions (``reps``, cut short by a per-case time budget but never below ``min_reps``).
* Baselines run in the same process on the same inputs: torch fp32 ``F.linear`` (the speed-up
  column divides its time by the others') and torch bf16.
* Weight GB/s counts the bytes the kernel must read for the weight: on lowbit's CPU fast path
  (int8 activations) the weight's repacked copy, which that path streams instead of the
  QuantizedWeight; on the exact path the QuantizedWeight's ``nbytes`` (codes + scales +
  zeros); for torch the float weight. GFLOP/s counts 2*M*N*K.
* ``cpu_path`` ("fast" / "exact", default: lowbit's own default) is set for the whole run and
  recorded with the results; "both" measures every lowbit row on each path in turn (rows
  labelled e.g. "int4-g128 fast" and "int4-g128 exact"), what ``lowbit bench`` does unless a
  path is named.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

# (label, lowbit format, quantize_weight options). Labels are what tables and JSON show.
LOWBIT_IMPLS: Dict[str, Tuple[str, dict]] = {
    "int8": ("int8", {}),
    "int4-g128": ("int4", {"group_size": 128}),
    "nf4-b64": ("nf4", {"group_size": 64}),
    "fp4-b64": ("fp4", {"group_size": 64}),  # (not in the default set: --impls)
}
TORCH_IMPLS = ("torch-fp32", "torch-bf16")
# Other weight-quantized CPU matmuls, run side by side when this torch / machine has them:
#  torch-int8pack   torch.ops.aten._weight_int8pack_mm (int8 per-row weight, float activations)
#  torch-int4pack   _weight_int4pack_mm_for_cpu after _convert_weight_to_int4pack_for_cpu
#                   (int4 group 128, bf16 activations and scales: its fast path)
#  torch-dyn-int8   torch.ao.quantization.quantize_dynamic (fbgemm/x86: int8 weights and
#                   dynamically quantized int8 activations)
#  bnb-nf4, bnb-int8  bitsandbytes' Linear4bit (nf4, block 64) / Linear8bitLt on the CPU
#  bnb-fp4          bitsandbytes' Linear4bit with its default quant_type, fp4 (block 64)
PEER_IMPLS = ("torch-int8pack", "torch-int4pack", "torch-dyn-int8", "bnb-nf4", "bnb-int8",
              "bnb-fp4")
OPTIONAL_IMPLS = ("fp4-b64", "bnb-fp4")  # only when --impls names them
DEFAULT_IMPLS = tuple(i for i in LOWBIT_IMPLS if i not in OPTIONAL_IMPLS) + TORCH_IMPLS
ALL_IMPLS = tuple(LOWBIT_IMPLS) + TORCH_IMPLS + PEER_IMPLS
FULL_IMPLS = tuple(i for i in ALL_IMPLS if i not in OPTIONAL_IMPLS)  # --full / --peers
CPU_PATH_CHOICES = ("fast", "exact", "both")  # run_bench's cpu_path


def default_cpu_path(requested: Optional[str]) -> Optional[str]:
    """The ``cpu_path`` a benchmark runs with: the one requested, else "both" (lowbit's default
    exact path beside the fast one) unless LOWBIT_CPU_PATH names a path or this build has one
    path only (then None: the path in force)."""
    if requested is not None:
        return requested
    from . import _backend
    if os.environ.get("LOWBIT_CPU_PATH") or len(getattr(_backend, "CPU_PATHS", ())) < 2:
        return None
    return "both"


def _paths_of(cpu_path: Optional[str]) -> Tuple[Optional[str], ...]:
    """The paths each lowbit row runs on for a ``cpu_path`` argument (validated)."""
    if cpu_path is not None and cpu_path not in CPU_PATH_CHOICES:
        raise ValueError(f"cpu_path must be one of {CPU_PATH_CHOICES} or None, got {cpu_path!r}")
    return ("fast", "exact") if cpu_path == "both" else (cpu_path,)


def _mixed_paths(paths) -> bool:
    """Whether rows of more than one CPU path are present (labels then name the path)."""
    return len({p for p in paths if p}) > 1

DEFAULT_SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 4096), (4096, 11008))  # (K, N)
DEFAULT_MS: Tuple[int, ...] = (1, 8, 32)
FULL_SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_MS: Tuple[int, ...] = (1, 8, 32, 128)


# ---- helpers ------------------------------------------------------------------------------
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (Linux sysfs), else ``default`` (32 MB, this machine's L3)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    s = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            num = s[:-1] if s[-1:] in "KMG" else s
            if num.isdigit():
                best = max(best, int(num) * mult)
    except OSError:
        pass
    return best or default


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(K, N), ...] (K = in_features, N = out_features)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            k, n = part.split("x")
            shapes.append((int(k), int(n)))
        except ValueError:
            raise ValueError(f"bad shape {part!r}: expected KxN, e.g. 4096x11008") from None
        if shapes[-1][0] <= 0 or shapes[-1][1] <= 0:
            raise ValueError(f"bad shape {part!r}: K and N must be positive")
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def parse_ints(text: str, what: str = "value") -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bad {what} list {text!r}: expected comma-separated integers") from None
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"bad {what} list {text!r}: expected positive integers")
    return vals


def fmt_num(v) -> str:
    """A float for a table: about 3 significant digits, no exponent for ordinary sizes."""
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.2f}"
    return f"{v:.2g}"


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain-text table: numbers formatted by :func:`fmt_num` and right-aligned (tabulate's
    'simple' style when tabulate is installed, else an equivalent built-in)."""
    ncol = len(headers)
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                   for r in rows if r[i] is not None) and bool(rows) for i in range(ncol)]
    cells = [[fmt_num(v) for v in r] for r in rows]
    try:
        from tabulate import tabulate
        return tabulate(cells, headers=list(headers), disable_numparse=True,
                        colalign=["right" if n else "left" for n in numeric])
    except ImportError:
        pass
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric))

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def time_calls(fns: Sequence[Callable[[], object]], reps: int, *, warmup: int = 5,
               min_reps: int = 3, max_seconds: float = float("inf")) -> List[float]:
    """Seconds per call, cycling through ``fns`` (one per rotated weight copy).

    Calls each function once untimed (a backend may build a per-weight cache on first use),
    then up to ``warmup`` more (at least 2; fewer once they take a quarter of ``max_seconds``),
    then up to ``reps`` timed ones, stopping early once
    ``max_seconds`` have been spent and at least ``min_reps`` calls were timed.
    """
    n = len(fns)
    t0 = time.perf_counter()
    fns[0]()
    first = time.perf_counter() - t0
    if first > max_seconds:  # hopelessly slow here (e.g. bf16 matmul without native bf16):
        return [first]       # one call is the figure; the rest would only burn time
    for fn in fns[1:]:  # every copy once: a backend may build a per-weight cache (repacked layout)
        fn()
    t_warm = time.perf_counter()
    for i in range(warmup):  # more calls: JIT / primitive creation in some backends
        fns[i % n]()
        if i >= 1 and time.perf_counter() - t_warm > max_seconds / 4:
            break
    times: List[float] = []
    start = time.perf_counter()
    for i in range(reps):
        fn = fns[(warmup + i) % n]
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - start > max_seconds:
            break
    return times


# ---- results ------------------------------------------------------------------------------
@dataclass
class BenchResult:
    impl: str  # "int4-g128", "torch-fp32", ...
    K: int
    N: int
    M: int
    median_us: float
    min_us: float
    reps: int
    copies: int  # rotated weight copies cycled through
    weight_bytes: int  # bytes one call must read for its weight (codes + scales + zeros)
    weight_gbps: float
    gflops: float
    speedup_vs_fp32: Optional[float] = None
    threads: int = 0
    extra: dict = field(default_factory=dict)


def _clone_qw(qw):
    """A QuantizedWeight with its own copies of every tensor (one more rotation buffer)."""
    from .qweight import QuantizedWeight
    t = {k: (None if getattr(qw, k) is None else getattr(qw, k).clone())
         for k in ("data", "scales", "zeros", "dq_scale", "dq_offset")}
    return QuantizedWeight(qw.fmt, qw.shape, t["data"], t["scales"], t["zeros"],
                           group_size=qw.group_size, symmetric=qw.symmetric,
                           double_quant=qw.double_quant, dq_scale=t["dq_scale"],
                           dq_offset=t["dq_offset"])


def current_cpu_path() -> str:
    """lowbit's CPU linear path in use ("fast": int8 activations; "exact": float32)."""
    from . import _backend
    fn = getattr(_backend, "cpu_path", None)
    return fn() if fn is not None else "exact"


def _streamed_bytes(qw) -> int:
    """Bytes of weight one lowbit.linear call reads: the fast path's repacked copy when that
    path takes this weight (built here, on first use, as the first call would), else the
    QuantizedWeight's tensors."""
    from . import _backend
    if current_cpu_path() == "fast" and getattr(_backend, "packed_weight", None) is not None:
        blob = _backend.packed_weight(qw)
        if blob is not None:
            return blob.numel() * blob.element_size()
    return qw.nbytes


def _copies_for(nbytes: int, rotate_bytes: int, max_copies: int = 64) -> int:
    return int(min(max_copies, max(2, math.ceil(rotate_bytes / max(nbytes, 1)))))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


class PeerUnavailable(RuntimeError):
    """A peer implementation this torch / machine does not have (the row is skipped)."""


def _peer_layer(impl: str, w: torch.Tensor, x: torch.Tensor):
    """One peer's callable for weight ``w`` [N, K]: (fn(x) -> y, bytes of weight it reads,
    the activation it takes). Raises PeerUnavailable when this install lacks it."""
    N, K = w.shape
    aten = torch.ops.aten
    if impl == "torch-int8pack":
        if not hasattr(aten, "_weight_int8pack_mm"):
            raise PeerUnavailable("torch has no _weight_int8pack_mm")
        s = (w.abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        s = s.to(x.dtype)
        return (lambda xx: aten._weight_int8pack_mm(xx, q, s)), q.numel() + s.numel() * s.element_size(), x
    if impl == "torch-int4pack":
        if not hasattr(aten, "_convert_weight_to_int4pack_for_cpu"):
            raise PeerUnavailable("torch has no _weight_int4pack_mm_for_cpu")
        g = 128
        if K % g:
            raise PeerUnavailable(f"torch's int4 op needs K % {g} == 0")
        wg = w.reshape(N, K // g, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        sc = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((wg - lo) / sc).clamp(0, 15).reshape(N, K).to(torch.int32)
        zero = lo + 8 * sc  # torch's convention: w = (q - 8) * scale + zero
        packed = aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([sc.reshape(N, K // g), zero.reshape(N, K // g)], -1).transpose(0, 1)
        sz = sz.contiguous().to(torch.bfloat16)
        xb = x.to(torch.bfloat16)  # its fast path (fp32 activations take a much slower one)
        nbytes = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
        return (lambda xx: aten._weight_int4pack_mm_for_cpu(xx, packed, g, sz)), nbytes, xb
    if impl == "torch-dyn-int8":
        import warnings
        lin = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                       dtype=torch.qint8)
        return m, N * K + 8, x.to(torch.float32)
    if impl in ("bnb-nf4", "bnb-fp4", "bnb-int8"):
        try:
            import bitsandbytes as bnb
        except Exception as e:  # not installed, or no usable backend
            raise PeerUnavailable(f"bitsandbytes not importable ({type(e).__name__})") from None
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if impl in ("bnb-nf4", "bnb-fp4"):
                qt = impl[4:]
                lay = bnb.nn.Linear4bit(K, N, bias=False, quant_type=qt, compute_dtype=x.dtype)
                lay.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=qt,
                                               blocksize=64)
                lay = lay.to("cpu")
                qs = lay.weight.quant_state
                nbytes = lay.weight.numel() + qs.absmax.numel() * qs.absmax.element_size()
            else:
                lay = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=0.0)
                lay.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
                lay = lay.to("cpu")
                nbytes = N * K + N * 4
        return lay, nbytes, x
    raise ValueError(f"unknown implementation {impl!r}; expected one of {list(ALL_IMPLS)}")


def bench_case(K: int, N: int, M: int, impls: Iterable[str] = DEFAULT_IMPLS, *, reps: int = 20,
               warmup: int = 5, min_reps: int = 3, max_seconds: float = 2.0,
               rotate_bytes: Optional[int] = None, threads: Optional[int] = None,
               seed: int = 0, dtype: torch.dtype = torch.float32,
               bandwidth_gbps: Optional[float] = None,
               cpu_paths: Sequence[Optional[str]] = (None,)) -> List[BenchResult]:
    """Benchmark every implementation on one (K, N, M) case, in this process.

    ``dtype`` is the activation dtype of lowbit and of the peers that take float activations
    (torch's int4 op always gets bf16, its fast path). Every row also records ``rel_err``:
    ||y - x W^T|| / ||x W^T|| against the original float32 weight (quantization error
    included: a check that each implementation computes what it should). Each lowbit row is
    measured once per entry of ``cpu_paths`` ("fast" / "exact"; None: the path in force) and
    records the path it ran on as ``extra["cpu_path"]``."""
    import lowbit
    from . import _backend

    if rotate_bytes is None:
        rotate_bytes = 2 * last_level_cache_bytes()
    if threads is None:
        threads = lowbit._backend.num_threads()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x32 = torch.randn(M, K, generator=g)
    x = x32.to(dtype)
    ref = F.linear(x.float(), w)
    out: List[BenchResult] = []
    flops = 2.0 * M * N * K
    kw = dict(reps=reps, warmup=warmup, min_reps=min_reps, max_seconds=max_seconds,
              rotate_bytes=rotate_bytes, threads=threads, bandwidth_gbps=bandwidth_gbps)
    for impl in impls:
        if impl not in LOWBIT_IMPLS:
            out.append(_bench_one(impl, w, x, ref, flops, K, N, M, **kw))
            continue
        for path in cpu_paths:
            with _backend.using_cpu_path(path):
                r = _bench_one(impl, w, x, ref, flops, K, N, M, **kw)
                r.extra["cpu_path"] = current_cpu_path()
            out.append(r)
    base = next((r for r in out if r.impl == "torch-fp32"), None)
    if base is not None:
        for r in out:
            r.speedup_vs_fp32 = base.median_us / r.median_us if r.reps else None
    return out


def _bench_one(impl: str, w: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, flops: float,
               K: int, N: int, M: int, *, reps: int, warmup: int, min_reps: int,
               max_seconds: float, rotate_bytes: int, threads: int,
               bandwidth_gbps: Optional[float]) -> BenchResult:
    """One row of :func:`bench_case` (a lowbit row on the CPU path in force)."""
    import lowbit
    xin = x
    if impl in LOWBIT_IMPLS:
        fmt, opts = LOWBIT_IMPLS[impl]
        qw = lowbit.quantize_weight(w, fmt, **opts)
        nbytes = _streamed_bytes(qw)
        copies = [qw] + [_clone_qw(qw) for _ in range(_copies_for(nbytes, rotate_bytes) - 1)]
        fns = [(lambda q=q: lowbit.linear(x, q)) for q in copies]
    elif impl in TORCH_IMPLS:
        wdt = torch.float32 if impl == "torch-fp32" else torch.bfloat16
        wd = w.to(wdt)
        xin = x.to(wdt)
        nbytes = wd.numel() * wd.element_size()
        copies = [wd] + [wd.clone() for _ in range(_copies_for(nbytes, rotate_bytes) - 1)]
        fns = [(lambda c=c: F.linear(xin, c)) for c in copies]
    else:
        try:
            import copy
            first, nbytes, xin = _peer_layer(impl, w, x)
            n_copies = _copies_for(nbytes, rotate_bytes)
            try:  # copies of the built layer (quantizing again per copy is slow)
                copies = [first] + [copy.deepcopy(first) for _ in range(n_copies - 1)]
            except Exception:
                copies = [first] + [_peer_layer(impl, w, x)[0] for _ in range(n_copies - 1)]
        except PeerUnavailable as e:
            return BenchResult(impl=impl, K=K, N=N, M=M, median_us=float("nan"),
                               min_us=float("nan"), reps=0, copies=0, weight_bytes=0,
                               weight_gbps=float("nan"), gflops=float("nan"),
                               threads=threads, extra={"skipped": str(e)})
        fns = [(lambda c=c: c(xin)) for c in copies]
    with torch.inference_mode():
        y = fns[0]()
        times = time_calls(fns, reps, warmup=warmup, min_reps=min_reps, max_seconds=max_seconds)
    med = statistics.median(times)
    r = BenchResult(impl=impl, K=K, N=N, M=M, median_us=med * 1e6, min_us=min(times) * 1e6,
                    reps=len(times), copies=len(copies), weight_bytes=int(nbytes),
                    weight_gbps=nbytes / med / 1e9, gflops=flops / med / 1e9, threads=threads)
    r.extra["rel_err"] = _rel_err(y, ref)
    r.extra["x_dtype"] = str(xin.dtype).replace("torch.", "")
    if bandwidth_gbps:
        r.extra["bw_fraction"] = r.weight_gbps / bandwidth_gbps
    return r


# ---- machine limits -----------------------------------------------------------------------
def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 7) -> float:
    """Streaming read bandwidth in GB/s: the median time of summing a float32 buffer much
    larger than the caches (torch's reduction, on torch's threads)."""
    n = nbytes // 4
    buf = torch.ones(n, dtype=torch.float32)
    buf.sum()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        ts.append(time.perf_counter() - t0)
    del buf
    return nbytes / statistics.median(ts) / 1e9


def measure_matmul(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """torch's square matmul rate in GFLOP/s for ``dtype`` (n x n x n, median of ``reps``;
    n is halved while one call takes over half a second, for CPUs without native bf16)."""
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        a @ b
        if time.perf_counter() - t0 < 0.5 or n <= 256:
            break
        n //= 2
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(ts) / 1e9


def machine_limits(threads: Optional[int] = None) -> Dict[str, float]:
    """Read bandwidth (GB/s) and fp32 / bf16 matmul rates (GFLOP/s) with ``threads``."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return {"read_gbps": measure_bandwidth(), "fp32_gflops": measure_matmul(torch.float32),
                "bf16_gflops": measure_matmul(torch.bfloat16)}
    finally:
        torch.set_num_threads(old)


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["LOWBIT_NUM_THREADS"] = str(n)


def run_bench(shapes: Sequence[Tuple[int, int]] = DEFAULT_SHAPES, ms: Sequence[int] = DEFAULT_MS,
              impls: Sequence[str] = DEFAULT_IMPLS, *, reps: int = 20,
              threads: Union[None, int, Sequence[int]] = None,
              max_seconds: float = 2.0, progress: bool = True, cpu_path: Optional[str] = None,
              on_case: Optional[Callable[[List[BenchResult]], None]] = None,
              bandwidth_gbps: Union[None, float, Dict[int, float]] = None,
              **kw) -> List[BenchResult]:
    """All (shape, M) cases; ``threads`` sets torch's and lowbit's thread count for the run,
    ``cpu_path`` lowbit's CPU path ("fast" or "exact"; "both": every lowbit row on each; None:
    as configured); ``on_case`` is called with each case's results as soon as they exist (e.g.
    to print them).

    ``threads`` may list several counts (thread scaling): each case is then measured with each
    count in turn, one right after the other (on a shared machine whose speed drifts, separate
    runs minutes apart can skew the ratio either way), and every row records
    ``extra["scaling"]``, its speed-up over the same row at the first count.
    ``bandwidth_gbps`` may then map each count to the read bandwidth measured with it."""
    counts = [threads] if threads is None or isinstance(threads, int) else [int(t) for t in threads]
    if not counts or any(t is not None and t < 1 for t in counts):
        raise ValueError(f"threads must be positive, got {threads!r}")
    if len(counts) > 1:
        old_threads = torch.get_num_threads()
        old_env = os.environ.get("LOWBIT_NUM_THREADS")
        bw = bandwidth_gbps if isinstance(bandwidth_gbps, dict) else {t: bandwidth_gbps for t in counts}
        results: List[BenchResult] = []
        cases = [(K, N, M) for (K, N) in shapes for M in ms]
        it = cases
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(cases, desc="bench", unit="case", leave=False)
        try:
            for K, N, M in it:
                case: List[BenchResult] = []
                for t in counts:
                    case += run_bench([(K, N)], [M], impls, reps=reps, threads=t, max_seconds=max_seconds,
                                      progress=False, cpu_path=cpu_path, bandwidth_gbps=bw.get(t), **kw)
                first = {(r.impl, r.extra.get("cpu_path")): r for r in case if r.threads == counts[0]}
                for r in case:
                    b = first.get((r.impl, r.extra.get("cpu_path")))
                    if b is not None and b.reps and r.reps:
                        r.extra["scaling"] = b.median_us / r.median_us
                results += case
                if on_case is not None:
                    on_case(case)
        finally:
            torch.set_num_threads(old_threads)
            if old_env is None:
                os.environ.pop("LOWBIT_NUM_THREADS", None)
            else:
                os.environ["LOWBIT_NUM_THREADS"] = old_env
        return results
    threads = counts[0]
    if isinstance(bandwidth_gbps, dict):
        bandwidth_gbps = bandwidth_gbps.get(threads)
    kw["bandwidth_gbps"] = bandwidth_gbps
    from . import _backend
    impls = list(impls)
    if "torch-fp32" not in impls:
        impls.append("torch-fp32")  # the speed-up column needs the baseline
    if cpu_path is not None and not hasattr(_backend, "set_cpu_path"):
        raise ValueError("this build of lowbit has a single CPU path; cpu_path must be None")
    paths = _paths_of(cpu_path)
    old_threads = torch.get_num_threads()
    old_env = os.environ.get("LOWBIT_NUM_THREADS")
    if threads is not None:
        _set_threads(threads)
    try:
        cases = [(K, N, M) for (K, N) in shapes for M in ms]
        results: List[BenchResult] = []
        it = cases
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(cases, desc="bench", unit="case", leave=False)
        for K, N, M in it:
            case = bench_case(K, N, M, impls, reps=reps, threads=threads, max_seconds=max_seconds,
                              cpu_paths=paths, **kw)
            results += case
            if on_case is not None:
                on_case(case)
        return results
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
            if old_env is None:
                os.environ.pop("LOWBIT_NUM_THREADS", None)
            else:
                os.environ["LOWBIT_NUM_THREADS"] = old_env


def row_label(r: BenchResult, mixed: bool) -> str:
    """A row's implementation label: with rows of both CPU paths (``mixed``, see _mixed_paths)
    lowbit rows get their path appended ("int4-g128 fast")."""
    path = r.extra.get("cpu_path")
    return f"{r.impl} {path}" if mixed and path else r.impl


def results_table(results: Sequence[BenchResult]) -> str:
    """One row per (shape, M, impl): µs, weight GB/s, GFLOP/s, speed-up over torch fp32, the
    weight GB/s as a fraction of the measured read bandwidth (when measured), relative error
    against the float32 weight; skipped peers say why."""
    has_bw = any("bw_fraction" in r.extra for r in results)
    mixed = _mixed_paths(r.extra.get("cpu_path") for r in results)
    counts = list(dict.fromkeys(r.threads for r in results))
    scaling = len(counts) > 1  # rows of several thread counts (run_bench's scaling mode)
    headers = ["K x N", "M", "impl", "x"] + (["threads"] if scaling else [])
    headers += ["µs", "weight GB/s", "GFLOP/s", "vs fp32"]
    headers += [f"vs {counts[0]} thr"] if scaling else []
    headers += ["of BW"] if has_bw else []
    headers += ["rel err"]
    rows = []
    for r in results:
        lead = [f"{r.K}x{r.N}", r.M] + ([r.impl, ""] if not r.reps else [row_label(r, mixed), r.extra.get("x_dtype", "")])
        lead += [r.threads] if scaling else []
        if not r.reps:
            rows.append(lead + [None, None, None, "skipped: " + r.extra.get("skipped", "")]
                        + ([""] if scaling else []) + ([""] if has_bw else []) + [""])
            continue
        row = lead + [r.median_us, r.weight_gbps, r.gflops,
                      (f"{r.speedup_vs_fp32:.2f}x" if r.speedup_vs_fp32 else "")]
        if scaling:
            sc = r.extra.get("scaling")
            row.append(f"{sc:.2f}x" if sc is not None else "")
        if has_bw:
            f = r.extra.get("bw_fraction")
            row.append(f"{f:.0%}" if f is not None else "")
        e = r.extra.get("rel_err")
        row.append(f"{e:.1e}" if e is not None else "")
        rows.append(row)
    return format_table(rows, headers)


def plot_speedups(results: Sequence[BenchResult], path: str, title: str = "") -> None:
    """A PNG: speed-up over torch fp32 F.linear vs M, one line per implementation, one panel
    per weight shape (matplotlib, from the eval extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(r.K, r.N) for r in results})
    mixed = _mixed_paths(r.extra.get("cpu_path") for r in results)
    several = len({r.threads for r in results}) > 1  # scaling mode: a line per thread count

    def label_of(r):
        return row_label(r, mixed) + (f" ({r.threads} thr)" if several else "")

    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (K, N) in zip(axes[0], shapes):
        rs = [r for r in results if (r.K, r.N) == (K, N) and r.reps and r.speedup_vs_fp32]
        for label in dict.fromkeys(label_of(r) for r in rs):
            sel = [r for r in rs if label_of(r) == label]
            pts = sorted((r.M, r.speedup_vs_fp32) for r in sel)
            style = ("-o" if sel[0].extra.get("cpu_path") != "exact" else ":o") \
                if sel[0].impl in LOWBIT_IMPLS else "--."
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speed-up over torch fp32")
        ax.set_title(f"K={K}, N={N}")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    """Machine and backend facts to store with the figures."""
    import lowbit
    info = lowbit.backend_info()
    return {"host": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "llc_bytes": last_level_cache_bytes(),
            "torch": torch.__version__, "lowbit": info.get("version"), "cpu_isa": info.get("cpu_isa"),
            "cpu_features": info.get("cpu_features"), "num_threads": info.get("num_threads"),
            "cpu_path": current_cpu_path(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str, results: Sequence[BenchResult], **meta) -> None:
    doc = {"environment": environment(), **meta, "results": [asdict(r) for r in results]}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


# ---- model decode -------------------------------------------------------------------------
# Format names of the decode benchmark -> how the model's linear layers are stored.
DECODE_FORMATS = {
    "fp32": None, "bf16": None,
    "int8": ("int8", {}), "int4": ("int4", {"group_size": 128}), "nf4": ("nf4", {"group_size": 64}),
}


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _decode_one(fmt: str, new_tokens: int, threads: Optional[int], model_path: Optional[str],
                cpu_path: Optional[str] = None) -> dict:
    """Load the model, store its linear layers (lm_head kept) as ``fmt``, and time greedy
    decoding with the KV cache on lowbit's CPU path ``cpu_path`` (None: as configured); runs
    in a fresh process so its peak memory (the fast path's repacked copies included) is its
    own."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["LOWBIT_NUM_THREADS"] = str(threads)
    import lowbit
    from lowbit import _backend
    from lowbit import evaluate as E
    if cpu_path is not None:
        _backend.set_cpu_path(cpu_path)
    model, tok, desc = E.load_model(model_path, verbose=False)
    t0 = time.perf_counter()
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    elif DECODE_FORMATS.get(fmt) is not None:
        # round-to-nearest through quantize_model: every Linear / Conv1D / fused MoE expert
        # module but lm_head (and the model's _keep_in_fp32_modules)
        f, opts = DECODE_FORMATS[fmt]
        lowbit.quantize_model(model, lowbit.QuantConfig(format=f, **opts), progress=False)
    prep_s = time.perf_counter() - t0
    import gc
    gc.collect()
    weights = sum(t.numel() * t.element_size() for t in
                  list(model.parameters()) + list(model.buffers()))
    prompt = tok("The history of the city", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        E.decode_speed(model, prompt, 4)  # warm-up (first-call caches, repacking)
        tps = E.decode_speed(model, prompt, new_tokens)
    return {"format": fmt, "tokens_per_s": tps, "model_bytes": weights, "peak_rss_bytes": _peak_rss(),
            "prepare_s": prep_s, "threads": torch.get_num_threads(), "model": desc,
            "cpu_path": current_cpu_path() if DECODE_FORMATS.get(fmt) is not None else None}


def decode_bench(formats: Sequence[str] = ("fp32", "bf16", "int8", "int4", "nf4"), *,
                 new_tokens: int = 64, threads: Optional[int] = None,
                 model_path: Optional[str] = None, cpu_path: Optional[str] = None) -> List[dict]:
    """Decode tokens/s and peak memory of the bundled model (or ``model_path``) per format,
    each in its own process. Formats: fp32, bf16 (the float model cast), int8, int4 (g128),
    nf4 (b64) with QuantLinear (lm_head and embeddings kept in float). ``cpu_path``: lowbit's
    CPU path for the quantized formats ("fast", "exact", "both": a row on each; None: as
    configured)."""
    import multiprocessing as mp
    for f in formats:
        if f not in DECODE_FORMATS:
            raise ValueError(f"unknown decode format {f!r}; expected some of {list(DECODE_FORMATS)}")
    paths = _paths_of(cpu_path)
    jobs = [(f, p) for f in formats for p in (paths if DECODE_FORMATS[f] is not None else (None,))]
    ctx = mp.get_context("spawn")
    rows = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for f, p in jobs:
            rows.append(pool.apply(_decode_one, (f, new_tokens, threads, model_path, p)))
    base = next((r for r in rows if r["format"] == "fp32"), None)
    for r in rows:
        r["speedup_vs_fp32"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    return rows


def decode_table(rows: Sequence[dict]) -> str:
    headers = ["format", "tokens/s", "vs fp32", "model MB", "peak RSS MB", "threads"]
    mixed = _mixed_paths(r.get("cpu_path") for r in rows)
    return format_table([[r["format"] + (f" {r['cpu_path']}" if mixed and r.get("cpu_path") else ""),
                          r["tokens_per_s"],
                          f"{r['speedup_vs_fp32']:.2f}x" if r.get("speedup_vs_fp32") else "",
                          r["model_bytes"] / 1e6, r["peak_rss_bytes"] / 1e6, r["threads"]]
                         for r in rows], headers)
