"""GGUF (llama.cpp) files <-> lowbit, mapped exactly (never through float).

Tensor types and where they go (layouts as ggml defines them; every block runs along K, the
row, which GGUF lists first in its shape ``[K, N]``):

=======  ===============================  ==================================================
GGUF     block (bytes)                    lowbit weight
=======  ===============================  ==================================================
Q8_0     32 values: fp16 d, 32 int8 q     int8, symmetric, group 32, scale d
Q4_0     32 values: fp16 d, 16 bytes      int4 symmetric group 32, scale d (code q, w = (q - 8) d)
Q4_1     32 values: fp16 d, fp16 m, 16 B  int4 zero_point="float" group 32, scale d, offset m
Q4_K     256 values: fp16 d, fp16 dmin,   int4 zero_point="float" group 32 (its 8 sub-blocks):
         12 bytes of 6-bit (sc, mn) x 8,  scale d * sc, offset -(dmin * mn), both float32
         128 bytes of codes               products of an fp16 and a 6-bit integer (exact)
F32/F16/BF16                              float tensors (embeddings, norms, biases)
=======  ===============================  ==================================================

Nibble order inside a 32-value block of Q4_0 / Q4_1: value j (j < 16) is the low nibble of
byte j and value j + 16 its high nibble; Q4_K's 128 code bytes are four chunks of 32 bytes,
chunk c holding sub-block 2c in its low nibbles and sub-block 2c + 1 in its high nibbles.
lowbit packs element 2j low / 2j + 1 high, so codes are moved, never recomputed. The decoded
values equal ``gguf.dequantize`` (the gguf package's numpy reference, which transformers uses)
bit for bit: ``d * q`` and ``d * sc`` are exact in float32 and the one rounding (``+ m`` or
``- dmin * mn``) is the same operation on the same operands.

Other tensor types (Q5_0/1, Q6_K, Q5_K, Q2_K, Q3_K, IQ*, TQ*, ...) raise
:class:`~lowbit.io._common.UnsupportedCheckpoint` naming the type.

:func:`load_gguf` returns a ready transformers model (QuantLinear for every quantized linear
weight) or a dict of tensors; :func:`export_gguf` writes Q8_0 / Q4_0 / Q4_1 tensors from the
lowbit weights that match them exactly.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Mapping
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import reference
from ..qweight import QuantizedWeight
from ._common import UnsupportedCheckpoint, meta_model, finish_model, require_float16

QK = 32  # values per Q8_0 / Q4_0 / Q4_1 block, and per Q4_K sub-block
QK_K = 256  # values per Q4_K super-block
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q4_K": 2 + 2 + 12 + 128}
BLOCK_VALUES = {"Q8_0": QK, "Q4_0": QK, "Q4_1": QK, "Q4_K": QK_K}
QUANT_TYPES = tuple(BLOCK_BYTES)
FLOAT_TYPES = ("F32", "F16", "BF16")
EXPORT_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading or writing GGUF files needs the gguf package ({e}): "
                          "pip install gguf") from None
    return gguf


# ---- block decoding -----------------------------------------------------------------------------
def _codes_32(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., 16] code bytes of 32-value blocks -> uint8 codes [..., 32] in value order
    (value j < 16 in the low nibble of byte j, value j + 16 in its high nibble)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_lowbit(codes: np.ndarray, N: int) -> torch.Tensor:
    """uint8 codes (N * K in row order, K even) -> lowbit's packed [N, K / 2] (element 2j in the
    low nibble, 2j + 1 in the high nibble). numpy: ~50x faster than strided torch uint8 ops."""
    c = codes.reshape(N, -1)
    return torch.from_numpy(np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4)))


def _gguf_code_bytes(packed: torch.Tensor, N: int, K: int) -> np.ndarray:
    """lowbit's packed codes [N, K / 2] -> GGUF's code bytes [N, K / 32, 16] (inverse of
    :func:`_codes_32` after unpacking)."""
    p = packed.contiguous().numpy()
    codes = np.empty((N, K), dtype=np.uint8)
    codes[:, 0::2] = p & 0x0F
    codes[:, 1::2] = p >> 4
    c = codes.reshape(N, K // QK, QK)
    return c[..., :16] | (c[..., 16:] << 4)


def q4k_scales_mins(sc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 packed bytes per super-block -> (sc, mn), uint8 [..., 8] each, 6 bits.

    Bytes 0-3 hold sc[0..3] in their low 6 bits and bits 4-5 of sc[4..7] in their top 2;
    bytes 4-7 the same for mn; bytes 8-11 hold the low 4 bits of sc[4..7] (low nibble) and of
    mn[4..7] (high nibble).
    """
    s = sc.to(torch.int32)
    lo_sc, lo_mn, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc_hi = (mix & 0x0F) | ((lo_sc >> 6) << 4)
    mn_hi = (mix >> 4) | ((lo_mn >> 6) << 4)
    scales = torch.cat([lo_sc & 0x3F, sc_hi], dim=-1)
    mins = torch.cat([lo_mn & 0x3F, mn_hi], dim=-1)
    return scales.to(torch.uint8), mins.to(torch.uint8)


def decode_tensor(data, type_name: str, shape: Tuple[int, int]) -> QuantizedWeight:
    """Raw GGUF bytes of a quantized 2-D tensor (uint8, ``N`` rows of ``K / block * bytes``)
    -> the lowbit QuantizedWeight with the same dequantized values (``shape`` = (N, K))."""
    N, K = shape
    if type_name not in BLOCK_BYTES:
        raise UnsupportedCheckpoint(
            f"GGUF tensor type {type_name} is not supported by lowbit (supported: "
            f"{', '.join(QUANT_TYPES)} and the float types {', '.join(FLOAT_TYPES)})")
    per, nbytes = BLOCK_VALUES[type_name], BLOCK_BYTES[type_name]
    if K % per:
        raise UnsupportedCheckpoint(f"GGUF {type_name} row length {K} is not a multiple of {per}")
    arr = np.asarray(data, dtype=np.uint8).reshape(N, K // per, nbytes)

    def f16(lo: int) -> torch.Tensor:  # the fp16 at byte offset lo of each block, as float32
        return torch.from_numpy(np.ascontiguousarray(arr[..., lo:lo + 2]).view(np.float16)[..., 0]
                                .astype(np.float32))

    if type_name == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(arr[..., 2:]).view(np.int8).reshape(N, K))
        return QuantizedWeight("int8", (N, K), q, f16(0), group_size=QK, symmetric=True)
    if type_name in ("Q4_0", "Q4_1"):
        packed = _pack_lowbit(_codes_32(arr[..., 4 if type_name == "Q4_1" else 2:]), N)
        if type_name == "Q4_0":
            return QuantizedWeight("int4", (N, K), packed, f16(0), group_size=QK, symmetric=True)
        return QuantizedWeight("int4", (N, K), packed, f16(0), f16(2), group_size=QK,
                               symmetric=False, zero_point="float")
    # Q4_K
    d, dmin = f16(0)[..., None], f16(2)[..., None]
    sc, mn = q4k_scales_mins(torch.from_numpy(np.ascontiguousarray(arr[..., 4:16])))
    scales = (d * sc.to(torch.float32)).reshape(N, -1)  # exact: 11-bit x 6-bit significands
    offsets = -(dmin * mn.to(torch.float32)).reshape(N, -1)  # w = q * s - dmin * mn
    chunks = arr[..., 16:].reshape(N, K // QK_K, 4, 32)
    codes = np.concatenate([chunks & 0x0F, chunks >> 4], axis=-1)
    return QuantizedWeight("int4", (N, K), _pack_lowbit(codes, N), scales.contiguous(),
                           offsets.contiguous(), group_size=QK, symmetric=False,
                           zero_point="float")


def _float_tensor(t) -> torch.Tensor:
    arr = np.array(t.data)  # a copy: the reader's arrays are read-only views of the file
    shape = [int(x) for x in t.shape][::-1]
    name = t.tensor_type.name
    if name == "BF16":
        out = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    elif name in ("F32", "F16"):
        out = torch.from_numpy(arr)
    else:
        raise UnsupportedCheckpoint(f"GGUF tensor '{t.name}' has type {name}, not a float type")
    return out.reshape(shape)


def read_tensor(t) -> Union[QuantizedWeight, torch.Tensor]:
    """One ``gguf.ReaderTensor`` -> a QuantizedWeight (quantized 2-D) or a float tensor."""
    name = t.tensor_type.name
    if name in FLOAT_TYPES:
        return _float_tensor(t)
    dims = [int(x) for x in t.shape]
    if name in BLOCK_BYTES and len(dims) != 2:
        raise UnsupportedCheckpoint(f"GGUF tensor '{t.name}' ({name}) has {len(dims)} dimensions; "
                                    "lowbit maps 2-D quantized tensors (linear weights) only")
    try:
        return decode_tensor(t.data, name, (dims[1], dims[0]))
    except UnsupportedCheckpoint as e:
        raise UnsupportedCheckpoint(f"GGUF tensor '{t.name}': {e}") from None


# ---- block encoding (export) --------------------------------------------------------------------
def encode_tensor(qw: QuantizedWeight) -> Tuple[str, np.ndarray]:
    """A lowbit weight -> (GGUF type name, uint8 bytes [N, K / 32 * block bytes]) when a GGUF type
    holds it exactly: int8 symmetric group 32 -> Q8_0, int4 symmetric group 32 -> Q4_0, int4
    zero_point="float" group 32 -> Q4_1 (scales and offsets must be float16 values)."""
    N, K = qw.shape
    what = f"{qw.fmt} weight {list(qw.shape)}"
    if qw.has_input_transform:
        raise ValueError(f"{what}: GGUF has no input permutation or input scale; this weight "
                         "carries one (perm / input_scale) and cannot be written exactly")
    if qw.group_size != QK or K % QK:
        raise ValueError(f"{what}: GGUF Q8_0 / Q4_0 / Q4_1 need groups of exactly {QK} along K "
                         f"(K a multiple of {QK}); this weight has group_size={qw.group_size}, K={K}")
    qw = qw.to("cpu")
    G = K // QK

    def f16_bytes(t: torch.Tensor, what_: str) -> np.ndarray:  # [N, G] -> uint8 [N, G, 2]
        return require_float16(t, what_).numpy().reshape(N, G, 1).view(np.uint8)

    if qw.fmt == "int8" and qw.symmetric:
        d = f16_bytes(qw.scales, f"{what}: Q8_0 scales")
        q = qw.data.contiguous().numpy().view(np.uint8).reshape(N, G, QK)
        return "Q8_0", np.concatenate([d, q], axis=-1).reshape(N, -1)
    if qw.fmt == "int4":
        if qw.symmetric:
            d = f16_bytes(qw.scales, f"{what}: Q4_0 scales")
            qs = _gguf_code_bytes(qw.data, N, K)
            return "Q4_0", np.concatenate([d, qs], axis=-1).reshape(N, -1)
        if qw.zero_point == "float":
            d = f16_bytes(qw.scales, f"{what}: Q4_1 scales")
            m = f16_bytes(qw.zeros, f"{what}: Q4_1 offsets")
            qs = _gguf_code_bytes(qw.data, N, K)
            return "Q4_1", np.concatenate([d, m, qs], axis=-1).reshape(N, -1)
        raise ValueError(f"{what}: int4 with integer zero-points decodes (q - z) * s, which no "
                         "GGUF type stores (Q4_1 stores a float offset: w = q * d + m, and "
                         "-z * s is generally not a float16 value); export symmetric int4 "
                         "(Q4_0) or zero_point='float' (Q4_1) instead")
    raise ValueError(f"{what}: no GGUF type stores {qw.fmt}"
                     f"{' asymmetric' if not qw.symmetric else ''} exactly; GGUF export "
                     f"supports {', '.join(EXPORT_TYPES)} (int8 symmetric group 32, int4 "
                     "symmetric group 32, int4 zero_point='float' group 32)")


# ---- reading the file ----------------------------------------------------------------------------
# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}


class _Strings:
    """A GGUF string array, decoded when first read (the vocabulary: ~10^5 strings that a model
    load never needs)."""

    def __init__(self, buf, offset: int, count: int):
        self._buf, self._offset, self._count = buf, offset, count
        self._items = None

    def __len__(self) -> int:
        return self._count

    def tolist(self) -> list:
        if self._items is None:
            out, off = [], self._offset
            for _ in range(self._count):
                (n,) = struct.unpack_from("<Q", self._buf, off)
                out.append(bytes(self._buf[off + 8:off + 8 + n]).decode("utf-8"))
                off += 8 + n
            self._items = out
        return self._items


class GGUFTensorInfo:
    """One tensor of a :class:`GGUFFile`: ``name``, ``tensor_type`` (gguf.GGMLQuantizationType),
    ``shape`` (GGUF order: the row length K first), ``data`` (numpy view of the file: uint8
    ``[N, row bytes]`` for block types, the float array with dims reversed otherwise)."""

    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


class GGUFFile:
    """A GGUF file's key-value metadata and tensor table (format versions 2 and 3, little
    endian), read with struct and numpy views of a memory map.

    Same content as ``gguf.GGUFReader``, which builds a numpy view per vocabulary string
    (~80% of the time of loading the bundled model); here string arrays are skipped by length
    and decoded only when read. ``fields``: key -> (value type id, value, array element type id
    or None); scalars as Python values, numeric arrays as lists, string arrays as
    :class:`_Strings`.
    """

    def __init__(self, path: str):
        try:
            self._parse(path)
        except (struct.error, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        except ValueError as e:
            if isinstance(e, UnsupportedCheckpoint) or "GGUF" in str(e):
                raise
            raise ValueError(f"{path}: corrupt or truncated GGUF file ({e})") from None

    def _parse(self, path: str) -> None:
        gguf = _gguf()
        self.path = path
        if os.path.getsize(path) < 24:
            raise ValueError(f"{path}: not a GGUF file (shorter than its 24-byte header)")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self._buf = memoryview(self._mm)  # plain slices: numpy memmap slicing is slow
        if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise UnsupportedCheckpoint(f"{path}: GGUF version {version} (little-endian v2 / v3 "
                                        "are supported)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24
        self.fields: Dict[str, tuple] = {}
        for _ in range(n_kv):
            key, off = self._string(off)
            (vtype,), off = struct.unpack_from("<I", buf, off), off + 4
            value, sub, off = self._read_value(vtype, off)
            self.fields[key] = (vtype, value, sub)
        infos = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, off + 4))
            off += 4 + 8 * n_dims
            ttype, toff = struct.unpack_from("<IQ", buf, off)
            off += 12
            infos.append((name, dims, ttype, toff))
        align = int(self.fields.get("general.alignment", (4, 32, None))[1])
        start = -(-off // align) * align
        self.tensors = []
        for name, dims, ttype, toff in infos:
            qt = gguf.GGMLQuantizationType(ttype)
            per, nbytes = gguf.GGML_QUANT_SIZES[qt]
            n = int(np.prod(dims))
            size = n // per * nbytes
            if start + toff + size > len(buf):
                raise ValueError(f"{path}: tensor {name!r} ends at byte {start + toff + size}, past "
                                 f"the end of the file ({len(buf)} bytes): a truncated GGUF file")
            raw = self._mm[start + toff:start + toff + size]
            rows = list(reversed(dims))
            if qt.name in ("F32", "F16"):
                data = raw.view(np.float32 if qt.name == "F32" else np.float16).reshape(rows)
            elif qt.name == "BF16":
                data = raw.view(np.uint16).reshape(rows)
            else:
                data = raw.reshape(rows[:-1] + [rows[-1] // per * nbytes])
            self.tensors.append(GGUFTensorInfo(name, qt, np.array(dims, dtype=np.uint64), data))

    def _string(self, off: int) -> Tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, off)
        return bytes(self._buf[off + 8:off + 8 + n]).decode("utf-8"), off + 8 + n

    def _read_value(self, vtype: int, off: int):
        buf = self._buf
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, off)[0], None, off + struct.calcsize(fmt)
        if vtype == _STRING:
            v, off = self._string(off)
            return v, None, off
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype}")
        sub, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if sub in _NUMPY:
            dt = np.dtype(_NUMPY[sub])
            arr = np.frombuffer(buf, dtype=dt, count=count, offset=off)
            values = arr.astype(bool).tolist() if sub == 7 else arr.tolist()
            return values, sub, off + count * dt.itemsize
        if sub == _STRING:
            start = off
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, off)
                off += 8 + n
            return _Strings(buf, start, count), sub, off
        values = []  # arrays of arrays: rare, read one by one
        for _ in range(count):
            v, _, off = self._read_value(sub, off)
            values.append(v)
        return values, sub, off

    def value(self, key: str):
        """A metadata value as a Python value (string arrays as lists)."""
        v = self.fields[key][1]
        return v.tolist() if isinstance(v, _Strings) else v


# ---- config ---------------------------------------------------------------------------------------
# GGUF architecture names that transformers calls differently.
_ARCH_TO_MODEL_TYPE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                       "minimax-m2": "minimax_m2", "gemma3": "gemma3_text",
                       "gemma4": "gemma4_text", "command-r": "cohere"}


def _value(reader: "GGUFFile", key: str):
    v = reader.value(key)
    if isinstance(v, list) and len(v) == 1:  # as transformers reads one-element arrays
        return v[0]
    return v


def _config_dict(reader) -> Tuple[str, dict]:
    """(GGUF architecture, transformers config kwargs) from the file's metadata, with
    transformers' own key table (only the keys it maps are read: the tokenizer's vocabulary is
    never parsed)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    fields = reader.fields
    if "general.architecture" not in fields:
        raise UnsupportedCheckpoint("GGUF file has no general.architecture; cannot build a model "
                                    "(load it with as_model=False for its tensors)")
    arch = _value(reader, "general.architecture")
    model_type = _ARCH_TO_MODEL_TYPE.get(arch, arch)
    if arch not in GGUF_CONFIG_MAPPING and model_type not in GGUF_CONFIG_MAPPING:
        raise UnsupportedCheckpoint(f"GGUF architecture {arch!r} has no transformers config "
                                    "mapping; load it with as_model=False for its tensors")
    cfg: dict = {}
    for section, prefix in (("general", "general"), (arch if arch in GGUF_CONFIG_MAPPING
                                                    else model_type, arch), ("tokenizer", "tokenizer")):
        for suffix, hf_key in GGUF_CONFIG_MAPPING.get(section, {}).items():
            key = f"{prefix}.{suffix}"
            if key in fields and hf_key not in (None, -1):
                cfg[hf_key] = _value(reader, key)
    cfg["model_type"] = model_type
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    for k, v in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        cfg.setdefault(k, v)
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"][1])
    return arch, cfg


# ---- loading --------------------------------------------------------------------------------------
def _gguf_to_hf_names(model: nn.Module, processor, arch: str, config) -> Dict[str, str]:
    """GGUF tensor name -> the model's state-dict name, with gguf's own name table (the mapping
    transformers' GGUF loader uses; built once here, where transformers rebuilds it for every
    submodule). A state-dict name is tried whole, then without its leading components (a
    checkpoint saved from an inner module), the longest match first."""
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise UnsupportedCheckpoint(f"GGUF architecture {arch!r} is unknown to the installed gguf "
                                    "package's tensor name table")
    table = gguf.get_tensor_name_map(arch_id, int(getattr(config, "num_hidden_layers", 0) or 0))
    out: Dict[str, str] = {}
    for hf_name in model.state_dict():
        name = processor.preprocess_name(hf_name)
        base, suffix = name, ""
        if name.endswith(".weight") or name.endswith(".bias"):
            base, suffix = name.rsplit(".", 1)
            suffix = "." + suffix
        parts = base.split(".")
        for i in range(len(parts)):
            g = table.get_name(".".join(parts[i:]))
            if g is not None:
                out.setdefault(g + suffix, hf_name)
                break
    return out


def _row_permutation(processor, name: str, N: int) -> Optional[torch.Tensor]:
    """The rows transformers' tensor processor moves when it loads tensor ``name`` (llama.cpp
    stores Q/K projection rows interleaved for its rotary kernels; transformers un-permutes
    them): the processor is run on the row numbers, and must return a permutation of them."""
    idx = np.arange(N, dtype=np.float64).reshape(N, 1)
    try:
        res = processor.process(weights=idx, name=name, tensor_key_mapping={},
                                parsed_parameters={"tensors": {}, "config": {}})
    except Exception as e:  # a processor that does more than reorder rows
        raise UnsupportedCheckpoint(f"GGUF tensor '{name}': transformers' "
                                    f"{type(processor).__name__} transforms it in a way lowbit "
                                    f"cannot apply to packed codes ({e})") from None
    w = getattr(res, "weights", None)
    if getattr(res, "name", None) != name or not isinstance(w, np.ndarray) or w.shape != (N, 1):
        raise UnsupportedCheckpoint(f"GGUF tensor '{name}': transformers' "
                                    f"{type(processor).__name__} renames, splits or reshapes it; "
                                    "lowbit cannot apply that to packed codes")
    rows = torch.from_numpy(w.reshape(-1).astype(np.int64))
    if not torch.equal(torch.sort(rows).values, torch.arange(N)) or not torch.equal(
            torch.from_numpy(w.reshape(-1)), rows.to(torch.float64)):
        raise UnsupportedCheckpoint(f"GGUF tensor '{name}': transformers' "
                                    f"{type(processor).__name__} changes its values, not just "
                                    "its row order; lowbit cannot apply that to packed codes")
    return None if torch.equal(rows, torch.arange(N)) else rows


def permute_rows(qw: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    """Output row i of the result is row ``rows[i]`` of ``qw`` (codes, scales and offsets move
    together, so the dequantized rows move exactly)."""
    def take(t):
        return None if t is None else t.index_select(0, rows).contiguous()
    return QuantizedWeight(qw.fmt, qw.shape, take(qw.data), take(qw.scales), take(qw.zeros),
                           group_size=qw.group_size, symmetric=qw.symmetric,
                           zero_point=qw.zero_point, double_quant=qw.double_quant,
                           dq_scale=take(qw.dq_scale), dq_offset=take(qw.dq_offset),
                           perm=qw.perm, input_scale=qw.input_scale)


def load_gguf(path, *, as_model: Optional[bool] = None, dtype: torch.dtype = torch.float32):
    """Load a GGUF file without dequantizing its quantized weights.

    ``as_model`` (default True): a transformers ``AutoModelForCausalLM`` built from the file's
    metadata on the meta device, with a :class:`~lowbit.QuantLinear` for every quantized linear
    weight (Q/K projection rows reordered exactly as transformers' own GGUF loader does), float
    tensors (norms, float embeddings) in ``dtype``, a quantized token embedding decoded to
    ``dtype`` for the embedding lookup and, when the output layer is tied to it, kept quantized
    for the output layer. ``as_model=False``: a dict GGUF tensor name -> QuantizedWeight
    (quantized tensors, rows as stored in the file) or float tensor.

    Raises UnsupportedCheckpoint naming any tensor type or architecture lowbit cannot map.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such GGUF file: {path!r}")
    reader = GGUFFile(path)
    if as_model is False:
        return {t.name: read_tensor(t) for t in reader.tensors}
    return _build(reader, dtype, path)


def _build(reader, dtype: torch.dtype, path: str) -> nn.Module:
    import transformers
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor


    arch, cfg = _config_dict(reader)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = meta_model(config, dtype)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    name_map = _gguf_to_hf_names(model, processor, arch, config)
    quantized: Dict[str, Tuple[QuantizedWeight, Optional[torch.Tensor]]] = {}
    floats: Dict[str, torch.Tensor] = {}
    embed_q: Dict[str, QuantizedWeight] = {}
    skipped = []
    for t in reader.tensors:
        hf = name_map.get(t.name)
        if hf is None:
            skipped.append(t.name)
            continue
        w = read_tensor(t)
        if isinstance(w, torch.Tensor):
            arr = processor.process(weights=w.numpy() if w.dtype != torch.bfloat16 else
                                    w.float().numpy(), name=t.name, tensor_key_mapping=name_map,
                                    parsed_parameters={"tensors": {}, "config": cfg}).weights
            floats[hf] = torch.from_numpy(np.ascontiguousarray(arr))
            continue
        rows = _row_permutation(processor, t.name, w.shape[0])
        if rows is not None:
            w = permute_rows(w, rows)
        module_name, _, param = hf.rpartition(".")
        module = model.get_submodule(module_name)
        if param != "weight":
            raise UnsupportedCheckpoint(f"GGUF tensor '{t.name}' ({t.tensor_type.name}) maps to "
                                        f"'{hf}', which lowbit cannot hold quantized")
        if isinstance(module, nn.Linear):
            quantized[module_name] = (w, None)
        elif isinstance(module, nn.Embedding):
            floats[hf] = reference.dequantize(w, torch.float32)  # gguf's own values, bit for bit
            embed_q[module_name] = w
        else:
            raise UnsupportedCheckpoint(f"GGUF tensor '{t.name}' ({t.tensor_type.name}) maps to "
                                        f"{type(module).__name__} '{module_name}'; lowbit holds "
                                        "quantized weights in linear layers only")
    if skipped:
        warnings.warn(f"{os.path.basename(path)}: {len(skipped)} GGUF tensor(s) have no place in "
                      f"{type(model).__name__} and were not loaded (as transformers does): "
                      f"{skipped[:6]}")
    for name in list(floats):  # biases of quantized layers travel with them
        mod, _, param = name.rpartition(".")
        if param == "bias" and mod in quantized:
            quantized[mod] = (quantized[mod][0], floats.pop(name))
    if config.tie_word_embeddings:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        out_name = next((n for n, m in model.named_modules() if m is out), None)
        in_name = next((n for n, m in model.named_modules() if m is inp), None)
        if out_name is not None and in_name in embed_q and out_name not in quantized:
            # the output layer shares the (quantized) token embedding: keep it quantized
            quantized[out_name] = (embed_q[in_name], None)
            model.config.tie_word_embeddings = False
    return finish_model(model, quantized, floats, dtype, source=os.path.basename(path))


# ---- export ---------------------------------------------------------------------------------------
def export_gguf(tensors: Mapping, path, *, arch: str = "llama", metadata=None) -> None:
    """Write ``tensors`` (GGUF tensor name -> QuantizedWeight or float tensor) to a GGUF file.

    Quantized weights become Q8_0 (int8 symmetric group 32), Q4_0 (int4 symmetric group 32) or
    Q4_1 (int4 zero_point="float" group 32), byte for byte what :func:`load_gguf` reads back;
    anything else raises ValueError saying why (another format, groups other than 32, scales
    or offsets that are not float16 values, an input permutation or scale). Float tensors are
    written as F32 (F16 / BF16 kept as such). Names and row order are written as given (a dict
    from ``load_gguf(..., as_model=False)`` round-trips).

    ``metadata``: a GGUF file path or a :class:`GGUFFile` whose key-value metadata is copied
    (architecture, hyper-parameters, tokenizer; its general.file_type is dropped), or a dict
    key -> value (ints are written as uint32, floats float32, str, bool, lists of those).
    """
    gguf = _gguf()
    path = os.fspath(path)
    encoded = []
    for name, t in tensors.items():
        if isinstance(t, QuantizedWeight):
            try:
                type_name, blocks = encode_tensor(t)
            except ValueError as e:
                raise ValueError(f"GGUF export of '{name}': {e}") from None
            encoded.append((name, blocks, getattr(gguf.GGMLQuantizationType, type_name)))
        elif isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                encoded.append((name, t.view(torch.int16).numpy().view(np.uint16),
                                gguf.GGMLQuantizationType.BF16))
            elif t.dtype in (torch.float16, torch.float32):
                encoded.append((name, t.numpy(), None))
            elif t.is_floating_point():
                encoded.append((name, t.to(torch.float32).numpy(), None))
            else:
                raise ValueError(f"GGUF export of '{name}': unsupported tensor dtype {t.dtype}")
        else:
            raise TypeError(f"GGUF export of '{name}': expected a QuantizedWeight or a tensor, "
                            f"got {type(t).__name__}")
    kv = _metadata_items(gguf, metadata)
    arch_name = kv.pop("general.architecture", (arch, None))[0]
    writer = gguf.GGUFWriter(path, arch_name)
    try:
        for key, (value, vtype, sub) in kv.items():
            if vtype is None:
                vtype, sub = _value_type(gguf, value)
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, arr, raw in encoded:
            writer.add_tensor(name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _value_type(gguf, value):
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return T.BOOL, None
    if isinstance(value, int):
        return (T.UINT32 if 0 <= value < 2 ** 32 else T.INT64), None
    if isinstance(value, float):
        return T.FLOAT32, None
    if isinstance(value, str):
        return T.STRING, None
    if isinstance(value, (list, tuple)) and value:
        return T.ARRAY, _value_type(gguf, value[0])[0]
    raise ValueError(f"cannot write GGUF metadata value {value!r}")


def _metadata_items(gguf, metadata) -> Dict[str, tuple]:
    """key -> (value, value type or None, array sub type or None)."""
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        return {k: (v, None, None) for k, v in metadata.items()}
    reader = GGUFFile(os.fspath(metadata)) if isinstance(metadata, (str, os.PathLike)) \
        else metadata
    if not isinstance(reader, GGUFFile):
        raise TypeError("metadata must be a GGUF file path, a lowbit.io.gguf.GGUFFile or a dict, "
                        f"got {type(metadata).__name__}")
    out = {}
    for key, (vtype, value, sub) in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.file_type", "general.alignment"):
            continue
        out[key] = (reader.value(key), gguf.GGUFValueType(vtype),
                    None if sub is None else gguf.GGUFValueType(sub))
    return out
