"""Shared pieces of the checkpoint importers / exporters (lowbit.io.gptq, awq, bnb, gguf).

* reading a checkpoint's tensors (a folder of safetensors / .bin shards, one file, or an
  in-memory mapping) without loading what is not asked for;
* packing and unpacking integer codes in int32 words (GPTQ and AWQ store 32 // bits codes per
  word, the first code in the least significant bits);
* building a ready transformers model around QuantLinear layers, with every float tensor
  loaded and no float copy of a quantized weight ever made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..qweight import QuantizedWeight


class UnsupportedCheckpoint(ValueError):
    """A checkpoint (or a layer of it) in a variant lowbit cannot map exactly; the message names
    the variant."""


# ---- reading tensors ------------------------------------------------------------------------
class TensorSource(Mapping):
    """Read-only name -> tensor mapping over the weight files of a checkpoint.

    safetensors files are opened lazily (one tensor read per lookup); ``.bin`` files are loaded
    with ``torch.load(weights_only=True, mmap=True)``.
    """

    def __init__(self, files: List[str]):
        if not files:
            raise FileNotFoundError("no weight files given")
        self.files = list(files)
        self._where: Dict[str, int] = {}
        self._handles: Dict[int, object] = {}
        for i, f in enumerate(self.files):
            if f.endswith(".safetensors"):
                from safetensors import safe_open
                h = safe_open(f, framework="pt")
                self._handles[i] = h
                names = h.keys()
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(sd, Mapping):
                    raise ValueError(f"{f} does not hold a state dict (got {type(sd).__name__})")
                self._handles[i] = sd
                names = sd.keys()
            for n in names:
                self._where.setdefault(n, i)

    def metadata(self) -> Dict[str, str]:
        """The safetensors header metadata of the first safetensors file ({} if none)."""
        for h in self._handles.values():
            if hasattr(h, "metadata"):
                return dict(h.metadata() or {})
        return {}

    def __getitem__(self, name: str) -> torch.Tensor:
        i = self._where[name]
        h = self._handles[i]
        return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where


def weight_files(folder: str) -> List[str]:
    """The checkpoint's weight files in a folder: safetensors shards (via the index when there
    is one), else PyTorch .bin shards."""
    for index_name, ext in (("model.safetensors.index.json", ".safetensors"),
                            ("pytorch_model.bin.index.json", ".bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    for ext in (".safetensors", ".bin"):
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if f.endswith(ext) and not f.startswith("."))
        if ext == ".bin":
            files = [f for f in files if "optimizer" not in os.path.basename(f)
                     and "training_args" not in os.path.basename(f)]
        if files:
            return files
    raise FileNotFoundError(f"no .safetensors or .bin weight files in {folder}")


def open_tensors(source) -> Mapping:
    """A name -> tensor mapping for ``source``: a Mapping (returned as is), a weight file, or a
    checkpoint folder."""
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        return TensorSource(weight_files(path))
    if os.path.isfile(path):
        return TensorSource([path])
    raise FileNotFoundError(f"no such checkpoint file or folder: {path!r}")


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def checkpoint_folder(source) -> Optional[str]:
    """The folder holding the checkpoint's config files (None for an in-memory mapping)."""
    if isinstance(source, Mapping):
        return None
    path = os.fspath(source)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def quantization_config(folder: Optional[str]) -> Tuple[Optional[dict], Optional[dict]]:
    """(config.json, its quantization_config) of a transformers folder, each None if absent."""
    if folder is None:
        return None, None
    cfg = read_json(os.path.join(folder, "config.json"))
    return cfg, (cfg or {}).get("quantization_config")


def layer_prefixes(tensors: Mapping, suffix: str) -> List[str]:
    """Module names ``p`` for which ``p + suffix`` is a tensor, in a stable order."""
    return sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))


# ---- int32 word packing ------------------------------------------------------------------------
def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 codes along ``dim``: word ``i`` holds codes ``i * (32 // bits) + j``
    for j = 0, 1, ..., code j in bits ``[bits * j, bits * (j + 1))`` (the layout GPTQ uses for
    qweight along K and qzeros along N; AWQ adds its own order on top)."""
    if words.dtype != torch.int32:
        raise UnsupportedCheckpoint(f"packed tensors must be int32 words, got {words.dtype} "
                                    "(other pack dtypes are not supported)")
    per = 32 // bits
    mask = (1 << bits) - 1
    w = words.to(torch.int64) & 0xFFFFFFFF  # the word's 32 bits as a non-negative number
    shifts = torch.arange(per, dtype=torch.int64) * bits
    dim = dim % words.dim()
    w = w.unsqueeze(dim + 1)
    shape = [1] * w.dim()
    shape[dim + 1] = per
    codes = (w >> shifts.reshape(shape)) & mask
    new_shape = list(words.shape)
    new_shape[dim] *= per
    return codes.reshape(new_shape).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack_int32`: integer codes in ``[0, 2**bits)`` -> int32 words."""
    per = 32 // bits
    dim = dim % codes.dim()
    if codes.shape[dim] % per:
        raise ValueError(f"cannot pack {codes.shape[dim]} codes into int32 words of {per}")
    c = codes.to(torch.int64)
    if bool((c < 0).any()) or bool((c >= (1 << bits)).any()):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    shape = list(c.shape)
    shape[dim:dim + 1] = [shape[dim] // per, per]
    c = c.reshape(shape)
    sh = [1] * c.dim()
    sh[dim + 1] = per
    words = (c << (torch.arange(per, dtype=torch.int64) * bits).reshape(sh)).sum(dim=dim + 1)
    # back to int32 with the same 32 bits (two's complement)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def require_float16(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` (float32) as float16, refusing when that would change a value."""
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        bad = int((h.to(t.dtype) != t).sum())
        raise ValueError(f"{what}: {bad} of {t.numel()} values are not exactly representable in "
                         "float16, which the target format stores; exporting would change the "
                         "dequantized weights")
    return h


# ---- groups and act-order --------------------------------------------------------------------
def perm_from_group_index(g_idx: torch.Tensor, group_size: int, K: int,
                          variant: str) -> Optional[torch.Tensor]:
    """A group map (input feature k is in group ``g_idx[k]``) -> lowbit's ``perm``.

    Columns sorted by group (stable) must form contiguous groups of ``group_size`` (the last
    one may be shorter); ``perm`` is that sort order, None when it is the identity.
    """
    g = g_idx.to(torch.int64).reshape(-1)
    if g.numel() != K:
        raise UnsupportedCheckpoint(f"{variant}: g_idx has {g.numel()} entries, in_features is {K}")
    if g.numel() and int(g.min()) < 0:
        raise UnsupportedCheckpoint(f"{variant}: g_idx has a negative group index ({int(g.min())})")
    want = torch.arange(K, dtype=torch.int64) // group_size
    if torch.equal(g, want):
        return None
    order = torch.sort(g, stable=True).indices
    if not torch.equal(g[order], want):
        raise UnsupportedCheckpoint(
            f"{variant}: its g_idx does not split the input features into groups of exactly "
            f"group_size={group_size} (group sizes {torch.bincount(g).tolist()[:8]}...); "
            "lowbit stores contiguous groups after one column permutation and cannot map it")
    return order


def group_index_from_perm(perm: Optional[torch.Tensor], group_size: int, K: int) -> torch.Tensor:
    """Inverse of :func:`perm_from_group_index`: the group of each input feature (int32)."""
    g_sorted = torch.arange(K, dtype=torch.int64) // group_size
    if perm is None:
        return g_sorted.to(torch.int32)
    g = torch.empty(K, dtype=torch.int64)
    g[perm.to(torch.int64)] = g_sorted
    return g.to(torch.int32)


# ---- building a model -----------------------------------------------------------------------
def _resolve(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


def build_model(config, quantized: Dict[str, Tuple[QuantizedWeight, Optional[torch.Tensor]]],
                floats: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                source: str = "checkpoint") -> nn.Module:
    """A transformers ``AutoModelForCausalLM`` for ``config`` whose Linear layers named in
    ``quantized`` (module name -> (QuantizedWeight, bias or None)) are QuantLinear, every other
    parameter taken from ``floats`` (state-dict name -> tensor, cast to ``dtype``).

    The skeleton is created on the meta device, so no float copy of a quantized weight is ever
    allocated; non-persistent buffers (e.g. rotary frequencies) are then computed by the model's
    own initialisation. Raises ValueError naming any tensor the checkpoint lacks.
    """
    return finish_model(meta_model(config, dtype), quantized, floats, dtype, source)


def meta_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformers ``AutoModelForCausalLM`` of ``config`` with every tensor on the meta
    device (nothing allocated)."""
    import transformers
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def finish_model(model: nn.Module, quantized: Dict[str, Tuple[QuantizedWeight, Optional[torch.Tensor]]],
                 floats: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 source: str = "checkpoint") -> nn.Module:
    """Fill a :func:`meta_model` skeleton (see :func:`build_model`)."""
    from ..nn import QuantLinear

    for name, (qw, bias) in quantized.items():
        parent, attr = _resolve(model, name)
        old = getattr(parent, attr, None)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{source}: quantized tensor '{name}' does not correspond to an "
                             f"nn.Linear of the {type(model).__name__} built from its config "
                             f"(found {type(old).__name__})")
        if (old.out_features, old.in_features) != tuple(qw.shape):
            raise ValueError(f"{source}: '{name}' is {list(qw.shape)} but the model expects "
                             f"[{old.out_features}, {old.in_features}]")
        b = None if bias is None else bias.to(dtype)
        if b is None and old.bias is not None:
            raise ValueError(f"{source}: the model's '{name}' has a bias the checkpoint lacks")
        setattr(parent, attr, QuantLinear.from_quantized(qw, b))
    floats = {k: v.to(dtype) if v.is_floating_point() else v for k, v in floats.items()}
    missing, unexpected = model.load_state_dict(floats, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{source}: tensors with no place in {type(model).__name__}: "
                         f"{sorted(unexpected)[:8]}")
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        if isinstance(out, nn.Linear) and out.weight.is_meta:
            model.tie_weights()
    _init_meta_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{source}: the checkpoint lacks {len(left)} tensor(s) the model needs: "
                         f"{left[:8]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _init_meta_buffers(model: nn.Module) -> None:
    """Materialise the non-persistent buffers still on the meta device (computed at init time,
    never saved, e.g. rotary inverse frequencies) with the model's own weight initialisation,
    which runs only on the modules holding them."""
    holders = []
    for mod in model.modules():
        nonpersistent = getattr(mod, "_non_persistent_buffers_set", set())
        metas = [k for k, b in mod._buffers.items() if b is not None and b.is_meta and k in nonpersistent]
        if metas:
            for k in metas:
                mod._buffers[k] = torch.empty_like(mod._buffers[k], device="cpu")
            holders.append(mod)
    if not holders:
        return
    held = {id(m) for m in holders}
    for mod in model.modules():
        mod._is_hf_initialized = id(mod) not in held
        # loaded tensors are flagged so transformers' init functions leave them alone
        for t in list(mod._parameters.values()) + [b for k, b in mod._buffers.items()
                                                   if id(mod) not in held or k not in
                                                   getattr(mod, "_non_persistent_buffers_set", ())]:
            if t is not None:
                t._is_hf_initialized = True
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()
    elif hasattr(model, "_init_weights"):
        for mod in holders:
            model._init_weights(mod)
