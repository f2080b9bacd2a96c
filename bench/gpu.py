"""GPU benchmark: lowbit int4 g128 / nf4 b64 / int8 beside cuBLAS bf16, tinygemm and peers.

    python bench/gpu.py                          # full grid, writes bench_gpu.json / .png
    python bench/gpu.py --shapes 4096x4096 --ms 1,16 --out /tmp/b

The logic lives in lowbit.gpu_bench (run_gpu_bench / format_gpu_table / write_outputs) so the
CLI can call it too; the method is described there. Prints a per-row log, then a table of
speed-ups over cuBLAS bf16 on the same card in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    from lowbit import gpu_bench as GB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in GB.SHAPES), help="NxK list")
    ap.add_argument("--ms", default=",".join(str(m) for m in GB.MS))
    ap.add_argument("--impls", default=",".join(tuple(GB.LOWBIT_IMPLS) + GB.PEERS))
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (QuantLinear.forward) timing")
    ap.add_argument("--out", default="bench_gpu", help="output prefix for .json and .png")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = [int(v) for v in a.ms.split(",")]
    res = GB.run_gpu_bench(shapes, ms, a.impls.split(","), rep_ms=a.rep_ms, eager=not a.no_eager)
    print()
    print(GB.format_gpu_table(res))
    GB.write_outputs(res, a.out + ".json", a.out + ".png")
    print(f"\nwrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    try:
        import lowbit.kernels  # noqa: F401  (an installed lowbit, kernels included)
    except ImportError:  # a source checkout: python/ holds lowbit (kernels/ is mapped at install)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    main()
