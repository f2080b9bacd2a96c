"""The `lowbit` command (info, selftest, bench, eval, size) and its helpers (tolerance, eval configs).

Everything runs in-process through ``lowbit.cli.main(argv)``. Model tests need the eval extras
and skip, saying so, without them. Fast: tiny shapes and token counts throughout.
"""

import importlib.util
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import cli, evaluate, testing

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
MISSING_FOR_BUNDLED = evaluate.missing_extras(need_model=True, need_text=True)


# ---- info ---------------------------------------------------------------------------------
def test_info_prints_the_active_isa(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU ISA in use" in out
    assert str(lowbit.backend_info()["cpu_isa"]) in out


def test_info_json_is_backend_info(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_isa"] == lowbit.backend_info()["cpu_isa"]
    assert "supported_isas" in info


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "selftest" in capsys.readouterr().out


# ---- selftest -----------------------------------------------------------------------------
def test_selftest_passes_on_this_machine(capsys):
    assert cli.main(["selftest", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "selftest: PASS" in out
    for label, _, _ in cli.SELFTEST_FORMATS:
        assert label in out


def test_selftest_reports_a_wrong_kernel(monkeypatch, capsys):
    # A kernel that gets one weight wrong must fail both checks, and the command must exit 1.
    from lowbit import _backend
    real_deq, real_lin = _backend.dequantize, _backend.linear

    def bad_dequantize(qw, dtype, **kw):
        out = real_deq(qw, dtype, **kw)
        out[-1, -1] += 1.0
        return out

    def bad_linear(x2d, qw, bias, out, **kw):
        real_lin(x2d, qw, bias, out, **kw)
        out[..., -1] += 10.0  # |y| is ~10 here: far outside either path's bound
        return out

    monkeypatch.setattr(_backend, "dequantize", bad_dequantize)
    monkeypatch.setattr(_backend, "linear", bad_linear)
    shapes = ((2, 24, 96),)
    res = cli.run_selftest(formats=cli.SELFTEST_FORMATS[:2], shapes=shapes)
    assert not res["ok"]
    whats = {f.what for f in res["failures"]}
    paths = cli._cpu_paths()
    assert whats == {"dequantize"} | ({"linear exact", "linear fast"} if len(paths) > 1 else {"linear"})
    monkeypatch.setattr(cli, "SELFTEST_SHAPES", shapes)
    monkeypatch.setattr(cli, "run_selftest",
                        lambda isas=None, progress=False, _r=cli.run_selftest: _r(isas, shapes=shapes))
    assert cli.main(["selftest", "--no-progress"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_selftest_unknown_isa_is_skipped_with_reason():
    res = cli.run_selftest(isas=["no-such-isa"], formats=cli.SELFTEST_FORMATS[:1], shapes=((1, 8, 32),))
    assert res["skipped"]["no-such-isa"] == "not compiled into this build"
    assert not res["ok"]  # nothing was tested


# ---- tolerance helper ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tolerance_accepts_the_kernel_and_rejects_a_small_error(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 576, generator=g)
    x = torch.randn(3, 576, generator=g).to(dtype)
    qw = lowbit.quantize_weight(w, "int4", group_size=128)
    expected = lowbit.reference.linear(x, qw)
    exact = cli._run_linear(x, qw, None, "", "exact")
    testing.assert_linear_close(exact, expected, x, qw)
    # A weight 1% off in one row is far outside the tolerance.
    w2 = lowbit.reference.dequantize(qw).clone()
    w2[5] *= 1.01
    wrong = torch.nn.functional.linear(x.float(), w2).to(dtype)
    with pytest.raises(AssertionError, match="beyond tolerance"):
        testing.assert_linear_close(wrong, expected, x, qw)
    if "fast" in cli._cpu_paths():  # the int8-activation path has its own, looser bound
        fast = cli._run_linear(x, qw, None, "", "fast")
        testing.assert_fast_linear_close(fast, expected, x, qw)
        with pytest.raises(AssertionError, match="bound"):
            testing.assert_fast_linear_close(fast + 0.1 * expected.abs().max(), expected, x, qw)


def test_tolerance_grows_with_k_and_output_dtype():
    assert testing.accumulation_rtol(16384) > testing.accumulation_rtol(4096) > 0
    assert testing.output_eps(torch.float32) == 0
    assert testing.output_eps(torch.bfloat16) == 2 ** -7
    assert testing.output_eps(torch.float16) == 2 ** -10


# ---- bench --------------------------------------------------------------------------------
def test_bench_tiny_shape_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "64x96", "--m", "1,3", "--reps", "2", "--max-seconds", "0.5",
                   "--json", str(path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "torch-fp32" in out and "int4-g128" in out
    doc = json.loads(path.read_text())
    res = doc["results"]
    assert {r["impl"] for r in res} == {"int8", "int4-g128", "nf4-b64", "torch-fp32", "torch-bf16"}
    assert {r["M"] for r in res} == {1, 3}
    for r in res:
        assert r["median_us"] > 0 and r["weight_gbps"] > 0 and r["gflops"] > 0
        assert r["copies"] >= 2  # weights rotate over a buffer set
        assert r["speedup_vs_fp32"] > 0
    assert doc["environment"]["cpu_isa"] == lowbit.backend_info()["cpu_isa"]


@pytest.mark.skipif(len(cli._cpu_paths()) < 2, reason="this build has a single CPU path")
@pytest.mark.parametrize("path", ["fast", "exact"])
def test_bench_cpu_path_is_applied_and_recorded(tmp_path, capsys, path):
    from lowbit import _backend
    before = _backend.cpu_path()
    js = tmp_path / "b.json"
    assert cli.main(["bench", "--shapes", "64x32", "--m", "2", "--reps", "2", "--impls", "int4-g128",
                     "--cpu-path", path, "--json", str(js), "--no-progress", "--no-limits"]) == 0
    assert f"CPU path {path}" in capsys.readouterr().out
    res = json.loads(js.read_text())["results"]
    assert [r["extra"]["cpu_path"] for r in res if r["impl"] == "int4-g128"] == [path]
    assert _backend.cpu_path() == before  # restored


def test_bench_thread_scaling_rows(tmp_path, capsys):
    """--threads 1,2: every row measured with each count in turn (the counts recorded), each
    with its speed-up over the same row at the first count (1.00x there, computed from the two
    medians otherwise), torch's and lowbit's thread settings restored afterwards."""
    import torch
    before = torch.get_num_threads()
    js = tmp_path / "b.json"
    assert cli.main(["bench", "--shapes", "64x32", "--m", "1,4", "--reps", "2", "--impls", "int4-g128",
                     "--threads", "1,2", "--cpu-path", "exact", "--json", str(js), "--no-progress",
                     "--no-limits"]) == 0
    out = capsys.readouterr().out
    assert "1/2 threads" in out and "vs 1 thr" in out
    res = json.loads(js.read_text())["results"]
    for impl in ("int4-g128", "torch-fp32"):
        for M in (1, 4):
            rows = {r["threads"]: r for r in res if r["impl"] == impl and r["M"] == M}
            assert sorted(rows) == [1, 2]
            assert rows[1]["extra"]["scaling"] == 1.0
            assert rows[2]["extra"]["scaling"] == pytest.approx(rows[1]["median_us"] / rows[2]["median_us"])
    assert torch.get_num_threads() == before and "LOWBIT_NUM_THREADS" not in __import__("os").environ
    for bad in ("0", "1,1", "2,x", ""):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--threads", bad, "--no-progress", "--no-limits"])
    assert cli.main(["bench", "--model", "--threads", "1,2"]) == 2
    assert "--threads takes a list" in capsys.readouterr().err


def test_bench_fp4_rows_only_when_named(tmp_path):
    """fp4 (lowbit's and bitsandbytes') is an optional row: --impls runs it, measured against
    the reference like the others; the default and --peers sets leave it out."""
    from lowbit import benchmark as B
    assert "fp4-b64" not in B.DEFAULT_IMPLS and "fp4-b64" not in B.FULL_IMPLS
    assert "bnb-fp4" not in B.FULL_IMPLS and "bnb-fp4" in B.ALL_IMPLS
    js = tmp_path / "b.json"
    assert cli.main(["bench", "--shapes", "64x32", "--m", "2", "--reps", "2", "--impls",
                     "fp4-b64", "--json", str(js), "--no-progress", "--no-limits"]) == 0
    res = [r for r in json.loads(js.read_text())["results"] if r["impl"] == "fp4-b64"]
    assert len(res) >= 1 and len({r["extra"]["cpu_path"] for r in res}) == len(res)  # one per path
    assert all(r["extra"]["rel_err"] < 0.3 for r in res)  # (4-bit: ~0.1 of |y|)


@pytest.mark.skipif(len(cli._cpu_paths()) < 2, reason="this build has a single CPU path")
def test_bench_measures_both_cpu_paths_unless_one_is_named(tmp_path, capsys, monkeypatch):
    """With no --cpu-path and no LOWBIT_CPU_PATH, every lowbit row runs on the fast and on the
    exact path (labelled as such); the peers and torch rows once; the path in force after the
    run is the one before it."""
    from lowbit import _backend
    monkeypatch.delenv("LOWBIT_CPU_PATH", raising=False)
    before = _backend.cpu_path()
    js = tmp_path / "b.json"
    assert cli.main(["bench", "--shapes", "64x32", "--m", "1,2", "--reps", "2", "--impls",
                     "int8,nf4-b64,torch-bf16", "--json", str(js), "--no-progress",
                     "--no-limits"]) == 0
    out = capsys.readouterr().out
    assert "both CPU paths" in out
    for label in ("int8 fast", "int8 exact", "nf4-b64 fast", "nf4-b64 exact"):
        assert label in out
    res = json.loads(js.read_text())["results"]
    for impl in ("int8", "nf4-b64"):
        for M in (1, 2):
            rows = [r for r in res if r["impl"] == impl and r["M"] == M]
            assert sorted(r["extra"]["cpu_path"] for r in rows) == ["exact", "fast"]
            # the fast path's repacked copy is what it streams; the exact path reads the codes
            fast, exact = sorted(rows, key=lambda r: r["extra"]["cpu_path"] != "fast")
            assert fast["weight_bytes"] != exact["weight_bytes"]
    assert sum(r["impl"] == "torch-bf16" for r in res) == 2  # once per M
    assert _backend.cpu_path() == before
    monkeypatch.setenv("LOWBIT_CPU_PATH", "exact")  # a path chosen by the environment: one row
    assert cli.main(["bench", "--shapes", "64x32", "--m", "1", "--reps", "2", "--impls", "int8",
                     "--json", str(js), "--no-progress", "--no-limits"]) == 0
    res = json.loads(js.read_text())["results"]
    assert [r["extra"]["cpu_path"] for r in res if r["impl"] == "int8"] == ["exact"]


def test_benchmark_rejects_an_unknown_cpu_path():
    from lowbit import benchmark as B
    with pytest.raises(ValueError, match="cpu_path"):
        B.run_bench([(64, 32)], [1], ["int8"], cpu_path="fastest", progress=False)
    with pytest.raises(ValueError, match="cpu_path"):
        B.decode_bench(["int4"], cpu_path="quick")


def test_bench_rejects_a_bad_shape(capsys):
    assert cli.main(["bench", "--shapes", "64by96", "--no-progress"]) == 2
    assert "KxN" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["bench", "--threads", "0"], ["bench", "--reps", "-1"], ["bench", "--max-seconds", "nan"],
    ["bench", "--model", "--decode-tokens", "0"], ["eval", "--tokens", "0"],
    ["eval", "--calib-samples", "0"], ["eval", "--calib-seq-len", "-5"],
    ["eval", "--decode-tokens", "-4"], ["size", "--params", "7e9", "--hidden", "0"],
    ["demo", "--reps", "0"]])
def test_counts_must_be_positive(args, capsys):
    """A count of 0 or less (or NaN seconds) is a usage error naming the option, before any
    work (an --calib-samples of 0 used to fall back to the default silently)."""
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert args[-2] in err and "expected a" in err


# ---- eval: configs and helpers (no model needed) ------------------------------------------
def test_parse_format_configs():
    # the old names still parse; the grammar itself is tested in test_eval.py
    c = evaluate.parse_config("int4")
    assert (c.fmt, c.opts["group_size"], c.opts["symmetric"], c.method) == ("int4", 128, False, "rtn")
    c = evaluate.parse_config("int4-sym:g64")
    assert (c.fmt, c.opts["group_size"], c.opts["symmetric"]) == ("int4", 64, True)
    c = evaluate.parse_config("nf4:g32:dq")
    assert (c.fmt, c.opts["group_size"], c.opts["double_quant"]) == ("nf4", 32, True)
    assert evaluate.parse_config("fp32").fmt is None
    assert evaluate.describe(evaluate.parse_config("int4:g-1")) == "int4 asym per-row"
    for bad in ("int3", "int4:g7", "fp32:g64", "int4:zz", "int4:llm.int8"):
        with pytest.raises(ValueError):
            evaluate.parse_config(bad)


def test_eval_rejects_a_bad_spec_before_loading_anything(capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "make_loader", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(["eval", "--formats", "fp32,int4:g64:gtpq"]) == 2
    assert "unknown modifier 'gtpq'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (pip install 'lowbit[eval]')")
def test_eval_unknown_model_name_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text " * 50)
    assert cli.main(["eval", "--model", "no-such-org/no-such-model", "--text",
                     str(tmp_path / "t.txt"), "--tokens", "64", "--ctx", "32"]) == 2
    assert "local Hugging Face cache" in capsys.readouterr().err


# ---- size ---------------------------------------------------------------------------------
def test_size_prints_every_registry_format(capsys):
    assert cli.main(["size", "--params", "70e9"]) == 0
    out = capsys.readouterr().out
    for label in ("fp32", "bf16", "int8 sym per-row", "int4 asym g32", "int4 sym g64",
                  "int4 asym g128", "nf4 b64", "nf4 b64 dq"):
        assert label in out
    for fmt in lowbit.FORMATS:
        assert fmt in out
    assert "140.00" in out and "280.00" in out  # bf16 / fp32: 2 and 4 bytes per parameter
    assert "scales, zero-points" in out


def test_size_json_and_custom_shapes(capsys):
    assert cli.main(["size", "--params", "7B", "--shapes", "4096x4096,4096x11008,11008x4096",
                     "--float-params", "0.26e9", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"] == 7_000_000_000 and doc["float_params"] == 260_000_000
    assert doc["shapes"] == [[4096, 4096], [4096, 11008], [11008, 4096]]
    rows = {r["format"]: r for r in doc["rows"]}
    q = rows["int4 asym g128"]
    w = 4096 * 4096 + 2 * 4096 * 11008
    nbytes = sum(evaluate.layout_bytes(q["options"], n, k) for k, n in doc["shapes"])
    assert q["bytes"] == pytest.approx(6.74e9 * (8 * nbytes / w) / 8 + 0.26e9 * 2)


@pytest.mark.parametrize("args,match", [(["--params", "lots"], "parameter count"),
                                        (["--params", "7e9", "--shapes", "4096by4096"], "KxN")])
def test_size_bad_arguments(capsys, args, match):
    assert cli.main(["size"] + args) == 2
    assert match in capsys.readouterr().err


def test_quantize_linears_replaces_all_but_skipped():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48, bias=False)))
    model.add_module("lm_head", nn.Linear(48, 10))
    x = torch.randn(2, 64)
    ref = model(x)
    names = evaluate.quantize_linears(model, "int8")
    assert names == ["body.0", "body.2"]
    assert isinstance(model.body[0], lowbit.QuantLinear) and isinstance(model.body[2], lowbit.QuantLinear)
    assert type(model.lm_head) is nn.Linear
    assert torch.allclose(model(x), ref, rtol=0.05, atol=0.05)
    s = evaluate.size_stats(model)
    assert s["n_quantized"] == 2
    assert s["linear_weights"] == 64 * 32 + 32 * 48
    assert 8 < s["bits_per_weight"] < 9  # int8 codes + one float32 scale per row


def test_eval_without_extras_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gensim" else real(name, *a, **k))
    assert cli.main(["eval", "--tokens", "256", "--ctx", "128"]) == 2
    err = capsys.readouterr().err
    assert "gensim" in err and "pip install 'lowbit[eval]'" in err


# ---- eval: a tiny random model (pipeline), then the bundled SmolLM2 -----------------------
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (pip install 'lowbit[eval]')")
def test_eval_tiny_model_folder_and_text_file(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the quick brown fox jumps over a lazy dog while seven cats watch quietly".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(len(words), (600,), generator=g))
    (tmp_path / "text.txt").write_text(text)
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    js, png = tmp_path / "eval.json", tmp_path / "ppl.png"
    rc = cli.main(["eval", "--model", str(folder), "--text", str(tmp_path / "text.txt"),
                   "--tokens", "256", "--ctx", "64", "--formats", "fp32,int8,int4:g32,nf4:g32:dq",
                   "--decode-tokens", "2", "--json", str(js), "--plot", str(png), "--no-progress"]
                  + (["--cpu-path", "exact"] if len(cli._cpu_paths()) > 1 else []))
    assert rc == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "peak MB" in out and "nf4 b32 dq" in out
    doc = json.loads(js.read_text())
    res = {r["config"]: r for r in doc["results"]}
    assert list(res) == ["fp32", "int8", "int4:g32", "nf4:g32:dq"]
    assert doc["meta"]["tokens"] == 256 and doc["meta"]["wall_s"] > 0
    assert doc["meta"]["cpu_path"] == "exact"
    assert doc["meta"]["calibration"] is None  # no calibrated method asked for
    assert res["fp32"]["bits_per_weight"] == 32.0 and res["fp32"]["n_quantized"] == 0
    assert res["int8"]["n_quantized"] == 14  # 7 Linears per layer, lm_head kept
    assert 4 < res["int4:g32"]["bits_per_weight"] < res["int8"]["bits_per_weight"] < 9
    # every quantized layer stores less than its float weight, float parts stay as they are
    assert res["int8"]["model_mb"] < res["fp32"]["model_mb"]
    assert res["fp32"]["model_mb"] - res["int8"]["model_mb"] == pytest.approx(
        res["fp32"]["linear_mb"] - res["int8"]["linear_mb"], rel=1e-9)
    for r in res.values():
        assert 1 < r["perplexity"] < 1e4
        assert r["quant_time_s"] >= 0 and r["prefill_tok_s"] > 0
    # A random model is near-uniform: quantizing it barely changes perplexity.
    assert abs(res["int8"]["perplexity"] / res["fp32"]["perplexity"] - 1) < 0.05
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


@pytest.mark.skipif(bool(MISSING_FOR_BUNDLED),
                    reason=f"needs {', '.join(MISSING_FOR_BUNDLED)} (pip install 'lowbit[eval]')")
def test_eval_bundled_smollm2(tmp_path, capsys):
    # First run parses the GGUF (~40 s) and caches the float model under the user cache dir.
    js = tmp_path / "eval.json"
    rc = cli.main(["eval", "--tokens", "256", "--ctx", "128", "--formats", "fp32,int8",
                   "--decode-tokens", "2", "--json", str(js), "--no-progress"])
    assert rc == 0
    res = {r["config"]: r for r in json.loads(js.read_text())["results"]}
    assert res["int8"]["n_quantized"] == 210  # 30 layers x 7 Linears; lm_head kept
    assert 5 < res["fp32"]["perplexity"] < 100
    assert abs(res["int8"]["perplexity"] / res["fp32"]["perplexity"] - 1) < 0.05
    assert res["int8"]["linear_mb"] < res["fp32"]["linear_mb"] / 3.5


def test_usage_errors_are_one_line(capsys):
    assert cli.main(["selftest", "--isa", "bogus"]) == 2
    assert "unknown ISA 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) != 0
        err = capsys.readouterr().err
        assert "no CUDA device" in err and "Traceback" not in err
