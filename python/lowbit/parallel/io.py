"""Saving and loading per-rank shards of a tensor-parallel model.

A shard directory holds ``manifest.json`` and one safetensors file per rank,
``rank{r}-of-{W}.safetensors``, each with everything its rank needs (its shards plus the
replicated weights), so a rank reads one file:

manifest.json::

    {"lowbit_tensor_parallel": 1, "world_size": W, "files": [...one per rank...],
     "sharding": {"uneven": bool, "act_order": "error" | "gather"},
     "layers": {"model.layers.0.self_attn.q_proj": {"parallel": "column", "dim": 0,
                "shape": [N, K], "bounds": [0, ..., N], "bias": true, "quantized": true,
                "format": {"fmt": "int4", "group_size": 128, "symmetric": false},
                "gather_output": false, "gather_input": false}, ...}}

A rank file's metadata key ``lowbit_tp`` (JSON) holds its rank and world size, the extra state
(format settings) of each of its QuantLinear layers (shards may differ: see dq_fallback), the
attention head counts changed for local heads, tied tensors (stored once) and the names of
non-persistent buffers saved with it (so a skeleton built on the meta device loads fully).

:func:`load_shards` restructures an unsharded skeleton (the same architecture with nn.Linear
or QuantLinear layers, on any device including ``meta``) into this rank's sharded model and
loads the tensors, checking the world size, the rank, the file and every layer's shape.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn import QuantLinear
from .layers import ColumnParallelQuantLinear, RowParallelQuantLinear
from .model import _HEAD_ATTRS, _KV_HEAD_ATTRS, parallel_layers, resolve_world, shard_model_as

MANIFEST = "manifest.json"
VERSION = 1
_NONPERSISTENT = "lowbit_tp.nonpersistent."


def rank_file(rank: int, world_size: int) -> str:
    return f"rank{rank}-of-{world_size}.safetensors"


def _tp_info(model: nn.Module) -> dict:
    info = getattr(model, "_lowbit_tp", None)
    if info is None:
        raise ValueError("the model is not sharded: call lowbit.parallel.shard_model first")
    return info


def _manifest(model: nn.Module, info: dict) -> dict:
    W = info["world_size"]
    layers = {}
    for name, m in parallel_layers(model).items():
        col = isinstance(m, ColumnParallelQuantLinear)
        local = m.local
        q = isinstance(local, QuantLinear)
        entry = {"parallel": "column" if col else "row", "dim": 0 if col else 1,
                 "shape": [m.out_features, m.in_features], "bounds": list(m.bounds),
                 "bias": (local.bias if col else m.bias) is not None, "quantized": q,
                 "format": ({k: local._config[k] for k in ("fmt", "group_size", "symmetric")}
                            if q else {"dtype": str(local.weight.dtype).replace("torch.", "")}),
                 "gather_output": bool(getattr(m, "gather_output", False)),
                 "gather_input": bool(getattr(m, "gather_input", False))}
        layers[name] = entry
    return {"lowbit_tensor_parallel": VERSION, "world_size": W,
            "files": [rank_file(r, W) for r in range(W)],
            "sharding": {"uneven": info.get("uneven", False), "act_order": info.get("act_order", "error")},
            "layers": layers}


def _head_attrs(model: nn.Module) -> Dict[str, Dict[str, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "q_proj", None), ColumnParallelQuantLinear):
            vals = {a: getattr(m, a) for a in _HEAD_ATTRS + _KV_HEAD_ATTRS
                    if isinstance(getattr(m, a, None), int)}
            if vals:
                out[name] = vals
    return out


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def save_shards(model: nn.Module, directory: str) -> str:
    """Write this rank's file of a model sharded by :func:`shard_model` into ``directory``; rank
    0 also writes the manifest. Under torch.distributed every rank calls it (a barrier at the end
    makes the directory complete on return). Returns the rank file's path."""
    path = _write_rank(model, directory)
    W = _tp_info(model)["world_size"]
    if dist.is_available() and dist.is_initialized() and W > 1:
        dist.barrier()
    return path


def _write_rank(model: nn.Module, directory: str) -> str:
    from safetensors.torch import save_file
    info = _tp_info(model)
    rank, W = info["rank"], info["world_size"]
    os.makedirs(directory, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    extra: Dict[str, dict] = {}
    for key, t in model.state_dict().items():
        if key.endswith("_extra_state"):
            extra[key] = t
            continue
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device; load the weights before saving")
        sk = _storage_key(t)
        if sk in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once
            tied[key] = seen[sk]
            continue
        seen[sk] = key
        tensors[key] = t.detach()
    nonpersistent = []
    for mname, mod in model.named_modules():
        for b in sorted(mod._non_persistent_buffers_set):
            t = mod._buffers.get(b)
            if t is not None:
                key = f"{mname}.{b}" if mname else b
                tensors[_NONPERSISTENT + key] = t.detach()
                nonpersistent.append(key)
    # safetensors refuses distinct tensors that share memory: give all but one their own copy
    first: Dict[tuple, str] = {}
    for k, t in tensors.items():
        sk = (t.device, t.untyped_storage().data_ptr())
        if sk in first:
            tensors[k] = t.clone()
        else:
            first[sk] = k
    meta = {"rank": rank, "world_size": W, "extra_state": extra, "tied": tied,
            "heads": _head_attrs(model), "nonpersistent": nonpersistent}
    path = os.path.join(directory, rank_file(rank, W))
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path + ".tmp",
              metadata={"lowbit_tp": json.dumps(meta), "format": "pt"})
    os.replace(path + ".tmp", path)
    if rank == 0:
        mpath = os.path.join(directory, MANIFEST)
        with open(mpath + ".tmp", "w") as f:
            json.dump(_manifest(model, info), f, indent=1)
        os.replace(mpath + ".tmp", mpath)
    return path


def shard_and_save(model: nn.Module, directory: str, world_size: int, **shard_options) -> str:
    """Shard ``model`` for every rank of ``world_size`` in this one process (no
    torch.distributed needed) and write the shard directory; ``model`` itself is unchanged.
    ``shard_options``: those of :func:`shard_model` (uneven, act_order, dq_fallback). Returns
    the manifest's path."""
    tensors = list(model.parameters()) + list(model.buffers())
    for r in range(world_size):
        # copy the modules, share the tensors: sharding makes new tensors, never edits these
        m = copy.deepcopy(model, memo={id(t): t for t in tensors})
        shard_model_as(m, world_size, r, **shard_options)
        _write_rank(m, directory)
        del m
    return os.path.join(directory, MANIFEST)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a lowbit shard directory (no {MANIFEST})")
    with open(path) as f:
        man = json.load(f)
    if man.get("lowbit_tensor_parallel") != VERSION:
        raise ValueError(f"{path}: not a lowbit tensor-parallel manifest of version {VERSION} "
                         f"(lowbit_tensor_parallel = {man.get('lowbit_tensor_parallel')!r})")
    return man


def _skeleton_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def load_shards(model: nn.Module, directory: str, rank: Optional[int] = None,
                world_size: Optional[int] = None, group=None, *, mesh=None,
                device=None) -> nn.Module:
    """Turn the unsharded skeleton ``model`` into rank ``rank``'s shard of the checkpoint in
    ``directory`` (in place; returns it). Rank and world size come from torch.distributed (or
    ``mesh``) when initialised, else from the arguments; they must match the manifest.
    ``device``: where the tensors go (default: the skeleton's device, or the CPU for a ``meta``
    skeleton)."""
    from safetensors import safe_open
    man = read_manifest(directory)
    W = int(man["world_size"])
    if not ((dist.is_available() and dist.is_initialized()) or mesh is not None) and world_size is None:
        world_size = W
    world, rank, group = resolve_world(world_size, rank, group, mesh)
    if world != W:
        raise ValueError(f"the shards in {directory!r} were saved for world_size={W}, but this run "
                         f"has world_size={world}")
    path = os.path.join(directory, man["files"][rank])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rank {rank}'s shard file {path!r} is missing")
    skel_dev = _skeleton_device(model)
    meta_skeleton = skel_dev.type == "meta"
    dev = torch.device(device) if device is not None else (torch.device("cpu") if meta_skeleton else skel_dev)
    with safe_open(path, framework="pt", device=str(dev)) as f:
        md = json.loads((f.metadata() or {}).get("lowbit_tp", "null") or "null")
        if not isinstance(md, dict) or md.get("rank") != rank or md.get("world_size") != W:
            raise ValueError(f"{path} is not rank {rank} of {W} (its metadata says rank "
                             f"{None if not isinstance(md, dict) else md.get('rank')} of "
                             f"{None if not isinstance(md, dict) else md.get('world_size')})")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    nonpersistent = {k[len(_NONPERSISTENT):]: sd.pop(k) for k in list(sd) if k.startswith(_NONPERSISTENT)}
    for alias, key in md["tied"].items():
        sd[alias] = sd[key]
    extra = md["extra_state"]
    _restructure(model, man, md, extra, set(sd), rank, group, dev)
    sd.update(extra)
    model.load_state_dict(sd, strict=True, assign=meta_skeleton)
    for key, t in nonpersistent.items():
        mname, _, b = key.rpartition(".")
        mod = model.get_submodule(mname) if mname else model
        mod._buffers[b] = t
    if meta_skeleton:
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"after loading, {len(left)} tensors are still on the meta device "
                             f"(e.g. {left[0]}): the shards do not cover this skeleton")
    model._lowbit_tp = {"world_size": W, "rank": rank, **man.get("sharding", {})}
    return model


def _qlinear_from_state(state: dict, bias: bool, device) -> QuantLinear:
    N, K = state["shape"]
    return QuantLinear(K, N, bias=bias, fmt=state["fmt"], group_size=state["group_size"],
                       symmetric=state["symmetric"], double_quant=state["double_quant"], device=device)


def _restructure(model, man, md, extra, keys, rank, group, device) -> None:
    """Replace the skeleton's layers by empty parallel / quantized ones of this rank's layout."""
    layers = man["layers"]
    for name, e in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the shards have layer {name!r}, which this model lacks") from None
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise ValueError(f"{name} in the model is a {type(old).__name__}, expected an unsharded "
                             "nn.Linear or QuantLinear (is the model already sharded?)")
        if [old.out_features, old.in_features] != e["shape"]:
            raise ValueError(f"{name} in the model is [{old.out_features}, {old.in_features}], the "
                             f"shards are for [{e['shape'][0]}, {e['shape'][1]}]")
        b = e["bounds"]
        lo, hi = b[rank], b[rank + 1]
        N, K = e["shape"]
        col = e["parallel"] == "column"
        n_local, k_local = (hi - lo, K) if col else (N, hi - lo)
        local_bias = e["bias"] and col
        if e["quantized"]:
            st = extra.get(f"{name}.local._extra_state")
            if st is None:
                raise ValueError(f"rank file lacks the format state of {name}.local")
            local = _qlinear_from_state(st, local_bias, device)
        else:
            dtype = getattr(torch, e["format"]["dtype"])
            local = nn.Linear(k_local, n_local, bias=local_bias, device=device, dtype=dtype)
        if col:
            new = ColumnParallelQuantLinear(local, b, rank, group=group,
                                            gather_output=e["gather_output"])
        else:
            gi = e["gather_input"]
            idx = torch.zeros(k_local, dtype=torch.int64, device=device) if gi else None
            has_scale = gi and f"{name}.feature_scale" in keys
            new = RowParallelQuantLinear(
                local, b, rank, bias=torch.zeros(N, device=device) if e["bias"] else None,
                group=group, gather_input=gi, feature_index=idx,
                feature_scale=torch.ones(k_local, device=device) if has_scale else None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    # replicated quantized layers (not sharded) the skeleton may hold as nn.Linear
    for key, st in extra.items():
        mname = key[: -len("._extra_state")] if key.endswith("._extra_state") else ""
        if mname.endswith(".local"):
            continue
        try:
            old = model.get_submodule(mname)
        except AttributeError:
            raise ValueError(f"the shards have quantized layer {mname!r}, which this model lacks") from None
        if isinstance(old, nn.Linear):
            if [old.out_features, old.in_features] != list(st["shape"]):
                raise ValueError(f"{mname} in the model is [{old.out_features}, {old.in_features}], "
                                 f"the shards hold [{st['shape'][0]}, {st['shape'][1]}]")
            parent, _, child = mname.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    _qlinear_from_state(st, old.bias is not None, device))
    for name, vals in md.get("heads", {}).items():
        attn = model.get_submodule(name)
        for a, v in vals.items():
            setattr(attn, a, v)
