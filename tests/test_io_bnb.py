"""bitsandbytes import (lowbit.io.bnb), against bitsandbytes itself (its CPU backend): its own
quantize_4bit / dequantize_4bit / int8_vectorwise_quant / int8_vectorwise_dequant, and folders
that transformers writes with save_pretrained from a bitsandbytes-quantized model. Hand-worked
vectors pin bitsandbytes' nibble order and double-quantization decode without it."""

import json

import pytest
import torch

import lowbit
from lowbit import reference
from lowbit.io import load_bnb, load_checkpoint
from lowbit.io._common import UnsupportedCheckpoint
from lowbit.io.bnb import bnb_4bit_layer, bnb_int8_layer
from lowbit.io.checkpoint import detect_format
from lowbit.testing import assert_linear_close

NF4 = lowbit.formats.NF4_CODEBOOK


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 and 0.0 differ): "bit for bit" means equal here."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}[t.dtype])


def assert_bits_as_bnb(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, but for the sign of a zero that bitsandbytes wrote: its CPU backend gives
    fp4's code 8 (sign bit, zero magnitude) as -0.0 on some machines (AMD Zen 3) and +0.0 on
    others (Intel Sapphire Rapids, bitsandbytes 0.50.2); lowbit keeps -0.0, the value of
    bitsandbytes' own table."""
    zero = want == 0
    assert torch.equal(got[zero], want[zero])  # value equality: -0.0 == 0.0
    assert torch.equal(bits_of(got[~zero]), bits_of(want[~zero]))


def state_dict_of(q, st, prefix="l"):
    """What bitsandbytes' Params4bit serialises (quant_state.as_dict(packed=True))."""
    return {f"{prefix}.weight": q, **{f"{prefix}.weight.{k}": v for k, v in st.as_dict(packed=True).items()}}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype,block", [(torch.float32, 64), (torch.bfloat16, 128), (torch.float16, 32)])
def test_4bit_matches_bitsandbytes_bit_for_bit(quant_type, double_quant, dtype, block, exact_cpu_path):
    F = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(48, 512) * 0.05).to(dtype)
    q, st = F.quantize_4bit(w, blocksize=block, quant_type=quant_type,
                            compress_statistics=double_quant)
    qw = load_bnb(state_dict_of(q, st))["l"]
    assert qw.fmt == quant_type and qw.group_size == block and qw.shape == (48, 512)
    want = F.dequantize_4bit(q, st)
    assert want.dtype == dtype
    assert_bits_as_bnb(lowbit.dequantize(qw, dtype), want)
    assert_bits_as_bnb(reference.dequantize(qw, dtype), want)
    x = torch.randn(3, 512)
    assert_linear_close(lowbit.linear(x, qw), reference.linear(x, qw), x, qw)


def test_4bit_other_quant_storage():
    # quant_storage=bfloat16 (FSDP-friendly): the same bytes viewed as another dtype
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(16, 256)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert q.dtype == torch.bfloat16
    qw = load_bnb(state_dict_of(q, st))["l"]
    assert torch.equal(bits_of(lowbit.dequantize(qw)), bits_of(F.dequantize_4bit(q, st)))


def test_int8_codes_exact_values_within_one_ulp():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 256) * 3
    CB, SCB, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    qw = bnb_int8_layer(CB, SCB)
    assert torch.equal(qw.data, CB)  # the codes are bitsandbytes' own
    want = F.int8_vectorwise_dequant(CB, SCB)  # (q * SCB) * (1/127): two float32 roundings
    got = lowbit.dequantize(qw)  # q * (SCB * (1/127)): one scale per row, two roundings too
    ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
    assert bool(((got - want).abs() <= ulp).all())  # never more than one float32 ulp apart


def test_hand_worked_nibble_order_and_nested_absmax():
    # bitsandbytes puts element 2j in the HIGH nibble: byte 0x1F = element 0 -> code 1, element
    # 1 -> code 15. Block 64, absmax 2: w = [NF4[1] * 2, NF4[15] * 2] = [-1.392385..., 2.0].
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [1, 64]}
    weight = torch.full((32, 1), 0x1F, dtype=torch.uint8)
    qm = torch.tensor(NF4, dtype=torch.float32)
    qw = bnb_4bit_layer(weight, torch.tensor([2.0]), qm, state)
    w = lowbit.dequantize(qw)[0]
    assert w[0].item() == pytest.approx(-1.3923856019973755, abs=0) and w[1].item() == 2.0
    assert torch.equal(w[0::2], torch.full((32,), NF4[1] * 2.0)) and torch.equal(w[1::2], torch.full((32,), 2.0))
    # Double quantization: absmax = nested_quant_map[c] * nested_absmax + offset, in float32.
    # Two blocks with codes 3 and 7; the map's values there are 0.5 and -0.25; nested absmax
    # 0.8, offset 0.1: absmax = [0.5 * 0.8 + 0.1, -0.25 * 0.8 + 0.1] = [0.5, -0.1] in float32.
    nested_map = torch.zeros(256)
    nested_map[3], nested_map[7] = 0.5, -0.25
    state2 = dict(state, shape=[1, 128], nested_blocksize=256, nested_offset=0.1)
    qw2 = bnb_4bit_layer(torch.full((64, 1), 0xF0, dtype=torch.uint8), torch.tensor([3, 7], dtype=torch.uint8),
                         qm, state2, torch.tensor([0.8]), nested_map)
    a = torch.tensor([0.5, -0.25]) * torch.tensor(0.8) + torch.tensor(0.1)
    assert torch.equal(qw2.scales[0], a)
    # byte 0xF0: element 2j -> code 15 (1.0), element 2j+1 -> code 0 (-1.0)
    w2 = lowbit.dequantize(qw2)[0]
    assert torch.equal(w2[0:64:2], a[0].expand(32)) and torch.equal(w2[1:64:2], -a[0].expand(32))


def test_unsupported_variants_are_named():
    qm = torch.tensor(NF4, dtype=torch.float32)
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 96]}
    with pytest.raises(UnsupportedCheckpoint, match="straddle"):
        bnb_4bit_layer(torch.zeros(96, 1, dtype=torch.uint8), torch.ones(3), qm, state)
    state["shape"] = [2, 128]
    with pytest.raises(UnsupportedCheckpoint, match="quant_map"):
        bnb_4bit_layer(torch.zeros(128, 1, dtype=torch.uint8), torch.ones(4), qm.flip(0), state)
    with pytest.raises(UnsupportedCheckpoint, match="weight_format"):
        bnb_int8_layer(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), torch.tensor(2, dtype=torch.uint8))


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_transformers_bnb_folder_loads_as_model(tmp_path, mode, exact_cpu_path):
    """transformers quantizes a model with bitsandbytes (CPU) and saves it; lowbit loads that
    folder into QuantLinear layers whose weights are bitsandbytes' dequantization (4-bit: bit
    for bit; int8: within one ulp) and whose logits match the float model with those weights."""
    pytest.importorskip("bitsandbytes")
    import transformers
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    opts = (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                 bnb_4bit_compute_dtype=torch.float32) if mode == "nf4-dq" else dict(load_in_8bit=True))
    qmodel = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=transformers.BitsAndBytesConfig(**opts),
        device_map="cpu", dtype=torch.float32)
    qmodel.save_pretrained(tmp_path / "bnb")
    assert detect_format(tmp_path / "bnb") == "bnb"
    loaded = load_checkpoint(tmp_path / "bnb")
    # the float twin: the same model with bitsandbytes' own dequantized weights
    twin = transformers.LlamaForCausalLM(cfg).eval()
    n_layers = 0
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
                n_layers += 1
                want = dequantize_bnb_weight(mod.weight, getattr(mod, "state", None)).to(torch.float32)
                got = loaded.get_submodule(name).dequantize()
                if mode == "nf4-dq":
                    assert torch.equal(bits_of(got), bits_of(want)), name
                else:
                    ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
                    assert bool(((got - want).abs() <= ulp).all()), name
                twin.get_submodule(name).weight.copy_(got)
        twin.load_state_dict({k: v for k, v in loaded.state_dict().items()
                              if k in twin.state_dict() and not k.endswith("_extra_state")}, strict=False)
        assert n_layers == 7
        ids = torch.randint(0, 96, (2, 6))
        got, want = loaded(ids).logits, twin(ids).logits
    # one layer of float32 math in another summation order: a few ulps of the logits' scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    cfgq = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert cfgq["quant_method"] == "bitsandbytes"
