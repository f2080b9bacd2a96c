"""GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers' "gptq" quantization_config) <-> lowbit.

Layout of one GPTQ linear layer ``[N, K] = [out_features, in_features]``, ``b`` bits (4 or 8),
``G`` groups (``ceil(K / group_size)``, 1 for group_size -1), as the tools' packers write it:

* ``qweight`` int32 ``[K * b / 32, N]``: word ``[r, n]`` holds the codes of input features
  ``r * 32/b + j`` (j = 0, 1, ...) of output ``n``, code j in bits ``[b*j, b*(j+1))``;
* ``qzeros`` int32 ``[G, N * b / 32]``: word ``[g, c]`` holds the zero-points of outputs
  ``c * 32/b + j``, same bit order. Format v1 (``checkpoint_format`` "gptq", AutoGPTQ's and
  GPTQModel's default) stores ``z - 1`` per code, v2 ("gptq_v2") stores ``z``;
* ``scales`` float16 ``[G, N]``;
* ``g_idx`` int32 ``[K]``: the group of each input feature (act-order / ``desc_act``
  checkpoints permute it; otherwise ``k // group_size``);
* decode: ``w[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``, computed by the tools
  in float16: ``q - z`` is a small integer, so the float32 product lowbit computes is exact and
  rounds to the tools' float16 value.

Mapping (codes and scales copied, never recomputed): 4-bit -> int4 (symmetric when every zero is
8, else integer zero-points), 8-bit -> int8 groups (``q - 128``, zero ``z - 128``; symmetric
when every zero is 128). A g_idx that is not ``k // group_size`` becomes lowbit's ``perm``
(columns sorted by group). A v1 4-bit checkpoint whose stored zero nibble is 15 decodes (per
nibble, as AutoGPTQ's kernels do) to zero 16, outside int4's 0..15: such layers are held as
int8 groups, still exact (GPTQModel's v1->v2 conversion instead adds 0x11111111 to the packed
word, which carries into the next nibble; the two tools disagree there, lowbit follows the
per-nibble definition).

Not supported (UnsupportedCheckpoint naming it): 2-, 3-bit; Marlin, BitBLAS, QQQ, exllama-repacked
layouts; pack dtypes other than int32; GPTQModel ``dynamic`` per-module overrides; a g_idx whose
groups are not all ``group_size`` long.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .. import formats as F
from .. import reference
from ..qweight import QuantizedWeight
from ._common import (UnsupportedCheckpoint, build_model, checkpoint_folder, group_index_from_perm,
                      layer_prefixes, open_tensors, pack_int32, perm_from_group_index,
                      quantization_config, read_json, require_float16, unpack_int32)

FORMATS = {"gptq": 1, "gptq_v1": 1, "gptq_v2": 2}
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _format_version(fmt) -> int:
    if fmt not in FORMATS:
        raise UnsupportedCheckpoint(
            f"GPTQ checkpoint_format {fmt!r} is not supported: lowbit reads 'gptq' (v1) and "
            "'gptq_v2'; Marlin / BitBLAS / QQQ / exllama layouts are repacked for their kernels "
            "(load the original GPTQ checkpoint instead)")
    return FORMATS[fmt]


def gptq_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: Optional[torch.Tensor] = None, *, bits: int, group_size: int,
               checkpoint_format: str = "gptq_v2", name: str = "") -> QuantizedWeight:
    """One GPTQ layer's tensors (module docstring) -> the QuantizedWeight with the same
    dequantized values."""
    what = f"GPTQ layer {name!r}" if name else "GPTQ layer"
    version = _format_version(checkpoint_format)
    if bits not in (4, 8):
        raise UnsupportedCheckpoint(f"{what}: {bits}-bit GPTQ is not supported (lowbit maps 4- "
                                    "and 8-bit GPTQ)")
    per = 32 // bits
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"{what}: qweight, qzeros and scales must be 2-D")
    K, N = qweight.shape[0] * per, qweight.shape[1]
    G = scales.shape[0]
    if tuple(scales.shape) != (G, N) or tuple(qzeros.shape) != (G, N // per) or N % per:
        raise ValueError(f"{what}: inconsistent shapes qweight {list(qweight.shape)}, qzeros "
                         f"{list(qzeros.shape)}, scales {list(scales.shape)} for {bits}-bit")
    if not scales.is_floating_point():
        raise ValueError(f"{what}: scales must be floating point, got {scales.dtype}")
    if g_idx is not None and g_idx.numel() != K:
        raise ValueError(f"{what}: g_idx has {g_idx.numel()} entries, in_features is {K}")
    try:  # (numpy / torch integer scalars too)
        gs_ok = not isinstance(group_size, bool) and (group_size == -1 or operator.index(group_size) >= 1)
    except TypeError:
        gs_ok = False
    if not gs_ok:
        raise ValueError(f"{what}: group_size must be a positive int or -1, got {group_size!r}")
    group_size = int(group_size)
    if group_size == -1 or group_size >= K:
        gs, lowbit_group = K, -1
    else:
        gs, lowbit_group = group_size, group_size
    if G != math.ceil(K / gs):
        raise ValueError(f"{what}: {G} scale rows, but in_features {K} with group_size "
                         f"{group_size} gives {math.ceil(K / gs)} groups")
    if lowbit_group != -1:
        try:
            F.check_group_size(F.INT4, lowbit_group)
        except ValueError as e:
            raise UnsupportedCheckpoint(f"{what}: {e}") from None
    perm = None
    if g_idx is not None:
        perm = perm_from_group_index(g_idx, gs, K, f"{what} (act-order / desc_act g_idx)")
    codes = unpack_int32(qweight, bits, dim=0).t()  # [N, K], input-feature order
    zeros = unpack_int32(qzeros, bits, dim=1).t().contiguous()  # [N, G]
    if version == 1:
        zeros = zeros + 1  # v1 stores z - 1 in each code
    if perm is not None:
        codes = codes.index_select(1, perm)  # stored column j = input feature perm[j]
    codes = codes.contiguous()
    s = scales.to(torch.float32).t().contiguous()  # fp16 / bf16 -> float32 is exact
    if bits == 4 and int(zeros.max()) <= 15:
        packed = reference.pack_nibbles(codes.to(torch.uint8))
        if bool((zeros == F.INT4_SYMMETRIC_ZERO).all()):
            return QuantizedWeight("int4", (N, K), packed, s, group_size=lowbit_group,
                                   symmetric=True, perm=perm)
        return QuantizedWeight("int4", (N, K), packed, s, zeros.to(torch.uint8),
                               group_size=lowbit_group, symmetric=False, perm=perm)
    # 8-bit, or v1 4-bit with a zero of 16: int8 codes q - 128 and zeros z - 128 (exact)
    q = (codes - 128).to(torch.int8)
    z = zeros - 128
    if bool((z == 0).all()):
        return QuantizedWeight("int8", (N, K), q, s, group_size=lowbit_group, symmetric=True,
                               perm=perm)
    return QuantizedWeight("int8", (N, K), q, s, z.to(torch.int16), group_size=lowbit_group,
                           symmetric=False, perm=perm)


def _settings(qcfg: Optional[dict], checkpoint_format, bits, group_size):
    """(format, bits, group_size) from the explicit arguments, else the quantization config."""
    qcfg = dict(qcfg or {})
    method = qcfg.get("quant_method", "gptq")
    if str(method).lower() != "gptq":
        raise UnsupportedCheckpoint(f"not a GPTQ checkpoint (quant_method={method!r})")
    if qcfg.get("is_marlin_format"):
        raise UnsupportedCheckpoint("GPTQ checkpoint in the Marlin layout (is_marlin_format) is "
                                    "not supported")
    if qcfg.get("dynamic"):
        raise UnsupportedCheckpoint("GPTQModel 'dynamic' per-module bits/group overrides are not "
                                    "supported")
    pack = str(qcfg.get("pack_dtype", "int32")).replace("torch.", "")
    if pack != "int32":
        raise UnsupportedCheckpoint(f"GPTQ pack_dtype {pack} is not supported (int32 only)")
    if checkpoint_format is None:
        checkpoint_format = qcfg.get("checkpoint_format") or qcfg.get("format")
        if checkpoint_format is None:
            if not qcfg:
                raise ValueError("GPTQ: no quantization config found next to the weights, so v1 "
                                 "and v2 zero-points can't be told apart; pass "
                                 "checkpoint_format='gptq' (v1) or 'gptq_v2'")
            checkpoint_format = "gptq"  # AutoGPTQ's configs predate the field: v1
    _format_version(checkpoint_format)
    bits = bits if bits is not None else qcfg.get("bits")
    group_size = group_size if group_size is not None else qcfg.get("group_size")
    return checkpoint_format, bits, group_size


def load_gptq(source, *, checkpoint_format: Optional[str] = None, bits: Optional[int] = None,
              group_size: Optional[int] = None, as_model: Optional[bool] = None,
              dtype: torch.dtype = torch.float32):
    """Load a GPTQ checkpoint exactly.

    ``source``: a transformers / AutoGPTQ / GPTQModel folder (``config.json`` with a "gptq"
    quantization_config and/or ``quantize_config.json``), a weight file, or a name -> tensor
    mapping. ``checkpoint_format`` ("gptq" = v1 or "gptq_v2"), ``bits`` and ``group_size``
    override the config (needed for a bare file or mapping).

    Returns a ready transformers model with QuantLinear layers when the folder has a
    ``config.json`` (``as_model`` defaults to that; other tensors in ``dtype``), else a dict
    module name -> QuantizedWeight.
    """
    folder = checkpoint_folder(source)
    cfg_json, qcfg = quantization_config(folder)
    if qcfg is None and folder is not None:
        qcfg = read_json(os.path.join(folder, "quantize_config.json"))
    fmt, bits, group_size = _settings(qcfg, checkpoint_format, bits, group_size)
    tensors = open_tensors(source)
    prefixes = layer_prefixes(tensors, ".qweight")
    if not prefixes:
        raise ValueError("no GPTQ layers (no '<module>.qweight' tensors) in the checkpoint")
    layers: Dict[str, Tuple[QuantizedWeight, Optional[torch.Tensor]]] = {}
    for p in prefixes:
        for t in ("qzeros", "scales"):
            if f"{p}.{t}" not in tensors:
                raise ValueError(f"GPTQ layer {p!r} lacks its '{t}' tensor")
        qweight = tensors[f"{p}.qweight"]
        g_idx = tensors[f"{p}.g_idx"] if f"{p}.g_idx" in tensors else None
        b = bits
        if b is None:
            if g_idx is None:
                raise ValueError(f"GPTQ layer {p!r}: bits unknown (no config, no g_idx); pass bits=")
            b = qweight.shape[0] * 32 // g_idx.numel()
        if group_size is None:
            raise ValueError("GPTQ: group_size unknown (no quantization config); pass group_size=")
        qw = gptq_layer(qweight, tensors[f"{p}.qzeros"], tensors[f"{p}.scales"], g_idx, bits=b,
                        group_size=group_size, checkpoint_format=fmt, name=p)
        bias = tensors[f"{p}.bias"] if f"{p}.bias" in tensors else None
        layers[p] = (qw, bias)
    if as_model is None:
        as_model = cfg_json is not None
    if not as_model:
        return {p: qw for p, (qw, _) in layers.items()}
    if cfg_json is None:
        raise ValueError("as_model=True needs a folder with the model's config.json")
    skip = {f"{p}.{t}" for p in layers for t in LAYER_TENSORS}
    floats = {k: tensors[k] for k in tensors if k not in skip}
    return build_model(_hf_config(folder), layers, floats, dtype, source="GPTQ checkpoint")


def _hf_config(folder: str):
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # lowbit holds the quantized layers itself
    return config


# ---- export -----------------------------------------------------------------------------------
def gptq_tensors(qw: QuantizedWeight, checkpoint_format: str = "gptq_v2"):
    """A lowbit weight -> (bits, group_size, sym, {qweight, qzeros, scales, g_idx}) in the GPTQ
    layout (module docstring); ValueError when GPTQ cannot hold it exactly."""
    version = _format_version(checkpoint_format)
    N, K = qw.shape
    what = f"{qw.fmt} weight {list(qw.shape)}"
    if qw.input_scale is not None:
        raise ValueError(f"{what}: GPTQ has no input scale (AWQ-style input_scale); cannot export")
    if qw.fmt == "int4" and qw.zero_point == "float":
        raise ValueError(f"{what}: int4 with float offsets (zero_point='float', GGUF Q4_1/Q4_K: "
                         "w = q * s + m) has no GPTQ form, whose zero-points are integers")
    if qw.fmt not in ("int4", "int8"):
        raise ValueError(f"{what}: GPTQ stores integer codes with integer zero-points; "
                         f"{qw.fmt} (a codebook format) cannot be exported to GPTQ")
    bits = 4 if qw.fmt == "int4" else 8
    per = 32 // bits
    if K % per or N % per:
        raise ValueError(f"{what}: GPTQ packs {per} codes per int32 word along K and N; both "
                         f"must be multiples of {per}")
    group = F.effective_group(qw.group_size, K)
    qw = qw.to("cpu")
    if bits == 4:
        codes = reference.unpack_nibbles(qw.data, K).to(torch.int64)
        zeros = (torch.full(qw.scales.shape, F.INT4_SYMMETRIC_ZERO, dtype=torch.int64)
                 if qw.symmetric else qw.zeros.to(torch.int64))
    else:
        codes = qw.data.to(torch.int64) + 128
        zeros = (torch.full(qw.scales.shape, 128, dtype=torch.int64) if qw.symmetric
                 else qw.zeros.to(torch.int64) + 128)
        if bool((zeros < 0).any()) or bool((zeros > 255).any()):
            raise ValueError(f"{what}: int8 zero-points outside GPTQ's 8-bit range 0..255 (after "
                             "the +128 shift)")
    if version == 1:
        if bool((zeros == 0).any()):
            raise ValueError(f"{what}: a zero-point of 0 cannot be stored in GPTQ v1 (which stores "
                             "z - 1); export checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    if qw.perm is not None:  # stored column j is input feature perm[j]: back to input order
        codes = torch.empty_like(codes).index_copy_(1, qw.perm.to(torch.int64), codes)
    g_idx = group_index_from_perm(qw.perm, group, K)
    scales = require_float16(qw.scales, f"{what}: GPTQ scales").t().contiguous()
    out = {"qweight": pack_int32(codes.t().contiguous(), bits, dim=0),
           "qzeros": pack_int32(zeros.t().contiguous(), bits, dim=1),
           "scales": scales, "g_idx": g_idx}
    return bits, qw.group_size, bool(qw.symmetric), out


def export_gptq(weights, path, *, checkpoint_format: str = "gptq_v2") -> None:
    """Write a GPTQ checkpoint folder (``model.safetensors`` + ``quantize_config.json``).

    ``weights``: a name -> QuantizedWeight mapping, or a model whose QuantLinear layers are
    exported (its other tensors are written in float, and a transformers model's
    ``config.json`` gets the matching "gptq" quantization_config, so :func:`load_gptq` /
    ``lowbit.load_checkpoint`` rebuild it). int4 (symmetric or integer zero-points) -> 4-bit,
    int8 (groups, symmetric or zero-points) -> 8-bit, ``perm`` -> ``g_idx`` (desc_act). Every
    layer must share bits and group size (GPTQ keeps one of each per checkpoint); scales must
    be float16 values. Anything else raises ValueError naming the layer and the reason.
    """
    from safetensors.torch import save_file

    from ..nn import QuantLinear

    tensors: Dict[str, torch.Tensor] = {}
    layers: Dict[str, QuantizedWeight] = {}
    config = None
    if isinstance(weights, nn.Module):
        config = getattr(weights, "config", None)
        for name, mod in weights.named_modules():
            if isinstance(mod, QuantLinear):
                layers[name] = mod.qweight
                if mod.bias is not None:
                    tensors[f"{name}.bias"] = mod.bias.detach().to(torch.float16).contiguous()
        quant_prefixes = tuple(f"{n}." for n in layers)
        for k, v in weights.state_dict().items():
            if not k.startswith(quant_prefixes) and isinstance(v, torch.Tensor):
                tensors[k] = v.detach().contiguous()
        _drop_tied(weights, tensors)
    elif isinstance(weights, Mapping):
        layers = dict(weights)
    else:
        raise TypeError(f"export_gptq expects a mapping or an nn.Module, got {type(weights).__name__}")
    if not layers:
        raise ValueError("export_gptq: no quantized layers to export")
    settings = set()
    sym_all = True
    for name, qw in layers.items():
        if not isinstance(qw, QuantizedWeight):
            raise TypeError(f"export_gptq: '{name}' is a {type(qw).__name__}, not a QuantizedWeight")
        try:
            bits, group, sym, t = gptq_tensors(qw, checkpoint_format)
        except ValueError as e:
            raise ValueError(f"GPTQ export of '{name}': {e}") from None
        settings.add((bits, group))
        sym_all &= sym
        for k, v in t.items():
            tensors[f"{name}.{k}"] = v
    if len(settings) > 1:
        raise ValueError(f"export_gptq: layers use different (bits, group_size) {sorted(settings)}; "
                         "a GPTQ checkpoint has one setting for all layers")
    bits, group = settings.pop()
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group,
            "desc_act": any(qw.perm is not None for qw in layers.values()), "sym": sym_all,
            "checkpoint_format": checkpoint_format, "pack_dtype": "int32"}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "quantize_config.json"), "w") as f:
        json.dump(qcfg, f, indent=2)
    if config is not None and hasattr(config, "to_dict"):
        d = config.to_dict()
        d["quantization_config"] = qcfg
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f, indent=2)


def _drop_tied(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Keep one copy of parameters shared between names (tied embeddings): safetensors refuses
    shared storage, and the model re-ties them on load."""
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and name in tensors:
            del tensors[name]
        seen.setdefault(id(p), name)
