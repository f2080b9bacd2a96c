"""LLM.int8-style outlier columns (``QuantConfig(method="llm.int8", outlier_threshold=6.0)``).

A few input features of transformer layers carry activations far larger than the rest
(LLM.int8, Dettmers et al. 2022). Here they are found once, on calibration data: input column
k of a layer is an outlier when ``max |x[..., k]|`` over every calibration token exceeds the
threshold (strictly). Its weight column stays in float with its original values, and the
rest of the weight is quantized (int8 per row by default) with those columns set to zero, so
the int8 scales are not stretched by them. The layer (a :class:`lowbit.QuantLinear` with
``outlier_cols`` / ``outlier_weight`` buffers) computes::

    y = lowbit.linear(x with the outlier columns zeroed, W_int8, bias) + x[..., cols] @ W_cols^T

No outlier column -> the plain QuantLinear, identical to RTN int8.

Why static columns and no run-time detection: lowbit quantizes weights only, so what makes
int8 lose accuracy is a weight row's scale (absmax / 127) being set by a few large
columns; keeping those columns in float removes that, and it needs the columns at
quantization time. bitsandbytes' run-time detection instead routes the activations that are
large in *this* batch through a 16-bit matmul, because its kernels quantize activations to
int8; on lowbit's exact CPU path activations stay float, so rerouting them would change
nothing, and a batch-dependent column set has data-dependent shapes (a graph break or a
recompile under torch.compile). The static split is fixed shapes and torch.compile-friendly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..nn import QuantLinear
from .blocks import call_model

DEFAULT_THRESHOLD = 6.0


@torch.no_grad()
def input_absmax(model: nn.Module, targets: Dict[str, nn.Linear], calib,
                 allow_unseen: bool = False) -> Dict[str, torch.Tensor]:
    """``max |x[..., k]|`` over all calibration tokens for every input column k of every target
    (float32 ``[in_features]``), from one forward pass of ``model`` over ``calib``. A target
    the pass never calls raises, unless ``allow_unseen`` and it is a module of ``model`` (model
    code that reads its weight instead of calling it, e.g. Mamba's dt_proj): then it is left
    out of the result."""
    from .calibration import normalize_calibration
    batches = normalize_calibration(calib)
    amax: Dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).to(torch.float32)
            prev = amax.get(name)
            # torch.maximum propagates NaN: a NaN activation makes its column's max NaN, never an
            # outlier (NaN > t is False), rather than silently ignored.
            amax[name] = m if prev is None else torch.maximum(prev, m)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        for kw in batches:
            call_model(model, kw)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    unseen = [n for n in targets if n not in amax]
    if allow_unseen:
        own = {id(m) for m in model.modules()}
        unseen = [n for n in unseen if id(targets[n]) not in own]
    if unseen:
        raise ValueError(f"layer(s) {unseen[:3]}{' ...' if len(unseen) > 3 else ''} never ran on the "
                         "calibration data, so their outlier columns can't be found; they must be "
                         "called by model(**calibration_batch)")
    return amax


def outlier_columns(absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Ascending int64 indices of the columns whose calibration ``max |x|`` exceeds
    ``threshold`` (strictly)."""
    _check_threshold(threshold)
    return torch.nonzero(absmax > threshold).flatten().to(torch.int64)


def _check_threshold(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
        raise ValueError(f"outlier_threshold must be a number >= 0 (inf: no outliers), got {t!r}")
    return float(t)


def _format_options(config) -> Dict[str, Any]:
    opts = getattr(config, "default_format", None)
    if isinstance(opts, Mapping):
        return dict(opts)
    return {"format": getattr(config, "format", "int8") or "int8",
            "group_size": getattr(config, "group_size", None),
            "symmetric": getattr(config, "symmetric", None),
            "double_quant": getattr(config, "double_quant", False)}


def quantize_with_outliers(model: nn.Module, targets: Dict[str, nn.Linear], calib,
                           config, unseen: Optional[List[str]] = None) -> Dict[str, nn.Module]:
    """A QuantLinear for every target: int8 (the config's format and options) with the input
    columns whose calibration activations exceed ``config.outlier_threshold`` (default 6.0) kept
    in float. The model is not modified; the caller installs the returned modules.

    ``targets``: name -> nn.Linear of ``model``; ``calib``: calibration batches (token-id
    tensors [batch, seq] or dicts of ``model(**kw)`` arguments). A target of the model that
    the calibration pass never calls (model code reads its weight instead) gets no outlier
    columns; its name is appended to ``unseen`` if given."""
    threshold = _check_threshold(getattr(config, "outlier_threshold", DEFAULT_THRESHOLD))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(targets, Mapping) or not targets:
        raise ValueError("targets must be a non-empty dict of name -> nn.Linear")
    for n, m in targets.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(f"target {n!r} is a {type(m).__name__}, not an nn.Linear")
    if calib is None:
        raise ValueError("LLM.int8 outlier detection needs calibration data: it finds the outlier "
                         "input columns from calibration activations")
    opts = _format_options(config)
    fmt = opts.pop("format")
    amax = input_absmax(model, dict(targets), calib, allow_unseen=True)
    out: Dict[str, nn.Module] = {}
    for name, lin in targets.items():
        if name not in amax:  # never called (its weight is read directly): no outlier columns
            out[name] = QuantLinear.from_linear(lin, fmt, **opts)
            if unseen is not None:
                unseen.append(name)
            continue
        cols = outlier_columns(amax[name], threshold).to(lin.weight.device)
        out[name] = QuantLinear.from_linear(lin, fmt, outlier_cols=cols, **opts)
    return out
