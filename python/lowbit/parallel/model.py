"""shard_model: tensor-parallel sharding of a transformer in the Megatron-LM pattern.

In every attention block q/k/v are column-parallel (each rank computes whole heads) and o is
row-parallel; in every MLP gate/up are column-parallel and down is row-parallel. So a block
needs one all-reduce after attention and one after the MLP; embeddings, norms and the LM head
stay replicated. Works on the Llama family of transformers (LlamaForCausalLM, Mistral, Qwen2,
SmolLM ...), whose attention reshapes with ``-1`` heads and so needs no change for local heads,
with lowbit QuantLinear layers (any format) or plain nn.Linear ones (the float baseline).

Head split: ranks get whole key/value heads and the query heads that use them (GQA), so the
number of kv heads must be divisible by the world size, or, with ``uneven=True``, at least the
world size (ranks then get as equal a share as possible, e.g. 2 and 1 of 3 kv heads). The MLP's
intermediate features are split evenly, or with ``uneven=True`` on multiples of down_proj's
group size (the row-parallel cut must keep its groups whole). Any cut that would split a group
of a row-parallel weight raises ValueError naming the layer and the sizes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.distributed as dist
from torch import nn

from ..nn import QuantLinear
from . import shard as S
from .layers import ColumnParallelQuantLinear, RowParallelQuantLinear

# Child-name patterns of the blocks shard_model recognises: (kind, column names, row names).
ATTENTION = ("q_proj", "k_proj", "v_proj")
ATTENTION_OUT = "o_proj"
MLP_IN = ("gate_proj", "up_proj")
MLP_OUT = "down_proj"
# Attention attributes older / other implementations read as head counts (updated when present).
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")


def resolve_world(world_size: Optional[int] = None, rank: Optional[int] = None, group=None,
                  mesh=None) -> Tuple[int, int, object]:
    """(world_size, rank, group) from the arguments, a 1-D DeviceMesh, or torch.distributed."""
    if mesh is not None:
        if group is not None:
            raise ValueError("pass either mesh or group, not both")
        if mesh.ndim != 1:
            raise ValueError(f"shard_model needs a 1-D DeviceMesh (the tensor-parallel dimension, "
                             f"e.g. mesh['tp']), got {mesh.ndim} dimensions")
        group = mesh.get_group()
        m_world, m_rank = mesh.size(), mesh.get_local_rank()
        if world_size is not None and world_size != m_world:
            raise ValueError(f"world_size={world_size} but the DeviceMesh has {m_world} ranks")
        if rank is not None and rank != m_rank:
            raise ValueError(f"rank={rank} but this process is rank {m_rank} of the DeviceMesh")
        return m_world, m_rank, group
    if dist.is_available() and dist.is_initialized():
        d_world, d_rank = dist.get_world_size(group), dist.get_rank(group)
        if world_size is not None and world_size != d_world:
            raise ValueError(f"world_size={world_size} but the torch.distributed group has {d_world} ranks")
        if rank is not None and rank != d_rank:
            raise ValueError(f"rank={rank} but this process is rank {d_rank} of its group")
        return d_world, d_rank, group
    if world_size is None:
        raise ValueError("world_size is needed when torch.distributed is not initialised")
    S._check_world(world_size)
    if rank is None:
        if world_size == 1:
            return 1, 0, group
        raise ValueError("rank is needed when torch.distributed is not initialised "
                         "(or call torch.distributed.init_process_group first)")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return world_size, rank, group


def _linear_like(m: nn.Module, name: str) -> nn.Module:
    if isinstance(m, (ColumnParallelQuantLinear, RowParallelQuantLinear)):
        raise ValueError(f"{name} is already sharded")
    if not isinstance(m, (QuantLinear, nn.Linear)):
        raise TypeError(f"{name} must be a lowbit.QuantLinear or an nn.Linear, got {type(m).__name__}")
    return m


def _row_qweight(m: nn.Module):
    return m.qweight if isinstance(m, QuantLinear) else None


def _needs_gather(m: nn.Module, bounds: List[int]) -> bool:
    """True when m's perm reads, in some shard, features outside that shard's input slice."""
    qw = _row_qweight(m)
    if qw is None or qw.perm is None:
        return False
    for lo, hi in zip(bounds, bounds[1:]):
        p = qw.perm[lo:hi]
        if not bool(((p >= lo) & (p < hi)).all()):
            return True
    return False


def _row_gather(m: nn.Module, bounds: List[int], act_order: str, name: str) -> bool:
    if not _needs_gather(m, bounds):
        return False
    if act_order == "gather":
        return True
    raise ValueError(
        f"{name}: its perm (act-order) reads input features across the row-parallel split {bounds}, "
        "so no rank holds the features its stored columns need. Pass act_order='gather' (the "
        "rank all-gathers its input first: one more collective per such layer) or re-quantize with "
        "the permutation kept within shards")


def _check_row_bounds(m: nn.Module, bounds: List[int], name: str, cause: str) -> None:
    qw = _row_qweight(m)
    if qw is None:
        return
    try:
        S.check_k_bounds(qw, bounds)
    except ValueError as e:
        raise ValueError(f"{name} (row-parallel; its K split is fixed by {cause}): {e}") from None


def _head_bounds(attn: nn.Module, name: str, world: int, uneven: bool):
    q, k, o = attn.q_proj, attn.k_proj, attn.o_proj
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        raise ValueError(f"{name}: attention module has no head_dim attribute")
    n_q, n_kv = q.out_features, k.out_features
    if n_q % head_dim or n_kv % head_dim:
        raise ValueError(f"{name}: q/k output sizes {n_q}/{n_kv} are not multiples of head_dim={head_dim}")
    H, KV = n_q // head_dim, n_kv // head_dim
    if H % KV:
        raise ValueError(f"{name}: {H} query heads are not a multiple of {KV} kv heads")
    rep = H // KV
    if KV < world:
        raise ValueError(f"{name}: {KV} key/value heads cannot be shared by world_size={world} "
                         "(each rank needs at least one whole kv head)")
    if KV % world and not uneven:
        split = S.balanced_bounds(KV, world)
        raise ValueError(f"{name}: num_key_value_heads={KV} is not divisible by world_size={world}; "
                         f"pass uneven=True to give the ranks "
                         f"{[b - a for a, b in zip(split, split[1:])]} kv heads")
    kv = S.balanced_bounds(KV, world)
    q_bounds = [h * rep * head_dim for h in kv]
    kv_bounds = [h * head_dim for h in kv]
    if o.in_features != n_q:
        raise ValueError(f"{name}: o_proj takes {o.in_features} features but q_proj gives {n_q}")
    return q_bounds, kv_bounds, kv


def _mlp_bounds(mlp: nn.Module, name: str, world: int, uneven: bool) -> List[int]:
    inter = mlp.gate_proj.out_features
    if mlp.up_proj.out_features != inter or mlp.down_proj.in_features != inter:
        raise ValueError(f"{name}: gate/up/down sizes disagree ({mlp.gate_proj.out_features}, "
                         f"{mlp.up_proj.out_features}, {mlp.down_proj.in_features})")
    qw = _row_qweight(mlp.down_proj)
    align = 1 if qw is None else S.k_alignment(qw)
    if uneven:
        return S.balanced_bounds(inter, world, align)
    try:
        b = S.even_bounds(inter, world)
    except ValueError as e:
        raise ValueError(f"{name}: intermediate size: {e}; pass uneven=True to split it on "
                         f"multiples of {align}") from None
    if any(v % align for v in b[1:-1]):
        raise ValueError(f"{name}.{MLP_OUT} (row-parallel): the even split {b} of the intermediate "
                         f"size {inter} cuts its groups (cuts must be multiples of {align}); pass "
                         f"uneven=True for {S.balanced_bounds(inter, world, align)}")
    return b


def _set(parent: nn.Module, child: str, module: nn.Module) -> None:
    setattr(parent, child, module)


def shard_model(model: nn.Module, world_size: Optional[int] = None, rank: Optional[int] = None,
                group=None, *, mesh=None, uneven: bool = False, act_order: str = "error",
                dq_fallback: str = "expand") -> nn.Module:
    """Replace, in place, the projections of every attention and MLP block of ``model`` by this
    rank's column-/row-parallel shards (see the module docstring); returns ``model``.

    ``world_size`` / ``rank`` / ``group``: from torch.distributed when it is initialised (given
    values are checked against it), else both must be given (e.g. to shard offline for
    :func:`lowbit.parallel.save_shards`). ``mesh``: a 1-D ``torch.distributed.DeviceMesh``
    instead (its group, size and local rank). ``uneven``: allow uneven head / intermediate
    splits. ``act_order``: "error" or "gather" for row-parallel weights whose perm crosses shard
    boundaries. ``dq_fallback``: see :mod:`lowbit.parallel.shard`.

    The weights are sliced on their current device; the unsharded tensors are freed once
    nothing else refers to them. Run it before moving a big model to the GPU to keep only the
    shard there.
    """
    world, rank, group = resolve_world(world_size, rank, group, mesh)
    return shard_model_as(model, world, rank, group, uneven=uneven, act_order=act_order,
                          dq_fallback=dq_fallback)


def shard_model_as(model: nn.Module, world_size: int, rank: int, group=None, *, uneven: bool = False,
                   act_order: str = "error", dq_fallback: str = "expand") -> nn.Module:
    """:func:`shard_model` for the given world size and rank, whatever torch.distributed says
    (offline sharding: one process building every rank's shards)."""
    if act_order not in ("error", "gather"):
        raise ValueError(f"act_order must be 'error' or 'gather', got {act_order!r}")
    S._check_world(world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    world = world_size
    attns = [(n, m) for n, m in model.named_modules()
             if all(hasattr(m, c) for c in ATTENTION + (ATTENTION_OUT,))]
    mlps = [(n, m) for n, m in model.named_modules()
            if all(hasattr(m, c) for c in MLP_IN + (MLP_OUT,))]
    if not attns and not mlps:
        raise ValueError("shard_model found no attention block (q_proj, k_proj, v_proj, o_proj) and "
                         "no MLP block (gate_proj, up_proj, down_proj) in the model")
    plans = []  # validate everything before changing anything
    for name, attn in attns:
        for c in ATTENTION + (ATTENTION_OUT,):
            _linear_like(getattr(attn, c), f"{name}.{c}")
        q_b, kv_b, kv_heads = _head_bounds(attn, name, world, uneven)
        o = attn.o_proj
        _check_row_bounds(o, q_b, f"{name}.{ATTENTION_OUT}", "the head split")
        plans.append(("attn", name, attn, q_b, kv_b, kv_heads, _row_gather(o, q_b, act_order, f"{name}.o_proj")))
    for name, mlp in mlps:
        for c in MLP_IN + (MLP_OUT,):
            _linear_like(getattr(mlp, c), f"{name}.{c}")
        b = _mlp_bounds(mlp, name, world, uneven)
        plans.append(("mlp", name, mlp, b, None, None, _row_gather(mlp.down_proj, b, act_order, f"{name}.down_proj")))
    for kind, name, mod, b, kv_b, kv_heads, gather in plans:
        if kind == "attn":
            for c, bb in (("q_proj", b), ("k_proj", kv_b), ("v_proj", kv_b)):
                _set(mod, c, ColumnParallelQuantLinear.from_linear(getattr(mod, c), world, rank,
                                                                   bounds=bb, group=group))
            _set(mod, "o_proj", RowParallelQuantLinear.from_linear(
                mod.o_proj, world, rank, bounds=b, group=group, gather_input=gather,
                dq_fallback=dq_fallback))
            local_kv = kv_heads[rank + 1] - kv_heads[rank]
            rep = (b[-1] // mod.head_dim) // kv_heads[-1]
            for a in _HEAD_ATTRS:
                if isinstance(getattr(mod, a, None), int):
                    setattr(mod, a, local_kv * rep)
            for a in _KV_HEAD_ATTRS:
                if isinstance(getattr(mod, a, None), int):
                    setattr(mod, a, local_kv)
        else:
            for c in MLP_IN:
                _set(mod, c, ColumnParallelQuantLinear.from_linear(getattr(mod, c), world, rank,
                                                                   bounds=b, group=group))
            _set(mod, MLP_OUT, RowParallelQuantLinear.from_linear(
                mod.down_proj, world, rank, bounds=b, group=group, gather_input=gather,
                dq_fallback=dq_fallback))
    model._lowbit_tp = {"world_size": world, "rank": rank, "uneven": uneven, "act_order": act_order}
    return model


def parallel_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Name -> ColumnParallelQuantLinear / RowParallelQuantLinear of a sharded model."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (ColumnParallelQuantLinear, RowParallelQuantLinear))}


def set_group(model: nn.Module, group) -> None:
    """Point every parallel layer of ``model`` at process group ``group`` (e.g. after loading
    shards built offline)."""
    for m in parallel_layers(model).values():
        m.group = group
