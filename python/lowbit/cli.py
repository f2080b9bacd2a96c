"""The ``lowbit`` command: ``info``, ``selftest``, ``bench``, ``eval``, ``size`` and ``demo``.

    lowbit info [--json]                 which kernels run here and why
    lowbit selftest [--isa ISA]          every ISA x format x shape x dtype against the reference
    lowbit bench [--shapes 4096x4096] [--m 1,8,32] [--threads N] [--reps R] [--json PATH]
    lowbit eval [--tokens 16384] [--ctx 512] [--formats fp32,int8,int4:g64:gptq,mixed:4.5]
                [--model PATH] [--text PATH] [--json PATH] [--plot PNG] [--save-dir DIR]
    lowbit size --params 70e9            memory per format, scales and zeros included
    lowbit demo                          selftest + short bench + SmolLM2 quantized + generation

``main(argv)`` returns the exit status (0 ok, 1 a check failed, 2 usage or missing extras).
Bad arguments are reported in one line; set LOWBIT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

# ---- selftest -----------------------------------------------------------------------------
# (label, format, quantize_weight options): the variants every ISA must get right.
SELFTEST_FORMATS: Tuple[Tuple[str, str, dict], ...] = (
    ("int8", "int8", {}),
    ("int4-g128", "int4", {"group_size": 128}),
    ("int4-sym-g32", "int4", {"group_size": 32, "symmetric": True}),
    ("int4-row", "int4", {"group_size": -1}),
    ("nf4-b64", "nf4", {"group_size": 64}),
    ("nf4-b64-dq", "nf4", {"group_size": 64, "double_quant": True}),
    ("int8-g32", "int8", {"group_size": 32}),  # GGUF Q8_0
    ("int8-asym-g128", "int8", {"group_size": 128, "symmetric": False}),  # GPTQ 8-bit
    ("int4-min-g32", "int4", {"group_size": 32, "zero_point": "float"}),  # GGUF Q4_1 / Q4_K
    ("fp4-b64", "fp4", {"group_size": 64}),  # bitsandbytes FP4
    ("fp4-b64-dq", "fp4", {"group_size": 64, "double_quant": True}),
)

# (M, N, K): ragged last groups, odd K, N off any tile size, M = 1 and M > 1.
SELFTEST_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (1, 64, 576),  # K = 576: four groups of 128 and a ragged one of 64 (SmolLM2's K)
    (5, 40, 576),
    (1, 17, 333),  # odd K: the last byte's high nibble is padding
    (7, 33, 1001),  # odd K, N not a multiple of 8/16
    (16, 40, 1536),  # M > 8, SmolLM2's other K (a multiple of 128)
    (33, 72, 4096),  # M past a 32-row tile, a 7B model's K
    (3, 5, 16447),  # odd K, 257 blocks of 64 -> two nf4 double-quant chunks of 256 blocks
)
SELFTEST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DT_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclass
class Failure:
    isa: str
    fmt: str
    shape: Tuple[int, int, int]
    dtype: str
    what: str  # "dequantize" or "linear"
    detail: str


def _selftest_inputs(M: int, N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[0] = 0.0  # an all-zero row: scale 0 must decode to exact zeros
    if N > 2:
        w[1, : min(K, 40)] *= 30.0  # outliers in one group
    wide = torch.randn(M, K + 3, generator=g)
    x = wide[:, :K] if M > 1 else wide[:, :K].contiguous()  # M > 1: rows strided (ldx = K + 3)
    bias = torch.randn(N, generator=g) if (M + N) % 2 else None
    return w, x, bias


def _cpu_paths() -> Tuple[str, ...]:
    """The CPU linear paths this build has ("exact" float32; "fast" int8 activations)."""
    from lowbit import _backend
    return tuple(getattr(_backend, "CPU_PATHS", ())) or ("exact",)


def _run_linear(x, qw, bias, isa: str, path: str):
    from lowbit import _backend
    out = torch.empty((x.shape[0], qw.shape[0]), dtype=x.dtype)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if len(_cpu_paths()) > 1:
        _backend.linear(x, qw, b, out, isa=isa, path=path)
    else:
        _backend.linear(x, qw, b, out, isa=isa)
    return out


def _fast_path_takes(qw, isa: str) -> bool:
    """Whether the fast path supports this weight on this ISA (else it runs the exact path)."""
    from lowbit import _backend
    return getattr(_backend, "packed_weight", None) is not None and \
        _backend.packed_weight(qw, isa) is not None


def _mismatch_text(r: dict, what: str) -> str:
    return r.get("reason") or (f"{r['n_bad']} elements beyond {what}; worst at {r['index']}: "
                               f"{r['actual']:.6g} vs {r['expected']:.6g} ({r['worst_ratio']:.3g}x)")


def run_selftest(isas: Optional[Sequence[str]] = None, formats=SELFTEST_FORMATS,
                 shapes=SELFTEST_SHAPES, dtypes=SELFTEST_DTYPES, progress: bool = False) -> dict:
    """:func:`_run_selftest` with torch single-threaded (its reference ops on these small
    tensors only lose to thread synchronisation) and lowbit's kernels keeping their usual
    thread count (LOWBIT_NUM_THREADS, pinned for the run), so their row split is tested."""
    from lowbit import _backend
    old_threads = torch.get_num_threads()
    old_env = os.environ.get("LOWBIT_NUM_THREADS")
    os.environ["LOWBIT_NUM_THREADS"] = str(_backend.num_threads())
    torch.set_num_threads(1)
    try:
        return _run_selftest(isas, formats, shapes, dtypes, progress)
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            os.environ.pop("LOWBIT_NUM_THREADS", None)
        else:
            os.environ["LOWBIT_NUM_THREADS"] = old_env


def _run_selftest(isas: Optional[Sequence[str]] = None, formats=SELFTEST_FORMATS,
                  shapes=SELFTEST_SHAPES, dtypes=SELFTEST_DTYPES, progress: bool = False) -> dict:
    """Run every ISA x format x shape x dtype check; returns a summary dict.

    Per case and ISA: dequantize must equal :func:`lowbit.reference.dequantize` bit-exactly;
    the exact CPU path's linear must be within :func:`lowbit.testing.linear_tolerance` of
    :func:`lowbit.reference.linear`; the fast (int8-activation) path's linear within
    :func:`lowbit.testing.fast_linear_tolerance`, or, for a weight it does not take, equal to
    the exact path bit for bit.
    """
    import lowbit
    from lowbit import _backend, reference
    from lowbit.testing import fast_linear_tolerance, linear_mismatch, linear_tolerance

    info = lowbit.backend_info()
    supported = info.get("supported_isas") or []
    compiled = info.get("compiled_isas") or []
    if isas is None:
        isas = list(supported)
    skipped = {i: "compiled but not supported by this CPU" for i in compiled if i not in supported}
    for i in isas:
        if i not in supported:
            skipped[i] = ("not supported by this CPU" if i in compiled else "not compiled into this build")
    isas = [i for i in isas if i in supported]
    paths = _cpu_paths()
    counts = {(i, f[0]): [0, 0] for i in isas for f in formats}  # [passed, total]
    failures: List[Failure] = []
    cases = [(fi, si) for fi in range(len(formats)) for si in range(len(shapes))]
    it = cases
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(cases, desc="selftest", unit="case", leave=False)

    def check(isa, label, shape, dname, what, fn):
        c = counts[(isa, label)]
        c[1] += 1
        try:
            detail = fn()
        except Exception as e:  # a kernel error is a failure, reported, not a crash
            detail = f"{type(e).__name__}: {e}"
        if detail is None:
            c[0] += 1
        else:
            failures.append(Failure(isa, label, shape, dname, what, detail))

    for fi, si in it:
        label, fmt, opts = formats[fi]
        M, N, K = shapes[si]
        w, x32, bias = _selftest_inputs(M, N, K, seed=1000 * fi + si)
        qw = lowbit.quantize_weight(w, fmt, **opts)
        ref_deq = {dt: reference.dequantize(qw, dt) for dt in dtypes}
        xs = {dt: x32.to(dt) for dt in dtypes}
        ref_lin = {dt: reference.linear(xs[dt], qw, bias) for dt in dtypes}
        w32 = reference.dequantize(qw, torch.float32)
        tols = {dt: linear_tolerance(xs[dt], w32, expected=ref_lin[dt], bias=bias) for dt in dtypes}
        fast_tols = {}  # the fast path's bound, per dtype, shared by all ISAs
        for isa in isas:
            fast_takes = "fast" in paths and _fast_path_takes(qw, isa)
            for dt in dtypes:
                dname = _DT_NAMES.get(dt, str(dt))
                x = xs[dt]

                def deq():
                    got = _backend.dequantize(qw, dt, isa=isa)
                    if torch.equal(got, ref_deq[dt]):
                        return None
                    diff = (got.float() - ref_deq[dt].float()).abs()
                    return (f"{int((got != ref_deq[dt]).sum())} of {got.numel()} elements differ "
                            f"(max |diff| {float(diff.max()):.3g})")

                exact_out = {}

                def exact():
                    out = exact_out["y"] = _run_linear(x, qw, bias, isa, "exact")
                    r = linear_mismatch(out, ref_lin[dt], x, qw, bias=bias, tol=tols[dt])
                    return None if r["ok"] else _mismatch_text(r, "the float32 tolerance")

                def fast():
                    out = _run_linear(x, qw, bias, isa, "fast")
                    if not fast_takes:  # the fast path hands this weight to the exact path
                        ref = exact_out.get("y")
                        if ref is None:
                            ref = _run_linear(x, qw, bias, isa, "exact")
                        return None if torch.equal(out, ref) else \
                            "fast path fell back but differs from the exact path"
                    if dt not in fast_tols:
                        fast_tols[dt] = fast_linear_tolerance(x, qw, ref_lin[dt], bias)
                    r = linear_mismatch(out, ref_lin[dt], x, qw, tol=fast_tols[dt])
                    return None if r["ok"] else _mismatch_text(r, "the fast path's bound")

                check(isa, label, (M, N, K), dname, "dequantize", deq)
                check(isa, label, (M, N, K), dname, "linear" if len(paths) == 1 else "linear exact", exact)
                if "fast" in paths:
                    check(isa, label, (M, N, K), dname, "linear fast", fast)
    return {"isas": isas, "skipped": skipped, "formats": [f[0] for f in formats], "paths": paths,
            "counts": counts, "failures": failures, "ok": not failures and bool(isas),
            "active_isa": info.get("cpu_isa"), "checks": sum(c[1] for c in counts.values())}


def _selftest_report(res: dict, compact: bool = False) -> str:
    from lowbit.benchmark import format_table
    lines = []
    if not res["isas"]:
        lines.append("no ISA to test: the C++ backend is not available or supports nothing here")
    if compact:
        for isa in res["isas"]:
            cs = [res["counts"][(isa, f)] for f in res["formats"]]
            p, t = sum(c[0] for c in cs), sum(c[1] for c in cs)
            failed = [f for f, c in zip(res["formats"], cs) if c[0] != c[1]]
            status = "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")"
            active = " (active)" if isa == res["active_isa"] else ""
            lines.append(f"  {isa}{active}: {status}  {p}/{t} checks over "
                         f"{len(res['formats'])} formats")
    else:
        rows = []
        for isa in res["isas"]:
            row = [isa + (" *" if isa == res["active_isa"] else "")]
            for f in res["formats"]:
                p, t = res["counts"][(isa, f)]
                row.append("PASS" if p == t else f"FAIL {t - p}/{t}")
            rows.append(row)
        if rows:
            lines.append(format_table(rows, ["ISA"] + res["formats"]))
            lines.append("(* = the ISA lowbit picks on this machine; each cell: dequantize bit-exact, "
                         + ("the exact path's linear within float32 tolerance and the fast path's "
                            "within its int8-activation bound"
                            if "fast" in res.get("paths", ()) else "linear within tolerance")
                         + f", over {len(SELFTEST_SHAPES)} shapes x {len(SELFTEST_DTYPES)} "
                         "activation dtypes)")
    for isa, why in res["skipped"].items():
        lines.append(f"  {isa}: skipped ({why})")
    if res["failures"]:
        lines.append(f"{len(res['failures'])} failed checks" + (" (first 20):" if len(res["failures"]) > 20 else ":"))
        for f in res["failures"][:20]:
            M, N, K = f.shape
            lines.append(f"  FAIL {f.isa} {f.fmt} M={M} N={N} K={K} {f.dtype} {f.what}: {f.detail}")
    return "\n".join(lines)


def cmd_selftest(args) -> int:
    isas = args.isa.split(",") if args.isa else None
    if isas is not None:
        from lowbit import _backend
        known = set(_backend.ISAS)
        bad = [i for i in isas if i not in known]
        if bad:
            print(f"lowbit selftest: error: unknown ISA {', '.join(map(repr, bad))} (known: "
                  f"{', '.join(sorted(known))})", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    res = run_selftest(isas, progress=not args.no_progress)
    print(_selftest_report(res, compact=args.compact))
    status = "PASS" if res["ok"] else "FAIL"
    print(f"selftest: {status} ({res['checks']} checks, {time.perf_counter() - t0:.1f} s)")
    return 0 if res["ok"] else 1


# ---- info ---------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import lowbit
    info = lowbit.backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    feats = info.get("cpu_features") or {}
    rows = [
        ("lowbit", info.get("version")),
        ("torch", info.get("torch")),
        ("CPU ISA in use", f"{info.get('cpu_isa')}  ({info.get('cpu_isa_reason')})"),
        ("compiled ISAs", ", ".join(info.get("compiled_isas") or []) or "-"),
        ("supported here", ", ".join(info.get("supported_isas") or []) or "-"),
        ("CPU features", ", ".join(sorted(feats)) or "-"),
        ("threads", f"{info.get('num_threads')}  (from {info.get('num_threads_source')})"),
        ("CPU path", _PATH_DESC.get(info.get("cpu_path"), info.get("cpu_path"))
         + ("" if os.environ.get("LOWBIT_CPU_PATH") else
            "  (the default; lowbit.set_cpu_path('fast') or LOWBIT_CPU_PATH=fast for int8 activations)")),
        ("CUDA", "available" if info.get("cuda_available") else "not available"),
        ("Triton", info.get("triton") or "not installed"),
        ("GPU backend", info.get("gpu_backend")),
    ]
    known = {"version", "torch", "cpu_isa", "cpu_isa_reason", "compiled_isas", "supported_isas",
             "cpu_features", "num_threads", "num_threads_source", "cpu_path", "cuda_available",
             "triton", "gpu_backend"}
    rows += [(k, v) for k, v in info.items() if k not in known]  # anything added later
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


# ---- bench --------------------------------------------------------------------------------
_PATH_DESC = {"fast": "fast (int8 activations; bfloat16 tiles on AMX CPUs from M = 8-16)",
              "exact": "exact (float32 activations)"}


def _path_words(path: str) -> str:
    return "CPU path " + _PATH_DESC.get(path, path)


def cmd_bench(args) -> int:
    counts = args.threads or []
    if len(counts) > 1 and (args.model or args.device == "cuda"):
        raise ValueError("--threads takes a list of counts only for the CPU kernel benchmark, "
                         "not with --model or --device cuda")
    args.threads = counts[0] if len(counts) == 1 else (None if not counts else counts)
    if args.model:
        return _bench_model(args)
    if args.device == "cuda":
        return _bench_cuda(args)
    from lowbit import benchmark as B
    if args.full:
        shapes, ms = list(B.FULL_SHAPES), list(B.FULL_MS)
    else:
        shapes, ms = list(B.DEFAULT_SHAPES), list(B.DEFAULT_MS)
    shapes = B.parse_shapes(args.shapes) if args.shapes else shapes
    ms = B.parse_ints(args.m, "M") if args.m else ms
    if args.impls:
        impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    else:
        impls = list(B.FULL_IMPLS if (args.peers or args.full) else B.DEFAULT_IMPLS)
    for i in impls:
        if i not in B.ALL_IMPLS:
            raise ValueError(f"unknown --impls entry {i!r}; expected some of {','.join(B.ALL_IMPLS)}")
    import torch

    import lowbit
    threads = args.threads
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    info = lowbit.backend_info()
    cpu_path = B.default_cpu_path(args.cpu_path)
    if cpu_path == "both":
        words = (f"lowbit rows on both CPU paths: {_PATH_DESC['fast']} and "
                 f"{_PATH_DESC['exact']}, the default")
    else:
        words = _path_words(cpu_path or B.current_cpu_path())
    counts = threads if isinstance(threads, list) else [threads or info.get("num_threads")]
    nthreads = "/".join(str(t) for t in counts)
    print(f"lowbit bench: CPU ISA {info.get('cpu_isa')}, {words}, {nthreads} threads, "
          f"{args.dtype} activations, median of up to {args.reps} calls, "
          f"weights rotated over > {2 * B.last_level_cache_bytes() >> 20} MB")
    limits = None
    bandwidth = None
    if not args.no_limits:
        per = {}
        for t in counts:
            per[t] = lim = B.machine_limits(t)
            print(f"machine: read bandwidth {lim['read_gbps']:.1f} GB/s, torch matmul fp32 "
                  f"{lim['fp32_gflops']:.0f} GFLOP/s, bf16 {lim['bf16_gflops']:.0f} GFLOP/s "
                  f"({t} threads)")
        limits = per[counts[0]] if len(counts) == 1 else {str(t): v for t, v in per.items()}
        bandwidth = {t: v["read_gbps"] for t, v in per.items()}
        if len(counts) == 1:
            bandwidth = bandwidth[counts[0]]
    results = B.run_bench(shapes, ms, impls, reps=args.reps, threads=threads,
                          max_seconds=args.max_seconds, progress=not args.no_progress,
                          cpu_path=cpu_path, dtype=dtype, bandwidth_gbps=bandwidth,
                          on_case=(lambda rs: print(B.results_table(rs), flush=True))
                          if args.stream else None)
    if not args.stream:
        print(B.results_table(results))
    if args.json:
        B.write_json(args.json, results, shapes=[list(s) for s in shapes], ms=list(ms),
                     machine_limits=limits, x_dtype=args.dtype)
        print(f"wrote {args.json}")
    if args.plot:
        B.plot_speedups(results, args.plot, title=f"lowbit CPU ({info.get('cpu_isa')}, "
                        f"{nthreads} threads, {args.dtype} activations)")
        print(f"wrote {args.plot}")
    return 0


def _bench_cuda(args) -> int:
    import torch
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch")
    from lowbit import gpu_bench as GB
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] \
        if args.shapes else list(GB.SHAPES)
    ms = [int(v) for v in args.m.split(",")] if args.m else list(GB.MS)
    impls = args.impls.split(",") if args.impls else list(GB.LOWBIT_IMPLS) + list(GB.PEERS)
    known = list(GB.LOWBIT_IMPLS) + list(GB.OPTIONAL_LOWBIT) + list(GB.PEERS) + list(GB.OPTIONAL_PEERS)
    for i in impls:
        if i not in known:
            raise ValueError(f"unknown --impls entry {i!r} for --device cuda; expected some of "
                             f"{','.join(known)}")
    res = GB.run_gpu_bench(shapes, ms, impls)
    print(GB.format_gpu_table(res))
    out = args.json or "bench_gpu.json"
    GB.write_outputs(res, out, args.plot or os.path.splitext(out)[0] + ".png")
    print(f"wrote {out}")
    return 0


def _bench_model(args) -> int:
    from lowbit import benchmark as B
    fmts = [f.strip() for f in args.model_formats.split(",") if f.strip()]
    rows = B.decode_bench(fmts, new_tokens=args.decode_tokens, threads=args.threads,
                          model_path=None if args.model == "default" else args.model,
                          cpu_path=B.default_cpu_path(args.cpu_path))
    print(B.decode_table(rows))
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"environment": B.environment(), "decode": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


# ---- eval ---------------------------------------------------------------------------------
EVAL_FORMATS_HELP = (
    "comma-separated specs: NAME[:MOD...]. NAME: fp32, int8, int4 (asym g128), int4-sym, nf4 "
    "(b64), nf4-dq, any lowbit format (e.g. fp4), or mixed:BITS (automatic mixed precision "
    "within BITS bits/weight). MOD: gN (group size, g-1 = per row), sym, asym, fzero (float "
    "zero-point), dq, a method (rtn, gptq, awq, llm.int8), or key=value (any QuantConfig option, "
    "e.g. damp_percent=0.05). Examples: int8:llm.int8, int4:g64:gptq, int4:g128:awq, nf4:awq, "
    "mixed:4.5. Default: %(default)s")


def cmd_eval(args) -> int:
    from lowbit import evaluate as E
    specs = E.parse_specs(args.formats)  # bad specs fail before anything is loaded
    if args.model is None or args.text is None:
        E.require_extras(need_model=args.model is None, need_text=args.text is None)
    t0 = time.perf_counter()

    def write_json(doc):
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.json)

    def partial(results):  # a long run keeps what it has measured so far
        write_json({"meta": {"partial": True, "specs": [s.label for s in specs]},
                    "results": results})

    out = E.evaluate(specs, tokens=args.tokens, ctx=args.ctx, model_path=args.model,
                     text_path=args.text, decode_tokens=args.decode_tokens,
                     fake_quant=args.fake_quant, cache=not args.no_cache,
                     cpu_path=args.cpu_path, progress=not args.no_progress,
                     calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                     save_dir=args.save_dir, on_result=partial if args.json else None)
    wall = time.perf_counter() - t0
    out["meta"]["wall_s"] = wall
    meta = out["meta"]
    print(f"\nmodel {os.path.basename(meta['model'])}, {meta['tokens']} tokens of "
          f"{os.path.basename(meta['text'])}, ctx {meta['ctx']}, lm_head kept in float, "
          f"CPU ISA {meta['cpu_isa']}, {meta['num_threads']} threads, "
          + ("FAKE quantization (dequantized float weights, torch matmul)" if args.fake_quant
             else _path_words(meta["cpu_path"])))
    cal = meta.get("calibration")
    if cal:
        print(f"calibration (gptq/awq/llm.int8/mixed): {cal['samples']} x {cal['seq_len']} tokens "
              f"from token {cal['first_token']} on, disjoint from the scored tokens "
              f"0..{meta['tokens']}")
    print(E.results_table(out["results"]))
    print(f"({E.TABLE_NOTE})")
    for r in out["results"]:
        plan = r.get("extra", {}).get("plan")
        if plan:
            print(f"\n{r['config']}: mixed-precision plan\n{plan}")
    print(f"({wall:.0f} s)")
    if args.json:
        write_json(out)
        print(f"wrote {args.json}")
    failed = [r["config"] for r in out["results"] if r.get("error")]
    if args.plot and len(failed) < len(out["results"]):
        try:
            E.plot(out["results"], args.plot,
                   title=f"{os.path.basename(meta['model'])}: {meta['tokens']} tokens, ctx {meta['ctx']}")
            print(f"wrote {args.plot}")
        except E.MissingExtras as e:
            print(f"no plot: {e}", file=sys.stderr)
    if failed:
        print(f"lowbit eval: {len(failed)} spec(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---- size ---------------------------------------------------------------------------------
def _parse_shape_mix(text: str):
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            k, n = (int(v) for v in part.split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {part!r} is not KxN (in_features x out_features), "
                             "e.g. 8192x8192,8192x28672,28672x8192") from None
        if k < 1 or n < 1:
            raise ValueError(f"--shapes: {part!r} must be positive")
        shapes.append((k, n))
    if not shapes:
        raise ValueError("--shapes: no shapes given")
    return shapes


def cmd_size(args) -> int:
    from lowbit import evaluate as E
    params = E.parse_count(args.params)
    float_params = E.parse_count(args.float_params) if args.float_params not in (None, "0") else 0
    if args.shapes:
        shapes = _parse_shape_mix(args.shapes)
    else:
        shapes = E.llama_block_shapes(args.hidden, args.intermediate, args.kv_dim)
    table = E.size_table(params, shapes, float_params=float_params, float_dtype=args.float_dtype)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(E.size_report(table))
    print(f"({table['assumption']}; scales, zero-points and double-quant constants included; "
          "GB = 1e9 bytes, GiB = 2^30; weights only: no activations or KV cache)")
    return 0


# ---- demo ---------------------------------------------------------------------------------
class _Sections:
    """Prints demo section headers, each closing the previous one with its elapsed time."""

    def __init__(self):
        self.t = None

    def __call__(self, title: Optional[str] = None) -> None:
        now = time.perf_counter()
        if self.t is not None:
            print(f"({now - self.t:.0f} s)", flush=True)
        self.t = now
        if title:
            print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


DEMO_SPECS = ("fp32", "int8", "int4", "nf4")


def cmd_demo(args) -> int:
    import lowbit
    from lowbit import benchmark as B

    t_start = time.perf_counter()
    _section = _Sections()
    info = lowbit.backend_info()
    print(f"lowbit {info.get('version')} demo: CPU ISA {info.get('cpu_isa')} "
          f"({info.get('cpu_isa_reason')}), {_path_words(B.current_cpu_path())}, "
          f"{info.get('num_threads')} threads, torch {info.get('torch')}")
    progress = not args.no_progress

    _section("1. selftest: every ISA's kernels against the reference")
    res = run_selftest(progress=progress)
    print(_selftest_report(res, compact=True))
    ok = res["ok"]
    print(f"selftest: {'PASS' if ok else 'FAIL'}", flush=True)

    bench_path = B.default_cpu_path(None)
    _section("2. speed: one 4096x4096 layer, lowbit vs torch fp32"
             + (" (lowbit on both CPU paths)" if bench_path == "both" else ""))
    results = B.run_bench([(4096, 4096)], [1, 8], ["int8", "int4-g128", "nf4-b64", "torch-fp32"],
                          reps=args.reps, max_seconds=1.0, progress=progress, cpu_path=bench_path)
    print(B.results_table(results), flush=True)

    if args.skip_model:
        _section()
        print(f"\n(model steps skipped) demo took {time.perf_counter() - t_start:.0f} s")
        return 0 if ok else 1

    from lowbit import evaluate as E
    miss = E.missing_extras()
    if miss:
        _section("3-4. model")
        print(f"skipped: the model evaluation needs {', '.join(miss)}. Install the extras with\n"
              f"    {E.INSTALL_HINT}")
        _section()
        print(f"\ndemo took {time.perf_counter() - t_start:.0f} s")
        return 0 if ok else 1

    tokens = args.tokens
    if tokens is None:
        # The scalar fallback is ~10x slower than SIMD kernels; keep the demo to a few minutes.
        tokens = 4096 if info.get("cpu_isa") not in (None, "scalar") else 1024
    ctx = min(args.ctx, tokens)
    _section(f"3. SmolLM2-135M-Instruct quantized: size, speed, perplexity ({tokens} tokens, ctx {ctx})")
    loader, tok, model_desc = E.make_loader(None)
    ids, _ = E.load_tokens(tok, tokens)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    specs = [E.parse_spec(c) for c in DEMO_SPECS]
    rows = []
    texts = {}
    import tempfile
    tmpdir = tempfile.TemporaryDirectory(prefix="lowbit-demo-")
    saved = os.path.join(tmpdir.name, "smollm2-int4.safetensors")
    config = None
    for spec in specs:
        r, m = E.evaluate_config(spec, loader, ids, ctx, decode_tokens=args.decode_tokens,
                                 pad_id=pad_id, progress=progress,
                                 keep_model=spec.label in ("fp32", "int4"))
        if m is not None:  # step 4's inputs, made now so only one model is held at a time
            if spec.label == "int4":
                config = m.config
                lowbit.save(m, saved)
            texts[spec.label] = E.generate_text(m, tok, args.prompt, new_tokens=args.new_tokens)
            del m
        rows.append(r.__dict__)
        print(f"  {spec.label:5s} perplexity {r.perplexity:7.2f}  ({r.bits_per_weight:.2f} bits/weight)",
              flush=True)
    fast_row = "fast" in _cpu_paths() and B.current_cpu_path() != "fast"
    if fast_row:
        # the same int4 model on the CPU's other path (int8 activations, a repacked copy of the
        # weights): what lowbit.linear does with LOWBIT_CPU_PATH=fast
        from lowbit import _backend
        with _backend.using_cpu_path("fast"):
            r, _ = E.evaluate_config(E.parse_spec("int4"), loader, ids, ctx,
                                     decode_tokens=args.decode_tokens, pad_id=pad_id,
                                     progress=progress)
        r.config = "int4 fast"
        rows.append(r.__dict__)
        print(f"  int4 on the fast CPU path: perplexity {r.perplexity:7.2f}", flush=True)
    print(E.results_table(rows))
    if fast_row:
        print("(int4 fast: the int4 model on the fast CPU path, LOWBIT_CPU_PATH=fast: activations "
              "quantized to int8 blocks, the weights repacked once for this CPU, + cache MB; the "
              "other rows use the default exact path, float32 activations)")
    n_lin = max(r["n_quantized"] for r in rows)
    print(f"(the {n_lin} Linear layers of the 30 blocks are quantized; lm_head (tied to the "
          f"embeddings) stays in float. {E.TABLE_NOTE}; tok/s: this machine, shared with whatever "
          "else runs on it)")

    _section(f"4. the int4 model saved, reloaded into an empty model, and its text "
             f"({args.new_tokens} tokens, greedy; fp32 for comparison)")
    transformers = E._import_transformers()
    t0 = time.perf_counter()
    reloaded = lowbit.load(saved, lambda: transformers.AutoModelForCausalLM.from_config(config)).eval()
    load_s = time.perf_counter() - t0
    print(f"lowbit.save -> {os.path.getsize(saved) / 1e6:.1f} MB file; lowbit.load into a "
          f"skeleton built on the meta device (no float weights allocated): {load_s:.1f} s")
    text = E.generate_text(reloaded, tok, args.prompt, new_tokens=args.new_tokens)
    same = "identical to" if text == texts["int4"] else "DIFFERENT from"
    del reloaded
    tmpdir.cleanup()
    print(f"prompt: {args.prompt}")
    print(f"{'int4:':7s} {' '.join(text.split())}")
    print(f"{'fp32:':7s} {' '.join(texts['fp32'].split())}")
    print(f"(the reloaded model's text is {same} the int4 model's before saving)")
    ok = ok and text == texts["int4"]
    _section()
    print(f"\ndemo took {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


# ---- argument parsing ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="lowbit: low-bit weight-quantized matmul "
                                "for PyTorch (INT8 / INT4 / NF4).")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="which kernels run here and why")
    s.add_argument("--json", action="store_true", help="print backend_info() as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("selftest", help="check every ISA's kernels against the reference (exit 1 on failure)")
    s.add_argument("--isa", help="comma-separated ISAs to test (default: all this CPU supports)")
    s.add_argument("--compact", action="store_true", help="one line per ISA")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_selftest)

    s = sub.add_parser("bench", help="benchmark: lowbit linear vs torch and peers (CPU or CUDA), "
                       "or model decode speed (--model)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the C++ kernels (default); cuda: the Triton kernels (lowbit.gpu_bench)")
    s.add_argument("--full", action="store_true",
                   help="the full grid: 4096x4096,4096x11008,11008x4096 x M 1,8,32,128, all peers")
    s.add_argument("--shapes", help="comma-separated KxN weight shapes (K = in_features), "
                   "default 4096x4096,4096x11008 (cuda: NxK, see bench/gpu.py)")
    s.add_argument("--m", help="comma-separated batch sizes M (rows of x), default 1,8,32")
    s.add_argument("--impls", help="comma-separated subset of: " + ",".join(
        ["int8", "int4-g128", "nf4-b64", "fp4-b64", "torch-fp32", "torch-bf16", "torch-int8pack",
         "torch-int4pack", "torch-dyn-int8", "bnb-nf4", "bnb-fp4", "bnb-int8"])
        + " (cuda: lowbit-int4-g128,lowbit-nf4-b64,lowbit-int8,lowbit-fp4-b64,"
        "lowbit-int4-g128-sym,lowbit-nf4-b64-dq,torch-bf16,tinygemm-int4-g128,bnb-nf4,bnb-fp4,"
        "gemlite-int4-g128); fp4 and the -sym / -dq variants only when named")
    s.add_argument("--peers", action="store_true",
                   help="also run torch's int8/int4 CPU ops, dynamic int8 and bitsandbytes")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="activation dtype (default fp32)")
    s.add_argument("--threads", type=_thread_counts,
                   help="threads for torch and lowbit (default: all cores); several, e.g. 1,2: each "
                        "case measured with each count in turn, with a speed-up column (CPU kernels)")
    s.add_argument("--reps", type=_positive_int, default=20, help="timed calls per case (median reported)")
    s.add_argument("--max-seconds", type=_positive_float, default=2.0,
                   help="time budget per case; stops early after at least 3 calls")
    s.add_argument("--cpu-path", choices=("fast", "exact", "both"),
                   help="lowbit's CPU path: fast (int8 activations; bfloat16 tiles from M = 8-16 on "
                   "AMX CPUs), exact (float32, lowbit's default) or both (each lowbit row on each "
                   "path); default: LOWBIT_CPU_PATH when set, else both")
    s.add_argument("--no-limits", action="store_true",
                   help="skip measuring the read bandwidth and matmul rate")
    s.add_argument("--model", nargs="?", const="default",
                   help="decode benchmark of a model (default: the bundled SmolLM2-135M): tokens/s "
                   "and peak memory per format")
    s.add_argument("--model-formats", default="fp32,bf16,int8,int4,nf4",
                   help="formats for --model (default fp32,bf16,int8,int4,nf4)")
    s.add_argument("--decode-tokens", type=_positive_int, default=64,
                   help="tokens generated per format (--model)")
    s.add_argument("--json", metavar="PATH", help="write results as JSON")
    s.add_argument("--plot", metavar="PNG", help="draw speed-up vs M per format to this PNG")
    s.add_argument("--stream", action="store_true",
                   help="print each case's rows as soon as it is measured (one table per case)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("eval", help="perplexity / size / speed / memory of a model quantized with lowbit")
    s.add_argument("--tokens", type=_positive_int, default=16384,
                   help="tokens of text to score (default 16384)")
    s.add_argument("--ctx", type=int, default=512, help="window length (default 512)")
    s.add_argument("--formats", default="fp32,int8,int4,int4-sym,nf4,nf4-dq", help=EVAL_FORMATS_HELP)
    s.add_argument("--model", metavar="PATH", help="a .gguf file, a Hugging Face model folder or a "
                   "model name in the local Hugging Face cache (default: the bundled "
                   "SmolLM2-135M-Instruct GGUF)")
    s.add_argument("--text", metavar="PATH", help="plain text file to score (default: gensim's "
                   "Wikipedia sample)")
    s.add_argument("--decode-tokens", type=_nonnegative_int, default=32,
                   help="tokens generated to time decoding (0: skip)")
    s.add_argument("--calib-samples", type=_positive_int, help="calibration sequences for gptq/awq/llm.int8/"
                   "mixed (default 64)")
    s.add_argument("--calib-seq-len", type=_positive_int,
                   help="tokens per calibration sequence (default 512)")
    s.add_argument("--fake-quant", action="store_true", help="cross-check: keep nn.Linear with "
                   "dequantized weights (torch matmul) instead of lowbit kernels (rtn only)")
    s.add_argument("--cpu-path", choices=("fast", "exact"),
                   help="lowbit's CPU path: fast (int8 activations) or exact (float32 activations, "
                   "the reference's numbers); default: LOWBIT_CPU_PATH, else exact")
    s.add_argument("--no-cache", action="store_true", help="do not cache the converted GGUF model")
    s.add_argument("--save-dir", metavar="DIR", help="also save each quantized model there "
                   "(lowbit.save, <spec>.safetensors)")
    s.add_argument("--json", metavar="PATH", help="write results as JSON")
    s.add_argument("--plot", metavar="PNG", help="plot perplexity vs bits per weight (matplotlib)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("size", help="memory of a model of N parameters in every format, exactly")
    s.add_argument("--params", required=True, help="parameter count: 70e9, 70B, 8b, 135M")
    s.add_argument("--hidden", type=_positive_int, default=8192, help="hidden size of the Llama-style layer "
                   "mix the bits/weight are averaged over (default 8192: Llama-70B)")
    s.add_argument("--intermediate", type=_positive_int, default=28672, help="MLP size (default 28672)")
    s.add_argument("--kv-dim", type=_positive_int, default=1024, help="key/value projection width "
                   "(KV heads x head dim; default 1024)")
    s.add_argument("--shapes", help="instead of the Llama mix: comma-separated KxN Linear shapes "
                   "(in x out), e.g. 4096x4096,4096x11008,11008x4096")
    s.add_argument("--float-params", default="0", help="parameters kept in float in every "
                   "quantized row (e.g. embeddings + lm_head: 2.1e9 for Llama-3-70B); default 0")
    s.add_argument("--float-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="dtype of --float-params (default bf16)")
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    s.set_defaults(func=cmd_size)

    s = sub.add_parser("demo", help="selftest, a short benchmark, and SmolLM2 quantized to int8/int4/nf4")
    s.add_argument("--tokens", type=_positive_int, default=None,
                   help="tokens scored per format (default 4096; 1024 with the scalar kernels only)")
    s.add_argument("--ctx", type=_positive_int, default=512)
    s.add_argument("--reps", type=_positive_int, default=10, help="timed calls per benchmark case")
    s.add_argument("--decode-tokens", type=_positive_int, default=16, help="tokens generated to time decoding")
    s.add_argument("--prompt", default="Explain in one sentence what a CPU cache is.")
    s.add_argument("--new-tokens", type=_positive_int, default=24, help="tokens to generate from the prompt")
    s.add_argument("--skip-model", action="store_true", help="only the selftest and the benchmark")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)
    return p


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= lo (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")


def _thread_counts(text: str) -> List[int]:
    """--threads: one positive count or a comma-separated list of distinct ones."""
    try:
        counts = [_positive_int(v.strip()) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or a list like 1,2, got {text!r}") from None
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"thread counts must differ, got {text!r}")
    return counts
_nonnegative_int = _int_at_least(0, "a non-negative integer")


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import lowbit
        print(lowbit.__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lowbit.evaluate import MissingExtras
    try:
        return int(args.func(args) or 0)
    except MissingExtras as e:
        print(f"lowbit {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit ... | head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
