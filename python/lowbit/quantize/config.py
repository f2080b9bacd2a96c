"""QuantConfig: what quantize_model does to which layer.

A config holds a default weight format with its options (anything ``lowbit.quantize_weight``
accepts: ``group_size``, ``symmetric``, ``double_quant``, ... ), the algorithm (``method``) with
its options (a table, :data:`ALGORITHM_OPTIONS`), per-module ``rules`` and, optionally, a
``max_bits_per_weight`` budget for automatic mixed precision.

Rules
-----
``rules`` is a list of ``(pattern, action)`` pairs, or a dict (its insertion order is kept).
For each nn.Linear, the rules are tried in order and the **first match wins**; a module no rule
matches gets the config's default format. After the user's rules comes one built-in rule,
``("lm_head", "skip")``, so the output head stays in float unless a rule of yours names it.

* pattern: a glob (``fnmatch``, case-sensitive) matched against the module's full dotted name
  *or any dotted suffix of it*: ``"down_proj"`` matches ``model.layers.3.mlp.down_proj``,
  ``"layers.0.*"`` every Linear of block 0, ``"model.layers.1[0-9].mlp.*"`` full names.
  A pattern starting with ``"re:"`` (or a compiled ``re.Pattern``) is a regular expression
  that must match the whole name (``re.fullmatch``).
* action: ``"skip"`` / ``None`` / ``False`` (leave the layer in float), a format name
  (``"int8"``), or a dict of format options (``{"format": "int8"}``, ``{"group_size": 64}``).
  Options a dict leaves out come from the config's default when the format is the default
  one, else from that format's own defaults.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import formats as F

METHODS = ("rtn", "gptq", "awq", "llm.int8")
# Methods that need calibration data, and why (for the error message).
NEEDS_CALIBRATION = {
    "gptq": "GPTQ builds each layer's Hessian from calibration activations",
    "awq": "AWQ searches per-channel scales on calibration activations",
    "llm.int8": "LLM.int8 finds the outlier input columns from calibration activations",
}
SKIP_ACTIONS = ("skip",)
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (("lm_head", "skip"),)


def output_head_name(model: nn.Module) -> Optional[str]:
    """The name of the model's output-embedding module (transformers' get_output_embeddings():
    ``lm_head``, or e.g. BioGPT's ``output_projection``, Whisper's ``proj_out``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # a model whose head is not wired up that way
        return None
    if not isinstance(head, nn.Module):
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name
    return None


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_int(lo: int, hi: Optional[int] = None) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= lo
                      and (hi is None or v <= hi))


def _is_float(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return check


def _is_choice(*choices) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _is_names(v) -> bool:
    return isinstance(v, (tuple, list)) and all(isinstance(s, str) and s for s in v)


@dataclass(frozen=True)
class AlgorithmOption:
    """One row of the algorithm option table."""

    default: Any
    methods: Tuple[str, ...]  # the methods it applies to
    check: Callable[[Any], bool]
    expect: str  # what a valid value looks like (for the error message)
    doc: str
    per_method: Optional[Dict[str, Any]] = None  # defaults that differ by method

    def default_for(self, method: str):
        if self.per_method and method in self.per_method:
            return self.per_method[method]
        return self.default


ALGORITHM_OPTIONS: Dict[str, AlgorithmOption] = {
    # GPTQ
    "damp_percent": AlgorithmOption(
        0.01, ("gptq",), _is_float(0.0, 1.0, lo_open=True), "a float in (0, 1]",
        "dampening added to the Hessian diagonal, as a fraction of its mean"),
    "damp_ref": AlgorithmOption(
        "tokens", ("gptq",), _is_choice("hessian", "tokens"), "'hessian' or 'tokens'",
        "what damp_percent is a fraction of: the mean diagonal of the plain mean over tokens "
        "(SmolLM2 g128: 26.48 vs 29.52) or of H as weighted (first_token_weight included)"),
    "act_order": AlgorithmOption(
        True, ("gptq",), _is_bool, "a bool",
        "quantize columns by decreasing Hessian diagonal (stored as the weight's perm)"),
    "act_groups": AlgorithmOption(
        "order", ("gptq",), _is_choice("input", "order"), "'input' or 'order'",
        "with act_order, what a group is: consecutive columns in act order (stored with perm, "
        "int64 per input feature, counted in bits per weight; measured better on SmolLM2) or "
        "consecutive input features (a group map; the stored weight keeps the usual layout, "
        "no perm; always used under max_bits_per_weight, whose plan counts no perm)"),
    "awq_scales": AlgorithmOption(
        False, ("gptq",), _is_bool, "a bool",
        "before GPTQ, AWQ's per-channel scale search on each block (AWQ's default options), "
        "scales folded into the producing norm / linear where possible (no input_scale); "
        "SmolLM2 int4 g64, 16k tokens: 26.49 against GPTQ alone 25.64, so off by default"),
    "block_size": AlgorithmOption(
        128, ("gptq",), _is_int(1), "an int >= 1",
        "columns per lazy-update block"),
    "static_groups": AlgorithmOption(
        False, ("gptq",), _is_bool, "a bool",
        "group scales from the weights before any update (else when the group is reached)"),
    "true_sequential": AlgorithmOption(
        True, ("gptq",), _is_bool, "a bool",
        "inside a block, each group of layers sees the inputs of the already-quantized ones"),
    "first_token_weight": AlgorithmOption(
        64.0, ("gptq", "awq"), _is_float(1.0, 1e6), "a float >= 1",
        "how many tokens the first position of each calibration sequence counts for in the "
        "layer objectives (attention sinks: every later token reads its key and value)",
        per_method={"gptq": 512.0}),
    # AWQ
    "n_grid": AlgorithmOption(
        20, ("awq",), _is_int(1, 1000), "an int in [1, 1000]",
        "grid points for the scale exponent alpha in [0, 1)"),
    "awq_objective": AlgorithmOption(
        "module", ("awq",), _is_choice("module", "layer"), "'module' or 'layer'",
        "what the alpha search minimises: the output MSE of the smallest module holding the "
        "group (attention / MLP, AutoAWQ's choice) or of the group's own linears"),
    "search_tokens": AlgorithmOption(
        4096, ("awq",), _is_int(1), "an int >= 1",
        "calibration tokens the 'module' objective replays per grid point"),
    "duo_scaling": AlgorithmOption(
        True, ("awq",), _is_bool, "a bool",
        "s = mean|x|^a / mean|w|^(1-a) instead of mean|x|^a (SmolLM2 g128, 4k tokens: "
        "25.38 vs 26.06)"),
    "clip_search": AlgorithmOption(
        True, ("awq", "gptq"), _is_bool, "a bool",
        "search a per-group shrink of the weight range: awq after scaling, on the layer's "
        "output error; gptq when a group is reached, on sum |w - q|^2.4"),
    "clip_grid": AlgorithmOption(
        20, ("awq", "gptq"), _is_int(1, 1000), "an int in [1, 1000]",
        "grid points for the clip search"),
    "clip_max_shrink": AlgorithmOption(
        0.5, ("awq", "gptq"), _is_float(0.0, 1.0, hi_open=True), "a float in [0, 1)",
        "the clip search tries ranges down to (1 - clip_max_shrink) of the original"),
    "clip_separate_ends": AlgorithmOption(
        True, ("awq", "gptq"), _is_bool, "a bool",
        "asymmetric formats: after the joint ratio, also search each end of a group's range "
        "on its own, the other held at its best (AWQ on SmolLM2 int4 g128, 16k tokens: 27.53 "
        "with, 27.86 without)"),
    "clip_coupled": AlgorithmOption(
        2, ("awq",), _is_int(0, 100), "an int in [0, 100]",
        "after the clip search, this many passes over the groups re-choosing each row's clip "
        "ratios against the whole layer objective (the other groups' errors included through "
        "the off-diagonal blocks of X^T X); SmolLM2 int4, 16k tokens: 2 passes g128 27.03 "
        "(27.26 without, same day), g64 25.90 (26.37 without), at about 1.5x the AWQ time"),
    "bias_correction": AlgorithmOption(
        True, ("awq",), _is_bool, "a bool",
        "after quantizing a layer, add (W - Q) @ mean(x) to its bias (mean over the calibration "
        "tokens, each sequence's first position left out; a bias is added to layers that had "
        "none), and search scales and clips for the error left after that correction "
        "(SmolLM2 int4, 16k tokens: g128 27.05 vs 27.53, g64 26.37 vs 26.48)"),
    "clip_skip": AlgorithmOption(
        (), ("awq",), _is_names, "a tuple of module-name globs",
        "layers the clip search leaves alone (e.g. ('q_proj', 'k_proj'), AutoAWQ's choice; "
        "clipping them too measured better on SmolLM2: 24.94 vs 25.38 at g128, 4k tokens)"),
    # LLM.int8
    "outlier_threshold": AlgorithmOption(
        6.0, ("llm.int8",), _is_float(0.0, math.inf, lo_open=True, hi_open=True),
        "a finite float > 0",
        "input columns whose activation magnitude exceeds this go through a float path"),
}

# The standard format keys (what plan.choices and the report use); others come from
# quantize_weight's signature (e.g. a format option added later) and are passed through.
STANDARD_FORMAT_KEYS = ("format", "group_size", "symmetric", "double_quant")


def format_option_names() -> Tuple[str, ...]:
    """The keyword options of ``lowbit.quantize_weight`` (so a new format option works here
    as soon as quantize_weight takes it)."""
    from ..ops import quantize_weight
    sig = inspect.signature(quantize_weight)
    return tuple(p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def resolve_format(options: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Validate format options ``{"format": name, **quantize_weight keywords}`` and return them
    complete: the standard keys resolved to the values quantize_weight will use (group_size
    as an int, symmetric as a bool, ...), extra keys kept as given. Raises ValueError naming
    ``where`` on a bad value or combination (checked by quantizing a tiny zero weight, so the
    rules are exactly quantize_weight's)."""
    from ..ops import quantize_weight
    prefix = f"{where}: " if where else ""
    opts = dict(options)
    fmt = opts.pop("format", None)
    if fmt is None:
        raise ValueError(f"{prefix}format options need a 'format'")
    try:
        spec = F.get_format(fmt)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None
    known = format_option_names()
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"{prefix}unknown format option(s) {unknown} for {spec.name}; "
                         f"expected some of {sorted(known)}")
    probe_opts = {k: v for k, v in opts.items() if v is not None}
    try:
        qw = quantize_weight(torch.zeros(2, 32), spec.name, **probe_opts)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{prefix}{e}") from None
    out = {"format": qw.fmt, "group_size": qw.group_size, "symmetric": qw.symmetric,
           "double_quant": qw.double_quant}
    for k, v in probe_opts.items():
        if k not in out:
            out[k] = v
    return out


def format_kwargs(options: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """Resolved format options -> (format name, quantize_weight keyword arguments)."""
    kw = dict(options)
    return kw.pop("format"), kw


def describe_format(options: Optional[Dict[str, Any]]) -> str:
    """'int4 asym g128', 'nf4 b64 dq', 'int8 per-row', 'float' (None)."""
    if options is None:
        return "float"
    fmt = options["format"]
    spec = F.get_format(fmt)
    s = fmt
    if spec.has_zero_point:
        s += " sym" if options.get("symmetric") else " asym"
        if not options.get("symmetric") and options.get("zero_point") == "float":
            s += " fzero"
    g = options.get("group_size")
    if g == -1:
        s += " per-row"
    elif g is not None:
        s += f" b{g}" if spec.has_codebook else f" g{g}"
    if options.get("double_quant"):
        s += " dq"
    return s


# ---- rules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    pattern: Union[str, "re.Pattern"]
    action: Optional[Dict[str, Any]]  # None = skip; else the rule's own format options
    index: int  # position in the user's list (-1 for a built-in rule)

    def matches(self, name: str) -> bool:
        if isinstance(self.pattern, re.Pattern):
            return self.pattern.fullmatch(name) is not None
        if fnmatch.fnmatchcase(name, self.pattern):
            return True
        return fnmatch.fnmatchcase(name, "*." + self.pattern)

    def describe(self) -> str:
        p = self.pattern
        return f"re:{p.pattern}" if isinstance(p, re.Pattern) else p


def _parse_rules(rules) -> List[Rule]:
    if rules is None:
        items: List[Tuple[Any, Any]] = []
    elif isinstance(rules, dict):
        items = list(rules.items())
    elif isinstance(rules, (list, tuple)):
        items = []
        for i, r in enumerate(rules):
            if not (isinstance(r, (list, tuple)) and len(r) == 2):
                raise ValueError(f"rules[{i}] must be a (pattern, action) pair, got {r!r}")
            items.append((r[0], r[1]))
    else:
        raise TypeError(f"rules must be a list of (pattern, action) pairs or a dict, "
                        f"got {type(rules).__name__}")
    out = []
    for i, (pat, action) in enumerate(items):
        where = f"rules[{i}] ({pat!r})"
        if isinstance(pat, re.Pattern):
            pattern: Any = pat
        elif isinstance(pat, str) and pat:
            if pat.startswith("re:"):
                try:
                    pattern = re.compile(pat[3:])
                except re.error as e:
                    raise ValueError(f"{where}: invalid regular expression: {e}") from None
            else:
                pattern = pat
        else:
            raise ValueError(f"{where}: a pattern must be a non-empty string or a re.Pattern")
        if action is None or action is False or (isinstance(action, str) and action in SKIP_ACTIONS):
            act = None
        elif isinstance(action, str):
            act = {"format": action}
        elif isinstance(action, dict):
            if not action:
                raise ValueError(f"{where}: an empty dict is not an action; use 'skip' or format options")
            bad = [k for k in action if not isinstance(k, str)]
            if bad:
                raise ValueError(f"{where}: option names must be strings, got {bad!r}")
            act = dict(action)
        else:
            raise ValueError(f"{where}: the action must be 'skip', None, a format name or a dict of "
                             f"format options, got {action!r}")
        out.append(Rule(pattern, act, i))
    return out


# ---- the config ---------------------------------------------------------------------------
class QuantConfig:
    """How :func:`lowbit.quantize_model` quantizes a model.

    ``QuantConfig(format="int4", group_size=None, symmetric=None, double_quant=False,
    method="rtn", rules=None, max_bits_per_weight=None, **options)``

    * ``format`` and its options: as :func:`lowbit.quantize_weight` takes them (None = that
      format's default); other quantize_weight keywords may be passed as ``options`` too.
      ``format`` defaults to "int4", or "int8" for method "llm.int8".
    * ``method``: "rtn" (round to nearest), "gptq", "awq" or "llm.int8"; the last three need
      calibration data.
    * ``rules``: per-module formats or skips (module docstring); lm_head is skipped unless a
      rule names it.
    * ``max_bits_per_weight``: a budget (scales and zeros counted) for automatic per-layer
      mixed precision, planned on calibration data.
    * algorithm options (``ALGORITHM_OPTIONS``: name, default, the methods it applies to), e.g.
      ``damp_percent=0.01, act_order=True`` (gptq), ``n_grid=20, clip_search=True`` (awq),
      ``outlier_threshold=6.0`` (llm.int8). An option for another method is an error.

    Every value is checked here, so a bad config fails before any model work starts.
    """

    def __init__(self, format: Optional[str] = None, group_size: Optional[int] = None,
                 symmetric: Optional[bool] = None, double_quant: bool = False,
                 method: str = "rtn", rules=None, max_bits_per_weight: Optional[float] = None,
                 **options):
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
        self.method = method
        if format is None:
            format = "int8" if method == "llm.int8" else "int4"
        fmt_names = set(format_option_names())
        fmt_extra = {k: v for k, v in options.items() if k in fmt_names}
        algo = {k: v for k, v in options.items() if k not in fmt_names}
        unknown = sorted(k for k in algo if k not in ALGORITHM_OPTIONS)
        if unknown:
            raise ValueError(f"unknown QuantConfig option(s) {unknown}; format options are "
                             f"{sorted(fmt_names)}, algorithm options {sorted(ALGORITHM_OPTIONS)}")
        for k, v in algo.items():
            row = ALGORITHM_OPTIONS[k]
            if method not in row.methods:
                raise ValueError(f"option {k!r} applies to method {' / '.join(row.methods)}, "
                                 f"not {method!r}")
            if not row.check(v):
                raise ValueError(f"option {k!r} must be {row.expect}, got {v!r}")
        self.options: Dict[str, Any] = {k: row.default_for(method) for k, row in
                                        ALGORITHM_OPTIONS.items() if method in row.methods}
        self.options.update(algo)
        if "clip_skip" in self.options:
            self.options["clip_skip"] = tuple(self.options["clip_skip"])

        default = {"format": format, "group_size": group_size, "symmetric": symmetric,
                   "double_quant": double_quant, **fmt_extra}
        self.default_format: Dict[str, Any] = resolve_format(default, "QuantConfig")
        self._default_given = {k: v for k, v in default.items() if v is not None and
                               not (k == "double_quant" and v is False)}

        self.rules: List[Rule] = _parse_rules(rules)
        self._rule_formats: List[Optional[Dict[str, Any]]] = [
            None if r.action is None else self._resolve_rule(r) for r in self.rules]
        self._builtin = [Rule(p, None if a == "skip" else {"format": a}, -1) for p, a in DEFAULT_RULES]

        if max_bits_per_weight is not None:
            if (isinstance(max_bits_per_weight, bool) or not isinstance(max_bits_per_weight, (int, float))
                    or not math.isfinite(max_bits_per_weight) or max_bits_per_weight <= 0):
                raise ValueError(f"max_bits_per_weight must be a positive number of bits, "
                                 f"got {max_bits_per_weight!r}")
            if method == "llm.int8":
                raise ValueError("max_bits_per_weight (mixed precision) works with methods rtn, gptq "
                                 "and awq, not llm.int8")
            max_bits_per_weight = float(max_bits_per_weight)
            if method == "gptq" and self.options.get("act_order"):
                # A perm (act-order groups in processing order) costs 64 bits per input
                # feature, which the plan's budget does not count: use the group map.
                if algo.get("act_groups") == "order":
                    raise ValueError("act_groups='order' stores a perm whose bits the "
                                     "max_bits_per_weight plan does not count; use "
                                     "act_groups='input' (the default under a budget)")
                self.options["act_groups"] = "input"
        self.max_bits_per_weight = max_bits_per_weight

        if method == "llm.int8":
            for fmt_opts, where in [(self.default_format, "format")] + [
                    (f, f"rules[{r.index}]") for r, f in zip(self.rules, self._rule_formats)]:
                if fmt_opts is not None and fmt_opts["format"] != "int8":
                    raise ValueError(f"method 'llm.int8' quantizes to int8; {where} asks for "
                                     f"{fmt_opts['format']!r}")

    # ---- attributes -------------------------------------------------------------------
    @property
    def format(self) -> str:
        return self.default_format["format"]

    @property
    def group_size(self) -> int:
        return self.default_format["group_size"]

    @property
    def symmetric(self) -> bool:
        return self.default_format["symmetric"]

    @property
    def double_quant(self) -> bool:
        return self.default_format["double_quant"]

    @property
    def needs_calibration(self) -> bool:
        return self.method in NEEDS_CALIBRATION or self.max_bits_per_weight is not None

    def __getattr__(self, name):
        # Algorithm options read as attributes: config.damp_percent, config.n_grid, ...
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        if name in ALGORITHM_OPTIONS:
            raise AttributeError(f"option {name!r} does not apply to method {self.__dict__.get('method')!r}")
        raise AttributeError(f"'QuantConfig' object has no attribute {name!r}")

    def _resolve_rule(self, rule: Rule) -> Dict[str, Any]:
        action = dict(rule.action)
        fmt = action.get("format", self.format)
        base = dict(self._default_given) if fmt == self.format else {}
        base["format"] = fmt
        base.update(action)
        return resolve_format(base, f"rules[{rule.index}] ({rule.describe()!r})")

    # ---- per-module decisions ----------------------------------------------------------
    def match(self, name: str, head: Optional[str] = None) -> Tuple[Optional[Dict[str, Any]], str]:
        """(format options or None for skip, which rule decided) for a module name. ``head``:
        the name of the model's output embeddings (see :func:`output_head_name`), skipped like
        ``lm_head`` whatever it is called, unless a rule names it."""
        for rule, fmt in zip(self.rules, self._rule_formats):
            if rule.matches(name):
                return (None if fmt is None else dict(fmt)), f"rules[{rule.index}] {rule.describe()!r}"
        for rule in self._builtin:
            if rule.matches(name):
                return None, f"default rule {rule.describe()!r}"
        if head is not None and name == head:
            return None, "default: the model's output embeddings (as lm_head)"
        return dict(self.default_format), "default"

    def layer_options(self, name: str) -> Optional[Dict[str, Any]]:
        """The format options for the Linear ``name``, or None if it stays in float."""
        return self.match(name)[0]

    def targets(self, model: nn.Module) -> Dict[str, Tuple[nn.Linear, Dict[str, Any]]]:
        """``{name: (module, format options)}`` for every nn.Linear (or transformers Conv1D) of
        ``model`` that the rules do not skip, in module order (nn.Linear subclasses that keep
        its forward included; already quantized layers are not nn.Linear and are left alone)."""
        from ..nn import is_linear_like
        out = {}
        head = output_head_name(model)
        for name, mod in model.named_modules():
            if is_linear_like(mod):
                opts = self.match(name, head)[0]
                if opts is not None:
                    out[name] = (mod, opts)
        return out

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable description (regex rules as 're:...' strings)."""
        rules = [[r.describe(), "skip" if r.action is None else dict(r.action)] for r in self.rules]
        return {"method": self.method, **self.default_format, "rules": rules,
                "max_bits_per_weight": self.max_bits_per_weight, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantConfig":
        d = dict(d)
        options = d.pop("options", {}) or {}
        return cls(**d, **options)

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = [f"method={self.method!r}", f"format={describe_format(self.default_format)!r}"]
        if self.rules:
            parts.append(f"rules={[(r.describe(), 'skip' if r.action is None else r.action) for r in self.rules]!r}")
        if self.max_bits_per_weight is not None:
            parts.append(f"max_bits_per_weight={self.max_bits_per_weight}")
        changed = {k: v for k, v in self.options.items()
                   if v != ALGORITHM_OPTIONS[k].default_for(self.method)}
        if changed:
            parts.append(", ".join(f"{k}={v!r}" for k, v in changed.items()))
        return f"QuantConfig({', '.join(parts)})"
