"""GPTQ import / export (lowbit.io.gptq).

No GPTQ tool installs here (AutoGPTQ / GPTQModel need CUDA builds), so checkpoints are written by
an independent packer below, from the layout the tools' source defines (AutoGPTQ / GPTQModel
``pack``): qweight int32 [K*b/32, N] packed along K, qzeros int32 [G, N*b/32] packed along N
(v1 stores z - 1), scales fp16 [G, N], g_idx [K]; and decoded the tools' way,
``scales[g_idx] * (q - zeros[g_idx])`` in float16. Hand-worked vectors pin the bit order.
"""

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit import reference
from lowbit.io import export_gptq, load_checkpoint, load_gptq
from lowbit.io._common import UnsupportedCheckpoint
from lowbit.io.gptq import gptq_layer
from lowbit.testing import assert_linear_close


# ---- an independent GPTQ writer (loops over the documented bit positions) -------------------
def pack_along_k(q: np.ndarray, bits: int) -> torch.Tensor:
    """codes [K, N] -> int32 [K*bits/32, N]: word r holds rows r*per + j at bit bits*j."""
    per = 32 // bits
    K, N = q.shape
    words = np.zeros((K // per, N), dtype=np.uint64)
    for r in range(K // per):
        for j in range(per):
            words[r] |= q[r * per + j].astype(np.uint64) << np.uint64(bits * j)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def pack_along_n(z: np.ndarray, bits: int) -> torch.Tensor:
    """zeros [G, N] -> int32 [G, N*bits/32]: word c holds columns c*per + j at bit bits*j."""
    per = 32 // bits
    G, N = z.shape
    words = np.zeros((G, N // per), dtype=np.uint64)
    for c in range(N // per):
        for j in range(per):
            words[:, c] |= z[:, c * per + j].astype(np.uint64) << np.uint64(bits * j)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def random_gptq(K, N, bits, group_size, *, v1=False, desc_act=False, sym=False, seed=0):
    """(tensors, W_fp16 [N, K] the GPTQ tools' dequantization, codes, zeros, g_idx)."""
    g = np.random.default_rng(seed)
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    maxq = 2 ** bits - 1
    q = g.integers(0, maxq + 1, size=(K, N))
    z = np.full((G, N), 2 ** (bits - 1)) if sym else g.integers(1 if v1 else 0, maxq + 1, size=(G, N))
    scales = torch.from_numpy((g.random((G, N)) * 0.02 + 0.001).astype(np.float16))
    g_idx = np.arange(K) // gs
    if desc_act:
        g_idx = g_idx[g.permutation(K)]
    tensors = {"qweight": pack_along_k(q, bits), "qzeros": pack_along_n(z - 1 if v1 else z, bits),
               "scales": scales, "g_idx": torch.from_numpy(g_idx.astype(np.int32))}
    gi = torch.from_numpy(g_idx)
    w16 = scales[gi] * (torch.from_numpy(q) - torch.from_numpy(z)[gi])  # fp16, as the tools do
    return tensors, w16.t().contiguous(), q, z, g_idx


CASES = [  # (bits, group_size, v1, desc_act, sym, K, N)
    (4, 32, False, False, False, 128, 24),
    (4, 64, True, True, False, 192, 16),
    (4, 128, True, False, True, 256, 8),
    (4, -1, False, True, False, 64, 32),
    (4, 64, False, False, False, 96, 8),  # ragged last group (K = 96, group 64)
    (8, 32, False, True, False, 64, 12),
    (8, 64, True, False, True, 128, 8),
    (8, -1, True, False, False, 32, 4),
]


@pytest.mark.parametrize("bits,group,v1,desc,sym,K,N", CASES)
def test_dequantize_matches_gptq_exactly(bits, group, v1, desc, sym, K, N, exact_cpu_path):
    t, w16, q, z, g_idx = random_gptq(K, N, bits, group, v1=v1, desc_act=desc, sym=sym)
    qw = gptq_layer(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits,
                    group_size=group, checkpoint_format="gptq" if v1 else "gptq_v2")
    assert qw.fmt == ("int4" if bits == 4 else "int8")
    assert qw.symmetric == sym
    assert (qw.perm is not None) == (desc and group != -1)  # one group: any order is the same
    # float16: the tools' own values, bit for bit; float32: the exact product s * (q - z)
    assert torch.equal(lowbit.dequantize(qw, torch.float16), w16)
    assert torch.equal(reference.dequantize(qw, torch.float16), w16)
    gi = torch.from_numpy(g_idx)
    exact = (t["scales"].double()[gi] * (torch.from_numpy(q) - torch.from_numpy(z)[gi]).double()).t()
    assert torch.equal(lowbit.dequantize(qw).double(), exact)
    x = torch.randn(3, K)
    assert_linear_close(lowbit.linear(x, qw), reference.linear(x, qw), x, qw)
    assert_linear_close(lowbit.linear(x, qw), torch.nn.functional.linear(x, exact.float()), x, qw)


def test_hand_worked_4bit_v1():
    # One word per column along K (K = 8): column 0 holds codes 1..8 for k = 0..7, i.e. the
    # nibbles 1,2,...,8 from the least significant end: 0x87654321 = -2023406815 as int32.
    qweight = torch.zeros(1, 8, dtype=torch.int32)
    qweight[0, 0] = -2023406815
    # v1 zeros store z - 1 = 7 in each of the 8 nibbles: 0x77777777 = 2004318071, so z = 8.
    qzeros = torch.tensor([[2004318071]], dtype=torch.int32)
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    qw = gptq_layer(qweight, qzeros, scales, torch.zeros(8, dtype=torch.int32), bits=4,
                    group_size=-1, checkpoint_format="gptq")
    w = lowbit.dequantize(qw)
    # w[0, k] = 0.5 * (code - 8) for codes 1..8; every other column has code 0: 0.5 * -8 = -4
    assert w[0].tolist() == [-3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0]
    assert torch.equal(w[1:], torch.full((7, 8), -4.0))
    assert qw.symmetric  # every zero is 8


def test_hand_worked_8bit_v2():
    # 8-bit: four codes per word; column 0 has codes 1, 2, 3, 4 for k = 0..3: 0x04030201.
    qweight = torch.zeros(1, 4, dtype=torch.int32)
    qweight[0, 0] = 0x04030201
    # v2 zeros 128, 127, 126, 0 for columns 0..3: 0x007E7F80
    qzeros = torch.tensor([[0x007E7F80]], dtype=torch.int32)
    scales = torch.full((1, 4), 0.25, dtype=torch.float16)
    qw = gptq_layer(qweight, qzeros, scales, None, bits=8, group_size=-1, checkpoint_format="gptq_v2")
    w = lowbit.dequantize(qw)
    assert w[0].tolist() == [0.25 * (c - 128) for c in (1, 2, 3, 4)]  # -31.75 ... -31.0
    assert w[1].tolist() == [0.25 * -127] * 4
    assert w[2].tolist() == [0.25 * -126] * 4
    assert w[3].tolist() == [0.0] * 4  # code 0 - zero 0


def test_v1_zero_nibble_15_is_zero_16():
    # AutoGPTQ's v1 decode adds 1 per nibble: a stored 15 is a zero of 16, beyond int4's 0..15;
    # lowbit holds such a layer as int8 groups, with the same values.
    K, N = 64, 8
    t, _, q, _, g_idx = random_gptq(K, N, 4, 32, v1=True)
    z = np.full((2, N), 16)
    z[1, :4] = 3
    t["qzeros"] = pack_along_n(z - 1, 4)
    qw = gptq_layer(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, group_size=32,
                    checkpoint_format="gptq")
    assert qw.fmt == "int8" and not qw.symmetric
    gi = torch.from_numpy(g_idx)
    w16 = (t["scales"][gi] * (torch.from_numpy(q) - torch.from_numpy(z)[gi])).t()
    assert torch.equal(lowbit.dequantize(qw, torch.float16), w16)


def test_unsupported_variants_are_named():
    t, *_ = random_gptq(64, 8, 4, 32)
    with pytest.raises(UnsupportedCheckpoint, match="3-bit"):
        gptq_layer(t["qweight"], t["qzeros"], t["scales"], None, bits=3, group_size=32)
    with pytest.raises(UnsupportedCheckpoint, match="marlin"):
        gptq_layer(t["qweight"], t["qzeros"], t["scales"], None, bits=4, group_size=32,
                   checkpoint_format="marlin")
    bad = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)  # groups of 40 and 24, not 32
    with pytest.raises(UnsupportedCheckpoint, match="group_size=32"):
        gptq_layer(t["qweight"], t["qzeros"], t["scales"], bad, bits=4, group_size=32)
    sd = {f"l.{k}": v for k, v in t.items()}
    with pytest.raises(ValueError, match="checkpoint_format"):
        load_gptq(sd, bits=4, group_size=32)  # a bare mapping: v1 vs v2 can't be told
    with pytest.raises(UnsupportedCheckpoint, match="pack_dtype"):
        from lowbit.io.gptq import _settings
        _settings({"quant_method": "gptq", "bits": 4, "pack_dtype": "int64"}, None, None, None)


def _fp16_scales(qw):
    qw.scales = qw.scales.to(torch.float16).to(torch.float32)
    return qw


def _same(a, b):
    assert a.fmt == b.fmt and a.shape == b.shape and a.symmetric == b.symmetric
    assert a.group_size == b.group_size or {a.group_size, b.group_size} <= {-1, a.shape[1]}
    for f in ("data", "scales", "zeros"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f
    assert torch.equal(reference.dequantize(a), reference.dequantize(b))


def test_export_round_trip(tmp_path):
    w = torch.randn(32, 128)
    # GPTQ's g_idx says which group each input feature is in, not the order inside a group:
    # a perm sorted within each group comes back identical (any other, to the same weights)
    shuffled = torch.randperm(128)
    perm = shuffled.reshape(4, 32).sort(dim=1).values.reshape(-1)
    weights = {
        "a": _fp16_scales(lowbit.quantize_weight(w, "int4", group_size=32)),
        "b": _fp16_scales(lowbit.quantize_weight(w, "int4", group_size=32, symmetric=True)),
    }
    p = lowbit.quantize_weight(w, "int4", group_size=32)
    weights["c"] = _fp16_scales(lowbit.QuantizedWeight(
        "int4", p.shape, p.data, p.scales, p.zeros, group_size=32, symmetric=False, perm=perm))
    export_gptq(weights, tmp_path / "g4")
    back = load_gptq(tmp_path / "g4")  # no config.json: a dict
    for k in weights:
        _same(weights[k], back[k])
    assert torch.equal(back["c"].perm, perm)
    d = lowbit.QuantizedWeight("int4", p.shape, p.data, weights["c"].scales, p.zeros, group_size=32,
                               symmetric=False, perm=shuffled)
    export_gptq({"d": d}, tmp_path / "g4d")
    assert torch.equal(reference.dequantize(load_gptq(tmp_path / "g4d")["d"]), reference.dequantize(d))
    cfg = json.loads((tmp_path / "g4" / "quantize_config.json").read_text())
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["bits"] == 4 and cfg["desc_act"]
    w8 = {"x": _fp16_scales(lowbit.quantize_weight(w, "int8", group_size=32, symmetric=False)),
          "y": _fp16_scales(lowbit.quantize_weight(w, "int8", group_size=32))}
    export_gptq(w8, tmp_path / "g8", checkpoint_format="gptq")  # v1 works while no zero is 0
    back8 = load_gptq(tmp_path / "g8")
    for k in w8:
        _same(w8[k], back8[k])


def test_export_refuses_what_gptq_cannot_hold(tmp_path):
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="codebook"):
        export_gptq({"l": lowbit.quantize_weight(w, "nf4")}, tmp_path / "a")
    with pytest.raises(ValueError, match="float offsets"):
        export_gptq({"l": lowbit.quantize_weight(w, "int4", group_size=32, zero_point="float")},
                    tmp_path / "b")
    with pytest.raises(ValueError, match="float16"):
        export_gptq({"l": lowbit.quantize_weight(w, "int4", group_size=32)}, tmp_path / "c")
    mixed = {"a": _fp16_scales(lowbit.quantize_weight(w, "int4", group_size=32)),
             "b": _fp16_scales(lowbit.quantize_weight(w, "int4", group_size=64))}
    with pytest.raises(ValueError, match="different"):
        export_gptq(mixed, tmp_path / "d")


# ---- a whole transformers folder ---------------------------------------------------------------
def tiny_llama():
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_transformers_gptq_folder_loads_as_model(tmp_path, exact_cpu_path):
    """A transformers-style GPTQ folder (config.json with quantization_config, v1, act-order)
    becomes a LlamaForCausalLM of QuantLinear layers whose logits match the float model with
    the GPTQ-decoded weights."""
    from safetensors.torch import save_file

    from lowbit import QuantLinear
    model = tiny_llama()
    sd = {k: v for k, v in model.state_dict().items()}
    for i in range(2):
        for j, lin in enumerate(LINEARS):
            name = f"model.layers.{i}.{lin}"
            mod = model.get_submodule(name)
            t, _, q, z, g_idx = random_gptq(mod.in_features, mod.out_features, 4, 32, v1=True,
                                            desc_act=True, seed=10 * i + j)
            del sd[f"{name}.weight"]
            sd.update({f"{name}.{k}": v for k, v in t.items()})
            # the model runs in float32: its weight is the exact product s * (q - z) (which
            # lowbit.dequantize returns; the tools' float16 is that value rounded, tested above)
            gi = torch.from_numpy(g_idx)
            exact = t["scales"].double()[gi] * (torch.from_numpy(q) - torch.from_numpy(z)[gi])
            with torch.no_grad():
                mod.weight.copy_(exact.t().float())
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                  "desc_act": True, "sym": False, "checkpoint_format": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_checkpoint(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        got, want = loaded(ids).logits, model(ids).logits
    # 2 layers of float32 math in another summation order: a few ulps of the logits' scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and back out: export -> load gives the same codes
    export_gptq(loaded, tmp_path / "again")
    again = load_checkpoint(tmp_path / "again")
    for n, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            _same(m.qweight, again.get_submodule(n).qweight)


def test_bad_group_size_and_negative_group_index_are_named():
    t, *_ = random_gptq(64, 8, 4, 32, desc_act=True)
    for gs in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            gptq_layer(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, group_size=gs)
    g_idx = t["g_idx"].clone()
    g_idx[3] = -1
    with pytest.raises(ValueError, match="negative group index"):
        gptq_layer(t["qweight"], t["qzeros"], t["scales"], g_idx, bits=4, group_size=32)
