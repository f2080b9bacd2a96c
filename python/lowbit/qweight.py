"""QuantizedWeight: a packed weight and everything needed to decode it."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import formats as F

# Tensor fields in a fixed order; optional ones may be None. CODE_FIELDS describe the packed
# weight as stored (what the kernels read); TRANSFORM_FIELDS describe what the layer does to
# its input before the stored weight multiplies it (see QuantizedWeight).
CODE_FIELDS = ("data", "scales", "zeros", "dq_scale", "dq_offset")
TRANSFORM_FIELDS = ("perm", "input_scale")
TENSOR_FIELDS = CODE_FIELDS + TRANSFORM_FIELDS


class QuantizedWeight:
    """A weight ``[N, K]`` stored in one of the formats of :mod:`lowbit.formats`.

    Fields: ``fmt`` (format name), ``shape`` (N, K), ``data`` (packed codes), ``scales``,
    ``zeros`` (asymmetric weights only, else None), ``group_size`` (-1 = one group per row),
    ``symmetric``, ``zero_point``, ``double_quant`` and, for double-quantized nf4 / fp4,
    ``dq_scale`` / ``dq_offset``. The layouts are documented on each format's registry row.

    ``zero_point`` says what ``zeros`` holds when ``symmetric`` is False (lowbit.formats):
    ``"int"`` (the default), an integer zero-point per group, ``w = float(q - z) * s`` (int4:
    uint8; int8: int16); ``"float"`` (int4 only), a float32 offset per group,
    ``w = float(q) * s + m`` (GGUF Q4_1 / Q4_K). Symmetric weights keep the default "int".

    Two optional input transforms (None unless an algorithm or a source checkpoint needs
    them), applied to the layer's input before the stored weight ``Ws`` multiplies it:

    * ``input_scale`` float32 ``[K]``, positive and finite, in input-feature order: the input
      is divided by it (AWQ's per-channel scales when they cannot be folded into the
      preceding op; the stored weight then holds ``W * input_scale``).
    * ``perm`` int64 ``[K]``, a permutation: stored column ``j`` holds input feature
      ``perm[j]`` (GPTQ activation order; a GPTQ ``g_idx`` group map becomes contiguous
      groups after sorting by it).

    So ``linear(x) = (x / input_scale)[..., perm] @ Ws.T`` and :meth:`dequantize` returns the
    layer's weight in input-feature order, ``W[:, perm[j]] = Ws[:, j] / input_scale[perm[j]]``,
    so that ``F.linear(x, qw.dequantize())`` and ``lowbit.linear(x, qw)`` always agree.
    """

    __slots__ = ("fmt", "shape", "data", "scales", "zeros", "group_size", "symmetric",
                 "zero_point", "double_quant", "dq_scale", "dq_offset", "perm", "input_scale",
                 "cache")

    def __init__(self, fmt: str, shape: Tuple[int, int], data: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor] = None, *, group_size: int = -1,
                 symmetric: bool = True, double_quant: bool = False,
                 dq_scale: Optional[torch.Tensor] = None, dq_offset: Optional[torch.Tensor] = None,
                 perm: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None,
                 zero_point: str = "int", validate: bool = True):
        self.fmt = F.get_format(fmt).name
        self.shape = (int(shape[0]), int(shape[1]))
        self.data = data
        self.scales = scales
        self.zeros = zeros
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)
        self.zero_point = zero_point
        self.double_quant = bool(double_quant)
        self.dq_scale = dq_scale
        self.dq_offset = dq_offset
        self.perm = perm
        self.input_scale = input_scale
        # Derived, device-specific forms of this weight (e.g. a kernel's repacked layout),
        # built on first use by the backend that needs them and keyed by that backend. Never
        # saved; copies made by .to()/.contiguous() start empty.
        self.cache: Dict[str, object] = {}
        if validate:
            self.ensure_valid()

    def __setattr__(self, name, value):
        # Reassigning a field (qw.scales = ..., qw.group_size = ...) makes every derived form
        # and the validity stamp stale (in-place tensor updates are caught by versions).
        object.__setattr__(self, name, value)
        if name != "cache":
            c = getattr(self, "cache", None)
            if c:
                c.clear()

    def __getstate__(self):
        # pickle / copy.deepcopy / torch.save: the fields only (the derived forms in
        # :attr:`cache`, e.g. a CPU kernel's packed handle, are rebuilt on first use)
        return {k: getattr(self, k) for k in self.__slots__ if k != "cache"}

    def __setstate__(self, state) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "cache", {})

    def ensure_valid(self) -> None:
        """:meth:`validate` once for the current fields (lowbit.linear / dequantize call it on
        every use: the kernels trust the layout). The stamp lives in :attr:`cache`, which
        reassigning any field clears. A field's tensor given other storage behind its back
        (``qw.scales.data = ...``, ``set_``, ``resize_``) is not seen (checking every field on
        every call would cost microseconds per call): call ``qw.cache.clear()`` after such an
        edit, so that the next use validates again and rebuilds what was derived."""
        if "valid" not in self.cache:
            self.validate()
            self.cache["valid"] = True
            if self.perm is None and self.input_scale is None and self.data.is_cpu:
                # lowbit.linear's cheapest CPU lane (lowbit.ops) takes weights with this stamp
                self.cache["plain_cpu"] = True

    # ---- layout -------------------------------------------------------------------------
    @property
    def spec(self) -> F.FormatSpec:
        return F.FORMATS[self.fmt]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def n_groups(self) -> int:
        return F.n_groups(self.group_size, self.shape[1])

    def expected_layout(self) -> Dict[str, Optional[Tuple[Tuple[int, ...], torch.dtype]]]:
        """Shape and dtype every tensor field must have (None: the field must be None)."""
        spec, (N, K), G = self.spec, self.shape, self.n_groups
        data_dtype = torch.int8 if spec.name == "int8" else torch.uint8
        lay = {"data": ((N, F.packed_cols(spec, K)), data_dtype),
               "scales": ((N, G), torch.float32), "zeros": None, "dq_scale": None, "dq_offset": None}
        if spec.has_zero_point and not self.symmetric:
            if self.zero_point == "float":
                lay["zeros"] = ((N, G), torch.float32)
            else:
                lay["zeros"] = ((N, G), torch.int16 if spec.name == "int8" else torch.uint8)
        if spec.has_codebook and self.double_quant:
            C = -(-G // F.NF4_DOUBLE_QUANT_CHUNK)
            lay["scales"] = ((N, G), torch.uint8)
            lay["dq_scale"] = ((N, C), torch.float32)
            lay["dq_offset"] = ((N, C), torch.float32)
        # Optional input transforms: checked when present (see the class docstring).
        lay["perm"] = ((K,), torch.int64) if self.perm is not None else None
        lay["input_scale"] = ((K,), torch.float32) if self.input_scale is not None else None
        return lay

    @property
    def has_input_transform(self) -> bool:
        return self.perm is not None or self.input_scale is not None

    def validate(self) -> None:
        """Raise ValueError naming the first field whose shape, dtype or device is wrong."""
        spec = self.spec
        N, K = self.shape
        if N <= 0 or K <= 0:
            raise ValueError(f"QuantizedWeight shape must be positive, got {self.shape}")
        F.check_group_size(spec, self.group_size)
        if self.double_quant and not spec.has_codebook:
            raise ValueError(f"double_quant applies to the codebook formats (nf4, fp4), not {spec.name}")
        if not spec.has_zero_point and not self.symmetric:
            raise ValueError(f"{spec.name} has no asymmetric variant")
        if self.zero_point not in F.ZERO_POINTS:
            raise ValueError(f"zero_point must be one of {F.ZERO_POINTS}, got {self.zero_point!r}")
        if self.zero_point == "float":
            if not spec.has_float_offset:
                raise ValueError(f"zero_point='float' (a float offset per group) applies to int4 only, "
                                 f"not {spec.name}")
            if self.symmetric:
                raise ValueError("zero_point='float' is an asymmetric variant: symmetric must be False")
        for name, want in self.expected_layout().items():
            t = getattr(self, name)
            if want is None:
                if t is not None:
                    raise ValueError(f"{self.fmt} weight must not carry '{name}'")
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.fmt} weight needs tensor '{name}', got {type(t).__name__}")
            shape, dtype = want
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{self.fmt} weight field '{name}' must be {dtype} {list(shape)}, "
                                 f"got {t.dtype} {list(t.shape)}")
            if t.device != self.data.device:
                raise ValueError(f"field '{name}' is on {t.device} but data is on {self.data.device}")
        if self.perm is not None:
            K = self.shape[1]
            if not torch.equal(torch.sort(self.perm).values,
                               torch.arange(K, device=self.perm.device)):
                raise ValueError(f"perm must be a permutation of 0..{K - 1}")
        if self.input_scale is not None:
            s = self.input_scale
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError("input_scale must be finite and positive")

    # ---- tensors ------------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The non-None tensor fields by name."""
        return {k: getattr(self, k) for k in TENSOR_FIELDS if getattr(self, k) is not None}

    def config(self) -> Dict[str, object]:
        """Everything but the tensors, JSON-serialisable."""
        return {"fmt": self.fmt, "shape": list(self.shape), "group_size": self.group_size,
                "symmetric": self.symmetric, "zero_point": self.zero_point,
                "double_quant": self.double_quant,
                "has_perm": self.perm is not None, "has_input_scale": self.input_scale is not None}

    def _replace_tensors(self, fn) -> "QuantizedWeight":
        kw = {k: (fn(getattr(self, k)) if getattr(self, k) is not None else None) for k in TENSOR_FIELDS}
        return QuantizedWeight(self.fmt, self.shape, kw["data"], kw["scales"], kw["zeros"],
                               group_size=self.group_size, symmetric=self.symmetric,
                               double_quant=self.double_quant, dq_scale=kw["dq_scale"],
                               dq_offset=kw["dq_offset"], perm=kw["perm"],
                               input_scale=kw["input_scale"], zero_point=self.zero_point,
                               validate=False)

    def to(self, device) -> "QuantizedWeight":
        """A copy on ``device`` (codes and scales keep their dtypes)."""
        return self._replace_tensors(lambda t: t.to(device))

    def contiguous(self) -> "QuantizedWeight":
        return self._replace_tensors(lambda t: t.contiguous())

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (codes, scales, zeros, double-quant constants)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x / input_scale)[..., perm]``: what the stored weight multiplies (x itself when
        there is no transform). Division in float32; the result is float32 if input_scale is
        set, else x's dtype."""
        if self.input_scale is not None:
            x = x.to(torch.float32) / self.input_scale
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return x

    def to_input_order(self, w: torch.Tensor) -> torch.Tensor:
        """The stored-order float32 weight ``Ws`` -> the layer's weight in input-feature order
        (undoes perm, then divides by input_scale); w itself when there is no transform."""
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        if self.input_scale is not None:
            w = w / self.input_scale
        return w

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from .ops import dequantize
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        opts = f"group_size={self.group_size}"
        if self.spec.has_zero_point:
            opts += f", symmetric={self.symmetric}"
            if not self.symmetric:
                opts += f", zero_point={self.zero_point!r}"
        if self.spec.has_codebook:
            opts += f", double_quant={self.double_quant}"
        return (f"QuantizedWeight(fmt={self.fmt!r}, shape={self.shape}, {opts}, "
                f"device={self.device}, bits_per_weight={self.bits_per_weight:.3f})")
