"""``lowbit.load_checkpoint``: detect which tool wrote a quantized checkpoint and load it exactly.

Detection (``format="auto"``), first match wins:

1. a file starting with the GGUF magic (or a folder holding exactly one ``.gguf`` file) -> GGUF;
2. the folder's ``config.json`` ``quantization_config.quant_method``: "gptq", "awq",
   "bitsandbytes" (others, e.g. "fp8", "compressed-tensors", "hqq", "exl2", are refused by name);
3. AutoGPTQ's ``quantize_config.json`` -> GPTQ, AutoAWQ's ``quant_config.json`` -> AWQ;
4. the tensor names and shapes: ``*.quant_state.bitsandbytes__*`` or ``*.SCB`` ->
   bitsandbytes; ``*.qweight`` with ``scales`` as wide as qweight (or a ``g_idx``) -> GPTQ,
   with ``scales`` 8x wider than qweight -> AWQ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

from ._common import (UnsupportedCheckpoint, checkpoint_folder, open_tensors, quantization_config,
                      read_json)

FORMAT_NAMES = {"gptq": "gptq", "awq": "awq", "bnb": "bnb", "bitsandbytes": "bnb", "gguf": "gguf"}


def _is_gguf_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _from_tensors(tensors: Mapping) -> Optional[str]:
    keys = list(tensors.keys())
    if any(".quant_state.bitsandbytes__" in k or k.endswith(".SCB") for k in keys):
        return "bnb"
    qweights = [k for k in keys if k.endswith(".qweight")]
    if not qweights:
        return None
    p = qweights[0][: -len(".qweight")]
    if f"{p}.g_idx" in tensors:
        return "gptq"
    if f"{p}.scales" in tensors:
        qw, sc = tensors[qweights[0]], tensors[f"{p}.scales"]
        if qw.dim() == 2 and sc.dim() == 2:
            if sc.shape[1] == qw.shape[1]:
                return "gptq"
            if sc.shape[1] == qw.shape[1] * 8:
                return "awq"
    return None


def detect_format(source) -> str:
    """'gptq', 'awq', 'bnb' or 'gguf' for a checkpoint path (file or folder) or a name ->
    tensor mapping; ValueError / UnsupportedCheckpoint saying why when it is none of them."""
    if not isinstance(source, Mapping):
        path = os.fspath(source)
        if os.path.isfile(path) and _is_gguf_file(path):
            return "gguf"
        if os.path.isdir(path):
            ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
            has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
            if len(ggufs) == 1 and not has_weights:
                return "gguf"
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"no such checkpoint file or folder: {path!r}")
        folder = checkpoint_folder(source)
        _, qcfg = quantization_config(folder)
        if qcfg is not None:
            method = str(qcfg.get("quant_method", "")).lower()
            if method in ("gptq", "awq", "bitsandbytes"):
                return FORMAT_NAMES[method]
            raise UnsupportedCheckpoint(
                f"quantization method {method!r} (config.json quantization_config) is not "
                "supported; lowbit imports GPTQ, AWQ, bitsandbytes and GGUF checkpoints")
        if read_json(os.path.join(folder, "quantize_config.json")) is not None:
            q = read_json(os.path.join(folder, "quantize_config.json"))
            return "awq" if str(q.get("quant_method", "gptq")).lower() == "awq" else "gptq"
        if read_json(os.path.join(folder, "quant_config.json")) is not None:
            return "awq"
    fmt = _from_tensors(open_tensors(source))
    if fmt is None:
        raise ValueError("could not recognise the checkpoint as GPTQ, AWQ, bitsandbytes or GGUF "
                         "(no quantization config and no known tensor names); pass format=")
    return fmt


def load_checkpoint(path, format: str = "auto", **options):
    """Load another tool's quantized checkpoint onto lowbit formats, exactly (codes and scales
    mapped, never dequantized and re-quantized).

    ``path``: a GGUF file, a checkpoint folder (transformers, AutoGPTQ, AutoAWQ), a weight file,
    or a name -> tensor mapping. ``format``: "auto" (see :func:`detect_format`), "gptq", "awq",
    "bnb" (or "bitsandbytes"), "gguf". ``options`` go to the loader (:func:`~lowbit.io.load_gptq`,
    :func:`~lowbit.io.load_awq`, :func:`~lowbit.io.load_bnb`, :func:`~lowbit.io.load_gguf`):
    e.g. ``as_model``, ``dtype``, GPTQ's ``checkpoint_format``.

    Returns a ready transformers model whose linear layers are :class:`~lowbit.QuantLinear` when
    the checkpoint carries its architecture (a folder with ``config.json``, or a GGUF file), else
    a dict module name -> :class:`~lowbit.QuantizedWeight`. Unsupported variants raise
    :class:`~lowbit.io._common.UnsupportedCheckpoint` (a ValueError) naming the variant.
    """
    if not isinstance(format, str) or (format != "auto" and format.lower() not in FORMAT_NAMES):
        raise ValueError(f"format must be 'auto' or one of {sorted(FORMAT_NAMES)}, got {format!r}")
    fmt = detect_format(path) if format == "auto" else FORMAT_NAMES[format.lower()]
    if fmt == "gguf":
        from .gguf import load_gguf
        if not isinstance(path, Mapping) and os.path.isdir(os.fspath(path)):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) != 1:
                raise ValueError(f"{path}: expected one .gguf file, found {len(ggufs)}")
            path = os.path.join(path, ggufs[0])
        return load_gguf(path, **options)
    if fmt == "gptq":
        from .gptq import load_gptq
        return load_gptq(path, **options)
    if fmt == "awq":
        from .awq import load_awq
        return load_awq(path, **options)
    from .bnb import load_bnb
    return load_bnb(path, **options)
