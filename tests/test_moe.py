"""Fused MoE experts (transformers >= 5 keeps them as 3-D parameters, not nn.Linear):
QuantExperts against the model's own forward on the dequantized weights, quantize_model,
save / load, and modules whose layout lowbit does not understand."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.moe import QuantExperts, check_layout, is_fused_experts
from lowbit.quantize import QuantConfig, quantize_model

transformers = pytest.importorskip("transformers")
V = 96

MOE = {  # model type -> config options of a tiny random model
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # transposed [E, in, out] weights, biases, interleaved gate/up with its own clamped gating
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["full_attention", "sliding_attention"]),
}


def tiny_moe(arch, seed=0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(arch, vocab_size=V, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               **{**MOE[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init leaves the experts' share of the output tiny
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.2)
    return model


def experts_of(model):
    return {n: m for n, m in model.named_modules() if is_fused_experts(m)}


def routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return idx, torch.rand(T, k, generator=g)


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("fmt,opts", [("int4", {"group_size": 32}), ("int8", {}), ("nf4", {})])
@torch.no_grad()
def test_quant_experts_equal_the_models_forward_on_dequantized_weights(arch, fmt, opts,
                                                                       exact_cpu_path):
    name, mod = next(iter(experts_of(tiny_moe(arch)).items()))
    fake = copy.deepcopy(mod)
    up_name = "gate_up_proj" if hasattr(fake, "gate_up_proj") else "up_proj"
    qe = QuantExperts.from_experts(mod, fmt, **opts)
    # the module became qe.base, its float weights taken out
    assert mod is qe.base and up_name not in mod._parameters and "down_proj" not in mod._parameters
    transposed = bool(getattr(fake, "is_transposed", False))
    for e in range(qe.num_experts):
        for p, q in ((getattr(fake, up_name), qe.up[e]), (fake.down_proj, qe.down[e])):
            w = q.dequantize(p.dtype)
            p[e].copy_(w.t() if transposed else w)
    E = qe.num_experts
    for T, k in ((1, 1), (7, 2), (33, E)):
        x = torch.randn(T, 64)
        idx, w = routing(T, E, k, seed=T)
        torch.testing.assert_close(qe(x, idx, w), fake(x, idx, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_quantize_model_packs_the_experts_and_reloads(arch, tmp_path):
    model = tiny_moe(arch)
    names = list(experts_of(model))
    assert len(names) == 2
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    quantize_model(model, QuantConfig(format="int4", group_size=32), progress=False)
    assert all(isinstance(model.get_submodule(n), QuantExperts) for n in names)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    rows = {r.name: r for r in model.lowbit_report.layers}
    assert all(rows[n].method == "rtn" and rows[n].info["experts"] == 4 for n in names)
    # int4 g32: 4 bits + a float32 scale and an 8-bit zero per 32 weights
    assert all(rows[n].bits_per_weight == pytest.approx(4 + 40 / 32) for n in names)
    with torch.no_grad():
        got = model(ids).logits
    path = tmp_path / "moe.lowbit"
    lowbit.save(model, path)
    again = lowbit.load(path, lambda: tiny_moe(arch, seed=1))
    assert all(isinstance(again.get_submodule(n), QuantExperts) for n in names)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
    assert again.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)
    # a float model of another expert count is refused clearly
    from lowbit.io.serialize import CheckpointError
    with pytest.raises(CheckpointError, match="4 experts in the checkpoint but 3"):
        lowbit.load(path, lambda: tiny_moe(arch, num_local_experts=3))


def test_calibrated_methods_quantize_experts_by_rtn_and_say_so():
    model = tiny_moe("qwen3_moe")
    calib = [torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantize_model(model, QuantConfig(method="gptq", format="int4", group_size=32),
                   calibration=calib, progress=False)
    assert all(isinstance(m, QuantExperts) for m in
               (model.get_submodule(n) for n, _ in model.named_modules() if n.endswith("experts")))
    assert any("round-to-nearest" in n for n in model.lowbit_report.notes)


def test_rules_can_skip_the_experts():
    model = tiny_moe("mixtral")
    quantize_model(model, QuantConfig(format="int4", rules=[("experts", "skip")]), progress=False)
    assert len(experts_of(model)) == 2
    assert isinstance(model.model.layers[0].self_attn.q_proj, lowbit.QuantLinear)


class _SwappedExperts(nn.Module):
    """Looks like fused experts but applies the activation to the second half (up, gate)."""

    def __init__(self, E=3, H=16, I=8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))
        self.act_fn = nn.SiLU()

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                up, gate = (x[t] @ self.gate_up_proj[e].T).chunk(2)
                out[t] += w[t, j] * (self.act_fn(gate) * up) @ self.down_proj[e].T
        return out


class _MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 3)
        self.experts = _SwappedExperts()

    def forward(self, x):
        w, idx = torch.softmax(self.router(x), -1).topk(2, -1)
        return self.experts(x, idx, w)


def test_an_experts_module_of_unknown_semantics_stays_float():
    torch.manual_seed(0)
    assert is_fused_experts(_SwappedExperts())
    ok, why = check_layout(_SwappedExperts())
    assert not ok and "does not reproduce" in why
    block = _MoEBlock()
    x = torch.randn(5, 16)
    ref = block(x)
    quantize_model(block, QuantConfig(format="int8"), progress=False)
    assert isinstance(block.experts, _SwappedExperts)
    assert isinstance(block.router, lowbit.QuantLinear)
    assert any("left in float" in n for n in block.lowbit_report.notes)
    assert float((block(x) - ref).norm() / ref.norm()) < 0.05


def test_quant_experts_bad_inputs():
    qe = QuantExperts.from_experts(_SwappedExperts(), "int8")
    idx, w = routing(4, 3, 2)
    with pytest.raises(ValueError, match="hidden_states"):
        qe(torch.randn(4, 15), idx, w)
    with pytest.raises(ValueError, match="top_k"):
        qe(torch.randn(4, 16), idx[:3], w)
    with pytest.raises(TypeError, match="fused-experts"):
        QuantExperts.from_experts(nn.Linear(4, 4), "int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_quantized_moe_model_on_cuda_matches_cpu(exact_cpu_path):
    model = tiny_moe("mixtral")
    quantize_model(model, QuantConfig(format="int4", group_size=32), progress=False)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    cpu = model(ids).logits
    model.to("cuda")
    got = model(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, cpu, rtol=1e-3, atol=1e-3)
    model.to(torch.bfloat16)
    assert torch.isfinite(model(ids.cuda()).logits).all()


def test_size_stats_count_the_experts_before_and_after():
    from lowbit import evaluate as E
    model = tiny_moe("mixtral")
    n_experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    n_linear = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and not n.endswith("lm_head"))
    before = E.size_stats(model)
    assert before["linear_weights"] == n_experts + n_linear
    quantize_model(model, QuantConfig(format="int8"), progress=False)
    after = E.size_stats(model)
    assert after["linear_weights"] == before["linear_weights"]
    assert 8.0 < 8 * after["linear_bytes"] / after["linear_weights"] < 9.0
