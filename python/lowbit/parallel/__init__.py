"""Tensor parallelism for lowbit layers on torch.distributed (NCCL on GPUs, gloo on CPUs).

    import torch.distributed as dist, lowbit.parallel as tp
    dist.init_process_group("nccl")                    # e.g. under torchrun --nproc_per_node 2
    lowbit.evaluate.quantize_linears(model, "int4")     # or any model of QuantLinear layers
    tp.shard_model(model)                               # Megatron split, this rank's shards
    model.to(f"cuda:{dist.get_rank()}")
    logits = model(ids).logits                          # the same on every rank

* :mod:`.shard`: split a :class:`lowbit.QuantizedWeight` by output features (column) or input
  features (row) without dequantizing; shards dequantize bit for bit to slices of the weight.
* :mod:`.layers`: :class:`ColumnParallelQuantLinear`, :class:`RowParallelQuantLinear`.
* :mod:`.model`: :func:`shard_model` (also on a 1-D DeviceMesh: ``shard_model(model, mesh=m)``).
* :mod:`.io`: :func:`save_shards` / :func:`shard_and_save` / :func:`load_shards`, one
  safetensors file per rank plus a JSON manifest.
"""

from .io import load_shards, read_manifest, save_shards, shard_and_save
from .layers import ColumnParallelQuantLinear, RowParallelQuantLinear, gather_last_dim
from .model import parallel_layers, set_group, shard_model, shard_model_as
from .shard import (balanced_bounds, check_k_bounds, even_bounds, k_alignment, shard_cols,
                    shard_cols_gathered, shard_rows, shard_weight)

__all__ = ["ColumnParallelQuantLinear", "RowParallelQuantLinear", "balanced_bounds",
           "check_k_bounds", "even_bounds", "gather_last_dim", "k_alignment", "load_shards",
           "parallel_layers", "read_manifest", "save_shards", "set_group", "shard_and_save",
           "shard_cols", "shard_cols_gathered", "shard_model", "shard_model_as", "shard_rows",
           "shard_weight"]
