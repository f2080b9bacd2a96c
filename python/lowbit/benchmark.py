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
  recorded with the results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (label, lowbit format, quantize_weight options). Labels are what tables and JSON show.
LOWBIT_IMPLS: Dict[str, Tuple[str, dict]] = {
    "int8": ("int8", {}),
    "int4-g128": ("int4", {"group_size": 128}),
    "nf4-b64": ("nf4", {"group_size": 64}),
}
TORCH_IMPLS = ("torch-fp32", "torch-bf16")
DEFAULT_IMPLS = tuple(LOWBIT_IMPLS) + TORCH_IMPLS

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
    for fn in fns:  # every copy once: a backend may build a per-weight cache (repacked layout)
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


def bench_case(K: int, N: int, M: int, impls: Iterable[str] = DEFAULT_IMPLS, *, reps: int = 20,
               warmup: int = 5, min_reps: int = 3, max_seconds: float = 2.0,
               rotate_bytes: Optional[int] = None, threads: Optional[int] = None,
               seed: int = 0) -> List[BenchResult]:
    """Benchmark every implementation on one (K, N, M) case, in this process."""
    import lowbit

    if rotate_bytes is None:
        rotate_bytes = 2 * last_level_cache_bytes()
    if threads is None:
        threads = lowbit._backend.num_threads()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(M, K, generator=g)
    out: List[BenchResult] = []
    flops = 2.0 * M * N * K
    for impl in impls:
        if impl in LOWBIT_IMPLS:
            fmt, opts = LOWBIT_IMPLS[impl]
            qw = lowbit.quantize_weight(w, fmt, **opts)
            nbytes = _streamed_bytes(qw)
            copies = [qw] + [_clone_qw(qw) for _ in range(_copies_for(nbytes, rotate_bytes) - 1)]
            fns = [(lambda q=q: lowbit.linear(x, q)) for q in copies]
        elif impl in TORCH_IMPLS:
            dtype = torch.float32 if impl == "torch-fp32" else torch.bfloat16
            wd = w.to(dtype)
            xd = x.to(dtype)
            nbytes = wd.numel() * wd.element_size()
            copies = [wd] + [wd.clone() for _ in range(_copies_for(nbytes, rotate_bytes) - 1)]
            fns = [(lambda c=c: F.linear(xd, c)) for c in copies]
        else:
            raise ValueError(f"unknown implementation {impl!r}; expected one of "
                             f"{list(LOWBIT_IMPLS) + list(TORCH_IMPLS)}")
        with torch.inference_mode():
            times = time_calls(fns, reps, warmup=warmup, min_reps=min_reps, max_seconds=max_seconds)
        med = statistics.median(times)
        out.append(BenchResult(impl=impl, K=K, N=N, M=M, median_us=med * 1e6, min_us=min(times) * 1e6,
                               reps=len(times), copies=len(copies), weight_bytes=int(nbytes),
                               weight_gbps=nbytes / med / 1e9, gflops=flops / med / 1e9,
                               threads=threads))
        del copies, fns
    base = next((r for r in out if r.impl == "torch-fp32"), None)
    if base is not None:
        for r in out:
            r.speedup_vs_fp32 = base.median_us / r.median_us
    return out


def run_bench(shapes: Sequence[Tuple[int, int]] = DEFAULT_SHAPES, ms: Sequence[int] = DEFAULT_MS,
              impls: Sequence[str] = DEFAULT_IMPLS, *, reps: int = 20, threads: Optional[int] = None,
              max_seconds: float = 2.0, progress: bool = True, cpu_path: Optional[str] = None,
              **kw) -> List[BenchResult]:
    """All (shape, M) cases; ``threads`` sets torch's and lowbit's thread count for the run,
    ``cpu_path`` lowbit's CPU path ("fast" or "exact"; None: as configured)."""
    from . import _backend
    impls = list(impls)
    if "torch-fp32" not in impls:
        impls.append("torch-fp32")  # the speed-up column needs the baseline
    old_threads = torch.get_num_threads()
    old_env = os.environ.get("LOWBIT_NUM_THREADS")
    old_path = getattr(_backend, "_path_override", None)
    if cpu_path is not None:
        if not hasattr(_backend, "set_cpu_path"):
            raise ValueError("this build of lowbit has a single CPU path; cpu_path must be None")
        _backend.set_cpu_path(cpu_path)
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["LOWBIT_NUM_THREADS"] = str(threads)
    try:
        cases = [(K, N, M) for (K, N) in shapes for M in ms]
        results: List[BenchResult] = []
        it = cases
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(cases, desc="bench", unit="case", leave=False)
        for K, N, M in it:
            results += bench_case(K, N, M, impls, reps=reps, threads=threads, max_seconds=max_seconds, **kw)
        path = current_cpu_path()
        for r in results:
            if r.impl in LOWBIT_IMPLS:
                r.extra["cpu_path"] = path
        return results
    finally:
        if cpu_path is not None:
            _backend.set_cpu_path(old_path)
        if threads is not None:
            torch.set_num_threads(old_threads)
            if old_env is None:
                os.environ.pop("LOWBIT_NUM_THREADS", None)
            else:
                os.environ["LOWBIT_NUM_THREADS"] = old_env


def results_table(results: Sequence[BenchResult]) -> str:
    headers = ["K x N", "M", "impl", "µs", "weight GB/s", "GFLOP/s", "vs fp32"]
    rows = [[f"{r.K}x{r.N}", r.M, r.impl, r.median_us, r.weight_gbps, r.gflops,
             (f"{r.speedup_vs_fp32:.2f}x" if r.speedup_vs_fp32 else "")]
            for r in results]
    return format_table(rows, headers)


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
