"""Elastic size (compress --elastic): nested allocation, prefix-exact factors, every size equal to a direct
compression at that keep with the same calibration, round trips through lz.load / native loading / the CLI, and
the refusals."""
import copy
import json

import pytest
import torch
import transformers

import layerzip as lz
from layerzip import elastic
from layerzip.allocate import AllocationPath, factorized_params
from layerzip.data import builtin_documents, token_batches
from layerzip.methods import ASVD, CUR, FWSVD, SVD, SVDLLM
from layerzip.nn import ElasticLinear, LowRankLinear
from layerzip.stats import FisherStats, ModuleStats

from conftest import run_cli, tiny_model

SHAPES = {"q": (64, 64), "k": (32, 64), "up": (128, 64), "down": (64, 128), "tiny": (8, 8), "wide": (16, 200)}


def spectra(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(min(s), generator=g, dtype=torch.float64).sort(descending=True).values
            ** (1 + 8 * torch.rand((), generator=g).item()) * (1 + 10 * torch.rand((), generator=g).item())
            for k, s in SHAPES.items()}


def as_number(r, shape):
    return min(shape) + 1 if r is None else r          # dense: more than any rank


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("normalize", [True, False])
def test_allocation_is_nested_and_fills_the_budget(seed, normalize):
    sp = spectra(seed)
    path = AllocationPath(SHAPES, sp, normalize=normalize)
    dense = path.dense_params
    prev = None
    for keep in torch.linspace(0.05, 1.0, 200).tolist():
        ranks = path.ranks(keep * dense)
        used = factorized_params(SHAPES, ranks)
        if used > path.base:
            assert used <= keep * dense + 1e-6
            assert keep * dense - used < max(m + n for m, n in SHAPES.values())    # within one rank of a module
        if prev is not None:
            for k in SHAPES:
                assert as_number(prev[k], SHAPES[k]) <= as_number(ranks[k], SHAPES[k]), (keep, k)
        prev = ranks
    assert all(r is None for r in path.ranks(dense).values())


def test_capped_allocation_still_fills_the_budget():
    """With latency caps (never elastic) a jump to dense has no ranks between; the greedy fill spends the rest."""
    path = AllocationPath(SHAPES, spectra(1), max_ranks={"q": 20, "tiny": 0, "up": 5})
    for keep in (0.3, 0.5, 0.64, 0.8):
        ranks = path.ranks(keep * path.dense_params)
        used = factorized_params(SHAPES, ranks)
        assert (keep - 0.01) * path.dense_params <= used <= keep * path.dense_params
        assert ranks["tiny"] is None and (ranks["q"] is None or ranks["q"] <= 20)


def test_nested_allocation_is_a_lagrangian_optimum():
    """At the end of each move of the path (the allocations a shared price λ chooses) no allocation of at most the
    same cost has a smaller loss (checked against every allocation of two small modules)."""
    shapes = {"a": (30, 24), "b": (20, 36)}
    sp = spectra(7)
    sp = {"a": sp["q"][:24], "b": sp["up"][:20]}
    path = AllocationPath(shapes, sp)

    def loss(k, r):
        s2 = sp[k].square()
        return 0.0 if r is None else (s2[r:].sum() / s2.sum()).item()
    opts = {k: list(range(1, min(m * n // (m + n), len(sp[k])) + 1)) + [None] for k, (m, n) in shapes.items()}
    assert len(path.cum) > 5
    for budget in path.cum:
        got = path.ranks(budget)
        assert factorized_params(shapes, got) == budget
        best = min(loss("a", ra) + loss("b", rb) for ra in opts["a"] for rb in opts["b"]
                   if factorized_params(shapes, {"a": ra, "b": rb}) <= factorized_params(shapes, got))
        assert loss("a", got["a"]) + loss("b", got["b"]) <= best + 1e-12


def _stats(n_in, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = ModuleStats(n_in)
    st.add(torch.randn(300, n_in, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n_in))
    return FisherStats(torch.rand(n_out, generator=g, dtype=torch.float64) + 0.05, st)


@pytest.mark.parametrize("config", [SVD(), SVDLLM(fisher=True), SVDLLM(fisher=False), ASVD(), FWSVD()],
                         ids=["svd", "svd-llm-fisher", "svd-llm", "asvd", "fwsvd"])
def test_prefix_of_the_full_factors_is_the_rank_r_factorization(config):
    torch.manual_seed(0)
    W = torch.randn(24, 40, dtype=torch.float64)
    st = _stats(40, 24)
    assert config.prefix_ok
    A, B = config.factors(W, st, 24)
    assert torch.allclose(A @ B, W, atol=1e-9)                      # full rank: W itself
    for r in (1, 5, 17):
        a, b = config.factors(W, st, r)
        assert torch.allclose(A[:, :r], a, atol=1e-9) and torch.allclose(B[:r], b, atol=1e-9)


def test_methods_that_fit_per_rank_are_refused():
    for make in (lambda: CUR(elastic=True), lambda: SVDLLM(elastic=True, correct=True),
                 lambda: SVDLLM(elastic=True, sequential=True), lambda: SVD(elastic=True),
                 lambda: SVDLLM(elastic=True, alloc="uniform"), lambda: SVDLLM(elastic=True, objective="latency"),
                 lambda: SVDLLM(elastic=True, keep=0.2), lambda: SVDLLM(keep_min=0.2),
                 lambda: SVDLLM(elastic=True, keep_min=0)):
        with pytest.raises(lz.LayerzipError) as e:
            make()
        assert "\n" not in str(e.value)
    assert SVD(elastic=True, alloc="global").elastic


@pytest.fixture(scope="module")
def calib(tokenizer):
    return {causal: token_batches(tokenizer, builtin_documents("calib", limit=40), causal, 8, 48, batch_size=4)
            for causal in (True, False)}


def _inputs(arch):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 2000, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def _out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_every_size_equals_a_direct_compression(arch, calib, tokenizer, tmp_path):
    """One elastic compression, saved and loaded at several keeps, against a direct compression at each keep from
    the same statistics: the same ranks, the same keep_achieved, the same outputs (float rounding apart)."""
    m0 = tiny_model(arch)
    batches = calib[arch != "bert"]
    cfg = SVDLLM(keep=0.5, elastic=True, keep_min=0.3)
    stats = lz.calibrate(m0, cfg, batches, progress=False)
    me = copy.deepcopy(m0)
    rep = lz.compress_(me, cfg, calib=batches, progress=False, stats=stats)
    assert rep["elastic"]["keep_min"] == 0.3 and rep["elastic"]["stored_params"] > rep["params_after"]
    assert all(isinstance(m, ElasticLinear) for m in elastic.modules(me).values())
    lz.save(me, tmp_path / "el", tokenizer=tokenizer)
    x = _inputs(arch)
    for keep in (0.3, 0.5, 1.0) if arch == "llama" else (0.45, 0.5, 0.8):
        direct = copy.deepcopy(m0)
        dr = lz.compress_(direct, SVDLLM(keep=keep, alloc="global", refine_steps=0), calib=batches, progress=False,
                          stats=stats)                      # an elastic model has no refinement
        loaded = lz.load_model(tmp_path / "el", keep=keep)
        assert loaded.elastic["ranks"] == dr["ranks"], keep
        assert loaded.elastic["keep_achieved"] == pytest.approx(dr["keep_achieved"], abs=1e-12)
        assert abs(loaded.elastic["keep_achieved"] - keep) <= 0.01 * keep
        assert not elastic.is_elastic(loaded.model)
        assert lz.models.count_params(loaded.model) == dr["params_after"]
        ref = _out(direct, x)
        assert torch.allclose(_out(loaded.model, x), ref, atol=2e-5 * ref.abs().max().item()), keep
        if keep == 0.5:                  # read directly (load_elastic_size) = the ElasticLinear modules materialized
            whole = lz.load_model(tmp_path / "el", elastic_form=True)
            assert whole.elastic["ranks"] == dr["ranks"] and elastic.is_elastic(whole.model)
            elastic.materialize_(whole.model, keep)
            assert torch.equal(_out(whole.model, x), _out(loaded.model, x))
            assert {n: type(m) for n, m in whole.model.named_modules()} == \
                {n: type(m) for n, m in loaded.model.named_modules()} or arch == "gpt2"   # GPT-2: nn.Linear vs Conv1D
            # the in-memory model right after compress_ is the default size
            assert rep["ranks"] == dr["ranks"] and rep["keep_achieved"] == pytest.approx(dr["keep_achieved"])
            assert torch.allclose(_out(me, x), ref, atol=2e-5 * ref.abs().max().item())
    if arch == "llama":                  # native loading: the default size, and keep=K
        for keep in (None, 0.45):
            kw = {} if keep is None else {"keep": keep}
            native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "el", **kw)
            plain = lz.load(tmp_path / "el", **kw)
            assert torch.equal(_out(native, x), _out(plain, x))
        with pytest.raises(lz.LayerzipError, match="outside the sizes"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "el", keep=0.2)


def test_keep_max_stores_less_and_bounds_the_sizes(calib, tokenizer, tmp_path):
    m0 = tiny_model("llama")
    batches = calib[True]
    full, capped = copy.deepcopy(m0), copy.deepcopy(m0)
    stats = lz.calibrate(m0, SVDLLM(keep=0.5, elastic=True), batches, progress=False)
    r1 = lz.compress_(full, SVDLLM(keep=0.5, elastic=True), calib=batches, progress=False, stats=stats)
    r2 = lz.compress_(capped, SVDLLM(keep=0.5, elastic=True, keep_max=0.7), calib=batches, progress=False,
                      stats=stats)
    assert r2["elastic"]["stored_params"] < r1["elastic"]["stored_params"]
    assert r1["ranks"] == r2["ranks"]                                   # the same default size
    for n, m in elastic.modules(capped).items():       # stored dense (dense at --keep-min) in both, or fewer ranks
        other = elastic.modules(full)[n].rank
        assert (m.rank is None) == (other is None) and (m.rank is None or m.rank <= other)
    assert elastic.set_keep_(capped, 0.7)["ranks"] == elastic.set_keep_(full, 0.7)["ranks"]
    with pytest.raises(lz.LayerzipError, match="outside the sizes"):
        elastic.set_keep_(capped, 0.75)
    lz.save(capped, tmp_path / "c", tokenizer=tokenizer)
    with pytest.raises(lz.LayerzipError):
        lz.save(capped, tmp_path / "q", tokenizer=tokenizer, bits=4)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_cli_compress_eval_sweep_export(tiny_dirs, calib_file, tmp_path, capsys):
    src = tiny_dirs["llama"]
    el, small = tmp_path / "el", tmp_path / "small"
    common = ["--calib", str(calib_file), "--calib-samples", "6", "--seq-len", "48"]
    ev = ["--text", str(calib_file), "--samples", "8", "--seq-len", "32"]      # a small text: a quick eval
    code, out, err = run_cli(capsys, "compress", str(src), "--elastic", "--keep", "0.5", "--keep-min", "0.4",
                             "--out", str(el), *common, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["keep_achieved"] == pytest.approx(0.5, abs=0.005) and rep["elastic"]["keep_min"] == 0.4
    meta = json.loads((el / "layerzip.json").read_text())
    cfg = json.loads((el / "config.json").read_text())
    assert meta["elastic"]["keep_max"] == 1.0 and cfg["quantization_config"]["elastic"] == meta["elastic"]
    assert cfg["keep"] == 0.5 and meta["format_version"] == 4
    assert all(s["type"] == "elastic" for s in meta["modules"].values())

    code, out, err = run_cli(capsys, "eval", str(el), "--keep", "0.6", *ev, "--json")
    assert code == 0, err
    at = json.loads(out)
    assert at["keep"] == 0.6 and at["keep_achieved"] == pytest.approx(0.6, abs=0.006)
    png = tmp_path / "curve.png"
    code, out, err = run_cli(capsys, "eval", str(el), "--keep-sweep", "0.9,0.6,0.4", "--plot", str(png),
                             *ev, "--json")
    assert code == 0, err
    sweep = json.loads(out)
    assert [r["keep"] for r in sweep["keep_sweep"]] == [0.9, 0.6, 0.4]
    assert sweep["keep_sweep"][1]["perplexity"] == pytest.approx(at["perplexity"], rel=1e-6)
    ppl = [r["perplexity"] for r in sweep["keep_sweep"]]
    assert png.read_bytes()[:4] == b"\x89PNG" and sweep["plot"] == str(png)
    assert ppl[0] < ppl[2]                                          # more kept, better (random weights still)
    code, out, err = run_cli(capsys, "eval", str(el), "--keep-sweep", "0.6", *ev)
    assert code == 0 and "achieved" in out and (tmp_path / "el-keep-sweep.png").is_file()

    code, out, err = run_cli(capsys, "export", str(el), "--format", "layerzip", "--keep", "0.6", "--out", str(small),
                             "--json")
    assert code == 0, err
    ex = json.loads(out)
    assert ex["keep_achieved"] == at["keep_achieved"] and ex["size_on_disk"] < ex["size_on_disk_before"]
    smeta = json.loads((small / "layerzip.json").read_text())
    assert "elastic" not in smeta and smeta["format_version"] == 2 and smeta["keep"] == 0.6
    assert json.loads((small / "config.json").read_text())["keep"] is None      # a plain directory: no size
    code, out, err = run_cli(capsys, "eval", str(small), *ev, "--json")
    assert json.loads(out)["perplexity"] == pytest.approx(at["perplexity"], rel=1e-6)
    x = _inputs("llama")
    assert torch.equal(_out(lz.load(small), x), _out(lz.load(el, keep=0.6), x))
    native = transformers.AutoModelForCausalLM.from_pretrained(small)
    assert torch.equal(_out(native, x), _out(lz.load(small), x))
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    code, out, err = run_cli(capsys, "export", str(el), "--format", "onnx", "--keep", "0.6", "--out",
                             str(tmp_path / "m.onnx"), "--json")
    assert code == 0, err
    onnx_rep = json.loads(out)
    assert onnx_rep["keep_achieved"] == at["keep_achieved"] and onnx_rep["max_abs_diff"] < 1e-3


def assert_bad(capsys, *argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and match in err, err


def test_refusals(tiny_dirs, calib_file, tmp_path, capsys):
    src = tiny_dirs["llama"]
    common = ["--calib", str(calib_file), "--calib-samples", "4", "--seq-len", "32"]
    el = tmp_path / "el"
    assert run_cli(capsys, "compress", str(src), "--elastic", "--keep-min", "0.4", "--out", str(el), *common)[0] == 0
    plain = tmp_path / "plain"
    assert run_cli(capsys, "compress", str(src), "--keep", "0.5", "--out", str(plain), *common)[0] == 0
    before = sorted(p.name for p in el.iterdir())
    assert_bad(capsys, "eval", str(el), "--keep", "0.3", match="outside the sizes")
    assert_bad(capsys, "eval", str(el), "--keep-sweep", "0.9,0.35", match="outside the sizes")
    assert_bad(capsys, "eval", str(el), "--keep-sweep", "0.9,abc", match="--keep-sweep")
    assert_bad(capsys, "eval", str(el), "--keep-sweep", "0.9", "--keep", "0.5", match="drop --keep")
    assert_bad(capsys, "eval", str(el), "--plot", str(tmp_path / "p.png"), match="--keep-sweep")
    assert_bad(capsys, "eval", str(el), "--keep-sweep", "0.9", "--plot", str(tmp_path / "p.txt"), match=".png")
    assert_bad(capsys, "eval", str(el), "--stream", match="--no-stream")
    for d in (plain, src):
        assert_bad(capsys, "eval", str(d), "--keep", "0.5", match="not one; drop --keep")
        assert_bad(capsys, "export", str(d), "--format", "layerzip", "--out", str(tmp_path / "x"), match="not one")
    assert_bad(capsys, "eval", "minilm", "--keep", "0.5", match="not one; drop --keep")
    assert_bad(capsys, "export", str(el), "--format", "layerzip", "--keep", "0.2", "--out", str(tmp_path / "x"),
               match="outside the sizes")
    assert_bad(capsys, "export", str(el), "--format", "layerzip", "--out", str(el / "in"), match="inside")
    out = tmp_path / "o"
    for extra, match in ((["--bits", "4"], "--bits 4"), (["--method", "cur"], "cannot be --elastic"),
                         (["--alloc", "uniform"], "--alloc global"), (["--stream"], "--no-stream"),
                         (["--heal-steps", "2"], "--heal-steps"), (["--keep", "0.2"], "--keep-min"),
                         (["--include", "embeddings"], "embeddings")):
        assert_bad(capsys, "compress", str(src), "--elastic", "--out", str(out), *common, *extra, match=match)
        assert not out.exists()
    assert_bad(capsys, "compress", str(src), "--keep-min", "0.2", "--out", str(out), *common, match="add --elastic")
    assert sorted(p.name for p in el.iterdir()) == before
    with pytest.raises(lz.LayerzipError, match="not one"):
        lz.load(plain, keep=0.5)
    with pytest.raises(lz.LayerzipError, match="not one; drop keep="):       # native loading says the same
        transformers.AutoModelForCausalLM.from_pretrained(plain, keep=0.5)
    assert transformers.AutoModelForCausalLM.from_pretrained(plain) is not None
