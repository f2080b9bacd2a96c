"""QuantExperts: fused mixture-of-experts weights (transformers >= 5) kept packed.

transformers stores a MoE layer's experts as one module holding 3-D parameters rather than
nn.Linear layers (Mixtral, Qwen3-MoE, OLMoE, gpt-oss, ...): ``gate_up_proj`` ``[E, 2I, H]``
(or ``up_proj`` ``[E, I, H]`` for ungated experts), ``down_proj`` ``[E, H, I]``, transposed
(``[E, in, out]``) for some models, optional biases ``[E, out]``, and flags set by
``transformers.integrations.moe.use_experts_implementation`` (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``). Its forward takes
``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.

:class:`QuantExperts` holds each expert's two matrices as :class:`~lowbit.QuantLinear` layers
(``up.<e>``, ``down.<e>``) and keeps the original module as ``base`` without its big weights,
for what the experts compute besides the matmuls (biases, ``_apply_gate`` with its activation,
a post-expert norm), so model-specific gating (e.g. gpt-oss's clamped SwiGLU) is the model's
own code. Its forward runs each routed expert on its tokens, as transformers' eager
implementation does.

:func:`quantize_experts` builds one after checking, on a random probe, that this reading of
the module reproduces its own forward (with the float weights); a module that does not match
(an unknown layout or forward) is left in float and the caller reports it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .nn import QuantLinear
from .ops import quantize_weight


def _flags(mod: nn.Module) -> Optional[Dict[str, Any]]:
    """The layout of a transformers fused-experts module, or None if ``mod`` is not one."""
    gated = isinstance(mod._parameters.get("gate_up_proj"), torch.Tensor)
    up_name = "gate_up_proj" if gated else "up_proj"
    up = mod._parameters.get(up_name)
    down = mod._parameters.get("down_proj")
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    if up.dim() != 3 or down.dim() != 3 or up.shape[0] != down.shape[0] or up.shape[0] < 1:
        return None
    if not hasattr(mod, "act_fn") and not (gated and hasattr(mod, "_apply_gate")):
        return None
    if bool(getattr(mod, "has_gate", gated)) != gated:
        return None
    transposed = bool(getattr(mod, "is_transposed", False))
    has_bias = bool(getattr(mod, "has_bias", False))
    if not bool(getattr(mod, "is_concatenated", True)) and not hasattr(mod, "_apply_gate"):
        return None
    E = up.shape[0]
    up_out, up_in = (up.shape[2], up.shape[1]) if transposed else (up.shape[1], up.shape[2])
    down_out, down_in = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    if down_out != up_in:
        return None
    if has_bias:
        for n, out in ((up_name + "_bias", up_out), ("down_proj_bias", down_out)):
            b = mod._parameters.get(n)
            if not (isinstance(b, torch.Tensor) and tuple(b.shape) == (E, out)):
                return None
    return {"gated": gated, "up_name": up_name, "transposed": transposed, "has_bias": has_bias,
            "post_norm": bool(getattr(mod, "has_post_expert_norm", False)), "E": E,
            "hidden": up_in, "up_out": up_out, "inter": down_in}


def is_fused_experts(mod: nn.Module) -> bool:
    """Whether ``mod`` looks like a transformers fused-experts module (see the module doc)."""
    return not isinstance(mod, QuantExperts) and _flags(mod) is not None


def _expert_matrix(p: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    """Expert e's weight as [out, in]."""
    return p[e].t() if transposed else p[e]


def _run(base: nn.Module, fl: Dict[str, Any], hidden_states: torch.Tensor,
         top_k_index: torch.Tensor, top_k_weights: torch.Tensor, up_fn, down_fn) -> torch.Tensor:
    """The experts' output: for each routed expert e, its tokens through up_fn(e, x) (+ bias),
    the gate / activation, down_fn(e, h) (+ bias) and the post-expert norm, weighted by the
    routing weights and summed per token in hidden_states' dtype.

    The (token, expert) pairs are sorted by expert once, so each expert reads one contiguous
    slice and the host waits on the device once per call (for the per-expert counts), not
    once per expert; ids outside [0, E) (expert-parallel sentinels) are skipped."""
    E = fl["E"]
    T = hidden_states.shape[0]
    out = torch.zeros_like(hidden_states)
    if top_k_index.numel() == 0 or T == 0:
        return out
    flat = top_k_index.reshape(-1)
    k = flat.numel() // T
    wts = top_k_weights.reshape(-1)
    ids = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=E + 1)[:E].tolist()
    n = sum(counts)
    order = order[:n]
    tok = order // k
    xs = hidden_states[tok]
    ws = wts[order]
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        seg = slice(start, start + c)
        start += c
        h = up_fn(e, xs[seg])
        if fl["has_bias"]:
            h = h + base._parameters[fl["up_name"] + "_bias"][e]
        if not fl["gated"]:
            h = base.act_fn(h)
        elif hasattr(base, "_apply_gate"):  # transformers' default or the model's own gating
            h = base._apply_gate(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = base.act_fn(gate) * up
        h = down_fn(e, h)
        if fl["has_bias"]:
            h = h + base._parameters["down_proj_bias"][e]
        if fl["post_norm"]:
            h = base.post_expert_norm(h)
        ys[seg] = (h * ws[seg, None]).to(ys.dtype)
    if n:
        out.index_add_(0, tok, ys)
    return out


class QuantExperts(nn.Module):
    """A fused-experts module with every expert's matrices packed (see the module doc).

    ``up[e]``: expert e's gate/up (or up) projection, ``down[e]``: its down projection, as
    :class:`~lowbit.QuantLinear` without bias; ``base``: the original module, its weight
    parameters removed (its biases, activation and norm kept)."""

    def __init__(self, base: nn.Module, fmt: str = "int4", device=None, **format_options):
        super().__init__()
        fl = _flags(base)
        if fl is None:
            raise TypeError(f"{type(base).__name__} is not a fused-experts module this version "
                            "of lowbit understands")
        E, H, I2, I = fl["E"], fl["hidden"], fl["up_out"], fl["inter"]
        self._assemble(fl, base,
                       [QuantLinear(H, I2, bias=False, fmt=fmt, device=device, **format_options)
                        for _ in range(E)],
                       [QuantLinear(I, H, bias=False, fmt=fmt, device=device, **format_options)
                        for _ in range(E)])

    def _assemble(self, fl: Dict[str, Any], base: nn.Module, up, down) -> None:
        """Install the experts' layers; ``base`` loses its two weight parameters."""
        self._fl = fl
        self.num_experts = fl["E"]
        self.up = nn.ModuleList(up)
        self.down = nn.ModuleList(down)
        for n in (fl["up_name"], "down_proj"):
            del base._parameters[n]
        self.base = base

    @classmethod
    @torch.no_grad()
    def from_experts(cls, mod: nn.Module, fmt: str = "int4", **format_options) -> "QuantExperts":
        """Quantize a fused-experts module (round-to-nearest, each expert's matrices on their
        own). The module's weight parameters are taken out of it (it becomes ``base``)."""
        fl = _flags(mod)
        if fl is None:
            raise TypeError(f"{type(mod).__name__} is not a fused-experts module")
        def packed(p: torch.Tensor):
            return [QuantLinear.from_quantized(quantize_weight(
                _expert_matrix(p, e, fl["transposed"]).detach(), fmt, **format_options))
                for e in range(fl["E"])]

        qe = cls.__new__(cls)
        nn.Module.__init__(qe)
        qe._assemble(fl, mod, packed(mod._parameters[fl["up_name"]]),
                     packed(mod._parameters["down_proj"]))
        return qe

    @property
    def bits_per_weight(self) -> float:
        n = sum(m.in_features * m.out_features for m in list(self.up) + list(self.down))
        return sum(m.bits_per_weight * m.in_features * m.out_features
                   for m in list(self.up) + list(self.down)) / max(n, 1)

    @property
    def n_weights(self) -> int:
        return sum(m.in_features * m.out_features for m in list(self.up) + list(self.down))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2 \
                or hidden_states.shape[-1] != self._fl["hidden"]:
            raise ValueError(f"QuantExperts expects hidden_states [tokens, {self._fl['hidden']}], got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                             f"{tuple(top_k_weights.shape)} must both be [tokens, k] for "
                             f"{hidden_states.shape[0]} tokens")
        return _run(self.base, self._fl, hidden_states, top_k_index, top_k_weights,
                    lambda e, x: self.up[e](x), lambda e, h: self.down[e](h))

    def extra_repr(self) -> str:
        fmts = sorted({m.fmt for m in self.up} | {m.fmt for m in self.down})
        return f"num_experts={self.num_experts}, format={','.join(fmts)}, base={type(self.base).__name__}"


@torch.no_grad()
def check_layout(mod: nn.Module, tokens: int = 9, seed: int = 0) -> Tuple[bool, str]:
    """Whether :class:`QuantExperts`' reading of ``mod`` reproduces ``mod``'s own forward with
    its float weights, on random inputs and routings; (ok, why not)."""
    fl = _flags(mod)
    if fl is None:
        return False, "not a fused-experts module"
    up_p, down_p = mod._parameters[fl["up_name"]], mod._parameters["down_proj"]
    if up_p.device.type == "meta":
        return False, "its weights are on the meta device"
    g = torch.Generator().manual_seed(seed)
    E, H = fl["E"], fl["hidden"]
    k = min(2, E)
    x = torch.randn(tokens, H, generator=g).to(device=up_p.device, dtype=up_p.dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).to(up_p.device)
    w = torch.rand(tokens, k, generator=g).to(device=up_p.device, dtype=up_p.dtype)
    try:
        want = mod(x, idx, w)
    except Exception as e:  # an unknown signature or layout: leave the module alone
        return False, f"its forward does not take (hidden_states, top_k_index, top_k_weights): {e}"
    if not isinstance(want, torch.Tensor) or want.shape != x.shape:
        return False, "its forward does not return [tokens, hidden]"
    got = _run(mod, fl, x, idx, w,
               lambda e, t: t @ _expert_matrix(up_p, e, fl["transposed"]).t(),
               lambda e, t: t @ _expert_matrix(down_p, e, fl["transposed"]).t())
    tol = 1e-4 if up_p.dtype == torch.float32 else 2e-2
    err = float((got.float() - want.float()).norm()) / max(float(want.float().norm()), 1e-30)
    if not err <= tol:
        return False, f"lowbit's reading of its layout does not reproduce its forward (error {err:.2g})"
    return True, ""
