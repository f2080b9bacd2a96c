"""The Python format table and the C++ traits table agree; group-size rules."""

import pytest

import lowbit
from lowbit import _backend
from lowbit import formats as F


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
        assert t["has_codebook"] == spec.has_codebook


def test_nf4_codebook_identical_in_cpp_and_python():
    import struct
    cpp = _backend.ext().nf4_codebook()
    as_f32 = [struct.unpack("f", struct.pack("f", v))[0] for v in F.NF4_CODEBOOK]
    assert cpp == as_f32
    assert _backend.ext().NF4_DOUBLE_QUANT_CHUNK == F.NF4_DOUBLE_QUANT_CHUNK


def test_codebook_is_ascending_and_spans_unit_interval():
    cb = F.NF4_CODEBOOK
    assert len(cb) == 16 and list(cb) == sorted(cb) and cb[0] == -1.0 and cb[-1] == 1.0 and 0.0 in cb


def test_every_format_documents_its_layout():
    for spec in F.FORMATS.values():
        for word in ("data", "scales", "decode"):
            assert word in spec.doc, (spec.name, word)


@pytest.mark.parametrize("fmt,group,expected", [
    ("int4", None, 128), ("nf4", None, 64), ("int8", None, -1), ("int4", -1, -1),
    ("int4", 32, 32), ("nf4", 256, 256), ("int4", 48, 48)])
def test_group_size_resolution(fmt, group, expected):
    assert F.check_group_size(F.get_format(fmt), group) == expected


@pytest.mark.parametrize("fmt,group", [("int4", 0), ("int4", 7), ("int4", 100), ("nf4", -2),
                                       ("int4", 16384), ("int8", 128)])
def test_bad_group_size_is_refused(fmt, group):
    with pytest.raises(ValueError, match="group_size"):
        F.check_group_size(F.get_format(fmt), group)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown weight format"):
        lowbit.quantize_weight(__import__("torch").randn(4, 4), "int3")
