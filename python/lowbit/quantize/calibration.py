"""Calibration data: what the model is run on to measure activations.

quantize_model takes ``calibration`` as an iterable of model inputs, each either a token-id
tensor ``[batch, seq]`` (or ``[seq]``) or a dict of keyword arguments for ``model(**kw)``;
:func:`normalize_calibration` turns it into a list of such dicts. :func:`calibration_from_tokens`
cuts a 1-D token stream into batches; :func:`calibration_from_text` does so for the bundled
Wikipedia text, from a slice after the one ``lowbit eval`` scores (so calibration never sees
the evaluation tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, Optional

import torch

# Defaults: 64 sequences of 512 tokens (32k tokens) in batches of 8. GPTQ / AWQ results on
# SmolLM2-135M stop improving noticeably beyond this, and it keeps whole-model GPTQ within
# minutes on 2 CPU cores.
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 8
# lowbit eval scores the first --tokens tokens of the bundled text (16k by default); the
# calibration slice starts here, far past any evaluation slice in use.
DEFAULT_TEXT_OFFSET = 262144


def normalize_calibration(calibration) -> List[Dict[str, Any]]:
    """A list of keyword-argument dicts for ``model(**kw)``.

    Accepts a token-id tensor ([batch, seq] or [seq]: one batch), or an iterable whose items
    are token-id tensors (``{"input_ids": t}``) or mappings of keyword arguments (copied).
    Raises TypeError / ValueError naming the offending item.
    """
    if calibration is None:
        raise ValueError("no calibration data given")
    if isinstance(calibration, torch.Tensor):
        items: Iterable = [calibration]
    elif isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, (str, bytes)):
        raise TypeError("calibration must be token ids or keyword-argument dicts, not text; "
                        "tokenize it first (see lowbit.quantize.calibration_from_tokens)")
    else:
        try:
            items = iter(calibration)
        except TypeError:
            raise TypeError(f"calibration must be an iterable of token-id tensors or dicts, "
                            f"got {type(calibration).__name__}") from None
    out: List[Dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            out.append({"input_ids": _token_batch(item, f"calibration[{i}]")})
        elif isinstance(item, Mapping):
            kw = dict(item)
            if not kw:
                raise ValueError(f"calibration[{i}] is an empty dict")
            bad = [k for k in kw if not isinstance(k, str)]
            if bad:
                raise TypeError(f"calibration[{i}]: keyword names must be strings, got {bad!r}")
            if isinstance(kw.get("input_ids"), torch.Tensor):
                kw["input_ids"] = _token_batch(kw["input_ids"], f"calibration[{i}]['input_ids']")
            out.append(kw)
        else:
            raise TypeError(f"calibration[{i}] must be a token-id tensor or a dict of keyword "
                            f"arguments, got {type(item).__name__}")
    if not out:
        raise ValueError("calibration data is empty")
    return out


def _token_batch(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{where}: token ids must be an integer tensor, got {t.dtype} (a bare "
                        f"tensor is passed as model(input_ids=...); for a model that takes other "
                        f"inputs, give dicts of keyword arguments, e.g. {{'x': tensor}})")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{where}: token ids must be [batch, seq] or [seq] and non-empty, "
                         f"got shape {tuple(t.shape)}")
    return t.to(torch.long)


def calibration_tokens(calib: List[Dict[str, Any]]) -> int:
    """Total tokens in normalized calibration data (batches without input_ids count 0)."""
    return sum(int(kw["input_ids"].numel()) for kw in calib
               if isinstance(kw.get("input_ids"), torch.Tensor))


def calibration_from_tokens(ids: torch.Tensor, n_samples: int = DEFAULT_SAMPLES,
                            seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH,
                            ) -> List[Dict[str, Any]]:
    """Consecutive, non-overlapping windows of ``seq_len`` tokens of the 1-D token stream
    ``ids`` (the first ``n_samples`` of them), as batches ``{"input_ids": [b, seq_len]}``."""
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError("ids must be a 1-D tensor of token ids")
    if ids.numel() < n_samples * seq_len:
        raise ValueError(f"{n_samples} samples of {seq_len} tokens need {n_samples * seq_len} "
                         f"tokens, got {ids.numel()}; lower n_samples or seq_len")
    windows = ids[:n_samples * seq_len].to(torch.long).reshape(n_samples, seq_len)
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, n_samples, batch_size)]


def calibration_from_text(tokenizer, n_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                          batch_size: int = DEFAULT_BATCH, offset: int = DEFAULT_TEXT_OFFSET,
                          text_path: Optional[str] = None) -> List[Dict[str, Any]]:
    """Calibration batches from the bundled Wikipedia text (or ``text_path``), starting at token
    ``offset``: evaluation (:func:`lowbit.evaluate.load_tokens`) reads from token 0, so
    calibration and evaluation are disjoint as long as fewer than ``offset`` tokens are scored."""
    from ..evaluate import load_tokens
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    need = n_samples * seq_len
    ids, _ = load_tokens(tokenizer, offset + need, text_path)
    if ids.numel() < offset + need:
        raise ValueError(f"the text has {ids.numel()} tokens; calibration needs tokens "
                         f"{offset}..{offset + need} (lower offset, n_samples or seq_len)")
    return calibration_from_tokens(ids[offset:], n_samples, seq_len, batch_size)
