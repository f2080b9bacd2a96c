"""Automatic mixed precision: one format per layer, chosen to minimise the model's loss within a
bits-per-weight budget (``QuantConfig(max_bits_per_weight=4.5)``).

    plan = plan_mixed_precision(model, targets, calib, config)
    plan.choices["model.layers.0.mlp.down_proj"]   # {"format": "int8", "group_size": -1, ...}
    print(plan.table())

Three steps:

1. **Candidates** (:data:`DEFAULT_LADDER`, the config's own format first). The cost of a
   candidate on a layer is exact: ``8 * QuantizedWeight.nbytes`` of that layer's weight really
   quantized in it (codes, scales, zeros, double-quant constants), so the budget counts what
   ``lowbit.save`` writes. ``int4 asym g32`` is left out of the default ladder: the bundled
   SmolLM2 checkpoint is dequantized GGUF Q4_1 (asymmetric int4, groups of 32), so that
   setting reproduces its weights exactly and would win every comparison for a reason that
   says nothing about other models (DESIGN.md). It is used only when it is the config's own
   format, or when passed in ``candidates=``.
2. **Sensitivity** of every (layer, candidate): the increase of the calibration loss (mean
   next-token NLL) that quantizing that one layer causes, predicted by
   ``sensitivity="fisher"`` (the default)::

       dL ~= 1/2 * sum_n F_n * (dW H dW^T)_nn,   H = E[x x^T],   F_n = E[g_n^2]

   the second-order term of the loss in the layer's outputs with the Fisher as curvature
   (taken diagonal over output channels, and the squared output gradient g_n^2 independent
   of the output error over positions). ``dW`` is the layer's real quantization error in the
   candidate, ``H`` its input second moments and ``F_n`` the mean (per predicted token)
   squared gradient of each sequence's summed NLL w.r.t. output channel n, both collected in
   one forward+backward pass over the calibration data (hooks; backward only to the layer
   outputs, no parameter gradients). "fisher" draws the labels of that backward pass from
   the model's own predictions (fixed seed): the true Fisher, which for softmax
   cross-entropy equals the Gauss-Newton curvature in expectation, and whose cross terms
   between positions vanish in expectation. ``"empirical-fisher"`` uses the text's labels
   instead. The first-order term is left out on purpose: it is the calibration set's own
   gradient, zero in expectation, and chasing it would fit the plan to the calibration text.
   Other measures: ``"hessian"`` (output MSE ``tr(dW H dW^T)``, forward only, blind to how
   much each layer's output matters to the loss) and ``"loss"`` (the loss change measured
   with only that layer quantized: exact for the calibration data but costly, one forward
   pass per layer and candidate, and on small calibration sets dominated by the first-order
   term). ``bench/mixed_precision.py validate`` compares the proxies with the curvature part
   of the measured change (from the error and its mirror image, see there).
3. **Choice**: a multiple-choice knapsack, min sum of sensitivities subject to
   sum of bits <= budget * weights, solved by dynamic programming over the budget in at most
   :data:`DP_RESOLUTION` steps (costs rounded *up* to a step, so the result always fits),
   then an exact fill of the leftover bits with the best single-layer upgrades.
   Deterministic: ties go to the earlier layer and candidate.

The plan measures round-to-nearest errors; quantize_model then quantizes each layer in its
chosen format with the config's method (RTN, GPTQ or AWQ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import ops
from .blocks import call_model
from .config import describe_format, format_kwargs, resolve_format

# The default candidate formats, cheapest 4-bit to int8 (the config's format goes first).
# int4 asymmetric group 32 is absent on purpose: see the module docstring.
DEFAULT_LADDER: Tuple[Dict[str, Any], ...] = (
    {"format": "nf4", "group_size": 128, "double_quant": True},
    {"format": "nf4", "group_size": 64, "double_quant": True},
    {"format": "int4", "group_size": 128, "symmetric": True},
    {"format": "int4", "group_size": 128, "symmetric": False},
    {"format": "nf4", "group_size": 32, "double_quant": True},
    {"format": "int4", "group_size": 64, "symmetric": True},
    {"format": "nf4", "group_size": 64},
    {"format": "int4", "group_size": 64, "symmetric": False},
    {"format": "int4", "group_size": 32, "symmetric": True},
    {"format": "nf4", "group_size": 32},
    {"format": "int8"},
)
SENSITIVITY_METHODS = ("fisher", "empirical-fisher", "hessian", "loss")
# Seed of the labels "fisher" samples from the model (the plan is deterministic).
FISHER_SEED = 0
# Calibration tokens the sensitivity pass uses at most (the first ones): the per-layer
# statistics are stable well before this, and it bounds the pass's time.
MAX_SENSITIVITY_TOKENS = 16384
# Input second-moment matrices held at once (bytes); more targets than fit are measured in
# several passes over the calibration data.
MAX_STATS_BYTES = 2 << 30
# Steps the knapsack divides the spare budget into (DP table: layers x steps int16).
DP_RESOLUTION = 1 << 16


# ---- candidates ---------------------------------------------------------------------------
def candidate_ladder(config=None, candidates: Optional[Sequence[Any]] = None) -> List[Dict[str, Any]]:
    """The resolved candidate formats: ``candidates`` (format names or option dicts), else the
    config's format followed by :data:`DEFAULT_LADDER`; duplicates dropped, order kept."""
    items: List[Any] = []
    if candidates is None:
        if config is not None:
            items.append({"format": config.format, "group_size": config.group_size,
                          "symmetric": config.symmetric, "double_quant": config.double_quant})
        items.extend(DEFAULT_LADDER)
    else:
        if isinstance(candidates, (str, Mapping)) or not isinstance(candidates, Sequence):
            raise TypeError("candidates must be a list of format names or format-option dicts")
        items = list(candidates)
        if not items:
            raise ValueError("candidates is empty")
    out: List[Dict[str, Any]] = []
    for i, c in enumerate(items):
        if isinstance(c, str):
            c = {"format": c}
        if not isinstance(c, Mapping):
            raise TypeError(f"candidates[{i}] must be a format name or a dict of format options, "
                            f"got {type(c).__name__}")
        r = resolve_format(dict(c), f"mixed-precision candidate {i}")
        if r not in out:
            out.append(r)
    return out


def _label(opts: Dict[str, Any]) -> str:
    return describe_format(opts)


# ---- calibration --------------------------------------------------------------------------
def _batches(calib, max_tokens: Optional[int]) -> List[Dict[str, Any]]:
    """Calibration dicts split into single sequences (each one a sample of the Fisher), the
    first ``max_tokens`` tokens' worth."""
    from .calibration import normalize_calibration
    out: List[Dict[str, Any]] = []
    tokens = 0
    for kw in normalize_calibration(calib):
        for part in _split_rows(kw):
            ids = part.get("input_ids")
            n = int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
            if max_tokens is not None and out and tokens + n > max_tokens:
                return out
            out.append(part)
            tokens += n
    return out


def _split_rows(kw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One dict per batch row when every tensor argument shares the leading batch size."""
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    sizes = {v.shape[0] for v in tensors.values() if v.dim() > 0}
    if len(sizes) != 1 or any(v.dim() == 0 for v in tensors.values()):
        return [kw]
    (b,) = sizes
    if b == 1:
        return [kw]
    return [{k: (v[i:i + 1] if k in tensors else v) for k, v in kw.items()} for i in range(b)]


def _to_device(kw: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _model_device(model: nn.Module):
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def lm_nll(model: nn.Module, kw: Dict[str, Any],
           sample: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, int]:
    """(summed next-token NLL, number of predicted tokens) of one calibration batch.

    Labels are ``kw["labels"]`` when given, else ``input_ids``; position t predicts token t+1;
    label -100 and positions where ``attention_mask`` is 0 are not counted. With ``sample``
    (a generator), the counted positions' labels are instead drawn from the model's own
    predictive distribution (for the true Fisher)."""
    out = call_model(model, kw)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError("mixed precision measures a language-model loss: the model must return "
                         "logits [batch, seq, vocab] (a transformers causal LM)")
    labels = kw.get("labels", kw.get("input_ids"))
    if not isinstance(labels, torch.Tensor):
        raise ValueError("mixed precision measures the next-token loss: calibration batches need "
                         "input_ids (or labels)")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            "mixed precision measures a causal LM's next-token loss: the logits cover "
            f"{tuple(logits.shape[:2])} [batch, seq] positions but the labels "
            f"({'labels' if 'labels' in kw else 'input_ids'}) are {tuple(labels.shape)} "
            "(an encoder-decoder or other non-causal model is not supported; set formats "
            "with rules instead)")
    labels = labels[:, 1:]
    mask = kw.get("attention_mask")
    if "labels" not in kw and isinstance(mask, torch.Tensor):
        labels = labels.masked_fill(mask[:, 1:] == 0, -100)
    logits = logits[:, :-1].float()
    if sample is not None:
        probs = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=sample).reshape(labels.shape)
        labels = torch.where(labels == -100, labels, drawn.to(labels.device))
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: List[Dict[str, Any]]) -> float:
    """Mean next-token NLL over the calibration batches."""
    device = _model_device(model)
    tot, cnt = 0.0, 0
    for kw in batches:
        nll, n = lm_nll(model, _to_device(kw, device))
        tot += float(nll)
        cnt += n
    if cnt == 0:
        raise ValueError("the calibration data has no token to predict (sequences of length 1?)")
    return tot / cnt


# ---- statistics ---------------------------------------------------------------------------
class _LayerStats:
    __slots__ = ("H", "F", "rows")

    def __init__(self, K: int, N: int, fisher: bool, device):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.F = torch.zeros(N, dtype=torch.float64, device=device) if fisher else None
        self.rows = 0


def _collect_stats(model: nn.Module, mods: Dict[str, nn.Linear], batches, fisher: Optional[str],
                   progress: bool, desc: str) -> Dict[str, _LayerStats]:
    """One pass over the batches: H = E[x x^T] per layer and, with ``fisher`` ("sampled" or
    "data" labels), F_n = E[g_n^2] (g: gradient of each sequence's summed NLL w.r.t. the layer
    output, E per predicted token). A layer of ``model`` that the pass never calls (model code
    that reads its weight, as Mamba's ``dt_proj.weight @ x``, or an expert no token reached)
    keeps ``rows == 0``; one that is not a module of ``model`` raises."""
    device = _model_device(model)
    stats = {n: _LayerStats(m.in_features, m.out_features, fisher, device) for n, m in mods.items()}
    last: Dict[str, Any] = {"x": None, "p": None, "rows": 0}
    outs: List[Tuple[str, torch.Tensor]] = []

    def make_hook(name: str):
        st = stats[name]

        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("input")
            if x is not last["x"]:  # q/k/v (gate/up) share one input: one product for all
                with torch.no_grad():
                    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                    last["x"], last["p"], last["rows"] = x, x2.T @ x2, x2.shape[0]
            st.H += last["p"]
            st.rows += last["rows"]
            if fisher:
                if not out.requires_grad:
                    # Nothing before this layer needs a gradient: start the graph here (a
                    # non-leaf copy, so later in-place ops on the output stay legal).
                    out = out.detach().requires_grad_(True).clone()
                outs.append((name, out))
                return out
            return None
        return hook

    handles = [m.register_forward_hook(make_hook(n), with_kwargs=True) for n, m in mods.items()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    tokens = 0
    gen = torch.Generator(device=device).manual_seed(FISHER_SEED) if fisher == "sampled" else None
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc=desc, unit="seq", leave=False)
    try:
        for p, _ in params:
            p.requires_grad_(False)
        for kw in it:
            kw = {k: (v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v)
                  for k, v in _to_device(kw, device).items()}
            with torch.set_grad_enabled(bool(fisher)):
                nll, n = lm_nll(model, kw, gen)
                tokens += n
                if fisher and outs:
                    grads = torch.autograd.grad(nll, [o for _, o in outs], allow_unused=True)
                    for (name, o), g in zip(outs, grads):
                        if g is not None:
                            stats[name].F += g.detach().reshape(-1, g.shape[-1]).float().pow(2).sum(0).double()
            outs.clear()
            last.update(x=None, p=None, rows=0)
    finally:
        for h in handles:
            h.remove()
        for p, req in params:
            p.requires_grad_(req)
        outs.clear()
        last.update(x=None, p=None)
    own = {id(m) for m in model.modules()}
    unseen = [n for n, st in stats.items() if st.rows == 0 and id(mods[n]) not in own]
    if unseen:
        raise ValueError(f"layer(s) {unseen[:3]}{' ...' if len(unseen) > 3 else ''} never ran on the "
                         "calibration data, so their sensitivity can't be measured; they must be "
                         "called by model(**calibration_batch)")
    if fisher and tokens == 0:
        raise ValueError("the calibration data has no token to predict (sequences of length 1?)")
    for st in stats.values():
        if st.rows:
            st.H /= st.rows
        if fisher:
            st.F /= tokens
    return stats


# ---- sensitivity --------------------------------------------------------------------------
@dataclass
class SensitivityTable:
    """Per layer and candidate: stored bits and sensitivity (``values[i][j]``: layer i,
    candidate j; see the module docstring for the units of each method)."""

    names: List[str]
    params: List[int]
    candidates: List[Dict[str, Any]]
    bits: List[List[int]]  # total stored bits of layer i in candidate j
    values: List[List[float]]
    method: str
    calibration_tokens: int
    base_loss: Optional[float] = None  # calibration loss of the float model ("loss" only)
    seconds: float = 0.0
    # layers the calibration pass never called (their weight read directly, or unused): no
    # activations, so no sensitivity (their values are 0); the plan gives them candidate 0
    unmeasured: List[str] = field(default_factory=list)


def _error_terms(w: torch.Tensor, cand: Dict[str, Any]) -> Tuple[int, torch.Tensor]:
    """(stored bits, dW = dequantize(quantize(w)) - w in float32)."""
    f, kw = format_kwargs(cand)
    qw = ops.quantize_weight(w, f, **kw)
    return 8 * qw.nbytes, ops.dequantize(qw, torch.float32) - w


def measure_sensitivity(model: nn.Module, targets: Dict[str, nn.Linear], calib,
                        candidates: List[Dict[str, Any]], method: str = "fisher",
                        max_tokens: Optional[int] = MAX_SENSITIVITY_TOKENS,
                        progress: bool = False) -> SensitivityTable:
    """The sensitivity of every target layer to every candidate format (see the module
    docstring for the three methods). ``candidates``: resolved format options
    (:func:`candidate_ladder`). The model is left as it was."""
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; expected one of {list(SENSITIVITY_METHODS)}")
    t0 = time.perf_counter()
    names = list(targets)
    batches = _batches(calib, max_tokens)
    tokens = sum(int(kw["input_ids"].numel()) for kw in batches
                 if isinstance(kw.get("input_ids"), torch.Tensor))
    bits: Dict[str, List[int]] = {}
    values: Dict[str, List[float]] = {}
    unmeasured: List[str] = []
    base_loss = None
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=len(names), desc=f"sensitivity ({method})", unit="layer", leave=False)

    if method == "loss":
        base_loss = calibration_loss(model, batches)
        for name in names:
            w = targets[name].weight
            orig = w.detach().clone()
            bits[name], values[name] = [], []
            try:
                for cand in candidates:
                    b, dw = _error_terms(orig.float(), cand)
                    with torch.no_grad():
                        w.copy_((orig.float() + dw).to(w.dtype))
                    bits[name].append(b)
                    values[name].append(calibration_loss(model, batches) - base_loss)
            finally:
                with torch.no_grad():
                    w.copy_(orig)
            if pbar is not None:
                pbar.update(1)
    else:
        fisher = {"fisher": "sampled", "empirical-fisher": "data"}.get(method)
        for chunk in _stat_chunks(names, targets):
            # inference_mode(False): a caller's torch.inference_mode() would forbid the
            # backward and the in-place accumulation.
            with torch.inference_mode(False):
                stats = _collect_stats(model, {n: targets[n] for n in chunk}, batches, fisher,
                                       progress, f"calibration pass ({method})")
            for name in chunk:
                st = stats.pop(name)
                w = targets[name].weight.detach().float()
                bits[name], values[name] = [], []
                if st.rows == 0:
                    unmeasured.append(name)
                for cand in candidates:
                    b, dw = _error_terms(w, cand)
                    if st.rows == 0:
                        bits[name].append(b)
                        values[name].append(0.0)
                        continue
                    per_row = ((dw @ st.H) * dw).sum(1, dtype=torch.float64)  # (dW H dW^T)_nn
                    v = 0.5 * float((st.F * per_row).sum()) if fisher else float(per_row.sum())
                    bits[name].append(b)
                    values[name].append(v)
                if pbar is not None:
                    pbar.update(1)
            del stats
    if pbar is not None:
        pbar.close()
    return SensitivityTable(names=names, params=[targets[n].weight.numel() for n in names],
                            candidates=[dict(c) for c in candidates],
                            bits=[bits[n] for n in names], values=[values[n] for n in names],
                            method=method, calibration_tokens=tokens, base_loss=base_loss,
                            seconds=time.perf_counter() - t0, unmeasured=unmeasured)


def _stat_chunks(names: List[str], targets: Dict[str, nn.Linear]) -> List[List[str]]:
    """Targets in order, grouped so each group's K x K float32 matrices fit MAX_STATS_BYTES."""
    chunks: List[List[str]] = [[]]
    used = 0
    for n in names:
        b = 4 * targets[n].in_features ** 2
        if chunks[-1] and used + b > MAX_STATS_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += b
    return chunks


# ---- the knapsack -------------------------------------------------------------------------
def solve_budget(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int,
                 resolution: int = DP_RESOLUTION) -> List[int]:
    """Pick one option per item minimising the sum of ``values`` with ``sum of costs <= budget``
    (a multiple-choice knapsack; costs are non-negative integers, here bits).

    Dynamic programming over the spare budget (budget minus every item's cheapest option)
    cut into at most ``resolution`` steps, each option's extra cost rounded up to whole steps
    (so the answer always fits and is optimal whenever the step is 1 bit), followed by an
    exact fill: while some single-item change to a lower value fits in the bits left, make the
    one that lowers the total most. Deterministic; ValueError if even the cheapest options
    exceed the budget."""
    c = np.asarray(costs, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    if c.ndim != 2 or c.shape != v.shape or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"costs and values must be equal, non-empty [items, options] tables, "
                         f"got {c.shape} and {v.shape}")
    if (c < 0).any():
        raise ValueError("costs must be non-negative")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite")
    if c.shape[1] > np.iinfo(np.int16).max:
        raise ValueError("too many options per item")
    L, C = c.shape
    rows = np.arange(L)
    cheapest = c.argmin(axis=1)  # first cheapest option (ties: earlier option)
    base = int(c[rows, cheapest].sum())
    slack = int(budget) - base
    if slack < 0:
        raise ValueError(f"budget of {int(budget)} bits is below the cheapest choice, {base} bits")
    extra = c - c[rows, cheapest][:, None]
    step = max(1, -(-slack // int(resolution)))
    cap = slack // step
    ext = -(-extra // step)  # rounded up: the DP never overspends
    best = np.zeros(cap + 1)  # best[b]: min value of the items so far using <= b steps
    choice = np.zeros((L, cap + 1), dtype=np.int16)
    for i in range(L):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j in range(C):
            e = int(ext[i, j])
            if e > cap:
                continue
            cand = best[:cap + 1 - e] + v[i, j]
            better = cand < new[e:]
            new[e:] = np.where(better, cand, new[e:])
            pick[e:] = np.where(better, j, pick[e:])
        best = new
        choice[i] = pick
    sel = [0] * L
    b = cap
    for i in range(L - 1, -1, -1):
        j = int(choice[i, b])
        sel[i] = j
        b -= int(ext[i, j])
    # Exact fill of what the rounding left.
    left = slack - int(extra[rows, sel].sum())
    while True:
        cur_v = v[rows, sel]
        cur_e = extra[rows, sel]
        gain = cur_v[:, None] - v  # > 0: lowers the total
        more = extra - cur_e[:, None]
        ok = (gain > 0) & (more <= left)
        if not ok.any():
            break
        g = np.where(ok, gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(g)), g.shape)  # first maximum: deterministic
        left -= int(more[i, j])
        sel[int(i)] = int(j)
    return sel


# ---- the plan -----------------------------------------------------------------------------
@dataclass
class LayerPlan:
    name: str
    params: int
    choice: int  # index into the plan's candidates
    bits: List[int]  # stored bits in each candidate
    sensitivity: List[float]  # in each candidate


@dataclass
class MixedPrecisionPlan:
    """The chosen format of every layer (``choices``: name -> format options, as
    ``lowbit.quantize_weight`` takes them) and how it was chosen."""

    budget: float  # max bits per weight asked for
    method: str  # sensitivity method
    candidates: List[Dict[str, Any]]
    layers: List[LayerPlan]
    calibration_tokens: int = 0
    seconds: float = 0.0
    base_loss: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def choices(self) -> Dict[str, Dict[str, Any]]:
        return {l.name: dict(self.candidates[l.choice]) for l in self.layers}

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return sum(l.bits[l.choice] for l in self.layers) / max(self.params, 1)

    @property
    def predicted_increase(self) -> float:
        """Sum of the chosen sensitivities (for the Fisher methods and "loss": predicted increase of the
        calibration loss, nats per token; for "hessian": summed output MSE)."""
        return sum(l.sensitivity[l.choice] for l in self.layers)

    def uniform(self, j: int) -> Tuple[float, float]:
        """(bits per weight, summed sensitivity) if every layer took candidate j."""
        bits = sum(l.bits[j] for l in self.layers) / max(self.params, 1)
        return bits, sum(l.sensitivity[j] for l in self.layers)

    def summary(self) -> List[Tuple[str, int, int, float]]:
        """(format, layers, weights, bits per weight) per chosen format, in ladder order."""
        out = []
        for j, cand in enumerate(self.candidates):
            ls = [l for l in self.layers if l.choice == j]
            if ls:
                w = sum(l.params for l in ls)
                out.append((_label(cand), len(ls), w, sum(l.bits[j] for l in ls) / w))
        return out

    def table(self) -> str:
        from tabulate import tabulate
        unit = {"fisher": "predicted dNLL", "empirical-fisher": "predicted dNLL",
                "loss": "measured dNLL", "hessian": "output MSE"}[self.method]
        base = self.candidates[0]
        rows = [[l.name, l.params, _label(self.candidates[l.choice]),
                 f"{l.bits[l.choice] / l.params:.3f}", f"{l.sensitivity[l.choice]:.3g}",
                 f"{l.sensitivity[0]:.3g}"] for l in self.layers]
        body = tabulate(rows, headers=["layer", "params", "format", "bits/w",
                                       f"sensitivity ({unit})", f"in {_label(base)}"],
                        disable_numparse=True, colalign=("left", "right", "left", "right", "right", "right"))
        b0, s0 = self.uniform(0)
        head = [f"mixed precision: {self.bits_per_weight:.4f} bits/weight (budget {self.budget:g}) over "
                f"{len(self.layers)} layers, {self.params} weights; sensitivity '{self.method}' on "
                f"{self.calibration_tokens} calibration tokens; {self.seconds:.1f} s",
                f"sum of sensitivities: {self.predicted_increase:.4g} (all {_label(base)}: {s0:.4g} "
                f"at {b0:.3f} bits/weight)",
                "formats: " + "; ".join(f"{f} x{n} ({w / self.params:.1%} of weights)"
                                        for f, n, w, _ in self.summary())]
        return "\n".join(head + self.notes + [body])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> Dict[str, Any]:
        return {"budget_bits_per_weight": self.budget,
                "bits_per_weight": self.bits_per_weight,
                "sensitivity_method": self.method,
                "predicted_increase": self.predicted_increase,
                "calibration_tokens": self.calibration_tokens,
                "seconds": self.seconds,
                "base_loss": self.base_loss,
                "notes": list(self.notes),
                "candidates": [{"label": _label(c), **c} for c in self.candidates],
                "choices": self.choices,
                "layers": [{"name": l.name, "params": l.params, "choice": _label(self.candidates[l.choice]),
                            "bits_per_weight": l.bits[l.choice] / l.params,
                            "bits": list(l.bits), "sensitivity": list(l.sensitivity)}
                           for l in self.layers]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MixedPrecisionPlan":
        cands = [{k: v for k, v in c.items() if k != "label"} for c in d["candidates"]]
        labels = [_label(c) for c in cands]
        layers = [LayerPlan(l["name"], int(l["params"]), labels.index(l["choice"]),
                            [int(b) for b in l["bits"]], [float(s) for s in l["sensitivity"]])
                  for l in d["layers"]]
        return cls(budget=float(d["budget_bits_per_weight"]), method=d["sensitivity_method"],
                   candidates=cands, layers=layers, calibration_tokens=int(d.get("calibration_tokens", 0)),
                   seconds=float(d.get("seconds", 0.0)), base_loss=d.get("base_loss"),
                   notes=list(d.get("notes", [])))


def plan_from_table(table: SensitivityTable, max_bits_per_weight: float) -> MixedPrecisionPlan:
    """Solve the budget for a measured :class:`SensitivityTable`."""
    _check_budget(max_bits_per_weight)
    total = sum(table.params)
    budget_bits = math.floor(Fraction(max_bits_per_weight) * total)  # exact: never over budget
    cheapest = sum(min(b) for b in table.bits)
    if cheapest > budget_bits:
        j = int(np.argmin(np.sum(np.asarray(table.bits), axis=0)))
        raise ValueError(f"max_bits_per_weight={max_bits_per_weight:g} is below the cheapest plan: "
                         f"{cheapest / total:.4f} bits per weight with every layer in its cheapest "
                         f"candidate (e.g. {_label(table.candidates[j])}); raise the budget or add "
                         "cheaper candidates")
    notes: List[str] = []
    pinned = set(table.unmeasured) & set(table.names)
    sel = None
    if pinned:
        # No activations, no sensitivity: those layers take candidate 0 (the config's own
        # format, what GPTQ / AWQ give a layer they never see) and the others share the rest
        # of the budget; if that does not fit, they join the knapsack as if insensitive.
        free = [i for i, n in enumerate(table.names) if n not in pinned]
        rest = budget_bits - sum(table.bits[i][0] for i, n in enumerate(table.names) if n in pinned)
        if rest >= sum(min(table.bits[i]) for i in free):
            sub = solve_budget([table.bits[i] for i in free], [table.values[i] for i in free],
                               rest) if free else []
            sel = [0] * len(table.names)
            for i, j in zip(free, sub):
                sel[i] = j
            how = f"given {_label(table.candidates[0])}"
        else:
            how = ("planned as if insensitive (the budget does not fit them in "
                   f"{_label(table.candidates[0])})")
        shown = sorted(pinned)
        notes.append(f"{len(shown)} layer(s) never called on the calibration data (model code reads "
                     f"their weight, or no token reaches them), so no sensitivity: {how}: "
                     + ", ".join(shown[:4]) + (" ..." if len(shown) > 4 else ""))
    if sel is None:
        sel = solve_budget(table.bits, table.values, budget_bits)
    layers = [LayerPlan(n, p, j, list(b), list(v)) for n, p, j, b, v in
              zip(table.names, table.params, sel, table.bits, table.values)]
    return MixedPrecisionPlan(budget=float(max_bits_per_weight), method=table.method,
                              candidates=[dict(c) for c in table.candidates], layers=layers,
                              calibration_tokens=table.calibration_tokens, seconds=table.seconds,
                              base_loss=table.base_loss, notes=notes)


def _check_budget(b) -> None:
    if b is None:
        raise ValueError("mixed precision needs config.max_bits_per_weight (e.g. 4.5)")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
        raise ValueError(f"max_bits_per_weight must be a positive number of bits, got {b!r}")


def plan_mixed_precision(model: nn.Module, targets: Dict[str, nn.Linear], calib, config, *,
                         candidates: Optional[Sequence[Any]] = None,
                         sensitivity: str = "fisher",
                         max_tokens: Optional[int] = MAX_SENSITIVITY_TOKENS,
                         progress: bool = False) -> MixedPrecisionPlan:
    """Choose a format per target layer within ``config.max_bits_per_weight`` (bits per weight
    over all targets' weights, scales and zeros counted), minimising the predicted increase of
    the model's loss on ``calib`` (see the module docstring).

    ``targets``: name -> float nn.Linear of ``model``; ``calib``: calibration batches (dicts of
    ``model(**kw)`` arguments with ``input_ids``, or token-id tensors); ``config``: a
    QuantConfig (its format, resolved, is the first candidate). Keywords: ``candidates``
    (replaces the default ladder), ``sensitivity`` ("fisher", "empirical-fisher", "hessian"
    or "loss"),
    ``max_tokens`` (calibration tokens used; None = all), ``progress`` (tqdm bars).
    Raises ValueError when the budget is below the cheapest candidates."""
    budget = getattr(config, "max_bits_per_weight", None)
    _check_budget(budget)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(targets, Mapping) or not targets:
        raise ValueError("targets must be a non-empty dict of name -> nn.Linear")
    for n, m in targets.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(f"target {n!r} is a {type(m).__name__}, not an nn.Linear")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    cands = candidate_ladder(config if candidates is None else None, candidates)
    # Fail on an impossible budget before the costly pass: costs depend only on shapes.
    _check_cheapest(targets, cands, budget)
    was_training = model.training
    model.eval()
    try:
        table = measure_sensitivity(model, dict(targets), calib, cands, sensitivity,
                                    max_tokens=max_tokens, progress=progress)
    finally:
        model.train(was_training)
    return plan_from_table(table, budget)


def _check_cheapest(targets: Dict[str, nn.Linear], cands: List[Dict[str, Any]], budget: float) -> None:
    """ValueError when even the cheapest candidates exceed the budget (costs from quantizing a
    zero weight of each distinct shape: the stored layout depends on the shape only)."""
    cost: Dict[Tuple[int, int], int] = {}
    total_w = total_b = 0
    per_cand = [0] * len(cands)
    for m in targets.values():
        shape = (m.out_features, m.in_features)
        if shape not in cost:
            bs = []
            for c in cands:
                f, kw = format_kwargs(c)
                bs.append(8 * ops.quantize_weight(torch.zeros(shape), f, **kw).nbytes)
            cost[shape] = bs
        bs = cost[shape]
        total_w += shape[0] * shape[1]
        total_b += min(bs)
        per_cand = [a + b for a, b in zip(per_cand, bs)]
    best_j = int(np.argmin(per_cand))
    if total_b > Fraction(budget) * total_w:
        raise ValueError(f"max_bits_per_weight={budget:g} is below the cheapest plan: "
                         f"{total_b / total_w:.4f} bits per weight with every layer in its cheapest "
                         f"candidate (e.g. {_label(cands[best_j])}); raise the budget or add cheaper "
                         "candidates")
