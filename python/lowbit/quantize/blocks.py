"""Running a model block by block on calibration data (shared by GPTQ and AWQ).

Transformers stack identical decoder blocks in one nn.ModuleList (``model.model.layers`` for
Llama / Mistral / Qwen). :func:`find_block_list` finds that list generically: the ModuleList
holding the most target Linears. The inputs of its first block are captured once for every
calibration batch (the model is run until the first block is called, then stopped), and each
block's outputs, computed after the block is quantized, become the next block's inputs, so
every block is calibrated on the activations of the already-quantized model before it. The
other arguments of a block's call (masks, rotary tables, its index) are the first block's when
every block is called alike (checked on one whole-model run); otherwise each block's own are
captured from whole-model runs (:class:`BlockCalls`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    return v


def call_model(model: nn.Module, kw: Dict[str, Any]):
    """``model(**kw)`` with tensors moved to the model's device and the KV cache off."""
    device = model_device(model)
    kw = {k: _to_device(v, device) for k, v in kw.items()}
    if "use_cache" not in kw:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # transformers models may take use_cache through **kwargs (their config has it)
        if "use_cache" in params or (takes_kwargs and hasattr(getattr(model, "config", None), "use_cache")):
            kw["use_cache"] = False
    try:
        return model(**kw)
    except (TypeError, ValueError) as e:
        given = ", ".join(f"{k}={_describe(v)}" for k, v in kw.items() if k != "use_cache")
        raise ValueError(
            f"the model failed on a calibration batch, called as model({given}): {e}. A "
            "token-id tensor is passed as input_ids; a model that needs other inputs (e.g. "
            "decoder_input_ids for an encoder-decoder model) takes calibration batches as dicts "
            "of keyword arguments") from e


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"<{str(v.dtype).replace('torch.', '')} tensor {list(v.shape)}>"
    return type(v).__name__


def find_block_list(model: nn.Module, target_names: Iterable[str]) -> Optional[Tuple[str, nn.ModuleList]]:
    """(name, ModuleList) of the list of blocks holding the most targets (the outermost on a
    tie), or None if no ModuleList holds any."""
    names = list(target_names)
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not name:
            continue
        n = sum(1 for t in names if t.startswith(name + "."))
        if n > best_n:
            best, best_n = (name, mod), n
    return best


@dataclass
class BlockInput:
    """One calibration batch's call of a block: ``block(*args, **kwargs)``."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        if self.args and isinstance(self.args[0], torch.Tensor):
            return self.args[0]
        h = self.kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor):
            raise RuntimeError("cannot find the hidden states among the block's inputs "
                               "(neither the first positional argument nor 'hidden_states')")
        return h

    def with_hidden(self, h: torch.Tensor) -> "BlockInput":
        if self.args and isinstance(self.args[0], torch.Tensor):
            return BlockInput((h,) + tuple(self.args[1:]), self.kwargs)
        kw = dict(self.kwargs)
        kw["hidden_states"] = h
        return BlockInput(self.args, kw)


def first_tensor(out) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple/list, or
    ``last_hidden_state`` / ``hidden_states`` of a ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for key in ("last_hidden_state", "hidden_states", "logits"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError(f"cannot find the output tensor of a block (got {type(out).__name__})")


def _is_cache(v) -> bool:
    """A key/value or state cache object (transformers' DynamicCache, HybridCache, MambaCache,
    ...): calibration runs without one, else replaying a block would grow or reuse it."""
    return not isinstance(v, torch.Tensor) and type(v).__name__.endswith("Cache")


def _without_caches(inp: BlockInput) -> BlockInput:
    if not any(_is_cache(v) for v in list(inp.args) + list(inp.kwargs.values())):
        return inp
    return BlockInput(tuple(None if _is_cache(v) else v for v in inp.args),
                      {k: None if _is_cache(v) else v for k, v in inp.kwargs.items()})


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


_NO_HIDDEN = torch.empty(0)


class BlockCalls:
    """The first block's inputs for every calibration batch, and, when the blocks are not all
    called alike, each block's own other arguments: a sliding-window and a global layer get
    different masks and rotary tables (Gemma 2/3, Cohere 2), a block its own index (Zamba 2),
    T5's first block computes a position bias the later ones receive."""

    def __init__(self, first: List[BlockInput], per_block: Optional[List[List[BlockInput]]]):
        self.first = first
        self.per_block = per_block  # per block, per batch: the call with its hidden states left out

    def inputs_for(self, index: int, inputs: Sequence[BlockInput]) -> List[BlockInput]:
        """``inputs`` (hidden states from the previous block) with block ``index``'s own
        other arguments."""
        if self.per_block is None or index == 0:
            return list(inputs)
        return [t.with_hidden(inp.hidden) for t, inp in zip(self.per_block[index], inputs)]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: Sequence[nn.Module],
                         calib: Sequence[Dict[str, Any]]) -> BlockCalls:
    """Every calibration batch's call of the first block (the model run until that call) and,
    if the blocks' calls differ in anything besides the hidden states (checked on the first
    batch, which runs the whole model), every block's call for every batch (whole-model runs).
    Cache objects among the arguments are replaced by None."""
    first: List[BlockInput] = []
    per: List[List[BlockInput]] = [[] for _ in layers]
    state = {"full": True}

    def make_hook(i):
        def hook(module, args, kwargs):
            inp = _without_caches(BlockInput(tuple(args), dict(kwargs)))
            if i == 0:
                first.append(inp)
                if not state["full"]:
                    raise StopForward
            elif state["full"]:
                per[i].append(inp.with_hidden(_NO_HIDDEN))
        return hook

    handles = [blk.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, blk in enumerate(layers)]
    try:
        for i, kw in enumerate(calib):
            n = len(first)
            counts = [len(p) for p in per] if per is not None else []
            try:
                call_model(model, kw)
            except StopForward:
                pass
            if len(first) != n + 1:
                raise RuntimeError(f"calibration batch {i} never reached the first block; cannot "
                                   "calibrate block by block")
            if i == 0 and state["full"]:
                once = all(len(p) == c + 1 for p, c in zip(per[1:], counts[1:]))
                ref = first[0].with_hidden(_NO_HIDDEN)
                if not once or all(_same_call(p[0], ref) for p in per[1:]):
                    state["full"] = False  # every block called alike (or not once each)
                    per = None
    finally:
        for h in handles:
            h.remove()
    return BlockCalls(first, per)


def _same_call(a: BlockInput, b: BlockInput) -> bool:
    return _same(a.args[1:] if a.args else (), b.args[1:] if b.args else ()) and _same(
        {k: v for k, v in a.kwargs.items() if k != "hidden_states"},
        {k: v for k, v in b.kwargs.items() if k != "hidden_states"})


@torch.no_grad()
def run_block(block: nn.Module, inputs: Sequence[BlockInput]) -> List[BlockInput]:
    """The block applied to every batch; its outputs wrapped as the next block's inputs."""
    return [inp.with_hidden(first_tensor(block(*inp.args, **inp.kwargs))) for inp in inputs]


@torch.no_grad()
def run_hooked(block: nn.Module, inputs: Sequence[BlockInput], modules: Dict[str, nn.Module],
               fn: Callable[[str, torch.Tensor, int], None], stop_after: Optional[str] = None,
               stop_before: Optional[str] = None) -> None:
    """Run ``block`` on every batch calling ``fn(name, x, batch_index)`` with the input of each
    module in ``modules`` as it is called; stop a batch's forward once ``stop_after`` ran, or
    as soon as ``stop_before`` is called (after ``fn`` saw its input, before it computes)."""
    state = {"batch": 0}
    handles = []
    for name, mod in modules.items():
        if name == stop_before:
            def pre(module, args, name=name):
                fn(name, args[0], state["batch"])
                raise StopForward
            handles.append(mod.register_forward_pre_hook(pre))
            continue

        def hook(module, args, output, name=name):
            fn(name, args[0], state["batch"])
            if name == stop_after:
                raise StopForward
        handles.append(mod.register_forward_hook(hook))
    try:
        for i, inp in enumerate(inputs):
            state["batch"] = i
            try:
                block(*inp.args, **inp.kwargs)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def linear_groups(block: nn.Module, inp: BlockInput, linears: Dict[str, nn.Module]) -> List[List[str]]:
    """The block's linears grouped by shared input, in call order (e.g. [[q, k, v], [o],
    [gate, up], [down]] for a Llama block), from one forward on ``inp``. Linears never called
    come last, a group each."""
    seen: List[Tuple[str, torch.Tensor]] = []
    run_hooked(block, [inp], linears, lambda name, x, b: seen.append((name, x)))
    groups: List[List[str]] = []
    group_inputs: List[torch.Tensor] = []
    for name, x in seen:
        if any(name in g for g in groups):
            continue  # a module called twice belongs to its first group
        for g, gx in zip(groups, group_inputs):
            if x is gx:
                g.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(x)
    # linears never called: a group each (their widths may differ)
    groups.extend([n] for n in linears if not any(n in g for g in groups))
    return groups


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
