"""quantize_model: replace a model's nn.Linear layers by QuantLinear, per a QuantConfig."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn import QuantLinear, conv1d_to_linear, is_conv1d, is_linear_like, linear_to_conv1d
from ..qweight import QuantizedWeight
from .blocks import replace_module
from .calibration import calibration_tokens, normalize_calibration
from .config import NEEDS_CALIBRATION, QuantConfig, output_head_name, resolve_format
from .report import LayerReport, QuantReport


class _Sink:
    """Collects finished layers and installs them: the float module is dropped (and its
    weight freed, unless shared) as soon as its QuantLinear is in place."""

    def __init__(self, model: nn.Module, targets: Dict[str, Tuple[nn.Linear, Dict[str, Any]]],
                 report: QuantReport, rules: Dict[str, str]):
        self.model = model
        self.targets = targets
        self.report = report
        self.rules = rules
        self.pending: Dict[str, QuantizedWeight] = {}

    def add(self, name: str, qw: QuantizedWeight, seconds: float, info: Dict[str, Any]) -> None:
        _, fmt = self.targets[name]
        info = dict(info or {})
        info.setdefault("weights", qw.shape[0] * qw.shape[1])
        self.report.layers.append(LayerReport(name, self.report.method, fmt, qw.bits_per_weight,
                                              seconds, self.rules.get(name, ""), info))
        self.pending[name] = qw

    def install(self, names: List[str]) -> None:
        for name in names:
            qw = self.pending.pop(name)
            mod, _ = self.targets.pop(name)
            replace_module(self.model, name, QuantLinear.from_quantized(qw, mod.bias))


def _module_bits(mod: nn.Module, n_weights: int) -> float:
    qw = getattr(mod, "qweight", None)
    if isinstance(qw, QuantizedWeight):
        return qw.bits_per_weight
    bpw = getattr(mod, "bits_per_weight", None)
    if isinstance(bpw, (int, float)):
        return float(bpw)
    if callable(bpw):
        return float(bpw())
    nbytes = sum(t.numel() * t.element_size() for n, t in
                 list(mod.named_parameters()) + list(mod.named_buffers()) if not n.endswith("bias"))
    return 8.0 * nbytes / max(n_weights, 1)


def _keep_in_float_patterns(model: nn.Module) -> List[str]:
    """The module-name fragments a transformers model says must stay in float32
    (``_keep_in_fp32_modules``, e.g. T5's ``wo``, whose forward reads ``wo.weight.dtype``)."""
    out: List[str] = []
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        v = getattr(model, attr, None)
        if isinstance(v, (list, tuple, set)):
            out += [p for p in v if isinstance(p, str) and p]
    return sorted(set(out))


def _layer_format(config: QuantConfig, name: str, keep_float: List[str], head: Optional[str] = None):
    """(format options or None, deciding rule) of module ``name``: the config's rules (the
    output embeddings ``head`` skipped by default), then the model's float-only modules
    (``keep_float`` fragments, each a run of whole components of the dotted name) where no
    rule of the user's named the module."""
    fmt, rule = config.match(name, head)
    if fmt is not None and rule == "default" and any(f".{p}." in f".{name}." for p in keep_float):
        return None, "the model's _keep_in_fp32_modules"
    return fmt, rule


@torch.no_grad()
def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None, calibration=None,
                   progress: bool = True) -> nn.Module:
    """Quantize ``model``'s nn.Linear layers in place per ``config`` and return the model.

    ``calibration``: model inputs for the methods that look at activations (gptq, awq,
    llm.int8, and mixed precision): an iterable of token-id tensors [batch, seq] or of dicts
    of keyword arguments for ``model(**kw)`` (see
    :func:`lowbit.quantize.calibration.normalize_calibration`; ``calibration_from_text``
    builds some from the bundled text). RTN ignores it.

    The layers' formats come from ``config`` (its default and its rules; lm_head stays in
    float unless a rule names it). Afterwards ``model.lowbit_report`` (a QuantReport) lists
    every Linear with its format, bits per weight, time and the algorithm's details;
    ``print(model.lowbit_report)`` shows the table.
    """
    t_start = time.perf_counter()
    if config is None:
        config = QuantConfig()
    elif isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a lowbit.QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(progress, bool):
        raise TypeError("progress must be a bool")

    calib = None
    if config.needs_calibration:
        if calibration is None:
            why = NEEDS_CALIBRATION.get(config.method) if config.method in NEEDS_CALIBRATION else \
                "mixed precision (max_bits_per_weight) measures each layer's sensitivity on it"
            raise ValueError(f"method {config.method!r}"
                             + (" with max_bits_per_weight" if config.max_bits_per_weight is not None else "")
                             + f" needs calibration data ({why}): pass calibration=, e.g. "
                             "lowbit.quantize.calibration_from_text(tokenizer) or a list of "
                             "token-id tensors [batch, seq]")
        calib = normalize_calibration(calibration)

    report = QuantReport(method=config.method, config=config.to_dict())
    report.calibration_tokens = calibration_tokens(calib) if calib else 0
    rules: Dict[str, str] = {}
    targets: Dict[str, Tuple[nn.Linear, Dict[str, Any]]] = {}
    keep_float = _keep_in_float_patterns(model)
    conv1d: Dict[str, nn.Module] = {}  # transformers Conv1D layers, by name, while converted
    head = output_head_name(model)
    rewritten: Dict[str, int] = {}  # nn.Linear subclasses whose own forward is x W^T + b
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and type(mod).forward is not nn.Linear.forward \
                and is_linear_like(mod):
            cls = type(mod).__name__
            rewritten[cls] = rewritten.get(cls, 0) + 1
        if isinstance(mod, nn.Linear) and not is_linear_like(mod):
            # an nn.Linear subclass with its own forward (e.g. a router returning a tuple):
            # QuantLinear computes only x @ W^T + b, so it stays in float
            why = (f"{type(mod).__name__} overrides nn.Linear.forward with something other "
                   "than x @ W^T + b")
            rules[name] = why
            report.layers.append(LayerReport(name, "skip", None, 8.0 * mod.weight.element_size(),
                                             0.0, why, {"weights": mod.weight.numel()}))
            report.notes.append(f"{name}: left in float ({why})")
            continue
        if not is_linear_like(mod):
            continue
        fmt, rule = _layer_format(config, name, keep_float, head)
        rules[name] = rule
        if fmt is None:
            report.layers.append(LayerReport(name, "skip", None, 8.0 * mod.weight.element_size(),
                                             0.0, rule, {"weights": mod.weight.numel()}))
        else:
            if is_conv1d(mod):
                # One layer type for every method: the Conv1D becomes the nn.Linear it
                # computes (one layer's transposed copy at a time); any that ends up not
                # quantized is turned back into a Conv1D below.
                conv1d[name] = mod
                mod = conv1d_to_linear(mod)
                replace_module(model, name, mod)
            targets[name] = (mod, fmt)
    for cls, n in rewritten.items():
        report.notes.append(f"{n} {cls} layer(s): the class overrides nn.Linear.forward, but it "
                            "computes x @ W^T + b (checked on a random input), so they are "
                            "treated as nn.Linear")
    n_experts = _quantize_fused_experts(model, config, keep_float, report, rules)
    if not targets:
        if not n_experts:
            report.notes.append("no Linear layer to quantize (every one skipped by the rules, or none)")
        _note_float_leftovers(model, report)
        report.seconds = time.perf_counter() - t_start
        model.lowbit_report = report
        return model

    was_training = model.training
    model.eval()
    try:
        if config.max_bits_per_weight is not None:
            from .mixed import plan_mixed_precision
            plan = plan_mixed_precision(model, {n: m for n, (m, _) in targets.items()}, calib, config)
            for name, choice in plan.choices.items():
                if name not in targets:
                    raise RuntimeError(f"the mixed-precision plan names {name!r}, which is not a target")
                targets[name] = (targets[name][0],
                                 resolve_format(dict(choice), f"mixed-precision plan for {name!r}"))
                rules[name] = "mixed-precision plan"
            report.plan = plan.table()
            report.notes.extend(plan.notes)

        sink = _Sink(model, targets, report, rules)
        if config.method == "rtn":
            _run_rtn(targets, progress, sink)
        elif config.method == "gptq":
            from .gptq import run_gptq
            run_gptq(model, targets, calib, config, progress, sink)
        elif config.method == "awq":
            from .awq import run_awq
            run_awq(model, targets, calib, config, progress, sink)
        elif config.method == "llm.int8":
            _run_llm_int8(model, targets, calib, config, report, rules)
        else:  # QuantConfig validates the method
            raise AssertionError(config.method)
        if sink.pending:
            raise RuntimeError(f"layers quantized but never installed: {sorted(sink.pending)}")
    finally:
        model.train(was_training)
        for name, orig in conv1d.items():
            mod = model.get_submodule(name)
            if isinstance(mod, nn.Linear):
                replace_module(model, name, linear_to_conv1d(mod, orig))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    _note_float_leftovers(model, report)
    report.seconds = time.perf_counter() - t_start
    model.lowbit_report = report
    return model


def _note_float_leftovers(model: nn.Module, report: QuantReport, share: float = 0.05) -> None:
    """Add a note when float weight matrices that are not linear layers (an expert layout
    lowbit does not recognise, e.g. DBRX's or JetMoE's, a custom projection parameter) hold at
    least ``share`` of the model's matrix weights: they stay in float, and the size shows it."""
    from ..moe import QuantExperts
    seen, left, total = set(), {}, 0
    for name, mod in model.named_modules():
        linear = is_linear_like(mod) or isinstance(mod, (QuantLinear, QuantExperts, nn.Embedding))
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or p.dim() < 2 or not p.is_floating_point():
                continue
            seen.add(id(p))
            total += p.numel()
            if not linear:
                left[f"{name}.{pname}" if name else pname] = p.numel()
    total += sum(int(r.info.get("weights", 0)) for r in report.layers if r.method != "skip")
    n = sum(left.values())
    if total and n >= share * total:
        names = sorted(left, key=left.get, reverse=True)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        report.notes.append(
            f"{n:,} weights ({100.0 * n / total:.0f}% of the model's matrices) are parameters "
            f"of other modules than linear layers and stay in float: {shown} (lowbit quantizes "
            "nn.Linear, transformers Conv1D and the fused-experts layouts it recognises)")


def _quantize_fused_experts(model: nn.Module, config: QuantConfig, keep_float: List[str],
                            report: QuantReport, rules: Dict[str, str]) -> int:
    """Replace each transformers fused-experts module (3-D expert weights, not nn.Linear; see
    lowbit.moe) by a QuantExperts, round-to-nearest per expert, before the method runs (so the
    calibration passes see them quantized and their float weights are freed first). Returns
    how many were replaced."""
    from ..moe import QuantExperts, check_layout, is_fused_experts
    from .config import format_kwargs
    found = [(n, m) for n, m in model.named_modules() if n and is_fused_experts(m)]
    done = 0
    for name, mod in found:
        n_w = sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() == 3)
        fmt, rule = _layer_format(config, name, keep_float)
        rules[name] = rule
        ok, why = (True, "") if fmt is None else check_layout(mod)
        if fmt is None or not ok:
            info = {"weights": n_w, "experts": "fused"}
            if not ok:
                info["note"] = f"left in float: {why}"
                report.notes.append(f"{name}: fused experts left in float ({why})")
            report.layers.append(LayerReport(name, "skip", None, 8.0 * next(mod.parameters()).element_size(),
                                             0.0, rule, info))
            continue
        t0 = time.perf_counter()
        f, kw = format_kwargs(fmt)
        qe = QuantExperts.from_experts(mod, f, **kw)
        replace_module(model, name, qe)
        info = {"weights": qe.n_weights, "experts": qe.num_experts}
        if config.method != "rtn" or config.max_bits_per_weight is not None:
            info["note"] = "fused experts: round-to-nearest, outside the method"
        report.layers.append(LayerReport(name, "rtn", fmt, qe.bits_per_weight,
                                         time.perf_counter() - t0, rule, info))
        done += 1
    if done and (config.method != "rtn" or config.max_bits_per_weight is not None):
        report.notes.append(f"{done} fused MoE expert module(s) quantized by round-to-nearest in "
                            f"the default format ({config.method} and mixed precision apply to "
                            "the nn.Linear layers)")
    return done


def _run_rtn(targets, progress: bool, sink: _Sink) -> None:
    from ..ops import quantize_weight
    from .config import format_kwargs
    names = list(targets)
    it = names
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(names, desc="rtn", unit="layer", leave=False)
    for name in it:
        mod, fmt = targets[name]
        t0 = time.perf_counter()
        f, kw = format_kwargs(fmt)
        qw = quantize_weight(mod.weight.detach(), f, **kw)
        sink.add(name, qw, time.perf_counter() - t0, {})
        sink.install([name])


def _run_llm_int8(model, targets, calib, config, report: QuantReport, rules) -> None:
    from .outliers import quantize_with_outliers
    t0 = time.perf_counter()
    modules = {n: m for n, (m, _) in targets.items()}
    unseen: List[str] = []
    replacements = quantize_with_outliers(model, modules, calib, config, unseen)
    seconds = (time.perf_counter() - t0) / max(len(replacements), 1)
    for name, new in replacements.items():
        if name not in targets:
            raise RuntimeError(f"quantize_with_outliers returned {name!r}, which is not a target")
        mod, fmt = targets.pop(name)
        n_w = mod.weight.numel()
        replace_module(model, name, new)
        info = {"weights": n_w}
        n_out = getattr(new, "n_outliers", None)
        if isinstance(n_out, int):
            info["outliers"] = n_out
        if name in unseen:
            info["note"] = "never called on calibration data: no outlier columns"
        report.layers.append(LayerReport(name, "llm.int8", fmt, _module_bits(new, n_w), seconds,
                                         rules.get(name, ""), info))
    for name in list(targets):  # the outlier pass chose to leave these alone
        mod, _ = targets.pop(name)
        report.layers.append(LayerReport(name, "skip", None, 8.0 * mod.weight.element_size(), 0.0,
                                         "llm.int8 left it in float", {"weights": mod.weight.numel()}))
