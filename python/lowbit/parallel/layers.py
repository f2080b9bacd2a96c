"""Column- and row-parallel Linear layers on torch.distributed (Megatron-LM's split).

Each holds its rank's shard as an ordinary local layer, a :class:`lowbit.QuantLinear` (the
packed shard, multiplied by ``lowbit.linear``: the C++ kernels on the CPU, the Triton kernels on
CUDA) or a float ``nn.Linear`` shard (the float baseline), and adds the communication:

* :class:`ColumnParallelQuantLinear`: output features ``[n_r, n_{r+1})``; the input is the full
  (replicated) ``x``; the output is the local slice, or the full output with
  ``gather_output=True`` (an all-gather). Its bias slice lives in the local layer.
* :class:`RowParallelQuantLinear`: input features ``[k_r, k_{r+1})``; the input is the local slice
  of ``x`` (what a column-parallel layer before it produced); the partial products are summed
  with ``all_reduce``, then the bias is added once (on the summed output, identically on every
  rank). With ``gather_input=True`` the rank instead all-gathers its input and reads the
  features its stored columns need: the way to shard a weight whose act-order ``perm`` mixes
  features across shards.

Collectives use the given process group (None: the default group); a world of one rank runs
no collective at all, so these layers also work without torch.distributed. 16-bit activations:
each rank's partial output is rounded to the activation dtype before the all-reduce sums it
(as in Megatron); float32 activations stay within lowbit.testing's float32 bound.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..nn import QuantLinear
from ..qweight import TENSOR_FIELDS
from . import shard as S


def gather_last_dim(t: torch.Tensor, bounds: Sequence[int], rank: int, group=None) -> torch.Tensor:
    """All-gather ``t`` (this rank's ``[..., bounds[rank+1] - bounds[rank]]`` slice) along the
    last dimension into ``[..., bounds[-1]]``; shares may differ in size (padded for the
    collective, trimmed after)."""
    world = len(bounds) - 1
    if world == 1:
        return t
    sizes = [bounds[r + 1] - bounds[r] for r in range(world)]
    if t.shape[-1] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {t.shape[-1]} features, expected {sizes[rank]} "
                         f"(bounds {list(bounds)})")
    width = max(sizes)
    t = t.contiguous()
    if t.shape[-1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)


def _check_rank(bounds: Sequence[int], rank: int) -> List[int]:
    b = [int(v) for v in bounds]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(b) - 1:
        raise ValueError(f"rank must be an int in [0, {len(b) - 1}), got {rank!r}")
    return b


# QuantLinear buffers these layers know how to shard: the packed weight's fields and the
# LLM.int8-style outlier columns (input columns kept in float, see lowbit.nn.QuantLinear).
_OUTLIER_BUFFERS = ("outlier_cols", "outlier_weight")
_KNOWN_BUFFERS = tuple("weight_" + f for f in TENSOR_FIELDS) + _OUTLIER_BUFFERS


def _local_of(layer: nn.Module, what: str):
    if isinstance(layer, QuantLinear):
        unknown = [k for k, v in layer._buffers.items() if v is not None and k not in _KNOWN_BUFFERS]
        if unknown:
            raise ValueError(f"{what}: lowbit.parallel does not know how to shard QuantLinear "
                             f"buffer(s) {unknown}")
        return layer.qweight, layer.bias
    if isinstance(layer, nn.Linear):
        return None, layer.bias
    raise TypeError(f"{what} expects a lowbit.QuantLinear or an nn.Linear, got {type(layer).__name__}")


def _outliers(layer: nn.Module):
    """(outlier_cols, outlier_weight) of a QuantLinear, or (None, None)."""
    if not isinstance(layer, QuantLinear):
        return None, None
    return layer._buffers.get("outlier_cols"), layer._buffers.get("outlier_weight")


def _quant_local(qw, bias, cols, ow) -> QuantLinear:
    if cols is None or cols.numel() == 0:
        return QuantLinear.from_quantized(qw, bias)
    return QuantLinear.from_quantized(qw, bias, outlier_cols=cols, outlier_weight=ow)


def _bias_param(b: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    return None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)


class ColumnParallelQuantLinear(nn.Module):
    """Rank ``rank``'s output features ``[bounds[rank], bounds[rank+1])`` of a Linear ``[N, K]``.

    ``local`` is a QuantLinear (or float nn.Linear) of shape ``[n_local, K]`` with its bias
    slice. ``forward(x [..., K]) -> [..., n_local]``, or ``[..., N]`` with ``gather_output``.
    Build one with :meth:`from_linear`.
    """

    def __init__(self, local: nn.Module, bounds: Sequence[int], rank: int, group=None,
                 gather_output: bool = False):
        super().__init__()
        b = _check_rank(bounds, rank)
        _local_of(local, "ColumnParallelQuantLinear")
        n_local = local.out_features
        if n_local != b[rank + 1] - b[rank]:
            raise ValueError(f"local layer has {n_local} output features, bounds {b} give rank "
                             f"{rank} {b[rank + 1] - b[rank]}")
        self.local = local
        self.bounds = b
        self.rank = rank
        self.world_size = len(b) - 1
        self.group = group
        self.gather_output = bool(gather_output)
        self.in_features = local.in_features
        self.out_features = b[-1]

    @classmethod
    def from_linear(cls, layer: nn.Module, world_size: int, rank: int, *,
                    bounds: Optional[Sequence[int]] = None, group=None,
                    gather_output: bool = False) -> "ColumnParallelQuantLinear":
        """Shard a QuantLinear or nn.Linear ``[N, K]`` by output features (even split unless
        ``bounds`` is given; any row boundary is allowed)."""
        qw, bias = _local_of(layer, "ColumnParallelQuantLinear.from_linear")
        N = layer.out_features
        b = S.even_bounds(N, world_size) if bounds is None else S.check_bounds(bounds, N, "N")
        if len(b) != world_size + 1:
            raise ValueError(f"bounds {b} must have world_size + 1 = {world_size + 1} entries")
        _check_rank(b, rank)
        lo, hi = b[rank], b[rank + 1]
        b_local = None if bias is None else S.shard_tensor(bias.detach(), 0, lo, hi)
        if qw is not None:
            # outlier columns are input features: every output shard keeps them, with its rows
            cols, ow = _outliers(layer)
            local = _quant_local(S.shard_rows(qw, lo, hi), b_local,
                                 None if cols is None else S.shard_tensor(cols, 0, 0, cols.numel()),
                                 None if ow is None else S.shard_tensor(ow, 0, lo, hi))
        else:
            local = _float_linear(S.shard_tensor(layer.weight.detach(), 0, lo, hi), b_local)
        return cls(local, b, rank, group=group, gather_output=gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if self.gather_output:
            y = gather_last_dim(y, self.bounds, self.rank, self.group)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bounds={self.bounds}, gather_output={self.gather_output}")


class RowParallelQuantLinear(nn.Module):
    """Rank ``rank``'s input features ``[bounds[rank], bounds[rank+1])`` of a Linear ``[N, K]``.

    ``forward(x [..., k_local]) -> [..., N]`` (``x [..., K]``-wide local slices gathered first
    when ``gather_input``): the local partial product, all-reduced (sum) over ``group``, plus the
    full bias once. ``local`` has no bias; ``bias`` is the full ``[N]`` bias or None. With
    ``gather_input``, ``feature_index`` (int64 [k_local]) names the input features the local
    stored columns read and ``feature_scale`` (float32 [k_local] or None) divides them (see
    :func:`lowbit.parallel.shard.shard_cols_gathered`). Build one with :meth:`from_linear`.
    """

    def __init__(self, local: nn.Module, bounds: Sequence[int], rank: int, bias=None, group=None,
                 gather_input: bool = False, feature_index: Optional[torch.Tensor] = None,
                 feature_scale: Optional[torch.Tensor] = None):
        super().__init__()
        b = _check_rank(bounds, rank)
        _local_of(local, "RowParallelQuantLinear")
        if local.bias is not None:
            raise ValueError("the local layer of a RowParallelQuantLinear must have no bias (the "
                             "bias is added once, after the all-reduce)")
        k_local = local.in_features
        if k_local != b[rank + 1] - b[rank]:
            raise ValueError(f"local layer has {k_local} input features, bounds {b} give rank "
                             f"{rank} {b[rank + 1] - b[rank]}")
        if gather_input and feature_index is None:
            raise ValueError("gather_input needs feature_index")
        if not gather_input and (feature_index is not None or feature_scale is not None):
            raise ValueError("feature_index / feature_scale apply with gather_input=True only")
        self.local = local
        self.bounds = b
        self.rank = rank
        self.world_size = len(b) - 1
        self.group = group
        self.gather_input = bool(gather_input)
        self.in_features = b[-1]
        self.out_features = local.out_features
        self.register_buffer("feature_index", feature_index)
        self.register_buffer("feature_scale", feature_scale)
        self.bias = _bias_param(bias)

    @classmethod
    def from_linear(cls, layer: nn.Module, world_size: int, rank: int, *,
                    bounds: Optional[Sequence[int]] = None, group=None, gather_input: bool = False,
                    dq_fallback: str = "expand") -> "RowParallelQuantLinear":
        """Shard a QuantLinear or nn.Linear ``[N, K]`` by input features. Cuts must keep the
        format's groups whole (ValueError naming the sizes otherwise); ``bounds`` defaults to an
        even split. A weight whose ``perm`` mixes features across shards needs
        ``gather_input=True``."""
        qw, bias = _local_of(layer, "RowParallelQuantLinear.from_linear")
        K = layer.in_features
        if qw is not None:
            b = (S.default_bounds(qw, 1, world_size) if bounds is None
                 else S.check_k_bounds(qw, bounds))
        else:
            b = S.even_bounds(K, world_size) if bounds is None else S.check_bounds(bounds, K, "K")
        if len(b) != world_size + 1:
            raise ValueError(f"bounds {b} must have world_size + 1 = {world_size + 1} entries")
        _check_rank(b, rank)
        lo, hi = b[rank], b[rank + 1]
        index = scale = None
        if qw is None:
            local = _float_linear(S.shard_tensor(layer.weight.detach(), 1, lo, hi), None)
            if gather_input:
                index = torch.arange(lo, hi, device=layer.weight.device)
        elif gather_input:
            if _outliers(layer)[0] is not None:
                raise ValueError("gather_input (for a perm that crosses the split) does not combine "
                                 "with outlier columns: their float term reads the untransformed input")
            sq, index, scale = S.shard_cols_gathered(qw, lo, hi, dq_fallback=dq_fallback)
            local = QuantLinear.from_quantized(sq, None)
        else:
            # outlier columns are input features: each rank keeps those in its slice
            cols, ow = _outliers(layer)
            if cols is not None:
                keep = (cols >= lo) & (cols < hi)
                cols, ow = cols[keep] - lo, ow[:, keep].contiguous()
            local = _quant_local(S.shard_cols(qw, lo, hi, dq_fallback=dq_fallback), None, cols, ow)
        return cls(local, b, rank, bias=None if bias is None else bias.detach(), group=group,
                   gather_input=gather_input, feature_index=index, feature_scale=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_input:
            x = gather_last_dim(x, self.bounds, self.rank, self.group)
            dtype = x.dtype
            x = x.index_select(-1, self.feature_index)
            if self.feature_scale is not None:
                # As QuantizedWeight.transform_input: float32 division; the CPU kernels take the
                # float32 result, elsewhere it goes back to the activation dtype.
                x = x.to(torch.float32) / self.feature_scale
                if x.device.type != "cpu":
                    x = x.to(dtype)
            y = self.local(x).to(dtype)
        else:
            y = self.local(x)
        if self.world_size > 1:
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        if self.bias is not None:
            # bias added in float32, then one rounding, as lowbit.reference.linear does
            y = (y.to(torch.float32) + self.bias.to(torch.float32)).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bounds={self.bounds}, bias={self.bias is not None}, gather_input={self.gather_input}")


def _float_linear(w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin
