"""Kernel lab: time candidate launch parameters of the GEMV against cuBLAS bf16 and the currently
selected kernel, with a correctness check of every candidate (GPU only). A quicker, wider probe
than bench/tune_gpu.py for one family (kernels/NOTES.md records what it found).

    python bench/gpu_lab.py --formats int4:128,int8:-1,nf4:64 --m 1 --waves 1,8,16

Kernel time = median CUDA-graph replay with L2 flushed (lowbit.gpu_bench.graph_time_us), as in
the GPU benchmark. Prints one line per (shape, format, M) with the best candidate, its speed-up
over bf16 and over the current selection, and writes every timing as JSON (--json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import torch.nn.functional as F

import lowbit
from lowbit.gpu_bench import graph_time_us, rel_err

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096))


def split_for(programs: int, steps: int, sms: int, waves: float) -> int:
    if programs >= waves * sms:
        return 1
    want = min(math.ceil(waves * sms / max(1, programs)), max(1, steps // 2), 32)
    return max(d for d in range(1, want + 1) if steps % d == 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4:128,int8:-1,nf4:64")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--shapes", default=None, help="NxK,... (default: the GPU benchmark's)")
    ap.add_argument("--bn", default="64,128")
    ap.add_argument("--cb", default="1,2")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--waves", default="1,8", help="split K until about this many programs per SM")
    ap.add_argument("--prefetch", default="1", help="PREFETCH values to try (0: rely on num_stages)")
    ap.add_argument("--gather", default="1", help="codebook formats: LUT_GATHER values to try")
    ap.add_argument("--rep-ms", type=float, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from lowbit.kernels import layout, plan, run_choice
    from lowbit.kernels.gemv import gemv
    from lowbit.kernels.select import sm_count
    dev = torch.device("cuda")
    sms = sm_count(dev)
    shapes = SHAPES if not a.shapes else [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    print(torch.cuda.get_device_name(0), "sms", sms, flush=True)
    records = []
    for N, K in shapes:
        torch.manual_seed(0)
        w = torch.randn(N, K, device=dev) * 0.02
        w16 = w.to(torch.bfloat16)
        for fs in a.formats.split(","):
            fmt, g = fs.split(":")
            qw = lowbit.quantize_weight(w, fmt, group_size=int(g))
            gw = layout.gpu_weight(qw)
            wd = lowbit.dequantize(qw).double()
            for M in ints(a.m):
                x = torch.randn(M, K, device=dev).to(torch.bfloat16)
                ref = (x.double() @ wd.t())
                out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                base = graph_time_us(lambda: F.linear(x, w16), a.rep_ms)
                ch = plan(x, qw, M)
                cur = graph_time_us(lambda: run_choice(ch, x, qw, None, out), a.rep_ms)
                best = None
                for BN, CB, st, nw, waves, gather, pf in itertools.product(
                        ints(a.bn), ints(a.cb), ints(a.stages), ints(a.warps),
                        [float(v) for v in a.waves.split(",")], ints(a.gather), ints(a.prefetch)):
                    nblk = gw.words_per_row // 16
                    steps = max(1, nblk // CB)
                    sk = split_for(M * -(-N // BN), steps, sms, waves)
                    p = dict(BN=BN, CB=CB, SPLIT_K=sk, num_warps=nw, num_stages=st, PREFETCH=bool(pf))
                    try:
                        fn = lambda: gemv(x, gw, None, out, LUT_GATHER=bool(gather), **p)  # noqa: E731
                        out.fill_(float("nan"))
                        fn()
                        err = rel_err(out, ref)
                        us = graph_time_us(fn, a.rep_ms)
                    except Exception as e:  # a config that does not compile / fit
                        print(f"  fail {fmt} {N}x{K} M={M} {p} gather={gather}: {type(e).__name__}: "
                              f"{str(e)[:300]}", flush=True)
                        continue
                    rec = dict(N=N, K=K, fmt=fmt, group=int(g), M=M, params=p, gather=gather, us=us,
                               err=err, bf16_us=base, cur_us=cur, cur=dict(kernel=ch.kernel, **ch.params))
                    records.append(rec)
                    if err > 1e-2 or not math.isfinite(err):
                        print(f"  WRONG {fmt} {N}x{K} M={M} {p} gather={gather} err={err:.3g}", flush=True)
                        continue
                    if best is None or us < best["us"]:
                        best = rec
                if best:
                    print(f"{N}x{K} {fmt:5s} M={M:3d}  bf16 {base:7.2f}  cur {cur:7.2f} "
                          f"({base / cur:4.2f}x)  best {best['us']:7.2f} ({base / best['us']:4.2f}x, "
                          f"{cur / best['us']:4.2f}x cur) {best['params']} gather={best['gather']} "
                          f"err={best['err']:.2g}", flush=True)
            layout.forget(qw)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
