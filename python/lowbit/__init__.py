"""lowbit: low-bit (INT8 / INT4 / NF4) weight-quantized matmul for PyTorch.

    qw = lowbit.quantize_weight(linear.weight, "int4", group_size=128)
    y = lowbit.linear(x, qw, linear.bias)
    layer = lowbit.QuantLinear.from_linear(linear, "nf4")
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import formats, reference  # noqa: F401
from .formats import FORMATS, NF4_CODEBOOK  # noqa: F401
from .nn import QuantLinear  # noqa: F401
from .ops import dequantize, linear, quantize_weight  # noqa: F401
from .qweight import QuantizedWeight  # noqa: F401

# Names served from submodules on first use (keeps `import lowbit` light: no transformers,
# safetensors or torch.distributed until needed).
_LAZY = {
    "QuantConfig": "lowbit.quantize",
    "QuantExperts": "lowbit.moe",
    "quantize_model": "lowbit.quantize",
    "save": "lowbit.io",
    "load": "lowbit.io",
    "load_checkpoint": "lowbit.io",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def backend_info() -> dict:
    """Which kernels run here and why: the CPU ISA chosen (and the reason), the ISAs compiled
    and supported, CPU features, thread count and its source, and the GPU side."""
    import os

    import torch

    from . import _backend, ops

    info = {"version": __version__, "torch": torch.__version__}
    try:
        C = _backend.ext()
        info.update(cpu_isa=C.active_isa(), cpu_isa_reason=C.active_reason(),
                    compiled_isas=list(C.compiled_isas()), supported_isas=list(C.supported_isas()),
                    cpu_features={k: v for k, v in C.cpu_features().items() if v})
    except RuntimeError as e:
        info.update(cpu_isa=None, cpu_isa_reason=str(e))
    info["num_threads"] = _backend.num_threads()
    try:
        info["cpu_path"] = _backend.cpu_path()
    except ValueError as e:  # a bad LOWBIT_CPU_PATH: say so here, linear() raises it
        info["cpu_path"] = f"invalid ({e})"
    info["num_threads_source"] = ("LOWBIT_NUM_THREADS" if os.environ.get("LOWBIT_NUM_THREADS")
                                  else "torch.get_num_threads()")
    info["cuda_available"] = torch.cuda.is_available()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    kernels = ops._gpu_kernels()
    info["gpu_backend"] = ("triton (lowbit.kernels)" if kernels is not None
                           else "dequantize + torch matmul (no Triton kernels on this machine)")
    if kernels is not None:
        from lowbit.kernels.gemv import idot_enabled
        info["gpu_small_m"] = ("float32 GEMV and exact GEMMs only (LOWBIT_GPU_EXACT=1)"
                               if not idot_enabled() else
                               "integer-dot GEMV at M <= 2 (16-bit activations, int4 / int8 / "
                               "nf4), float32 GEMV elsewhere; int4 at M 3-64: register-operand "
                               "tensor-core GEMM, or the integer tensor-core GEMM where tuned")
    return info


def set_isa(isa: str) -> None:
    """Force the CPU kernels to one ISA for this process, like LOWBIT_ISA: 'avx512amx',
    'avx512vnni', 'avx512', 'avx2vnni', 'avx2', 'neon_dotprod', 'neon' or 'scalar' (those this CPU
    runs: ``backend_info()["supported_isas"]``); RuntimeError if this CPU can't run it."""
    from . import _backend
    _backend.ext().set_isa(isa)


def set_cpu_path(path) -> None:
    """Choose the CPU path of :func:`linear` for this process, like LOWBIT_CPU_PATH: "exact"
    (the default: float32 activations, the reference's numbers within float32 rounding) or
    "fast" (int8 activations and a weight copy repacked for this CPU: 2-3x faster at small M,
    about 0.3% relative error on the output, twice the layer's memory); None goes back to
    LOWBIT_CPU_PATH. ValueError for anything else."""
    from . import _backend
    _backend.set_cpu_path(path)


def cpu_path() -> str:
    """The CPU path :func:`linear` uses now ("exact" or "fast"; see :func:`set_cpu_path`)."""
    from . import _backend
    return _backend.cpu_path()
