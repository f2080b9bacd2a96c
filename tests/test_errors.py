"""Bad input gives a clear Python exception naming the problem."""

import pytest
import torch

import lowbit
from lowbit import QuantizedWeight


@pytest.fixture
def qw():
    return lowbit.quantize_weight(torch.randn(8, 64), "int4", group_size=32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.complex64, torch.float64, torch.bool])
def test_linear_rejects_bad_activation_dtype(qw, dtype):
    x = torch.zeros(2, 64, dtype=dtype)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        lowbit.linear(x, qw)


def test_linear_rejects_k_mismatch(qw):
    with pytest.raises(ValueError, match="in_features=64"):
        lowbit.linear(torch.randn(2, 63), qw)
    with pytest.raises(ValueError, match="in_features"):
        lowbit.linear(torch.tensor(1.0), qw)


def test_linear_rejects_non_tensor_and_wrong_weight(qw):
    with pytest.raises(TypeError, match="torch.Tensor"):
        lowbit.linear([[1.0] * 64], qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        lowbit.linear(torch.randn(1, 64), torch.randn(8, 64))


def test_linear_rejects_device_mismatch(qw):
    x = torch.randn(2, 64, device="meta")
    with pytest.raises(ValueError, match="meta"):
        lowbit.linear(x, qw)


def test_linear_rejects_bad_bias(qw):
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        lowbit.linear(torch.randn(2, 64), qw, torch.randn(7))
    with pytest.raises(TypeError, match="bias"):
        lowbit.linear(torch.randn(2, 64), qw, torch.zeros(8, dtype=torch.int64))


def test_quantize_rejects_bad_weights():
    with pytest.raises(ValueError, match="2-D"):
        lowbit.quantize_weight(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="floating"):
        lowbit.quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty"):
        lowbit.quantize_weight(torch.randn(0, 4))
    with pytest.raises(ValueError, match="meta device"):
        lowbit.quantize_weight(torch.empty(4, 64, device="meta"), "int4")
    with pytest.raises(ValueError, match="double_quant"):
        lowbit.quantize_weight(torch.randn(4, 64), "int4", double_quant=True)
    with pytest.raises(ValueError, match="group_size"):
        lowbit.quantize_weight(torch.randn(4, 64), "int4", group_size=100)
    with pytest.raises(TypeError, match="group_size"):
        lowbit.quantize_weight(torch.randn(4, 64), "int4", group_size=32.0)
    with pytest.raises(ValueError, match="always symmetric"):
        lowbit.quantize_weight(torch.randn(4, 64), "nf4", symmetric=False)


def test_dequantize_rejects_bad_dtype(qw):
    with pytest.raises(TypeError, match="dtype"):
        lowbit.dequantize(qw, torch.int8)


def test_quantized_weight_validates_fields(qw):
    with pytest.raises(ValueError, match="'scales' must be torch.float32 \\[8, 2\\]"):
        QuantizedWeight("int4", (8, 64), qw.data, qw.scales[:, :1].contiguous(), qw.zeros, group_size=32,
                        symmetric=False)
    with pytest.raises(ValueError, match="'data'"):
        QuantizedWeight("int4", (8, 64), qw.data.to(torch.int8), qw.scales, qw.zeros, group_size=32,
                        symmetric=False)
    with pytest.raises(ValueError, match="'zeros'"):
        QuantizedWeight("int4", (8, 64), qw.data, qw.scales, None, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="must not carry 'zeros'"):
        QuantizedWeight("int4", (8, 64), qw.data, qw.scales, qw.zeros, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="unknown weight format"):
        QuantizedWeight("int2", (8, 64), qw.data, qw.scales)


def test_binding_refuses_inconsistent_raw_arguments(qw):
    C = lowbit._backend.ext()
    x = torch.randn(1, 64)
    y = torch.empty(1, 8)
    args = dict(fmt=1, N=8, K=64, group=32, symmetric=False, double_quant=False,
                data=qw.data.data_ptr(), ld_data=32, scales=qw.scales.data_ptr(),
                zeros=qw.zeros.data_ptr(), dq_scale=0, dq_offset=0, x=x.data_ptr(), x_dtype=0,
                M=1, ldx=64, bias=0, y=y.data_ptr(), y_dtype=0, ldy=8, n_threads=1)
    C.linear(**args)  # consistent: fine
    for bad, msg in [({"zeros": 0}, "zeros"), ({"group": 0}, "group"), ({"ld_data": 16}, "stride"),
                     ({"data": 0}, "null"), ({"fmt": 7}, "format"), ({"x_dtype": 9}, "dtype"),
                     ({"ldx": 10}, "stride"), ({"N": -1}, "positive")]:
        with pytest.raises(ValueError, match=msg):
            C.linear(**{**args, **bad})
