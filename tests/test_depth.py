"""Block removal: the dropped model computes exactly what the original computes with those blocks skipped, and
reloads with lz.load and with plain transformers from_pretrained, for every architecture of the core issue."""
import json
import pytest
import torch
import transformers

from conftest import ARCHS, TINY
from layerzip import load_model, save
from layerzip.methods.drop_blocks import DropBlocks, choose_blocks, drop_blocks_
from layerzip.errors import LayerzipError
from layerzip.models import find_blocks

GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def deep_tiny(arch: str, layers: int = 4, seed: int = 0):
    """The conftest tiny model with `layers` blocks (Gemma 3 with mixed sliding / full attention)."""
    config, cls = TINY[arch]()
    d = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
    d["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    if arch == "gemma3":
        d["layer_types"] = GEMMA_TYPES[:layers]
    torch.manual_seed(seed)
    return cls(type(config)(**d)).eval()


def ids(batch=2, seq=12, seed=1):
    return torch.randint(5, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def output(model, x):
    out = model(input_ids=x, attention_mask=torch.ones_like(x))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def skipping(model, drop):
    """Hooks that make blocks `drop` return their input unchanged: the reference for removal."""
    blocks = find_blocks(model)[1]

    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
    return [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in drop]


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_matches_skipping_and_reloads(arch, tokenizer, tmp_path):
    model = deep_tiny(arch)
    x = ids()
    drop = [1, 2]
    handles = skipping(model, drop)
    with torch.no_grad():
        ref = output(model, x)
    for h in handles:
        h.remove()

    rep = drop_blocks_(model, drop)
    assert rep["kept_blocks"] == [0, 3] and len(find_blocks(model)[1]) == 2
    assert model.config.num_hidden_layers == 2
    if arch == "gemma3":
        assert model.config.layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        torch.testing.assert_close(output(model, x), ref, rtol=1e-4, atol=1e-5)

    save(model, tmp_path / "lz", tokenizer=tokenizer, meta={"method": "drop-blocks"})
    cfg = json.loads((tmp_path / "lz" / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2
    for reloaded in (load_model(tmp_path / "lz").model,
                     transformers.AutoModel.from_pretrained(tmp_path / "lz") if arch == "bert" else
                     transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lz")):
        with torch.no_grad():
            torch.testing.assert_close(output(reloaded.eval(), x), ref, rtol=1e-4, atol=1e-5)
    if arch != "bert":     # the KV cache is keyed by the re-indexed layer_idx: cached decoding must agree
        m = load_model(tmp_path / "lz").model
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            a = m.generate(x[:1], use_cache=True, **kw)
            b = m.generate(x[:1], use_cache=False, **kw)
        assert torch.equal(a, b)


def test_choose_blocks_rules():
    ang = [[0.0] * 6 for _ in range(6)]     # 5 blocks; d(ℓ, ℓ+2) smallest at ℓ = 2
    for l in range(6):
        for m in range(6):
            ang[l][m] = abs(m - l) * 0.1 + (0.0 if (l, m) == (2, 4) else 0.05)
    sim = {"angular": ang, "influence": [0.5, 0.1, 0.4, 0.05, 0.3]}
    assert choose_blocks(sim, 2, "span") == [2, 3]
    assert choose_blocks(sim, 2, "influence") == [1, 3]
    with pytest.raises(LayerzipError, match="between 1 and 4"):
        choose_blocks(sim, 5, "span")
    with pytest.raises(LayerzipError, match="--select"):
        choose_blocks(sim, 1, "random")


def test_bad_configs():
    with pytest.raises(LayerzipError, match="--blocks"):
        DropBlocks(blocks=0)
    with pytest.raises(LayerzipError, match="--select"):
        DropBlocks(select="middle")
    with pytest.raises(LayerzipError, match="unknown method"):
        DropBlocks(then="nope")
    with pytest.raises(LayerzipError, match="removes less than one"):
        DropBlocks(keep=0.95).n_blocks(4)
    assert DropBlocks(keep=0.5).n_blocks(6) == 3 and DropBlocks(keep=0.5, then="svd-llm").n_blocks(6) == 2
    with pytest.raises(LayerzipError, match="cannot drop"):
        drop_blocks_(deep_tiny("llama"), [0, 1, 2, 3])


def cli(capsys, *args):
    """Run the console entry point in-process: (exit code, stdout, last stderr line)."""
    from layerzip.cli import main
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, (err.strip().splitlines() or [""])[-1]


@pytest.mark.slow
def test_cli_combined_plan_and_errors(tokenizer, calib_file, tmp_path, capsys):
    src = tmp_path / "llama"
    deep_tiny("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    common = ["--calib", calib_file, "--calib-samples", 4, "--seq-len", 32, "--json"]
    code, out, err = cli(capsys, "compress", src, "--out", tmp_path / "o", "--method", "drop-blocks+svd-llm",
                         "--blocks", 1, "--select", "influence", "--keep", 0.5, *common)
    assert code == 0, err
    rep = json.loads(out)
    assert len(rep["dropped_blocks"]) == 1 and abs(rep["keep_achieved"] - 0.5) < 0.05
    meta = json.loads((tmp_path / "o" / "layerzip.json").read_text())
    assert meta["report"]["kept_blocks"] and meta["modules"]          # low rank on the 3 kept blocks
    m = load_model(tmp_path / "o").model
    assert len(find_blocks(m)[1]) == 3 and m(input_ids=ids()).logits.isfinite().all()

    for bad, msg in [(["--method", "drop-blocks", "--blocks", 4], "--blocks 4 would remove every block"),
                     (["--method", "svd-llm", "--blocks", 1], "option --blocks does not apply to method svd-llm"),
                     (["--method", "drop-blocks", "--select", "middle"], "--select must be")]:
        code, out, err = cli(capsys, "compress", src, "--out", tmp_path / "bad", *bad, *common)
        assert code == 2 and msg in err and err.startswith("layerzip: error:"), err
        assert not (tmp_path / "bad").exists()
