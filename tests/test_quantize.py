"""lowbit.QuantConfig, per-module rules, calibration handling and quantize_model with RTN."""

import copy
import re

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear, reference
from lowbit.quantize import QuantConfig, normalize_calibration, quantize_model
from lowbit.quantize.calibration import calibration_from_tokens

transformers = pytest.importorskip("transformers")
from quant_helpers import linear_names, tiny_llama, token_batches  # noqa: E402


# ---- config validation --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"method": "gptqq"}, "unknown method 'gptqq'"),
    ({"format": "int3"}, "unknown weight format 'int3'"),
    ({"format": "int4", "group_size": 20}, "group_size 20"),
    ({"format": "int4", "double_quant": True}, "double_quant"),
    ({"frobnicate": 1}, r"unknown QuantConfig option\(s\) \['frobnicate'\]"),
    ({"method": "rtn", "damp_percent": 0.1}, "'damp_percent' applies to method gptq, not 'rtn'"),
    ({"method": "gptq", "damp_percent": 0.0}, "'damp_percent' must be a float in"),
    ({"method": "gptq", "block_size": 0}, "'block_size' must be an int >= 1"),
    ({"method": "gptq", "act_order": "yes"}, "'act_order' must be a bool"),
    ({"method": "awq", "n_grid": 0}, "'n_grid' must be"),
    ({"method": "awq", "awq_objective": "block"}, "'awq_objective' must be"),
    ({"method": "llm.int8", "outlier_threshold": -1.0}, "'outlier_threshold' must be"),
    ({"method": "llm.int8", "format": "int4"}, "method 'llm.int8' quantizes to int8"),
    ({"max_bits_per_weight": 0}, "max_bits_per_weight must be a positive"),
    ({"max_bits_per_weight": float("nan")}, "max_bits_per_weight must be a positive"),
    ({"method": "llm.int8", "max_bits_per_weight": 4.5}, "not llm.int8"),
    ({"rules": "down_proj"}, "rules must be a list"),
    ({"rules": [("down_proj",)]}, r"rules\[0\] must be a \(pattern, action\) pair"),
    ({"rules": [("", "skip")]}, "non-empty string"),
    ({"rules": [("re:(", "skip")]}, "invalid regular expression"),
    ({"rules": [("down_proj", 8)]}, "the action must be"),
    ({"rules": [("down_proj", {"format": "int5"})]}, r"rules\[0\] \('down_proj'\): unknown weight format"),
    ({"rules": [("down_proj", {"bits": 3})]}, r"unknown format option\(s\) \['bits'\]"),
    ({"rules": {"down_proj": {"format": "int8", "group_size": 7}}}, r"rules\[0\].*group_size 7"),
])
def test_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantConfig(**kwargs)


def test_config_defaults_and_attributes():
    c = QuantConfig()
    assert (c.method, c.format, c.group_size, c.symmetric, c.double_quant) == ("rtn", "int4", 128, False, False)
    assert QuantConfig(method="llm.int8").format == "int8"
    g = QuantConfig(method="gptq", format="int4", group_size=64, act_order=False)
    assert (g.damp_percent, g.act_order, g.block_size) == (0.01, False, 128)
    assert g.first_token_weight == 512.0 and g.clip_search is True and g.act_groups == "order"
    assert g.damp_ref == "tokens"
    with pytest.raises(AttributeError, match="does not apply to method 'gptq'"):
        g.n_grid
    a = QuantConfig(method="awq", format="nf4")
    assert a.n_grid == 20 and a.clip_search is True and a.group_size == 64
    assert QuantConfig.from_dict(g.to_dict()) == g
    assert "int4 asym g64" in repr(g) and "act_order=False" in repr(g)
    # nf4 double quantization is a plain format option
    d = QuantConfig(format="nf4", double_quant=True)
    assert d.default_format == {"format": "nf4", "group_size": 64, "symmetric": True, "double_quant": True}


# ---- rules --------------------------------------------------------------------------------
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.mlp.down_proj", "model.layers.12.mlp.up_proj", "lm_head"]


def test_rules_first_match_glob_suffix_and_regex():
    c = QuantConfig(format="int4", group_size=64, rules=[
        ("layers.0.*", "skip"),                         # a dotted suffix of the name
        ("down_proj", {"format": "int8"}),              # suffix after a dot
        (re.compile(r"model\.layers\.1\d\..*"), "nf4"),  # compiled regex, full match
        ("re:.*up_proj", {"group_size": 32}),            # never reached for layers.12 (rule 2 first)
    ])
    got = {n: c.layer_options(n) for n in NAMES}
    assert got["model.layers.0.self_attn.q_proj"] is None
    assert got["model.layers.0.mlp.down_proj"] is None  # first match wins: rule 0 before rule 1
    assert got["model.layers.1.mlp.down_proj"] == {"format": "int8", "group_size": -1,
                                                   "symmetric": True, "double_quant": False}
    assert got["model.layers.12.mlp.up_proj"]["format"] == "nf4"
    assert got["model.layers.12.mlp.up_proj"]["group_size"] == 64  # nf4's own default block
    assert got["lm_head"] is None  # skipped by default
    assert c.match("lm_head")[1] == "default rule 'lm_head'"
    assert c.match("model.layers.1.mlp.down_proj")[1] == "rules[1] 'down_proj'"


def test_rules_inherit_default_options_of_same_format():
    c = QuantConfig(format="int4", group_size=64, symmetric=True, rules={"up_proj": {"group_size": 32},
                                                                         "q_proj": {"format": "int4"}})
    assert c.layer_options("mlp.up_proj") == {"format": "int4", "group_size": 32, "symmetric": True,
                                              "double_quant": False}
    assert c.layer_options("attn.q_proj") == c.default_format
    # a regex must match the whole name; a glob without wildcards only whole dotted parts
    c2 = QuantConfig(rules=[("re:up", "skip"), ("p_proj", "skip")])
    assert c2.layer_options("mlp.up_proj") is not None


def test_lm_head_default_skip_and_explicit_rule():
    model = tiny_llama(layers=1)
    quantize_model(model, QuantConfig(), progress=False)
    assert type(model.lm_head) is nn.Linear
    rep = {r.name: r for r in model.lowbit_report.layers}
    assert rep["lm_head"].method == "skip" and rep["lm_head"].format is None
    model = tiny_llama(layers=1)
    quantize_model(model, QuantConfig(rules=[("lm_head", {"format": "int8"})]), progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == "int8"


# ---- calibration --------------------------------------------------------------------------
def test_normalize_calibration_forms_and_errors():
    t = torch.randint(0, 10, (2, 5))
    assert normalize_calibration(t)[0]["input_ids"] is not None
    got = normalize_calibration([t, t[0], {"input_ids": t[1], "attention_mask": torch.ones(1, 5)}])
    assert [kw["input_ids"].shape for kw in got] == [(2, 5), (1, 5), (1, 5)]
    assert "attention_mask" in got[2]
    with pytest.raises(ValueError, match="empty"):
        normalize_calibration([])
    with pytest.raises(TypeError, match=r"calibration\[1\]: token ids must be an integer"):
        normalize_calibration([t, torch.randn(2, 5)])
    with pytest.raises(TypeError, match="not text"):
        normalize_calibration("some text")
    with pytest.raises(TypeError, match=r"calibration\[0\] must be a token-id tensor"):
        normalize_calibration([3])
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        normalize_calibration([torch.zeros(1, 2, 3, dtype=torch.long)])
    batches = calibration_from_tokens(torch.arange(100), n_samples=5, seq_len=10, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]).flatten(), torch.arange(50))
    with pytest.raises(ValueError, match="need 1100 tokens"):
        calibration_from_tokens(torch.arange(100), n_samples=11, seq_len=100)


@pytest.mark.parametrize("kwargs", [{"method": "gptq"}, {"method": "awq"}, {"method": "llm.int8"},
                                    {"max_bits_per_weight": 4.5}])
def test_methods_that_need_calibration_say_so(kwargs):
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(model, QuantConfig(**kwargs), progress=False)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_quantize_model_type_errors():
    with pytest.raises(TypeError, match="config must be a lowbit.QuantConfig"):
        quantize_model(tiny_llama(layers=1), "int4")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        quantize_model("model", QuantConfig())


# ---- RTN ----------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{"format": "int4", "group_size": 32},
                                  {"format": "int4", "group_size": 64, "symmetric": True},
                                  {"format": "int8"},
                                  {"format": "nf4", "double_quant": True, "group_size": 32}])
def test_rtn_matches_quantize_weight_and_fake_quant(opts, exact_cpu_path):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    names = [n for n in linear_names(model) if n != "lm_head"]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    out = quantize_model(model, QuantConfig(**opts), progress=False)
    assert out is model
    for n in names:
        mod = model.get_submodule(n)
        assert isinstance(mod, QuantLinear)
        want = lowbit.quantize_weight(weights[n], opts["format"],
                                      **{k: v for k, v in opts.items() if k != "format"})
        for k, t in want.tensors().items():
            assert torch.equal(getattr(mod.qweight, k), t), (n, k)
        # and the float module is gone: nothing keeps its weight alive in the model
        ref_mod = ref.get_submodule(n)
        with torch.no_grad():
            ref_mod.weight.copy_(reference.dequantize(want))
    ids = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    rep = model.lowbit_report
    assert len(rep.quantized) == len(names)
    assert all(r.method == "rtn" and r.bits_per_weight < 9 for r in rep.quantized)
    assert "bits/weight" in rep.table()


def test_rtn_keeps_dtype_and_bias_and_runs_generate():
    model = tiny_llama(layers=1).to(torch.bfloat16)
    model.model.layers[0].mlp.down_proj.bias = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    quantize_model(model, QuantConfig(format="nf4"), progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.bias.dtype == torch.bfloat16
    ids = token_batches()[0][:1, :6]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_mixed_rules_in_one_model():
    model = tiny_llama(layers=2)
    cfg = QuantConfig(format="int4", group_size=32,
                      rules=[("layers.1.mlp.*", {"format": "int8"}), ("o_proj", "skip")])
    quantize_model(model, cfg, progress=False)
    L0, L1 = model.model.layers
    assert L0.mlp.down_proj.fmt == "int4" and L1.mlp.down_proj.fmt == "int8"
    assert type(L0.self_attn.o_proj) is nn.Linear and type(L1.self_attn.o_proj) is nn.Linear
    assert L1.self_attn.q_proj.qweight.group_size == 32


def test_run_hooked_stop_before_sees_input_and_skips_the_module():
    from torch import nn
    from lowbit.quantize import blocks as B

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    m = Two()
    calls = []
    m.b.register_forward_hook(lambda mod, a, o: calls.append("b ran"))
    xs = [torch.randn(3, 8), torch.randn(2, 8)]
    seen = []
    B.run_hooked(m, [B.BlockInput((x,), {}) for x in xs], {"a": m.a, "b": m.b, "c": m.c},
                 lambda name, x, i: seen.append((name, i, x.clone())), stop_before="b")
    assert calls == [] and [(n, i) for n, i, _ in seen] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    with torch.no_grad():
        torch.testing.assert_close(seen[1][2], m.a(xs[0]))
        torch.testing.assert_close(seen[3][2], m.a(xs[1]))
