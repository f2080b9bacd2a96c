"""The CPU backend: lowbit._C (plain C++ kernels behind pybind11), called with raw pointers.

Checks here turn anything that would crash the C++ side into a Python exception; the C++
binding re-checks shapes and strides.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .qweight import QuantizedWeight

try:
    from . import _C  # noqa: F401
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - only on a broken install
    _C = None
    _IMPORT_ERROR = e

_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FMT_IDS = {"int8": 0, "int4": 1, "nf4": 2}


def ext():
    """The compiled extension, or a clear error if it failed to build/import."""
    if _C is None:
        raise RuntimeError(f"lowbit's C++ extension lowbit._C is not available ({_IMPORT_ERROR}); "
                           "reinstall lowbit (pip install .) to build it")
    return _C


def num_threads() -> int:
    """LOWBIT_NUM_THREADS if set, else torch.get_num_threads()."""
    env = os.environ.get("LOWBIT_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"LOWBIT_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"LOWBIT_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    return torch.get_num_threads()


def _weight_args(qw: QuantizedWeight):
    N, K = qw.shape
    for name, t in qw.tensors().items():
        if t.device.type != "cpu":
            raise ValueError(f"weight tensor '{name}' is on {t.device}, expected cpu")
        if not t.is_contiguous():
            raise ValueError(f"weight tensor '{name}' must be contiguous")
    group = K if qw.group_size == -1 else qw.group_size

    def p(t):
        return 0 if t is None else t.data_ptr()

    return (_FMT_IDS[qw.fmt], N, K, group, qw.symmetric, qw.double_quant,
            qw.data.data_ptr(), qw.data.stride(0), qw.scales.data_ptr(), p(qw.zeros),
            p(qw.dq_scale), p(qw.dq_offset))


def linear(x2d: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor],
           out: torch.Tensor, isa: str = "") -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T + bias. x2d must have unit inner stride; bias float32 or None."""
    if x2d.stride(1) != 1 and x2d.shape[1] > 1:
        x2d = x2d.contiguous()
    ldx = x2d.stride(0) if x2d.shape[0] > 1 else x2d.shape[1]
    ext().linear(*_weight_args(qw), x2d.data_ptr(), _DTYPE_IDS[x2d.dtype], x2d.shape[0], max(ldx, x2d.shape[1]),
                 0 if bias is None else bias.data_ptr(), out.data_ptr(), _DTYPE_IDS[out.dtype],
                 out.stride(0) if out.shape[0] > 1 else out.shape[1], num_threads(), isa)
    return out


def dequantize(qw: QuantizedWeight, dtype: torch.dtype, isa: str = "") -> torch.Tensor:
    out = torch.empty(qw.shape, dtype=dtype)
    ext().dequantize(*_weight_args(qw), out.data_ptr(), _DTYPE_IDS[dtype], out.stride(0),
                     num_threads(), isa)
    return out
