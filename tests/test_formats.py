"""The Python format table and the C++ traits table agree; group-size rules."""

import pytest
import torch

import lowbit
from lowbit import _backend
from lowbit import formats as F


def _f32_bits(values):
    import struct
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]


def test_cpp_traits_mirror_python_registry():
    traits = _backend.ext().format_traits()
    assert [t["name"] for t in traits] == list(F.FORMATS)
    for t in traits:
        spec = F.FORMATS[t["name"]]
        assert t["id"] == spec.id
        assert t["bits"] == spec.bits
        assert t["default_group"] == spec.default_group
        assert t["packed_nibbles"] == spec.packed_nibbles
        assert t["has_zero_point"] == spec.has_zero_point
        assert t["has_float_offset"] == spec.has_float_offset
        assert t["has_codebook"] == spec.has_codebook
        # the C++ codebook of each format, bit for bit (fp4's -0.0 included)
        want = F.CODEBOOKS.get(spec.name, ())
        assert _f32_bits(t["codebook"]) == _f32_bits(want), spec.name
    assert set(F.CODEBOOKS) == {n for n, s in F.FORMATS.items() if s.has_codebook}


def test_nf4_codebook_identical_in_cpp_and_python():
    cpp = _backend.ext().nf4_codebook()
    assert _f32_bits(cpp) == _f32_bits(F.NF4_CODEBOOK)
    assert _backend.ext().NF4_DOUBLE_QUANT_CHUNK == F.NF4_DOUBLE_QUANT_CHUNK


def test_fp4_codebook_is_bitsandbytes_fp4():
    """Stated independently: 1 sign, 2 exponent, 1 mantissa bit with bitsandbytes' bit-pattern
    order (0b000 = 0, 0b001 = 0.0625, 0b010 = 8, 0b011 = 12, 0b100 = 4, 0b101 = 6, 0b110 = 2,
    0b111 = 3), normalised by the largest (12) in float32; the sign bit negates (-0.0 too)."""
    mags = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    table = torch.tensor(mags + [-m for m in mags], dtype=torch.float32) / torch.tensor(12.0)
    assert _f32_bits(table.tolist()) == _f32_bits(F.FP4_CODEBOOK)
    assert str(F.FP4_CODEBOOK[8]) == "-0.0"


def test_fp4_codebook_matches_bitsandbytes_dequantize():
    bnb = pytest.importorskip("bitsandbytes.functional")
    codes = torch.arange(16, dtype=torch.uint8)
    A = torch.randn(1, 64)
    packed, state = bnb.quantize_4bit(A, blocksize=64, quant_type="fp4")
    flat = packed.clone().view(-1)
    flat[:8] = (codes[0::2] << 4) | codes[1::2]  # bitsandbytes: first element in the high nibble
    state.absmax = torch.tensor([2.5])
    out = bnb.dequantize_4bit(flat.view(packed.shape), state, blocksize=64, quant_type="fp4")
    want = torch.tensor(F.FP4_CODEBOOK) * torch.tensor(2.5)
    got = out.view(-1)[:16]
    # bit for bit but for code 8's zero: bitsandbytes' CPU backend writes -0.0 on some machines
    # (AMD Zen 3) and +0.0 on others (Intel Sapphire Rapids, bitsandbytes 0.50.2); lowbit's
    # codebook keeps -0.0 (test_fp4_codebook_is_bitsandbytes_fp4 pins that on its own)
    assert torch.equal(got, want)
    nz = want != 0
    assert torch.equal(got[nz].view(torch.int32), want[nz].view(torch.int32))


def test_codebooks_have_sixteen_distinct_magnitudes_in_unit_interval():
    for name, cb in F.CODEBOOKS.items():
        assert len(cb) == 16 and max(abs(v) for v in cb) == 1.0, name
        assert len(set(cb)) == 15 or len(set(cb)) == 16, name  # fp4: +0 and -0 compare equal


def test_codebook_is_ascending_and_spans_unit_interval():
    cb = F.NF4_CODEBOOK
    assert len(cb) == 16 and list(cb) == sorted(cb) and cb[0] == -1.0 and cb[-1] == 1.0 and 0.0 in cb


def test_every_format_documents_its_layout():
    for spec in F.FORMATS.values():
        for word in ("data", "scales", "decode"):
            assert word in spec.doc, (spec.name, word)


@pytest.mark.parametrize("fmt,group,expected", [
    ("int4", None, 128), ("nf4", None, 64), ("int8", None, -1), ("int4", -1, -1),
    ("int4", 32, 32), ("nf4", 256, 256), ("int4", 48, 48), ("int8", 32, 32), ("int8", -1, -1),
    ("fp4", None, 64), ("fp4", 16, 16)])
def test_group_size_resolution(fmt, group, expected):
    assert F.check_group_size(F.get_format(fmt), group) == expected


@pytest.mark.parametrize("fmt,group", [("int4", 0), ("int4", 7), ("int4", 100), ("nf4", -2),
                                       ("int4", 16384), ("int8", 24), ("int8", 0), ("fp4", 8)])
def test_bad_group_size_is_refused(fmt, group):
    with pytest.raises(ValueError, match="group_size"):
        F.check_group_size(F.get_format(fmt), group)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown weight format"):
        lowbit.quantize_weight(__import__("torch").randn(4, 4), "int3")


# ---- the interop variants' options and layouts ------------------------------------------------
@pytest.mark.parametrize("fmt,opts,zeros_dtype", [
    ("int8", {"symmetric": False}, torch.int16),
    ("int8", {"symmetric": False, "zero_point": "int", "group_size": 32}, torch.int16),
    ("int4", {}, torch.uint8),
    ("int4", {"zero_point": "float"}, torch.float32),
    ("int4", {"zero_point": "float", "symmetric": False}, torch.float32),
    ("int8", {}, None), ("int8", {"group_size": 32}, None), ("fp4", {}, None),
    ("fp4", {"double_quant": True}, None)])
def test_variant_layouts(fmt, opts, zeros_dtype):
    qw = lowbit.quantize_weight(torch.randn(6, 100), fmt, **opts)
    G = qw.n_groups
    assert G == -(-100 // F.effective_group(qw.group_size, 100))
    if zeros_dtype is None:
        assert qw.zeros is None and qw.symmetric
    else:
        assert qw.zeros.dtype == zeros_dtype and tuple(qw.zeros.shape) == (6, G)
    assert qw.scales.shape[0] == 6 and qw.scales.shape[1] == G
    assert qw.data.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    assert qw.zero_point == opts.get("zero_point", "int")
    qw.validate()


@pytest.mark.parametrize("fmt,opts,match", [
    ("nf4", {"zero_point": "float"}, "int4 only"),
    ("int8", {"zero_point": "float"}, "int4 only"),
    ("int4", {"zero_point": "float", "symmetric": True}, "asymmetric"),
    ("int4", {"zero_point": "int", "symmetric": True}, "zero_point applies"),
    ("int4", {"zero_point": "min"}, "zero_point must be"),
    ("fp4", {"symmetric": False}, "always symmetric"),
    ("int8", {"double_quant": True}, "double_quant"),
    ("int4", {"double_quant": True}, "double_quant"),
])
def test_bad_variant_options_are_refused(fmt, opts, match):
    with pytest.raises(ValueError, match=match):
        lowbit.quantize_weight(torch.randn(4, 64), fmt, **opts)


def test_quantized_weight_refuses_inconsistent_variant_fields():
    from lowbit import QuantizedWeight
    qw = lowbit.quantize_weight(torch.randn(4, 64), "int4", group_size=32, zero_point="float")
    kw = dict(group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="zeros.*uint8"):  # float offsets under zero_point="int"
        QuantizedWeight("int4", (4, 64), qw.data, qw.scales, qw.zeros, **kw)
    with pytest.raises(ValueError, match="zeros.*float32"):
        QuantizedWeight("int4", (4, 64), qw.data, qw.scales, qw.zeros.to(torch.uint8),
                        zero_point="float", **kw)
    with pytest.raises(ValueError, match="zero_point must be"):
        QuantizedWeight("int4", (4, 64), qw.data, qw.scales, qw.zeros, zero_point="f", **kw)
    q8 = lowbit.quantize_weight(torch.randn(4, 64), "int8", symmetric=False, group_size=32)
    with pytest.raises(ValueError, match="zeros.*int16"):
        QuantizedWeight("int8", (4, 64), q8.data, q8.scales, q8.zeros.to(torch.uint8), **kw)
    with pytest.raises(ValueError, match="scales.*\\[4, 2\\]"):
        QuantizedWeight("int8", (4, 64), q8.data, q8.scales[:, :1].contiguous(), q8.zeros, **kw)
    fp = lowbit.quantize_weight(torch.randn(4, 64), "fp4")
    with pytest.raises(ValueError, match="no asymmetric variant"):
        QuantizedWeight("fp4", (4, 64), fp.data, fp.scales, group_size=64, symmetric=False)


def test_repr_and_config_name_the_variant():
    qw = lowbit.quantize_weight(torch.randn(4, 64), "int4", group_size=32, zero_point="float")
    assert "zero_point='float'" in repr(qw) and qw.config()["zero_point"] == "float"
    q8 = lowbit.quantize_weight(torch.randn(4, 64), "int8", group_size=32)
    assert "group_size=32" in repr(q8) and "symmetric=True" in repr(q8)
    assert "double_quant=False" in repr(lowbit.quantize_weight(torch.randn(4, 64), "fp4"))
