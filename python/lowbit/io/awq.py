"""AWQ checkpoints (AutoAWQ / llm-awq "GEMM" layout, transformers' "awq" quantization_config)
-> lowbit int4, exactly.

Layout of one AWQ GEMM linear layer ``[N, K] = [out_features, in_features]``, 4 bits,
``G = K / group_size`` groups, as AutoAWQ's GEMM packer writes it:

* ``qweight`` int32 ``[K, N / 8]``: word ``[k, c]`` holds the codes of outputs ``8c .. 8c + 7``
  of input feature ``k``; nibble ``i`` (bits ``[4i, 4i + 4)``) holds output ``8c + AWQ_ORDER[i]``
  with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (the order AWQ's CUDA kernel unpacks in);
* ``qzeros`` int32 ``[G, N / 8]``: the integer zero-points, packed the same way;
* ``scales`` float16 ``[G, N]``;
* decode: ``w[n, k] = (q[k, n] - z[k // group_size, n]) * scales[k // group_size, n]`` (float16 in
  AutoAWQ; the float32 product lowbit computes is exact and rounds to that value).

Mapping: int4 with integer zero-points (symmetric when every zero is 8), the group size kept;
codes, zeros and scales are copied. Not supported (UnsupportedCheckpoint naming it): the GEMV /
GEMV-fast, Marlin, exllama and IPEX layouts (repacked for their kernels), bit widths other
than 4, checkpoints without zero-points.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch

from .. import formats as F
from .. import reference
from ..qweight import QuantizedWeight
from ._common import (UnsupportedCheckpoint, build_model, checkpoint_folder, layer_prefixes,
                      open_tensors, quantization_config, read_json, unpack_int32)
from .gptq import _hf_config

# Nibble i of an AWQ word holds column 8c + AWQ_ORDER[i] (AutoAWQ's GEMM pack order).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LAYER_TENSORS = ("qweight", "qzeros", "scales", "bias")


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [R, N / 8] -> codes [R, N] in output order (undoes AWQ_ORDER)."""
    phys = unpack_int32(packed, 4, dim=1)  # position 8c + i = nibble i of word c
    n = phys.shape[1]
    order = torch.tensor(AWQ_ORDER, dtype=torch.int64)
    # output column 8c + AWQ_ORDER[i] comes from position 8c + i
    src = torch.empty(n, dtype=torch.int64)
    base = torch.arange(0, n, 8, dtype=torch.int64)[:, None]
    src[(base + order).reshape(-1)] = (base + torch.arange(8)).reshape(-1)
    return phys.index_select(1, src)


def awq_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
              group_size: int, name: str = "") -> QuantizedWeight:
    """One AWQ GEMM layer's tensors (module docstring) -> the QuantizedWeight with the same
    dequantized values."""
    what = f"AWQ layer {name!r}" if name else "AWQ layer"
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"{what}: qweight, qzeros and scales must be 2-D")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G = scales.shape[0]
    if tuple(scales.shape) != (G, N) or tuple(qzeros.shape) != (G, N // 8):
        raise ValueError(f"{what}: inconsistent shapes qweight {list(qweight.shape)}, qzeros "
                         f"{list(qzeros.shape)}, scales {list(scales.shape)} (expected the GEMM "
                         "layout: qweight [K, N/8], qzeros [K/group, N/8], scales [K/group, N])")
    gs = K if group_size in (-1, None) or group_size >= K else group_size
    if G != math.ceil(K / gs):
        raise ValueError(f"{what}: {G} scale rows, but in_features {K} with group_size "
                         f"{group_size} gives {math.ceil(K / gs)} groups")
    lowbit_group = -1 if gs == K else gs
    if lowbit_group != -1:
        try:
            F.check_group_size(F.INT4, lowbit_group)
        except ValueError as e:
            raise UnsupportedCheckpoint(f"{what}: {e}") from None
    codes = _awq_columns(qweight).t().contiguous()  # [N, K]
    zeros = _awq_columns(qzeros).t().contiguous()  # [N, G]
    s = scales.to(torch.float32).t().contiguous()
    packed = reference.pack_nibbles(codes.to(torch.uint8))
    if bool((zeros == F.INT4_SYMMETRIC_ZERO).all()):
        return QuantizedWeight("int4", (N, K), packed, s, group_size=lowbit_group, symmetric=True)
    return QuantizedWeight("int4", (N, K), packed, s, zeros.to(torch.uint8),
                           group_size=lowbit_group, symmetric=False)


def _settings(qcfg: Optional[dict], group_size: Optional[int]) -> int:
    qcfg = dict(qcfg or {})
    method = str(qcfg.get("quant_method", "awq")).lower()
    if method != "awq":
        raise UnsupportedCheckpoint(f"not an AWQ checkpoint (quant_method={method!r})")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedCheckpoint(f"AWQ version {version!r} is not supported: lowbit reads the "
                                    "GEMM layout (GEMV / GEMV-fast / Marlin / exllama / IPEX "
                                    "checkpoints are repacked for their kernels)")
    bits = qcfg.get("bits", qcfg.get("w_bit", 4))
    if bits != 4:
        raise UnsupportedCheckpoint(f"{bits}-bit AWQ is not supported (AWQ GEMM is 4-bit)")
    if qcfg.get("zero_point") is False:
        raise UnsupportedCheckpoint("AWQ zero_point=false checkpoints are not supported (AutoAWQ's "
                                    "GEMM packer requires zero-points)")
    if group_size is None:
        group_size = qcfg.get("group_size", qcfg.get("q_group_size"))
    if group_size is None:
        raise ValueError("AWQ: group_size unknown (no quantization config); pass group_size=")
    return int(group_size)


def load_awq(source, *, group_size: Optional[int] = None, as_model: Optional[bool] = None,
             dtype: torch.dtype = torch.float32):
    """Load an AWQ (GEMM) checkpoint exactly.

    ``source``: a transformers folder (``config.json`` with an "awq" quantization_config) or an
    AutoAWQ folder (``quant_config.json``), a weight file, or a name -> tensor mapping
    (``group_size`` then required). Returns a ready transformers model with QuantLinear layers
    when the folder has a ``config.json`` (``as_model`` defaults to that), else a dict module
    name -> QuantizedWeight.
    """
    folder = checkpoint_folder(source)
    cfg_json, qcfg = quantization_config(folder)
    if qcfg is None and folder is not None:
        qcfg = read_json(os.path.join(folder, "quant_config.json"))
    group_size = _settings(qcfg, group_size)
    tensors = open_tensors(source)
    prefixes = layer_prefixes(tensors, ".qweight")
    if not prefixes:
        raise ValueError("no AWQ layers (no '<module>.qweight' tensors) in the checkpoint")
    layers: Dict[str, Tuple[QuantizedWeight, Optional[torch.Tensor]]] = {}
    for p in prefixes:
        if f"{p}.qzeros" not in tensors:
            raise UnsupportedCheckpoint(f"AWQ layer {p!r} has no qzeros (zero_point=false); not "
                                        "supported")
        if f"{p}.scales" not in tensors:
            raise ValueError(f"AWQ layer {p!r} lacks its 'scales' tensor")
        qw = awq_layer(tensors[f"{p}.qweight"], tensors[f"{p}.qzeros"], tensors[f"{p}.scales"],
                       group_size=group_size, name=p)
        layers[p] = (qw, tensors[f"{p}.bias"] if f"{p}.bias" in tensors else None)
    if as_model is None:
        as_model = cfg_json is not None
    if not as_model:
        return {p: qw for p, (qw, _) in layers.items()}
    if cfg_json is None:
        raise ValueError("as_model=True needs a folder with the model's config.json")
    skip = {f"{p}.{t}" for p in layers for t in LAYER_TENSORS}
    floats = {k: tensors[k] for k in tensors if k not in skip}
    return build_model(_hf_config(folder), layers, floats, dtype, source="AWQ checkpoint")
