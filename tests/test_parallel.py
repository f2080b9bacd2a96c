"""lowbit.parallel: sharding QuantizedWeights (bit-exact against slices of the unsharded weight),
the parallel layers, shard_model and per-rank shard files; and, in 2 processes on the gloo
backend, sharded tiny Llama models (every format) and the bundled SmolLM2 against the unsharded
model, layer by layer within lowbit.testing's bound and end to end on the logits."""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
from torch import nn

import lowbit
import lowbit.parallel as tp
from lowbit import QuantLinear, QuantizedWeight
from lowbit import reference as R
from lowbit.parallel import shard as S
from lowbit.testing import accumulation_rtol, assert_linear_close

from conftest import FORMAT_CASES, NEW_FORMAT_CASES, case_id

try:
    import transformers  # noqa: F401
    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False

needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")


# ---- helpers ------------------------------------------------------------------------------------
def _k_for(fmt, opts):
    """A K with a ragged last group and, for 4-bit formats, odd (half a byte at the end); large
    enough for double quantization to span several chunks of 256 blocks."""
    g = opts.get("group_size", lowbit.formats.get_format(fmt).default_group)
    if g == -1:
        return 333
    if opts.get("double_quant"):
        return g * 600 + 7  # 601 blocks: chunks [0,256), [256,512), [512,601)
    return g * 5 + 7


def _with_transforms(qw, perm=None, input_scale=None):
    return QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scales, qw.zeros, group_size=qw.group_size,
                           symmetric=qw.symmetric, double_quant=qw.double_quant, dq_scale=qw.dq_scale,
                           dq_offset=qw.dq_offset, perm=perm, input_scale=input_scale)


def _block_perm(bounds):
    """A random permutation that keeps each [bounds[r], bounds[r+1]) within itself."""
    return torch.cat([lo + torch.randperm(hi - lo) for lo, hi in zip(bounds, bounds[1:])])


# ---- shard functions: bit-exact slices -----------------------------------------------------------
@pytest.mark.parametrize("case", FORMAT_CASES + NEW_FORMAT_CASES, ids=case_id)
def test_shards_dequantize_to_exact_slices(case):
    fmt, opts = case
    N, K = 7, _k_for(fmt, opts)
    qw = lowbit.quantize_weight(torch.randn(N, K) * torch.rand(N, 1) * 3, fmt, **opts)
    full = lowbit.dequantize(qw)
    assert torch.equal(full, R.dequantize(qw))
    a = tp.k_alignment(qw)
    for world in (2, 3):
        kb = tp.balanced_bounds(K, world, a)
        nb = tp.balanced_bounds(N, world)  # uneven rows: 7 = 4 + 3, 3 + 2 + 2
        for r in range(world):
            col = tp.shard_weight(qw, "row", world, r, bounds=kb)
            row = tp.shard_weight(qw, "column", world, r, bounds=nb)
            assert col.shape == (N, kb[r + 1] - kb[r]) and row.shape == (nb[r + 1] - nb[r], K)
            assert torch.equal(lowbit.dequantize(col), full[:, kb[r]:kb[r + 1]]), (world, r)
            assert torch.equal(R.dequantize(col), full[:, kb[r]:kb[r + 1]]), (world, r)
            assert torch.equal(lowbit.dequantize(row), full[nb[r]:nb[r + 1]]), (world, r)
            assert col.config() | {"shape": None, "double_quant": None} == \
                qw.config() | {"shape": None, "double_quant": None}
            # shards own their memory (the unsharded tensors can be freed)
            for t in list(col.tensors().values()) + list(row.tensors().values()):
                assert t.untyped_storage().data_ptr() != qw.data.untyped_storage().data_ptr()
                assert t.is_contiguous()
            x = torch.randn(3, K)
            y = lowbit.linear(x[:, kb[r]:kb[r + 1]], col)
            assert_linear_close(y, R.linear(x[:, kb[r]:kb[r + 1]], col), x[:, kb[r]:kb[r + 1]], col)


def test_double_quant_rechunks_exactly_or_expands():
    K = 16 * 600 + 7  # 601 blocks of 16; stored chunks of 256 blocks
    qw = lowbit.quantize_weight(torch.randn(5, K), "nf4", group_size=16, double_quant=True)
    full = lowbit.dequantize(qw)
    # a shard starting mid-chunk whose blocks stay inside one stored chunk keeps double quant
    s = tp.shard_cols(qw, 16 * 300, 16 * 500)
    assert s.double_quant and s.scales.dtype == torch.uint8 and s.dq_scale.shape == (5, 1)
    assert torch.equal(s.dq_scale[:, 0], qw.dq_scale[:, 1])
    assert torch.equal(lowbit.dequantize(s), full[:, 16 * 300:16 * 500])
    # cuts on chunk boundaries keep every chunk
    s = tp.shard_cols(qw, 16 * 256, K)
    assert s.double_quant and torch.equal(s.dq_offset, qw.dq_offset[:, 1:])
    assert torch.equal(lowbit.dequantize(s), full[:, 16 * 256:])
    # a local chunk straddling stored chunks: absmax stored decoded, still bit-exact
    s = tp.shard_cols(qw, 16 * 100, 16 * 400)
    assert not s.double_quant and s.scales.dtype == torch.float32 and s.dq_scale is None
    assert torch.equal(lowbit.dequantize(s), full[:, 16 * 100:16 * 400])
    with pytest.raises(ValueError, match=r"straddling stored chunks.*dq_fallback='expand'"):
        tp.shard_cols(qw, 16 * 100, 16 * 400, dq_fallback="error")


def test_transforms_are_copied_or_sliced_consistently():
    N, K = 6, 32 * 6 + 5
    qw0 = lowbit.quantize_weight(torch.randn(N, K), "int4", group_size=32)
    bounds = tp.balanced_bounds(K, 2, 32)
    qw = _with_transforms(qw0, _block_perm(bounds), torch.rand(K) * 3 + 0.25)
    full = lowbit.dequantize(qw)  # the layer's weight in input-feature order
    x = torch.randn(4, K)
    total = torch.zeros(4, N)
    for r in range(2):
        lo, hi = bounds[r], bounds[r + 1]
        s = tp.shard_weight(qw, 1, 2, r, bounds=bounds)
        assert torch.equal(s.input_scale, qw.input_scale[lo:hi])
        assert torch.equal(s.perm + lo, qw.perm[lo:hi])
        assert torch.equal(lowbit.dequantize(s), full[:, lo:hi])
        total += lowbit.linear(x[:, lo:hi], s)
        c = tp.shard_weight(qw, 0, 2, r)
        assert torch.equal(c.perm, qw.perm) and torch.equal(c.input_scale, qw.input_scale)
        assert torch.equal(lowbit.dequantize(c), full[r * 3:(r + 1) * 3])
    assert_linear_close(total, R.linear(x, qw), x, qw)


def test_crossing_perm_is_refused_or_gathered():
    N, K = 5, 128
    qw0 = lowbit.quantize_weight(torch.randn(N, K), "nf4", group_size=32)
    # stored column 0 reads the last input feature, which rank 1 receives: crosses the split
    perm = torch.tensor([K - 1] + [i for i in torch.randperm(K).tolist() if i != K - 1])
    qw = _with_transforms(qw0, perm, torch.rand(K) + 0.5)
    with pytest.raises(ValueError, match=r"perm moves input features across the row-parallel split.*gather"):
        tp.shard_weight(qw, 1, 2, 0)
    x = torch.randn(3, K)
    total = torch.zeros(3, N)
    for lo, hi in ((0, 64), (64, 128)):
        local, index, scale = tp.shard_cols_gathered(qw, lo, hi)
        assert local.perm is None and local.input_scale is None
        assert torch.equal(index, qw.perm[lo:hi]) and torch.equal(scale, qw.input_scale[qw.perm[lo:hi]])
        assert torch.equal(lowbit.dequantize(local), R.decode(qw)[:, lo:hi])
        total += lowbit.linear(x[:, index] / scale, local)
    assert_linear_close(total, R.linear(x, qw), x, qw)


def test_shard_errors_name_the_sizes():
    qw = lowbit.quantize_weight(torch.randn(6, 320), "int4", group_size=128)
    with pytest.raises(ValueError, match=r"at K = 160 cuts a group of 128.*multiples of 128.*\[0, 256, 320\]"):
        tp.shard_weight(qw, 1, 2, 0)
    with pytest.raises(ValueError, match=r"cannot split 320 evenly over world_size=3"):
        tp.shard_weight(qw, "row", 3, 0)
    with pytest.raises(ValueError, match=r"cannot split 6 evenly over world_size=4"):
        tp.shard_weight(qw, 0, 4, 0)
    with pytest.raises(ValueError, match="rank must be an int in"):
        tp.shard_weight(qw, 0, 2, 2)
    with pytest.raises(ValueError, match="dim must be"):
        tp.shard_weight(qw, 2, 2, 0)
    with pytest.raises(ValueError, match="must rise strictly"):
        tp.shard_weight(qw, 1, 2, 0, bounds=[0, 0, 320])
    with pytest.raises(ValueError, match="world_size \\+ 1"):
        tp.shard_weight(qw, 1, 2, 0, bounds=[0, 128, 256, 320])
    with pytest.raises(TypeError, match="QuantizedWeight"):
        tp.shard_weight(torch.randn(4, 4), 0, 2, 0)
    with pytest.raises(ValueError, match="cuts a byte of 2 packed codes"):  # per-row nibbles
        tp.shard_weight(lowbit.quantize_weight(torch.randn(4, 10), "int4", group_size=-1), 1, 2, 0)
    # per-row scales can be cut anywhere a byte allows
    q8 = lowbit.quantize_weight(torch.randn(4, 10), "int8")
    assert tp.k_alignment(q8) == 1
    assert torch.equal(lowbit.dequantize(tp.shard_weight(q8, 1, 2, 1)), lowbit.dequantize(q8)[:, 5:])
    with pytest.raises(ValueError, match="only 2 units"):
        tp.balanced_bounds(320, 3, 256)


def test_unknown_field_is_refused(monkeypatch):
    qw = lowbit.quantize_weight(torch.randn(4, 64), "int4", group_size=32)
    monkeypatch.delitem(S.FIELD_K_LAYOUT, "zeros")
    with pytest.raises(ValueError, match="does not know how field 'zeros'"):
        tp.shard_weight(qw, 1, 2, 0)


# ---- parallel layers without communication ------------------------------------------------------
@pytest.mark.parametrize("kind", ["quantized", "outliers", "float"])
def test_layers_assemble_the_unsharded_output(kind):
    lin = nn.Linear(96, 10)
    quantized = kind != "float"
    out_cols = torch.tensor([90, 3, 40, 33]) if kind == "outliers" else None
    layer = (QuantLinear.from_linear(lin, "int4", group_size=32, outlier_cols=out_cols) if quantized
             else lin)
    x = torch.randn(2, 3, 96)
    world = 3
    cols = [tp.ColumnParallelQuantLinear.from_linear(layer, world, r, bounds=[0, 4, 7, 10])
            for r in range(world)]
    rows = [tp.RowParallelQuantLinear.from_linear(layer, world, r) for r in range(world)]
    out = torch.cat([c(x) for c in cols], dim=-1)
    assert [c.local.out_features for c in cols] == [4, 3, 3]
    # row-parallel: local partial sums (the all-reduce adds them), bias once
    partial = sum(r.local(x[..., r.bounds[r.rank]:r.bounds[r.rank + 1]]) for r in rows)
    summed = partial + rows[0].bias
    # the layer's effective weight (outlier columns in float) through torch's float32 matmul
    w = layer.dequantize() if quantized else lin.weight
    ref = nn.functional.linear(x, w, lin.bias)
    if kind == "outliers":
        assert [c.local.n_outliers for c in cols] == [4, 4, 4]
        assert [r.local.n_outliers for r in rows] == [1, 2, 1]  # of [0, 32), [32, 64), [64, 96)
    assert_linear_close(out, ref, x, w, bias=lin.bias)
    assert_linear_close(summed.detach(), ref.detach(), x, w, bias=lin.bias)
    assert all(r.local.bias is None for r in rows)
    # a world of one needs no torch.distributed at all
    one = tp.RowParallelQuantLinear.from_linear(layer, 1, 0)
    assert_linear_close(one(x).detach(), ref.detach(), x, w, bias=lin.bias)


# ---- shard_model: plan and errors (no communication needed) ---------------------------------------
def _tiny_config(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=256, hidden_size=128, intermediate_size=288, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def _tiny_model(seed=0, **kw):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(_tiny_config(**kw)).eval()
    with torch.no_grad():
        for mod in m.modules():  # transformers zero-initialises biases: make them count
            if isinstance(mod, nn.Linear) and mod.bias is not None and not mod.bias.is_meta:
                mod.bias.normal_(0, 0.5)
    return m


@needs_transformers
def test_shard_model_plan_and_errors():
    from lowbit.evaluate import quantize_linears
    m = _tiny_model()
    quantize_linears(m, "int4", group_size=32)
    s = tp.shard_model(copy.deepcopy(m), 2, 1, uneven=True)
    layers = tp.parallel_layers(s)
    assert len(layers) == 2 * 7
    a = s.model.layers[0].self_attn
    assert isinstance(a.q_proj, tp.ColumnParallelQuantLinear) and a.q_proj.bounds == [0, 64, 128]
    assert a.k_proj.bounds == [0, 32, 64] and isinstance(a.o_proj, tp.RowParallelQuantLinear)
    assert s.model.layers[1].mlp.down_proj.bounds == [0, 160, 288]  # 9 groups of 32: 5 + 4
    assert isinstance(s.lm_head, nn.Linear)  # replicated
    with pytest.raises(ValueError, match="already sharded"):
        tp.shard_model(s, 2, 1)
    with pytest.raises(ValueError, match=r"intermediate size.*cuts its groups|cuts its groups"):
        tp.shard_model(copy.deepcopy(m), 2, 0)  # 288 / 2 = 144 is not a multiple of 32
    with pytest.raises(ValueError, match=r"2 key/value heads cannot be shared by world_size=3"):
        tp.shard_model(copy.deepcopy(m), 3, 0, uneven=True)
    with pytest.raises(ValueError, match="rank is needed"):
        tp.shard_model(copy.deepcopy(m), 2)
    m3 = _tiny_model(num_attention_heads=6, num_key_value_heads=3, hidden_size=192)
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 is not divisible by world_size=2; "
                                         r"pass uneven=True to give the ranks \[2, 1\] kv heads"):
        tp.shard_model(m3, 2, 0)
    q = _tiny_model()
    quantize_linears(q, "int4", group_size=128)  # o_proj K=128: a head split at 64 cuts a group
    with pytest.raises(ValueError, match=r"self_attn.o_proj \(row-parallel; its K split is fixed by "
                                         r"the head split\).*cuts a group of 128"):
        tp.shard_model(q, 2, 0, uneven=True)
    with pytest.raises(ValueError, match="found no attention block"):
        tp.shard_model(nn.Sequential(nn.Linear(4, 4)), 2, 0)
    # act-order perms that cross the split: refused unless gathered
    p = _tiny_model()
    quantize_linears(p, "int4", group_size=32)
    down = p.model.layers[0].mlp.down_proj
    down_qw = _with_transforms(down.qweight, torch.randperm(288), None)
    p.model.layers[0].mlp.down_proj = QuantLinear.from_quantized(down_qw)
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj: its perm.*act_order='gather'"):
        tp.shard_model(copy.deepcopy(p), 2, 0, uneven=True)
    g = tp.shard_model(p, 2, 0, uneven=True, act_order="gather")
    assert g.model.layers[0].mlp.down_proj.gather_input
    assert not g.model.layers[1].mlp.down_proj.gather_input


@needs_transformers
def test_shard_files_round_trip_and_errors(tmp_path):
    from lowbit.evaluate import quantize_linears
    m = _tiny_model()
    quantize_linears(m, "nf4", group_size=32, double_quant=True)
    d = str(tmp_path / "w1")
    tp.shard_and_save(m, d, 1)
    man = tp.read_manifest(d)
    assert man["world_size"] == 1 and man["files"] == ["rank0-of-1.safetensors"]
    lay = man["layers"]["model.layers.0.mlp.down_proj"]
    assert lay["parallel"] == "row" and lay["shape"] == [128, 288] and lay["format"]["fmt"] == "nf4"
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)  # the source is unchanged
    with torch.device("meta"):
        skel = _tiny_model()
    tp.load_shards(skel, d)
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        ref, got = m(ids).logits, skel(ids).logits
    # one rank: the same kernels on the same tensors; only o/down add the bias (none here) apart
    assert torch.equal(got, ref)
    d2 = str(tmp_path / "w2")
    tp.shard_and_save(m, d2, 2, uneven=True)
    assert sorted(os.listdir(d2)) == ["manifest.json", "rank0-of-2.safetensors", "rank1-of-2.safetensors"]
    with pytest.raises(ValueError, match=r"saved for world_size=2, but this run has world_size=3"):
        tp.load_shards(_tiny_model(), d2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank is needed"):
        tp.load_shards(_tiny_model(), d2)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj in the model is \[128, 192\], "
                                         r"the shards are for \[128, 128\]"):
        tp.load_shards(_tiny_model(hidden_size=192, num_attention_heads=4, head_dim=32), d2, rank=0,
                       world_size=2)
    os.replace(os.path.join(d2, "rank1-of-2.safetensors"), os.path.join(d2, "moved"))
    with pytest.raises(FileNotFoundError, match="rank 1's shard file"):
        tp.load_shards(_tiny_model(), d2, rank=1, world_size=2)
    os.replace(os.path.join(d2, "rank0-of-2.safetensors"), os.path.join(d2, "rank1-of-2.safetensors"))
    with pytest.raises(ValueError, match=r"is not rank 1 of 2 \(its metadata says rank 0 of 2\)"):
        tp.load_shards(_tiny_model(), d2, rank=1, world_size=2)
    with pytest.raises(FileNotFoundError, match="not a lowbit shard directory"):
        tp.load_shards(_tiny_model(), str(tmp_path))


# ---- two processes on gloo -----------------------------------------------------------------------
WORLD = 2
# (label, format, options, shard_model options); every format and variant, even and uneven splits
# (the tiny model's intermediate size 288 = 9 x 32 = 4.5 x 64 has a ragged last group at 64).
# Two cases give every projection a bias (added once by the row-parallel layers).
BIAS = {"attention_bias": True, "mlp_bias": True}
MODEL_CASES = [
    ("float", None, {}, {}, BIAS),
    ("int8", "int8", {}, {}, {}),
    ("int4-g32", "int4", {"group_size": 32}, {"uneven": True}, {}),
    ("int4-sym-g64", "int4", {"group_size": 64, "symmetric": True}, {"uneven": True}, BIAS),
    ("nf4-b32", "nf4", {"group_size": 32}, {"uneven": True}, {}),
    ("nf4-dq-b16", "nf4", {"group_size": 16, "double_quant": True}, {"uneven": True}, {}),
    ("fp4-dq-b16", "fp4", {"group_size": 16, "double_quant": True}, {"uneven": True}, {}),
    ("int4-float-offset-g32", "int4", {"zero_point": "float", "group_size": 32}, {"uneven": True}, {}),
    ("int8-asym-g32", "int8", {"symmetric": False, "group_size": 32}, {"uneven": True}, {}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits_tol(ref: torch.Tensor, depth: int, K: int) -> float:
    """End-to-end bound: lowbit.testing's float32 accumulation bound per matmul along the deepest
    path (depth matmuls), relative to the logits' size. Sharding changes only summation order."""
    return depth * accumulation_rtol(K) * float(ref.abs().max())


def _reference_linear(orig: nn.Module, x: torch.Tensor):
    if isinstance(orig, QuantLinear) and orig.n_outliers == 0:
        return R.linear(x, orig.qweight, orig.bias), orig.qweight, orig.bias
    # float layers, and the effective weight of a QuantLinear with float outlier columns
    w = orig.dequantize() if isinstance(orig, QuantLinear) else orig.weight
    return nn.functional.linear(x, w, orig.bias), w, orig.bias


def _check_layers(sharded: nn.Module, unsharded: nn.Module, run, label: str):
    """Run ``run()`` with hooks comparing every parallel layer's (gathered) output with the
    reference linear of the unsharded layer on the same (gathered) input."""
    originals = dict(unsharded.named_modules())
    checked = []

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0]
            if isinstance(mod, tp.ColumnParallelQuantLinear):
                out = tp.gather_last_dim(output, mod.bounds, mod.rank, mod.group)
            else:
                out = output
                x = tp.gather_last_dim(x, mod.bounds, mod.rank, mod.group)
            expected, w, b = _reference_linear(originals[name], x)
            assert_linear_close(out, expected, x, w, bias=b, msg=f"{label} {name}")
            checked.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in tp.parallel_layers(sharded).items()]
    try:
        return run(), checked
    finally:
        for h in handles:
            h.remove()


def _run_model_cases(rank, results, ids):
    from lowbit.evaluate import quantize_linears
    for label, fmt, opts, shard_opts, config in MODEL_CASES:
        def case():
            m = _tiny_model(**config)
            if fmt is not None:
                quantize_linears(m, fmt, **opts)
            with torch.inference_mode():
                ref = m(ids).logits
                s = tp.shard_model(copy.deepcopy(m), **shard_opts)
                got, checked = _check_layers(s, m, lambda: s(ids).logits, label)
                assert len(checked) == 2 * 7
                tol = _logits_tol(ref, depth=4 * 2 + 1, K=288)
                torch.testing.assert_close(got, ref, rtol=0, atol=tol)
                gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
                assert torch.equal(s.generate(ids[:1], **gen), m.generate(ids[:1], **gen))
        _record(results, f"model:{label}", case)


def _record(results, name, fn):
    try:
        fn()
        results[name] = "ok"
    except Exception:
        results[name] = traceback.format_exc()


def _act_order_case(ids):
    """GPTQ-style perms with AWQ-style input scales on the row-parallel layers: in layer 0 random
    (crossing the split, so those ranks gather their input), in layer 1 kept within each
    rank's slice (sharded with the slice, no gather)."""
    from lowbit.evaluate import quantize_linears
    m = _tiny_model(seed=3)
    quantize_linears(m, "int4", group_size=32)
    g = torch.Generator().manual_seed(5)
    for i, layer in enumerate(m.model.layers):
        for parent, name, bounds in ((layer.mlp, "down_proj", [0, 160, 288]),
                                     (layer.self_attn, "o_proj", [0, 64, 128])):
            q = getattr(parent, name)
            K = q.in_features
            perm = torch.randperm(K, generator=g) if i == 0 else _block_perm(bounds)
            qw = _with_transforms(q.qweight, perm, torch.rand(K, generator=g) + 0.5)
            setattr(parent, name, QuantLinear.from_quantized(qw))
    with torch.inference_mode():
        ref = m(ids).logits
        s = tp.shard_model(copy.deepcopy(m), uneven=True, act_order="gather")
        assert s.model.layers[0].mlp.down_proj.gather_input
        assert s.model.layers[0].self_attn.o_proj.gather_input
        kept = s.model.layers[1].mlp.down_proj
        assert not kept.gather_input and kept.local.qweight.perm is not None
        got, checked = _check_layers(s, m, lambda: s(ids).logits, "act-order")
    assert len(checked) == 14
    torch.testing.assert_close(got, ref, rtol=0, atol=_logits_tol(ref, 9, 288))


def _mesh_and_files_case(rank, ids, directory):
    from torch.distributed.device_mesh import init_device_mesh
    from lowbit.evaluate import quantize_linears
    m = _tiny_model(seed=1)
    quantize_linears(m, "int4", group_size=32)
    # LLM.int8-style outlier columns (kept in float) on a column- and a row-parallel layer
    g = torch.Generator().manual_seed(4)
    for parent, name in ((m.model.layers[0].self_attn, "q_proj"), (m.model.layers[1].mlp, "down_proj")):
        q = getattr(parent, name)
        cols = torch.randperm(q.in_features, generator=g)[:5]
        setattr(parent, name, QuantLinear.from_quantized(
            q.qweight, q.bias, outlier_cols=cols,
            outlier_weight=torch.randn(q.out_features, 5, generator=g) * 0.2))
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    with torch.inference_mode():
        ref = m(ids).logits
        s = tp.shard_model(copy.deepcopy(m), mesh=mesh["tp"], uneven=True)
        got, checked = _check_layers(s, m, lambda: s(ids).logits, "mesh")
        assert s.model.layers[1].mlp.down_proj.local.n_outliers + \
            s.model.layers[0].self_attn.q_proj.local.n_outliers > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=_logits_tol(ref, 9, 288))
        tp.save_shards(s, directory)
        assert sorted(os.listdir(directory)) == ["manifest.json", "rank0-of-2.safetensors",
                                                 "rank1-of-2.safetensors"]
        with torch.device("meta"):
            skel = _tiny_model(seed=7)
        tp.load_shards(skel, directory)  # rank and world size from torch.distributed
        assert torch.equal(skel(ids).logits, got)  # same shards, same kernels, same sums
        # column-parallel with gather_output: every rank gets the whole output
        lin = QuantLinear.from_linear(nn.Linear(96, 10), "nf4", group_size=32)
        col = tp.ColumnParallelQuantLinear.from_linear(lin, WORLD, rank, bounds=[0, 7, 10],
                                                       group=mesh["tp"].get_group(), gather_output=True)
        x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
        assert_linear_close(col(x), R.linear(x, lin.qweight, lin.bias), x, lin.qweight, bias=lin.bias)


def _smollm_case(rank, job_dir):
    """Rank's view of the bundled model: the parent writes its shards while the ranks run the
    other checks; wait for them, load them into a meta-device skeleton, compare the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    deadline = time.monotonic() + 600
    while not os.path.exists(os.path.join(job_dir, "ready")):
        failed = os.path.join(job_dir, "failed")
        if os.path.exists(failed):
            with open(failed) as f:
                raise RuntimeError(f"preparing the SmolLM2 shards failed:\n{f.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError("the parent did not write the SmolLM2 shards within 600 s")
        time.sleep(0.2)
    job = torch.load(os.path.join(job_dir, "job.pt"))
    with torch.device("meta"):
        skel = LlamaForCausalLM(LlamaConfig.from_pretrained(job_dir))
    tp.load_shards(skel, os.path.join(job_dir, "shards"))
    attn = skel.model.layers[0].self_attn
    assert attn.k_proj.local.out_features == (128 if rank == 0 else 64)  # 3 kv heads: 2 + 1
    with torch.inference_mode():
        got = skel.eval()(job["ids"]).logits
    ref = job["ref"]
    torch.testing.assert_close(got, ref, rtol=0, atol=_logits_tol(ref, 4 * 30 + 1, 1536))
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _worker(rank, port, out_dir, smollm_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from lowbit import _backend
    _backend.set_cpu_path("exact")  # lowbit.testing's float32 bound is the exact path's
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        torch.manual_seed(0)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        _run_model_cases(rank, results, ids)
        _record(results, "act_order", lambda: _act_order_case(ids))
        _record(results, "mesh_and_files",
                lambda: _mesh_and_files_case(rank, ids, os.path.join(out_dir, "shards")))
        if smollm_dir is not None:
            _record(results, "smollm", lambda: _smollm_case(rank, smollm_dir))
    finally:
        with open(os.path.join(out_dir, f"results{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _write_smollm_job(job_dir):
    """Quantize the bundled SmolLM2 (int4 g64), shard it offline for 2 ranks (3 kv heads: 2 + 1)
    and save the unsharded model's logits; the ranks wait for the "ready" file."""
    from lowbit import _backend
    from lowbit import evaluate as E
    model, tok, _ = E.load_model(verbose=False)
    E.quantize_linears(model, "int4", group_size=64)
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building, "
              "and the tallest structure in Paris.", return_tensors="pt")["input_ids"]
    _backend.set_cpu_path("exact")
    try:
        with torch.inference_mode():
            ref = model(ids).logits
    finally:
        _backend.set_cpu_path(None)
    tp.shard_and_save(model, os.path.join(job_dir, "shards"), WORLD, uneven=True)
    model.config.save_pretrained(job_dir)
    torch.save({"ids": ids, "ref": ref}, os.path.join(job_dir, "job.pt"))
    open(os.path.join(job_dir, "ready"), "w").close()


@pytest.fixture(scope="module")
def dist_results():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        smollm_dir, why = None, "transformers is not installed"
        if HAVE_TRANSFORMERS:
            from lowbit import evaluate as E
            miss = E.missing_extras(need_model=True, need_text=False)
            if miss:
                why = f"bundled model extras missing: {miss}"
            else:
                smollm_dir = os.path.join(d, "smollm")
                os.makedirs(smollm_dir)
        # the ranks start (and import) while this process prepares the SmolLM2 shards
        ctx = mp.spawn(_worker, args=(_free_port(), d, smollm_dir), nprocs=WORLD, join=False)
        if smollm_dir is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the two ranks have the other cores
            try:
                _write_smollm_job(smollm_dir)
            except Exception:  # reported by the SmolLM2 test alone
                with open(os.path.join(smollm_dir, "failed"), "w") as f:
                    f.write(traceback.format_exc())
            except BaseException:
                for p in ctx.processes:
                    p.terminate()
                raise
            finally:
                torch.set_num_threads(threads)
        deadline = time.monotonic() + 900
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                pytest.fail("the 2-process gloo run did not finish in 900 s")
        out = []
        for r in range(WORLD):
            with open(os.path.join(d, f"results{r}.json")) as f:
                out.append(json.load(f))
        return out, why


def _assert_ok(dist_results, name):
    per_rank, _ = dist_results
    for r, res in enumerate(per_rank):
        assert name in res, f"rank {r} did not run {name}"
        assert res[name] == "ok", f"rank {r}, {name}:\n{res[name]}"


@needs_transformers
@pytest.mark.parametrize("label", [c[0] for c in MODEL_CASES])
def test_sharded_tiny_llama_matches_unsharded(dist_results, label):
    _assert_ok(dist_results, f"model:{label}")


@needs_transformers
def test_sharded_act_order_and_input_scale(dist_results):
    _assert_ok(dist_results, "act_order")


@needs_transformers
def test_device_mesh_and_shard_files_under_gloo(dist_results):
    _assert_ok(dist_results, "mesh_and_files")


@needs_transformers
def test_bundled_smollm2_sharded_over_two_ranks(dist_results):
    per_rank, why = dist_results
    if "smollm" not in per_rank[0]:
        pytest.skip(why)
    _assert_ok(dist_results, "smollm")
