"""AWQ (GEMM) import (lowbit.io.awq).

AutoAWQ does not install here (CUDA builds), so checkpoints are written by an independent packer
from the layout in AutoAWQ's source (WQLinear_GEMM.from_linear): qweight int32 [K, N/8] where
nibble i of word c holds output column 8c + order[i], order = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros
[K/g, N/8] packed the same way; scales fp16 [K/g, N]; decoded AutoAWQ's way (unpack, undo the
order, ``(q - z) * s`` in float16).
"""

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit import reference
from lowbit.io import load_awq, load_checkpoint
from lowbit.io._common import UnsupportedCheckpoint
from lowbit.io.awq import awq_layer
from lowbit.io.checkpoint import detect_format
from lowbit.testing import assert_linear_close

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order (nibble i <- column 8c + ORDER[i])


def awq_pack(codes: np.ndarray) -> torch.Tensor:
    """codes [R, N] in 0..15 -> int32 [R, N/8] in AWQ's GEMM order."""
    R, N = codes.shape
    words = np.zeros((R, N // 8), dtype=np.uint64)
    for c in range(N // 8):
        for i in range(8):
            words[:, c] |= codes[:, 8 * c + ORDER[i]].astype(np.uint64) << np.uint64(4 * i)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def awq_unpack_like_autoawq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's dequant-side unpack: shifts 0, 4, ..., 28, then the reverse order."""
    shifts = torch.arange(0, 32, 4)
    x = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    x = x.reshape(packed.shape[0], -1)
    rev = torch.arange(x.shape[1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    return x[:, rev]


def random_awq(K, N, group_size, seed=0):
    g = np.random.default_rng(seed)
    gs = K if group_size == -1 else group_size
    G = K // gs
    q = g.integers(0, 16, size=(K, N))
    z = g.integers(0, 16, size=(G, N))
    scales = torch.from_numpy((g.random((G, N)) * 0.02 + 0.001).astype(np.float16))
    t = {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": scales}
    iw, iz = awq_unpack_like_autoawq(t["qweight"]), awq_unpack_like_autoawq(t["qzeros"])
    assert torch.equal(iw, torch.from_numpy(q)) and torch.equal(iz, torch.from_numpy(z))
    zr = iz.repeat_interleave(gs, dim=0)
    sr = scales.repeat_interleave(gs, dim=0)
    w16 = ((iw - zr) * sr).t().contiguous()  # AutoAWQ: float16
    exact = ((iw - zr).double() * sr.double()).t().contiguous()
    return t, w16, exact


@pytest.mark.parametrize("K,N,group", [(128, 16, 32), (256, 24, 128), (64, 8, -1), (192, 40, 64)])
def test_dequantize_matches_awq_exactly(K, N, group, exact_cpu_path):
    t, w16, exact = random_awq(K, N, group)
    qw = awq_layer(t["qweight"], t["qzeros"], t["scales"], group_size=group)
    assert qw.fmt == "int4" and not qw.symmetric and qw.shape == (N, K)
    assert torch.equal(lowbit.dequantize(qw, torch.float16), w16)
    assert torch.equal(lowbit.dequantize(qw).double(), exact)
    x = torch.randn(2, K)
    assert_linear_close(lowbit.linear(x, qw), reference.linear(x, qw), x, qw)


def test_hand_worked_word():
    # Columns 0..7 carry codes 0..7; nibble i holds column ORDER[i], so the nibbles from the
    # least significant end are 0, 2, 4, 6, 1, 3, 5, 7: the word 0x75316420 = 1966171168.
    qweight = torch.tensor([[1966171168]] * 32, dtype=torch.int32)  # K = 32 identical rows
    qzeros = torch.tensor([[0]], dtype=torch.int32)
    scales = torch.full((1, 8), 2.0, dtype=torch.float16)
    qw = awq_layer(qweight, qzeros, scales, group_size=32)
    w = lowbit.dequantize(qw)
    assert torch.equal(w, (2.0 * torch.arange(8.0))[:, None].expand(8, 32))  # row n = 2 * n


def test_unsupported_variants_are_named(tmp_path):
    t, *_ = random_awq(64, 8, 32)
    for qcfg, match in (({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "gemv"),
                        ({"quant_method": "awq", "bits": 8, "group_size": 32, "version": "gemm"}, "8-bit"),
                        ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False}, "zero_point")):
        d = tmp_path / match
        d.mkdir()
        from safetensors.torch import save_file
        save_file({f"l.{k}": v for k, v in t.items()}, str(d / "model.safetensors"))
        (d / "quant_config.json").write_text(json.dumps(qcfg))
        with pytest.raises(UnsupportedCheckpoint, match=match):
            load_awq(d)
    with pytest.raises(ValueError, match="GEMM layout"):  # a GEMV-shaped qweight [N, K/8]
        awq_layer(t["qweight"].t().contiguous(), t["qzeros"], t["scales"], group_size=32)


def test_transformers_awq_folder_loads_as_model(tmp_path, exact_cpu_path):
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sd = dict(model.state_dict())
    sd.pop("lm_head.weight", None)  # tied to the embedding
    for j, lin in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
        name = f"model.layers.0.{lin}"
        mod = model.get_submodule(name)
        t, _, exact = random_awq(mod.in_features, mod.out_features, 32, seed=j)
        del sd[f"{name}.weight"]
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        with torch.no_grad():
            mod.weight.copy_(exact.float())
    save_file(sd, str(tmp_path / "model.safetensors"))
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32,
                                "zero_point": True, "version": "gemm"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert detect_format(tmp_path) == "awq"
    assert detect_format(tmp_path / "model.safetensors") == "awq"  # from the tensor shapes
    loaded = load_checkpoint(tmp_path)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        got, want = loaded(ids).logits, model(ids).logits
    # one layer of float32 math in another summation order: a few ulps of the logits' scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    as_dict = load_checkpoint(tmp_path, as_model=False)
    assert sorted(as_dict) == sorted(n for n, m in loaded.named_modules()
                                     if isinstance(m, lowbit.QuantLinear))
