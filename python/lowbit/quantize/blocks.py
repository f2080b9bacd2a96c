"""Running a model block by block on calibration data (shared by GPTQ and AWQ).

Transformers stack identical decoder blocks in one nn.ModuleList (``model.model.layers`` for
Llama / Mistral / Qwen). :func:`find_block_list` finds that list generically: the ModuleList
holding the most target Linears. The inputs of its first block are captured once for every
calibration batch (the model is run until the first block is called, then stopped), and each
block's outputs, computed after the block is quantized, become the next block's inputs, so
every block is calibrated on the activations of the already-quantized model before it.
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
        if "use_cache" in params:
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


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, calib: Sequence[Dict[str, Any]]) -> List[BlockInput]:
    """Run the model on each calibration batch until ``block`` is called; its arguments."""
    captured: List[BlockInput] = []

    def hook(module, args, kwargs):
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise StopForward

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, kw in enumerate(calib):
            n = len(captured)
            try:
                call_model(model, kw)
            except StopForward:
                pass
            if len(captured) != n + 1:
                raise RuntimeError(f"calibration batch {i} never reached the first block; cannot "
                                   "calibrate block by block")
    finally:
        h.remove()
    return captured


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
    form a last group of their own."""
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
    missing = [n for n in linears if not any(n in g for g in groups)]
    if missing:
        groups.append(missing)
    return groups


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
