"""Tensor-parallel benchmark: one Llama-3-8B-shaped MLP block and the bundled SmolLM2-135M,
world size 1 (the unsharded model on one device) vs 2 (lowbit.parallel.shard_model), on NCCL
(GPUs) or gloo (CPU processes).

    python bench/tp.py                           # GPUs: NCCL, world sizes 1 and 2, writes bench_tp.json
    python bench/tp.py --device cpu --small      # CPU smoke test on gloo (small MLP, short runs)

It starts its own processes (torch.multiprocessing spawn, one per rank, on 127.0.0.1: no network
needed); NCCL runs with NVLink multicast off (NCCL_NVLS_ENABLE=0).

Method:
* MLP block: gate/up [I, H] column-parallel, down [H, I] row-parallel (one all-reduce), SiLU,
  H=4096, I=14336 (Llama-3-8B), no bias; each format quantized from the same random bf16
  weights; "float" is the nn.Linear baseline (bf16 cuBLAS on GPUs, fp32 on the CPU).
* Model: SmolLM2-135M (9 heads, 3 kv heads: 2 ranks get 2 and 1 kv heads, uneven=True),
  Linear layers quantized, lm_head and embeddings replicated in the activation dtype. Prefill:
  one forward of --ctx tokens; decode: greedy generate with the KV cache,
  (time(1 + n tokens) - time(1 token)) / n, as lowbit.evaluate.decode_speed.
* Timing: every rank runs the same loop after a barrier; a figure is the slowest rank's median
  over --rounds rounds of a loop sized to ~--target-ms. Eager (what a user of the nn.Module
  sees) and, on CUDA, CUDA-graph replay of the whole block including the NCCL all-reduce
  (--no-graphs to skip). tokens/s = tokens per call / seconds per call.
* Memory per rank: bytes of this rank's weights (tensors it holds, tied ones once) and, on CUDA,
  torch.cuda.max_memory_allocated during the timed calls (weights + activations + workspaces).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

if __name__ in ("__main__", "__mp_main__"):
    try:
        import lowbit  # noqa: F401  (an installed lowbit)
    except ImportError:  # a source checkout
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch
import torch.distributed as dist
from torch import nn

# label -> (lowbit format or None for float, quantize options)
FORMATS = {
    "float": (None, {}),  # nn.Linear in the activation dtype: bf16 on CUDA (cuBLAS), fp32 on the CPU
    "int8": ("int8", {}),
    "int4": ("int4", {"group_size": 128}),
    "nf4": ("nf4", {"group_size": 64}),
    "nf4-dq": ("nf4", {"group_size": 64, "double_quant": True}),
}


class MLP(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)); child names as shard_model expects."""

    def __init__(self, hidden: int, inter: int, device, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- helpers ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(world):
    if world > 1:
        dist.barrier()


def _max_over_ranks(v: float, world: int, device) -> float:
    if world == 1:
        return v
    t = torch.tensor([v], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen and t.numel():
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def time_call(fn, device, world, target_ms: float, rounds: int) -> float:
    """Seconds per call: the slowest rank's median over ``rounds`` loops of n calls, n agreed by
    all ranks (~target_ms per loop)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = _max_over_ranks(time.perf_counter() - t0, world, device)
    n = int(max(1, min(1000, target_ms / 1e3 / max(one, 1e-7))))
    times = []
    for _ in range(rounds):
        _barrier(world)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / n)
    return _max_over_ranks(statistics.median(times), world, device)


def graph_call(fn, device, world):
    """A CUDA graph replaying ``fn`` (its collectives included), or (None, reason). All ranks
    agree on success before anyone replays (a lone replayed all-reduce would hang)."""
    err = None
    g = None
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize(device)
    except Exception as e:  # recorded, not fatal: eager figures still stand
        err = f"{type(e).__name__}: {e}"
        g = None
    ok = _max_over_ranks(0.0 if g is not None else 1.0, world, device) == 0.0
    if not ok:
        return None, err or "another rank failed to capture"
    return g.replay, None


def _setup_rank(rank, world, port, device_kind, backend, threads):
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads)
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=10), **kw)
    return device


def _quantize(model: nn.Module, fmt, opts, skip=("lm_head",)):
    from lowbit import evaluate as E
    if fmt is not None:
        E.quantize_linears(model, fmt, skip=skip, **opts)
    return model


def _finish_shard(model, world, device):
    import lowbit.parallel as tp
    if world > 1:
        tp.shard_model(model, uneven=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return model


# ---- the two workloads -----------------------------------------------------------------------
def bench_mlp(a, rank, world, device, dtype, out):
    for label in a.formats:
        fmt, opts = FORMATS[label]
        torch.manual_seed(0)
        block = MLP(a.hidden, a.intermediate, device, dtype).eval()
        with torch.no_grad():
            _quantize(block, fmt, opts, skip=())
        _finish_shard(block, world, device)
        wbytes = _weight_bytes(block)
        for M in a.tokens:
            x = torch.randn(M, a.hidden, device=device, dtype=dtype)
            with torch.inference_mode():
                def call():
                    return block(x)
                eager = time_call(call, device, world, a.target_ms, a.rounds)
                graph, graph_err = None, None
                if device.type == "cuda" and a.graphs:
                    replay, graph_err = graph_call(call, device, world)
                    if replay is not None:
                        graph = time_call(replay, device, world, a.target_ms, a.rounds)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            out.append({"workload": f"mlp {a.hidden}x{a.intermediate}", "format": label,
                        "world_size": world, "tokens": M, "eager_ms": eager * 1e3,
                        "eager_tok_s": M / eager, "graph_ms": None if graph is None else graph * 1e3,
                        "graph_tok_s": None if graph is None else M / graph, "graph_error": graph_err,
                        "weights_mb_per_rank": wbytes / 1e6,
                        "peak_mb_per_rank": None if peak is None else peak / 1e6})
            if rank == 0:
                print(f"  [world {world}] mlp {label:7s} M={M:<5d} eager {eager * 1e3:8.3f} ms"
                      + ("" if graph is None else f"  graph {graph * 1e3:8.3f} ms")
                      + (f"  (graph: {graph_err})" if graph_err else ""), flush=True)
        del block


def bench_model(a, rank, world, device, dtype, out):
    from lowbit import evaluate as E
    for label in a.model_formats:
        fmt, opts = FORMATS[label]
        model, tok, _ = E.load_model(verbose=False)
        model = model.to(device)
        with torch.no_grad():
            _quantize(model, fmt, opts)
        model = model.to(dtype)
        _finish_shard(model, world, device)
        wbytes = _weight_bytes(model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, a.ctx), generator=g).to(device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():
            prefill = time_call(lambda: model(ids), device, world, a.target_ms, a.rounds)

            def gen(n):
                return E._generate(model, ids[:, :16], n, pad)
            t1 = time_call(lambda: gen(1), device, world, 0, a.rounds)
            tn = time_call(lambda: gen(1 + a.decode_tokens), device, world, 0, a.rounds)
            # every rank must have produced the same tokens (logits are replicated)
            toks = gen(1 + a.decode_tokens)
        if world > 1:
            ref = toks.clone()
            dist.broadcast(ref, 0)
            same = bool(torch.equal(ref, toks))
        else:
            same = True
        decode = a.decode_tokens / max(tn - t1, 1e-9)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        out.append({"workload": "SmolLM2-135M", "format": label, "world_size": world,
                    "tokens": a.ctx, "prefill_ms": prefill * 1e3, "prefill_tok_s": a.ctx / prefill,
                    "decode_tok_s": decode, "ranks_agree": same,
                    "weights_mb_per_rank": wbytes / 1e6,
                    "peak_mb_per_rank": None if peak is None else peak / 1e6})
        if rank == 0:
            print(f"  [world {world}] SmolLM2 {label:7s} prefill {a.ctx} tok {prefill * 1e3:8.2f} ms, "
                  f"decode {decode:7.1f} tok/s, ranks agree: {same}", flush=True)
        del model


def _worker(rank, world, port, a, result_path):
    device = _setup_rank(rank, world, port, a.device, a.backend, a.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    try:
        if "mlp" in a.workloads:
            bench_mlp(a, rank, world, device, dtype, out)
        if "model" in a.workloads:
            bench_model(a, rank, world, device, dtype, out)
    finally:
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(out, f)
        dist.destroy_process_group()


# ---- driver ----------------------------------------------------------------------------------
def environment(a) -> dict:
    import lowbit
    info = lowbit.backend_info()
    env = {"torch": torch.__version__, "lowbit": info.get("version"), "device": a.device,
           "backend": a.backend, "gpu_backend": info.get("gpu_backend"),
           "cpu_isa": info.get("cpu_isa"), "triton": info.get("triton"),
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
           "cpu_threads_per_rank": a.threads if a.device == "cpu" else None}
    if a.device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:
            env["nccl"] = None
    return env


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def _speedup(r, base, key):
    if base is None or r is base or not r.get(key) or not base.get(key):
        return "-"
    return f"{r[key] / base[key]:.2f}x"


def tables(results) -> str:
    """One table for the MLP block, one for the model; speed-ups against world size 1."""
    from tabulate import tabulate
    ok = [r for r in results if "error" not in r]
    out = []
    mlp = [r for r in ok if r["workload"].startswith("mlp")]
    if mlp:
        base = {(r["format"], r["tokens"]): r for r in mlp if r["world_size"] == 1}
        rows = []
        for r in mlp:
            b = base.get((r["format"], r["tokens"]))
            best = "graph_tok_s" if r.get("graph_tok_s") else "eager_tok_s"
            rows.append([r["format"], r["tokens"], r["world_size"], _fmt(r["eager_ms"], 3),
                         _fmt(r["eager_tok_s"]), _fmt(r.get("graph_ms"), 3), _fmt(r.get("graph_tok_s")),
                         _speedup(r, b, best), _fmt(r["weights_mb_per_rank"]),
                         _fmt(r.get("peak_mb_per_rank"))])
        out.append(f"{mlp[0]['workload']} block (gate/up column-parallel, down row-parallel)\n" + tabulate(
            rows, headers=["format", "tokens", "world", "eager ms", "eager tok/s", "graph ms",
                           "graph tok/s", "speed-up vs 1", "weights MB/rank", "peak MB/rank"],
            disable_numparse=True))
    mod = [r for r in ok if not r["workload"].startswith("mlp")]
    if mod:
        base = {r["format"]: r for r in mod if r["world_size"] == 1}
        rows = []
        for r in mod:
            b = base.get(r["format"])
            rows.append([r["format"], r["world_size"], _fmt(r["prefill_tok_s"]),
                         _speedup(r, b, "prefill_tok_s"), _fmt(r["decode_tok_s"]),
                         _speedup(r, b, "decode_tok_s"), _fmt(r["weights_mb_per_rank"]),
                         _fmt(r.get("peak_mb_per_rank")), r["ranks_agree"]])
        out.append(f"{mod[0]['workload']} (prefill {mod[0]['tokens']} tokens, greedy decode with KV cache)\n"
                   + tabulate(rows, headers=["format", "world", "prefill tok/s", "speed-up",
                                             "decode tok/s", "speed-up", "weights MB/rank",
                                             "peak MB/rank", "ranks agree"], disable_numparse=True))
    return "\n\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto")
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--workloads", default="mlp,model", help="mlp and/or model")
    ap.add_argument("--formats", default="float,int4,nf4,int8", help=f"MLP formats, of {list(FORMATS)}")
    ap.add_argument("--model-formats", default="float,int4", help="bundled-model formats")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--tokens", default="1,16,128,2048", help="MLP tokens per call (M)")
    ap.add_argument("--ctx", type=int, default=512, help="model prefill tokens")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--target-ms", type=float, default=200.0, help="time per timing loop")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip CUDA-graph timing")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores / world)")
    ap.add_argument("--small", action="store_true",
                    help="smoke-test sizes: MLP 512x1536, tokens 1,16, ctx 64, 4 decode tokens, short loops")
    ap.add_argument("--out", default="bench_tp.json")
    a = ap.parse_args(argv)
    if a.small:
        a.hidden, a.intermediate, a.tokens, a.ctx, a.decode_tokens = 512, 1536, "1,16", 64, 4
        a.target_ms, a.rounds = min(a.target_ms, 30.0), min(a.rounds, 3)
    a.world_sizes = [int(v) for v in a.world_sizes.split(",")]
    a.tokens = [int(v) for v in a.tokens.split(",")]
    a.formats = [f for f in a.formats.split(",") if f]
    a.model_formats = [f for f in a.model_formats.split(",") if f]
    a.workloads = [w for w in a.workloads.split(",") if w]
    for f in a.formats + a.model_formats:
        if f not in FORMATS:
            ap.error(f"unknown format {f!r}; choose from {list(FORMATS)}")
    for w in a.workloads:
        if w not in ("mlp", "model"):
            ap.error(f"unknown workload {w!r}; choose mlp and/or model")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.backend == "auto":
        a.backend = "nccl" if a.device == "cuda" else "gloo"
    if a.device == "cuda":
        n = torch.cuda.device_count()
        if max(a.world_sizes) > n:
            ap.error(f"world size {max(a.world_sizes)} needs {max(a.world_sizes)} GPUs, this machine has {n}")
    if a.threads <= 0:
        a.threads = max(1, (os.cpu_count() or 2) // max(a.world_sizes))
    return a


def main(argv=None):
    import torch.multiprocessing as mp
    a = parse_args(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the shared machines
    if "model" in a.workloads:
        from lowbit import evaluate as E
        miss = E.missing_extras(need_model=True, need_text=False)
        if miss:
            print(f"note: skipping the bundled model ({', '.join(miss)} not installed)")
            a.workloads = [w for w in a.workloads if w != "model"]
        else:
            E.load_model(verbose=True)  # converts and caches the GGUF once, before the ranks start
    env = environment(a)
    print("environment:", json.dumps(env))
    results = []
    with tempfile.TemporaryDirectory() as d:
        for W in a.world_sizes:
            path = os.path.join(d, f"world{W}.json")
            print(f"world size {W} ({a.backend} on {a.device})", flush=True)
            t0 = time.time()
            mp.spawn(_worker, args=(W, _free_port(), a, path), nprocs=W, join=True)
            with open(path) as f:
                results += json.load(f)
            print(f"  ({time.time() - t0:.0f} s)", flush=True)
    print()
    print(tables(results))
    with open(a.out, "w") as f:
        json.dump({"meta": {**env, "args": {k: v for k, v in vars(a).items()}}, "results": results}, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
