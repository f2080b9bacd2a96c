"""Reading and writing quantized models.

* lowbit's own checkpoints: :func:`save` / :func:`load` (safetensors + a JSON description of
  every layer; :mod:`lowbit.io.serialize`).
* Other tools' checkpoints, mapped exactly onto lowbit formats (never through float):
  :func:`load_checkpoint` detects the source and dispatches to :func:`load_gptq`,
  :func:`load_awq`, :func:`load_bnb` or :func:`load_gguf`; exporters write GPTQ (v2) and GGUF.
"""

from __future__ import annotations

import importlib

# name -> submodule of lowbit.io that defines it (imported on first use).
_LAZY = {
    "save": "serialize",
    "load": "serialize",
    "load_checkpoint": "checkpoint",
    "load_gptq": "gptq",
    "export_gptq": "gptq",
    "load_awq": "awq",
    "load_bnb": "bnb",
    "load_gguf": "gguf",
    "export_gguf": "gguf",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lowbit.io' has no attribute {name!r}")
