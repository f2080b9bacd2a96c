"""GPU matmul benchmark: lowbit's Triton kernels beside cuBLAS bf16 and peers, same process.

Used by ``bench/gpu.py`` (and meant for the CLI: ``run_gpu_bench(...)`` returns the result
dict, ``format_gpu_table`` prints it). A benchmark is not a test: it prints figures and writes
JSON/PNG, and asserts nothing about speed.

Method (DESIGN.md, "Measuring"):
* Kernel time: the call is captured once in a CUDA graph; the figure is the median of
  ``triton.testing.do_bench(graph.replay)``, which zeroes a 256 MB buffer (flushing L2)
  before every replay and times only the replay with CUDA events, so neither Python launch
  overhead nor a warm L2 shows up.
* Eager time: the same median of the plain call (``QuantLinear.forward`` for lowbit,
  ``F.linear`` for torch), what a user of the nn.Module sees, Python overhead included.
* Copy bandwidth: a 1 GiB device-to-device copy, bytes read + written over its time.
* Weight GB/s = bytes of the stored weight (codes + scales + zeros) / kernel time;
  TFLOP/s = 2 M N K / time; speed-up = cuBLAS bf16 time / time, same run, same card;
  rel. error = ||y - y_ref|| / ||y_ref|| against float32 F.linear with the float weight that
  was quantized (so it includes the format's quantization error), and ``kern_err`` against
  float32 math on the dequantized weight (the kernel's own error).
Peers, when importable: torch tinygemm int4 (``torch._weight_int4pack_mm``, group 128, bf16),
bitsandbytes NF4 (``bnb.matmul_4bit``), GemLite int4 (A16W4, group 128).
"""

from __future__ import annotations

import json
import platform
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096))  # (N, K)
MS: Tuple[int, ...] = (1, 16, 64, 256, 4096)
LOWBIT_IMPLS: Dict[str, Tuple[str, dict]] = {
    "lowbit-int4-g128": ("int4", {"group_size": 128}),
    "lowbit-nf4-b64": ("nf4", {"group_size": 64}),
    "lowbit-int8": ("int8", {}),
}
PEERS = ("torch-bf16", "tinygemm-int4-g128", "bnb-nf4", "gemlite-int4-g128")
# Rows run when asked for (--impls): lowbit's and bitsandbytes' fp4 (bitsandbytes' default
# 4-bit type), block 64; the variants checkpoints bring: int4 symmetric (GPTQ's default) and
# nf4 with double quantization (QLoRA's).
OPTIONAL_LOWBIT: Dict[str, Tuple[str, dict]] = {
    "lowbit-fp4-b64": ("fp4", {"group_size": 64}),
    "lowbit-int4-g128-sym": ("int4", {"group_size": 128, "symmetric": True}),
    "lowbit-nf4-b64-dq": ("nf4", {"group_size": 64, "double_quant": True}),
}
OPTIONAL_PEERS = ("bnb-fp4",)


# ---- timing -------------------------------------------------------------------------------
def capture(fn: Callable[[], object], warmup: int = 2):
    """(graph, output) of ``fn`` captured in a CUDA graph after ``warmup`` eager calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def graph_time_us(fn: Callable[[], object], rep_ms: float = 25, warmup_ms: float = 5) -> float:
    """Median kernel time (µs) of ``fn`` as CUDA-graph replays with L2 flushed between them."""
    from triton.testing import do_bench
    g, _ = capture(fn)
    t = do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    del g
    return 1000.0 * t


def eager_time_us(fn: Callable[[], object], rep_ms: float = 25, warmup_ms: float = 5) -> float:
    from triton.testing import do_bench
    return 1000.0 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, (read + write) bytes / s, in GB/s."""
    from triton.testing import do_bench
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * nbytes / (t * 1e-3) / 1e9


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ---- peers ---------------------------------------------------------------------------------
def tinygemm_int4(w: torch.Tensor, group: int = 128, inner_k_tiles: int = 8):
    """(callable x -> y, bytes) for torch's tinygemm int4 kernel, quantized like lowbit int4
    asym (w = (q - z) * s rewritten as (q - 8) * s + (8 - z) * s, tinygemm's form)."""
    from . import reference as R
    N, K = w.shape
    qw = R.quantize_weight(w.float(), "int4", group_size=group, symmetric=False)
    codes = R.unpack_nibbles(qw.data, K).to(torch.int32)
    packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # tinygemm: high nibble first
    wp = torch._convert_weight_to_int4pack(packed_u8.contiguous(), inner_k_tiles)
    s = qw.scales
    z = (8 - qw.zeros.float()) * s
    sz = torch.stack([s, z], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
    nbytes = wp.numel() * wp.element_size() + sz.numel() * sz.element_size()
    return (lambda x: torch._weight_int4pack_mm(x, wp, group, sz)), nbytes


def bnb_4bit(w: torch.Tensor, quant_type: str = "nf4"):
    import bitsandbytes as bnb  # noqa: F401
    import bitsandbytes.functional as BF
    q, state = BF.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type=quant_type)
    nbytes = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    return (lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)), nbytes


def gemlite_int4(w: torch.Tensor, group: int = 128):
    """GemLite A16W4 (asymmetric int4, group 128, bf16): GemLite >= 0.6 takes codes, scales and
    zero-points (w = (q - z) * s) through A16Wn.from_weights; older releases had A16W4."""
    import gemlite.helper as GH
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    if hasattr(GH, "A16W4"):
        layer = GH.A16W4(device="cuda").from_linear(lin)
    else:
        import lowbit
        from lowbit import reference as R
        qw = lowbit.quantize_weight(w.float().cpu(), "int4", group_size=group)
        N, K = qw.shape
        codes = R.unpack_nibbles(qw.data, K).cuda()
        layer = GH.A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
            codes, qw.scales.cuda().to(torch.bfloat16), qw.zeros.cuda().to(torch.bfloat16),
            W_nbits=4, group_size=group)
    nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values()
                 if isinstance(t, torch.Tensor))
    return (lambda x: layer(x)), nbytes


def _peer(name: str, w: torch.Tensor):
    if name == "tinygemm-int4-g128":
        return tinygemm_int4(w)
    if name in ("bnb-nf4", "bnb-fp4"):
        return bnb_4bit(w, name[4:])
    if name == "gemlite-int4-g128":
        return gemlite_int4(w)
    raise ValueError(name)


# ---- one shape ----------------------------------------------------------------------------
def bench_shape(N: int, K: int, ms: Sequence[int], impls: Sequence[str], *, rep_ms: float = 25,
                eager: bool = True, log=print) -> List[dict]:
    import lowbit
    from lowbit import kernels as LK
    torch.manual_seed(0)
    dev = "cuda"
    w = torch.randn(N, K, device=dev, dtype=torch.float32) * 0.02
    w16 = w.to(torch.bfloat16)
    rows: List[dict] = []
    lowbit_layers = {}
    known = {**LOWBIT_IMPLS, **OPTIONAL_LOWBIT}
    for name in impls:
        if name in known:
            fmt, opts = known[name]
            qw = lowbit.quantize_weight(w, fmt, **opts)
            layer = lowbit.QuantLinear.from_quantized(qw).to(dev)
            LK.prepare(layer.qweight)
            w_deq = lowbit.reference.dequantize(qw, torch.float32)
            lowbit_layers[name] = (layer, qw, w_deq)
    peers = {}
    for name in impls:
        if name in PEERS + OPTIONAL_PEERS and name != "torch-bf16":
            try:
                peers[name] = _peer(name, w)
            except Exception as e:  # not installed / not supported on this torch
                log(f"  {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    for M in ms:
        x = (torch.randn(M, K, device=dev) * 1.0).to(torch.bfloat16)
        ref = F.linear(x.float(), w)
        flops = 2.0 * M * N * K
        base_us = graph_time_us(lambda: F.linear(x, w16), rep_ms)
        y = F.linear(x, w16)
        rows.append(dict(impl="torch-bf16", N=N, K=K, M=M, us=base_us,
                         eager_us=eager_time_us(lambda: F.linear(x, w16), rep_ms) if eager else None,
                         weight_bytes=N * K * 2, err=rel_err(y, ref), kern_err=rel_err(y, F.linear(x.float(), w16.float())),
                         kernel="cublas"))
        for name in impls:
            if name in lowbit_layers:
                layer, qw, w_deq = lowbit_layers[name]
                fn = lambda: layer(x)  # noqa: E731
                choice = LK.plan(x, qw)
                try:
                    us = graph_time_us(fn, rep_ms)
                    y = fn()
                    r = dict(impl=name, N=N, K=K, M=M, us=us, weight_bytes=qw.nbytes,
                             eager_us=eager_time_us(fn, rep_ms) if eager else None,
                             err=rel_err(y, ref), kern_err=rel_err(y, F.linear(x.float(), w_deq)),
                             kernel=f"{choice.kernel}:{choice.source}", params=choice.params)
                except Exception as e:
                    r = dict(impl=name, N=N, K=K, M=M, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(r)
            elif name in peers:
                fn_x, nbytes = peers[name]
                try:
                    us = graph_time_us(lambda: fn_x(x), rep_ms)
                    y = fn_x(x)
                    rows.append(dict(impl=name, N=N, K=K, M=M, us=us, weight_bytes=nbytes,
                                     eager_us=eager_time_us(lambda: fn_x(x), rep_ms) if eager else None,
                                     err=rel_err(y, ref), kernel="peer"))
                except Exception as e:
                    rows.append(dict(impl=name, N=N, K=K, M=M, error=f"{type(e).__name__}: {e}"[:300]))
        for r in rows:
            if r["M"] == M and r["N"] == N and r["K"] == K and "us" in r:
                r["speedup"] = base_us / r["us"]
                r["weight_gbs"] = r["weight_bytes"] / (r["us"] * 1e-6) / 1e9
                r["tflops"] = flops / (r["us"] * 1e-6) / 1e12
        for r in rows:
            if r["M"] == M and r["N"] == N and r["K"] == K:
                log("  " + _row_line(r))
    return rows


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:<20} N={r['N']:<6} K={r['K']:<6} M={r['M']:<5} ERROR {r['error'][:100]}"
    e = f"{r['eager_us']:8.1f}" if r.get("eager_us") is not None else "       -"
    return (f"{r['impl']:<20} N={r['N']:<6} K={r['K']:<6} M={r['M']:<5} {r['us']:9.1f} us {e} us-eager "
            f"{r['weight_gbs']:7.0f} GB/s {r['tflops']:7.1f} TF/s  x{r['speedup']:5.2f}  err {r['err']:.2e}"
            f"  {r.get('kernel', '')}")


def environment() -> dict:
    import triton
    p = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def run_gpu_bench(shapes: Sequence[Tuple[int, int]] = SHAPES, ms: Sequence[int] = MS,
                  impls: Sequence[str] = tuple(LOWBIT_IMPLS) + PEERS, *, rep_ms: float = 25,
                  eager: bool = True, log=print) -> dict:
    """Benchmark every (N, K) x M x impl; returns {"env", "copy_gbs", "rows"}."""
    env = environment()
    log(f"GPU: {env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}")
    bw = copy_bandwidth_gbs()
    log(f"copy bandwidth: {bw:.0f} GB/s (read + write)")
    rows: List[dict] = []
    for N, K in shapes:
        log(f"N={N} K={K}")
        rows += bench_shape(N, K, ms, impls, rep_ms=rep_ms, eager=eager, log=log)
        torch.cuda.empty_cache()
    return {"env": env, "copy_gbs": bw, "rows": rows}


def format_gpu_table(res: dict) -> str:
    """Speed-up over cuBLAS bf16 (kernel time), one line per (N, K, M), one column per impl."""
    rows = [r for r in res["rows"] if "us" in r]
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "torch-bf16"]
    keys = list(dict.fromkeys((r["N"], r["K"], r["M"]) for r in rows))
    by = {(r["impl"], r["N"], r["K"], r["M"]): r for r in rows}
    w = max([18] + [len(i) for i in impls])  # columns as wide as the longest name
    head = f"{'N':>6} {'K':>6} {'M':>5} {'bf16 us':>9} " + " ".join(f"{i:>{w}}" for i in impls)
    lines = [f"{res['env']['gpu']}, copy {res['copy_gbs']:.0f} GB/s; cells: speed-up over cuBLAS bf16 "
             f"(kernel µs)", head]
    for N, K, M in keys:
        b = by.get(("torch-bf16", N, K, M))
        cells = []
        for i in impls:
            r = by.get((i, N, K, M))
            cells.append(f"{r['speedup']:6.2f}x ({r['us']:7.1f})" if r else "-")
        lines.append(f"{N:>6} {K:>6} {M:>5} {b['us'] if b else float('nan'):9.1f} " + " ".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def write_outputs(res: dict, json_path: str, png_path: Optional[str] = None) -> None:
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    if not png_path:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in res["rows"] if "us" in r]
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (N, K) in zip(axes[0], shapes):
        for i in impls:
            pts = sorted((r["M"], r["speedup"]) for r in rows if r["impl"] == i and (r["N"], r["K"]) == (N, K))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=i)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N={N} K={K}")
        ax.set_xlabel("M")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over cuBLAS bf16 (kernel time)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"lowbit GPU kernels on {res['env']['gpu']} (copy {res['copy_gbs']:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


__all__ = ["run_gpu_bench", "format_gpu_table", "write_outputs", "graph_time_us", "eager_time_us",
           "copy_bandwidth_gbs", "capture", "SHAPES", "MS"]
