"""quantize_model beyond Llama: GPT-2's Conv1D layers, post-norm blocks (BERT), encoder-decoder
models (T5) and their float-only modules, on tiny random transformers models."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear
from lowbit import evaluate as E
from lowbit.nn import conv1d_to_linear, is_conv1d
from lowbit.quantize import QuantConfig, quantize_model

transformers = pytest.importorskip("transformers")
from quant_helpers import fold_random_scales, token_batches  # noqa: E402

V = 96


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # trained-like per-channel gains, so that AWQ has something to do
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                p.copy_(torch.exp(0.5 * torch.randn_like(p)))
    return model


def conv1d_names(model):
    return [n for n, m in model.named_modules() if is_conv1d(m)]


@torch.no_grad()
def test_from_linear_of_a_conv1d_equals_that_of_its_linear():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    assert is_conv1d(conv) and conv.weight.shape == (64, 192)  # [in, out]
    lin = conv1d_to_linear(conv)
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), conv(x), rtol=1e-6, atol=1e-6)
    for fmt, opts in (("int4", {"group_size": 32}), ("nf4", {}), ("int8", {})):
        a = QuantLinear.from_linear(conv, fmt, **opts)
        b = QuantLinear.from_linear(lin, fmt, **opts)
        assert a.qweight.shape == (192, 64)
        for k, v in b.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(a.state_dict()[k], v), k


@pytest.mark.parametrize("fmt", [{"format": "int4", "group_size": 32}, {"format": "int8"},
                                 {"format": "nf4", "double_quant": True}])
def test_gpt2_rtn_matches_fake_quantization_and_reloads(fmt, tmp_path, exact_cpu_path):
    model = tiny_gpt2()
    names = conv1d_names(model)
    assert len(names) == 8
    ids = token_batches(vocab=V)[0]
    fake = copy.deepcopy(model)
    E.fake_quantize_config(fake, QuantConfig(**fmt))
    quantize_model(model, QuantConfig(**fmt), progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert not conv1d_names(model)
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, fake(ids).logits, rtol=1e-4, atol=1e-4)
    path = tmp_path / "gpt2.lowbit"
    lowbit.save(model, path)
    again = lowbit.load(path, lambda: tiny_gpt2(seed=1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
    out = again.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


@pytest.mark.parametrize("config", [
    {"method": "gptq", "format": "int4", "group_size": 32},
    {"method": "awq", "format": "int4", "group_size": 32},
    {"method": "llm.int8", "format": "int8"},
    {"format": "int4", "group_size": 32, "max_bits_per_weight": 6.0},
])
def test_gpt2_calibrated_methods_quantize_every_conv1d(config):
    model = tiny_gpt2()
    ids = token_batches(vocab=V)[0]
    with torch.no_grad():
        ref = model(ids).logits
    names = conv1d_names(model)
    quantize_model(model, QuantConfig(**config), calibration=token_batches(vocab=V), progress=False)
    assert all(type(model.get_submodule(n)).__name__ != "Conv1D" for n in names)
    assert all(not isinstance(model.get_submodule(n), nn.Linear) for n in names)
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.2


@torch.no_grad()
def test_a_skipped_conv1d_stays_a_conv1d():
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(format="int8", rules=[("c_fc", "skip")]), progress=False)
    for name, mod in model.named_modules():
        if name.endswith("c_fc"):
            assert is_conv1d(mod)
        elif name.endswith(("c_attn", "c_proj")):
            assert isinstance(mod, QuantLinear)


@torch.no_grad()
def test_awq_fold_is_refused_where_the_norm_also_feeds_the_residual():
    """BERT is post-norm: attention.output.LayerNorm's output is both intermediate.dense's input
    and the residual of the block's output LayerNorm, so 1/s cannot go into that norm."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4)).eval()
    ids = token_batches(vocab=V)[0]
    ref = model(ids).last_hidden_state
    folded = fold_random_scales(model, model.encoder.layer, ids)
    assert folded[("intermediate.dense",)] is None
    torch.testing.assert_close(model(ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=V, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


@torch.no_grad()
def test_t5_keeps_its_fp32_modules_and_runs():
    model = tiny_t5()
    ids = token_batches(vocab=V)[0]
    quantize_model(model, QuantConfig(format="int8"), progress=False)
    wo = [n for n, m in model.named_modules() if n.endswith(".wo")]
    assert wo and all(isinstance(model.get_submodule(n), nn.Linear) for n in wo)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    rules = {r.name: r.rule for r in model.lowbit_report.layers}
    assert all("_keep_in_fp32_modules" in rules[n] for n in wo)
    model(input_ids=ids, decoder_input_ids=ids[:, :5])
    # an explicit rule still decides
    other = tiny_t5()
    quantize_model(other, QuantConfig(format="int8", rules=[("wo", "int8")]), progress=False)
    assert all(isinstance(other.get_submodule(n), QuantLinear) for n in wo)


def test_t5_calibration_errors_name_the_way_out():
    model = tiny_t5()
    with pytest.raises(ValueError, match="dicts of keyword arguments"):
        quantize_model(model, QuantConfig(method="gptq", format="int4", group_size=32),
                       calibration=token_batches(vocab=V), progress=False)
    calib = [{"input_ids": t, "decoder_input_ids": t[:, :8]} for t in token_batches(vocab=V)]
    quantize_model(tiny_t5(), QuantConfig(method="gptq", format="int4", group_size=32),
                   calibration=calib, progress=False)
    with pytest.raises(ValueError, match="causal LM"):
        quantize_model(tiny_t5(), QuantConfig(format="int4", group_size=32, max_bits_per_weight=5.0),
                       calibration=calib, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_quantized_gpt2_on_cuda_matches_cpu(exact_cpu_path):
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(format="int4", group_size=32), progress=False)
    ids = token_batches(vocab=V)[0]
    cpu = model(ids).logits
    model.to("cuda")
    torch.testing.assert_close(model(ids.cuda()).logits.cpu(), cpu, rtol=1e-3, atol=1e-3)
