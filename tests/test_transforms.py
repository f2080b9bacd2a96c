"""QuantizedWeight's optional input transforms (perm, input_scale): the kernels multiply the
stored weight, lowbit.linear applies the transforms, dequantize undoes them."""

import pytest
import torch

import lowbit
from lowbit import QuantLinear, QuantizedWeight
from lowbit import reference as R
from lowbit.testing import assert_linear_close

from conftest import FORMAT_CASES, case_id


def _with_transforms(qw, K, perm=True, scale=True):
    p = torch.randperm(K) if perm else None
    s = torch.rand(K) * 3 + 0.25 if scale else None
    return QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scales, qw.zeros, group_size=qw.group_size,
                           symmetric=qw.symmetric, double_quant=qw.double_quant,
                           dq_scale=qw.dq_scale, dq_offset=qw.dq_offset, perm=p, input_scale=s)


def _independent_weight(qw):
    """The layer's weight in input order, computed independently of to_input_order: column
    perm[j] of W is stored column j divided by input_scale[perm[j]]."""
    ws = R.decode(qw, torch.float32)
    K = qw.shape[1]
    perm = qw.perm if qw.perm is not None else torch.arange(K)
    s = qw.input_scale if qw.input_scale is not None else torch.ones(K)
    w = torch.zeros_like(ws)
    for j in range(K):
        w[:, perm[j]] = ws[:, j] / s[perm[j]]
    return w


@pytest.mark.parametrize("case", FORMAT_CASES, ids=case_id)
@pytest.mark.parametrize("which", ["perm", "scale", "both"])
def test_linear_and_dequantize_with_transforms(case, which, isa, exact_cpu_path):
    C = lowbit._backend.ext()
    default = C.active_isa()
    C.set_isa(isa)
    try:
        _check_transforms(case, which)
    finally:
        C.set_isa(default)


def _check_transforms(case, which):
    fmt, opts = case
    K = 131
    qw0 = lowbit.quantize_weight(torch.randn(24, K), fmt, **opts)
    qw = _with_transforms(qw0, K, perm=which != "scale", scale=which != "perm")
    w = _independent_weight(qw)
    assert torch.equal(lowbit.dequantize(qw), w)
    assert torch.equal(R.dequantize(qw), w)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 2, K).to(dtype)
        b = torch.randn(24)
        y = lowbit.linear(x, qw, b)
        assert y.dtype == dtype and y.shape == (3, 2, 24)
        expected = torch.nn.functional.linear(x.float(), w, b)
        assert_linear_close(y, expected.to(dtype), x, qw, bias=b)


def test_quantlinear_state_dict_keeps_transforms():
    K = 96
    qw = _with_transforms(lowbit.quantize_weight(torch.randn(16, K), "int4", group_size=32), K)
    q = QuantLinear.from_quantized(qw, torch.randn(16))
    x = torch.randn(4, K)
    sd = q.state_dict()
    fresh = QuantLinear(K, 16, fmt="int4", group_size=32)  # built without transforms
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight_perm, qw.perm)
    assert torch.equal(fresh.weight_input_scale, qw.input_scale)
    assert torch.equal(fresh(x), q(x))


def test_transforms_follow_autograd_to_x():
    K = 64
    qw = _with_transforms(lowbit.quantize_weight(torch.randn(8, K), "nf4"), K)
    x = torch.randn(2, K, requires_grad=True)
    lowbit.linear(x, qw).sum().backward()
    w = _independent_weight(qw)
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, K), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, msg", [
    ({"perm": torch.tensor([0, 0, 1, 2])}, "permutation"),
    ({"perm": torch.tensor([0, 1, 2], dtype=torch.int64)}, "perm"),
    ({"perm": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, "perm"),
    ({"input_scale": torch.tensor([1.0, -1.0, 1.0, 1.0])}, "positive"),
    ({"input_scale": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, "finite"),
    ({"input_scale": torch.ones(4, dtype=torch.float16)}, "input_scale"),
])
def test_bad_transforms_are_refused(bad, msg):
    qw = lowbit.quantize_weight(torch.randn(4, 4), "int8")
    with pytest.raises(ValueError, match=msg):
        QuantizedWeight("int8", (4, 4), qw.data, qw.scales, **bad)
