"""Mixed precision and LLM.int8 outliers on the bundled SmolLM2-135M: perplexity tables.

Not a test: prints tables and writes JSON. Evaluation: the first --tokens tokens of the bundled
Wikipedia text in windows of --ctx (lowbit.evaluate.perplexity). Calibration: --samples
sequences of 512 tokens from token 262144 on (lowbit.quantize.calibration_from_text, a slice
disjoint from the evaluation's). The lm_head stays in float.

    .venv/bin/python bench/mixed_precision.py mixed --budgets 4.5 --json mixed.json
    .venv/bin/python bench/mixed_precision.py validate --json validate.json
    .venv/bin/python bench/mixed_precision.py outliers --json outliers.json

* ``mixed``: every uniform 4-bit RTN setting, int8 and fp32, then the mixed-precision plan at
  each budget (RTN per layer), with the plan's predicted NLL increase beside the measured one.
  Layers are fake-quantized (weights replaced by lowbit's exact dequantization, float matmul:
  the numbers lowbit's exact CPU path computes, up to float32 summation order) unless --real,
  which installs QuantLinear layers through lowbit.quantize_model.
* ``validate``: for a sample of layers and candidates, the Fisher and Hessian proxies against
  the measured increase of the calibration loss with only that layer quantized.
* ``outliers``: int8 vs LLM.int8 (int8 + float outlier columns) at several thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import lowbit  # noqa: E402
from lowbit import evaluate as E  # noqa: E402
from lowbit.quantize import calibration_from_text  # noqa: E402
from lowbit.quantize.config import describe_format, format_kwargs, resolve_format  # noqa: E402
from lowbit.quantize import mixed as M  # noqa: E402

# Every uniform 4-bit RTN setting the plan is compared with (int4 asym g32 is printed for the
# record only: it reproduces this checkpoint's Q4_1 weights exactly, see DESIGN.md).
UNIFORM = [
    {"format": "int4", "group_size": 128, "symmetric": False},
    {"format": "int4", "group_size": 64, "symmetric": False},
    {"format": "int4", "group_size": 128, "symmetric": True},
    {"format": "int4", "group_size": 64, "symmetric": True},
    {"format": "int4", "group_size": 32, "symmetric": True},
    {"format": "nf4", "group_size": 64},
    {"format": "nf4", "group_size": 64, "double_quant": True},
    {"format": "nf4", "group_size": 32},
]
TRAP = {"format": "int4", "group_size": 32, "symmetric": False}


def targets_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


@torch.no_grad()
def fake_apply(model, choices):
    """Replace each named Linear's weight by its exact dequantization; returns stored bits."""
    mods = dict(model.named_modules())
    bits = 0
    for name, opts in choices.items():
        lin = mods[name]
        f, kw = format_kwargs(resolve_format(dict(opts)))
        qw = lowbit.quantize_weight(lin.weight.detach(), f, **kw)
        lin.weight.copy_(lowbit.dequantize(qw, lin.weight.dtype))
        bits += 8 * qw.nbytes
    return bits


def ppl(model, ids, ctx):
    t0 = time.perf_counter()
    r = E.perplexity(model, ids, ctx, progress=False)
    return r["perplexity"], r["nll"], time.perf_counter() - t0


def setup(args):
    torch.set_num_threads(args.threads)
    loader, tok, _ = E.make_loader(verbose=False)
    ids, _ = E.load_tokens(tok, args.tokens)
    calib = calibration_from_text(tok, n_samples=args.samples, seq_len=512, batch_size=8)
    return loader, tok, ids, calib


def save(args, doc):
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.json)


def cmd_mixed(args):
    from tabulate import tabulate
    loader, tok, ids, calib = setup(args)
    doc = {"tokens": int(ids.numel()), "ctx": args.ctx, "calibration_samples": args.samples,
           "threads": args.threads, "real": args.real, "rows": [], "plans": {}}
    rows = doc["rows"]

    def add(label, desc, bits, p, nll, secs, pred=None, extra=None):
        rows.append({"config": label, "format": desc, "bits_per_weight": bits, "perplexity": p,
                     "nll": nll, "seconds": secs, "predicted_dnll": pred, **(extra or {})})
        save(args, doc)
        print(f"  {label:28s} {desc:22s} {bits:7.3f} bits/w  ppl {p:8.3f}  ({secs:.0f} s)", flush=True)

    model = loader()
    n_w = sum(m.weight.numel() for m in targets_of(model).values())
    p, nll0, s = ppl(model, ids, args.ctx)
    add("fp32", "fp32", 32.0, p, nll0, s)
    del model
    uniform = [] if args.skip_uniform else UNIFORM + [{"format": "int8"}] + ([TRAP] if args.trap else [])
    if args.uniform:
        uniform = []
        for text in args.uniform:
            c = E.parse_config(text)
            uniform.append({"format": c.fmt, **c.opts})
    for opts in uniform:
        opts = resolve_format(opts)
        model = loader()
        bits = fake_apply(model, {n: opts for n in targets_of(model)})
        p, nll, s = ppl(model, ids, args.ctx)
        label = "uniform" + (" (trap: exact Q4_1 grid)" if opts == resolve_format(TRAP) else "")
        add(label, describe_format(opts), bits / n_w, p, nll, s)
        del model

    # One sensitivity table per method serves every budget (the plan is the same as
    # plan_mixed_precision's: same candidates, same measurement, same solver).
    for method in args.sensitivity if args.budgets else []:
        model = loader()
        cfg = lowbit.QuantConfig(format="int4", group_size=64, max_bits_per_weight=args.budgets[0])
        t0 = time.perf_counter()
        table = M.measure_sensitivity(model, targets_of(model), calib, M.candidate_ladder(cfg), method,
                                      max_tokens=args.plan_tokens, progress=args.progress)
        t_plan = time.perf_counter() - t0
        del model
        for budget in args.budgets:
            plan = M.plan_from_table(table, budget)
            print(plan.table(), flush=True)
            key = f"{budget}:{method}"
            doc["plans"][key] = plan.to_dict()
            # The plan's own prediction for every uniform setting, beside the measurements.
            doc["plans"][key]["predicted_uniform"] = {describe_format(c): plan.uniform(j)[1]
                                                      for j, c in enumerate(plan.candidates)}
            model = loader()
            if args.real:
                cfg_real = lowbit.QuantConfig(format="int4", group_size=64, max_bits_per_weight=budget)
                lowbit.quantize_model(model, cfg_real, calib, progress=False)
                bits = model.lowbit_report.bits_per_weight()
            else:
                bits = fake_apply(model, plan.choices) / n_w
            p, nll, s = ppl(model, ids, args.ctx)
            add(f"mixed {budget:g} ({method})", "per-layer plan", bits, p, nll, s,
                pred=plan.predicted_increase if method != "hessian" else None,
                extra={"plan_seconds": t_plan})
            del model

    print()
    table = []
    plan_pred = next(iter(doc["plans"].values()), {}).get("predicted_uniform", {}) if doc["plans"] else {}
    for r in rows:
        pred = r["predicted_dnll"] if r["predicted_dnll"] is not None else plan_pred.get(r["format"])
        table.append([r["config"], r["format"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}",
                      f"{r['nll'] - nll0:+.4f}", "" if pred is None else f"{pred:+.4f}"])
    print(tabulate(table, headers=["config", "format", "bits/w", "perplexity", "measured dNLL",
                                   "predicted dNLL (fisher, additive)"], disable_numparse=True))


def cmd_validate(args):
    """Each proxy against the loss change measured with only one layer quantized, split
    into its curvature and linear parts by also measuring the mirrored error:
    L(W + dW) and L(W - dW) give curvature 1/2 (L+ + L-) - L0 (= 1/2 dW' H dW + O(dW^4), what
    the proxies predict) and linear part 1/2 (L+ - L-) (= g' dW: the calibration set's own
    gradient, zero in expectation, which no proxy should chase)."""
    from scipy.stats import pearsonr, spearmanr
    from tabulate import tabulate
    loader, tok, ids, calib = setup(args)
    model = loader()
    targets = targets_of(model)
    names = [n for n in targets if any(f"layers.{i}." in n for i in args.layers)]
    sub = {n: targets[n] for n in names}
    cands = M.candidate_ladder(None, args.candidates)
    doc = {"layers": names, "candidates": [describe_format(c) for c in cands],
           "validation_tokens": args.val_tokens, "threads": args.threads}
    proxies = ("fisher", "empirical-fisher", "hessian")
    for method in proxies:
        t0 = time.perf_counter()
        tab = M.measure_sensitivity(model, sub, calib, cands, method, max_tokens=args.val_tokens,
                                    progress=args.progress)
        doc[method] = tab.values
        doc[method + "_seconds"] = time.perf_counter() - t0
        save(args, doc)
        print(f"{method}: {time.perf_counter() - t0:.0f} s", flush=True)
    batches = M._batches(calib, args.val_tokens)
    t0 = time.perf_counter()
    base = M.calibration_loss(model, batches)
    plus, minus = [], []
    for n in names:
        w = sub[n].weight
        orig = w.detach().clone()
        rp, rm = [], []
        for c in cands:
            f, kw = format_kwargs(c)
            deq = lowbit.dequantize(lowbit.quantize_weight(orig, f, **kw))
            with torch.no_grad():
                w.copy_(deq)
                rp.append(M.calibration_loss(model, batches) - base)
                w.copy_(2 * orig - deq)  # the mirrored error
                rm.append(M.calibration_loss(model, batches) - base)
                w.copy_(orig)
        plus.append(rp)
        minus.append(rm)
        doc.update(base_loss=base, plus=plus, minus=minus, measure_seconds=time.perf_counter() - t0)
        save(args, doc)
        print(f"  {n}: {[f'{a:+.5f}/{b:+.5f}' for a, b in zip(rp, rm)]}", flush=True)
    curv = [[(a + b) / 2 for a, b in zip(rp, rm)] for rp, rm in zip(plus, minus)]
    lin = [[(a - b) / 2 for a, b in zip(rp, rm)] for rp, rm in zip(plus, minus)]
    flat = lambda t: [x for row in t for x in row]  # noqa: E731
    rows = []
    for i, n in enumerate(names):
        for j, c in enumerate(cands):
            rows.append([n, describe_format(c), f"{plus[i][j]:+.5f}", f"{curv[i][j]:+.5f}",
                         f"{lin[i][j]:+.5f}"] + [f"{doc[m][i][j]:.4g}" for m in proxies])
    print(tabulate(rows, headers=["layer", "format", "measured dNLL", "curvature part", "linear part"]
                   + list(proxies), disable_numparse=True))
    stats = []
    for m in proxies:
        row = [m]
        for target_name, target in (("curvature", curv), ("measured", plus)):
            rs = spearmanr(flat(doc[m]), flat(target)).statistic
            rp = pearsonr(flat(doc[m]), flat(target)).statistic
            doc[f"{m}_vs_{target_name}"] = {"spearman": rs, "pearson": rp}
            row += [f"{rs:.3f}", f"{rp:.3f}"]
        if m != "hessian":
            pos = sorted(a / b for a, b in zip(flat(doc[m]), flat(curv)) if b > 0)
            ratio = pos[len(pos) // 2] if pos else float("nan")
            doc[f"{m}_median_ratio_to_curvature"] = ratio
            row.append(f"{ratio:.2f}")
        else:
            row.append("")
        stats.append(row)
    doc["curvature"], doc["linear"] = curv, lin
    save(args, doc)
    print(tabulate(stats, headers=["proxy", "Spearman vs curvature", "Pearson", "Spearman vs measured",
                                   "Pearson", "median pred/curvature"], disable_numparse=True))


def cmd_outliers(args):
    """int8 vs LLM.int8. One calibration pass gives every layer's per-column max |x|
    (lowbit.quantize.outliers.input_absmax); for each threshold the layers are then built
    exactly as quantize_with_outliers builds them (QuantLinear.from_linear with the columns
    above the threshold), so the sweep needs one pass, not one per threshold."""
    from tabulate import tabulate
    from lowbit.quantize.outliers import input_absmax, outlier_columns
    loader, tok, ids, calib = setup(args)
    rows = []
    doc = {"tokens": int(ids.numel()), "calibration_samples": args.samples, "rows": rows}
    model = loader()
    targets = targets_of(model)
    t0 = time.perf_counter()
    amax = input_absmax(model, targets, calib)
    doc["absmax_seconds"] = time.perf_counter() - t0
    n_w = sum(m.weight.numel() for m in targets.values())
    # The packed int8 part keeps all K columns (the outlier ones as zeros); each outlier column
    # adds its float32 weights [N] and an int64 index.
    int8_bits = sum(8 * lowbit.quantize_weight(torch.zeros(m.out_features, m.in_features), "int8").nbytes
                    for m in targets.values())
    sweep = []
    for t in sorted(set(args.sweep) | set(args.thresholds)):
        cols = {n: outlier_columns(a, t) for n, a in amax.items()}
        n_cols = sum(c.numel() for c in cols.values())
        extra = sum(c.numel() * (32 * targets[n].out_features + 64) for n, c in cols.items())
        sweep.append([f"{t:g}", n_cols, sum(1 for c in cols.values() if c.numel()),
                      f"{n_cols / sum(m.in_features for m in targets.values()):.2%}",
                      f"{(int8_bits + extra) / n_w:.3f}"])
    doc["sweep"] = sweep
    print(tabulate(sweep, headers=["threshold", "outlier columns", "layers", "of all input columns",
                                   "bits/w"], disable_numparse=True), flush=True)
    save(args, doc)
    del model
    configs = ([] if args.skip_base else [None, "int8"]) + list(args.thresholds)
    for t in configs:
        model = loader()
        if t is None:
            label = "fp32"
        elif t == "int8":
            label = "int8 per-row (rtn)"
        else:
            label = f"llm.int8 threshold {t:g}"
        mods = dict(model.named_modules())
        for name in targets:
            lin = mods[name]
            kw = {} if t in (None, "int8") else {"outlier_cols": outlier_columns(amax[name], t)}
            if t is not None:
                parent, _, child = name.rpartition(".")
                setattr(mods[parent], child, lowbit.QuantLinear.from_linear(lin, "int8", **kw))
        qls = [m for m in model.modules() if isinstance(m, lowbit.QuantLinear)]
        bits = (sum(m.bits_per_weight * m.in_features * m.out_features for m in qls) / n_w) if qls else 32.0
        n_cols = sum(m.n_outliers for m in qls)
        n_layers = sum(1 for m in qls if m.n_outliers)
        p, nll, s = ppl(model, ids, args.ctx)
        rows.append({"config": label, "perplexity": p, "bits_per_weight": bits,
                     "outlier_columns": n_cols, "layers_with_outliers": n_layers, "seconds": s})
        save(args, doc)
        print(f"  {label}: ppl {p:.3f}, {bits:.3f} bits/w, {n_cols} outlier columns in {n_layers} layers",
              flush=True)
        del model
    print(tabulate([[r["config"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}",
                     r["outlier_columns"], r["layers_with_outliers"]] for r in rows],
                   headers=["config", "bits/w", "perplexity", "outlier cols", "layers"],
                   disable_numparse=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["mixed", "validate", "outliers"])
    ap.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (default 16384)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    ap.add_argument("--progress", action="store_true")
    # mixed
    ap.add_argument("--budgets", type=float, nargs="*", default=[4.5])
    ap.add_argument("--sensitivity", nargs="+", default=["fisher"], choices=list(M.SENSITIVITY_METHODS))
    ap.add_argument("--plan-tokens", type=int, default=M.MAX_SENSITIVITY_TOKENS)
    ap.add_argument("--skip-uniform", action="store_true")
    ap.add_argument("--uniform", nargs="*", default=None,
                    help="only these uniform settings (lowbit eval syntax, e.g. int4:g32:sym nf4:g64:dq)")
    ap.add_argument("--trap", action="store_true", help="also print int4 asym g32 (exact on this model)")
    ap.add_argument("--real", action="store_true", help="QuantLinear via quantize_model, not fake quantization")
    # validate
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--candidates", nargs="+", default=None,
                    help="format names for validate (default: int4 sym g64)")
    ap.add_argument("--val-tokens", type=int, default=2048)
    # outliers
    ap.add_argument("--thresholds", type=float, nargs="*", default=[6.0, 20.0])
    ap.add_argument("--sweep", type=float, nargs="*", default=[4, 6, 8, 10, 15, 20, 30, 50, 100],
                    help="thresholds whose outlier counts are tabulated (no perplexity)")
    ap.add_argument("--skip-base", action="store_true", help="outliers: skip fp32 and plain int8")
    args = ap.parse_args(argv)
    if args.command == "validate" and args.candidates is None:
        args.candidates = [{"format": "int4", "group_size": 64, "symmetric": True}]
    {"mixed": cmd_mixed, "validate": cmd_validate, "outliers": cmd_outliers}[args.command](args)


if __name__ == "__main__":
    main()
