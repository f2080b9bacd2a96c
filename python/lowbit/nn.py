"""QuantLinear: a drop-in replacement for nn.Linear whose weight stays packed."""

from __future__ import annotations

import weakref
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from . import formats as F
from .ops import linear, quantize_weight
from .qweight import TENSOR_FIELDS, QuantizedWeight
from .reference import resolve_options

# each QuantizedWeight field and the QuantLinear buffer that holds it
_FIELD_BUFFERS = tuple((name, "weight_" + name) for name in TENSOR_FIELDS)


def is_conv1d(mod: nn.Module) -> bool:
    """Whether ``mod`` is a transformers ``Conv1D`` (GPT-2 and the models built on its code): a
    linear layer that stores its weight transposed, ``[in, out]``, and computes
    ``x @ weight + bias``. Recognised by its class name and attributes, so transformers is not
    imported."""
    if type(mod).__name__ != "Conv1D" or isinstance(mod, nn.Linear):
        return False
    w = getattr(mod, "weight", None)
    nf = getattr(mod, "nf", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(nf, int)
            and w.shape[1] == nf)


def is_linear_like(mod: nn.Module) -> bool:
    """An ``nn.Linear`` (a subclass too, unless it overrides ``forward`` with something else
    than ``x @ W^T + b``: a router returning a tuple, a grouped linear; see
    :func:`computes_linear`) or a transformers ``Conv1D``: the layers lowbit quantizes."""
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward or computes_linear(mod)
    return is_conv1d(mod)


# nn.Linear subclasses with their own forward, probed once each: module -> computes x W^T + b
_PROBED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def computes_linear(mod: nn.Module) -> bool:
    """Whether an nn.Linear whose class overrides ``forward`` still computes exactly
    ``x @ W^T + b`` (Falcon's ``FalconLinear`` is such a rewrite), so that a QuantLinear can
    replace it: its forward is called once (without hooks) on a seeded random [2, 3, in] input
    and must return a tensor of that function's shape and dtype, equal to ``F.linear`` up to
    rounding. A forward that fails, returns something else (a router's tuple), scales, routes
    or groups differently does not. Weights on the meta device cannot be probed: False. The
    answer is kept per module."""
    if not isinstance(mod, nn.Linear):
        return False
    if type(mod).forward is nn.Linear.forward:
        return True
    known = _PROBED.get(mod)
    if known is not None:
        return known
    w, b = mod.weight, mod.bias
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type == "meta" \
            or not w.is_floating_point():
        return False  # not probed, not remembered: the weights may be loaded later
    ok = False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, w.shape[1], generator=g).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            want = torch.nn.functional.linear(x, w, b)
            got = type(mod).forward(mod, x.clone())
        if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype:
            tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
            err = float((got.float() - want.float()).norm())
            ok = err <= tol * max(float(want.float().norm()), 1e-12)
    except Exception:  # a forward that needs other arguments or state: not a plain linear
        ok = False
    _PROBED[mod] = ok
    return ok


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an nn.Linear or a Conv1D (a transposed view for Conv1D)."""
    return mod.weight.t() if is_conv1d(mod) else mod.weight


def conv1d_to_linear(mod: nn.Module) -> nn.Linear:
    """An nn.Linear computing what the Conv1D ``mod`` computes (its weight transposed into a
    contiguous ``[out, in]`` copy; the bias shared)."""
    K, N = mod.weight.shape
    lin = nn.Linear(K, N, bias=mod.bias is not None, device="meta")
    lin.weight = nn.Parameter(mod.weight.detach().t().contiguous(),
                              requires_grad=mod.weight.requires_grad)
    if mod.bias is not None:
        lin.bias = mod.bias
    lin.train(mod.training)
    return lin


def linear_to_conv1d(lin: nn.Linear, like: nn.Module) -> nn.Module:
    """The Conv1D ``like`` again, with the (possibly modified) weight of ``lin``, the
    nn.Linear that :func:`conv1d_to_linear` made of it."""
    with torch.no_grad():
        like.weight.data = lin.weight.detach().t().contiguous()
    if lin.bias is not None:
        like.bias = lin.bias
    return like


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


class DequantizedWeight(torch.Tensor):
    """What ``QuantLinear.weight`` returns: a float copy of the packed weight. Any operation
    gives plain tensors. In place, only a scaling by a positive finite scalar (``mul_``,
    ``div_``, ``*=``, ``/=``) is allowed: it is applied to the layer's packed weight too, by
    scaling its scales (and float offsets, double-quantization constants and float outlier
    columns), exactly for powers of two (RWKV rescales two weights of every block that way when
    it switches between training and inference). Any other in-place operation (``copy_``,
    ``x[i] = v``, ``add_``, ...) raises, since the change would be lost with the copy."""

    _lowbit_owner = None  # weakref to the QuantLinear it was decoded from

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        inplace = (name.endswith("_") and not name.endswith("__")) or name == "__setitem__" or (
            name.startswith("__i") and name.endswith("__") and name[3:-2] in _INPLACE_DUNDERS)
        if inplace:
            ref = getattr(args[0], "_lowbit_owner", None) if args else None
            owner = ref() if ref is not None else None
            op = _SCALINGS.get(name)
            c = _positive_scalar(args[1]) if op and len(args) == 2 and not kwargs else None
            if owner is None or c is None:
                raise RuntimeError(
                    f"in-place {name} on a QuantLinear's weight: it is a float copy decoded from "
                    "the packed weight, so the change would be lost (only a scaling by a positive "
                    "scalar, mul_ / div_, is applied to the packed weight). Change the float "
                    "model before quantizing it (or quantize the changed weight again)")
            owner.scale_weight_(c, divide=op == "div")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


_SCALINGS = {"mul_": "mul", "__imul__": "mul", "div_": "div", "__itruediv__": "div"}


def _positive_scalar(v) -> Optional[float]:
    """``v`` as a float when it is a positive finite real scalar (a number or a one-element
    tensor), else None."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            return None
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if np.isfinite(v) and v > 0 else None


_INPLACE_DUNDERS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
                    "or", "xor", "lshift", "rshift"}


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W held only as a :class:`QuantizedWeight` (no float copy).

    The packed tensors are buffers (``weight_data``, ``weight_scales`` and, where the format
    has them, ``weight_zeros``, ``weight_dq_scale``, ``weight_dq_offset``, and the optional
    input transforms ``weight_perm`` / ``weight_input_scale``); the format
    settings travel in the state dict's extra state, so ``state_dict()`` /
    ``load_state_dict()`` round-trip bit-exactly and a mismatched checkpoint is refused.

    Outlier columns (LLM.int8-style, :mod:`lowbit.quantize.outliers`): optionally a few input
    columns of W are kept in float, outside the packed weight. Then ``outlier_cols`` (int64
    ``[n]``, ascending, distinct) and ``outlier_weight`` (``[N, n]``, float, the original
    values of those columns) are buffers too, the packed weight's own columns there are
    ignored, and ::

        y = linear(x with columns outlier_cols set to 0, qweight, bias)
            + x[..., outlier_cols] @ outlier_weight^T

    (the second term in float32, added to the first in float32 and rounded to x's dtype, so
    float32 inputs see one float32 sum). ``n_outliers`` and
    the extra state's ``"outliers"`` / ``"outlier_dtype"`` say how many; without outliers
    both buffers are None and the layer is exactly the plain one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int4",
                 *, group_size: Optional[int] = None, symmetric: Optional[bool] = None,
                 double_quant: bool = False, zero_point: Optional[str] = None, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        spec = F.get_format(fmt)
        group_size = F.check_group_size(spec, group_size)
        symmetric, zero_point = resolve_options(spec, symmetric, zero_point)
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"QuantLinear: {what} must be a positive int, got {v!r}")
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
        self.register_buffer("outlier_cols", None)
        self.register_buffer("outlier_weight", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device,
                                                 dtype=dtype or torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int4", *,
                    outlier_cols: Optional[torch.Tensor] = None, **format_options) -> "QuantLinear":
        """Quantize an nn.Linear (its weight is read, never kept), or a transformers Conv1D
        (GPT-2 style, weight stored ``[in, out]``: the layer computes the same function).

        ``outlier_cols``: input columns to keep in float (their original values, in the
        weight's dtype); the rest is quantized with those columns set to 0, so the scales
        ignore them. An empty tensor or None gives the plain layer."""
        if not is_linear_like(linear):
            if isinstance(linear, nn.Linear):
                raise TypeError(f"from_linear: {type(linear).__name__} overrides nn.Linear.forward "
                                "with something other than x @ W^T + b (what a QuantLinear "
                                "computes), so a QuantLinear cannot replace it")
            raise TypeError("from_linear expects an nn.Linear (or a transformers Conv1D), got "
                            f"{type(linear).__name__}")
        w = linear_weight(linear).detach()
        cols = (None if outlier_cols is None
                else _check_outlier_cols(outlier_cols, w.shape[1], w.device, sort=False))
        if cols is None or cols.numel() == 0:
            qw = quantize_weight(w, fmt, **format_options)
            return cls.from_quantized(qw, linear.bias)
        rest = w.index_fill(1, cols, 0)
        qw = quantize_weight(rest, fmt, **format_options)
        return cls.from_quantized(qw, linear.bias, outlier_cols=cols,
                                  outlier_weight=w.index_select(1, cols))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, *,
                       outlier_cols: Optional[torch.Tensor] = None,
                       outlier_weight: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Wrap an existing QuantizedWeight (shares its tensors); optionally with outlier
        columns ``outlier_cols`` (integer ``[n]``, distinct, any order) whose float weights are
        ``outlier_weight`` ``[N, n]`` (stored sorted by column)."""
        N, K = qw.shape
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = K, N
        for name in TENSOR_FIELDS:
            m.register_buffer("weight_" + name, getattr(qw, name))
        m._config = qw.config()
        m.register_buffer("outlier_cols", None)
        m.register_buffer("outlier_weight", None)
        if (outlier_cols is None) != (outlier_weight is None):
            raise ValueError("outlier_cols and outlier_weight go together: give both or neither")
        if outlier_cols is not None:
            cols = _check_outlier_cols(outlier_cols, K, qw.device, sort=False)
            ow = outlier_weight
            if not isinstance(ow, torch.Tensor) or not ow.is_floating_point() or ow.is_complex():
                raise TypeError("outlier_weight must be a float tensor [out_features, n_outliers]")
            if tuple(ow.shape) != (N, cols.numel()):
                raise ValueError(f"outlier_weight must have shape [{N}, {cols.numel()}] "
                                 f"(out_features, n_outliers), got {list(ow.shape)}")
            if ow.device != qw.device:
                raise ValueError(f"outlier_weight is on {ow.device} but the weight is on {qw.device}")
            if cols.numel():
                order = torch.argsort(cols)
                m.outlier_cols = cols[order].contiguous()
                m.outlier_weight = ow.detach().index_select(1, order).contiguous()
        if bias is not None:
            b = bias.detach().clone()
            if b.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                b = b.to(torch.float32)  # a float64 layer: the kernels take float32 biases
            m.bias = nn.Parameter(b, requires_grad=False)
        else:
            m.register_parameter("bias", None)
        return m

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight (one object kept across calls, so backends can cache a repacked
        layout on it; rebuilt whenever the buffers change: .to(), load_state_dict)."""
        qw = self.__dict__.get("_qw")
        b = self._buffers
        if qw is None or any(getattr(qw, f) is not b.get(buf) for f, buf in _FIELD_BUFFERS):
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

    @property
    def n_outliers(self) -> int:
        """Input columns kept in float (0 for a plain layer)."""
        cols = self._buffers.get("outlier_cols")
        return 0 if cols is None else int(cols.numel())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the packed weight plus the float outlier columns and their
        indices, if any."""
        nbytes = self.qweight.nbytes
        for name in ("outlier_cols", "outlier_weight"):
            t = self._buffers.get(name)
            if t is not None:
                nbytes += t.numel() * t.element_size()
        return 8.0 * nbytes / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = self._buffers.get("outlier_cols")
        if cols is None:
            if isinstance(x, torch.Tensor) and x.dim() > 2 and x.is_cuda:
                # [batch, seq, K] -> [batch * seq, K]: the 2-D calls that lowbit.kernels binds
                # for repeated launches (decoding calls every layer with the same shape)
                y = linear(x.reshape(-1, x.shape[-1]), self.qweight, self.bias)
                return y.view(*x.shape[:-1], y.shape[-1])
            return linear(x, self.qweight, self.bias)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            return linear(x, self.qweight, self.bias)  # raises the usual clear error
        # The outlier columns' activations are zeroed for the packed part (so they also never
        # set an activation-quantization scale on the fast path) and multiply the float columns.
        y = linear(x.index_fill(-1, cols, 0), self.qweight, self.bias)
        xo = x.index_select(-1, cols).to(torch.float32)
        return (y.to(torch.float32) + xo @ self.outlier_weight.to(torch.float32).T).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [N, K] decoded to float (the bias's dtype, else float32), for
        model code that reads ``layer.weight`` of a linear directly (``nn.MultiheadAttention``'s
        out_proj, Mamba's ``dt_proj.weight @ x``, ``.weight.dtype`` checks). Decoded on every
        access and never kept, so it costs a dequantization each time; it is a copy, so
        writing to it in place raises, except a scaling by a positive scalar, which reaches the
        packed weight (:class:`DequantizedWeight`, :meth:`scale_weight_`)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        w = self.dequantize(dtype).as_subclass(DequantizedWeight)
        w._lowbit_owner = weakref.ref(self)
        return w

    @torch.no_grad()
    def scale_weight_(self, c: float, divide: bool = False) -> "QuantLinear":
        """Scale the effective weight in place, W <- W * c (W / c with ``divide``), c a positive
        finite scalar, through the packed weight's scales (with double quantization: its
        constants; int4 with float offsets: the offsets too) and the float outlier columns;
        the codes are untouched. Exact when c is a power of two (and nothing over- or
        underflows); otherwise each scale is rounded once. Bias and input transforms are
        unchanged."""
        c = _positive_scalar(c)
        if c is None:
            raise ValueError("scale_weight_ takes a positive finite scalar")
        names = ["weight_dq_scale", "weight_dq_offset"] if self._config["double_quant"] else \
            ["weight_scales"]
        if self._config.get("zero_point") == "float" and not self._config["symmetric"]:
            names.append("weight_zeros")
        names.append("outlier_weight")
        new = {}
        for n in names:
            t = self._buffers.get(n)
            if t is None:
                continue
            v = t / c if divide else t * c
            if not torch.isfinite(v).all() or bool(((v == 0) & (t != 0)).any()):
                raise ValueError(f"scaling {n} by {'1 / ' if divide else ''}{c:g} over- or "
                                 "underflows its dtype")
            new[n] = v
        for n, v in new.items():
            self._buffers[n].copy_(v)
        self.__dict__.pop("_qw", None)  # a fresh QuantizedWeight: no repacked copy of the old
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight [N, K]: the packed weight with the outlier columns (if any)
        replaced by their float values."""
        cols = self._buffers.get("outlier_cols")
        if cols is None:
            return self.qweight.dequantize(dtype)
        w = self.qweight.dequantize(torch.float32)
        w = w.index_copy(1, cols, self.outlier_weight.to(torch.float32))
        return w.to(dtype)

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
        state = {"lowbit_version": 1, **self._config}
        ow = self._buffers.get("outlier_weight")
        if ow is not None:
            state["outliers"] = int(ow.shape[1])
            state["outlier_dtype"] = str(ow.dtype).replace("torch.", "")
        return state

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
        self._set_outlier_layout(state)

    def _set_outlier_layout(self, state: Dict[str, Any]) -> None:
        """Shape the outlier buffers as the state says (none when it has no "outliers")."""
        n = state.get("outliers", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > self.in_features:
            raise ValueError(f"lowbit QuantLinear state: 'outliers' must be an int in "
                             f"[0, {self.in_features}], got {n!r}")
        device = self.weight_data.device
        if n == 0:
            self.outlier_cols = None
            self.outlier_weight = None
            return
        name = state.get("outlier_dtype")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"lowbit QuantLinear state: 'outlier_dtype' must name a float dtype, "
                             f"got {name!r}")
        cols, ow = self._buffers.get("outlier_cols"), self._buffers.get("outlier_weight")
        if cols is None or cols.numel() != n or ow is None or ow.dtype != dtype:
            self.outlier_cols = torch.zeros(n, dtype=torch.int64, device=device)
            self.outlier_weight = torch.zeros(self.out_features, n, dtype=dtype, device=device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Extra state first, so the buffers have the checkpoint's layout before they are filled.
        key = prefix + "_extra_state"
        if key in state_dict:
            self.set_extra_state(state_dict[key])
        # packed fields are taken as they are: a wrong dtype (uint8 zeros where the layout
        # says float) would otherwise be cast by copy_ into wrong values
        bad = [f"{prefix}{n}: {t.dtype} in the state dict but {b.dtype} in the layer's layout"
               for n, b in self._buffers.items()
               if n.startswith("weight_") and b is not None
               and isinstance(t := state_dict.get(prefix + n), torch.Tensor) and t.dtype != b.dtype]
        if bad:
            error_msgs.extend(bad)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.__dict__.pop("_qw", None)  # buffers were copied into in place: drop derived caches
        try:
            self.qweight.validate()
            cols = self._buffers.get("outlier_cols")
            if cols is not None and cols.device.type != "meta":
                _check_outlier_cols(cols, self.in_features, cols.device, sort=True)
        except (ValueError, TypeError) as e:
            error_msgs.append(f"{prefix}: {e}")

    def extra_repr(self) -> str:
        c = self._config
        opts = f"group_size={c['group_size']}"
        if c["fmt"] == "int4":
            opts += f", symmetric={c['symmetric']}"
        if c["fmt"] == "nf4":
            opts += f", double_quant={c['double_quant']}"
        if self.n_outliers:
            opts += f", outliers={self.n_outliers}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={c['fmt']!r}, {opts}")


def _check_outlier_cols(cols, K: int, device, sort: bool = True) -> torch.Tensor:
    """``cols`` as int64 on ``device`` after checking it is a 1-D integer tensor of distinct
    columns in [0, K) (ascending, when ``sort``); TypeError / ValueError naming the problem."""
    if not isinstance(cols, torch.Tensor):
        raise TypeError(f"outlier_cols must be a 1-D integer tensor, got {type(cols).__name__}")
    if cols.dtype.is_floating_point or cols.dtype.is_complex or cols.dtype == torch.bool:
        raise TypeError(f"outlier_cols must be an integer tensor, got {cols.dtype}")
    if cols.dim() != 1:
        raise ValueError(f"outlier_cols must be 1-D, got shape {list(cols.shape)}")
    cols = cols.to(device=device, dtype=torch.int64)
    if cols.numel():
        if int(cols.min()) < 0 or int(cols.max()) >= K:
            raise ValueError(f"outlier_cols must lie in [0, {K}) (in_features), got values from "
                             f"{int(cols.min())} to {int(cols.max())}")
        s = torch.sort(cols).values
        if bool((s[1:] == s[:-1]).any()):
            raise ValueError("outlier_cols must not repeat a column")
        if sort and not torch.equal(s, cols):
            raise ValueError("outlier_cols must be in ascending order")
    return cols
