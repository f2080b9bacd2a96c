"""quantize_model beyond Llama: GPT-2's Conv1D layers, post-norm blocks (BERT), encoder-decoder
models (T5) and their float-only modules, on tiny random transformers models."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantLinear
from lowbit import evaluate as E
from lowbit.nn import conv1d_to_linear, is_conv1d
from lowbit.quantize import QuantConfig, quantize_model

transformers = pytest.importorskip("transformers")
from quant_helpers import fold_random_scales, token_batches  # noqa: E402

V = 96


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # trained-like per-channel gains, so that AWQ has something to do
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                p.copy_(torch.exp(0.5 * torch.randn_like(p)))
    return model


def assert_reloads(model, path, builder, ids, logits):
    """lowbit.save(model) then lowbit.load into builder(): the same logits on ids, and
    generate() runs. Returns the reloaded model."""
    lowbit.save(model, path)
    again = lowbit.load(path, builder)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    out = again.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (ids.shape[0], 7)
    return again


def conv1d_names(model):
    return [n for n, m in model.named_modules() if is_conv1d(m)]


@torch.no_grad()
def test_from_linear_of_a_conv1d_equals_that_of_its_linear():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    assert is_conv1d(conv) and conv.weight.shape == (64, 192)  # [in, out]
    lin = conv1d_to_linear(conv)
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), conv(x), rtol=1e-6, atol=1e-6)
    for fmt, opts in (("int4", {"group_size": 32}), ("nf4", {}), ("int8", {})):
        a = QuantLinear.from_linear(conv, fmt, **opts)
        b = QuantLinear.from_linear(lin, fmt, **opts)
        assert a.qweight.shape == (192, 64)
        for k, v in b.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(a.state_dict()[k], v), k


@pytest.mark.parametrize("fmt", [{"format": "int4", "group_size": 32}, {"format": "int8"},
                                 {"format": "nf4", "double_quant": True}])
def test_gpt2_rtn_matches_fake_quantization_and_reloads(fmt, tmp_path, exact_cpu_path):
    model = tiny_gpt2()
    names = conv1d_names(model)
    assert len(names) == 8
    ids = token_batches(vocab=V)[0]
    fake = copy.deepcopy(model)
    E.fake_quantize_config(fake, QuantConfig(**fmt))
    quantize_model(model, QuantConfig(**fmt), progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert not conv1d_names(model)
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, fake(ids).logits, rtol=1e-4, atol=1e-4)
    assert_reloads(model, tmp_path / "gpt2.lowbit", lambda: tiny_gpt2(seed=1), ids, got)


@torch.no_grad()
def test_a_skipped_conv1d_stays_a_conv1d():
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(format="int8", rules=[("c_fc", "skip")]), progress=False)
    for name, mod in model.named_modules():
        if name.endswith("c_fc"):
            assert is_conv1d(mod)
        elif name.endswith(("c_attn", "c_proj")):
            assert isinstance(mod, QuantLinear)


@torch.no_grad()
def test_awq_fold_is_refused_where_the_norm_also_feeds_the_residual():
    """BERT is post-norm: attention.output.LayerNorm's output is both intermediate.dense's input
    and the residual of the block's output LayerNorm, so 1/s cannot go into that norm."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4)).eval()
    ids = token_batches(vocab=V)[0]
    ref = model(ids).last_hidden_state
    folded = fold_random_scales(model, model.encoder.layer, ids)
    assert folded[("intermediate.dense",)] is None
    torch.testing.assert_close(model(ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=V, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


@torch.no_grad()
def test_t5_keeps_its_fp32_modules_and_runs():
    model = tiny_t5()
    ids = token_batches(vocab=V)[0]
    quantize_model(model, QuantConfig(format="int8"), progress=False)
    wo = [n for n, m in model.named_modules() if n.endswith(".wo")]
    assert wo and all(isinstance(model.get_submodule(n), nn.Linear) for n in wo)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    rules = {r.name: r.rule for r in model.lowbit_report.layers}
    assert all("_keep_in_fp32_modules" in rules[n] for n in wo)
    model(input_ids=ids, decoder_input_ids=ids[:, :5])
    # an explicit rule still decides
    other = tiny_t5()
    quantize_model(other, QuantConfig(format="int8", rules=[("wo", "int8")]), progress=False)
    assert all(isinstance(other.get_submodule(n), QuantLinear) for n in wo)


def test_t5_calibration_errors_name_the_way_out():
    model = tiny_t5()
    with pytest.raises(ValueError, match="dicts of keyword arguments"):
        quantize_model(model, QuantConfig(method="gptq", format="int4", group_size=32),
                       calibration=token_batches(vocab=V), progress=False)
    calib = [{"input_ids": t, "decoder_input_ids": t[:, :8]} for t in token_batches(vocab=V)]
    quantize_model(tiny_t5(), QuantConfig(method="gptq", format="int4", group_size=32),
                   calibration=calib, progress=False)
    with pytest.raises(ValueError, match="causal LM"):
        quantize_model(tiny_t5(), QuantConfig(format="int4", group_size=32, max_bits_per_weight=5.0),
                       calibration=calib, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_quantized_gpt2_on_cuda_matches_cpu(exact_cpu_path):
    model = tiny_gpt2()
    quantize_model(model, QuantConfig(format="int4", group_size=32), progress=False)
    ids = token_batches(vocab=V)[0]
    cpu = model(ids).logits
    model.to("cuda")
    torch.testing.assert_close(model(ids.cuda()).logits.cpu(), cpu, rtol=1e-3, atol=1e-3)


# ---- layers and calls that a plain Linear-by-Linear replacement gets wrong -----------------
class _Router(nn.Linear):
    """An nn.Linear subclass with its own forward (MoE routers return logits and weights)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.softmax(-1)


class _RoutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = _Router(64, 4)
        self.proj = nn.Linear(64, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)  # reads out_proj.weight

    def forward(self, x):
        _, w = self.router(x)
        h = self.proj(x) * w.sum(-1, keepdim=True)
        return self.attn(h, h, h)[0]


@torch.no_grad()
def test_linear_subclass_with_own_forward_stays_float_and_weight_readers_work():
    torch.manual_seed(0)
    model = _RoutedNet().eval()
    x = torch.randn(2, 5, 64)
    ref = model(x)
    quantize_model(model, QuantConfig(format="int8"), progress=False)
    assert type(model.router) is _Router  # left alone, and the report says why
    row = {r.name: r for r in model.lowbit_report.layers}["router"]
    assert row.method == "skip" and "overrides nn.Linear.forward" in row.rule
    assert any(n.startswith("router:") for n in model.lowbit_report.notes)
    # nn.MultiheadAttention's out_proj (an nn.Linear subclass keeping its forward) is quantized;
    # the attention reads out_proj.weight, which a QuantLinear decodes on access
    assert isinstance(model.proj, QuantLinear) and isinstance(model.attn.out_proj, QuantLinear)
    torch.testing.assert_close(model.attn.out_proj.weight, model.attn.out_proj.dequantize())
    assert float((model(x) - ref).abs().max()) < 0.02 * float(ref.abs().max())
    with pytest.raises(TypeError, match="overrides nn.Linear.forward"):
        QuantLinear.from_linear(_Router(64, 4), "int8")


def test_quant_linear_weight_is_a_read_only_copy():
    q = QuantLinear.from_linear(nn.Linear(64, 32).to(torch.bfloat16), "int4", group_size=32)
    w = q.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, q.dequantize(torch.bfloat16))
    assert type(w @ torch.ones(64, dtype=torch.bfloat16)) is torch.Tensor
    before = q.dequantize()
    for write in (lambda t: t.copy_(t), lambda t: t.__setitem__(0, 1.0), lambda t: t.add_(1),
                  lambda t: t.mul_(-2), lambda t: t.mul_(0), lambda t: t.div_(float("inf")),
                  lambda t: t.mul_(torch.ones(2)), lambda t: t.mul_(t),
                  lambda t: t.div_(2, rounding_mode="floor"), lambda t: t.__iadd__(2)):
        with pytest.raises(RuntimeError, match="in-place .* QuantLinear's weight"):
            write(q.weight)
    assert torch.equal(q.dequantize(), before)  # nothing changed
    w = q.weight
    del q  # the layer is gone: nothing to scale
    with pytest.raises(RuntimeError, match="in-place"):
        w.mul_(2)


@pytest.mark.parametrize("fmt,opts", [("int8", {}), ("int4", {"group_size": 32}),
                                      ("int4", {"symmetric": True}),
                                      ("int4", {"zero_point": "float", "group_size": 32}),
                                      ("nf4", {"double_quant": True}), ("fp4", {})])
def test_quant_linear_weight_scaling_in_place_reaches_the_packed_weight(fmt, opts):
    """weight.div_(2 ** k) / mul_ (what RWKV does to two weights per block) scales the packed
    weight's scales: exactly for powers of two, codes untouched, caches rebuilt, and mul_
    undoes div_ bit for bit; outlier columns scale with it."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    q = QuantLinear.from_linear(lin, fmt, **opts)
    x = torch.randn(3, 128)
    y0 = q(x)  # (caches the CPU packed copy)
    w0, codes = q.dequantize(), q.weight_data.clone()
    q.weight.div_(8)
    assert torch.equal(q.weight_data, codes)
    assert torch.equal(q.dequantize(), w0 / 8)
    torch.testing.assert_close(q(x), (y0 - q.bias) / 8 + q.bias, rtol=1e-5, atol=1e-5)
    w = q.weight
    w *= 8
    assert torch.equal(w, w0) and torch.equal(q.dequantize(), w0) and torch.equal(q(x), y0)
    q.weight.mul_(torch.tensor(3.0))  # not a power of two: one rounding per scale (and offset)
    if opts.get("zero_point") == "float":
        # q * s + m: the two terms (up to ~2x the largest weight) are rounded before they
        # cancel, so a few float32 roundings of that size, times the 3
        tol = dict(rtol=0, atol=3 * 2 ** -19 * float(w0.abs().max()))
    else:  # products of the scaled scale (or absmax) and the code: a few roundings, relative
        tol = dict(rtol=2 ** -21, atol=0)
    torch.testing.assert_close(q.dequantize(), w0 * 3, **tol)
    w3 = q.dequantize()
    for divide in (False, True):  # float32 scales of ~1e-3 times / over 1e45: out of range
        with pytest.raises(ValueError, match="over- or underflows"):
            q.scale_weight_(1e45, divide=divide)
    assert torch.equal(q.dequantize(), w3)  # refused: nothing changed


def test_scaling_in_place_covers_outlier_columns():
    torch.manual_seed(1)
    lin = nn.Linear(64, 16)
    cols = torch.tensor([3, 40])
    q = QuantLinear.from_quantized(lowbit.quantize_weight(lin.weight.detach(), "int8"), lin.bias,
                                   outlier_cols=cols, outlier_weight=lin.weight.detach()[:, cols])
    w0 = q.dequantize()
    q.weight.div_(4)
    assert torch.equal(q.dequantize(), w0 / 4)


def tiny_rwkv(seed=0):
    from transformers import RwkvConfig, RwkvForCausalLM
    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=V, hidden_size=64, num_hidden_layers=4, attention_hidden_size=64,
                     intermediate_size=128, context_length=64, rescale_every=2)
    return RwkvForCausalLM(cfg).eval()


@torch.no_grad()
def test_rwkv_rescales_its_quantized_layers(tmp_path):
    """RWKV divides two weights of every block by 2 ** (block // rescale_every) in place on its
    first inference forward (and multiplies them back for training): with QuantLinear layers
    that reaches the packed scales, so the quantized model runs, matches its fake-quantized
    float twin, and survives train() / eval() round trips."""
    model = tiny_rwkv()
    cfg = QuantConfig(format="int8")
    fake = copy.deepcopy(model)
    E.fake_quantize_config(fake, cfg)
    ids = token_batches(vocab=V)[0]
    quantize_model(model, cfg, progress=False)
    assert isinstance(model.rwkv.blocks[3].attention.output, QuantLinear)
    got = model(ids).logits
    assert model.rwkv.layers_are_rescaled
    torch.testing.assert_close(got, fake(ids).logits, rtol=1e-4, atol=1e-4)
    model.train()
    model(ids)  # multiplies the weights back
    model.eval()
    assert torch.equal(model(ids).logits, got)
    out = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (ids.shape[0], 7)
    # saved rescaled: the file says so, and the fresh model does not rescale a second time
    again = assert_reloads(model, tmp_path / "rwkv.lowbit", lambda: tiny_rwkv(seed=1), ids, got)
    assert again.rwkv.layers_are_rescaled


class _TwoWidths(nn.Module):
    """A block whose last two linears (different input widths) never run on the calibration
    data, like experts no calibration token is routed to."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.unused_in = nn.Linear(64, 128)
        self.unused_out = nn.Linear(128, 64)

    def forward(self, h):
        return h + self.a(h)


class _Stack(nn.Module):
    """Blocks that must each receive their own index (as Zamba 2's do) and a per-block mask."""

    def __init__(self, n=3):
        super().__init__()
        self.emb = nn.Embedding(V, 64)
        self.layers = nn.ModuleList(_TwoWidths() for _ in range(n))

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for i, blk in enumerate(self.layers):
            h = _call_indexed(blk, h, i)
        return h


def _call_indexed(blk, h, i):
    return blk.__call__(h, layer_idx=i, gain=torch.full((1,), float(i + 1)))


def _indexed_forward(self, h, layer_idx, gain):
    assert self._idx == layer_idx, f"block {self._idx} called with layer_idx={layer_idx}"
    return h + self.a(h) * gain


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_block_calibration_uses_each_blocks_own_arguments(method):
    torch.manual_seed(0)
    model = _Stack().eval()
    for i, blk in enumerate(model.layers):
        blk._idx = i
        blk.forward = _indexed_forward.__get__(blk)
    calib = token_batches(n=2, batch=2, seq=16)
    ids = calib[0]
    with torch.no_grad():
        ref = model(ids)
    quantize_model(model, QuantConfig(method=method, format="int8"), calibration=calib,
                   progress=False)
    rep = {r.name: r for r in model.lowbit_report.layers}
    assert rep["layers.2.unused_out"].method == method  # never called: round-to-nearest
    with torch.no_grad():
        assert float((model(ids) - ref).abs().max()) < 0.05 * float(ref.abs().max())


@torch.no_grad()
def test_block_inputs_follow_sliding_and_global_layers():
    """Gemma 3 alternates sliding-window and global layers (different masks and rotary
    tables): replaying block 0's arguments for every block would feed block 2 the wrong ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lowbit.quantize import blocks as B
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           sliding_window=8, max_position_embeddings=64,
                           layer_types=["sliding_attention", "full_attention"] * 2)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = token_batches(n=1, batch=2, seq=32)[0]
    want = model(ids, output_hidden_states=True).hidden_states
    calls = B.capture_block_inputs(model, model.model.layers, [{"input_ids": ids}])
    assert calls.per_block is not None
    inputs = calls.first
    for i, blk in enumerate(model.model.layers):
        inputs = calls.inputs_for(i, inputs)
        torch.testing.assert_close(inputs[0].hidden, want[i])
        inputs = B.run_block(blk, inputs)
    # a Llama's blocks are called alike: the capture stops at the first block
    from quant_helpers import tiny_llama
    llama = tiny_llama(layers=2)
    assert B.capture_block_inputs(llama, llama.model.layers, [{"input_ids": ids}]).per_block is None


def test_calibration_turns_the_cache_off_through_kwargs():
    from lowbit.quantize import blocks as B

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"use_cache": True})()
            self.seen = []

        def forward(self, input_ids, **kwargs):
            self.seen.append(kwargs.get("use_cache"))
            return input_ids

    net = Net()
    B.call_model(net, {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    assert net.seen == [False]


@torch.no_grad()
def test_output_embeddings_under_another_name_stay_float_by_default():
    model = tiny_gpt2()

    class Renamed(nn.Module):  # an LM whose head is not called lm_head (BioGPT, Whisper, ...)
        def __init__(self, base):
            super().__init__()
            self.base = base.transformer
            self.proj_out = nn.Linear(64, V, bias=False)

        def get_output_embeddings(self):
            return self.proj_out

        def forward(self, input_ids):
            return self.proj_out(self.base(input_ids).last_hidden_state)

    m = Renamed(copy.deepcopy(model))
    quantize_model(m, QuantConfig(format="int8"), progress=False)
    assert type(m.proj_out) is nn.Linear
    assert "output embeddings" in {r.name: r for r in m.lowbit_report.layers}["proj_out"].rule
    m2 = Renamed(copy.deepcopy(model))
    quantize_model(m2, QuantConfig(format="int8", rules={"proj_out": "int4"}), progress=False)
    assert isinstance(m2.proj_out, QuantLinear) and m2.proj_out.fmt == "int4"


def test_large_float_parameters_outside_linear_layers_are_noted():
    class Net(nn.Module):  # experts as a bare 3-D parameter of a layout lowbit does not know
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 64)
            self.a = nn.Linear(64, 64)
            self.experts_w = nn.Parameter(torch.randn(4, 64, 64))
            self.small = nn.Parameter(torch.randn(2, 2))

        def forward(self, ids):
            return self.a(self.emb(ids)) @ self.experts_w[0] + self.small.sum()

    m = Net()
    quantize_model(m, QuantConfig(format="int8"), progress=False)
    notes = [n for n in m.lowbit_report.notes if "stay in float" in n]
    assert len(notes) == 1 and "experts_w" in notes[0] and "16,388 weights" in notes[0]  # 4 x 64 x 64 + 2 x 2
    plain = tiny_gpt2()  # nothing of the kind: no note
    quantize_model(plain, QuantConfig(format="int8"), progress=False)
    assert not [n for n in plain.lowbit_report.notes if "stay in float" in n]


# ---- nn.Linear subclasses whose own forward is still x @ W^T + b ---------------------------
def tiny_falcon(seed=0, **kw):
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **kw)
    return FalconForCausalLM(cfg).eval()


def falcon_linear_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "FalconLinear"]


@pytest.mark.parametrize("kw", [{}, {"new_decoder_architecture": True, "num_kv_heads": 2},
                                {"multi_query": True, "parallel_attn": False, "bias": True}])
def test_falcon_linear_layers_are_quantized_and_reload(kw, tmp_path, exact_cpu_path):
    """FalconLinear overrides forward with `input @ W.T + b`: the same function as nn.Linear,
    so it must be quantized (it used to be left in float, i.e. the whole model), and load()
    must rebuild it on the meta skeleton, where its forward cannot be probed."""
    model = tiny_falcon(**kw)
    names = falcon_linear_names(model)
    assert len(names) == 8
    cfg = QuantConfig(format="int4", group_size=32)
    fake = copy.deepcopy(model)
    E.fake_quantize_config(fake, cfg)
    ids = token_batches(vocab=V)[0]
    quantize_model(model, cfg, progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert any("FalconLinear" in n and "x @ W^T + b" in n for n in model.lowbit_report.notes)
    with torch.no_grad():
        got = model(ids).logits
        want = fake(ids).logits
        assert float((want - tiny_falcon(**kw)(ids).logits).abs().max()) > 1e-3  # quantized
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    again = assert_reloads(model, tmp_path / "falcon.lowbit", lambda: tiny_falcon(seed=1, **kw),
                           ids, got)
    assert all(isinstance(again.get_submodule(n), QuantLinear) for n in names)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
@pytest.mark.parametrize("config", [
    {"method": "gptq", "format": "int4", "group_size": 32},
    {"method": "awq", "format": "int4", "group_size": 32},
    {"method": "llm.int8", "format": "int8"},
    {"format": "int4", "group_size": 32, "max_bits_per_weight": 5.0},
])
def test_calibrated_methods_quantize_every_conv1d_and_falcon_linear(arch, config):
    """GPT-2's Conv1D layers and Falcon's FalconLinear (nn.Linear subclasses with their own
    forward) all become QuantLinear under the calibrated methods, close to the float model."""
    model, names_of = (tiny_gpt2(), conv1d_names) if arch == "gpt2" else \
        (tiny_falcon(), falcon_linear_names)
    ids = token_batches(vocab=V)[0]
    with torch.no_grad():
        ref = model(ids).logits
    names = names_of(model)
    assert names
    quantize_model(model, QuantConfig(**config), calibration=token_batches(vocab=V), progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.isfinite(got).all()
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.2


class _Rewritten(nn.Linear):  # Falcon-style: its own forward, the same function
    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class _Scaled(nn.Linear):  # its own forward, another function (a logit scale, a gain)
    def forward(self, x):
        return super().forward(x) * 1.5


@torch.no_grad()
def test_only_linear_subclasses_computing_x_wt_b_are_quantized():
    from lowbit.nn import computes_linear, is_linear_like
    torch.manual_seed(0)
    net = nn.Sequential(_Rewritten(64, 64), nn.ReLU(), _Scaled(64, 64), _Router(64, 32),
                        _Rewritten(64, 32, bias=False)).eval()
    assert computes_linear(net[0]) and computes_linear(net[4])
    assert not computes_linear(net[2]) and not computes_linear(net[3])
    assert not is_linear_like(_Rewritten(64, 64, device="meta"))  # cannot be probed
    m = nn.Sequential(_Rewritten(64, 64), nn.ReLU(), _Scaled(64, 64), _Rewritten(64, 32)).eval()
    x = torch.randn(3, 64)
    ref = m(x)
    quantize_model(m, QuantConfig(format="int8"), progress=False)
    assert isinstance(m[0], QuantLinear) and isinstance(m[3], QuantLinear)
    assert type(m[2]) is _Scaled
    row = {r.name: r for r in m.lowbit_report.layers}["2"]
    assert row.method == "skip" and "overrides nn.Linear.forward" in row.rule
    assert float((m(x) - ref).abs().max()) < 0.02 * float(ref.abs().max())
    with pytest.raises(TypeError, match="overrides nn.Linear.forward"):
        QuantLinear.from_linear(_Scaled(64, 4), "int8")
    assert isinstance(QuantLinear.from_linear(_Rewritten(64, 4), "int8"), QuantLinear)


# ---- layers whose weight the model reads instead of calling them (Mamba's dt_proj) --------
def tiny_mamba(seed=0):
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=V, hidden_size=64, state_size=8, num_hidden_layers=2,
                      expand=2, conv_kernel=4, time_step_rank=4)
    return MambaForCausalLM(cfg).eval()


def test_mixed_precision_plans_layers_read_by_weight(tmp_path):
    """Mamba's slow path computes `dt_proj.weight @ x`: the layer is never called, so no
    sensitivity can be measured for it. The plan used to refuse the whole model; now such a
    layer gets the config's own format, the others share the rest of the budget."""
    pytest.importorskip("transformers.models.mamba")
    model = tiny_mamba()
    ids = token_batches(vocab=V)[0]
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(format="int4", group_size=32, max_bits_per_weight=5.0)
    quantize_model(model, cfg, calibration=token_batches(vocab=V), progress=False)
    dt = [n for n, _ in model.named_modules() if n.endswith("dt_proj")]
    assert len(dt) == 2
    rep = {r.name: r for r in model.lowbit_report.layers}
    for n in dt:
        m = model.get_submodule(n)
        assert isinstance(m, QuantLinear) and m.fmt == "int4" and m.qweight.group_size == 32
        assert rep[n].rule == "mixed-precision plan"
    assert any("never called on the calibration data" in n for n in model.lowbit_report.notes)
    quantized = [r for r in model.lowbit_report.layers if r.method != "skip"]
    bits = sum(r.bits_per_weight * r.info["weights"] for r in quantized)
    assert bits <= 5.0 * sum(r.info["weights"] for r in quantized) + 1e-6
    with torch.no_grad():
        got = model(ids).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.2
    path = tmp_path / "mamba.lowbit"
    lowbit.save(model, path)
    again = lowbit.load(path, lambda: tiny_mamba(seed=1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)


def test_mixed_plan_gives_unmeasured_layers_the_config_format():
    from lowbit.quantize import mixed as M

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 64)
            self.a = nn.Linear(64, 64)
            self.dt = nn.Linear(64, 64)
            self.head = nn.Linear(64, V)

        def forward(self, input_ids):
            h = self.a(self.emb(input_ids)) @ self.dt.weight.T
            return self.head(torch.relu(h))

    torch.manual_seed(0)
    net = Net().eval()
    targets = {"a": net.a, "dt": net.dt}
    calib = token_batches(vocab=V, n=2)
    plan = M.plan_mixed_precision(net, targets, calib,
                                  QuantConfig(format="int4", group_size=64, max_bits_per_weight=8.5))
    assert plan.choices["dt"]["format"] == "int4" and plan.choices["dt"]["group_size"] == 64
    assert plan.choices["a"]["format"] == "int8"  # the budget left goes to the measured layer
    assert any("never called" in n and "dt" in n for n in plan.notes)
    # a budget that cannot hold the pinned layer: it is planned as if insensitive
    tight = M.plan_mixed_precision(net, targets, calib,
                                   QuantConfig(format="int8", max_bits_per_weight=4.6))
    assert tight.bits_per_weight <= 4.6 and any("as if insensitive" in n for n in tight.notes)
    with pytest.raises(ValueError, match="never ran"):  # not a module of the model: an error
        M.plan_mixed_precision(net, {"stray": nn.Linear(64, 8)}, calib,
                               QuantConfig(max_bits_per_weight=6.0))
