"""lowbit's own checkpoints: :func:`save` and :func:`load`.

File format (one ``.safetensors`` file, readable by any safetensors reader)
--------------------------------------------------------------------------
* Tensors: every parameter and buffer of the model under its ``state_dict`` name, as stored
  (QuantLinear: ``<layer>.weight_data``, ``.weight_scales`` and, where the layer has them,
  ``.weight_zeros`` / ``.weight_dq_scale`` / ``.weight_dq_offset`` / ``.weight_perm`` /
  ``.weight_input_scale``; float layers: ``.weight`` / ``.bias``), plus the model's
  non-persistent buffers (e.g. rotary ``inv_freq``) so that a model built on the meta device
  gets them back exactly. A tensor shared by several names (tied ``lm_head.weight`` and
  ``model.embed_tokens.weight``) is stored once; the other names are recorded as aliases.
* Header metadata (safetensors' string map):
  ``"lowbit.format_version"``: ``"1"`` (checked first, so a future layout is refused by
  version, not by a confusing parse error) and ``"lowbit"``: a JSON document::

      {"format_version": 1, "lowbit_version": "0.1.0",
       "layers": {"model.layers.0.mlp.up_proj":
                     {"class": "QuantLinear", "bias": false,
                      "state": {"lowbit_version": 1, "fmt": "int4", "shape": [1536, 576],
                                "group_size": 128, "symmetric": false, "double_quant": false,
                                "has_perm": false, "has_input_scale": false}}, ...},
       "aliases": {"lm_head.weight": "model.embed_tokens.weight"},
       "non_persistent": ["model.rotary_emb.inv_freq", ...],
       "extra_state": {},            # other modules' JSON-serialisable get_extra_state()
       "module_flags": {"rwkv": {"layers_are_rescaled": true}},  # WEIGHT_STATE_FLAGS, set on load
       "crc32": {"<tensor name>": <zlib.crc32 of its bytes>, ...}}

  ``state`` is the layer's ``get_extra_state()`` (``QuantizedWeight.config()`` plus a version).

Loading builds the model's skeleton on the meta device (no float weight is ever allocated),
swaps each recorded layer for an empty QuantLinear of the recorded format, then reads the
tensors one by one (``readinto``, no mapping of the file) into freshly allocated, 64-byte
aligned memory: resident memory grows by the tensors read and nothing else, so the peak is the
quantized model plus the (meta) skeleton's bookkeeping. Every tensor's bytes are checked
against the recorded CRC-32 (tensors are little-endian, as safetensors specifies). Nothing in the file is
executed: the header is JSON and the tensors raw bytes (no pickle anywhere).

Saving writes a temporary file next to the target, fsyncs it, and renames it over the target
(``os.replace``, atomic on POSIX and Windows), so an interrupted save leaves the previous file
intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Callable, Dict, List, Tuple, Union

import torch
from torch import nn

FORMAT_VERSION = 1
VERSION_KEY = "lowbit.format_version"
DOC_KEY = "lowbit"

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A lowbit checkpoint that cannot be loaded: not a lowbit file, truncated or corrupted,
    an unknown format version, or tensors / layers that do not match the model."""


# ---- layer classes ------------------------------------------------------------------------
def _layer_classes() -> Dict[str, type]:
    """The module classes a checkpoint may name (a fixed allow-list: a file never chooses
    what code runs). Keys are what ``layers[...]["class"]`` holds."""
    from ..nn import QuantLinear
    return {"QuantLinear": QuantLinear}


def _class_key(mod: nn.Module) -> str:
    for key, cls in _layer_classes().items():
        if type(mod) is cls:
            return key
    raise TypeError(f"cannot save a {type(mod).__module__}.{type(mod).__qualname__}: lowbit "
                    f"checkpoints hold these layer classes: {sorted(_layer_classes())}")


def _is_lowbit_layer(mod: nn.Module) -> bool:
    from ..nn import QuantLinear
    return isinstance(mod, QuantLinear)


# ---- helpers ------------------------------------------------------------------------------
def _crc32(t: torch.Tensor) -> int:
    """CRC-32 of a CPU contiguous tensor's bytes."""
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) & 0xFFFFFFFF


def _slots(model: nn.Module):
    """(full name, module, attribute, is_parameter, persistent) for every tensor slot of the
    model, shared modules and tied tensors listed under every name."""
    out = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = prefix + "." if prefix else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((pre + attr, mod, attr, True, True))
        for attr, b in mod._buffers.items():
            if b is not None:
                out.append((pre + attr, mod, attr, False, attr not in mod._non_persistent_buffers_set))
    return out


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_dir(d: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows: os.replace is durable enough there; directories cannot be opened
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to produce the file at a temporary path in ``path``'s directory,
    fsync it, then rename it over ``path``. On any failure the temporary file is removed and
    ``path`` is untouched."""
    # a symlink is followed (its target is replaced, the link kept)
    path = os.path.realpath(os.path.abspath(os.fspath(path)))
    d, base = os.path.split(path)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"cannot save to {path}: directory {d} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path}: it is a directory")
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{base}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:  # an existing file keeps its mode; a new one gets a normal file's (mkstemp: 0600)
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


# ---- save ---------------------------------------------------------------------------------
WEIGHT_STATE_FLAGS = ("layers_are_rescaled",)  # transformers' RWKV (see save)


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model`` (quantized with lowbit or not) to ``path`` as a lowbit checkpoint.

    Every parameter and buffer is stored as is (packed codes, scales, zeros, input transforms,
    float layers, non-persistent buffers); each QuantLinear's format settings go to the JSON
    header (see the module docstring). Tensors shared between names are stored once. The write
    is atomic: a temporary file in the same directory, fsynced, then renamed over ``path``.
    Load it back with :func:`load`.
    """
    from safetensors.torch import save_file

    import lowbit

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    from ..moe import QuantExperts
    layers: Dict[str, dict] = {}
    experts: Dict[str, dict] = {}
    extra: Dict[str, object] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            experts[name] = {"class": "QuantExperts", "num_experts": mod.num_experts}
        if _is_lowbit_layer(mod):
            try:  # never write a file that load() would refuse
                mod.qweight.validate()
            except (ValueError, TypeError) as e:
                raise ValueError(f"cannot save layer {name!r}: {e}") from None
            layers[name] = {"class": _class_key(mod), "bias": mod.bias is not None,
                            "state": mod.get_extra_state()}
        elif type(mod).get_extra_state is not nn.Module.get_extra_state:
            state = mod.get_extra_state()
            try:
                json.dumps(state)
            except (TypeError, ValueError):
                raise TypeError(f"module {name!r} ({type(mod).__name__}) has extra state that is not "
                                "JSON-serialisable; lowbit checkpoints store no pickled objects") from None
            extra[name] = state

    # module flags that say the stored weights were already transformed in place (RWKV scales
    # two weights per block for inference and marks it): restored on load, so the fresh model
    # does not apply the transformation a second time
    flags = {name: {a: getattr(mod, a) for a in WEIGHT_STATE_FLAGS
                    if isinstance(getattr(mod, a, None), bool)}
             for name, mod in model.named_modules()}
    flags = {k: v for k, v in flags.items() if v}

    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    non_persistent: List[str] = []
    by_identity: Dict[tuple, str] = {}
    storages = set()
    for name, mod, attr, is_param, persistent in _slots(model):
        t = mod._parameters[attr] if is_param else mod._buffers[attr]
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name!r}: it is on the meta device (never materialised)")
        if not persistent:
            non_persistent.append(name)
        key = (t.device, t.untyped_storage().data_ptr() if t.numel() else id(t), t.storage_offset(),
               tuple(t.shape), t.stride(), t.dtype)
        if key in by_identity:
            aliases[name] = by_identity[key]
            continue
        by_identity[key] = name
        c = t.detach().to("cpu").contiguous()
        if c.numel():
            ptr = c.untyped_storage().data_ptr()
            if ptr in storages or c.untyped_storage().nbytes() != c.numel() * c.element_size():
                c = c.clone()  # views of one storage: safetensors wants each tensor on its own
            storages.add(c.untyped_storage().data_ptr())
        tensors[name] = c
    doc = {"format_version": FORMAT_VERSION, "lowbit_version": lowbit.__version__,
           "layers": layers, "experts": experts, "aliases": aliases, "non_persistent": non_persistent,
           "extra_state": extra, "module_flags": flags,
           "crc32": {k: _crc32(v) for k, v in tensors.items()}}
    metadata = {"format": "pt", VERSION_KEY: str(FORMAT_VERSION), DOC_KEY: json.dumps(doc)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---- reading the header -------------------------------------------------------------------
def _open(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' SafetensorError and friends: header unreadable
        raise CheckpointError(f"{path}: not a readable safetensors file, or truncated or corrupted "
                              f"({type(e).__name__}: {e})") from None


# safetensors dtype codes -> torch dtypes (the ones torch has).
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
           "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
           "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: PathLike) -> Tuple[dict, Dict[str, dict]]:
    """The lowbit JSON document of a checkpoint and ``{tensor name: {"dtype", "shape",
    "offsets"}}`` (offsets: absolute byte range in the file), after every check that needs no
    tensor data. safetensors validates the header (offsets, shapes, file size); lowbit then
    checks its own metadata. Raises :class:`CheckpointError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a lowbit checkpoint file")
    with _open(path) as f:
        meta = f.metadata() or {}
        listed = {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape()))
                  for k in f.keys()}
    if DOC_KEY not in meta and VERSION_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a lowbit checkpoint (no "
                              f"{VERSION_KEY!r} metadata); for other tools' checkpoints use "
                              "lowbit.load_checkpoint")
    ver = meta.get(VERSION_KEY)
    if ver is None or not ver.strip().isdigit():
        raise CheckpointError(f"{path}: unreadable lowbit format version {ver!r} (corrupted header?)")
    if int(ver) != FORMAT_VERSION:
        newer = int(ver) > FORMAT_VERSION
        raise CheckpointError(f"{path}: lowbit checkpoint format version {int(ver)} "
                              + ("is newer than this lowbit reads" if newer else "is unknown")
                              + f" (this lowbit reads version {FORMAT_VERSION})"
                              + ("; upgrade lowbit" if newer else ""))
    try:
        doc = json.loads(meta.get(DOC_KEY, ""))
    except ValueError as e:
        raise CheckpointError(f"{path}: the lowbit metadata is not valid JSON ({e}); the header "
                              "is corrupted") from None
    info = _tensor_offsets(path, listed)
    _check_doc(doc, info, path)
    return doc, info


def _tensor_offsets(path: str, listed: Dict[str, tuple]) -> Dict[str, dict]:
    """Byte ranges of the tensors, from the safetensors header (an 8-byte little-endian
    length, then that many bytes of JSON: {name: {dtype, shape, data_offsets}}, then the data),
    which safe_open has already validated; cross-checked against what safe_open listed."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    start = 8 + n
    info = {}
    for k, e in header.items():
        if k == "__metadata__":
            continue
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {e['dtype']}, which torch lacks")
        a, b = e["data_offsets"]
        info[k] = {"dtype": dtype, "shape": list(e["shape"]), "offsets": (start + a, start + b)}
    if {k: (v["shape"]) for k, v in info.items()} != {k: v[1] for k, v in listed.items()}:
        raise CheckpointError(f"{path}: inconsistent safetensors header")
    return info


def _check_doc(doc, info: dict, path: str) -> None:
    def bad(what):
        raise CheckpointError(f"{path}: corrupted lowbit metadata: {what}")

    if not isinstance(doc, dict):
        bad("not a JSON object")
    if doc.get("format_version") != FORMAT_VERSION:
        bad(f"format_version {doc.get('format_version')!r} disagrees with {VERSION_KEY}")
    for key, typ in (("layers", dict), ("aliases", dict), ("non_persistent", list),
                     ("extra_state", dict), ("crc32", dict)):
        if not isinstance(doc.get(key), typ):
            bad(f"{key!r} missing or not a {typ.__name__}")
    if not isinstance(doc.get("module_flags", {}), dict) or not all(
            isinstance(v, dict) for v in doc.get("module_flags", {}).values()):
        bad("'module_flags' not an object of objects")
    classes = _layer_classes()
    for name, layer in doc["layers"].items():
        if not isinstance(layer, dict) or not isinstance(layer.get("state"), dict) \
                or not isinstance(layer.get("bias"), bool):
            bad(f"layer {name!r} has no valid description")
        if layer.get("class") not in classes:
            raise CheckpointError(f"{path}: layer {name!r} has class {layer.get('class')!r}, which "
                                  f"this lowbit does not know (known: {sorted(classes)})")
    for alias, target in doc["aliases"].items():
        if not isinstance(target, str) or target not in info:
            bad(f"alias {alias!r} points to {target!r}, which is not a tensor of the file")
        if alias in info:
            bad(f"{alias!r} is both a tensor and an alias")
    crc = doc["crc32"]
    if set(crc) != set(info):
        missing = sorted(set(info) - set(crc))[:5]
        extra = sorted(set(crc) - set(info))[:5]
        bad(f"the checksum table does not match the tensors (no checksum for {missing}, "
            f"checksum for absent {extra})")
    if not all(isinstance(v, int) for v in crc.values()):
        bad("non-integer checksum")


# ---- load ---------------------------------------------------------------------------------
def _build(model_or_builder) -> nn.Module:
    if isinstance(model_or_builder, nn.Module):
        return model_or_builder
    if not callable(model_or_builder):
        raise TypeError("load expects an nn.Module or a zero-argument callable returning one, "
                        f"got {type(model_or_builder).__name__}")
    with torch.device("meta"):  # the skeleton: shapes only, no weight memory
        model = model_or_builder()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder returned {type(model).__name__}, not an nn.Module")
    return model


def _install_experts(model: nn.Module, doc: dict, path: str) -> None:
    """Replace every fused-experts module the file records as quantized by an empty
    QuantExperts (its QuantLinear layers are then filled like any other)."""
    from ..moe import QuantExperts, is_fused_experts
    from ..quantize.blocks import replace_module
    recorded = doc.get("experts", {})
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path}: malformed 'experts' record in the header")
    for name, rec in recorded.items():
        if not isinstance(rec, dict) or rec.get("class") != "QuantExperts":
            raise CheckpointError(f"{path}: experts module {name!r}: unknown record {rec!r}")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: the checkpoint has quantized experts {name!r} but the "
                                  "model has no module of that name (a different architecture?)") from None
        if isinstance(mod, QuantExperts):
            continue
        if not is_fused_experts(mod):
            raise CheckpointError(f"{path}: the checkpoint has quantized experts at {name!r} but the "
                                  f"model has a {type(mod).__name__} there, not fused experts")
        qe = QuantExperts(mod, device="meta")
        if qe.num_experts != rec.get("num_experts"):
            raise CheckpointError(f"{path}: {name!r} has {rec.get('num_experts')} experts in the "
                                  f"checkpoint but {qe.num_experts} in the model")
        replace_module(model, name, qe)


def _install_layers(model: nn.Module, doc: dict, path: str) -> None:
    """Replace every layer the file records as quantized by an empty one of that format."""
    from ..nn import QuantLinear, is_conv1d, linear_weight
    from ..quantize.blocks import replace_module
    classes = _layer_classes()
    for name, layer in doc["layers"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: the checkpoint has a quantized layer {name!r} but the "
                                  "model has no module of that name (a different architecture?)") from None
        state = layer["state"]
        cls = classes[layer["class"]]
        try:
            shape = [int(s) for s in state["shape"]]
            if len(shape) != 2:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: layer {name!r} has no valid shape in its state") from None
        if isinstance(mod, cls):
            target = mod
        elif isinstance(mod, nn.Linear) or is_conv1d(mod):
            # an nn.Linear, or a transformers Conv1D (weight [in, out]); an nn.Linear subclass
            # with its own forward too (e.g. FalconLinear): quantize_model replaced it only
            # after checking that it computes x @ W^T + b, which the meta skeleton cannot show
            out_f, in_f = linear_weight(mod).shape
            if [out_f, in_f] != shape:
                raise CheckpointError(
                    f"{path}: layer {name!r} is [out={shape[0]}, in={shape[1]}] in the checkpoint "
                    f"but [out={out_f}, in={in_f}] in the model")
            # A quantizer may add a bias (AWQ's bias_correction): a checkpoint layer with a
            # bias fits a float layer without one; the other way round is a mismatch.
            if mod.bias is not None and not layer["bias"]:
                raise CheckpointError(f"{path}: layer {name!r} has no bias in the checkpoint but "
                                      "a bias in the model")
            if cls is not QuantLinear:
                raise CheckpointError(f"{path}: cannot build a {layer['class']} for {name!r}")
            try:
                # The format's default layout on the meta device; set_extra_state below
                # adopts the recorded options (and the final validate() checks them).
                target = QuantLinear(shape[1], shape[0], bias=layer["bias"], fmt=state.get("fmt"),
                                     device="meta")
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: layer {name!r}: invalid format settings ({e})") from None
            replace_module(model, name, target)
        else:
            raise CheckpointError(f"{path}: the checkpoint has a quantized layer at {name!r} but the "
                                  f"model has a {type(mod).__name__} there, not an nn.Linear "
                                  "(or Conv1D)")
        try:
            target.set_extra_state(state)
        except (ValueError, TypeError, KeyError, ZeroDivisionError, RuntimeError) as e:
            raise CheckpointError(f"{path}: layer {name!r}: invalid layer state "
                                  f"({type(e).__name__}: {e})") from None
    for name, mod in model.named_modules():
        if _is_lowbit_layer(mod) and name not in doc["layers"]:
            raise CheckpointError(f"{path}: the model has a quantized layer {name!r} that the "
                                  "checkpoint stores in float (load into a float model)")


def _float_or_same(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def load(path: PathLike, model_or_builder: Union[nn.Module, Callable[[], nn.Module]], *,
         device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a checkpoint written by :func:`save` into a model and return the model.

    ``model_or_builder``: the float architecture to fill, either an ``nn.Module`` (e.g. a
    transformers model, possibly on the meta device) or a zero-argument callable returning one
    (e.g. ``lambda: AutoModelForCausalLM.from_config(config)``), which is called under
    ``torch.device("meta")`` so that no weight memory is allocated. Each Linear the file stores
    quantized is replaced by a QuantLinear of the recorded format; every parameter and buffer
    is then read from the file (in its stored dtype), a few at a time, into owned memory on the
    CPU; ties between tensors (as saved, or as the model has them) are kept. The model comes
    back in evaluation mode, as transformers' ``from_pretrained`` returns one (dropout off:
    call ``.train()`` to fine-tune). ``device``: move the model there afterwards.

    Raises :class:`CheckpointError` (a ValueError) when the file is not a lowbit checkpoint, is
    truncated or corrupted (every tensor's CRC-32 is checked), has an unknown format version,
    or does not match the model (missing or unexpected tensors, other shapes). Non-persistent
    buffers (derived state such as rotary ``inv_freq``) are loaded when both sides have them; one
    only the file has is ignored, one only the model has is kept unless it is on the meta device.
    """
    if not isinstance(model_or_builder, nn.Module) and not callable(model_or_builder):
        raise TypeError("load expects an nn.Module or a zero-argument callable returning one, "
                        f"got {type(model_or_builder).__name__}")
    path = os.fspath(path)
    doc, info = read_header(path)
    if not isinstance(model_or_builder, nn.Module):
        return _load_into(path, doc, info, _build(model_or_builder), device)
    # An existing model is changed in place only if the whole load succeeds: on any error its
    # modules, parameters and buffers are put back as they were.
    saved = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers))
             for m in model_or_builder.modules()]
    try:
        return _load_into(path, doc, info, _build(model_or_builder), device)
    except BaseException:
        for m, d, mods, params, bufs in saved:
            m.__dict__.clear()
            m.__dict__.update(d)
            for live, old in ((m._modules, mods), (m._parameters, params), (m._buffers, bufs)):
                live.clear()
                live.update(old)
        raise


def _load_into(path: str, doc: dict, info: Dict[str, dict], model: nn.Module,
               device) -> nn.Module:
    _install_experts(model, doc, path)
    _install_layers(model, doc, path)

    aliases: Dict[str, str] = doc["aliases"]
    crc: Dict[str, int] = doc["crc32"]
    file_names = set(info) | set(aliases)
    slots = _slots(model)
    slot_names = {s[0] for s in slots}
    missing = [name for name, mod, attr, is_param, persistent in slots if name not in file_names
               and (persistent or mod._buffers[attr].device.type == "meta")]
    # A non-persistent buffer the model does not have (e.g. renamed by another transformers
    # version) is derived state, not weights: ignored rather than refused.
    unexpected = sorted(file_names - slot_names - set(doc["non_persistent"]))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the model are missing from the file "
                         f"(first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors of the file have no place in the model "
                         f"(first: {unexpected[:5]})")
        raise CheckpointError(f"{path} does not match the model: " + "; ".join(parts))

    # Check every shape before reading any data.
    for name, mod, attr, is_param, _ in slots:
        if name not in file_names:
            continue
        canon = aliases.get(name, name)
        shape = info[canon]["shape"]
        old = mod._parameters[attr] if is_param else mod._buffers[attr]
        if list(old.shape) != shape:
            raise CheckpointError(f"{path}: {name!r} has shape {shape} in the file but "
                                  f"{list(old.shape)} in the model")

    loaded: Dict[str, torch.Tensor] = {}  # file name -> tensor read from the file
    new_for_old: Dict[int, Tuple[torch.Tensor, str]] = {}  # id(skeleton tensor) -> (new, file name)
    reader = _Reader(path, info)
    try:
        for name, mod, attr, is_param, _ in slots:
            old = mod._parameters[attr] if is_param else mod._buffers[attr]
            if name not in file_names:
                continue  # a non-persistent buffer the model computed itself (checked above)
            canon = aliases.get(name, name)
            if id(old) in new_for_old:  # tied in the model: the file must tie them too
                new, first = new_for_old[id(old)]
                if first != canon:
                    raise CheckpointError(
                        f"{path}: the model ties {name!r} to another tensor, but the file stores "
                        f"it separately (as {canon!r}, not {first!r})")
            else:
                new = loaded.get(canon)
                if new is None:
                    t = reader.read(canon)
                    if _crc32(t) != crc[canon]:
                        raise CheckpointError(f"{path}: tensor {canon!r} is corrupted (checksum "
                                              "mismatch)")
                    if not _float_or_same(t.dtype, old.dtype):
                        raise CheckpointError(f"{path}: {name!r} is {t.dtype} in the file but "
                                              f"{old.dtype} in the model")
                    new = nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
                    loaded[canon] = new
                elif is_param and not isinstance(new, nn.Parameter):
                    raise CheckpointError(f"{path}: {name!r} is a parameter but shares its tensor "
                                          "with a buffer in the file")
                new_for_old[id(old)] = (new, canon)
            if is_param:
                mod._parameters[attr] = new
            else:
                mod._buffers[attr] = new
    finally:
        reader.close()

    for name, mod in model.named_modules():
        if _is_lowbit_layer(mod):
            mod.__dict__.pop("_qw", None)
            try:
                mod.qweight.validate()
                cols = mod._buffers.get("outlier_cols")
                if cols is not None:  # LLM.int8-style float columns: distinct, ascending, in range
                    from .. import nn as lowbit_nn
                    lowbit_nn._check_outlier_cols(cols, mod.in_features, cols.device, sort=True)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: layer {name!r}: {e}") from None
    for name, fl in doc.get("module_flags", {}).items():  # (files before session 14: none)
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module flags for {name!r}, which the model lacks") from None
        for a, v in fl.items():
            if a not in WEIGHT_STATE_FLAGS or not isinstance(v, bool) \
                    or not isinstance(getattr(target, a, None), bool):
                raise CheckpointError(f"{path}: module {name!r}: unexpected flag {a!r} = {v!r}")
            setattr(target, a, v)
    for name, state in doc["extra_state"].items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: extra state for {name!r}, which the model lacks") from None
        if type(target).set_extra_state is nn.Module.set_extra_state:
            raise CheckpointError(f"{path}: extra state for {name!r}, a {type(target).__name__} "
                                  "that keeps none")
        try:
            target.set_extra_state(state)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: module {name!r}: invalid extra state "
                                  f"({type(e).__name__}: {e})") from None
    model.eval()  # (as transformers' from_pretrained: dropout off; .train() to fine-tune)
    if device is not None:
        model.to(device)
    return model


class _Reader:
    """Reads tensors by their byte ranges (from :func:`read_header`) straight into freshly
    allocated tensors (``readinto``: no mapping of the file, so resident memory grows by
    exactly the tensors read, and torch's allocator gives them 64-byte alignment)."""

    def __init__(self, path: str, info: Dict[str, dict]):
        self.path = path
        self.info = info
        self.fh = open(path, "rb")

    def read(self, name: str) -> torch.Tensor:
        e = self.info[name]
        a, b = e["offsets"]
        t = torch.empty(e["shape"], dtype=e["dtype"], device="cpu")
        nbytes = t.numel() * t.element_size()
        if nbytes != b - a:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {b - a} bytes for "
                                  f"{e['shape']} {e['dtype']}; the header is corrupted")
        if nbytes:
            self.fh.seek(a)
            got = self.fh.readinto(t.reshape(-1).view(torch.uint8).numpy())
            if got != nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short ({got} of "
                                      f"{nbytes} bytes); the file is truncated")
        return t

    def close(self) -> None:
        self.fh.close()
