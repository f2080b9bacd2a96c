#!/usr/bin/env python
"""CPU fast-path benchmark: lowbit.linear (fast and exact paths) beside torch fp32 F.linear and
torch.ao dynamic int8 (fbgemm) in the same process, weights rotated past the last-level cache,
plus the machine's streaming read bandwidth.

    python scripts/bench_fast_path.py [--shapes 4096x4096,4096x11008] [--m 1,8,32,128]
                                      [--threads 1,2] [--reps 20] [--torch-only] [--json out.json]

Shapes are N x K (out x in features). GB/s is over the weight format's own bytes (codes +
scales + zeros); GFLOP/s = 2 M N K / t. Times are medians over --reps calls that cycle through
enough weight copies to exceed --rotate-mib. --torch-only skips lowbit (for a machine where only
the C++ library is built: csrc/tests/bench_kernels.cpp measures lowbit there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_time(fn, n_copies: int, reps: int, max_s: float = 3.0) -> float:
    for i in range(2):
        fn(i % n_copies)
    ts = []
    start = time.perf_counter()
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r % n_copies)
        ts.append(time.perf_counter() - t0)
        if r >= 4 and time.perf_counter() - start > max_s:
            break
    return statistics.median(ts)


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    t = min(_timed(lambda: x.sum()) for _ in range(7))
    return x.numel() * 4 / t / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x11008")
    p.add_argument("--m", default="1,8,32,128")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--formats", default="int8,int4,nf4", help="any of int8,int4,nf4,fp4")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rotate-mib", type=int, default=320)
    p.add_argument("--torch-only", action="store_true")
    p.add_argument("--max-seconds", type=float, default=3.0, help="time budget per case")
    p.add_argument("--no-bandwidth", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    Ms = [int(v) for v in a.m.split(",")]
    threads = [int(v) for v in a.threads.split(",")]
    rows = []

    def report(impl, N, K, M, nt, t, nbytes):
        r = {"impl": impl, "N": N, "K": K, "M": M, "threads": nt, "ms": t * 1e3,
             "GB/s": nbytes / t / 1e9 if nbytes else None, "GFLOP/s": 2 * M * N * K / t / 1e9}
        rows.append(r)
        gbs = f"{r['GB/s']:7.2f}" if nbytes else "      -"
        print(f"{impl:14s} N={N:5d} K={K:5d} M={M:4d} T={nt}  {t * 1e3:9.3f} ms  {gbs} GB/s  "
              f"{r['GFLOP/s']:7.1f} GFLOP/s", flush=True)

    for nt in ([] if a.no_bandwidth else threads):
        bw = read_bandwidth(nt)
        print(f"read bandwidth (torch sum over 1 GiB, {nt} threads): {bw:.1f} GB/s", flush=True)
        rows.append({"impl": "read_bandwidth", "threads": nt, "GB/s": bw})

    rot = a.rotate_mib << 20
    for N, K in shapes:
        # torch fp32 F.linear
        w = torch.randn(N, K) * 0.02
        copies = max(2, rot // (N * K * 4) + 1)
        ws = [w.clone() for _ in range(copies)]
        # torch.ao dynamic int8 (fbgemm): per-tensor 7-bit activations x int8 weights
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
        dq = []
        n_dq = max(2, rot // (N * K) + 1)
        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        for _ in range(n_dq):
            m = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
            dq.append(m)
        lowbit_w = {}
        if not a.torch_only:
            import lowbit
            for fmt in a.formats.split(","):
                opts = {"int4": {"group_size": 128}, "nf4": {"group_size": 64},
                        "fp4": {"group_size": 64}}.get(fmt, {})
                qw = lowbit.quantize_weight(w, fmt, **opts)
                n = max(2, rot // qw.nbytes + 1)
                lowbit_w[fmt] = [qw] + [qw._replace_tensors(lambda t: t.clone()) for _ in range(n - 1)]
        for M in Ms:
            x = torch.randn(M, K)
            for nt in threads:
                torch.set_num_threads(nt)
                with torch.inference_mode():
                    report("torch_fp32", N, K, M, nt,
                           median_time(lambda i: torch.nn.functional.linear(x, ws[i]), copies, a.reps, a.max_seconds), N * K * 4)
                    report("torch_dyn_int8", N, K, M, nt,
                           median_time(lambda i: dq[i](x), n_dq, a.reps, a.max_seconds), N * K)
                    for fmt, qws in lowbit_w.items():
                        import lowbit
                        from lowbit import _backend
                        for path in ("fast", "exact"):
                            _backend.set_cpu_path(path)
                            for i in range(len(qws)):  # pack outside the timing
                                lowbit.linear(x[:1], qws[i])
                            report(f"lowbit_{fmt}_{path}", N, K, M, nt,
                                   median_time(lambda i: lowbit.linear(x, qws[i]), len(qws), a.reps, a.max_seconds),
                                   qws[0].nbytes)
                        _backend.set_cpu_path(None)
                        if M == 1:
                            xb = x.to(torch.bfloat16)
                            report(f"lowbit_{fmt}_fast_bf16", N, K, M, nt,
                                   median_time(lambda i: lowbit.linear(xb, qws[i]), len(qws), a.reps, a.max_seconds),
                                   qws[0].nbytes)
        del ws, dq, lowbit_w
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
