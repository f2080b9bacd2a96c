"""QuantLinear: a drop-in replacement for nn.Linear whose weight stays packed."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from . import formats as F
from .ops import linear, quantize_weight
from .qweight import TENSOR_FIELDS, QuantizedWeight
from .reference import resolve_options


def _probe(cfg: Dict[str, Any]) -> QuantizedWeight:
    """An empty QuantizedWeight with the settings of ``cfg`` (QuantizedWeight.config()), whose
    expected_layout() gives the buffers a layer with those settings holds."""
    K = int(cfg["shape"][1])
    return QuantizedWeight(cfg["fmt"], tuple(cfg["shape"]), torch.empty(0), torch.empty(0),
                           group_size=cfg["group_size"], symmetric=cfg["symmetric"],
                           double_quant=cfg["double_quant"],
                           zero_point=cfg.get("zero_point", "int"),
                           perm=torch.empty(K, dtype=torch.int64) if cfg.get("has_perm") else None,
                           input_scale=(torch.empty(K, dtype=torch.float32)
                                        if cfg.get("has_input_scale") else None),
                           validate=False)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W held only as a :class:`QuantizedWeight` (no float copy).

    The packed tensors are buffers (``weight_data``, ``weight_scales`` and, where the format
    has them, ``weight_zeros``, ``weight_dq_scale``, ``weight_dq_offset``, and the optional
    input transforms ``weight_perm`` / ``weight_input_scale``); the format
    settings travel in the state dict's extra state, so ``state_dict()`` /
    ``load_state_dict()`` round-trip bit-exactly and a mismatched checkpoint is refused.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int4",
                 *, group_size: Optional[int] = None, symmetric: Optional[bool] = None,
                 double_quant: bool = False, zero_point: Optional[str] = None, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        spec = F.get_format(fmt)
        group_size = F.check_group_size(spec, group_size)
        symmetric, zero_point = resolve_options(spec, symmetric, zero_point)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        # Empty tensors of the right layout, to be filled by from_linear / load_state_dict.
        probe = _probe({"fmt": spec.name, "shape": (self.out_features, self.in_features),
                        "group_size": group_size, "symmetric": symmetric,
                        "double_quant": double_quant, "zero_point": zero_point})
        for name in TENSOR_FIELDS:
            want = probe.expected_layout()[name]
            t = None if want is None else torch.zeros(want[0], dtype=want[1], device=device)
            self.register_buffer("weight_" + name, t)
        self._config = probe.config()
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device,
                                                 dtype=dtype or torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int4", **format_options) -> "QuantLinear":
        """Quantize an nn.Linear (its weight is read, never kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), fmt, **format_options)
        return cls.from_quantized(qw, linear.bias)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Wrap an existing QuantizedWeight (shares its tensors)."""
        N, K = qw.shape
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = K, N
        for name in TENSOR_FIELDS:
            m.register_buffer("weight_" + name, getattr(qw, name))
        m._config = qw.config()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            m.register_parameter("bias", None)
        return m

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight (one object kept across calls, so backends can cache a repacked
        layout on it; rebuilt whenever the buffers change: .to(), load_state_dict)."""
        qw = self.__dict__.get("_qw")
        if qw is None or qw.data is not self.weight_data:
            qw = self._make_qweight()
            self.__dict__["_qw"] = qw
        return qw

    def _make_qweight(self) -> QuantizedWeight:
        c = self._config
        return QuantizedWeight(c["fmt"], tuple(c["shape"]), self.weight_data, self.weight_scales,
                               self.weight_zeros, group_size=c["group_size"],
                               symmetric=c["symmetric"], double_quant=c["double_quant"],
                               dq_scale=self.weight_dq_scale, dq_offset=self.weight_dq_offset,
                               perm=self.weight_perm, input_scale=self.weight_input_scale,
                               zero_point=c.get("zero_point", "int"), validate=False)

    @property
    def fmt(self) -> str:
        return self._config["fmt"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the float32 scales and corrupt the format:
        # the packed tensors follow device moves but always keep their own dtypes.
        for name in TENSOR_FIELDS:
            t = self._buffers.get("weight_" + name)
            if t is None:
                continue
            moved = fn(t)
            self._buffers["weight_" + name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        self.__dict__.pop("_qw", None)
        packed = {k: self._buffers.pop(k) for k in list(self._buffers) if k.startswith("weight_")}
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._buffers.update(packed)
        if self.weight_data.is_cuda:
            # Repack into the GPU kernels' layout now, at load time, so the first forward (or a
            # CUDA-graph capture) finds it ready.
            from .ops import _gpu_kernels
            kernels = _gpu_kernels()
            if kernels is not None:
                kernels.prepare(self.qweight)
        return result

    # ---- state dict ---------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {"lowbit_version": 1, **self._config}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("lowbit_version") != 1:
            raise ValueError(f"not a lowbit QuantLinear state (extra state: {state!r})")
        try:
            cfg = {k: state[k] for k in ("fmt", "shape", "group_size", "symmetric", "double_quant")}
        except KeyError as e:
            raise ValueError(f"lowbit QuantLinear state is missing {e}") from None
        cfg.update({k: bool(state.get(k, False)) for k in ("has_perm", "has_input_scale")})
        cfg["zero_point"] = state.get("zero_point", "int")
        if list(cfg["shape"]) != [self.out_features, self.in_features]:
            raise ValueError(f"checkpoint weight shape {cfg['shape']} does not match this layer "
                             f"[{self.out_features}, {self.in_features}]")
        if cfg != self._config:
            # Different format settings: adopt them, re-shaping the buffers so the tensors
            # that follow in load_state_dict fit (and are checked against the new layout).
            probe = _probe(cfg)
            device = self.weight_data.device
            for name in TENSOR_FIELDS:
                want = probe.expected_layout()[name]
                setattr(self, "weight_" + name,
                        None if want is None else torch.zeros(want[0], dtype=want[1], device=device))
            self._config = cfg

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Extra state first, so the buffers have the checkpoint's layout before they are filled.
        key = prefix + "_extra_state"
        if key in state_dict:
            self.set_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.__dict__.pop("_qw", None)  # buffers were copied into in place: drop derived caches
        try:
            self.qweight.validate()
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e}")

    def extra_repr(self) -> str:
        c = self._config
        opts = f"group_size={c['group_size']}"
        if c["fmt"] == "int4":
            opts += f", symmetric={c['symmetric']}"
        if c["fmt"] == "nf4":
            opts += f", double_quant={c['double_quant']}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={c['fmt']!r}, {opts}")
