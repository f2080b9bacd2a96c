"""AWQ: activation-aware per-input-channel scaling before round-to-nearest.

For a group of linears reading the same input x (q/k/v after the attention norm, gate/up after
the MLP norm, down after up, o after v), scaling input channel c of the weights by s_c and
the input by 1/s_c leaves the float output unchanged but shrinks the relative rounding error of
the channels that carry large activations. AWQ (Lin et al., 2023) searches
``s = mean|x|^alpha`` (normalised so max(s) * min(s) = 1) over a grid of alpha in [0, 1) and
keeps the one whose fake-quantized output is closest to the float output. ``1/s`` is then
folded into the op that produces x, when that op allows it exactly: a norm's weight (and
bias), or the output rows of the preceding linear (up_proj for down_proj in a gated MLP,
v_proj for o_proj when they have the same width). Otherwise the layer keeps ``s`` as its
QuantizedWeight's ``input_scale`` (the input is divided by it at run time). An optional clip
search then shrinks each group's weight range where that lowers the layer's output error
(both ends together, then, for asymmetric formats, each end on its own). Finally every layer
is quantized by round-to-nearest (lowbit's reference rules) and, with ``bias_correction``
(lowbit's addition, on by default), the quantization error's mean output shift
(W - Q) @ mean(x) over the calibration tokens is added to the layer's bias; the scale and clip
searches then minimise the error left after that correction (the clip search's X^T X is
centred on the mean for the tokens it is taken over). SmolLM2-135M, 16k tokens, 64
calibration sequences: g128 27.53 -> 27.05, g64 26.48 -> 26.37 (RTN 30.59 / 29.42, fp32
22.79). A per-output-channel least-squares gain on top of it (folded into the scales) was
worse: 27.98 at g128.

Defaults measured on SmolLM2-135M (int4 g128, 4k scored tokens, 16 calibration sequences;
RTN 27.81, fp32 21.22): AutoAWQ's choices (s = mean|x|^alpha, q/k left unclipped) 26.06;
with ``duo_scaling`` (s = mean|x|^alpha / mean|w|^(1 - alpha)) 25.38; clipping q/k too
24.94. The first token's weight in the objectives (attention sink) was best at 64 of
1 / 16 / 64 / 512 (25.05 / 25.05 / 24.94 / 28.01 at g128).

Tried and not kept (SmolLM2-135M int4 g128, 16,384 scored tokens, 64 calibration sequences;
RTN 30.59, fp32 22.79, the defaults before bias_correction 27.53): clip search with one joint ratio only (AutoAWQ's)
27.86; loss weighted by the model loss's squared gradient at each output (per token x channel,
true Fisher) 27.56; act-order groups (columns grouped by decreasing input energy, stored
perm) 29.53; 10 Adam steps on log s after the grid (straight-through rounding) 27.43 at 1.75x
the time; calibrating each block on the float model's activations (AutoAWQ's order) 31.10
at 4k tokens against 25.40. A 4k-token screen with 16 sequences ranked several of these
the other way round, so only 16k-token results decide.

How far apart two runs of the same algorithm land (H200, float32, TF32 off, same text,
tokens and calibration; fp32 22.79 and RTN 30.59 there as here): the defaults gave g128 27.50
on the GPU against 27.05 on the CPU (g64 26.39 against 26.37). Only float rounding differs, so
a few discrete choices (alpha per group, clip per weight group) flip and move perplexity by
up to ~0.45 at g128. Variants screened on the H200 at g128 all landed in that band: clip_grid
40 27.02, first_token_weight 16 27.16 / 256 27.45, n_grid 40 27.53, search_tokens 32768
27.57, 128 calibration sequences 27.35, objective 'layer' 27.61, no bias correction 27.45;
quantizing a block's groups one at a time with each group's clip search and bias correction
re-measured on the inputs left by the already-quantized groups (and the bias target taken from
the float block's inputs) 27.33-27.47 (g64: 25.93-26.46 over four settings, against 26.39);
a bias target from the float model's own stream diverged (35.2 and worse). None was kept: none
moved g128 outside the band. Session 12, on the CPU (this code's defaults gave 27.26 that day,
2 threads): after the clip search, refitting each group's scale and zero point to its share of
the layer objective by weighted least squares on its codes, then rounding to nearest again
(kept per group only where the objective fell; 1-13% lower layer objective on synthetic
weights, ~1% for asymmetric int4), together with re-scoring the scale search's best three
alphas with each candidate clipped as it would be used: 27.41 at 1.45x the time. Not kept.
Kept, on by default (``clip_coupled=2``): passes over the groups that re-choose each row's clip
ratios against the whole layer objective, the other groups' errors entering through the
off-diagonal blocks of X^T X (10-15% lower objective than the block-diagonal search on
correlated synthetic inputs): g128 27.03 (27.26 without, same day), g64 25.90 (53% of the RTN
increase removed; 26.37 without in session 11), about 1.5x the AWQ time. Session 15 (same
command): the activation statistic as sqrt(mean x^2) (from the diagonal of X^T X, weighting
the large tokens more) instead of mean |x|: g128 27.10, no gain; not kept. clip_grid 40 with
clip_coupled 2 (clip_grid 40 alone was the best H200 screen, 27.02 against 27.50 there):
27.07 here at 1.8x the time; not kept.

:func:`scale_block` runs the scale search alone on one block, for GPTQ's ``awq_scales``
(AWQ's scales folded, then GPTQ instead of round-to-nearest).

The groups are found from the module structure: linears whose forward input is the same
tensor form a group; a norm-like module (a 1-D ``weight`` of the input's width) whose output
is that tensor is the fold target, checked numerically before use; linear fold targets come
from :data:`LINEAR_PRODUCERS` (Llama / Mistral / Qwen / Gemma names). Anything else falls back
to input_scale, so unknown architectures still work.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import reference as R
from ..ops import quantize_weight
from . import blocks as B
from .config import format_kwargs
from .gptq import clip_candidates, clip_ratios, one_group_kw

# A consumer linear's name -> (producer sibling, sibling that must also exist): scaling the
# producer's output row c by 1/s_c scales the consumer's input channel c by 1/s_c. In a
# gated MLP, down(act(gate(x)) * up(x)): up's rows (gate must be there, else the MLP may
# apply a nonlinearity to up's output). In attention, o(softmax(.) v): v's rows, when
# v's width equals o's input width (no grouped-query head sharing).
LINEAR_PRODUCERS: Dict[str, Tuple[str, Optional[str]]] = {
    "down_proj": ("up_proj", "gate_proj"),
    "w2": ("w3", "w1"),  # Mixtral-style expert names
    "o_proj": ("v_proj", None),
}


def fake_quant(w: torch.Tensor, fmt: Dict[str, Any]) -> torch.Tensor:
    """The float32 values ``w`` decodes to after round-to-nearest into ``fmt``."""
    f, kw = format_kwargs(fmt)
    return R.dequantize(quantize_weight(w, f, **kw), torch.float32)


@dataclass
class _Group:
    names: List[str]  # relative names of the linears, in call order
    lca: str  # the smallest module holding them all ('' = the block)
    producer: Optional[Tuple[str, str]] = None  # ("norm" | "linear", relative name)
    # statistics over all calibration tokens
    x_abs_sum: Optional[torch.Tensor] = None
    x_sum: Optional[torch.Tensor] = None  # sum of x over tokens but each sequence's first
    x_count: int = 0  # ... and how many (for bias_correction)
    xtx: Optional[torch.Tensor] = None
    n: float = 0.0  # weighted token count of xtx (first_token_weight)
    tokens: int = 0  # token count of x_abs_sum
    # replays of the lca module on the search batches: (args, kwargs, float output)
    replays: List[Tuple[tuple, dict, torch.Tensor]] = field(default_factory=list)
    # probe: the producer's input and output on the first batch (to check a norm fold)
    probe_in: Optional[torch.Tensor] = None
    probe_out: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None  # the chosen s (None: alpha 0)
    folded: bool = False
    alpha: float = 0.0
    loss_gain: float = 0.0
    t: float = 0.0  # seconds spent on the search


def _lca(names: List[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for seg in zip(*parts):
        if all(s == seg[0] for s in seg):
            common.append(seg[0])
        else:
            break
    if len(names) == 1:
        return names[0]
    return ".".join(common)


def _sub(root: nn.Module, rel: str) -> nn.Module:
    return root if rel == "" else root.get_submodule(rel)


def _is_norm_like(mod: nn.Module, K: int) -> bool:
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.shape[0] == K)


def _linear_producer(block: nn.Module, consumer: str, K: int) -> Optional[str]:
    parent, _, leaf = consumer.rpartition(".")
    row = LINEAR_PRODUCERS.get(leaf)
    if row is None:
        return None
    prod, needed = row
    pname = f"{parent}.{prod}" if parent else prod
    try:
        p = block.get_submodule(pname)
    except AttributeError:
        return None
    if needed is not None:
        try:
            block.get_submodule(f"{parent}.{needed}" if parent else needed)
        except AttributeError:
            return None
    if type(p) is not nn.Linear or p.out_features != K:
        return None
    return pname


@torch.no_grad()
def _probe_groups(block: nn.Module, inp: B.BlockInput, linears: Dict[str, nn.Linear]) -> List[_Group]:
    """Groups of linears sharing an input, in call order, with their fold targets."""
    seen_in: List[Tuple[str, torch.Tensor]] = []
    outputs: Dict[int, Tuple[str, torch.Tensor, torch.Tensor]] = {}
    handles = []
    for rel, mod in block.named_modules():
        if rel in linears:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, rel=rel: seen_in.append((rel, a[0]))))
        elif rel and len(list(mod.children())) == 0:
            # leaf modules: remember which produced which tensor (kept alive for identity)
            def hook(m, a, o, rel=rel):
                if isinstance(o, torch.Tensor) and a and isinstance(a[0], torch.Tensor):
                    outputs[id(o)] = (rel, a[0], o)
            handles.append(mod.register_forward_hook(hook))
    try:
        block(*inp.args, **inp.kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: List[_Group] = []
    xs: List[torch.Tensor] = []
    for rel, x in seen_in:
        if any(rel in g.names for g in groups):
            continue
        for g, gx in zip(groups, xs):
            if x is gx:
                g.names.append(rel)
                break
        else:
            groups.append(_Group([rel], ""))
            xs.append(x)
    for g, x in zip(groups, xs):
        g.lca = _lca(g.names)
        K = x.shape[-1]
        prod = outputs.get(id(x))
        if prod is not None and prod[2] is x and _is_norm_like(_sub(block, prod[0]), K):
            g.producer = ("norm", prod[0])
            g.probe_in, g.probe_out = prod[1], prod[2]
        elif len(g.names) == 1:
            p = _linear_producer(block, g.names[0], K)
            if p is not None:
                g.producer = ("linear", p)
    missing = [n for n in linears if not any(n in g.names for g in groups)]
    for n in missing:  # never called on calibration data: plain RTN
        groups.append(_Group([n], n))
    return groups


def _add_stats(g: _Group, x: torch.Tensor, first_weight: float) -> None:
    """Accumulate mean |x| per channel and X^T X (its first position of each sequence
    counted ``first_weight`` times; see gptq.Hessian)."""
    K = x.shape[-1]
    rows = x.reshape(-1, K).to(torch.float32)
    if g.xtx is None:
        g.xtx = torch.zeros(K, K, device=x.device)
        g.x_abs_sum = torch.zeros(K, device=x.device)
        g.x_sum = torch.zeros(K, device=x.device)
    g.xtx.addmm_(rows.t(), rows)
    g.x_abs_sum += rows.abs().sum(0)
    g.x_sum += rows.sum(0)
    g.x_count += rows.shape[0]
    g.tokens += rows.shape[0]
    g.n += rows.shape[0]
    if x.dim() >= 3 and x.shape[-2] > 1:  # sequences: their first positions
        x0 = x[..., 0, :].reshape(-1, K).to(torch.float32)
        g.x_sum -= x0.sum(0)
        g.x_count -= x0.shape[0]
        if first_weight != 1.0:
            g.xtx.addmm_(x0.t(), x0, alpha=first_weight - 1.0)
            g.n += (first_weight - 1.0) * x0.shape[0]


@torch.no_grad()
def _collect(block: nn.Module, inputs: List[B.BlockInput], groups: List[_Group],
             n_search: int, need_replays: bool, first_weight: float = 1.0) -> None:
    """Per-channel mean |x| and X^T X of each group's input over every batch; replays of
    each group's lca module over the first ``n_search`` batches."""
    state = {"batch": 0}
    handles = []
    for gi, g in enumerate(groups):
        first = _sub(block, g.names[0])

        def stat(m, a, o, g=g):
            _add_stats(g, a[0], first_weight)
        handles.append(first.register_forward_hook(stat))
        if need_replays:
            lca = _sub(block, g.lca)

            def replay(m, args, kwargs, out, g=g):
                if state["batch"] < n_search:
                    g.replays.append((tuple(args), dict(kwargs), B.first_tensor(out).detach()))
            handles.append(lca.register_forward_hook(replay, with_kwargs=True))
    try:
        for i, inp in enumerate(inputs):
            state["batch"] = i
            block(*inp.args, **inp.kwargs)
    finally:
        for h in handles:
            h.remove()


def _corrects_bias(config, g: _Group) -> bool:
    return bool(getattr(config, "bias_correction", False)) and g.x_count > 0


def _objective_H(g: _Group, centered: bool) -> torch.Tensor:
    """The layer objective's second moment of x: X^T X / n, or, when the mean output shift is
    corrected afterwards (bias_correction), with the tokens the mean is taken over centred on
    it (only the error's variance is left to minimise; positive semi-definite: the first
    positions, weighted by first_token_weight, keep their raw second moment)."""
    H = g.xtx / g.n
    if centered:
        mu = g.x_sum / g.x_count
        H = H - (g.x_count / g.n) * torch.outer(mu, mu)
    return H


def _candidate_scale(x_mean: torch.Tensor, w_mean: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    if w_mean is not None:
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
    else:
        s = x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _w_mean(weights: List[torch.Tensor], fmt: Dict[str, Any]) -> torch.Tensor:
    """Per input channel mean of |w| / (its group's max |w|) over the group's linears."""
    W = torch.cat(weights, dim=0)
    N, K = W.shape
    g = fmt.get("group_size", -1)
    g = K if g in (-1, None) or g > K else g
    pad = (-K) % g
    Wp = torch.nn.functional.pad(W.abs(), (0, pad)).reshape(N, -1, g)
    Wn = Wp / Wp.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return Wn.reshape(N, -1)[:, :K].mean(0)


@torch.no_grad()
def _search_scale(block: nn.Module, g: _Group, mods: Dict[str, Tuple[nn.Linear, Dict[str, Any]]],
                  config, objective: str) -> None:
    """Grid-search alpha for group g; sets g.scale / g.alpha (alpha 0: no scaling)."""
    if g.n == 0:
        return
    x_mean = g.x_abs_sum / g.tokens
    weights = {r: mods[r][0].weight.detach().to(torch.float32) for r in g.names}
    w_mean = _w_mean(list(weights.values()), mods[g.names[0]][1]) if config.duo_scaling else None
    use_module = objective == "module" and g.replays
    correct = _corrects_bias(config, g)
    H = _objective_H(g, correct)
    originals = {r: mods[r][0].weight.data for r in g.names}
    biases = {r: mods[r][0].bias for r in g.names}
    mu = g.x_sum / g.x_count if correct else None

    def loss_for(s: Optional[torch.Tensor]) -> float:
        fq = {}
        for r, W in weights.items():
            fmt = mods[r][1]
            fq[r] = fake_quant(W, fmt) if s is None else fake_quant(W * s, fmt) / s
        if not use_module:
            return sum(float(((W - fq[r]) @ H * (W - fq[r])).sum()) for r, W in weights.items())
        try:
            for r in g.names:
                mods[r][0].weight.data = fq[r].to(originals[r].dtype)
                if correct:  # each candidate as it would be used: its mean shift corrected
                    shift = (weights[r] - fq[r]) @ mu
                    b = biases[r]
                    mods[r][0].bias = nn.Parameter(
                        (shift if b is None else b.detach().to(torch.float32) + shift)
                        .to(originals[r].dtype), requires_grad=False)
            lca = _sub(block, g.lca)
            tot = 0.0
            cnt = 0
            fw = config.first_token_weight
            for args, kwargs, ref in g.replays:
                out = B.first_tensor(lca(*args, **kwargs)).to(torch.float32)
                d = (out - ref.to(torch.float32)) ** 2
                tot += float(d.sum())
                cnt += d.numel()
                if fw != 1.0 and d.dim() >= 3 and d.shape[-2] > 1:
                    tot += (fw - 1.0) * float(d[..., 0, :].sum())  # the attention-sink token
                    cnt += (fw - 1.0) * d[..., 0, :].numel()
            return tot / max(cnt, 1)
        finally:
            for r in g.names:
                mods[r][0].weight.data = originals[r]
                mods[r][0].bias = biases[r]

    base = loss_for(None)
    best, best_alpha, best_s = base, 0.0, None
    for i in range(1, config.n_grid):
        alpha = i / config.n_grid
        s = _candidate_scale(x_mean, w_mean, alpha)
        loss = loss_for(s)
        if loss < best:
            best, best_alpha, best_s = loss, alpha, s
    g.alpha = best_alpha
    g.scale = best_s
    g.loss_gain = (base - best) / base if base > 0 else 0.0


def _block_out(block: nn.Module, inp: B.BlockInput) -> torch.Tensor:
    return B.first_tensor(block(*inp.args, **inp.kwargs)).to(torch.float32)


@torch.no_grad()
def _apply_scale(block: nn.Module, g: _Group, mods, allow_input_scale: bool = True,
                 check_inp: Optional[B.BlockInput] = None) -> None:
    """Scale the group's weights by s and fold 1/s into the producer (checked), else leave it
    for input_scale; without ``allow_input_scale`` (a bits budget that counts no input_scale)
    such a group stays unscaled. The group's statistics are moved to the scaled input x / s.

    A fold is kept only if the block computes the same function afterwards: the norm must
    be of the form y = weight * f(x) (+ bias) (checked on the probe), and, with
    ``check_inp`` (a block input), the block's float output on it must not move. That catches
    a producer whose output also reaches something else, e.g. the residual stream of a
    post-norm block (BERT's attention LayerNorm feeds both the MLP and the residual add)."""
    s = g.scale
    if s is None:
        return
    if g.producer is None and not allow_input_scale:
        g.scale, g.alpha, g.loss_gain = None, 0.0, 0.0
        return
    originals = {r: mods[r][0].weight.data.clone() for r in g.names}

    def scale_weights():
        for r in g.names:
            w = mods[r][0].weight
            w.copy_((originals[r].to(torch.float32) * s).to(w.dtype))

    if g.producer is not None:
        kind, pname = g.producer
        p = _sub(block, pname)
        ref = _block_out(block, check_inp) if check_inp is not None else None
        old_w = p.weight.data.clone()
        old_b = getattr(p, "bias", None)
        old_b = old_b.data.clone() if isinstance(old_b, torch.Tensor) else None
        if kind == "norm":
            p.weight.copy_((p.weight.to(torch.float32) / s).to(p.weight.dtype))
            if old_b is not None:
                p.bias.copy_((p.bias.to(torch.float32) / s).to(p.bias.dtype))
            # The fold is exact only for norms of the form y = weight * f(x) (+ bias).
            got = p(g.probe_in).to(torch.float32)
            want = g.probe_out.to(torch.float32) / s
            tol = 1e-3 if p.weight.dtype != torch.float32 else 1e-5
            g.folded = torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))
        else:
            p.weight.copy_((p.weight.to(torch.float32) / s[:, None]).to(p.weight.dtype))
            if p.bias is not None:
                p.bias.copy_((p.bias.to(torch.float32) / s).to(p.bias.dtype))
            g.folded = True
        if g.folded and ref is not None:
            scale_weights()
            got = _block_out(block, check_inp)
            tol = 1e-4 if p.weight.dtype == torch.float32 else 2e-2
            err = float((got - ref).norm()) / max(float(ref.norm()), 1e-30)
            g.folded = err <= tol
            if not g.folded:
                for r in g.names:
                    mods[r][0].weight.copy_(originals[r])
        if not g.folded:
            p.weight.copy_(old_w)
            if old_b is not None:
                p.bias.copy_(old_b)
    if not g.folded and not allow_input_scale:
        g.scale, g.alpha, g.loss_gain = None, 0.0, 0.0
        return
    scale_weights()
    g.xtx = g.xtx / s[:, None] / s[None, :]
    g.x_abs_sum = g.x_abs_sum / s
    g.x_sum = g.x_sum / s


@torch.no_grad()
def clip_search(W: torch.Tensor, H: torch.Tensor, fmt: Dict[str, Any], n_grid: int,
                max_shrink: float, separate_ends: bool = True,
                coupled_sweeps: int = 0) -> Tuple[torch.Tensor, float]:
    """Clip each group of W [N, K] to a shrunk range that minimises that group's share of the
    layer's output error ``d^T H_gg d`` (d the group's rounding error, H_gg its block of
    X^T X). The ranges come from a grid of n_grid ratios in (1 - max_shrink, 1]: first one
    ratio for both ends of the range; then, for formats with a zero-point (asymmetric), the
    upper end and the lower end are searched each on its own (unless ``separate_ends`` is
    False), the other held at its best, as the two ends of a skewed group need not shrink
    alike. Every step keeps a group's current range unless a candidate lowers its error, so
    the result is never worse than the unclipped weight. Returns the clipped weight and the
    mean shrink chosen (both ends)."""
    from .. import formats as F
    f, kw = format_kwargs(fmt)
    spec = F.get_format(f)
    N, K = W.shape
    g = F.effective_group(fmt.get("group_size", spec.default_group), K)
    G = -(-K // g)
    pad = G * g - K
    Wg = torch.nn.functional.pad(W, (0, pad)).reshape(N, G, g)
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    C = torch.stack([Hp[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(G)])  # [G, g, g]
    asym = spec.has_zero_point and not fmt.get("symmetric", False)
    if asym:
        hi = Wg.amax(dim=2, keepdim=True).clamp(min=0)
        lo = Wg.amin(dim=2, keepdim=True).clamp(max=0)
    else:
        hi = Wg.abs().amax(dim=2, keepdim=True)
        lo = -hi

    def error(r_hi, r_lo):
        Wc = torch.maximum(torch.minimum(Wg, hi * r_hi), lo * r_lo)
        Q = fake_quant(Wc.reshape(N, G * g)[:, :K], fmt)
        D = torch.nn.functional.pad(W - Q, (0, pad)).reshape(N, G, g)
        return torch.einsum("ngi,gij,ngj->ng", D, C, D)

    best_hi = torch.ones(N, G, 1, device=W.device)
    best_lo = torch.ones(N, G, 1, device=W.device)
    best_err = error(best_hi, best_lo)
    for r, move_hi, move_lo in clip_candidates(n_grid, max_shrink, asym and separate_ends):
        full = torch.full_like(best_hi, r)
        cand_hi = full if move_hi else best_hi
        cand_lo = full if move_lo else best_lo
        err = error(cand_hi, cand_lo)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better[..., None], cand_hi, best_hi)
        best_lo = torch.where(better[..., None], cand_lo, best_lo)
    if coupled_sweeps > 0 and G > 1:
        best_hi, best_lo = _coupled_clip(K, Wg, Hp, C, hi, lo, best_hi, best_lo, fmt, n_grid,
                                         max_shrink, asym and separate_ends, coupled_sweeps)
    Wc = torch.maximum(torch.minimum(Wg, hi * best_hi), lo * best_lo)
    return Wc.reshape(N, G * g)[:, :K].contiguous(), float((best_hi.mean() + best_lo.mean()) / 2)


@torch.no_grad()
def _coupled_clip(K, Wg, Hp, C, hi, lo, best_hi, best_lo, fmt, n_grid, max_shrink, separate,
                  sweeps):
    """Group by group, re-choose each row's clip ratios against the whole layer objective
    tr(D H D^T): a group's candidate error d' costs d'^T H_gg d' + 2 d'^T c, c = the other
    groups' current errors times their blocks of H (what the block-diagonal search ignores:
    correlated inputs let one group's error offset another's). Keeps a row's ratios unless a
    candidate lowers the total; ``sweeps`` passes over the groups. Each group is quantized on
    its own (one_group_kw), so double quantization's rounding of the absmax is left out of
    these errors."""
    N, G, g = Wg.shape
    f, kw = format_kwargs(fmt)
    one = one_group_kw(kw)

    def fq(gi, r_hi, r_lo):  # decoded values of group gi, ratios [..., N, 1] -> [..., N, n]
        n = min((gi + 1) * g, K) - gi * g
        w = Wg[:, gi, :n]
        wc = torch.maximum(torch.minimum(w, hi[:, gi] * r_hi), lo[:, gi] * r_lo)
        flat = wc.reshape(-1, n).contiguous()
        q = R.dequantize(quantize_weight(flat, f, **one), torch.float32).reshape(wc.shape)
        d = torch.zeros(wc.shape[:-1] + (g,), device=Wg.device)
        d[..., :n] = w - q
        return d

    D = torch.zeros_like(Wg)
    for gi in range(G):
        D[:, gi] = fq(gi, best_hi[:, gi], best_lo[:, gi])
    ratios = torch.tensor(clip_ratios(n_grid, max_shrink), device=Wg.device)
    for _ in range(sweeps):
        for gi in range(G):
            Cg = C[gi]
            cross = D.reshape(N, G * g) @ Hp[:, gi * g:(gi + 1) * g] - D[:, gi] @ Cg  # [N, g]
            cur = ((D[:, gi] @ Cg) * D[:, gi]).sum(1) + 2 * (D[:, gi] * cross).sum(1)
            R_ = ratios[:, None, None].expand(-1, N, 1)  # [n_grid, N, 1]
            bh = best_hi[:, gi].expand(len(ratios), N, 1)
            bl = best_lo[:, gi].expand(len(ratios), N, 1)
            if separate:  # both ends by one ratio, the upper end alone, the lower end alone
                c_hi, c_lo = torch.cat([R_, R_, bh]), torch.cat([R_, bl, R_])
            else:
                c_hi, c_lo = R_, R_
            d = fq(gi, c_hi, c_lo)  # [n_cand, N, g]
            tot = torch.einsum("cni,ij,cnj->cn", d, Cg, d) + 2 * torch.einsum("cni,ni->cn", d, cross)
            t, idx = tot.min(0)
            better = t < cur
            if bool(better.any()):
                rows = torch.arange(N, device=Wg.device)
                best_hi[:, gi] = torch.where(better[:, None], c_hi[idx, rows], best_hi[:, gi])
                best_lo[:, gi] = torch.where(better[:, None], c_lo[idx, rows], best_lo[:, gi])
                D[:, gi] = torch.where(better[:, None], d[idx, rows], D[:, gi])
    return best_hi, best_lo


def _skip_clip(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


@torch.no_grad()
def _finish_group(g: _Group, mods, config, full: Dict[str, str], sink, t_group: float) -> None:
    """Clip, quantize and record the group's linears; the module then holds the exact
    dequantized weight (what the rest of the block pass must see)."""
    for r in g.names:
        t0 = time.perf_counter()
        mod, fmt = mods[r]
        W = mod.weight.detach().to(torch.float32)
        info: Dict[str, Any] = {"alpha": g.alpha}
        if g.scale is not None:
            info["scale"] = "folded" if g.folded else "input_scale"
            if g.folded:
                info["into"] = g.producer[1]
        if g.n == 0:
            info["note"] = "never called on calibration data: rtn"
        if config.clip_search and g.n > 0 and not _skip_clip(full[r], config.clip_skip):
            W, shrink = clip_search(W, _objective_H(g, _corrects_bias(config, g)), fmt,
                                    config.clip_grid, config.clip_max_shrink,
                                    config.clip_separate_ends, config.clip_coupled)
            info["clip"] = round(shrink, 4)
        f, kw = format_kwargs(fmt)
        qw = quantize_weight(W, f, **kw)
        if _corrects_bias(config, g):
            # the mean output shift of the quantization error, in the layer's (scaled) frame
            W0 = mod.weight.detach().to(torch.float32)
            shift = (W0 - R.decode(qw, torch.float32)) @ (g.x_sum / g.x_count)
            if mod.bias is None:
                mod.bias = nn.Parameter(shift.to(mod.weight.dtype), requires_grad=False)
            else:
                mod.bias.copy_((mod.bias.to(torch.float32) + shift).to(mod.bias.dtype))
            info["bias_shift"] = round(float(shift.abs().mean()), 6)
        if g.scale is not None and not g.folded:
            qw.input_scale = g.scale.to(torch.float32).contiguous()
            qw.validate()
        mod.weight.copy_(R.dequantize(qw, torch.float32).to(mod.weight.dtype))
        info["weights"] = qw.shape[0] * qw.shape[1]
        sink.add(full[r], qw, time.perf_counter() - t0 + t_group / len(g.names), info)


def _n_search_batches(inputs: List[B.BlockInput], search_tokens: int) -> int:
    tot = 0
    for i, inp in enumerate(inputs):
        h = inp.hidden
        tot += h.numel() // h.shape[-1]
        if tot >= search_tokens:
            return i + 1
    return len(inputs)


def search_config(config) -> Any:
    """The AWQ options a scale search runs with: ``config``'s own for method "awq", AWQ's
    defaults otherwise (GPTQ with ``awq_scales``, whose ``first_token_weight`` is GPTQ's)."""
    from types import SimpleNamespace

    from .config import ALGORITHM_OPTIONS
    if config.method == "awq":
        return config
    opts = {k: row.default_for("awq") for k, row in ALGORITHM_OPTIONS.items() if "awq" in row.methods}
    opts["bias_correction"] = False  # the other method quantizes: no AWQ bias to score against
    return SimpleNamespace(**opts)


@torch.no_grad()
def _scale_groups(block: nn.Module, inputs: List[B.BlockInput], mods, config, n_search: int,
                  allow_input_scale: bool) -> List[_Group]:
    """The block's groups with their statistics, each group's scale searched and applied
    (see _apply_scale); g.t is each group's search time."""
    groups = _probe_groups(block, inputs[0], {r: m for r, (m, _) in mods.items()})
    _collect(block, inputs, groups, n_search, config.awq_objective == "module",
             config.first_token_weight)
    for g in groups:
        tg = time.perf_counter()
        _search_scale(block, g, mods, config, config.awq_objective)
        _apply_scale(block, g, mods, allow_input_scale, inputs[0])
        g.replays.clear()
        g.probe_in = g.probe_out = None
        g.t = time.perf_counter() - tg
    return groups


def scale_block(block: nn.Module, inputs: List[B.BlockInput],
                mods: Dict[str, Tuple[nn.Linear, Dict[str, Any]]], config) -> Dict[str, Dict[str, Any]]:
    """AWQ's scale search on one block whose layers another method quantizes afterwards
    (GPTQ with ``awq_scales``): each group's chosen scale is folded into its producer and
    the weights are left in float; a group with nothing to fold into stays unscaled (no
    input_scale). ``config``: see :func:`search_config`. Returns each layer's alpha and fold."""
    groups = _scale_groups(block, inputs, mods, config,
                           _n_search_batches(inputs, config.search_tokens), False)
    return {r: {"awq_alpha": g.alpha,
                "awq_scale": f"folded into {g.producer[1]}" if g.folded else "none"}
            for g in groups for r in g.names}


def run_awq(model: nn.Module, targets: Dict[str, Tuple[nn.Linear, Dict[str, Any]]], calib,
            config, progress: bool, sink) -> None:
    """AWQ every target, block by block; layers outside the block list (or all of them, for a
    model without one) are scaled one by one with input_scale."""
    from .gptq import _bar
    bar = _bar(len(targets), "awq", progress)
    found = B.find_block_list(model, targets)
    done = set()
    if found is not None:
        list_name, layers = found
        calls = B.capture_block_inputs(model, layers, calib)
        inputs = calls.first
        n_search = _n_search_batches(inputs, config.search_tokens)
        for bi, block in enumerate(layers):
            inputs = calls.inputs_for(bi, inputs)
            prefix = f"{list_name}.{bi}."
            mods = {n[len(prefix):]: targets[n] for n in targets if n.startswith(prefix)}
            full = {rel: prefix + rel for rel in mods}
            if mods:
                groups = _scale_groups(block, inputs, mods, config, n_search,
                                       config.max_bits_per_weight is None)
                for g in groups:
                    _finish_group(g, mods, config, full, sink, g.t)
                    if bar is not None:
                        bar.update(len(g.names))
                        bar.set_postfix_str(full[g.names[-1]][-40:])
            inputs = B.run_block(block, inputs)
            if mods:
                sink.install(list(full.values()))
                done.update(full.values())
        del inputs
    rest = {n: targets[n] for n in targets if n not in done}
    if rest:
        groups = [_Group([n], n) for n in rest]
        for g in groups:
            mod = rest[g.names[0]][0]

            def stat(m, a, o, g=g):
                _add_stats(g, a[0], config.first_token_weight)
            g.handle = mod.register_forward_hook(stat)
        try:
            with torch.no_grad():
                for kw in calib:
                    B.call_model(model, kw)
        finally:
            for g in groups:
                g.handle.remove()
        for g in groups:
            tg = time.perf_counter()
            _search_scale(model, g, rest, config, "layer")
            _apply_scale(model, g, rest, config.max_bits_per_weight is None)
            _finish_group(g, rest, config, {n: n for n in rest}, sink, time.perf_counter() - tg)
            if bar is not None:
                bar.update(1)
        sink.install(list(rest))
    if bar is not None:
        bar.close()
