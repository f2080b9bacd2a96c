"""Whole-model quantization: ``lowbit.quantize_model(model, lowbit.QuantConfig(...), calibration)``.

* :mod:`.config` QuantConfig (format, method, per-module rules, algorithm options)
* :mod:`.model` quantize_model and round-to-nearest (RTN)
* :mod:`.gptq` GPTQ, :mod:`.awq` AWQ (both block by block, :mod:`.blocks`)
* :mod:`.calibration` calibration batches (normalize_calibration, calibration_from_text)
* :mod:`.report` the per-layer report left on the model (``model.lowbit_report``)
"""

from .calibration import (calibration_from_text, calibration_from_tokens,  # noqa: F401
                          normalize_calibration)
from .config import ALGORITHM_OPTIONS, METHODS, QuantConfig  # noqa: F401
from .model import quantize_model  # noqa: F401
from .report import LayerReport, QuantReport  # noqa: F401

__all__ = ["QuantConfig", "quantize_model", "normalize_calibration", "calibration_from_tokens",
           "calibration_from_text", "QuantReport", "LayerReport", "ALGORITHM_OPTIONS", "METHODS"]
