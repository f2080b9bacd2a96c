"""GPTQ: one layer against a slow column-by-column statement of the algorithm, its error
against round-to-nearest, act-order, exact codes, and whole (tiny) models."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear, reference
from lowbit.quantize import QuantConfig, quantize_model
from lowbit.quantize.gptq import Hessian, gptq_quantize

transformers = pytest.importorskip("transformers")
from quant_helpers import tiny_llama, token_batches  # noqa: E402


def correlated_inputs(n, K, seed=0, dead=()):
    """Activations with strongly correlated channels of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, K // 4, generator=g)
    A = torch.randn(K // 4, K, generator=g)
    X = Z @ A + 0.1 * torch.randn(n, K, generator=g)
    X = X * torch.exp(torch.randn(K, generator=g))
    for c in dead:
        X[:, c] = 0
    return X


def hessian(X):
    h = Hessian(X.shape[1], X.device)
    for part in X.split(97):  # several batches: the running mean must equal one big product
        h.add(part)
    return h.H


def out_err(W, Wq, H):
    D = (W - Wq).double()
    return float((D @ H.double() * D).sum())


def test_hessian_running_mean_and_first_token_weight():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 8)  # [batch, seq, K]
    h = Hessian(8, "cpu")
    h.add(x[:1])
    h.add(x[1:])
    rows = x.reshape(-1, 8)
    torch.testing.assert_close(h.H, 2 * rows.T @ rows / 30)
    # first_weight=w counts each sequence's first token w times
    hw = Hessian(8, "cpu", first_weight=5.0)
    hw.add(x[:2])
    hw.add(x[2:])
    dup = torch.cat([rows] + [x[:, 0]] * 4)
    torch.testing.assert_close(hw.H, 2 * dup.T @ dup / dup.shape[0])
    # 2-D inputs have no sequence axis: plain mean
    h2 = Hessian(8, "cpu", first_weight=5.0)
    h2.add(rows)
    torch.testing.assert_close(h2.H, 2 * rows.T @ rows / 30)
    # the unweighted mean diagonal (what damp_ref='tokens' dampens against)
    plain = float(torch.diagonal(2 * rows.T @ rows / 30).mean())
    assert hw.plain_mean_diag == pytest.approx(plain, rel=1e-6)
    assert h.plain_mean_diag == pytest.approx(float(torch.diagonal(h.H).mean()), rel=1e-5)


def test_damp_ref_is_the_dampening_base():
    torch.manual_seed(7)
    N, K = 16, 64
    W = torch.randn(N, K)
    H = hessian(correlated_inputs(512, K, seed=8))
    fmt = {"format": "int4", "group_size": 32, "symmetric": False, "double_quant": False}
    m = float(torch.diagonal(H.double()).mean())  # as gptq_quantize computes it
    a, ia = gptq_quantize(W, H, fmt, damp_percent=0.01, damp_ref=3 * m)
    b, ib = gptq_quantize(W, H, fmt, damp_percent=0.03)
    assert ia["damp"] == 0.01 and ib["damp"] == 0.03
    ca, cb = reference.unpack_nibbles(a.data, K), reference.unpack_nibbles(b.data, K)
    assert (ca == cb).float().mean() > 0.99 and torch.equal(a.perm, b.perm)
    c, _ = gptq_quantize(W, H, fmt, damp_percent=0.01, damp_ref=m)
    d, _ = gptq_quantize(W, H, fmt, damp_percent=0.01)
    assert torch.equal(c.data, d.data) and torch.equal(c.scales, d.scales)


# ---- the slow statement -------------------------------------------------------------------
def int4_asym_params(wg):
    """lowbit's int4 asymmetric group rule (formats.INT4's docstring), float32."""
    wg = wg.float()
    lo = wg.amin(dim=1).clamp(max=0)
    hi = wg.amax(dim=1).clamp(min=0)
    s = (hi - lo) / 15
    s_div = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.clamp(torch.round(-lo / s_div), 0, 15)
    return s, s_div, z


def slow_gptq(W, H, group, damp=0.01, act_order=False, group_map=False):
    """Optimal Brain Quantization one column at a time in float64: quantize column j, spread its
    error over the columns not yet quantized with the inverse Hessian of those columns, then
    remove j from that inverse (Gaussian elimination). Group parameters come from the group's
    weights as they stand when its first column is reached. ``group_map``: groups are
    consecutive input features whatever the processing order."""
    W = W.double().clone()
    H = H.double().clone()
    K = W.shape[1]
    d = torch.diagonal(H)
    dead = d == 0
    H[dead, dead] = 1
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(K)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diagonal(H).mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    params = {}
    for j in range(K):
        if group_map:
            g = int(order[j]) // group
            if g not in params:  # its members' positions in processing order
                members = [p for p in range(K) if int(order[p]) // group == g]
                params[g] = int4_asym_params(W[:, members])
            s, s_div, z = params[g]
        elif j % group == 0:
            s, s_div, z = int4_asym_params(W[:, j:j + group])
        q = torch.clamp(torch.round(W[:, j].float() / s_div) + z, 0, 15)
        Q[:, j] = ((q - z) * s).double()
        codes[:, j] = q.to(torch.uint8)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    out = torch.empty_like(Q)
    out[:, order] = Q  # back to input-feature order
    out_codes = torch.empty_like(codes)
    out_codes[:, order] = codes
    return out.float(), out_codes


@pytest.mark.parametrize("K,group,block,act_order,act_groups", [
    (128, 32, 64, False, "input"), (96, 32, 32, True, "order"), (112, 64, 48, False, "input"),
    (96, 32, 40, True, "input"), (112, 32, 128, True, "input")])
def test_gptq_matches_slow_column_by_column_statement(K, group, block, act_order, act_groups):
    torch.manual_seed(1)
    N = 24
    W = torch.randn(N, K)
    H = hessian(correlated_inputs(1024, K))
    qw, info = gptq_quantize(W, H, {"format": "int4", "group_size": group, "symmetric": False,
                                    "double_quant": False},
                             damp_percent=0.01, act_order=act_order, block_size=block,
                             act_groups=act_groups)
    group_map = act_order and act_groups == "input"
    assert (qw.perm is not None) == (act_order and not group_map)
    got = reference.dequantize(qw)
    got_codes = reference.unpack_nibbles(qw.data, K)
    if qw.perm is not None:
        got_codes = torch.empty_like(got_codes).index_copy_(1, qw.perm, got_codes)
    want, want_codes = slow_gptq(W, H, group, act_order=act_order, group_map=group_map)
    # Same algorithm, different arithmetic (float32 Cholesky with lazy block updates vs
    # float64 elimination): scales differ in their last bits, and a weight that lands within
    # rounding noise of a code boundary may round the other way (its error then propagates);
    # nearly every code must agree, and the layer's output error must agree within a percent.
    agree = (got_codes == want_codes).float().mean().item()
    assert agree > 0.98, agree
    torch.testing.assert_close(got, want, rtol=0, atol=0.5 * float(qw.scales.max()) + 1e-6)
    e_got, e_want = out_err(W, got, H), out_err(W, want, H)
    assert abs(e_got - e_want) / e_want < 0.01, (e_got, e_want)


# ---- better than round-to-nearest ---------------------------------------------------------
@pytest.mark.parametrize("fmt", [
    {"format": "int4", "group_size": 32},
    {"format": "int4", "group_size": 64, "symmetric": True},
    {"format": "int4", "group_size": -1},
    {"format": "int8"},
    {"format": "nf4", "group_size": 64},
    {"format": "nf4", "group_size": 32, "double_quant": True},
])
@pytest.mark.parametrize("act_order,act_groups", [(False, "input"), (True, "input"), (True, "order")])
def test_gptq_output_error_below_rtn(fmt, act_order, act_groups):
    from lowbit.quantize.config import resolve_format
    fmt = resolve_format(fmt)
    torch.manual_seed(2)
    N, K = 48, 160  # K not a multiple of 64: a ragged last group
    W = torch.randn(N, K)
    H = hessian(correlated_inputs(2048, K, seed=3))
    kw = {k: v for k, v in fmt.items() if k != "format"}
    rtn = reference.dequantize(lowbit.quantize_weight(W, fmt["format"], **kw))
    qw, info = gptq_quantize(W, H, fmt, act_order=act_order, act_groups=act_groups)
    got = reference.dequantize(qw)
    e_rtn, e_gptq = out_err(W, rtn, H), out_err(W, got, H)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    # the reported relative error is the same quantity
    rel = e_gptq / float((W.double() @ H.double() * W.double()).sum())
    assert info["out_err"] == pytest.approx(rel, rel=1e-3)
    assert qw.fmt == fmt["format"] and qw.group_size == fmt["group_size"]
    assert qw.double_quant == fmt["double_quant"]


def test_act_order_perm_and_linear_exact(exact_cpu_path):
    torch.manual_seed(3)
    N, K = 40, 96
    W = torch.randn(N, K)
    H = hessian(correlated_inputs(1024, K, seed=4))
    fmt = {"format": "int4", "group_size": 32, "symmetric": False, "double_quant": False}
    qw, _ = gptq_quantize(W, H, fmt, act_order=True, act_groups="order")
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert torch.equal(qw.perm, perm)
    # Stored column j is input feature perm[j]: GPTQ on the pre-permuted problem without
    # act-order makes exactly the same codes.
    plain, _ = gptq_quantize(W[:, perm], H[perm][:, perm], fmt, act_order=False)
    assert plain.perm is None
    for k in ("data", "scales", "zeros"):
        assert torch.equal(getattr(qw, k), getattr(plain, k)), k
    w_in = reference.dequantize(qw)
    assert torch.equal(w_in[:, perm], reference.decode(plain))
    x = torch.randn(5, K)
    torch.testing.assert_close(lowbit.linear(x, qw), x @ w_in.T, rtol=1e-5, atol=1e-5)
    layer = QuantLinear.from_quantized(qw)
    torch.testing.assert_close(layer(x), x @ w_in.T, rtol=1e-5, atol=1e-5)


def test_dead_inputs_and_degenerate_hessian():
    torch.manual_seed(4)
    N, K = 16, 64
    W = torch.randn(N, K)
    H = hessian(correlated_inputs(512, K, dead=(0, 5, 63)))
    assert float(H[5, 5]) == 0
    qw, info = gptq_quantize(W, H, {"format": "int4", "group_size": 32, "symmetric": True,
                                    "double_quant": False})
    got = reference.dequantize(qw)
    assert torch.isfinite(got).all() and (got[:, [0, 5, 63]] != 0).any()
    rtn = reference.dequantize(lowbit.quantize_weight(W, "int4", group_size=32, symmetric=True))
    assert out_err(W, got, H) < out_err(W, rtn, H)
    # all-zero Hessian (a layer whose inputs were always zero): plain rounding, no NaN
    qw0, _ = gptq_quantize(W, torch.zeros(K, K), {"format": "int8", "group_size": -1,
                                                  "symmetric": True, "double_quant": False})
    assert torch.equal(reference.dequantize(qw0), reference.dequantize(lowbit.quantize_weight(W, "int8")))
    with pytest.raises(ValueError, match=r"Hessian must be \[64, 64\]"):
        gptq_quantize(W, torch.zeros(3, 3), {"format": "int8", "group_size": -1,
                                             "symmetric": True, "double_quant": False})


def test_group_clip_search_moves_each_end_of_an_asymmetric_range():
    """GPTQ's per-group clip search: never worse than the full range, and for asymmetric int4
    at least as good as the best single ratio for both ends (each end is also searched on
    its own), measured by its own objective sum |w - q|^2.4."""
    from lowbit.quantize.config import resolve_format
    from lowbit.quantize.gptq import _Groups
    torch.manual_seed(3)
    wg = torch.randn(64, 32)
    wg[:, 3] = wg[:, 3].abs() * 6  # one far-out upper end: skewed groups
    fmt = resolve_format({"format": "int4", "group_size": 32})
    grp = _Groups(fmt, 64, 32, "cpu")
    grp.clip_grid, grp.clip_max_shrink = 20, 0.5

    def err(s, z):
        return (wg - grp.round(wg, s[:, None], z)[1]).abs().pow(2.4).sum(1)

    def params(w):
        qw = reference.quantize_weight(w, "int4", group_size=-1, symmetric=False)
        return qw.scales[:, 0], qw.zeros[:, 0]
    s0, z0 = params(wg)
    s, z = grp._clip(wg, s0.clone(), z0.clone())
    lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    joint = torch.stack([err(*params(torch.maximum(torch.minimum(wg, hi * r), lo * r)))
                         for r in [1 - 0.5 * i / 20 for i in range(20)]]).amin(0)
    got = err(s, z)
    assert (got <= err(s0, z0) + 1e-6).all() and (got <= joint + 1e-6).all()
    assert (got < joint - 1e-6).any()  # the separate ends win somewhere
    grp.clip_separate_ends = False  # the joint ratio only: its best, row by row
    torch.testing.assert_close(err(*grp._clip(wg, s0.clone(), z0.clone())),
                               joint, rtol=1e-5, atol=1e-5)


# ---- whole models -------------------------------------------------------------------------
def logits_err(model, ref, ids):
    with torch.no_grad():
        return float((model(ids).logits - ref).pow(2).mean())


def tiny_model_and_rtn():
    """(model, calibration, scored ids, float logits, the int4 g32 RTN copy)."""
    model = tiny_llama(layers=2, hidden=128, inter=256)
    calib = token_batches(n=4, batch=4, seq=64)
    ids = token_batches(n=1, batch=2, seq=64, seed=9)[0]
    with torch.no_grad():
        ref = model(ids).logits
    rtn = copy.deepcopy(model)
    quantize_model(rtn, QuantConfig(format="int4", group_size=32), progress=False)
    return model, calib, ids, ref, rtn


def test_gptq_tiny_llama_beats_rtn_and_generates():
    model, calib, ids, ref, rtn = tiny_model_and_rtn()
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(method="gptq", format="int4", group_size=32), calibration=calib,
                   progress=False)
    lin = q.model.layers[1].mlp.down_proj
    # act-order by default, groups consecutive in that order: stored with perm
    assert isinstance(lin, QuantLinear) and lin.qweight.perm is not None
    assert type(q.lm_head) is nn.Linear
    rep = {r.name: r for r in q.lowbit_report.layers}
    assert rep["model.layers.0.self_attn.q_proj"].method == "gptq"
    assert 0 < rep["model.layers.0.self_attn.q_proj"].info["out_err"] < 0.1
    assert logits_err(q, ref, ids) < 0.75 * logits_err(rtn, ref, ids)
    out = q.generate(ids[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long),
                     max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_gptq_with_awq_scales_folds_and_keeps_the_float_model():
    """awq_scales: AWQ's scales folded into the norms / up_proj before GPTQ; folding alone
    leaves the float model's outputs unchanged, and the quantized model still beats RTN."""
    from lowbit.quantize.awq import scale_block, search_config
    from lowbit.quantize import blocks as B
    model, calib, ids, ref, rtn = tiny_model_and_rtn()
    # the fold on its own, on block 0 of a copy
    f = copy.deepcopy(model)
    cfg = QuantConfig(method="gptq", format="int4", group_size=32, awq_scales=True)
    block = f.model.layers[0]
    targets = cfg.targets(f)
    mine = {n[len("model.layers.0."):]: t for n, t in targets.items() if n.startswith("model.layers.0.")}
    before = {k: v.clone() for k, v in block.state_dict().items()}
    inputs = B.capture_block_inputs(f, f.model.layers, [{"input_ids": c} for c in calib]).first
    info = scale_block(block, inputs, mine, search_config(cfg))
    assert set(info) == set(mine)
    assert info["self_attn.o_proj"]["awq_scale"] == "none"  # GQA: v_proj's rows are too few
    folded = {v["awq_scale"][len("folded into "):] for v in info.values()
              if v["awq_scale"].startswith("folded into ")}
    assert folded  # some group found a scale and folded it
    for producer in folded:  # ... into its producer's weight
        assert not torch.equal(block.state_dict()[producer + ".weight"], before[producer + ".weight"])
    with torch.no_grad():
        torch.testing.assert_close(f(ids).logits, ref, rtol=1e-4, atol=1e-4)
    q = copy.deepcopy(model)
    quantize_model(q, cfg, calibration=calib, progress=False)
    rep = {r.name: r for r in q.lowbit_report.layers}
    assert "awq_alpha" in rep["model.layers.1.mlp.down_proj"].info
    assert logits_err(q, ref, ids) < 0.75 * logits_err(rtn, ref, ids)


def test_gptq_options_and_lm_head_rule():
    model = tiny_llama(layers=1)
    calib = token_batches(n=2)
    cfg = QuantConfig(method="gptq", format="int8", act_order=False, true_sequential=False,
                      static_groups=True, rules=[("lm_head", {"format": "int4", "group_size": 32}),
                                                 ("mlp.*", {"format": "nf4", "double_quant": True})])
    quantize_model(model, cfg, calibration=calib, progress=False)
    L = model.model.layers[0]
    assert L.self_attn.q_proj.fmt == "int8" and L.self_attn.q_proj.qweight.perm is None
    assert L.mlp.up_proj.fmt == "nf4" and L.mlp.up_proj.qweight.double_quant
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == "int4"
    assert {r.method for r in model.lowbit_report.quantized} == {"gptq"}


class _NoBlocks(nn.Module):
    """No ModuleList: GPTQ falls back to hooks over the whole model."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_gptq_without_block_list():
    torch.manual_seed(5)
    model = _NoBlocks()
    X = correlated_inputs(512, 64, seed=6)
    calib = [{"x": X[i:i + 128]} for i in range(0, 512, 128)]
    with torch.no_grad():
        ref = model(X)
    rtn = copy.deepcopy(model)
    quantize_model(rtn, QuantConfig(format="int4", group_size=32), progress=False)
    quantize_model(model, QuantConfig(method="gptq", format="int4", group_size=32), calibration=calib,
                   progress=False)
    assert isinstance(model.a, QuantLinear) and isinstance(model.b, QuantLinear)
    with torch.no_grad():
        assert float((model(X) - ref).pow(2).mean()) < 0.7 * float((rtn(X) - ref).pow(2).mean())
