"""Perplexity of the bundled SmolLM2-135M quantized by lowbit.quantize_model (rtn / gptq / awq).

Evaluation: the first --tokens tokens of the bundled Wikipedia text, windows of --ctx
(lowbit.evaluate.perplexity). Calibration: --samples sequences of --seq-len tokens taken from
token --calib-offset on (a disjoint slice of the same text). Not a test: prints a table and
writes JSON.

    .venv/bin/python bench/quantize_eval.py --configs fp32,rtn:int4:g64,gptq:int4:g64,awq:int4:g64

A config is ``method:format[:gN][:sym][:dq][:key=value ...]`` (method rtn/gptq/awq; keys are
QuantConfig algorithm options, e.g. ``gptq:int4:g64:act_order=False``), or ``fp32``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import torch


def parse(spec: str):
    if spec == "fp32":
        return None
    parts = spec.split(":")
    method, fmt = parts[0], parts[1]
    kw = {"method": method, "format": fmt}
    for p in parts[2:]:
        if p.startswith("g") and p[1:].lstrip("-").isdigit():
            kw["group_size"] = int(p[1:])
        elif p == "sym":
            kw["symmetric"] = True
        elif p == "dq":
            kw["double_quant"] = True
        elif "=" in p:
            k, v = p.split("=", 1)
            try:
                kw[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                kw[k] = v
        else:
            raise SystemExit(f"bad config part {p!r} in {spec!r}")
    return kw


def to_float(model):
    """QuantLinear -> nn.Linear holding the exactly dequantized weight (same numbers through
    torch's matmul; --fake)."""
    from torch import nn

    from lowbit import QuantLinear, reference
    from lowbit.quantize.blocks import replace_module
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(reference.dequantize(mod.qweight))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            replace_module(model, name, lin)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="fp32,rtn:int4:g64,gptq:int4:g64,awq:int4:g64")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default: lowbit's)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--calib-offset", type=int, default=None)
    ap.add_argument("--fake", action="store_true", help="evaluate with dequantized float weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import lowbit
    import lowbit.quantize.awq  # noqa: F401  (import every algorithm now, not mid-run)
    import lowbit.quantize.gptq  # noqa: F401
    from lowbit import evaluate as E
    from lowbit.quantize import calibration as C
    configs = [(s, parse(s)) for s in args.configs.split(",") if s]
    loader, tok, desc = E.make_loader(verbose=False)
    ids, _ = E.load_tokens(tok, args.tokens)
    ckw = {k: v for k, v in (("n_samples", args.samples), ("seq_len", args.seq_len),
                             ("offset", args.calib_offset)) if v is not None}
    calib = C.calibration_from_text(tok, **ckw)
    off = ckw.get("offset", C.DEFAULT_TEXT_OFFSET)
    assert off >= ids.numel(), "calibration overlaps the evaluation tokens"
    n_cal = C.calibration_tokens(calib)
    print(f"eval: {ids.numel()} tokens ctx {args.ctx}; calibration: {n_cal} tokens from token {off}",
          flush=True)
    rows = []
    for spec, kw in configs:
        model = loader()
        t0 = time.perf_counter()
        c0 = time.process_time()
        bits = 32.0
        if kw is not None:
            cfg = lowbit.QuantConfig(**kw)
            lowbit.quantize_model(model, cfg, calibration=calib, progress=True)
            bits = model.lowbit_report.bits_per_weight()
        qt, qc = time.perf_counter() - t0, time.process_time() - c0
        if args.fake:
            to_float(model)
        ppl = E.perplexity(model, ids, args.ctx, progress=True, desc=spec)["perplexity"]
        load = os.getloadavg()[0]
        row = {"config": spec, "bits_per_weight": bits, "perplexity": ppl, "quant_s": qt,
               "quant_cpu_s": qc, "load_avg": load}
        rows.append(row)
        print(f"{spec:40s} bits/w {bits:6.3f}  ppl {ppl:8.3f}  quant {qt:7.1f} s wall "
              f"({qc:7.1f} s cpu, load {load:.1f})", flush=True)
        del model
    base = next((r["perplexity"] for r in rows if r["config"] == "fp32"), None)
    from tabulate import tabulate
    table = [[r["config"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}",
              "" if base is None else f"{100 * (r['perplexity'] / base - 1):+.1f}%",
              f"{r['quant_s']:.0f}"] for r in rows]
    print(tabulate(table, headers=["config", "bits/w", "perplexity", "vs fp32", "quant s"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"model": desc, "tokens": int(ids.numel()), "ctx": args.ctx,
                                "calibration_tokens": n_cal, "calibration_offset": off,
                                "fake": args.fake, "threads": args.threads}, "results": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
