"""GGUF import / export (lowbit.io.gguf), against the gguf package's own numpy quantize /
dequantize (the reference transformers uses), hand-worked blocks, and the bundled SmolLM2 GGUF
(Q4_1 + Q8_0) loaded natively vs transformers' own float load of the same file."""

import os

import numpy as np
import pytest
import torch

import lowbit
from lowbit import reference
from lowbit.io import export_gguf, load_checkpoint, load_gguf
from lowbit.io._common import UnsupportedCheckpoint
from lowbit.io.gguf import decode_tensor, encode_tensor
from lowbit.testing import assert_linear_close

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def bits_of(t):
    return t.view(torch.int32)


def random_blocks(type_name, N, K, seed=0):
    """Arbitrary bytes for every field of the blocks (all bit patterns are valid codes and
    6-bit scales), with finite fp16 d / m / dmin."""
    g = np.random.default_rng(seed)
    qt = getattr(T, type_name)
    per, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = g.integers(0, 256, size=(N, K // per, nbytes), dtype=np.uint8)
    n_f16 = {"Q8_0": 1, "Q4_0": 1, "Q4_1": 2, "Q4_K": 2}[type_name]
    halves = (g.standard_normal((N, K // per, n_f16)) * 0.05).astype(np.float16)
    raw[..., : 2 * n_f16] = halves.view(np.uint8).reshape(N, K // per, 2 * n_f16)
    return raw.reshape(N, -1)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("N,K", [(5, 256), (3, 768)])
def test_decode_matches_gguf_bit_for_bit(type_name, N, K, exact_cpu_path):
    raw = random_blocks(type_name, N, K, seed=N + K)
    want = torch.from_numpy(gguf.dequantize(raw, getattr(T, type_name)).reshape(N, K))
    qw = decode_tensor(raw, type_name, (N, K))
    assert torch.equal(bits_of(reference.dequantize(qw)), bits_of(want))
    assert torch.equal(bits_of(lowbit.dequantize(qw)), bits_of(want))
    x = torch.randn(2, K)
    assert_linear_close(lowbit.linear(x, qw), reference.linear(x, qw), x, qw)
    if type_name != "Q4_K":  # exported back byte for byte
        out_type, blocks = encode_tensor(qw)
        assert out_type == type_name and np.array_equal(blocks, raw)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quantized_floats(type_name):
    w = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    raw = gguf.quantize(w, getattr(T, type_name))
    qw = decode_tensor(raw, type_name, (6, 512))
    want = torch.from_numpy(gguf.dequantize(raw, getattr(T, type_name)))
    assert torch.equal(bits_of(lowbit.dequantize(qw)), bits_of(want))


def test_hand_worked_q4_0_and_q4_k():
    # Q4_0: d = 0.5 (fp16 0x3800), byte 0 = 0x2A: value 0 is the low nibble 10 -> (10 - 8) * 0.5
    # = 1.0, value 16 the high nibble 2 -> (2 - 8) * 0.5 = -3.0; other bytes 0x88 -> 0.
    block = np.array([0x00, 0x38, 0x2A] + [0x88] * 15, dtype=np.uint8).reshape(1, 18)
    w = lowbit.dequantize(decode_tensor(block, "Q4_0", (1, 32)))[0]
    assert w[0].item() == 1.0 and w[16].item() == -3.0 and int((w != 0).sum()) == 2
    # Q4_K: d = 1.0 (0x3C00), dmin = 0.5 (0x3800); 6-bit scales sc0 = 5, sc4 = 50 = 0b110010,
    # mins mn0 = 7, mn4 = 20 = 0b010100: byte 0 = 5 | 3 << 6 = 197, byte 4 = 7 | 1 << 6 = 71,
    # byte 8 = (50 & 15) | (20 & 15) << 4 = 66. Codes: byte 0 of the codes = 0x3A (sub-block 0
    # value 0 = 10, sub-block 1 value 0 = 3); byte 64 = 0x09 (sub-block 4 value 0 = 9).
    scales = [197, 0, 0, 0, 71, 0, 0, 0, 66, 0, 0, 0]
    qs = [0] * 128
    qs[0], qs[64] = 0x3A, 0x09
    block = np.array([0x00, 0x3C, 0x00, 0x38] + scales + qs, dtype=np.uint8).reshape(1, 144)
    w = lowbit.dequantize(decode_tensor(block, "Q4_K", (1, 256)))[0]
    assert w[0].item() == 1.0 * 5 * 10 - 0.5 * 7  # 46.5
    assert w[1].item() == -0.5 * 7  # code 0 in sub-block 0
    assert w[32].item() == 0.0  # sub-block 1: sc = mn = 0
    assert w[128].item() == 1.0 * 50 * 9 - 0.5 * 20  # 440.0
    assert w[129].item() == -0.5 * 20
    assert torch.equal(w, torch.from_numpy(gguf.dequantize(block, T.Q4_K)).reshape(-1))


def write_gguf(path, tensors):
    """tensors: name -> (raw uint8 blocks or float array, GGML type or None)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (arr, qt) in tensors.items():
        writer.add_tensor(name, arr, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_file_round_trip(tmp_path):
    src = {"a.weight": (random_blocks("Q8_0", 4, 64), T.Q8_0),
           "b.weight": (random_blocks("Q4_0", 8, 96, 1), T.Q4_0),
           "c.weight": (random_blocks("Q4_1", 2, 256, 2), T.Q4_1),
           "d.weight": (random_blocks("Q4_K", 3, 256, 3), T.Q4_K),
           "norm.weight": (np.arange(5, dtype=np.float32), None)}
    write_gguf(tmp_path / "src.gguf", src)
    loaded = load_gguf(tmp_path / "src.gguf", as_model=False)
    assert loaded["a.weight"].fmt == "int8" and loaded["d.weight"].zero_point == "float"
    assert torch.equal(loaded["norm.weight"], torch.arange(5.0))
    for name in ("a.weight", "b.weight", "c.weight", "d.weight"):
        raw, qt = src[name]
        want = torch.from_numpy(gguf.dequantize(raw, qt)).reshape(loaded[name].shape)
        assert torch.equal(bits_of(lowbit.dequantize(loaded[name])), bits_of(want))
    del loaded["d.weight"]  # Q4_K has no exporter (see encode_tensor)
    export_gguf(loaded, tmp_path / "out.gguf", metadata={"general.name": "round trip"})
    r = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    assert r.fields["general.name"].contents() == "round trip"
    for t in r.tensors:
        raw, qt = src[t.name]
        assert t.tensor_type == (qt or T.F32)
        assert np.array_equal(np.asarray(t.data).reshape(raw.shape), raw)


def test_reader_agrees_with_gguf_reader(tmp_path):
    """lowbit's GGUF reader (struct + numpy views) against gguf.GGUFReader on a file with every
    kind of metadata value and tensor type used here; then metadata copied by export_gguf."""
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.rope.freq_base", 10000.5)
    writer.add_bool("x.flag", True)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bé", "", "<s>"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0, 0.0])
    writer.add_array("llama.attention.head_count", [4, 4, 2])
    writer.add_tensor("q.weight", random_blocks("Q4_1", 3, 64), raw_dtype=T.Q4_1)
    writer.add_tensor("f.weight", np.ones((2, 3), dtype=np.float16))
    writer.add_tensor("g.weight", np.arange(6, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from lowbit.io.gguf import GGUFFile
    for path in (tmp_path / "m.gguf",):
        mine, theirs = GGUFFile(str(path)), gguf.GGUFReader(str(path))
        for key, field in theirs.fields.items():
            if key.startswith("GGUF."):
                continue
            assert mine.value(key) == field.contents(), key
            vt, _, sub = mine.fields[key]
            assert [vt] + ([sub] if sub is not None else []) == [int(t) for t in field.types], key
        assert [t.name for t in mine.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(mine.tensors, theirs.tensors):
            assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
            assert np.array_equal(np.asarray(a.data), np.asarray(b.data)) and a.data.shape == b.data.shape
    export_gguf({"g.weight": torch.arange(6.0)}, tmp_path / "copy.gguf", metadata=tmp_path / "m.gguf")
    copied = gguf.GGUFReader(str(tmp_path / "copy.gguf"))
    for key in ("llama.block_count", "tokenizer.ggml.tokens", "llama.attention.head_count", "x.flag"):
        assert copied.fields[key].contents() == theirs.fields[key].contents(), key


def test_unsupported_and_unexportable(tmp_path):
    w = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    write_gguf(tmp_path / "q5.gguf", {"x.weight": (gguf.quantize(w, T.Q5_0), T.Q5_0)})
    with pytest.raises(UnsupportedCheckpoint, match="Q5_0"):
        load_gguf(tmp_path / "q5.gguf", as_model=False)
    t = torch.randn(8, 64)
    for qw, match in ((lowbit.quantize_weight(t, "int4", group_size=64, symmetric=True), "groups of exactly 32"),
                      (lowbit.quantize_weight(t, "int4", group_size=32), "integer zero-points"),
                      (lowbit.quantize_weight(t, "int8", group_size=32), "float16"),
                      (lowbit.quantize_weight(t, "nf4", group_size=32), "no GGUF type")):
        with pytest.raises(ValueError, match=match):
            export_gguf({"w": qw}, tmp_path / "x.gguf")


# ---- the bundled model ----------------------------------------------------------------------------
from lowbit import evaluate as E  # noqa: E402

missing = E.missing_extras(need_model=True, need_text=False)


@pytest.mark.skipif(bool(missing), reason=f"evaluation extras missing: {missing}")
@torch.inference_mode()
def test_bundled_smollm2_runs_natively(exact_cpu_path):
    """SmolLM2's GGUF (Q4_1 linears, Q8_0 tied embedding) becomes a LlamaForCausalLM of
    QuantLinear layers whose weights are, bit for bit, those of transformers' own float load
    (which dequantizes with gguf and un-permutes the Q/K rows), and whose logits match it."""
    folder, name = E.bundled_model()
    model = load_checkpoint(os.path.join(folder, name))
    ref, _, _ = E.load_model(verbose=False)
    ref_sd = ref.state_dict()
    n_q = 0
    for n, m in model.named_modules():
        if isinstance(m, lowbit.QuantLinear):
            n_q += 1
            assert torch.equal(bits_of(m.dequantize()), bits_of(ref_sd[n + ".weight"])), n
            assert m.fmt == ("int8" if n == "lm_head" else "int4")
    assert n_q == 30 * 7 + 1  # every linear layer, and the output layer tied to the Q8_0 embedding
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and k in ref_sd:
            assert torch.equal(v, ref_sd[k]), k
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 28, 338, 1107, 3075, 30, 378, 2726]])
    got, want = model(ids).logits, ref(ids).logits
    # Same weights; only the float32 summation order differs (30 layers): errors of a few
    # float32 ulps of the logits' scale, where a wrong row or group would be O(1).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.skipif(bool(missing), reason=f"evaluation extras missing: {missing}")
def test_bundled_gguf_exports_back_byte_for_byte(tmp_path):
    """Every tensor of the bundled file (Q4_1, Q8_0, F32) read into lowbit and written back by
    export_gguf, metadata copied: the same bytes."""
    from lowbit.io.gguf import GGUFFile
    folder, name = E.bundled_model()
    src = os.path.join(folder, name)
    tensors = load_gguf(src, as_model=False)
    assert {type(v).__name__ for v in tensors.values()} == {"QuantizedWeight", "Tensor"}
    export_gguf(tensors, tmp_path / "copy.gguf", metadata=src)
    a, b = GGUFFile(src), GGUFFile(str(tmp_path / "copy.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name
    for key in a.fields:
        if key != "general.file_type":
            assert a.value(key) == b.value(key), key


def test_truncated_or_garbled_files_are_named(tmp_path):
    src = {"a.weight": (random_blocks("Q8_0", 4, 64), T.Q8_0),
           "norm.weight": (np.arange(5, dtype=np.float32), None)}
    write_gguf(tmp_path / "src.gguf", src)
    data = (tmp_path / "src.gguf").read_bytes()
    cases = {"short": data[:10], "header_cut": data[:40], "tensor_cut": data[:-20],
             "garbled": data[:24] + bytes(range(256)) * 4}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match="GGUF"):
            load_gguf(p, as_model=False)
