"""lowbit.evaluate: the spec grammar (-> lowbit.QuantConfig), exact size accounting (layer
sizes and ``lowbit size``), the memory meter, calibration disjoint from the scored tokens, and
the evaluation pipeline on a tiny random model. Fast: no bundled model here (test_cli.py runs
it once)."""

import importlib.util
import math
import os

import pytest
import torch
from torch import nn

import lowbit
from lowbit import evaluate as E
from lowbit.quantize import QuantConfig

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


# ---- spec grammar -------------------------------------------------------------------------
@pytest.mark.parametrize("spec,want", [
    ("int8", dict(method="rtn", format="int8", group_size=-1, symmetric=True)),
    ("int8:llm.int8", dict(method="llm.int8", format="int8", group_size=-1)),
    ("int4", dict(method="rtn", format="int4", group_size=128, symmetric=False)),
    ("int4:g128", dict(method="rtn", format="int4", group_size=128, symmetric=False)),
    ("int4:g64:gptq", dict(method="gptq", format="int4", group_size=64, symmetric=False)),
    ("int4-sym:g64", dict(method="rtn", format="int4", group_size=64, symmetric=True)),
    ("int4:g128:awq", dict(method="awq", format="int4", group_size=128)),
    ("int4:g-1:sym", dict(format="int4", group_size=-1, symmetric=True)),
    ("nf4", dict(method="rtn", format="nf4", group_size=64, double_quant=False)),
    ("nf4-dq", dict(format="nf4", group_size=64, double_quant=True)),
    ("nf4:g32:dq", dict(format="nf4", group_size=32, double_quant=True)),
    ("nf4:awq", dict(method="awq", format="nf4", group_size=64)),
    ("fp4:dq", dict(format="fp4", double_quant=True)),
    ("mixed:4.5", dict(method="rtn", max_bits_per_weight=4.5)),
    ("mixed:4.25:gptq", dict(method="gptq", max_bits_per_weight=4.25)),
    ("int4:g64:gptq:damp_percent=0.05:act_order=false",
     dict(method="gptq", group_size=64, damp_percent=0.05, act_order=False)),
    ("int8:llm.int8:outlier_threshold=4", dict(method="llm.int8", outlier_threshold=4)),
])
def test_spec_grammar_builds_the_quant_config(spec, want):
    s = E.parse_spec(spec)
    assert s.label == spec
    assert isinstance(s.config, QuantConfig)
    for k, v in want.items():
        assert getattr(s.config, k) == v, (k, getattr(s.config, k), v)
    assert s.fmt == s.config.format
    assert s.needs_calibration == (s.config.method != "rtn" or s.config.max_bits_per_weight is not None)


def test_spec_fzero_and_fp32():
    s = E.parse_spec("int4:g32:fzero")
    assert s.config.default_format.get("zero_point") == "float" and not s.config.symmetric
    fp = E.parse_spec("fp32")
    assert fp.config is None and fp.fmt is None and not fp.needs_calibration
    assert E.describe(fp) == "fp32"
    assert E.describe(E.parse_spec("int4:g64:gptq")) == "int4 asym g64 gptq"
    assert E.describe(E.parse_spec("nf4-dq")) == "nf4 b64 dq"
    assert "4.5" in E.describe(E.parse_spec("mixed:4.5"))


@pytest.mark.parametrize("bad,match", [
    ("int3", "unknown format spec"), ("int4:g7", "group_size"), ("fp32:g64", "no modifiers"),
    ("int4:zz", "unknown modifier"), ("mixed", "budget"), ("mixed:x", "budget"),
    ("int4:g64:gptq:awq", "two methods"),
    ("int4:llm.int8", "int8"), ("int4:gptq:n_grid=3", "n_grid"), ("int8:g64:dq", "double_quant"),
    ("int4::g64", "empty modifier"), ("int4:gptq:bogus=1", "bogus"),
])
def test_bad_specs_fail_early_with_the_spec_named(bad, match):
    with pytest.raises(ValueError, match=match):
        E.parse_spec(bad)


def test_parse_specs_rejects_duplicates_and_empty():
    assert [s.label for s in E.parse_specs("fp32, int8 ,nf4")] == ["fp32", "int8", "nf4"]
    with pytest.raises(ValueError, match="twice"):
        E.parse_specs("int8,int8")
    with pytest.raises(ValueError, match="no formats"):
        E.parse_specs(" , ")


# ---- size accounting ----------------------------------------------------------------------
@pytest.mark.parametrize("opts", E.size_variants(), ids=lambda o: "-".join(map(str, o.values())))
def test_layout_bytes_equal_a_real_quantized_weight(opts):
    # exact, not from a bits table: for ragged groups, odd K and >256 blocks (dq chunks)
    kw = {k: v for k, v in opts.items() if k != "format"}
    g = torch.Generator().manual_seed(0)
    for N, K in [(3, 577), (5, 16447), (8, 64)]:
        qw = lowbit.quantize_weight(torch.randn(N, K, generator=g), opts["format"], **kw)
        assert E.layout_bytes(opts, N, K) == qw.nbytes, (N, K)


def test_size_variants_cover_the_registry():
    labels = {(o["format"], o.get("group_size"), o.get("symmetric"), o.get("double_quant", False))
              for o in E.size_variants()}
    for g in (32, 64, 128):
        assert ("int4", g, True, False) in labels and ("int4", g, False, False) in labels
        assert ("nf4", g, None, False) in labels and ("nf4", g, None, True) in labels
    assert {o["format"] for o in E.size_variants()} == set(lowbit.FORMATS)


def test_size_table_is_the_layout_average_times_params():
    shapes = E.llama_block_shapes(**E.LLAMA_70B)
    t = E.size_table(70_000_000_000, shapes)
    rows = {r["format"]: r for r in t["rows"]}
    assert rows["fp32"]["bytes"] == 280e9 and rows["bf16"]["bytes"] == 140e9
    w = sum(K * N for K, N in shapes)
    # int4 asym g128: K=8192 and 28672 are multiples of 128, so per weight exactly
    # 4 bits + (float32 scale + uint8 zero) / 128; derived here from formats.py's layout rules
    spec = lowbit.formats.FORMATS["int4"]
    per_group = (torch.finfo(torch.float32).bits + 8) / 128
    assert rows["int4 asym g128"]["bits_per_weight"] == pytest.approx(spec.bits + per_group, abs=1e-12)
    for name, r in rows.items():
        if r["options"] is not None:
            nbytes = sum(E.layout_bytes(r["options"], N, K) for K, N in shapes)
            assert r["bytes"] == pytest.approx(70e9 * nbytes / w, rel=1e-12)
    # float params kept in bf16 move every quantized row by the difference
    t2 = E.size_table(70_000_000_000, shapes, float_params=2_000_000_000)
    r2 = {r["format"]: r for r in t2["rows"]}
    b = rows["nf4 b64"]["bits_per_weight"]
    assert r2["nf4 b64"]["bytes"] == pytest.approx(68e9 * b / 8 + 2e9 * 2, rel=1e-12)
    with pytest.raises(ValueError):
        E.size_table(10, shapes, float_params=11)


@pytest.mark.parametrize("text,want", [("70e9", 70_000_000_000), ("70B", 70_000_000_000),
                                       ("7.5b", 7_500_000_000), ("135M", 135_000_000),
                                       ("1_000", 1000), (8e9, 8_000_000_000)])
def test_parse_count(text, want):
    assert E.parse_count(text) == want


@pytest.mark.parametrize("bad", ["", "abc", "0", "-5", "nan", "1x"])
def test_parse_count_rejects(bad):
    with pytest.raises(ValueError):
        E.parse_count(bad)


class _OutlierLike(nn.Module):
    """A stand-in for a lowbit layer with float outlier columns (counted generically)."""

    __module__ = "lowbit.test_stub"

    def __init__(self, lin):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.inner = lowbit.QuantLinear.from_linear(lin, "int8")
        self.register_buffer("outlier_cols", torch.zeros(lin.out_features, 3))
        self.bias = nn.Parameter(torch.zeros(lin.out_features))


def test_size_stats_counts_every_stored_tensor_once():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    model = nn.ModuleDict({"emb": emb, "a": nn.Linear(64, 32), "b": nn.Linear(32, 64, bias=False),
                           "lm_head": nn.Linear(64, 50, bias=False)})
    model["lm_head"].weight = emb.weight  # tied
    fp = E.size_stats(model)
    assert fp["linear_weights"] == 64 * 32 + 32 * 64 and fp["n_quantized"] == 0
    assert fp["model_bytes"] == 4 * (50 * 64 + 64 * 32 + 32 + 32 * 64)  # tied weight once
    model["a"] = lowbit.QuantLinear.from_linear(model["a"], "int4", group_size=32)
    model["b"] = _OutlierLike(model["b"])
    q = E.size_stats(model)
    qa = model["a"].qweight.nbytes
    qb = model["b"].inner.qweight.nbytes + 4 * 64 * 3  # codes + scales + outlier columns
    assert q["linear_bytes"] == qa + qb and q["n_quantized"] == 2
    assert q["bits_per_weight"] == pytest.approx(8 * (qa + qb) / (64 * 32 + 32 * 64))
    assert q["model_bytes"] == 4 * 50 * 64 + qa + 4 * 32 + qb + 4 * 64


# ---- memory meter -------------------------------------------------------------------------
def test_memory_meter_sees_a_transient_allocation():
    meter = E.MemoryMeter()
    if not meter.available:
        pytest.skip("peak memory is not measurable on this platform")
    meter.start()
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    del x
    peak = meter.peak_above_base()
    assert 60 << 20 <= peak < 200 << 20, peak
    meter.reset_peak()  # a new phase forgets it (freed memory went back to the OS)
    assert meter.peak_above_base() < 60 << 20


# ---- calibration and the pipeline on a tiny model -----------------------------------------
def _word_tokenizer_and_text(tmp_path, n_words=3000):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    words = "the quick brown fox jumps over a lazy dog while seven cats watch quietly".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(len(words), (n_words,), generator=g))
    path = tmp_path / "text.txt"
    path.write_text(text)
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    return tok, path


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_calibration_is_disjoint_from_the_scored_tokens(tmp_path):
    tok, path = _word_tokenizer_and_text(tmp_path)
    ids, _ = E.load_tokens(tok, 10 ** 9, str(path))
    scored = 1024
    batches, info = E.calibration_batches(tok, scored, str(path), n_samples=4, seq_len=64,
                                          batch_size=2)
    assert info["first_token"] >= scored  # the text is short: calibration follows the scored part
    got = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    start = info["first_token"]
    assert torch.equal(got, ids[start:start + 4 * 64])
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 64), (2, 64)]
    with pytest.raises(ValueError, match="too few"):
        E.calibration_batches(tok, scored, str(path), n_samples=1000, seq_len=64)


def _tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_apply_spec_uses_quantize_model_and_fake_quant_matches(tmp_path):
    tok, _ = _word_tokenizer_and_text(tmp_path, 50)
    base = _tiny_llama(tok)
    ids = torch.randint(2, len(tok), (1, 12), generator=torch.Generator().manual_seed(3))
    import copy
    spec = E.parse_spec("int4:g32")
    q = copy.deepcopy(base)
    report = E.apply_spec(q, spec)
    assert report is not None and len(report.quantized) == 14  # 7 per block, lm_head kept
    assert isinstance(q.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
    assert type(q.lm_head) is nn.Linear
    ref = copy.deepcopy(base)
    E.quantize_linears(ref, "int4", group_size=32)
    with torch.inference_mode():
        assert torch.equal(q(ids).logits, ref(ids).logits)  # same layers, same codes
        f = copy.deepcopy(base)
        E.apply_spec(f, spec, fake_quant=True)
        torch.testing.assert_close(f(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)
    assert E.size_stats(f)["linear_bytes"] == E.size_stats(q)["linear_bytes"]
    with pytest.raises(ValueError, match="round-to-nearest"):
        E.apply_spec(copy.deepcopy(base), E.parse_spec("int4:gptq"), fake_quant=True)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_evaluate_tiny_folder_with_calibrated_method_and_save_dir(tmp_path, monkeypatch):
    tok, path = _word_tokenizer_and_text(tmp_path)
    real_apply = E.apply_spec

    def apply_or_fail(model, spec, *a, **k):  # one spec breaks: the others still run
        if spec.label == "nf4":
            raise RuntimeError("simulated failure")
        return real_apply(model, spec, *a, **k)

    monkeypatch.setattr(E, "apply_spec", apply_or_fail)
    seen = []
    folder = tmp_path / "tiny"
    _tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    # a calibrated spec from what lowbit.quantize offers
    calibrated = next(s for s, mod in (("int4:g32:gptq", "gptq"), ("int4:g32:awq", "awq"),
                                       ("mixed:6", "mixed"))
                      if importlib.util.find_spec(f"lowbit.quantize.{mod}") is not None)
    specs = ["fp32", "nf4", "int4:g32", calibrated]
    out = E.evaluate(E.parse_specs(",".join(specs)), tokens=256, ctx=64, model_path=str(folder),
                     text_path=str(path), decode_tokens=2, progress=False, verbose=False,
                     calib_samples=4, calib_seq_len=32, cpu_path="exact",
                     save_dir=str(tmp_path / "saved"), on_result=lambda r: seen.append(len(r)))
    assert seen == [1, 2, 3, 4]
    res = {r["config"]: r for r in out["results"]}
    assert list(res) == specs
    assert res.pop("nf4")["error"] == "RuntimeError: simulated failure"
    cal = out["meta"]["calibration"]
    assert cal["first_token"] >= out["meta"]["tokens"] and cal["samples"] == 4
    assert res["fp32"]["method"] is None and res["int4:g32"]["method"] == "rtn"
    assert res[calibrated]["method"] == E.parse_spec(calibrated).method
    if calibrated == "mixed:6":
        assert res["mixed:6"]["bits_per_weight"] <= 6.0 + 1e-9
    assert res[calibrated]["extra"]["calibration_tokens"] == 4 * 32
    for r in res.values():
        assert 1 < r["perplexity"] < 1e4
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        if E.MemoryMeter().available:
            assert r["run_peak_mb"] >= 0 and r["decode_peak_mb"] >= 0 and r["quant_peak_mb"] >= 0
    # saved checkpoints reload into the float architecture with the same perplexity
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(folder)
    saved = res["int4:g32"]["extra"]["saved"]["path"]
    model = lowbit.load(saved, lambda: AutoModelForCausalLM.from_config(cfg)).eval()
    ids, _ = E.load_tokens(tok, 256, str(path))
    assert math.isclose(E.perplexity(model, ids, 64, progress=False)["perplexity"],
                        res["int4:g32"]["perplexity"], rel_tol=1e-6)
    table = E.results_table(out["results"])
    assert "int4 asym g32" in table and "peak MB" in table
    assert "nf4 (nf4 b64): FAILED: RuntimeError: simulated failure" in table
    if importlib.util.find_spec("matplotlib") is not None:
        E.plot(out["results"], str(tmp_path / "p.png"))  # the failed spec is left out
        assert (tmp_path / "p.png").stat().st_size > 0


def test_gguf_cache_key_follows_content_not_mtime_and_prunes_old_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    data = bytearray(torch.randint(0, 256, (9 << 20,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    f.write_bytes(data)
    first = E._gguf_cache_path(str(f))
    os.utime(f, ns=(1, 1))  # a reinstall: same bytes, new mtime
    assert E._gguf_cache_path(str(f)) == first
    data[-1] ^= 1  # the content changes (here in the tail), so does the key
    f.write_bytes(data)
    assert E._gguf_cache_path(str(f)) != first
    # copies made under the old mtime keys of this name and size go once a new one is written
    models = tmp_path / "cache" / "models"
    size = len(data)
    for name in (f"m-{size}-1795767327871146130", f"m-{size}-17", f"m-{size + 1}-17", f"other-{size}-17"):
        (models / name).mkdir(parents=True)
    os.makedirs(first)
    gone = E._prune_legacy_copies(first)
    assert sorted(os.path.basename(g) for g in gone) == [f"m-{size}-17", f"m-{size}-1795767327871146130"]
    assert sorted(os.listdir(models)) == sorted([os.path.basename(first), f"m-{size + 1}-17",
                                                 f"other-{size}-17"])
