"""Every architecture: compress -> forward -> save -> load gives the same outputs; the budget is met."""
import pytest
import torch
import transformers

import layerzip as lz
from layerzip.nn import LowRankLinear
from layerzip.models import select_targets

from conftest import ARCHS


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [lz.SVDLLM(keep=0.5), lz.SVDLLM(keep=0.5, alloc="uniform", fisher=False),
                                    lz.ASVD(keep=0.6), lz.SVD(keep=0.4)], ids=lambda c: f"{c.name}-{c.alloc}")
def test_compress_save_load_roundtrip(arch, config, tiny_dirs, calib_file, tmp_path):
    loaded = lz.load_model(tiny_dirs[arch])
    n_targets = len(select_targets(loaded.model))
    batches = lz.calibration_batches(loaded, str(calib_file), n_samples=8, seq_len=32)
    ids = batches[0]["input_ids"][:2, :16]
    dense_out = outputs(loaded.model, ids)
    rep = lz.compress_(loaded.model, config, calib=batches, progress=False)

    assert abs(rep["keep_achieved"] - config.keep) <= 0.01 * config.keep
    assert 0 < rep["factorized"] <= n_targets              # global allocation may leave some modules dense
    if config.alloc == "uniform":
        assert rep["factorized"] == n_targets
    assert sum(isinstance(m, LowRankLinear) for m in loaded.model.modules()) == rep["factorized"]
    out = outputs(loaded.model, ids)
    assert out.shape == dense_out.shape and torch.isfinite(out).all()

    lz.save(loaded.model, tmp_path / "lz", tokenizer=loaded.tokenizer, meta={"method": config.name})
    assert {"config.json", "model.safetensors", "layerzip.json"} <= {p.name for p in (tmp_path / "lz").iterdir()}
    reloaded = lz.load(tmp_path / "lz")
    assert type(reloaded) is type(loaded.model)
    assert (outputs(reloaded, ids) - out).abs().max().item() <= 1e-5
    transformers.AutoTokenizer.from_pretrained(tmp_path / "lz")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_keep_changes_nothing(arch, tiny_dirs, calib_file):
    """keep=1: low rank would not save parameters anywhere, so every module stays dense."""
    loaded = lz.load_model(tiny_dirs[arch])
    batches = lz.calibration_batches(loaded, str(calib_file), n_samples=4, seq_len=32)
    rep = lz.compress_(loaded.model, lz.SVDLLM(keep=1.0), calib=batches, progress=False)
    assert rep["factorized"] == 0 and rep["keep_achieved"] == 1.0


def test_gpt2_conv1d_is_transposed_correctly(tiny_dirs, calib_file):
    """GPT-2's Conv1D stores W transposed: at full rank the factorized model must equal the dense one."""
    loaded = lz.load_model(tiny_dirs["gpt2"])
    ids = torch.randint(0, 1000, (2, 12))
    before = outputs(loaded.model, ids)
    for name, mod in select_targets(loaded.model).items():
        from layerzip.models import set_module
        set_module(loaded.model, name, LowRankLinear.from_linear(mod, rank=min(mod.weight.shape)))
    torch.testing.assert_close(outputs(loaded.model, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5, 0.3])
def test_uniform_keep_on_minilm(keep):
    """The real MiniLM: keep_achieved within ±1% of keep (svd needs no calibration)."""
    loaded = lz.load_model("minilm")
    rep = lz.compress_(loaded.model, lz.SVD(keep=keep), progress=False)
    assert abs(rep["keep_achieved"] - keep) <= 0.01 * keep


def test_config_json_roundtrip():
    cfg = lz.ASVD(keep=0.3, alpha=0.7, exclude="attn")
    assert lz.config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan")])
def test_bad_keep_rejected(keep):
    with pytest.raises(lz.LayerzipError, match="keep"):
        lz.SVDLLM(keep=keep)


def test_svdllm_defaults_depend_on_model_kind():
    """The measured best (bench/BEAT_SVDLLM.md, bench/PIECES.md): global + output Fisher for causal LMs and for
    encoders with ≥ 512 calibration sequences, else uniform ranks with the output Fisher; an explicit choice is kept;
    the report records the resolved config."""
    from conftest import tiny_model
    assert lz.SVDLLM().resolve(tiny_model("llama")).alloc == "global"
    assert lz.SVDLLM().resolve(tiny_model("llama")).fisher is True
    enc = lz.SVDLLM().resolve(tiny_model("bert"))
    assert (enc.alloc, enc.fisher) == ("uniform", True)
    assert enc.encoder_loss == "contrastive"                       # its Fisher: the contrastive loss's
    for asked in (dict(alloc="global"), dict(elastic=True)):       # global below 512 documents: no Fisher
        enc = lz.SVDLLM(**asked).resolve(tiny_model("bert"))
        assert (enc.alloc, enc.fisher) == ("global", False)
    many = [{"input_ids": torch.zeros(256, 4, dtype=torch.long)}] * 2
    enc = lz.SVDLLM().resolve(tiny_model("bert"), many)
    assert (enc.alloc, enc.fisher, enc.encoder_loss) == ("global", True, "embedding")
    mine = lz.SVDLLM(alloc="uniform", fisher=False).resolve(tiny_model("llama"))
    assert (mine.alloc, mine.fisher) == ("uniform", False)
    ids = torch.randint(100, 1000, (2, 16))
    rep = lz.compress_(tiny_model("qwen2"), lz.SVDLLM(keep=0.5), calib=[{"input_ids": ids}], progress=False)
    assert rep["config"]["alloc"] == "global" and rep["config"]["fisher"] is True


def test_causal_fisher_reads_a_spread_subset_of_the_calibration(monkeypatch):
    """A causal LM's default Fisher reads ≥ FISHER_MIN_TOKENS tokens and FISHER_FRACTION of the calibration,
    sequences evenly spread (the report records how many); an encoder's reads every sequence; a given number wins."""
    from conftest import tiny_model
    from layerzip import compress as compress_mod
    windows = [{"input_ids": torch.randint(100, 1000, (8, 256)), "attention_mask": torch.ones(8, 256, dtype=torch.long)}
               for _ in range(4)]                                  # 32 windows, 8192 tokens
    cfg = lz.SVDLLM().resolve(tiny_model("llama"), windows)
    assert cfg.fisher_samples == 8                                 # 2048 tokens > 8192 / 8
    many = [dict(windows[0], input_ids=windows[0]["input_ids"].repeat(32, 1),
                 attention_mask=windows[0]["attention_mask"].repeat(32, 1))]      # 256 windows, 65536 tokens
    assert lz.SVDLLM().resolve(tiny_model("llama"), many).fisher_samples == 32      # 1/8 of them
    assert lz.SVDLLM(fisher_samples=3).resolve(tiny_model("llama"), windows).fisher_samples == 3
    enc = [{"input_ids": torch.zeros(256, 4, dtype=torch.long)}] * 2
    assert lz.SVDLLM().resolve(tiny_model("bert"), enc).fisher_samples is None     # every sequence
    seen = []
    real = compress_mod.gradients
    monkeypatch.setattr(compress_mod, "gradients", lambda m, t, kind, batches, progress, loss: seen.append(
        [b["input_ids"] for b in batches]) or real(m, t, kind, batches, progress, loss))
    small = [dict(input_ids=w["input_ids"][:, :32], attention_mask=w["attention_mask"][:, :32]) for w in windows]
    rep = lz.compress_(tiny_model("llama"), lz.SVDLLM(keep=0.5, fisher_samples=4), calib=small, progress=False)
    assert rep["config"]["fisher_samples"] == 4
    got = torch.cat(seen[0])
    every = torch.cat([w["input_ids"][:, :32] for w in windows])
    assert len(got) == 4 and torch.equal(got, every[[0, 10, 21, 31]])   # spread from the first to the last


def test_resolved_config_is_kept_as_is():
    cfg = lz.SVDLLM(keep=0.5, alloc="global", fisher=False, refine_steps=0)
    from conftest import tiny_model
    assert cfg.resolve(tiny_model("llama")) is cfg


def test_in_memory_global_allocation_refuses_statistics_that_do_not_fit(monkeypatch):
    """Every block's Grams at once (global allocation, lz.calibrate) is refused before it runs out of memory; the
    uniform walk, which frees each block's, is not."""
    import collections
    import psutil
    from conftest import tiny_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (2, 16), generator=g)
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("vm", "available")(10_000))
    with pytest.raises(lz.LayerzipError, match="stream the model"):
        lz.compress_(model, lz.SVDLLM(keep=0.6, refine_steps=0), calib=calib, progress=False)
    with pytest.raises(lz.LayerzipError, match="--alloc uniform"):
        lz.calibrate(model, lz.SVDLLM(keep=0.6), calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rep = lz.compress_(model, lz.SVDLLM(keep=0.6, alloc="uniform", refine_steps=0), calib=calib, progress=False)
    assert rep["keep_achieved"] <= 0.6
