#!/usr/bin/env python
"""CPU benchmark, full shape set: lowbit int8 / int4 g128 / nf4 b64 ``linear`` beside torch
fp32 and bf16 ``F.linear`` in the same process, weights rotated past the L3.

    python bench/cpu.py [--json bench_cpu.json] [--threads N] [--reps 20] [--cpu-path both]

Shapes (K x N) 4096x4096, 4096x11008, 11008x4096 (a 7B model's attention, MLP up and MLP
down projections) x M in 1, 8, 32, 128. The method (rotation, medians, GB/s, GFLOP/s) is in
lowbit.benchmark; ``lowbit bench`` runs the same code on a shorter default set.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    from lowbit import benchmark as B
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="bench_cpu.json",
                   help="where to write the results (default ./bench_cpu.json, like bench/gpu.py)")
    p.add_argument("--shapes", help="KxN list, default " +
                   ",".join(f"{k}x{n}" for k, n in B.FULL_SHAPES))
    p.add_argument("--m", help="M list, default " + ",".join(map(str, B.FULL_MS)))
    p.add_argument("--impls", help="default " + ",".join(B.DEFAULT_IMPLS))
    p.add_argument("--threads", help="threads for torch and lowbit (default: torch's); several, e.g. "
                   "1,2: each case with each count in turn, with a speed-up column")
    p.add_argument("--reps", type=int, default=20, help="timed calls per case (median reported)")
    p.add_argument("--max-seconds", type=float, default=3.0, help="time budget per case and impl")
    p.add_argument("--cpu-path", choices=B.CPU_PATH_CHOICES,
                   help="lowbit's CPU path: fast, exact or both (each lowbit row on each); "
                   "default: LOWBIT_CPU_PATH when set, else both")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cpu_path = B.default_cpu_path(args.cpu_path)
    shapes = B.parse_shapes(args.shapes) if args.shapes else list(B.FULL_SHAPES)
    ms = B.parse_ints(args.m, "M") if args.m else list(B.FULL_MS)
    impls = args.impls.split(",") if args.impls else list(B.DEFAULT_IMPLS)
    env = B.environment()
    threads = B.parse_ints(args.threads, "thread count") if args.threads else None
    if threads is not None and len(threads) == 1:
        threads = threads[0]
    print(f"CPU ISA {env['cpu_isa']}, {args.threads or env['num_threads']} threads, "
          f"LLC {env['llc_bytes'] >> 20} MB, torch {env['torch']}")
    results = B.run_bench(shapes, ms, impls, reps=args.reps, threads=threads,
                          max_seconds=args.max_seconds, progress=not args.no_progress,
                          cpu_path=cpu_path)
    print(B.results_table(results))
    B.write_json(args.json, results, shapes=[list(s) for s in shapes], ms=list(ms),
                 script="bench/cpu.py")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    sys.exit(main())
