"""Tune lowbit's Triton kernels on this GPU and write kernels/configs/<gpu name>.json.

    python bench/tune_gpu.py                       # default formats, shapes and M buckets
    python bench/tune_gpu.py --formats int4:128 --shapes 4096x4096 --ms 1,16 --jobs 8

For every (format, N, K, M bucket) it times a small candidate set of each kernel family
(GEMV, tensor-core GEMM, dequantize + cuBLAS) as CUDA-graph replays with L2 flushed (median of
triton.testing.do_bench), checks each candidate's output against float32 math on the
dequantized weight, and keeps the fastest correct one. Candidates are compiled first in
``--jobs`` worker processes (Triton's on-disk cache then serves the timing process), since
compilation, not timing, is what takes the time. Autotuning is this tool, run once per GPU
kind; at run time select() only reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_FORMATS = "int4:128,nf4:64,int8:-1"
DEFAULT_SHAPES = "4096x4096,14336x4096,4096x14336,28672x4096"  # N x K
DEFAULT_MS = "1,4,16,64,256,1024,4096"


# A format's third field names a variant with records of its own (kernels.select.variant_of):
# int4's symmetric codes (GPTQ's default), nf4 / fp4 double quantization (QLoRA's).
VARIANT_OPTS = {"sym": {"symmetric": True}, "dq": {"double_quant": True}}


def parse_formats(text):
    """'fmt:group[:variant]' items, e.g. int4:128, nf4:64:dq, int4:128:sym."""
    out = []
    for item in text.split(","):
        fmt, _, rest = item.partition(":")
        g, _, variant = rest.partition(":")
        g = int(g) if g else None
        opts = {} if fmt == "int8" else {"group_size": g}
        if variant:
            if variant not in VARIANT_OPTS:
                raise SystemExit(f"unknown variant {variant!r} in {item!r}; expected one of "
                                 f"{sorted(VARIANT_OPTS)}")
            opts.update(VARIANT_OPTS[variant])
        out.append((fmt, opts))
    return out


def candidates(M, N, K, fmt, sms, group=128):
    """The candidate Choices for one case (kept small: each distinct constexpr set compiles).
    ``group``: the weight's group size (-1 or None: one per row)."""
    from lowbit.kernels.select import Choice, heuristic
    import torch
    bits = 8 if fmt == "int8" else 4
    kb = 16 * (32 // bits)
    nblk = -(-K // kb)
    group = -1 if group is None else group
    out = [heuristic(M, N, K, fmt, group, torch.bfloat16, sms)]

    def splits(programs, steps):
        """1 and the divisors of the K steps nearest to 1, 2, 4, 8 and 16 programs per SM (a
        divisor keeps every split full, so the kernel needs no K masks). Small programs run
        many per SM: the M = 1 GEMV was fastest at 8-16 per SM on an H200 (kernels/NOTES.md)."""
        divs = [d for d in range(1, min(steps, 32) + 1) if steps % d == 0]
        s = {1}
        for waves in (1, 2, 4, 8, 16):
            want = waves * sms / max(1, programs)
            if want > 1.5:
                s.add(min(divs, key=lambda d: abs(math.log(d / want))))
        return sorted(s)

    def gemv(BN, CB, warps, prefetch=True, idot=False):
        for sk in splits(M * -(-N // BN), max(1, nblk // CB)):
            p = {"BN": BN, "CB": CB, "SPLIT_K": sk, "num_warps": warps, "num_stages": 1,
                 "PREFETCH": prefetch}
            if idot:
                p["IDOT"] = True
            out.append(Choice("gemv", p))

    def gemm(BM, BN, CB, swap, warps, stages, full, exact=True, max_splits=3, rega=False,
             imma=False):
        progs = -(-M // BM) * -(-N // BN)
        for sk in splits(progs, max(1, nblk // CB))[:max_splits]:
            p = {"BM": BM, "BN": BN, "CB": CB, "SWAP": swap, "GROUP_M": 8, "SPLIT_K": sk,
                 "num_warps": warps, "num_stages": stages, "FULL_TILE": full}
            if not exact and fmt == "int4":
                p["EXACT"] = False
            if rega:
                p["REGA"] = True
            if imma:
                p["IMMA"] = True
            out.append(Choice("gemm", p))

    bm = max(16, 1 << (M - 1).bit_length())
    if M <= 4:
        for BN, CB, warps in ((16, 1, 1), (16, 2, 1), (32, 1, 1), (32, 2, 1), (32, 1, 2),
                              (32, 2, 2), (64, 1, 2), (64, 2, 4), (64, 4, 4), (128, 1, 4),
                              (128, 2, 8)):
            gemv(BN, CB, warps)
        gemv(32, 2, 1, prefetch=False)
        if fmt in ("int4", "int8", "nf4", "fp4"):  # the integer-dot GEMV (where groups allow)
            for BN, CB, warps in ((16, 2, 2), (16, 4, 4), (16, 8, 4), (32, 2, 4), (32, 4, 1),
                                  (32, 4, 2), (32, 4, 4), (64, 2, 2), (64, 4, 2), (64, 4, 4)):
                gemv(BN, CB, warps, idot=True)
    if 2 <= M <= 16:
        gemv(64, 2, 4)
        for BN, CB, full in ((64, 1, False), (128, 1, False), (128, 2, False), (64, 2, True),
                             (128, 1, True), (128, 2, True)):
            gemm(bm, BN, CB, True, 4, 3, full)
    if fmt == "int4" and 0 < group < 128 and M <= 2:  # IMMA where the GEMVs are slowest
        for BN in (64, 128):
            gemm(16, BN, 1, True, 4, 3, False, max_splits=4, imma=True)
    if fmt == "int4" and 2 <= M <= 64:  # the register-operand GEMM (gemm_rega)
        for BN, stages in ((64, 3), (128, 3), (128, 4)):
            gemm(bm, BN, 1, True, 4, stages, False, max_splits=4, rega=True)
        # the integer tensor-core GEMM (kernels/imma.py): H200 lab, M = 16: 0.97-1.10x of the
        # register-operand GEMM; at M = 64 with x tiles of 32 rows (kernels/NOTES.md item 23);
        # two blocks per step at BN 64: 4-9% faster at M = 16 on the large shapes (item 24)
        for BM, BN, CB, warps in ((16, 64, 1, 4), (16, 64, 2, 4), (16, 128, 1, 4),
                                  (min(bm, 32), 128, 1, 4)):
            gemm(BM, BN, CB, True, warps, 4, False, max_splits=4, imma=True)
        if M <= 16:
            gemm(16, 64, 2, True, 4, 3, False, max_splits=4, imma=True)
    if 16 < M <= 64:
        for BN, CB, full in ((128, 1, False), (64, 2, True), (128, 1, True), (128, 2, True)):
            gemm(bm, BN, CB, True, 4, 3, full, max_splits=2)
        gemm(64, 128, 1, False, 4, 3, True, max_splits=2)
        gemm(64, 64, 1, False, 4, 3, True, max_splits=2)
        # one rounding per weight instead of the second accumulator (int4): fewer registers,
        # 77 vs 84 us at 28672 x 4096 on an H100 (kernels/NOTES.md item 9)
        gemm(64, 128, 1, False, 4, 3, True, exact=False, max_splits=2)
        gemm(bm, 128, 1, True, 4, 3, True, exact=False, max_splits=2)
    if 64 < M <= 512:
        for BM, BN, swap, warps, full, exact in ((128, 128, False, 8, True, False),
                                                 (128, 128, False, 8, True, True),
                                                 (64, 128, False, 4, True, False),
                                                 (128, 256, False, 8, True, False),
                                                 (128, 128, True, 8, True, False),
                                                 (128, 128, False, 8, False, False)):
            gemm(BM, BN, 1, swap, warps, 3, full, exact, max_splits=2)
    if M > 512:
        for BM, BN, warps, exact in ((128, 128, 8, False), (128, 256, 8, False),
                                     (256, 128, 8, False), (128, 128, 8, True)):
            gemm(BM, BN, 1, False, warps, 3, True, exact, max_splits=1)
    if M >= 256:
        out.append(Choice("dequant_mm", {}))
    seen, uniq = set(), []
    for c in out:
        key = (c.kernel, tuple(sorted(c.params.items())))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


_WEIGHTS = {}


def _case_weight(fmt, opts, N, K):
    import torch
    import lowbit
    key = (fmt, tuple(sorted(opts.items())), N, K)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(N, K, device="cuda", generator=g) * 0.02
        qw = lowbit.quantize_weight(w, fmt, **opts)
        _WEIGHTS[key] = qw
    return _WEIGHTS[key]


def _compile_task(args):
    """Worker: run each candidate once (compiles it into Triton's on-disk cache)."""
    fmt, opts, N, K, M, choices = args
    import torch
    from lowbit import kernels as LK
    from lowbit.kernels.select import Choice
    qw = _case_weight(fmt, opts, N, K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    errs = []
    for kernel, params in choices:
        try:
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            LK.run_choice(Choice(kernel, params), x, qw, None, out)
            torch.cuda.synchronize()
        except Exception as e:
            errs.append((kernel, params, f"{type(e).__name__}: {str(e)[:300]}"))
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="fmt:group[:variant] list, e.g. int4:128,nf4:64,int8:-1,nf4:64:dq,int4:128:sym")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxK list")
    ap.add_argument("--ms", default=DEFAULT_MS, help="M values (one per bucket)")
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--rep-ms", type=float, default=15.0)
    ap.add_argument("--out", default=None, help="output JSON (default kernels/configs/<gpu>.json)")
    ap.add_argument("--merge", action="store_true", help="keep records of the existing file not re-tuned")
    ap.add_argument("--log", default=None, help="also write every candidate's time here (JSON lines)")
    a = ap.parse_args(argv)

    import torch
    import triton
    import lowbit
    from lowbit import kernels as LK
    from lowbit.gpu_bench import graph_time_us
    from lowbit.kernels import select as S

    card = torch.cuda.get_device_name(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    formats = parse_formats(a.formats)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = [int(v) for v in a.ms.split(",")]
    cases = [(fmt, tuple(sorted(opts.items())), N, K, M) for fmt, opts in formats
             for N, K in shapes for M in ms]
    cands = {c: candidates(c[4], c[2], c[3], c[0], sms, dict(c[1]).get("group_size", -1))
             for c in cases}
    # what the shipped table selects now (a record of its own or a borrowed one) is a candidate
    # too, so that a re-tune never ships a slower choice than the one it replaces
    for c in cases:
        # the case's variant and resolved group, as its records will name them (quantize_weight
        # applies the defaults; a small weight of the same K is enough)
        tiny = lowbit.quantize_weight(torch.randn(8, c[3]), c[0], **dict(c[1]))
        cur = S.select(c[4], c[2], c[3], c[0], tiny.group_size, card, dtype=torch.bfloat16,
                       variant=S.variant_of(c[0], tiny.symmetric, tiny.double_quant), sms=sms)
        if cur.source != "heuristic" and all((ch.kernel, ch.params) != (cur.kernel, cur.params)
                                             for ch in cands[c]):
            cands[c].append(cur)
    print(f"{card}: {len(cases)} cases, {sum(len(v) for v in cands.values())} candidates", flush=True)

    # 1) compile everything in parallel (fresh processes share Triton's on-disk cache)
    t0 = time.time()
    bad = set()
    if a.jobs > 1:
        import multiprocessing as mp
        tasks = [(c[0], dict(c[1]), c[2], c[3], c[4], [(ch.kernel, ch.params) for ch in cands[c]
                                                 if ch.kernel != "dequant_mm"]) for c in cases]
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as ex:
            for f in as_completed([ex.submit(_compile_task, t) for t in tasks]):
                for kernel, params, err in f.result():
                    bad.add((kernel, json.dumps(params, sort_keys=True)))
                    print(f"  compile/run failed: {kernel} {params}: {err}", flush=True)
    print(f"compiled in {time.time() - t0:.0f} s", flush=True)

    # 2) time sequentially
    records, log = [], []
    for case in cases:
        fmt, opts, N, K, M = case
        opts = dict(opts)
        qw = _case_weight(fmt, opts, N, K)
        LK.prepare(qw)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), lowbit.reference.dequantize(qw, torch.float32))
        best = None
        for ch in cands[case]:
            if (ch.kernel, json.dumps(ch.params, sort_keys=True)) in bad:
                continue
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            try:
                fn = lambda: LK.run_choice(ch, x, qw, None, out)  # noqa: E731
                fn()
                err = float((out.float() - ref).norm() / ref.norm())
                if not math.isfinite(err) or err > 2e-2:
                    print(f"  rejected (err {err:.3g}): {ch}", flush=True)
                    continue
                us = graph_time_us(fn, a.rep_ms)
            except Exception as e:
                print(f"  failed: {ch}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            log.append(dict(format=fmt, group=qw.group_size, N=N, K=K, M=M, kernel=ch.kernel,
                            params=ch.params, us=us, err=err))
            if best is None or us < best[0]:
                best = (us, ch)
        if best is None:
            continue
        us, ch = best
        heur = S.heuristic(M, N, K, fmt, qw.group_size, torch.bfloat16, sms)
        h_us = next((r["us"] for r in log if r["N"] == N and r["K"] == K and r["M"] == M
                     and r["format"] == fmt and r["group"] == qw.group_size
                     and r["kernel"] == heur.kernel and r["params"] == heur.params), None)
        print(f"{fmt:<5} g{qw.group_size:<4} N={N:<6} K={K:<6} M={M:<5} best {us:8.1f} us {ch.kernel} "
              f"{ch.params}  (heuristic {h_us if h_us is None else round(h_us, 1)})", flush=True)
        records.append(dict(format=fmt, variant=S.variant_of(fmt, qw.symmetric, qw.double_quant),
                            group=qw.group_size, N=N, K=K, M_bucket=S.m_bucket(M), act="16bit",
                            kernel=ch.kernel, params=ch.params, us=round(us, 2)))
        torch.cuda.empty_cache()

    path = a.out or S.config_path(card)
    if a.merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("configs", [])
        keys = {S.record_key(r) for r in records}
        records = [r for r in old if S.record_key(r) not in keys] + records
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc = {"gpu": card, "sms": sms, "triton": triton.__version__, "torch": torch.__version__,
           "created": time.strftime("%Y-%m-%d %H:%M:%S"), "tool": "bench/tune_gpu.py",
           "note": "us = median CUDA-graph replay time with L2 flushed, bf16 activations",
           "configs": records}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {len(records)} records to {path}")
    if a.log:
        with open(a.log, "w") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    try:
        import lowbit.kernels  # noqa: F401  (an installed lowbit, kernels included)
    except ImportError:  # a source checkout: python/ holds lowbit (kernels/ is mapped at install)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    main()
