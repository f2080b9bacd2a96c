"""Automatic mixed precision: candidates, sensitivity measures, the budget solver, the plan."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import reference as R
from lowbit.quantize import mixed as M
from lowbit.quantize.config import resolve_format

from quant_helpers import tiny_llama, token_batches

TRAP = resolve_format({"format": "int4", "group_size": 32, "symmetric": False})


def _targets(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def _calib():
    return [{"input_ids": t} for t in token_batches(n=4, batch=2, seq=32)]


# ---- the solver ---------------------------------------------------------------------------
def _brute(costs, values, budget):
    best = None
    for sel in itertools.product(*[range(len(r)) for r in costs]):
        c = sum(costs[i][j] for i, j in enumerate(sel))
        if c <= budget:
            v = sum(values[i][j] for i, j in enumerate(sel))
            if best is None or v < best:
                best = v
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, C = rng.integers(2, 6), rng.integers(2, 5)
    costs = rng.integers(1, 60, size=(L, C)).tolist()
    values = rng.random((L, C)).round(3).tolist()
    lo = sum(min(r) for r in costs)
    hi = sum(max(r) for r in costs)
    for budget in sorted({lo, (lo + hi) // 2, lo + (hi - lo) // 5, hi}):
        sel = M.solve_budget(costs, values, budget)
        assert sum(costs[i][j] for i, j in enumerate(sel)) <= budget
        got = sum(values[i][j] for i, j in enumerate(sel))
        assert got == pytest.approx(_brute(costs, values, budget), abs=1e-12)
        # A coarse DP grid (costs rounded up) still fits the budget and never beats the optimum.
        sel = M.solve_budget(costs, values, budget, resolution=3)
        assert sum(costs[i][j] for i, j in enumerate(sel)) <= budget
        assert sum(values[i][j] for i, j in enumerate(sel)) >= _brute(costs, values, budget) - 1e-12


def test_solver_edge_cases_and_errors():
    costs = [[4, 8], [4, 8]]
    values = [[1.0, 0.0], [2.0, 0.0]]
    assert M.solve_budget(costs, values, 8) == [0, 0]
    assert M.solve_budget(costs, values, 12) == [0, 1]  # upgrade the item that gains most
    assert M.solve_budget(costs, values, 100) == [1, 1]
    with pytest.raises(ValueError, match="below the cheapest"):
        M.solve_budget(costs, values, 7)
    with pytest.raises(ValueError, match="finite"):
        M.solve_budget(costs, [[1.0, float("nan")], [0.0, 0.0]], 16)
    with pytest.raises(ValueError, match="equal"):
        M.solve_budget(costs, [[1.0, 0.0]], 16)
    with pytest.raises(ValueError, match="non-negative"):
        M.solve_budget([[-1, 2], [1, 2]], values, 16)


# ---- candidates ---------------------------------------------------------------------------
def test_default_ladder_leaves_out_the_q4_1_trap_and_puts_the_config_first():
    lad = M.candidate_ladder(lowbit.QuantConfig(format="nf4", max_bits_per_weight=4.5))
    assert lad[0] == resolve_format({"format": "nf4"})
    assert TRAP not in lad
    assert resolve_format({"format": "int8"}) in lad
    assert len(lad) == len({json.dumps(c, sort_keys=True) for c in lad})  # no duplicates
    # Asked for explicitly (the config's own format), it is used, first.
    lad = M.candidate_ladder(lowbit.QuantConfig(format="int4", group_size=32, max_bits_per_weight=5))
    assert lad[0] == TRAP and lad.count(TRAP) == 1
    assert M.candidate_ladder(None, ["int8", {"format": "nf4", "group_size": 32}]) == [
        resolve_format({"format": "int8"}), resolve_format({"format": "nf4", "group_size": 32})]
    with pytest.raises(ValueError, match="candidate 0"):
        M.candidate_ladder(None, [{"format": "int5"}])
    with pytest.raises(TypeError):
        M.candidate_ladder(None, "int8")
    with pytest.raises(ValueError, match="empty"):
        M.candidate_ladder(None, [])


# ---- sensitivity ---------------------------------------------------------------------------
def _captured_inputs(model, lin, calib):
    xs = []
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for kw in calib:
            model(**kw)
    h.remove()
    return torch.cat(xs)


def _quant_error(w, cand):
    f = cand["format"]
    kw = {k: v for k, v in cand.items() if k != "format"}
    qw = R.quantize_weight(w, f, **kw)
    return R.dequantize(qw) - w, 8 * qw.nbytes


def _direct_fisher(model, lin, calib, sampled):
    """F_n: squared gradient of each sequence's summed NLL w.r.t. the layer output, per
    predicted token, via a zero probe added to the output; labels from the data or drawn from
    the model as the "fisher" method draws them."""
    gen = torch.Generator().manual_seed(M.FISHER_SEED)
    F = torch.zeros(lin.out_features, dtype=torch.float64)
    count = 0
    for kw in calib:
        for b in range(kw["input_ids"].shape[0]):
            ids = kw["input_ids"][b:b + 1]
            probe = {}

            def hook(m, a, out):
                probe["z"] = torch.zeros_like(out, requires_grad=True)
                return out + probe["z"]
            h = lin.register_forward_hook(hook)
            logits = model(input_ids=ids).logits[0, :-1].float()
            h.remove()
            labels = ids[0, 1:]
            if sampled:
                labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
            nll = nn.functional.cross_entropy(logits, labels, reduction="sum")
            (g,) = torch.autograd.grad(nll, probe["z"])
            F += g.reshape(-1, g.shape[-1]).double().pow(2).sum(0)
            count += ids.shape[1] - 1
    return F / count


def test_proxy_values_match_direct_computation():
    model = tiny_llama()
    calib = _calib()
    targets = _targets(model)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    sub = {n: targets[n] for n in names}
    cands = M.candidate_ladder(None, ["int8", {"format": "int4", "group_size": 32, "symmetric": True}])
    tabs = {m: M.measure_sensitivity(model, sub, calib, cands, m)
            for m in ("hessian", "fisher", "empirical-fisher")}
    assert {t.calibration_tokens for t in tabs.values()} == {4 * 2 * 32}
    for i, n in enumerate(names):
        lin = targets[n]
        X = _captured_inputs(model, lin, calib).double()
        F = {"fisher": _direct_fisher(model, lin, calib, True),
             "empirical-fisher": _direct_fisher(model, lin, calib, False)}
        w = lin.weight.detach().float()
        for j, c in enumerate(cands):
            dw, nbits = _quant_error(w, c)
            err = X @ dw.double().T  # per-token output error
            assert {t.bits[i][j] for t in tabs.values()} == {nbits}
            assert tabs["hessian"].values[i][j] == pytest.approx(float(err.pow(2).sum(1).mean()), rel=1e-4)
            for m in F:
                assert tabs[m].values[i][j] == pytest.approx(
                    0.5 * float((F[m] * err.pow(2).mean(0)).sum()), rel=1e-4), m
    # int8 is far less sensitive than int4 sym g32 for both layers, by every measure.
    for t in tabs.values():
        assert all(row[0] < row[1] for row in t.values)


def test_loss_sensitivity_is_the_measured_loss_change_and_restores_the_model():
    model = tiny_llama()
    calib = _calib()
    targets = _targets(model)
    name = "model.layers.1.self_attn.o_proj"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cands = M.candidate_ladder(None, [{"format": "int4", "group_size": 64, "symmetric": True}])
    t = M.measure_sensitivity(model, {name: targets[name]}, calib, cands, "loss")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def mean_nll(m):
        tot = cnt = 0
        with torch.no_grad():
            for kw in calib:
                ids = kw["input_ids"]
                logits = m(input_ids=ids).logits[:, :-1]
                tot += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum"))
                cnt += ids[:, 1:].numel()
        return tot / cnt

    base = mean_nll(model)
    other = tiny_llama()
    lin = dict(other.named_modules())[name]
    with torch.no_grad():
        lin.weight.copy_(R.dequantize(R.quantize_weight(lin.weight, "int4", group_size=64, symmetric=True)))
    assert t.base_loss == pytest.approx(base, rel=1e-5)
    assert t.values[0][0] == pytest.approx(mean_nll(other) - base, rel=1e-3, abs=1e-6)


def test_attention_mask_and_labels_select_the_predicted_tokens():
    model = tiny_llama()
    ids = token_batches(n=1, batch=1, seq=20)[0]
    with torch.no_grad():
        full, n_full = M.lm_nll(model, {"input_ids": ids[:, :12]})
        mask = torch.ones_like(ids)
        mask[:, 12:] = 0  # right padding: earlier positions are unaffected by it
        masked, n_masked = M.lm_nll(model, {"input_ids": ids, "attention_mask": mask})
        labels = ids.clone()
        labels[:, 5:] = -100
        part, n_part = M.lm_nll(model, {"input_ids": ids, "labels": labels})
        short, _ = M.lm_nll(model, {"input_ids": ids[:, :5]})
    assert n_full == n_masked == 11
    assert float(masked) == pytest.approx(float(full), rel=1e-5)
    assert n_part == 4
    assert float(part) == pytest.approx(float(short), rel=1e-5)


def test_several_statistics_passes_give_the_same_values(monkeypatch):
    model = tiny_llama()
    calib = _calib()
    targets = _targets(model)
    cands = M.candidate_ladder(None, ["int8", "nf4"])
    one = M.measure_sensitivity(model, targets, calib, cands, "hessian")
    monkeypatch.setattr(M, "MAX_STATS_BYTES", 4 * 64 * 64 * 3)  # 3 layers' matrices per pass
    assert len(M._stat_chunks(list(targets), targets)) > 3
    many = M.measure_sensitivity(model, targets, calib, cands, "hessian")
    np.testing.assert_allclose(many.values, one.values, rtol=1e-5)
    assert many.bits == one.bits


def test_max_tokens_limits_the_calibration_used():
    model = tiny_llama()
    targets = {"model.layers.0.mlp.up_proj": _targets(model)["model.layers.0.mlp.up_proj"]}
    t = M.measure_sensitivity(model, targets, _calib(), M.candidate_ladder(None, ["int8"]), "hessian",
                              max_tokens=100)
    assert t.calibration_tokens == 96  # whole sequences of 32, at most 100 tokens


# ---- the plan -----------------------------------------------------------------------------
def test_plan_fits_the_budget_with_exact_bits_and_reports():
    model = tiny_llama()
    targets = _targets(model)
    calib = _calib()
    cfg = lowbit.QuantConfig(format="int4", group_size=64, max_bits_per_weight=5.0)
    plan = M.plan_mixed_precision(model, targets, calib, cfg)
    assert set(plan.choices) == set(targets)
    total_bits = 0
    for name, choice in plan.choices.items():
        assert choice == resolve_format(choice)  # options exactly as quantize_weight takes them
        qw = lowbit.quantize_weight(targets[name].weight, choice["format"],
                                    **{k: v for k, v in choice.items() if k != "format"})
        total_bits += 8 * qw.nbytes
    n_w = sum(m.weight.numel() for m in targets.values())
    assert plan.bits_per_weight == total_bits / n_w <= 5.0
    assert plan.bits_per_weight > 4.9  # the budget is used, not left idle
    # Several formats are chosen (the sensitivities differ between layers), and the plan's
    # summed sensitivity beats the uniform settings that fit the same budget.
    assert len(plan.summary()) > 1
    for j in range(len(plan.candidates)):
        bits, total = plan.uniform(j)
        if bits <= 5.0:
            assert plan.predicted_increase <= total + 1e-15
    table = plan.table()
    assert "model.layers.1.mlp.down_proj" in table and "budget 5" in table
    d = json.loads(json.dumps(plan.to_dict()))
    again = M.MixedPrecisionPlan.from_dict(d)
    assert again.choices == plan.choices and again.bits_per_weight == plan.bits_per_weight
    # Deterministic, also when called under torch.inference_mode() (the Fisher pass needs a
    # backward).
    with torch.inference_mode():
        assert M.plan_mixed_precision(model, targets, calib, cfg).choices == plan.choices


def test_budget_extremes():
    model = tiny_llama()
    targets = _targets(model)
    calib = _calib()
    cands = ["nf4", "int8"]
    nf4 = resolve_format({"format": "nf4"})
    int8 = resolve_format({"format": "int8"})
    cheapest = M.plan_mixed_precision(model, targets, calib,
                                      lowbit.QuantConfig(format="nf4", max_bits_per_weight=4.5),
                                      candidates=cands)
    assert all(c == nf4 for c in cheapest.choices.values())  # nf4 b64 is exactly 4.5 bits
    everything = M.plan_mixed_precision(model, targets, calib,
                                        lowbit.QuantConfig(max_bits_per_weight=16), candidates=cands)
    assert all(c == int8 for c in everything.choices.values())
    with pytest.raises(ValueError, match=r"below the cheapest plan: 4\.5000"):
        M.plan_mixed_precision(model, targets, calib, lowbit.QuantConfig(max_bits_per_weight=4.49),
                               candidates=cands)


def test_quantize_model_with_a_budget_installs_the_plan():
    model = tiny_llama()
    calib = _calib()
    cfg = lowbit.QuantConfig(format="int4", group_size=64, max_bits_per_weight=4.75)
    plan = M.plan_mixed_precision(model, _targets(model), calib, cfg)
    lowbit.quantize_model(model, cfg, calib, progress=False)
    got = {n: m.qweight.config() for n, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert set(got) == set(plan.choices)
    for n, c in plan.choices.items():
        assert got[n]["fmt"] == c["format"] and got[n]["group_size"] == c["group_size"]
    assert model.lowbit_report.bits_per_weight() <= 4.75
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]["input_ids"]).logits).all()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_budget_with_a_calibrated_method(method):
    """The plan's formats, quantized by GPTQ / AWQ instead of RTN: same formats and bits (no
    perm, no input_scale beyond the plan's budget), the method's own numbers (GPTQ's closer to
    the float model than the RTN plan's; this random tiny model has no activation outliers
    for AWQ to exploit)."""
    import copy
    model = tiny_llama()
    calib = _calib()
    ids = token_batches(n=1, batch=2, seq=32, seed=7)[0]
    with torch.no_grad():
        ref = model(ids).logits
    rtn = copy.deepcopy(model)
    lowbit.quantize_model(rtn, lowbit.QuantConfig(format="int4", group_size=64, max_bits_per_weight=4.75),
                          calib, progress=False)
    cfg = lowbit.QuantConfig(format="int4", group_size=64, max_bits_per_weight=4.75, method=method)
    lowbit.quantize_model(model, cfg, calib, progress=False)
    rep = model.lowbit_report
    want = {r.name: r.format for r in rtn.lowbit_report.quantized}
    assert {r.name: r.format for r in rep.quantized} == want  # the same plan
    assert {r.method for r in rep.quantized} == {method}
    assert rep.bits_per_weight() == rtn.lowbit_report.bits_per_weight() <= 4.75
    with torch.no_grad():
        err = float((model(ids).logits - ref).pow(2).mean())
        err_rtn = float((rtn(ids).logits - ref).pow(2).mean())
    assert err > 0
    if method == "gptq":
        assert err < err_rtn, (err, err_rtn)  # act-order through the group map: no perm, the plan's bits exactly
        assert cfg.act_groups == "input"
        assert all(m.qweight.perm is None for m in model.modules() if isinstance(m, lowbit.QuantLinear))
        with pytest.raises(ValueError, match="act_groups='order' stores a perm"):
            lowbit.QuantConfig(method="gptq", max_bits_per_weight=4.5, act_groups="order")


def test_bad_inputs():
    model = tiny_llama()
    targets = _targets(model)
    calib = _calib()
    cfg = lowbit.QuantConfig(max_bits_per_weight=6)
    with pytest.raises(ValueError, match="max_bits_per_weight"):
        M.plan_mixed_precision(model, targets, calib, lowbit.QuantConfig())
    with pytest.raises(ValueError, match="non-empty"):
        M.plan_mixed_precision(model, {}, calib, cfg)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        M.plan_mixed_precision(model, {"x": model.model.norm}, calib, cfg)
    with pytest.raises(ValueError, match="never ran"):
        M.plan_mixed_precision(model, {"stray": nn.Linear(64, 8)}, calib, cfg)
    with pytest.raises(ValueError, match="sensitivity method"):
        M.plan_mixed_precision(model, targets, calib, cfg, sensitivity="magic")
    with pytest.raises(ValueError, match="empty"):
        M.plan_mixed_precision(model, targets, [], cfg)
    with pytest.raises(ValueError, match="max_tokens"):
        M.plan_mixed_precision(model, targets, calib, cfg, max_tokens=0)
    class NoLogits(nn.Module):
        def forward(self, input_ids):
            return input_ids.float()
    with pytest.raises(ValueError, match="logits"):
        M.lm_nll(NoLogits(), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
