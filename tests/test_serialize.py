"""lowbit.save / lowbit.load: round trips (tiny random Llama, every layer kind, the bundled
SmolLM2 once), memory (the float weights are never allocated), atomic writes, and clear errors on
bad files (truncated, corrupted, wrong version, mismatched, not lowbit, pickles)."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear, QuantizedWeight
from lowbit import evaluate as E
from lowbit.io import serialize as S
from lowbit.io.serialize import CheckpointError

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
MISSING_FOR_BUNDLED = E.missing_extras(need_model=True, need_text=False)


# ---- fixtures -----------------------------------------------------------------------------
def tiny_config(**kw):
    from transformers import LlamaConfig
    args = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    args.update(kw)
    return LlamaConfig(**args)


def tiny_llama(cfg=None, seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg or tiny_config()).eval()


def builder(cfg=None):
    from transformers import LlamaForCausalLM
    cfg = cfg or tiny_config()
    return lambda: LlamaForCausalLM(cfg)


def _with_transforms(lin: nn.Linear, fmt: str, **opts) -> QuantLinear:
    """A QuantLinear with both optional input transforms (perm and input_scale) set."""
    K = lin.in_features
    g = torch.Generator().manual_seed(K)
    perm = torch.randperm(K, generator=g)
    scale = torch.rand(K, generator=g) + 0.5
    ws = (lin.weight.detach() * scale)[:, perm]
    qw = lowbit.quantize_weight(ws, fmt, **opts)
    qw = QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scales, qw.zeros, group_size=qw.group_size,
                         symmetric=qw.symmetric, zero_point=qw.zero_point,
                         double_quant=qw.double_quant, dq_scale=qw.dq_scale,
                         dq_offset=qw.dq_offset, perm=perm, input_scale=scale)
    return QuantLinear.from_quantized(qw, lin.bias)


# Layer -> how it is quantized: every format family, sym/asym, double quant, input transforms.
LAYER_PLAN = {
    "self_attn.q_proj": ("int8", {}),
    "self_attn.k_proj": ("int4", {"group_size": 32}),
    "self_attn.v_proj": ("int4", {"group_size": 16, "symmetric": True}),
    "self_attn.o_proj": ("nf4", {"group_size": 32, "double_quant": True}),
    "mlp.gate_proj": ("nf4", {"group_size": -1}),
    "mlp.up_proj": ("transforms", {}),  # int4 g32 with perm + input_scale
    # mlp.down_proj stays float
}


def quantize_mixed(model):
    for i, layer in enumerate(model.model.layers):
        for sub, (fmt, opts) in LAYER_PLAN.items():
            parent_name, _, child = sub.rpartition(".")
            parent = layer.get_submodule(parent_name)
            lin = getattr(parent, child)
            q = (_with_transforms(lin, "int4", group_size=32) if fmt == "transforms"
                 else QuantLinear.from_linear(lin, fmt, **opts))
            setattr(parent, child, q)
    return model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """(quantized tiny model, path of its checkpoint, input ids)."""
    if not HAS_TRANSFORMERS:
        pytest.skip("needs transformers")
    model = quantize_mixed(tiny_llama())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    lowbit.save(model, path)
    ids = torch.randint(3, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    return model, path, ids


def _rewrite(src, dst, tensors_fn=None, meta_fn=None):
    """Copy a checkpoint, letting tensors_fn / meta_fn edit its tensors / metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    if tensors_fn:
        tensors = tensors_fn(tensors)
    if meta_fn:
        meta = meta_fn(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _edit_doc(fn):
    def meta_fn(meta):
        doc = json.loads(meta["lowbit"])
        fn(doc)
        meta["lowbit"] = json.dumps(doc)
        return meta
    return meta_fn


# ---- round trips --------------------------------------------------------------------------
@needs_transformers
@torch.inference_mode()
def test_roundtrip_tiny_llama_identical_logits_ties_and_buffers(saved_tiny):
    model, path, ids = saved_tiny
    loaded = lowbit.load(path, builder()).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # every quantized layer came back with its exact settings and tensors
    for name, mod in model.named_modules():
        got = loaded.get_submodule(name)
        assert type(got) is type(mod), name
        if isinstance(mod, QuantLinear):
            assert got.get_extra_state() == mod.get_extra_state()
            for k, t in mod.qweight.tensors().items():
                assert torch.equal(getattr(got.qweight, k), t), (name, k)
    assert loaded.model.layers[0].mlp.up_proj.qweight.perm is not None
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    # lm_head stays tied to the embeddings, stored once
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    doc, info = S.read_header(path)
    assert doc["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in info
    # non-persistent buffers (rotary inv_freq) are real and equal, not meta leftovers
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert t.device.type == "cpu", name
        assert t.data_ptr() % 64 == 0, name  # owned, aligned memory (not a view of the file)
    out = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=4, do_sample=False))


@needs_transformers
def test_builder_runs_on_meta_and_float_linears_are_never_allocated(saved_tiny):
    _, path, ids = saved_tiny
    seen = {}

    def build():
        seen["device"] = torch.empty(1).device.type
        m = builder()()
        seen["model"] = m
        return m

    loaded = lowbit.load(path, build)
    assert seen["device"] == "meta"
    assert loaded is seen["model"]
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@needs_transformers
@torch.inference_mode()
def test_load_into_materialised_float_model(saved_tiny):
    # an ordinary float model (other random weights) is overwritten completely
    model, path, ids = saved_tiny
    target = tiny_llama(seed=5)
    out = lowbit.load(path, target)
    assert out is target
    assert isinstance(target.model.layers[1].self_attn.o_proj, QuantLinear)
    assert torch.equal(target(ids).logits, model(ids).logits)


def test_plain_module_roundtrip_with_bias_and_buffers(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 40), nn.LayerNorm(40), nn.Linear(40, 24, bias=False),
                        nn.BatchNorm1d(24))
    net[0] = QuantLinear.from_linear(net[0], "int4", group_size=16, zero_point="float")
    net.eval()
    x = torch.randn(5, 48)
    p = tmp_path / "net.safetensors"
    lowbit.save(net, p)
    fresh = lowbit.load(p, lambda: nn.Sequential(nn.Linear(48, 40), nn.LayerNorm(40),
                                                 nn.Linear(40, 24, bias=False), nn.BatchNorm1d(24)))
    fresh.eval()
    assert torch.equal(fresh(x), net(x))
    assert fresh[0].bias is not None and fresh[0].get_extra_state()["zero_point"] == "float"
    assert torch.equal(fresh[3].running_mean, net[3].running_mean)


def test_save_overwrites_atomically_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "m.safetensors"
    a = nn.Sequential(QuantLinear.from_linear(nn.Linear(32, 16), "int8"))
    b = nn.Sequential(QuantLinear.from_linear(nn.Linear(32, 16), "nf4", group_size=16))
    lowbit.save(a, p)
    lowbit.save(b, p)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~S._umask()  # a normal file's mode, not 0600
    got = lowbit.load(p, lambda: nn.Sequential(nn.Linear(32, 16)))
    assert got[0].fmt == "nf4"


# ---- interrupted saves --------------------------------------------------------------------
def _small_quantized():
    torch.manual_seed(0)
    return nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 32), "int4", group_size=32))


def test_failure_midway_through_save_keeps_previous_file(tmp_path, monkeypatch):
    import safetensors.torch as st
    p = tmp_path / "m.safetensors"
    old = _small_quantized()
    lowbit.save(old, p)
    before = p.read_bytes()
    real = st.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a partly written file, then the writer dies
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(st, "save_file", half_then_fail)
    new = nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 32), "int8"))
    with pytest.raises(OSError, match="simulated"):
        lowbit.save(new, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # the temporary file was removed
    monkeypatch.setattr(st, "save_file", real)
    got = lowbit.load(p, lambda: nn.Sequential(nn.Linear(64, 32)))
    assert torch.equal(got[0].weight_data, old[0].weight_data)


def test_process_killed_midway_through_save_keeps_previous_file(tmp_path):
    # A real crash: the saving process dies (os._exit, no cleanup) after writing half the file.
    p = tmp_path / "m.safetensors"
    old = _small_quantized()
    lowbit.save(old, p)
    before = p.read_bytes()
    script = textwrap.dedent(f"""
        import os, torch, lowbit, safetensors.torch as st
        from torch import nn
        real = st.save_file
        def crash(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            os._exit(9)
        st.save_file = crash
        m = nn.Sequential(lowbit.QuantLinear.from_linear(nn.Linear(64, 32), "int8"))
        lowbit.save(m, {str(p)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert p.read_bytes() == before
    leftovers = [f for f in os.listdir(tmp_path) if f != "m.safetensors"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # a crash leaves only the temp
    got = lowbit.load(p, lambda: nn.Sequential(nn.Linear(64, 32)))
    assert torch.equal(got[0].weight_data, old[0].weight_data)


# ---- bad files ----------------------------------------------------------------------------
def _tiny_builder_or_skip():
    if not HAS_TRANSFORMERS:
        pytest.skip("needs transformers")
    return builder()


@needs_transformers
@pytest.mark.parametrize("where", ["in_length", "in_header", "in_data", "last_byte"])
def test_truncated_file_is_refused(saved_tiny, tmp_path, where):
    _, path, _ = saved_tiny
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    cut = {"in_length": 5, "in_header": 8 + n // 2, "in_data": 8 + n + (len(raw) - 8 - n) // 2,
           "last_byte": len(raw) - 1}[where]
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        lowbit.load(bad, builder())


@needs_transformers
def test_corrupted_tensor_bytes_fail_the_checksum(saved_tiny, tmp_path):
    _, path, _ = saved_tiny
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    doc, info = S.read_header(path)
    a, b = info["model.layers.1.mlp.up_proj.weight_data"]["offsets"]
    raw[(a + b) // 2] ^= 0x10  # one flipped bit in the middle of a packed weight
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(raw))
    assert 8 + n <= a
    with pytest.raises(CheckpointError, match="weight_data.*corrupted"):
        lowbit.load(bad, builder())


@needs_transformers
@pytest.mark.parametrize("edit", ["json_syntax", "tensor_entry", "lowbit_doc"])
def test_corrupted_header_is_refused(saved_tiny, tmp_path, edit):
    _, path, _ = saved_tiny
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    if edit == "json_syntax":
        i = header.index('"dtype"')
        raw[8 + i] = ord("{")  # the JSON no longer parses
    elif edit == "tensor_entry":
        i = header.index('"shape":[') + len('"shape":[')
        raw[8 + i] = ord("9") if chr(raw[8 + i]) != "9" else ord("8")  # a shape digit changed
    else:
        i = header.index('\\"layers\\"')
        raw[8 + i + 2] = ord("#")  # inside the lowbit JSON document (escaped in the header)
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        lowbit.load(bad, builder())


@needs_transformers
@pytest.mark.parametrize("version,match", [("2", "newer than this lowbit reads.*upgrade"),
                                           ("0", "unknown"), ("one", "unreadable")])
def test_wrong_format_version_is_refused(saved_tiny, tmp_path, version, match):
    _, path, _ = saved_tiny
    bad = _rewrite(path, tmp_path / "v.safetensors",
                   meta_fn=lambda m: {**m, "lowbit.format_version": version})
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(bad, builder())


def test_non_lowbit_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "plain.safetensors"
    save_file({"0.weight": torch.randn(4, 4)}, str(p))
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lowbit.load(p, lambda: nn.Sequential(nn.Linear(4, 4)))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        lowbit.load(tmp_path / "nope.safetensors", nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="directory"):
        lowbit.load(tmp_path, nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowbit.save(nn.Linear(2, 2), tmp_path / "no" / "dir.safetensors")
    with pytest.raises(TypeError, match="nn.Module"):
        lowbit.load(tmp_path / "x", 42)


@needs_transformers
def test_model_with_other_shapes_is_refused(saved_tiny):
    _, path, _ = saved_tiny
    with pytest.raises(CheckpointError, match=r"\[out=96, in=64\] in the checkpoint but \[out=80"):
        lowbit.load(path, builder(tiny_config(intermediate_size=80)))
    with pytest.raises(CheckpointError, match="shape"):
        lowbit.load(path, builder(tiny_config(vocab_size=100)))


@needs_transformers
def test_missing_and_unexpected_tensors_are_refused(saved_tiny, tmp_path):
    _, path, _ = saved_tiny
    # a deeper model: its third layer has no tensors in the file
    with pytest.raises(CheckpointError, match="missing from the file.*layers.2"):
        lowbit.load(path, builder(tiny_config(num_hidden_layers=3)))
    # a shallower one: the file's second layer has no place
    with pytest.raises(CheckpointError, match="layers.1.* no module"):
        lowbit.load(path, builder(tiny_config(num_hidden_layers=1)))
    # a float tensor dropped from / added to the file
    drop = _rewrite(path, tmp_path / "drop.safetensors",
                    tensors_fn=lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"},
                    meta_fn=_edit_doc(lambda d: d["crc32"].pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match=r"missing from the file \(first: \['model.norm.weight'\]"):
        lowbit.load(drop, builder())
    extra = _rewrite(path, tmp_path / "extra.safetensors",
                     tensors_fn=lambda t: {**t, "model.bogus": torch.zeros(3)},
                     meta_fn=_edit_doc(lambda d: d["crc32"].update({"model.bogus": 0})))
    with pytest.raises(CheckpointError, match=r"no place in the model \(first: \['model.bogus'\]"):
        lowbit.load(extra, builder())


@needs_transformers
def test_tampered_layer_descriptions_are_refused(saved_tiny, tmp_path):
    _, path, _ = saved_tiny
    name = "model.layers.0.self_attn.k_proj"

    def set_class(d):
        d["layers"][name]["class"] = "os.system"

    bad = _rewrite(path, tmp_path / "cls.safetensors", meta_fn=_edit_doc(set_class))
    with pytest.raises(CheckpointError, match="class 'os.system'"):
        lowbit.load(bad, builder())

    def set_group(d):  # the recorded layout no longer fits the stored tensors
        d["layers"][name]["state"]["group_size"] = 16

    bad = _rewrite(path, tmp_path / "grp.safetensors", meta_fn=_edit_doc(set_group))
    with pytest.raises(CheckpointError, match="k_proj"):
        lowbit.load(bad, builder())


@needs_transformers
def test_model_ties_what_the_file_keeps_separate(tmp_path):
    untied = tiny_llama(tiny_config(tie_word_embeddings=False))
    p = tmp_path / "untied.safetensors"
    lowbit.save(untied, p)
    with pytest.raises(CheckpointError, match="ties"):
        lowbit.load(p, builder(tiny_config(tie_word_embeddings=True)))
    # into the matching architecture it loads
    got = lowbit.load(p, builder(tiny_config(tie_word_embeddings=False)))
    assert got.lm_head.weight is not got.model.embed_tokens.weight


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("LOWBIT_TEST_MARKER", "/nonexistent/x"),))


def test_pickle_files_are_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LOWBIT_TEST_MARKER", str(marker))
    p = tmp_path / "evil.safetensors"
    with open(p, "wb") as f:
        pickle.dump({"weight": _Boom()}, f)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lowbit.load(p, nn.Linear(2, 2))
    torch.save({"x": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        lowbit.load(tmp_path / "evil.pt", nn.Linear(2, 2))
    assert not marker.exists()


def test_load_uses_no_pickle(tmp_path, monkeypatch):
    # A pickled payload in the metadata is just a string; nothing may unpickle anything.
    m = _small_quantized()
    p = tmp_path / "m.safetensors"
    lowbit.save(m, p)
    payload = pickle.dumps(_Boom(), protocol=0).decode("latin-1")
    p2 = _rewrite(p, tmp_path / "m2.safetensors", meta_fn=lambda md: {**md, "evil": payload})

    def forbidden(*a, **k):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    got = lowbit.load(p2, lambda: nn.Sequential(nn.Linear(64, 32)))
    assert torch.equal(got[0].weight_data, m[0].weight_data)


def test_save_refuses_meta_tensors_and_pickled_extra_state(tmp_path):
    with torch.device("meta"):
        m = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        lowbit.save(m, tmp_path / "m.safetensors")

    class Odd(nn.Module):
        def get_extra_state(self):
            return {"f": object()}

        def set_extra_state(self, s):
            pass

    with pytest.raises(TypeError, match="JSON"):
        lowbit.save(nn.Sequential(Odd()), tmp_path / "o.safetensors")
    assert os.listdir(tmp_path) == []


# ---- memory: loading never allocates the float weights ------------------------------------
def test_peak_memory_of_load_is_the_quantized_size(tmp_path):
    """In a fresh process: loading 4 layers of 4096x4096 (256 MiB in float32, 34 MiB as int4
    g128) into a builder's skeleton raises the peak resident memory by about the quantized
    size, nowhere near the float size."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak memory")
    n, layers = 4096, 4
    net = nn.Sequential(*[QuantLinear(n, n, bias=False, fmt="int4") for _ in range(layers)])
    g = torch.Generator().manual_seed(0)
    for q in net:
        q.weight_data.copy_(torch.randint(0, 256, q.weight_data.shape, generator=g, dtype=torch.uint8))
        q.weight_scales.copy_(torch.rand(q.weight_scales.shape, generator=g))
    p = tmp_path / "big.safetensors"
    lowbit.save(net, p)
    qbytes = os.path.getsize(p)
    script = textwrap.dedent(f"""
        import ctypes, torch, lowbit
        from torch import nn
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
        base = status("VmRSS")
        m = lowbit.load({str(p)!r}, lambda: nn.Sequential(*[nn.Linear({n}, {n}, bias=False)
                                                            for _ in range({layers})]))
        print(status("VmHWM") - base, sum(t.numel() * t.element_size() for t in m.buffers()))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    peak, held = (int(v) for v in r.stdout.split())
    float_bytes = layers * n * n * 4
    assert held <= qbytes < float_bytes / 7
    assert peak < 1.25 * qbytes + (8 << 20), (peak, qbytes)


# ---- the bundled SmolLM2 ------------------------------------------------------------------
@pytest.mark.skipif(bool(MISSING_FOR_BUNDLED), reason=f"needs {MISSING_FOR_BUNDLED}")
@torch.inference_mode()
def test_bundled_smollm2_reloads_with_identical_logits(tmp_path):
    import transformers
    model, tok, _ = E.load_model(verbose=False)
    config = model.config
    E.quantize_linears(model, "int4", group_size=64)
    p = tmp_path / "smollm2-int4.safetensors"
    lowbit.save(model, p)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    ref = model(ids).logits
    ref_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    del model
    loaded = lowbit.load(p, lambda: transformers.AutoModelForCausalLM.from_config(config)).eval()
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 210
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(ids).logits, ref)
    gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(gen, ref_gen)
    # the file is the model's tensors (tied ones once) plus a small header
    held = E.size_stats(loaded)["model_bytes"]
    assert held <= os.path.getsize(p) < held + (1 << 20)


@pytest.mark.skipif("outlier_cols" not in __import__("inspect").signature(QuantLinear.from_linear).parameters,
                    reason="QuantLinear has no outlier columns in this tree")
def test_outlier_columns_roundtrip_and_are_validated(tmp_path):
    # LLM.int8-style layers: int8 codes plus float columns (outlier_cols / outlier_weight)
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    q = QuantLinear.from_linear(lin, "int8", outlier_cols=torch.tensor([31, 3, 17]))
    net = nn.Sequential(q, nn.ReLU(), nn.Linear(24, 8))
    p = tmp_path / "o.safetensors"
    lowbit.save(net, p)
    x = torch.randn(3, 40)
    got = lowbit.load(p, lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8)))
    assert got[0].n_outliers == 3
    assert torch.equal(got[0].outlier_cols, torch.tensor([3, 17, 31]))
    assert torch.equal(got(x), net(x))
    # a repeated column in the file is refused
    bad = _rewrite(p, tmp_path / "bad.safetensors",
                   tensors_fn=lambda t: {**t, "0.outlier_cols": torch.tensor([3, 3, 31])},
                   meta_fn=_edit_doc(lambda d: d["crc32"].update(
                       {"0.outlier_cols": S._crc32(torch.tensor([3, 3, 31]))})))
    with pytest.raises(CheckpointError, match="repeat"):
        lowbit.load(bad, lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8)))


class _WithDerived(nn.Module):
    """A Linear plus a non-persistent (derived) buffer, like rotary inv_freq."""

    def __init__(self, derived: bool = True):
        super().__init__()
        self.lin = nn.Linear(16, 8)
        if derived:
            self.register_buffer("table", torch.arange(4.0) * 0.5, persistent=False)


def test_non_persistent_buffers(tmp_path):
    torch.manual_seed(0)
    src = _WithDerived()
    src.lin = QuantLinear.from_linear(src.lin, "int8")
    p = tmp_path / "d.safetensors"
    lowbit.save(src, p)
    assert "table" in S.read_header(p)[0]["non_persistent"]
    # built on meta: the derived buffer comes back from the file
    got = lowbit.load(p, _WithDerived)
    assert torch.equal(got.table, src.table)
    # a model without it: the file's copy is ignored
    got = lowbit.load(p, lambda: _WithDerived(derived=False))
    assert not hasattr(got, "table") and torch.equal(got.lin.weight_data, src.lin.weight_data)
    # a file without it: a real (computed) buffer is kept, a meta one is refused
    src2 = _WithDerived(derived=False)
    src2.lin = QuantLinear.from_linear(src2.lin, "int8")
    p2 = tmp_path / "n.safetensors"
    lowbit.save(src2, p2)
    kept = lowbit.load(p2, _WithDerived())
    assert torch.equal(kept.table, torch.arange(4.0) * 0.5)
    with pytest.raises(CheckpointError, match=r"missing from the file \(first: \['table'\]"):
        lowbit.load(p2, _WithDerived)


def test_loaded_model_is_in_evaluation_mode(tmp_path):
    """As transformers' from_pretrained: a model with dropout gives the same logits twice after
    load (a builder's fresh model, or one passed in training mode, comes back in eval mode)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 8))  # noqa: E731
    model = make().eval()
    lowbit.quantize_model(model, lowbit.QuantConfig(format="int8"), progress=False)
    path = tmp_path / "d.safetensors"
    lowbit.save(model, path)
    x = torch.randn(4, 32)
    for target in (make, make().train()):
        loaded = lowbit.load(path, target)
        assert not any(m.training for m in loaded.modules())
        assert torch.equal(loaded(x), model(x))
