"""GPTQ: quantize each Linear column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

For a layer ``y = x W^T`` with calibration inputs X, the output error of a weight change D is
``tr(D H D^T) / 2`` with ``H = 2 X^T X / n``. GPTQ (Frantar et al., 2022) quantizes column j,
then updates the remaining columns by ``-err_j * U[j, j:] `` where U is the upper Cholesky
factor of H^-1 and ``err_j = (w_j - q_j) / U[j, j]``; updates are applied lazily per block of
columns. Group parameters (scale / zero / absmax) are chosen from the current (updated)
weights when a group is reached. With ``act_order`` columns are processed by decreasing H
diagonal, and ``act_groups`` chooses the groups: ``"order"`` (the default), groups contiguous
in that order, the order stored as the weight's ``perm`` (QuantizedWeight; 64 bits per input
feature, counted in bits per weight), or ``"input"``, the usual groups of consecutive input
features through a group map (each group's parameters fixed when its first column is reached,
from all its columns as they stand then, pending block updates included), stored without perm.

Attention sinks: the first token of every sequence carries activations far larger than the
rest, and every later token reads its key and value, so errors on it cost far more perplexity
than one token's share of H says; ``first_token_weight`` (default 512 for GPTQ) counts it that
many times in H. Act-order matters most here: the sink's large channels come first, so no
other column's error is pushed onto them. Measured on SmolLM2-135M (16 calibration sequences,
4k scored tokens, g64, RTN 26.81): plain GPTQ 28.75, act-order 25.85, act-order + sink weight
512 25.30, with groups in act order 24.77. The dampening is then taken against the plain
token mean's diagonal (``damp_ref="tokens"``), not the sink-weighted H's, whose larger
diagonal would dampen every other column too: at 16k tokens, g128, 29.52 -> 26.48.

With ``awq_scales`` each block first gets AWQ's per-channel scale search
(:func:`lowbit.quantize.awq.scale_block`, AWQ's default options), the scales folded into the
producing norm or linear (groups with nothing to fold into stay unscaled), and GPTQ then
quantizes the scaled weights with Hessians of the scaled inputs. Layers outside the model's
block list are quantized without it.

The codes are chosen with the formulas of the format's reference quantizer (its group
parameters come from :func:`lowbit.reference.quantize_weight` on the group's columns), and
the finished QuantizedWeight is checked to decode to exactly the values GPTQ worked with.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from .. import reference as R
from ..qweight import QuantizedWeight
from .config import format_kwargs


def _safe(s: torch.Tensor) -> torch.Tensor:
    """The reference's divisor for a scale that may be 0 (any value then decodes to 0)."""
    return torch.where(s == 0, torch.ones_like(s), s)


def _codebook(fmt: str) -> torch.Tensor:
    tables = getattr(R, "CODEBOOK_TABLES", None)
    if tables is not None:
        return tables[fmt]
    return R.NF4_TABLE


def _nearest_code(scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    fn = getattr(R, "nearest_code", None)
    if fn is not None:
        return fn(scaled, fmt)
    return R.nearest_nf4(scaled)


def _family(qw: QuantizedWeight) -> str:
    """Which per-column rounding rule a format variant uses (one row per family below)."""
    spec = qw.spec
    if spec.has_codebook:
        return "codebook"
    zp = getattr(qw, "zero_point", "int")
    if spec.name == "int4":
        if qw.symmetric:
            return "int4_sym"
        return "int4_float" if zp == "float" else "int4_asym"
    if spec.name == "int8":
        return "int8_sym" if qw.symmetric else "int8_asym"
    raise ValueError(f"GPTQ has no column rule for format {spec.name!r}")


def gptq_supports(options: Dict[str, Any]) -> bool:
    fmt, kw = format_kwargs(options)
    try:
        _family(R.quantize_weight(torch.zeros(1, 16), fmt, **{**kw, "group_size": -1}))
    except ValueError:
        return False
    return True


def clip_ratios(n_grid: int, max_shrink: float) -> List[float]:
    """The clip searches' grid of range ratios: 1 (the full range) down to 1 - max_shrink
    (exclusive), n_grid of them."""
    return [1.0 - max_shrink * i / n_grid for i in range(n_grid)]


def one_group_kw(kw: Dict[str, Any]) -> Dict[str, Any]:
    """quantize_weight's options ``kw`` for a slice holding one group per row (no double
    quantization: its absmax codes couple a row's groups)."""
    out = dict(kw, group_size=-1)
    out.pop("double_quant", None)
    return out


def clip_candidates(n_grid: int, max_shrink: float, asym: bool):
    """The clip searches' candidates (GPTQ's per group, AWQ's clip_search), in order, as
    ``(ratio, move_hi, move_lo)``: both ends of the range scaled by each ratio of a grid of
    n_grid in (1 - max_shrink, 1); then, for asymmetric formats, the upper end alone and the
    lower end alone over the whole grid, the other end held at its best so far (the two ends
    of a skewed group need not shrink alike). A search keeps a candidate only where it lowers
    the error, so the full range (ratio 1) is its starting point."""
    ratios = clip_ratios(n_grid, max_shrink)
    for r in ratios[1:]:
        yield r, True, True
    if asym:
        for move_hi, move_lo in ((True, False), (False, True)):
            for r in ratios:
                yield r, move_hi, move_lo


class _Groups:
    """Group parameters and per-column rounding for one weight, in the format's own formulas.

    ``set_group(g, wg)`` fixes group g's parameters from its current weights ``wg`` [N, len];
    ``column(j, w)`` rounds column j (stored order) and returns its decoded float32 values;
    ``finish(perm)`` assembles the QuantizedWeight from the chosen codes.
    """

    def __init__(self, options: Dict[str, Any], N: int, K: int, device):
        self.fmt, kw = format_kwargs(options)
        self.kw = kw
        self.group_size = F.check_group_size(F.get_format(self.fmt), kw.get("group_size"))
        self.group = F.effective_group(self.group_size, K)
        self.G = F.n_groups(self.group_size, K)
        self.N, self.K = N, K
        probe = R.quantize_weight(torch.zeros(1, 16), self.fmt, **{**kw, "group_size": -1})
        self.template = probe
        self.family = _family(probe)
        self.double_quant = bool(probe.double_quant)
        code_dtype = torch.int16  # holds every format's codes (int8's signed, 4-bit 0..15)
        self.codes = torch.zeros(N, K, dtype=code_dtype, device=device)
        self.scale: List[Optional[torch.Tensor]] = [None] * self.G
        self.zero: List[Optional[torch.Tensor]] = [None] * self.G
        self.dq: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.clip_grid, self.clip_max_shrink, self.clip_separate_ends = 1, 0.0, True
        if self.family == "codebook":
            self.table = _codebook(self.fmt).to(device)
        # Processing position j -> stored column (and so its group): the identity, or with
        # act-order over groups of input features (a group map) the input feature perm[j].
        self.store: Optional[List[int]] = None

    def use_group_map(self, perm: torch.Tensor) -> None:
        """Columns are processed in the order ``perm`` but stored (and grouped) in input
        order: position j is input feature perm[j], in group perm[j] // group_size."""
        self.store = [int(v) for v in perm.tolist()]

    def stored(self, j: int) -> int:
        return j if self.store is None else self.store[j]

    def group_of(self, j: int) -> int:
        return self.stored(j) // self.group

    def group_cols(self, g: int) -> Tuple[int, int]:
        return g * self.group, min((g + 1) * self.group, self.K)

    def _one_group_kw(self):
        return one_group_kw(self.kw)

    def set_static(self, W: torch.Tensor) -> None:
        """Fix every group's parameters from W (stored order) now (static groups; also what
        double quantization needs: its absmax codes couple all groups of a row)."""
        qw = R.quantize_weight(W, self.fmt, **self.kw)
        if self.family == "codebook":
            if qw.double_quant:
                absmax = R.decode_double_quant(qw.scales, qw.dq_scale, qw.dq_offset)
                self.dq = (qw.scales, qw.dq_scale, qw.dq_offset)
            else:
                absmax = qw.scales
            for g in range(self.G):
                self.scale[g] = absmax[:, g].clone()
        else:
            for g in range(self.G):
                self.scale[g] = qw.scales[:, g].clone()
                self.zero[g] = None if qw.zeros is None else qw.zeros[:, g].clone()
        self.static = True

    def set_group(self, g: int, wg: torch.Tensor) -> None:
        qw = R.quantize_weight(wg, self.fmt, **self._one_group_kw())
        scale = qw.scales[:, 0]
        zero = None if qw.zeros is None else qw.zeros[:, 0]
        if self.clip_grid > 1:
            scale, zero = self._clip(wg, scale, zero)
        self.scale[g] = scale.clone()
        self.zero[g] = None if zero is None else zero.clone()

    def _clip(self, wg, scale, zero):
        """Per row, the parameters of the group shrunk to a range that minimises
        sum |w - q(w)|^2.4 over the group (GPTQ's "mse" grid): both ends scaled by r (r on a
        grid down to 1 - clip_max_shrink), then, for asymmetric formats (unless
        clip_separate_ends is off), the upper and the lower end each on its own with the other
        held at its best (a skewed group's ends need not shrink alike); the rest of the algorithm then works with those parameters,
        as stored. A row keeps its current parameters unless a candidate lowers its error."""
        best_err = (wg - self.round(wg, scale[:, None], zero)[1]).abs().pow(2.4).sum(1)
        asym = self.family in ("int4_asym", "int4_float", "int8_asym")
        if asym:
            lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
        else:
            hi = wg.abs().amax(1, keepdim=True)
            lo = -hi
        r_hi = torch.ones_like(hi)
        r_lo = torch.ones_like(lo)
        for r, move_hi, move_lo in clip_candidates(self.clip_grid, self.clip_max_shrink,
                                                   asym and self.clip_separate_ends):
            c_hi = torch.full_like(r_hi, r) if move_hi else r_hi
            c_lo = torch.full_like(r_lo, r) if move_lo else r_lo
            wc = torch.maximum(torch.minimum(wg, hi * c_hi), lo * c_lo)
            qw = R.quantize_weight(wc, self.fmt, **self._one_group_kw())
            s2 = qw.scales[:, 0]
            z2 = None if qw.zeros is None else qw.zeros[:, 0]
            err = (wg - self.round(wg, s2[:, None], z2)[1]).abs().pow(2.4).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s2, scale)
            if zero is not None:
                zero = torch.where(better, z2, zero)
            r_hi = torch.where(better[:, None], c_hi, r_hi)
            r_lo = torch.where(better[:, None], c_lo, r_lo)
        return scale, zero

    def round(self, w: torch.Tensor, s: torch.Tensor, zero: Optional[torch.Tensor]):
        """(codes, decoded values) of w with scale s (and zero-point / offset) broadcast to
        it, by the format's reference rule."""
        sd = _safe(s)
        f = self.family
        if zero is not None and zero.dim() < w.dim():
            zero = zero[:, None]
        if f == "codebook":
            idx = _nearest_code(w / sd, self.fmt)
            return idx.to(torch.int16), self.table[idx.long()] * s
        if f == "int4_sym":
            q = torch.clamp(torch.round(w / sd), -8, 7)
            return (q + F.INT4_SYMMETRIC_ZERO).to(torch.int16), q * s
        if f == "int4_asym":
            z = zero.to(torch.float32)
            q = torch.clamp(torch.round(w / sd) + z, 0, 15)
            return q.to(torch.int16), (q - z) * s
        if f == "int4_float":
            q = torch.clamp(torch.round((w - zero) / sd), 0, 15)
            return q.to(torch.int16), q * s + zero
        if f == "int8_sym":
            q = torch.clamp(torch.round(w / sd), -127, 127)
            return q.to(torch.int16), q * s
        if f == "int8_asym":
            zu = zero.to(torch.float32) + 128  # stored zero is z - 128 (int16)
            qu = torch.clamp(torch.round(w / sd) + zu, 0, 255)
            return (qu - 128).to(torch.int16), (qu - zu) * s
        raise AssertionError(f)

    def column(self, j: int, w: torch.Tensor) -> torch.Tensor:
        g = self.group_of(j)
        codes, values = self.round(w, self.scale[g], self.zero[g])
        self.codes[:, self.stored(j)] = codes
        return values

    def finish(self, perm: Optional[torch.Tensor]) -> QuantizedWeight:
        t = self.template
        spec = t.spec
        if spec.packed_nibbles:
            data = R.pack_nibbles(self.codes.to(torch.uint8))
        else:
            data = self.codes.to(t.data.dtype)
        if self.dq is not None:
            scales, dq_scale, dq_offset = self.dq
        else:
            scales = torch.stack(self.scale, dim=1)
            dq_scale = dq_offset = None
        zeros = None if self.zero[0] is None else torch.stack(self.zero, dim=1)
        extra = {}
        if hasattr(t, "zero_point"):
            extra["zero_point"] = t.zero_point
        return QuantizedWeight(self.fmt, (self.N, self.K), data.contiguous(), scales.contiguous(),
                               None if zeros is None else zeros.contiguous(),
                               group_size=self.group_size, symmetric=t.symmetric,
                               double_quant=self.double_quant, dq_scale=dq_scale,
                               dq_offset=dq_offset, perm=perm, **extra)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float,
                      damp_ref: Optional[float] = None) -> Tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1 in float64, damp = damp_percent x ``damp_ref``
    (default: H's mean diagonal), raising it tenfold (up to 1.0 x) if H is not numerically
    positive definite."""
    Hd = H.to(torch.float64)
    mean_diag = float(torch.diagonal(Hd).mean()) if damp_ref is None else float(damp_ref)
    if not mean_diag > 0:
        mean_diag = float(torch.diagonal(Hd).mean())
    damp = damp_percent
    eye = torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    while True:
        L, info = torch.linalg.cholesky_ex(Hd + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U, damp
        if damp >= 1.0:
            raise RuntimeError("GPTQ: the Hessian is not positive definite even with dampening "
                               "1.0 x its mean diagonal (calibration activations degenerate?)")
        damp = min(1.0, damp * 10)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, options: Dict[str, Any], *,
                  damp_percent: float = 0.01, act_order: bool = True, block_size: int = 128,
                  static_groups: bool = False, clip_grid: int = 1, clip_max_shrink: float = 0.0,
                  clip_separate_ends: bool = True, act_groups: str = "order",
                  damp_ref: Optional[float] = None,
                  ) -> Tuple[QuantizedWeight, Dict[str, Any]]:
    """GPTQ one weight [N, K] given its Hessian H [K, K] (``2 X^T X / n``) and resolved format
    options. Returns the QuantizedWeight and details: ``out_err`` (relative output error
    tr(D H D^T) / tr(W H W^T)), ``damp``.

    With ``act_order`` the columns are processed by decreasing H diagonal, and
    ``act_groups`` says what a group is: ``"input"`` (groups of consecutive input features,
    the usual layout, through a group map: the stored weight has no ``perm``; a group's
    parameters are fixed when its first column is reached, from all its columns as they
    stand then) or ``"order"`` (groups of consecutive columns in processing order, stored
    with ``perm``).

    ``damp_ref``: what ``damp_percent`` is a fraction of (default: H's mean diagonal). With
    the first token weighted up in H, the model driver passes the plain token mean's
    diagonal, so the weight does not also raise the dampening of every other column."""
    N, K = weight.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian must be [{K}, {K}], got {tuple(H.shape)}")
    if act_groups not in ("input", "order"):
        raise ValueError(f"act_groups must be 'input' or 'order', got {act_groups!r}")
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = H.to(device=device, dtype=torch.float32).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.all()):
        H = torch.eye(K, dtype=torch.float32, device=device)
    else:
        H[dead, dead] = 1.0  # an input never active: its column's error costs nothing elsewhere
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    H_orig = H
    U64, damp = _inverse_cholesky(H, damp_percent, damp_ref)
    U = U64.to(torch.float32)
    del U64

    groups = _Groups(options, N, K, device)
    groups.clip_grid, groups.clip_max_shrink = clip_grid, clip_max_shrink
    groups.clip_separate_ends = clip_separate_ends
    group_map = perm is not None and act_groups == "input"
    pos_of = None  # stored column -> processing position (group map only)
    if group_map:
        groups.use_group_map(perm)
        pos_of = torch.argsort(perm)
    if static_groups or groups.double_quant:
        groups.set_static(weight.detach().to(torch.float32) if group_map else W)
    else:
        groups.static = False
    W0 = W.clone()
    Q = torch.empty_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if group_map and not groups.static:
                g = groups.group_of(j)
                if groups.scale[g] is None:
                    # First column of group g reached: its columns (none processed yet) as
                    # they stand now, those past this block with its pending updates.
                    a, b = groups.group_cols(g)
                    pos = pos_of[a:b]
                    inside = pos < i2
                    wg = torch.empty(N, b - a, dtype=W.dtype, device=device)
                    if bool(inside.any()):
                        wg[:, inside] = W1[:, pos[inside] - i1]
                    if not bool(inside.all()):
                        p = pos[~inside]
                        wg[:, ~inside] = W[:, p] - Err1[:, :i] @ U[i1:j][:, p]
                    groups.set_group(g, wg)
            elif not groups.static and j % groups.group == 0:
                g = groups.group_of(j)
                a, b = groups.group_cols(g)
                # The group's current weights: this block's updated columns, then (for a group
                # reaching past the block) the later ones with this block's pending updates.
                wg = W1[:, j - i1:min(b, i2) - i1]
                if b > i2:
                    later = W[:, i2:b] - Err1[:, :i] @ U[i1:j, i2:b]
                    wg = torch.cat([wg, later], dim=1)
                groups.set_group(g, wg)
            w = W1[:, i]
            q = groups.column(j, w)
            Q[:, j] = q
            err = (w - q) / U[j, j]
            W1[:, i:] -= err.unsqueeze(1) * U[j, j:i2].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if group_map:
        # Back to input order: the stored weight needs no perm.
        W0 = weight.detach().to(torch.float32)
        Q = torch.empty_like(Q).index_copy_(1, perm, Q)
        H_orig = H_orig[pos_of][:, pos_of]
        perm = None
    qw = groups.finish(perm)
    stored = R.decode(qw, torch.float32)
    if not torch.equal(stored, Q):
        raise RuntimeError("GPTQ: the packed weight does not decode to the values GPTQ chose "
                           "(a bug in lowbit.quantize.gptq; please report it)")
    D = W0 - Q
    row_err = (D @ H_orig * D).sum(1)
    row_norm = (W0 @ H_orig * W0).sum(1)
    num, den = float(row_err.sum()), float(row_norm.sum())
    info = {"out_err": num / den if den > 0 else 0.0, "damp": damp, "row_err": row_err,
            "row_norm": row_norm}
    return qw, info


def split_rows(qw: QuantizedWeight, a: int, b: int) -> QuantizedWeight:
    """Rows a..b of a QuantizedWeight (every per-row field sliced; transforms shared)."""
    def rows(t):
        return None if t is None else t[a:b].contiguous()
    extra = {"zero_point": qw.zero_point} if hasattr(qw, "zero_point") else {}
    return QuantizedWeight(qw.fmt, (b - a, qw.shape[1]), rows(qw.data), rows(qw.scales),
                           rows(qw.zeros), group_size=qw.group_size, symmetric=qw.symmetric,
                           double_quant=qw.double_quant, dq_scale=rows(qw.dq_scale),
                           dq_offset=rows(qw.dq_offset),
                           perm=None if qw.perm is None else qw.perm.clone(),
                           input_scale=None if qw.input_scale is None else qw.input_scale.clone(),
                           **extra)


class Hessian:
    """Running ``2 X^T X / n`` of a layer's inputs (float32 accumulation, rescaled per batch).

    ``first_weight``: how many tokens the first position of each sequence counts for (inputs
    shaped [..., seq, K]). Attention heads park most of their weight on that first token (the
    "attention sink"), so its keys and values, and the hidden states that produce them, matter
    far more than one token's share: plain GPTQ trades the sink's accuracy for the average
    and loses perplexity. Weighting it in the Hessian fixes that."""

    def __init__(self, K: int, device, first_weight: float = 1.0):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0.0
        self.first_weight = float(first_weight)
        self.sq_sum = 0.0  # sum of |x|^2 over all rows, unweighted
        self.rows = 0

    @property
    def plain_mean_diag(self) -> float:
        """Mean diagonal of the unweighted ``2 X^T X / n`` (every token counted once)."""
        return 2.0 * self.sq_sum / (self.rows * self.H.shape[0]) if self.rows else 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        K = x.shape[-1]
        rows = x.reshape(-1, K).to(torch.float32)
        m = float(rows.shape[0])
        if m == 0:
            return
        x0 = None
        if self.first_weight != 1.0 and x.dim() >= 3 and x.shape[-2] > 1:
            x0 = x[..., 0, :].reshape(-1, K).to(torch.float32)
            m += (self.first_weight - 1.0) * x0.shape[0]
        self.sq_sum += float(rows.double().pow(2).sum())
        self.rows += rows.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H.addmm_(rows.t(), rows, alpha=2.0 / self.n)
        if x0 is not None:
            self.H.addmm_(x0.t(), x0, alpha=2.0 * (self.first_weight - 1.0) / self.n)


# ---- the model-level driver ---------------------------------------------------------------
def run_gptq(model: nn.Module, targets: Dict[str, Tuple[nn.Linear, Dict[str, Any]]], calib,
             config, progress: bool, sink) -> None:
    """GPTQ every target, block by block (see :mod:`lowbit.quantize.blocks`). Each finished
    layer goes to ``sink.add(name, qw, seconds, info)``; ``sink.install(names)`` swaps them
    into the model once nothing reads their float weights any more."""
    from . import blocks as B

    opts = dict(damp_percent=config.damp_percent, act_order=config.act_order,
                block_size=config.block_size, static_groups=config.static_groups,
                clip_grid=config.clip_grid if config.clip_search else 1,
                clip_max_shrink=config.clip_max_shrink,
                clip_separate_ends=config.clip_separate_ends, act_groups=config.act_groups)
    for name, (_, fmt) in targets.items():
        if not gptq_supports(fmt):
            raise ValueError(f"GPTQ cannot quantize {name!r} to {fmt['format']!r}")
    bar = _bar(len(targets), "gptq", progress)
    found = B.find_block_list(model, targets)
    done = set()

    awq_info: Dict[str, Dict[str, Any]] = {}

    def quantize_group(mods: Dict[str, Tuple[nn.Linear, Dict[str, Any]]], H: Hessian, full_names):
        # Layers reading the same input share H, and GPTQ treats rows independently: layers
        # with the same format run as one stacked weight (one column loop instead of several).
        by_fmt: Dict[Tuple, List[str]] = {}
        for rel, (mod, fmt) in mods.items():
            key = (tuple(sorted(fmt.items())), mod.weight.dtype, mod.weight.device)
            by_fmt.setdefault(key, []).append(rel)
        for rels in by_fmt.values():
            t0 = time.perf_counter()
            fmt = mods[rels[0]][1]
            W = torch.cat([mods[r][0].weight.detach().to(torch.float32) for r in rels])
            if H.n == 0:
                from ..ops import quantize_weight
                f, kw = format_kwargs(fmt)
                qw = quantize_weight(W, f, **kw)
                info = {"note": "never called on calibration data: rtn"}
            else:
                qw, info = gptq_quantize(W, H.H, fmt, damp_ref=H.plain_mean_diag if
                                         config.damp_ref == "tokens" else None, **opts)
            row_num, row_den = info.pop("row_err", None), info.pop("row_norm", None)
            secs = (time.perf_counter() - t0) / len(rels)
            a = 0
            for rel in rels:
                mod = mods[rel][0]
                b = a + mod.out_features
                part = split_rows(qw, a, b) if len(rels) > 1 else qw
                linfo = dict(info)
                linfo.update(awq_info.get(full_names[rel], {}))
                if row_num is not None:
                    den = float(row_den[a:b].sum())
                    linfo["out_err"] = float(row_num[a:b].sum()) / den if den > 0 else 0.0
                # Later passes through this block see the quantized weight (exactly its values).
                with torch.no_grad():
                    mod.weight.copy_(R.dequantize(part, torch.float32).to(mod.weight.dtype))
                linfo["weights"] = part.shape[0] * part.shape[1]
                sink.add(full_names[rel], part, secs, linfo)
                if bar is not None:
                    bar.set_postfix_str(full_names[rel][-40:])
                    bar.update(1)
                a = b

    if found is not None:
        list_name, layers = found
        calls = B.capture_block_inputs(model, layers, calib)
        inputs = calls.first
        for bi, block in enumerate(layers):
            inputs = calls.inputs_for(bi, inputs)
            prefix = f"{list_name}.{bi}."
            mine = {n[len(prefix):]: targets[n] for n in targets if n.startswith(prefix)}
            full = {rel: prefix + rel for rel in mine}
            if mine and config.awq_scales:
                from .awq import scale_block, search_config
                got = scale_block(block, inputs, mine, search_config(config))
                awq_info.update({full[r]: v for r, v in got.items()})
            if mine:
                groups = B.linear_groups(block, inputs[0], {r: m for r, (m, _) in mine.items()})
                if config.true_sequential:
                    for grp in groups:
                        # The group shares one input: the pass stops as grp[0] is called.
                        Hs = _collect(block, inputs, [grp], mine, stop_before=grp[0],
                                      first_weight=config.first_token_weight)
                        quantize_group({r: mine[r] for r in grp}, Hs[0], full)
                else:
                    Hs = _collect(block, inputs, groups, mine,
                                  first_weight=config.first_token_weight)
                    for grp, H in zip(groups, Hs):
                        quantize_group({r: mine[r] for r in grp}, H, full)
            inputs = B.run_block(block, inputs)
            sink.install([full[rel] for rel in mine])
            done.update(full.values())
        del inputs
    rest = {n: targets[n] for n in targets if n not in done}
    if rest:
        # Layers outside the block list (or every layer, for a model without one): one pass of
        # the whole (partly quantized) model with hooks, then GPTQ each.
        hs = {n: Hessian(m.in_features, m.weight.device, config.first_token_weight)
              for n, (m, _) in rest.items()}
        handles = [m.register_forward_hook(lambda mod, a, o, n=n: hs[n].add(a[0]))
                   for n, (m, _) in rest.items()]
        try:
            with torch.no_grad():
                for kw in calib:
                    B.call_model(model, kw)
        finally:
            for h in handles:
                h.remove()
        for n, (m, fmt) in rest.items():
            quantize_group({n: (m, fmt)}, hs[n], {n: n})
        sink.install(list(rest))
    if bar is not None:
        bar.close()


@torch.no_grad()
def _collect(block, inputs, groups: List[List[str]], mine, stop_before: Optional[str] = None,
             first_weight: float = 1.0) -> List[Hessian]:
    """One Hessian per group (its members share the input: the first one's is used), from a
    pass over every batch (cut short as ``stop_before`` is called)."""
    from . import blocks as B
    first = {grp[0]: i for i, grp in enumerate(groups)}
    Hs = [Hessian(mine[grp[0]][0].in_features, mine[grp[0]][0].weight.device, first_weight)
          for grp in groups]
    hooked = {grp[0]: mine[grp[0]][0] for grp in groups}

    def fn(name, x, b):
        i = first.get(name)
        if i is not None:
            Hs[i].add(x)

    B.run_hooked(block, inputs, hooked, fn, stop_before=stop_before)
    return Hs


def _bar(total: int, desc: str, progress: bool):
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="layer", leave=False)
