"""LLM.int8-style outlier columns: QuantLinear's float columns and quantize_with_outliers."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear
from lowbit import reference as R
from lowbit.quantize.outliers import input_absmax, outlier_columns, quantize_with_outliers
from lowbit.testing import assert_linear_close

from quant_helpers import tiny_llama, token_batches


def _split_reference(w, cols, fmt="int8", **opts):
    """Independent effective weight: the reference quantization of w with the columns zeroed,
    then the original columns put back."""
    rest = w.clone()
    rest[:, cols] = 0
    qw = R.quantize_weight(rest, fmt, **opts)
    eff = R.dequantize(qw)
    eff[:, cols] = w[:, cols].float()
    return qw, eff


class _One(nn.Module):
    """model(x=...) -> lin(x): calibration inputs reach the linear exactly as given."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


class _Cfg:
    def __init__(self, threshold=None, **fmt):
        if threshold is not None:
            self.outlier_threshold = threshold
        self.default_format = {"format": "int8", **fmt}


@pytest.mark.parametrize("K,N,cols", [(64, 24, [3, 40]), (97, 5, [0, 96]), (48, 16, [7]),
                                      (32, 8, list(range(32)))])
def test_forward_is_the_split_computation(K, N, cols, exact_cpu_path):
    lin = nn.Linear(K, N)
    cols_t = torch.tensor(cols)
    q = QuantLinear.from_linear(lin, "int8", outlier_cols=cols_t)
    assert q.n_outliers == len(cols)
    qw_ref, w_eff = _split_reference(lin.weight.detach(), cols)
    # The packed part is exactly the reference int8 of the weight with those columns zeroed:
    # its scales ignore the outlier columns.
    assert torch.equal(q.qweight.data, qw_ref.data)
    assert torch.equal(q.qweight.scales, qw_ref.scales)
    assert torch.equal(q.outlier_cols, cols_t)
    assert torch.equal(q.outlier_weight, lin.weight.detach()[:, cols_t])
    assert torch.equal(q.dequantize(), w_eff)
    x = torch.randn(3, 7, K) * 4
    expected = torch.nn.functional.linear(x, w_eff, lin.bias.detach())
    assert_linear_close(q(x), expected, x, w_eff, bias=lin.bias.detach())


def test_float_path_is_bit_exact():
    """With only the outlier columns of x nonzero, the packed part contributes exactly the bias,
    so the output is the float product with the ORIGINAL weight columns, bit for bit."""
    K, N = 80, 12
    lin = nn.Linear(K, N)
    cols = torch.tensor([5, 17, 79])
    q = QuantLinear.from_linear(lin, "int8", outlier_cols=cols)
    x = torch.zeros(4, K)
    x[:, cols] = torch.randn(4, 3) * 30
    w = lin.weight.detach()
    expected = x[:, cols] @ w[:, cols].T + lin.bias.detach()
    assert torch.equal(q(x), expected)


def test_outlier_columns_never_reach_the_packed_part(exact_cpu_path):
    """The outlier columns' activations reach only the float term, even when the packed weight
    has nonzero codes there (a QuantizedWeight of the whole W, wrapped with from_quantized)."""
    K, N = 64, 8
    lin = nn.Linear(K, N, bias=False)
    w = lin.weight.detach()
    cols = torch.tensor([2, 30])
    qw = lowbit.quantize_weight(w, "int8")
    assert (R.dequantize(qw)[:, cols] != 0).any()
    q = QuantLinear.from_quantized(qw, outlier_cols=cols, outlier_weight=w[:, cols])
    x = torch.randn(5, K)
    x[:, cols] = 1e4
    rest = x.clone()
    rest[:, cols] = 0
    assert torch.equal(q(x), lowbit.linear(rest, qw) + x[:, cols] @ w[:, cols].T)
    eff = R.dequantize(qw)
    eff[:, cols] = w[:, cols]
    assert torch.equal(q.dequantize(), eff)


def test_other_formats_and_16bit_inputs(exact_cpu_path):
    lin = nn.Linear(128, 16)
    cols = torch.tensor([1, 64, 100])
    q = QuantLinear.from_linear(lin, "int4", group_size=32, outlier_cols=cols)
    _, w_eff = _split_reference(lin.weight.detach(), cols, "int4", group_size=32)
    assert torch.equal(q.dequantize(), w_eff)
    x = torch.randn(6, 128)
    assert_linear_close(q(x), torch.nn.functional.linear(x, w_eff, lin.bias.detach()), x, w_eff,
                        bias=lin.bias.detach())
    xb = x.to(torch.bfloat16)
    yb = q(xb)
    assert yb.dtype == torch.bfloat16
    exp = torch.nn.functional.linear(xb.float(), w_eff, lin.bias.detach())
    # Two bf16 roundings (the packed part's output, then the sum) on top of float32 sums.
    torch.testing.assert_close(yb.float(), exp, rtol=2 * 2 ** -8, atol=1e-3)


def test_gradient_flows_to_the_input():
    lin = nn.Linear(40, 10)
    q = QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([3, 9]))
    x = torch.randn(2, 40, requires_grad=True)
    g = torch.randn(2, 10)
    q(x).backward(g)
    torch.testing.assert_close(x.grad, g @ q.dequantize())


def test_no_outliers_is_the_plain_int8_layer():
    lin = nn.Linear(64, 20)
    plain = QuantLinear.from_linear(lin, "int8")
    for cols in (None, torch.tensor([], dtype=torch.int64)):
        q = QuantLinear.from_linear(lin, "int8", outlier_cols=cols)
        assert q.n_outliers == 0 and q.outlier_cols is None and q.outlier_weight is None
        a, b = q.state_dict(), plain.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]) if not isinstance(a[k], torch.Tensor) else torch.equal(a[k], b[k]), k
    # ... and quantize_with_outliers with nothing above the threshold.
    model = _One(lin)
    calib = [{"x": torch.randn(8, 64)}]
    out = quantize_with_outliers(model, {"lin": lin}, calib, _Cfg(threshold=math.inf))["lin"]
    assert out.n_outliers == 0
    x = torch.randn(3, 64)
    assert torch.equal(out(x), plain(x))
    for k, v in plain.state_dict().items():
        assert torch.equal(out.state_dict()[k], v) if isinstance(v, torch.Tensor) else out.state_dict()[k] == v


def test_threshold_semantics_strict_magnitude_max_over_all_batches():
    lin = nn.Linear(6, 3, bias=False)
    model = _One(lin)
    t = 6.0
    b1 = torch.zeros(2, 4, 6)
    b1[0, 1, 0] = 6.0            # equal to the threshold: not an outlier
    b1[1, 2, 1] = -6.5           # magnitude above: outlier
    b1[0, 0, 2] = 5.9
    b2 = torch.zeros(1, 3, 6)
    b2[0, 2, 2] = 6.0001         # column 2 exceeds only in the second batch
    b2[0, 0, 5] = float("inf")   # infinite activation: outlier
    calib = [{"x": b1}, {"x": b2}]
    amax = input_absmax(model, {"lin": lin}, calib)["lin"]
    assert torch.equal(amax, torch.tensor([6.0, 6.5, 6.0001, 0.0, 0.0, math.inf]))
    assert outlier_columns(amax, t).tolist() == [1, 2, 5]
    out = quantize_with_outliers(model, {"lin": lin}, calib, _Cfg(threshold=t))["lin"]
    assert out.outlier_cols.tolist() == [1, 2, 5]
    # The default threshold is 6.0 when the config has none.
    out = quantize_with_outliers(model, {"lin": lin}, calib, _Cfg())["lin"]
    assert out.outlier_cols.tolist() == [1, 2, 5]
    assert outlier_columns(amax, 0.0).tolist() == [0, 1, 2, 5]


def test_state_dict_round_trip_bit_exact_and_layout_adoption():
    lin = nn.Linear(50, 7).to(torch.float16)
    q = QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([9, 4, 33]))  # any order
    assert q.outlier_cols.tolist() == [4, 9, 33]
    assert q.outlier_weight.dtype == torch.float16
    assert torch.equal(q.outlier_weight, lin.weight.detach()[:, [4, 9, 33]])
    sd = q.state_dict()
    assert sd["_extra_state"]["outliers"] == 3 and sd["_extra_state"]["outlier_dtype"] == "float16"
    fresh = QuantLinear(50, 7, fmt="int4", dtype=torch.float16)  # plain, other format: adopts the layout
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert fresh.state_dict()[k].dtype == v.dtype and torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(3, 50)
    assert torch.equal(fresh(x), q(x))
    # Back to a plain checkpoint: the outlier buffers go away.
    plain = QuantLinear.from_linear(nn.Linear(50, 7).to(torch.float16), "int8")
    fresh.load_state_dict(plain.state_dict())
    assert fresh.n_outliers == 0 and "outlier_cols" not in fresh.state_dict()
    assert torch.equal(fresh(x), plain(x))


def test_save_load_model_with_outliers(tmp_path):
    model = tiny_llama()
    calib = token_batches()
    lowbit.quantize_model(model, lowbit.QuantConfig(method="llm.int8", outlier_threshold=1.5), calib)
    counts = {n: m.n_outliers for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert any(counts.values()) and not all(counts.values())  # some layers have outliers, some not
    path = tmp_path / "m.safetensors"
    lowbit.save(model, path)
    loaded = lowbit.load(path, lambda: tiny_llama(seed=5))
    assert {n: m.n_outliers for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == counts
    ids = calib[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_llm_int8_model_close_to_float():
    ref = tiny_llama()
    calib = token_batches()
    ids = token_batches(seed=7, n=1)[0]
    with torch.no_grad():
        exp = ref(ids).logits
        plain = lowbit.quantize_model(tiny_llama(), lowbit.QuantConfig(format="int8"))
        outl = lowbit.quantize_model(tiny_llama(), lowbit.QuantConfig(method="llm.int8",
                                                                      outlier_threshold=1.5), calib)
        e_plain = (plain(ids).logits - exp).pow(2).mean()
        e_out = (outl(ids).logits - exp).pow(2).mean()
    assert e_out < e_plain  # float columns for the large activations help


def test_bad_inputs():
    lin = nn.Linear(16, 4)
    with pytest.raises(TypeError, match="integer"):
        QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        QuantLinear.from_linear(lin, "int8", outlier_cols=[1, 2])
    with pytest.raises(ValueError, match="1-D"):
        QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([16]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([-1]))
    with pytest.raises(ValueError, match="repeat"):
        QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([3, 3]))
    qw = lowbit.quantize_weight(lin.weight, "int8")
    with pytest.raises(ValueError, match="both or neither"):
        QuantLinear.from_quantized(qw, outlier_cols=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"shape \[4, 1\]"):
        QuantLinear.from_quantized(qw, outlier_cols=torch.tensor([1]), outlier_weight=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="float tensor"):
        QuantLinear.from_quantized(qw, outlier_cols=torch.tensor([1]),
                                   outlier_weight=torch.zeros(4, 1, dtype=torch.int32))
    q = QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="in_features=16"):
        q(torch.randn(2, 15))
    sd = q.state_dict()
    for bad, match in (({"outliers": 17}, "outliers"), ({"outliers": -1}, "outliers"),
                       ({"outlier_dtype": "int8"}, "outlier_dtype"),
                       ({"outlier_dtype": "nope"}, "outlier_dtype")):
        sd2 = dict(sd)
        sd2["_extra_state"] = {**sd["_extra_state"], **bad}
        with pytest.raises(ValueError, match=match):
            QuantLinear(16, 4, fmt="int8").load_state_dict(sd2)
    sd2 = dict(sd)
    sd2["outlier_cols"] = torch.tensor([5, 1])
    with pytest.raises(RuntimeError, match="ascending"):
        QuantLinear(16, 4, fmt="int8").load_state_dict(sd2)
    model = _One(lin)
    calib = [{"x": torch.randn(2, 16)}]
    for t in (-1.0, float("nan"), "6", True):
        with pytest.raises(ValueError, match="outlier_threshold"):
            quantize_with_outliers(model, {"lin": lin}, calib, _Cfg(threshold=t))
    with pytest.raises(ValueError, match="calibration"):
        quantize_with_outliers(model, {"lin": lin}, None, _Cfg())
    with pytest.raises(TypeError, match="not an nn.Linear"):
        quantize_with_outliers(model, {"lin": model}, calib, _Cfg())
    with pytest.raises(ValueError, match="non-empty"):
        quantize_with_outliers(model, {}, calib, _Cfg())
    with pytest.raises(ValueError, match="never ran"):
        quantize_with_outliers(model, {"other": nn.Linear(16, 4)}, calib, _Cfg())


def test_a_layer_read_by_weight_gets_int8_without_outliers():
    """Model code that reads a linear's weight instead of calling it (Mamba's dt_proj,
    nn.MultiheadAttention's out_proj): no activations to find outliers in, so plain int8."""
    from lowbit.quantize import QuantConfig, quantize_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.dt = nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x) @ self.dt.weight.T

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 16)
    ref = net(x)
    quantize_model(net, QuantConfig(method="llm.int8", format="int8"), calibration=[{"x": x}],
                   progress=False)
    rep = {r.name: r for r in net.lowbit_report.layers}
    assert rep["dt"].method == "llm.int8" and "never called" in rep["dt"].info["note"]
    assert isinstance(net.dt, QuantLinear) and net.dt.n_outliers == 0
    assert float((net(x) - ref).abs().max()) < 0.05 * float(ref.abs().max())
