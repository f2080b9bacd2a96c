"""AWQ: scale folding keeps the float model's outputs, fallbacks to input_scale, and error
below round-to-nearest where activations have outlier channels."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear, reference
from lowbit.quantize import QuantConfig, quantize_model
from lowbit.quantize import awq as A

transformers = pytest.importorskip("transformers")
from quant_helpers import fold_random_scales, tiny_llama, token_batches  # noqa: E402


def with_outlier_channels(model, channels=(3, 17, 40), factor=25.0):
    """Give every norm a few channels with large gains: the activations feeding q/k/v and
    gate/up then have outlier channels, as in trained LLMs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[list(channels)] *= factor
    return model


@torch.no_grad()
def test_folded_scales_keep_float_outputs():
    for kv_heads in (4, 2):  # multi-head: o's scale folds into v; grouped-query: it cannot
        model = tiny_llama(layers=2, heads=4, kv_heads=kv_heads)
        ids = token_batches()[0]
        ref = model(ids).logits
        folded = fold_random_scales(model, model.model.layers, ids)
        assert folded[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")] == "input_layernorm"
        assert folded[("mlp.gate_proj", "mlp.up_proj")] == "post_attention_layernorm"
        assert folded[("mlp.down_proj",)] == "mlp.up_proj"
        assert folded[("self_attn.o_proj",)] == ("self_attn.v_proj" if kv_heads == 4 else None)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def logits_err(model, ref, ids):
    with torch.no_grad():
        return float((model(ids).logits - ref).pow(2).mean())


@pytest.mark.parametrize("fmt", [{"format": "int4", "group_size": 32},
                                 {"format": "nf4", "group_size": 32, "double_quant": True}])
def test_awq_beats_rtn_with_outlier_channels_and_generates(fmt):
    model = with_outlier_channels(tiny_llama(layers=2, hidden=64, inter=128))
    calib = token_batches(n=4, batch=4, seq=32)
    ids = token_batches(n=1, batch=2, seq=32, seed=7)[0]
    with torch.no_grad():
        ref = model(ids).logits
    rtn = copy.deepcopy(model)
    quantize_model(rtn, QuantConfig(**fmt), progress=False)
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(method="awq", **fmt), calibration=calib, progress=False)
    assert logits_err(q, ref, ids) < 0.7 * logits_err(rtn, ref, ids)
    rep = {r.name: r for r in q.lowbit_report.layers}
    qproj = rep["model.layers.0.self_attn.q_proj"]
    assert qproj.method == "awq" and qproj.info["alpha"] > 0 and qproj.info["scale"] == "folded"
    assert "clip" in qproj.info and "clip" in rep["model.layers.0.mlp.up_proj"].info
    q2 = copy.deepcopy(model)  # clip_skip: named layers keep their full range
    quantize_model(q2, QuantConfig(method="awq", clip_skip=("q_proj", "k_proj"), **fmt),
                   calibration=calib, progress=False)
    rep2 = {r.name: r for r in q2.lowbit_report.layers}
    assert "clip" not in rep2["model.layers.1.self_attn.k_proj"].info
    assert "clip" in rep2["model.layers.1.self_attn.v_proj"].info
    assert q.model.layers[0].mlp.up_proj.fmt == fmt["format"]
    out = q.generate(ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long),
                     max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_awq_input_scale_fallback_is_exact(exact_cpu_path):
    # Grouped-query attention: o_proj's scale cannot fold into v_proj, so it is kept as the
    # layer's input_scale; the QuantLinear then computes (x / s) @ Q(W s)^T exactly.
    model = with_outlier_channels(tiny_llama(layers=1, heads=4, kv_heads=2))
    calib = token_batches(n=2, batch=4, seq=32)
    quantize_model(model, QuantConfig(method="awq", format="int4", group_size=32, awq_objective="layer"),
                   calibration=calib, progress=False)
    o = model.model.layers[0].self_attn.o_proj
    rep = {r.name: r for r in model.lowbit_report.layers}["model.layers.0.self_attn.o_proj"]
    if rep.info["alpha"] == 0:
        pytest.skip("the search kept alpha = 0 for o_proj (no scale to store)")
    qw = o.qweight
    assert rep.info["scale"] == "input_scale" and qw.input_scale is not None
    x = torch.randn(3, 64)
    w = reference.dequantize(qw)
    torch.testing.assert_close(w, reference.decode(qw) / qw.input_scale)
    b = 0.0 if o.bias is None else o.bias  # bias_correction's mean shift, when on
    torch.testing.assert_close(o(x), x @ w.T + b, rtol=1e-5, atol=1e-5)


class OnePlusNorm(nn.Module):
    """Gemma-style RMSNorm, y = norm(x) * (1 + weight): dividing weight by s does not divide
    y by s, so AWQ must not fold into it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Block(nn.Module):
    def __init__(self, d, norm):
        super().__init__()
        self.norm = norm
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """An architecture AWQ has no names for: LayerNorm (with bias) -> fc1 -> GELU -> fc2."""

    def __init__(self, d=64):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, nn.LayerNorm(d)), Block(d, OnePlusNorm(d))])
        with torch.no_grad():
            self.blocks[0].norm.weight.copy_(torch.exp(torch.randn(d)))
            self.blocks[0].norm.weight[[1, 9]] *= 30
            self.blocks[1].norm.weight.copy_(torch.randn(d))
            self.blocks[1].norm.weight[[2, 5]] += 30

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_awq_unknown_architecture():
    torch.manual_seed(0)
    model = Net()
    calib = [{"x": torch.randn(4, 16, 64)} for _ in range(4)]
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        ref = model(x)
    rtn = copy.deepcopy(model)
    quantize_model(rtn, QuantConfig(format="int4", group_size=32), progress=False)
    quantize_model(model, QuantConfig(method="awq", format="int4", group_size=32), calibration=calib,
                   progress=False)
    rep = {r.name: r.info for r in model.lowbit_report.layers}
    assert rep["blocks.0.fc1"].get("into") == "norm"  # LayerNorm: weight and bias divided
    assert rep["blocks.1.fc1"].get("scale") in (None, "input_scale")  # (1 + w): never folded
    assert rep["blocks.0.fc2"].get("scale") in (None, "input_scale")  # after GELU: no producer
    assert all(isinstance(b.fc1, QuantLinear) for b in model.blocks)
    with torch.no_grad():
        assert float((model(x) - ref).pow(2).mean()) < float((rtn(x) - ref).pow(2).mean())


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(1)
    W = torch.randn(32, 96)
    W[:, 5] *= 8  # a few large weights make the range worth shrinking
    X = torch.randn(512, 96)
    H = X.T @ X / 512
    fmt = {"format": "int4", "group_size": 32, "symmetric": True, "double_quant": False}
    Wc, shrink = A.clip_search(W, H, fmt, n_grid=20, max_shrink=0.5)
    assert 0.5 < shrink <= 1.0 and (Wc.abs() <= W.abs() + 1e-7).all()

    def err(Wx):
        D = W - A.fake_quant(Wx, fmt)
        return float((D @ H * D).sum())
    assert err(Wc) <= err(W) + 1e-6
    # asymmetric: the two ends of the range are searched apart too, never worse than joint
    fa = {"format": "int4", "group_size": 32, "symmetric": False, "double_quant": False}
    Wp = W.clone()
    Wp[:, 40] = Wp[:, 40].abs() * 6  # one end of some groups far out: skewed ranges
    Wa, _ = A.clip_search(Wp, H, fa, n_grid=20, max_shrink=0.5)
    assert not torch.equal(Wa, Wp)

    blocks = torch.block_diag(*[torch.ones(32, 32)] * 3)
    Hb = H * blocks  # the search's objective: each group's block of H (exact guarantees)

    def err_a(Wx):
        D = Wp - A.fake_quant(Wx, fa)
        return float((D @ Hb * D).sum())
    def group_errs(Wx):  # [rows, groups] share of the objective
        D = (Wp - A.fake_quant(Wx, fa)).reshape(32, 3, 32)
        return torch.stack([torch.einsum("ni,ij,nj->n", D[:, j], Hb[32 * j:32 * (j + 1), 32 * j:32 * (j + 1)],
                                         D[:, j]) for j in range(3)], 1)
    Wg = Wp.reshape(32, 3, 32)
    lo, hi = Wg.amin(2, keepdim=True).clamp(max=0), Wg.amax(2, keepdim=True).clamp(min=0)
    joint = torch.stack([group_errs(torch.maximum(torch.minimum(Wg, hi * r), lo * r).reshape(32, 96))
                         for r in [1 - 0.5 * i / 20 for i in range(20)]]).amin(0)  # per group
    got = group_errs(Wa)
    assert (got <= joint + 1e-6).all() and (got < joint - 1e-6).any()
    assert err_a(Wa) <= err_a(Wp)
    # separate_ends=False (AWQ's default): one ratio per group for both ends, the joint grid's
    # best group by group
    Wj, _ = A.clip_search(Wp, H, fa, n_grid=20, max_shrink=0.5, separate_ends=False)
    Wjg = Wj.reshape(32, 3, 32)
    r_hi = Wjg.amax(2) / hi[..., 0].clamp(min=1e-12)
    r_lo = Wjg.amin(2) / lo[..., 0].clamp(max=-1e-12)
    both = (hi[..., 0] > 1e-6) & (lo[..., 0] < -1e-6)
    torch.testing.assert_close(r_hi[both], r_lo[both], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(group_errs(Wj), joint, rtol=1e-5, atol=1e-6)


class _EmbedLinear(nn.Module):
    """input_ids -> embedding -> one Linear (no block list: AWQ's per-layer path)."""

    def __init__(self, V=64, K=64, N=48, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V, K)
        self.proj = nn.Linear(K, N, bias=False)
        with torch.no_grad():
            # a nonzero mean per channel, as post-norm activations of trained LLMs have
            self.emb.weight.copy_(torch.randn(V, K, generator=g) + 2.0 * torch.rand(K, generator=g))
            self.proj.weight.copy_(torch.randn(N, K, generator=g) * 0.1)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


@torch.no_grad()
def test_bias_correction_removes_the_mean_output_error(exact_cpu_path):
    calib = token_batches(vocab=64, n=4, batch=4, seq=32)
    ids = torch.cat([c[:, 1:] for c in calib]).reshape(-1)  # the counted positions
    errs = {}
    for bc in (False, True):
        model = _EmbedLinear()
        w = model.proj.weight.clone()
        quantize_model(model, QuantConfig(method="awq", format="int4", group_size=32,
                                          bias_correction=bc), calibration=calib, progress=False)
        x = model.emb(ids)
        err = (x @ w.T - model.proj(x)).mean(0)  # mean output error per channel
        errs[bc] = float(err.abs().max())
        assert (model.proj.bias is not None) == bc
    assert errs[True] < 1e-4 and errs[False] > 100 * errs[True]


def test_bias_corrected_model_reloads_into_a_bias_free_float_model(tmp_path):
    model = tiny_llama(layers=2)
    calib = token_batches(n=2, batch=2, seq=32)
    quantize_model(model, QuantConfig(method="awq", format="int4", group_size=32,
                                      bias_correction=True), calibration=calib, progress=False)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    ids = token_batches(n=1, batch=2, seq=16, seed=5)[0]
    with torch.no_grad():
        want = model(ids).logits
    lowbit.save(model, tmp_path / "m.lowbit")
    again = lowbit.load(tmp_path / "m.lowbit", lambda: tiny_llama(layers=2, seed=3))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


@pytest.mark.parametrize("fmt", [{"format": "int4", "group_size": 32},
                                 {"format": "int4", "group_size": 32, "symmetric": True},
                                 {"format": "nf4", "group_size": 32}])
def test_coupled_clip_lowers_the_whole_layer_objective(fmt):
    # correlated inputs: the block-diagonal search ignores how one group's error offsets
    # another's; the coupled passes see the whole tr(D H D^T) and never raise it
    torch.manual_seed(4)
    N, K = 32, 100  # a ragged last group
    W = torch.randn(N, K)
    X = torch.randn(600, K) @ (torch.eye(K) + 0.3 * torch.randn(K, K))
    H = X.T @ X / 600

    def full(Wx):
        D = W - A.fake_quant(Wx, fmt)
        return float((D @ H * D).sum())
    Wi, _ = A.clip_search(W, H, fmt, n_grid=10, max_shrink=0.4)
    Wc, _ = A.clip_search(W, H, fmt, n_grid=10, max_shrink=0.4, coupled_sweeps=2)
    assert full(Wc) < 0.97 * full(Wi)
    assert (Wc.abs() <= W.abs() + 1e-7).all()  # only clip ratios moved: values never grow
    W1, _ = A.clip_search(W, H, fmt, n_grid=10, max_shrink=0.4, coupled_sweeps=1)
    assert full(Wc) <= full(W1) + 1e-6 and full(W1) <= full(Wi) + 1e-6
