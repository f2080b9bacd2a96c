"""The record quantize_model leaves on the model (``model.lowbit_report``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .config import describe_format


@dataclass
class LayerReport:
    name: str
    method: str  # rtn / gptq / awq / llm.int8, or "skip"
    format: Optional[Dict[str, Any]]  # resolved format options (None: kept in float)
    bits_per_weight: float  # as stored, scales / zeros / transforms included (32 for float)
    seconds: float  # time spent on this layer by the algorithm itself (not the shared passes)
    rule: str  # which rule decided the format
    info: Dict[str, Any] = field(default_factory=dict)  # algorithm details (alpha, loss, ...)

    @property
    def description(self) -> str:
        return describe_format(self.format)


@dataclass
class QuantReport:
    """Per-layer formats, sizes and times of one quantize_model call."""

    method: str
    config: Dict[str, Any]
    layers: List[LayerReport] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole call
    calibration_tokens: int = 0
    plan: Optional[str] = None  # the mixed-precision plan's table, when one was made
    notes: List[str] = field(default_factory=list)

    @property
    def quantized(self) -> List[LayerReport]:
        return [r for r in self.layers if r.format is not None]

    def bits_per_weight(self) -> float:
        """Average over the quantized layers, weighted by their weight counts."""
        tot_bits = tot_w = 0.0
        for r in self.quantized:
            n = r.info.get("weights", 0)
            tot_bits += r.bits_per_weight * n
            tot_w += n
        return tot_bits / tot_w if tot_w else 0.0

    def table(self, max_rows: Optional[int] = None) -> str:
        from tabulate import tabulate
        rows = []
        for r in self.layers[:max_rows] if max_rows else self.layers:
            extra = ", ".join(f"{k}={_fmt(v)}" for k, v in r.info.items() if k != "weights")
            rows.append([r.name, r.method, r.description,
                         f"{r.bits_per_weight:.2f}", f"{r.seconds:.2f}", extra])
        head = (f"method {self.method}: {len(self.quantized)} layers quantized, "
                f"{self.bits_per_weight():.3f} bits/weight, {self.seconds:.1f} s"
                + (f", {self.calibration_tokens} calibration tokens" if self.calibration_tokens else ""))
        body = tabulate(rows, headers=["layer", "method", "format", "bits/w", "s", "details"])
        parts = [head]
        if self.plan:
            parts.append(self.plan)
        parts += self.notes
        parts.append(body)
        return "\n".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight()
        return d

    def __str__(self) -> str:
        return self.table()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
