"""Host time per eager call of the GPU path, layer by layer of the call chain (GPU only).

    python bench/gpu_overhead.py            # 4096 x 4096, M = 1, int4 g128 / nf4 b64 / int8

For each format: the kernel's CUDA-graph time, then the host time (µs per call, the fastest of
several loops of calls timed with a wall clock, the GPU synchronised only around each loop) of
QuantLinear.forward, lowbit.linear, lowbit.kernels.linear (the full path, no bound launch),
run_choice and the bare gemv wrapper. LOWBIT_TRITON_FAST_LAUNCH=0 shows Triton's own launch
path for comparison. kernels/NOTES.md records what it measured.
"""

from __future__ import annotations

import argparse
import time

import torch

import lowbit


def host_us(fn, n: int = 500, repeats: int = 9) -> float:
    """Host µs per call: the fastest of ``repeats`` timed loops of ``n`` calls (as timeit
    advises: other processes and frequency changes only ever add time; on the lent GPU
    machine's shared CPU single loops varied by 2x)."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t)
    torch.cuda.synchronize()
    return best / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    a = ap.parse_args(argv)
    from lowbit.gpu_bench import graph_time_us
    from lowbit.kernels import gemv as G, layout, plan, run_choice
    dev = torch.device("cuda")
    lin = torch.nn.Linear(a.k, a.n, bias=False)
    print(torch.cuda.get_device_name(0), f"N={a.n} K={a.k} M=1, bf16 activations")
    for fmt, g in (("int4", 128), ("nf4", 64), ("int8", -1)):
        ql = lowbit.QuantLinear.from_linear(lin, fmt, group_size=g).to(dev)
        x = torch.randn(1, a.k, device=dev, dtype=torch.bfloat16)
        qw = ql.qweight
        gw = layout.gpu_weight(qw)
        ch = plan(x, qw, 1)
        out = torch.empty(1, a.n, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            r = {"kernel (graph)": graph_time_us(lambda: ql(x)),
                 "QuantLinear.forward": host_us(lambda: ql(x)),
                 "lowbit.linear": host_us(lambda: lowbit.linear(x, qw)),
                 "full path (no binding)": host_us(lambda: run_choice(plan(x, qw, 1), x, qw, None, out)),
                 "gemv wrapper": host_us(lambda: G.gemv(x, gw, None, out, **ch.params))}
        print(f"{fmt:5s} " + "  ".join(f"{k} {v:.1f} us" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
