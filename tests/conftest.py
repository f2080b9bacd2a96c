import os

# Triton kernels (when a test imports them) must run under the interpreter on this GPU-less
# machine; this has to be set before any @triton.jit module is imported.
if not os.environ.get("LOWBIT_TEST_REAL_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit._backend import ISAS as ALL_ISAS  # noqa: E402

# (format name, options) covering every format and variant.
FORMAT_CASES = [
    ("int8", {}),
    ("int4", {}),  # asymmetric, group 128
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 64}),
    ("int4", {"group_size": 256}),
    ("int4", {"group_size": -1}),
    ("int4", {"symmetric": True}),
    ("int4", {"symmetric": True, "group_size": 32}),
    ("nf4", {}),  # block 64
    ("nf4", {"group_size": 32}),
    ("nf4", {"group_size": 128}),
    ("nf4", {"group_size": -1}),
    ("nf4", {"double_quant": True}),
    ("nf4", {"double_quant": True, "group_size": 16}),
]

# The interop variants (GGUF Q8_0 / Q4_1 / Q4_K, GPTQ 8-bit, bitsandbytes FP4): int8 with groups
# and zero-points, int4 with a float offset per group, fp4. Tests that take every format use
# FORMAT_CASES + NEW_FORMAT_CASES.
NEW_FORMAT_CASES = [
    ("int8", {"group_size": 32}),  # GGUF Q8_0
    ("int8", {"symmetric": False, "group_size": 64}),  # GPTQ 8-bit
    ("int4", {"zero_point": "float", "group_size": 32}),  # GGUF Q4_1 / Q4_K
    ("int4", {"zero_point": "float", "group_size": -1}),
    ("fp4", {}),  # block 64
    ("fp4", {"double_quant": True, "group_size": 16}),
]


def case_id(case):
    fmt, opts = case
    return fmt + "".join(f"-{k[:3]}{v}" for k, v in opts.items())


def isa_or_skip(isa):
    """Skip (with the reason) when this build or CPU can't run `isa`."""
    from lowbit import _backend
    C = _backend.ext()
    if isa not in C.compiled_isas():
        pytest.skip(f"ISA {isa} is not compiled for this architecture")
    if isa not in C.supported_isas():
        pytest.skip(f"this CPU cannot run ISA {isa} (features: {sorted(k for k, v in C.cpu_features().items() if v)})")
    return isa


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    return isa_or_skip(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_cpu_path():
    """Run the test on the exact (float32-activation) CPU path, whatever LOWBIT_CPU_PATH says;
    for tests that compare against the reference within lowbit.testing's float32 tolerance.
    The fast path is tested against its own bound in tests/test_fast_path.py."""
    from lowbit import _backend
    _backend.set_cpu_path("exact")
    yield "exact"
    _backend.set_cpu_path(None)
