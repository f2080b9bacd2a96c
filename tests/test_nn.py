"""QuantLinear as a drop-in nn.Linear: construction, state dict, devices, compile, autograd."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear
from lowbit import reference as R
from lowbit.testing import assert_linear_close

from conftest import FORMAT_CASES, case_id


@pytest.mark.parametrize("case", FORMAT_CASES, ids=case_id)
def test_from_linear_forward_matches_reference(case, exact_cpu_path):
    fmt, opts = case
    lin = nn.Linear(200, 48)
    q = QuantLinear.from_linear(lin, fmt, **opts)
    x = torch.randn(3, 5, 200)
    qw = lowbit.quantize_weight(lin.weight, fmt, **opts)
    assert_linear_close(q(x), R.linear(x, qw, lin.bias), x, qw, bias=lin.bias)


def test_holds_no_float_weight():
    q = QuantLinear.from_linear(nn.Linear(256, 128, bias=False), "int4")
    names = dict(q.named_parameters()) | dict(q.named_buffers())
    assert "weight" not in names
    assert all(t.dtype in (torch.uint8, torch.int8) or t.numel() < 128 * 256 // 8 for t in names.values())


@pytest.mark.parametrize("case", FORMAT_CASES, ids=case_id)
def test_state_dict_round_trip_bit_exact(case):
    fmt, opts = case
    q = QuantLinear.from_linear(nn.Linear(100, 30), fmt, **opts)
    sd = q.state_dict()
    fresh = QuantLinear(100, 30, fmt=fmt, **opts)
    fresh.load_state_dict(sd)
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(4, 100)
    assert torch.equal(fresh(x), q(x))


def test_load_state_dict_adopts_the_checkpoint_format():
    q = QuantLinear.from_linear(nn.Linear(128, 16), "nf4", double_quant=True)
    other = QuantLinear(128, 16, fmt="int4")  # different format settings
    other.load_state_dict(q.state_dict())
    assert other.fmt == "nf4"
    x = torch.randn(2, 128)
    assert torch.equal(other(x), q(x))


def test_load_state_dict_refuses_mismatch():
    q = QuantLinear.from_linear(nn.Linear(128, 16), "int4")
    with pytest.raises(ValueError, match="does not match"):
        QuantLinear(64, 16, fmt="int4").load_state_dict(q.state_dict())
    sd = q.state_dict()
    sd["weight_scales"] = sd["weight_scales"][:, :0]
    with pytest.raises(RuntimeError, match="weight_scales"):
        QuantLinear(128, 16, fmt="int4").load_state_dict(sd)
    sd = q.state_dict()
    sd["_extra_state"] = {"something": "else"}
    with pytest.raises(ValueError, match="not a lowbit"):
        QuantLinear(128, 16, fmt="int4").load_state_dict(sd)


def test_to_moves_and_keeps_values():
    q = QuantLinear.from_linear(nn.Linear(64, 8), "int4", group_size=32)
    import copy
    m = copy.deepcopy(q).to("meta")  # Module.to works in place
    assert m.weight_data.device.type == "meta" and m.weight_zeros.device.type == "meta"
    assert m.weight_data.dtype == torch.uint8  # .to(dtype) semantics: codes keep their dtype
    q2 = copy.deepcopy(q).to(torch.bfloat16)
    assert torch.equal(q2.weight_scales, q.weight_scales)  # not rounded through bf16
    assert q2.weight_data.dtype == torch.uint8 and q2.weight_scales.dtype == torch.float32
    assert q2.bias.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert q2(x).dtype == torch.bfloat16


def test_qweight_to_device_round_trip():
    qw = lowbit.quantize_weight(torch.randn(8, 64), "nf4", double_quant=True)
    back = qw.to("cpu")
    for k, v in qw.tensors().items():
        assert torch.equal(getattr(back, k), v)
    assert qw.nbytes == sum(t.numel() * t.element_size() for t in qw.tensors().values())


def test_torch_compile_fullgraph():
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    qmodel = nn.Sequential(QuantLinear.from_linear(model[0], "int4", group_size=32), nn.GELU(),
                           QuantLinear.from_linear(model[2], "nf4"))
    x = torch.randn(4, 64)
    eager = qmodel(x)
    compiled = torch.compile(qmodel, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_opcheck():
    qw = lowbit.quantize_weight(torch.randn(16, 64), "int4", group_size=32)
    x = torch.randn(3, 64)
    args = (x, qw.data, qw.scales, qw.zeros, None, None, torch.randn(16), "int4", 64, 32, False)
    torch.library.opcheck(torch.ops.lowbit.linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.lowbit.dequantize.default,
                          (qw.data, qw.scales, qw.zeros, None, None, "int4", 64, 32, False, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


def test_gradient_flows_to_input_and_bias():
    lin = nn.Linear(64, 16)
    q = QuantLinear.from_linear(lin, "int8")
    q.bias.requires_grad_(True)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    w = q.dequantize()
    torch.testing.assert_close(x.grad, torch.ones(3, 16) @ w)
    torch.testing.assert_close(q.bias.grad, torch.full((16,), 3.0))
