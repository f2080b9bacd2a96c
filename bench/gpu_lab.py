"""Kernel lab: time candidate launch parameters of the GEMV (or, with --kernel gemm, the
tensor-core GEMM) against cuBLAS bf16 and the currently selected kernel, with a correctness
check of every candidate (GPU only). A quicker, wider probe than bench/tune_gpu.py for one
family (kernels/NOTES.md records what it found). Each candidate's line of the JSON also
carries the compiler's report: registers per thread, spilled registers, shared memory.

    python bench/gpu_lab.py --formats int4:128,int8:-1,nf4:64 --m 1 --waves 1,8,16
    python bench/gpu_lab.py --kernel gemm --formats int4:128 --m 64,256 --bm 64,128 --bn 128 \
        --cb 1,2 --warps 4,8 --stages 3,4 --full 0,1 --swap 0 --waves 1,2

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


def _compiled(kernel) -> dict:
    """id -> compiled kernel, for every compilation of this @triton.jit function so far
    (Triton keeps them per device; the structure differs between versions)."""
    found = {}
    try:
        for entry in kernel.device_caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for ck in cache.values():
                found[id(ck)] = ck
    except Exception:
        pass
    return found


def _report(ck) -> dict:
    """The compiler's report of one compiled kernel: registers, spills, shared memory."""
    out = {}
    for key, attr in (("regs", "n_regs"), ("spills", "n_spills")):
        v = getattr(ck, attr, None)
        if v is not None:
            out[key] = int(v)
    md = getattr(ck, "metadata", None)
    smem = getattr(md, "shared", None)
    if smem is not None:
        out["smem"] = int(smem)
    return out


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
    ap.add_argument("--idot", default="0,1", help="gemv: IDOT values to try (1: the integer-dot "
                    "kernel where it applies; the current selection is timed with IDOT off)")
    ap.add_argument("--kernel", default="gemv", choices=("gemv", "gemm"))
    ap.add_argument("--bm", default="64,128", help="gemm: rows of x per program")
    ap.add_argument("--full", default="0,1", help="gemm: FULL_TILE values to try")
    ap.add_argument("--swap", default="0", help="gemm: SWAP values to try")
    ap.add_argument("--exact", default="1", help="gemm: EXACT values to try (int4)")
    ap.add_argument("--rega", default="0", help="gemm: REGA values to try (1: the register-operand "
                    "kernel, int4 with groups of a multiple of 128)")
    ap.add_argument("--imma", default="0", help="gemm: IMMA values to try (1: the integer "
                    "tensor-core GEMM, kernels/imma.py, where it takes the weight)")
    ap.add_argument("--verbose", action="store_true", help="print every candidate")
    ap.add_argument("--rep-ms", type=float, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from lowbit.kernels import layout, plan, run_choice
    from lowbit.kernels.gemm import _gemm_kernel, _gemm_rega_kernel, gemm
    from lowbit.kernels.imma import _gemm_imma_kernel
    from lowbit.kernels.gemv import _gemv_idot_kernel, _gemv_kernel, gemv
    from lowbit.kernels.select import Choice, sm_count
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
                if ch.kernel == "gemv":  # the float32 GEMV as selected (the baseline)
                    ch = Choice(ch.kernel, dict(ch.params, IDOT=False), ch.source)
                cur = graph_time_us(lambda: run_choice(ch, x, qw, None, out), a.rep_ms)
                bests = {}
                if a.kernel == "gemv":
                    space = [dict(BN=BN, CB=CB, num_warps=nw, num_stages=st, PREFETCH=bool(pf),
                                  IDOT=bool(idot), _waves=waves, _gather=gather)
                             for BN, CB, st, nw, waves, gather, pf, idot in itertools.product(
                                 ints(a.bn), ints(a.cb), ints(a.stages), ints(a.warps),
                                 [float(v) for v in a.waves.split(",")], ints(a.gather),
                                 ints(a.prefetch), ints(a.idot))]
                else:
                    space = [dict(BM=BM, BN=BN, CB=CB, num_warps=nw, num_stages=st, FULL_TILE=bool(fu),
                                  SWAP=bool(sw), EXACT=bool(ex), REGA=bool(rg), IMMA=bool(im),
                                  GROUP_M=8, _waves=waves, _gather=gather)
                             for BM, BN, CB, st, nw, fu, sw, ex, rg, im, waves, gather in itertools.product(
                                 ints(a.bm), ints(a.bn), ints(a.cb), ints(a.stages), ints(a.warps),
                                 ints(a.full), ints(a.swap), ints(a.exact), ints(a.rega),
                                 ints(a.imma), [float(v) for v in a.waves.split(",")],
                                 ints(a.gather))]
                for p in space:
                    waves, gather = p.pop("_waves"), p.pop("_gather")
                    nblk = gw.words_per_row // 16
                    steps = max(1, nblk // p["CB"])
                    progs = M * -(-N // p["BN"]) if a.kernel == "gemv" else \
                        -(-M // p["BM"]) * -(-N // p["BN"])
                    p["SPLIT_K"] = split_for(progs, steps, sms, waves)
                    kern, call = (_gemv_kernel, gemv) if a.kernel == "gemv" else (_gemm_kernel, gemm)
                    if p.get("IDOT"):
                        kern = _gemv_idot_kernel
                    if p.get("REGA"):
                        kern = _gemm_rega_kernel
                    if p.get("IMMA"):
                        kern = _gemm_imma_kernel
                    try:
                        fn = lambda: call(x, gw, None, out, LUT_GATHER=bool(gather), **p)  # noqa: E731
                        before = _compiled(kern)
                        out.fill_(float("nan"))
                        fn()
                        new_k = [k for i, k in _compiled(kern).items() if i not in before]
                        err = rel_err(out, ref)
                        us = graph_time_us(fn, a.rep_ms)
                    except Exception as e:  # a config that does not compile / fit
                        print(f"  fail {fmt} {N}x{K} M={M} {p} gather={gather}: {type(e).__name__}: "
                              f"{str(e)[:300]}", flush=True)
                        continue
                    rep = _report(new_k[0]) if len(new_k) == 1 else {}
                    rec = dict(N=N, K=K, fmt=fmt, group=int(g), M=M, kernel=a.kernel, params=p,
                               gather=gather, us=us, err=err, bf16_us=base, cur_us=cur,
                               cur=dict(kernel=ch.kernel, **ch.params), **rep)
                    records.append(rec)
                    if a.verbose:
                        print(f"    {us:8.2f} us ({base / us:4.2f}x) {p} {rep}", flush=True)
                    if err > 1e-2 or not math.isfinite(err):
                        print(f"  WRONG {fmt} {N}x{K} M={M} {p} gather={gather} err={err:.3g}", flush=True)
                        continue
                    bk = (p.get("IDOT", False), p.get("REGA", False), p.get("IMMA", False))
                    if bk not in bests or us < bests[bk]["us"]:
                        bests[bk] = rec
                for best in bests.values():
                    print(f"{N}x{K} {fmt:5s} M={M:3d}  bf16 {base:7.2f}  cur {cur:7.2f} "
                          f"({base / cur:4.2f}x)  best {best['us']:7.2f} ({base / best['us']:4.2f}x, "
                          f"{cur / best['us']:4.2f}x cur) {best['params']} gather={best['gather']} "
                          f"regs={best.get('regs')} spills={best.get('spills')} "
                          f"err={best['err']:.2g}", flush=True)
            layout.forget(qw)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
