"""bitsandbytes checkpoints (as transformers saves them: "bitsandbytes" quantization_config)
-> lowbit, mapped exactly.

4-bit (NF4 / FP4, ``Linear4bit``), per layer ``p`` of shape ``[N, K]``:

* ``p.weight``: the codes of the flattened ``[N * K]`` weight, two per byte, element ``2j`` in
  the HIGH nibble of byte ``j`` and ``2j + 1`` in the low one (bitsandbytes' order; lowbit's is
  the reverse, so nibbles are swapped), stored as uint8 ``[N * K / 2, 1]`` or another
  ``quant_storage`` dtype viewing the same bytes;
* ``p.weight.absmax``: float32, one per block of ``blocksize`` consecutive elements of the
  flattened weight, or, with double quantization (``compress_statistics``), uint8 codes of
  ``absmax - offset`` with ``p.weight.nested_absmax`` (float32, one per 256 codes) and
  ``p.weight.nested_quant_map`` (256 float32, bitsandbytes' dynamic map);
* ``p.weight.quant_map``: the 16 code values; ``p.weight.quant_state.bitsandbytes__nf4`` (or
  ``__fp4``): uint8 bytes of a JSON dict (quant_type, blocksize, dtype, shape, nested_blocksize,
  nested_dtype, nested_offset);
* decode: ``w = quant_map[q] * absmax`` in float32, then cast to ``dtype``, where with double
  quantization ``absmax = nested_quant_map[c] * nested_absmax[i // 256] + offset`` (float32: a
  product, then a sum).

Mapping: lowbit ``nf4`` / ``fp4`` with ``group_size = blocksize`` and float32 absmax. Blocks must
not straddle rows (``K % blocksize == 0``). A double-quantized checkpoint's absmax values are
decoded to the exact float32 values bitsandbytes multiplies by (decoding the statistics, not
re-quantizing any weight): bitsandbytes' double quantization (dynamic-map codes + one offset,
blocks of 256 over the flattened absmax) is not lowbit's (linear codes with a scale and offset
per 256 blocks of a row), so the weight is stored with plain float32 absmax (0.5 bit per
weight more at block 64 than the checkpoint).

8-bit (LLM.int8 ``Linear8bitLt``): ``p.weight`` int8 ``[N, K]`` and ``p.SCB`` float32 ``[N]``
(row absmax); bitsandbytes decodes ``(q * SCB) * (1/127)`` in float32. lowbit int8 per row with
scale ``SCB * (1/127)`` (one float32 rounding) holds the codes exactly; its dequantized values
are bitsandbytes' within one float32 ulp (bitsandbytes rounds twice, a single per-row scale can
round only once: no lowbit format reproduces the double rounding).

Not supported (UnsupportedCheckpoint naming it): blocks straddling rows, custom quant maps,
8-bit weights in a tiled layout (``weight_format`` other than "row").
"""

from __future__ import annotations

import json
from typing import Dict, Mapping, Optional, Tuple

import torch

from .. import formats as F
from ..qweight import QuantizedWeight
from ._common import (UnsupportedCheckpoint, build_model, checkpoint_folder, open_tensors,
                      quantization_config)
from .gptq import _hf_config

QS_KEY = ".quant_state.bitsandbytes__"
# float32 1/127 as bitsandbytes writes it (int8_vectorwise_dequant multiplies by this)
INV_127 = 7.874015718698502e-3
# Suffixes of the tensors a bitsandbytes layer owns (besides its bias).
FOUR_BIT_SUFFIXES = (".weight", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                     ".weight.nested_quant_map")


def unpack_quant_state(t: torch.Tensor) -> dict:
    """The uint8 tensor of JSON bytes bitsandbytes stores as ``quant_state.bitsandbytes__*``."""
    return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))


def decode_absmax(absmax: torch.Tensor, state: dict, nested_absmax: Optional[torch.Tensor],
                  nested_quant_map: Optional[torch.Tensor]) -> torch.Tensor:
    """The float32 absmax of every block, as bitsandbytes' dequantize_4bit computes it."""
    if nested_absmax is None:
        return absmax.reshape(-1).to(torch.float32)
    nb = int(state.get("nested_blocksize", 256))
    codes = absmax.reshape(-1).to(torch.int64)
    scale = nested_absmax.reshape(-1).to(torch.float32)
    block = torch.arange(codes.numel()) // nb
    if scale.numel() != -(-codes.numel() // nb):
        raise ValueError(f"bitsandbytes nested_absmax has {scale.numel()} values for "
                         f"{codes.numel()} codes in blocks of {nb}")
    a = nested_quant_map.reshape(-1).to(torch.float32)[codes] * scale[block]
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    return a + offset


def bnb_4bit_layer(weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                   state: dict, nested_absmax: Optional[torch.Tensor] = None,
                   nested_quant_map: Optional[torch.Tensor] = None,
                   name: str = "") -> QuantizedWeight:
    """One bitsandbytes 4-bit layer (module docstring) -> nf4 / fp4 QuantizedWeight."""
    what = f"bitsandbytes layer {name!r}" if name else "bitsandbytes layer"
    qtype = state.get("quant_type")
    if qtype not in F.CODEBOOKS:
        raise UnsupportedCheckpoint(f"{what}: quant_type {qtype!r} is not supported (nf4, fp4)")
    shape = state.get("shape")
    if shape is None or len(shape) != 2:
        raise UnsupportedCheckpoint(f"{what}: only 2-D (linear) weights are supported, shape {shape}")
    N, K = int(shape[0]), int(shape[1])
    B = int(state["blocksize"])
    if K % B:
        raise UnsupportedCheckpoint(f"{what}: blocksize {B} does not divide in_features {K}, so "
                                    "bitsandbytes' blocks (over the flattened weight) straddle rows; "
                                    "lowbit's blocks run within a row")
    table = torch.tensor(F.CODEBOOKS[qtype], dtype=torch.float32)
    if not torch.equal(quant_map.reshape(-1).to(torch.float32), table):
        raise UnsupportedCheckpoint(f"{what}: its quant_map is not bitsandbytes' standard {qtype} "
                                    "table; custom code maps are not supported")
    raw = weight.contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() != N * K // 2:
        raise ValueError(f"{what}: {raw.numel()} code bytes for a [{N}, {K}] weight")
    swapped = ((raw & 0x0F) << 4) | (raw >> 4)  # bnb: element 2j high nibble; lowbit: low
    a = decode_absmax(absmax, state, nested_absmax, nested_quant_map)
    if a.numel() != N * K // B:
        raise ValueError(f"{what}: {a.numel()} absmax values for {N * K // B} blocks")
    try:
        F.check_group_size(F.get_format(qtype), B)
    except ValueError as e:
        raise UnsupportedCheckpoint(f"{what}: {e}") from None
    return QuantizedWeight(qtype, (N, K), swapped.reshape(N, K // 2).contiguous(),
                           a.reshape(N, K // B).contiguous(), group_size=B)


def bnb_int8_layer(weight: torch.Tensor, scb: torch.Tensor, weight_format=None,
                   name: str = "") -> QuantizedWeight:
    """One LLM.int8 layer (int8 weight + SCB row absmax) -> int8 per-row QuantizedWeight."""
    what = f"bitsandbytes int8 layer {name!r}" if name else "bitsandbytes int8 layer"
    if weight_format is not None:
        fmt = int(weight_format.reshape(-1)[0]) if isinstance(weight_format, torch.Tensor) \
            else weight_format
        if fmt not in (0, "row"):
            raise UnsupportedCheckpoint(f"{what}: weight_format {fmt!r} (a GPU tile layout) is not "
                                        "supported; only the row-major 'row' layout")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise UnsupportedCheckpoint(f"{what}: expected an int8 [N, K] weight, got "
                                    f"{weight.dtype} {list(weight.shape)}")
    N, K = weight.shape
    scb = scb.reshape(-1).to(torch.float32)
    if scb.numel() != N:
        raise ValueError(f"{what}: SCB has {scb.numel()} values for {N} rows")
    scale = (scb * INV_127).reshape(N, 1)
    return QuantizedWeight("int8", (N, K), weight.contiguous(), scale, group_size=-1)


def _layers(tensors: Mapping) -> Dict[str, Tuple[QuantizedWeight, Tuple[str, ...]]]:
    """module name -> (QuantizedWeight, the checkpoint keys it came from)."""
    out = {}
    for key in tensors:
        if QS_KEY in key:
            p = key[: key.index(QS_KEY)]
            if not p.endswith(".weight"):
                continue
            p = p[: -len(".weight")]
            state = unpack_quant_state(tensors[key])

            def get(suffix):
                k = p + suffix
                return tensors[k] if k in tensors else None

            if get(".weight") is None or get(".weight.absmax") is None or get(".weight.quant_map") is None:
                raise ValueError(f"bitsandbytes layer {p!r} lacks weight / absmax / quant_map")
            nested = get(".weight.nested_absmax")
            if nested is not None and (get(".weight.nested_quant_map") is None
                                       or "nested_offset" not in state):
                raise ValueError(f"bitsandbytes layer {p!r}: double-quantized statistics incomplete")
            qw = bnb_4bit_layer(get(".weight"), get(".weight.absmax"), get(".weight.quant_map"),
                                state, nested, get(".weight.nested_quant_map"), name=p)
            out[p] = (qw, tuple(p + s for s in FOUR_BIT_SUFFIXES) + (key,))
        elif key.endswith(".SCB"):
            p = key[: -len(".SCB")]
            if p + ".weight" not in tensors:
                raise ValueError(f"bitsandbytes int8 layer {p!r} has SCB but no weight")
            wf = tensors[p + ".weight_format"] if p + ".weight_format" in tensors else None
            qw = bnb_int8_layer(tensors[p + ".weight"], tensors[key], wf, name=p)
            out[p] = (qw, (p + ".weight", key, p + ".weight_format"))
    return out


def load_bnb(source, *, as_model: Optional[bool] = None, dtype: torch.dtype = torch.float32):
    """Load a bitsandbytes (4-bit NF4 / FP4 or LLM.int8) checkpoint exactly.

    ``source``: a transformers folder saved from a bitsandbytes-quantized model, a weight file,
    or a name -> tensor mapping (a ``state_dict()`` of a bitsandbytes model works). Returns a
    ready transformers model with QuantLinear layers when the folder has a ``config.json``
    (``as_model`` defaults to that), else a dict module name -> QuantizedWeight.
    """
    folder = checkpoint_folder(source)
    cfg_json, qcfg = quantization_config(folder)
    if qcfg is not None and str(qcfg.get("quant_method", "bitsandbytes")).lower() != "bitsandbytes":
        raise UnsupportedCheckpoint(f"not a bitsandbytes checkpoint (quant_method="
                                    f"{qcfg.get('quant_method')!r})")
    tensors = open_tensors(source)
    found = _layers(tensors)
    if not found:
        raise ValueError("no bitsandbytes layers (no '<module>.weight.quant_state.bitsandbytes__*' "
                         "or '<module>.SCB' tensors) in the checkpoint")
    if as_model is None:
        as_model = cfg_json is not None
    if not as_model:
        return {p: qw for p, (qw, _) in found.items()}
    if cfg_json is None:
        raise ValueError("as_model=True needs a folder with the model's config.json")
    skip = {k for _, keys in found.values() for k in keys}
    layers = {p: (qw, tensors[p + ".bias"] if p + ".bias" in tensors else None)
              for p, (qw, _) in found.items()}
    skip |= {p + ".bias" for p in layers}
    floats = {k: tensors[k] for k in tensors if k not in skip}
    return build_model(_hf_config(folder), layers, floats, dtype, source="bitsandbytes checkpoint")
