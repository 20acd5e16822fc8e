"""heal: distillation lowers the loss in a few steps, trains only the factors, saves and reloads."""
import json

import pytest
import torch

from layerzip import SVD, compress_, load_model, save
from layerzip.calibrate import builtin_documents, token_batches
from layerzip.depth import drop_blocks_
from layerzip.errors import LayerzipError
from layerzip.heal import check_head, distill_loss, heal_
from layerzip.nn import FactorizedLayer
from test_depth import cli, deep_tiny


def batches_for(tokenizer, causal, n=4):
    return token_batches(tokenizer, builtin_documents("calib", 24), causal, n_samples=n, seq_len=32, batch_size=2)


def compressed_pair(arch, tokenizer, keep=0.3):
    """Plain SVD factors: on random tiny models, SVD-LLM's whitened factors are too ill-conditioned to train with
    a few large steps (see bench/DEPTH_HEAL.md); the mechanics under test are the same."""
    teacher = deep_tiny(arch)
    student = deep_tiny(arch)                   # same seed: same weights
    batches = batches_for(tokenizer, arch != "bert")
    compress_(student, SVD(keep=keep), calib=batches, progress=False)
    return student, teacher, batches


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_heal_lowers_loss_and_trains_only_factors(arch, tokenizer):
    student, teacher, batches = compressed_pair(arch, tokenizer)
    causal = arch != "bert"
    frozen = {n: p.clone() for n, p in student.named_parameters()
              if not isinstance(student.get_submodule(n.rpartition(".")[0]), FactorizedLayer)}
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        before = sum(distill_loss(student, teacher, b, causal).item() for b in batches)
    rep = heal_(student, teacher, batches, steps=10, lr=1e-3, causal=causal, progress=False)
    with torch.no_grad():
        after = sum(distill_loss(student, teacher, b, causal).item() for b in batches)
    assert after < 0.9 * before, (before, after)
    assert rep["loss_last"] < rep["loss_first"] and rep["trained"] == "factors"
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), n


def test_hints_after_dropping_blocks(tokenizer):
    teacher, student = deep_tiny("llama"), deep_tiny("llama")
    kept = drop_blocks_(student, [1])["kept_blocks"]
    batches = batches_for(tokenizer, True)
    rep = heal_(student, teacher, batches, steps=6, lr=1e-3, hint_weight=1.0, block_map=kept, progress=False)
    assert rep["trained"] == "block linears" and rep["loss_last"] < rep["loss_first"]
    with pytest.raises(LayerzipError, match="which teacher block"):
        heal_(student, teacher, batches, steps=1, hint_weight=1.0, progress=False)


def test_chunked_head_matches_softcapped_logits(tokenizer):
    model = deep_tiny("gemma3")
    model.config.final_logit_softcapping = 3.0
    check_head(model, batches_for(tokenizer, True)[0])          # raises if the chunked head were wrong
    model.register_forward_hook(lambda m, args, out: type(out)(logits=out.logits * 2))   # an unknown logit scale
    with pytest.raises(LayerzipError, match="does not reproduce"):
        check_head(model, batches_for(tokenizer, True)[0])


@pytest.mark.slow
def test_cli_heal_saves_reloadable_model(tokenizer, calib_file, tmp_path, capsys):
    student, teacher, _ = compressed_pair("qwen2", tokenizer)
    save(student, tmp_path / "lz", tokenizer=tokenizer, meta={"method": "svd", "keep": 0.3})
    teacher.save_pretrained(tmp_path / "orig")
    tokenizer.save_pretrained(tmp_path / "orig")
    code, out, err = cli(capsys, "heal", tmp_path / "lz", "--teacher", tmp_path / "orig", "--text", calib_file,
                         "--out", tmp_path / "healed", "--steps", 5, "--lr", 1e-3, "--seq-len", 32,
                         "--samples", 4, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["loss_last"] < rep["loss_first"]
    meta = json.loads((tmp_path / "healed" / "layerzip.json").read_text())
    assert meta["heal"]["steps"] == 5 and meta["modules"] and meta["method"] == "svd"
    healed = load_model(tmp_path / "healed").model
    x = torch.randint(5, 500, (1, 10))
    assert healed(input_ids=x).logits.isfinite().all()
    assert not torch.equal(healed(input_ids=x).logits, student(input_ids=x).logits)

    for bad, msg in [(["--steps", 0], "--steps"), (["--hints", -1], "--hints")]:
        code, _, err = cli(capsys, "heal", tmp_path / "lz", "--teacher", tmp_path / "orig", "--text", calib_file,
                           "--out", tmp_path / "bad", *bad)
        assert code == 2 and msg in err
    code, _, err = cli(capsys, "heal", tmp_path / "lz", "--teacher", tmp_path / "orig", "--text", tmp_path / "no.txt",
                       "--out", tmp_path / "bad")
    assert code == 2 and "not found" in err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compress_with_heal_steps(tokenizer, calib_file, tmp_path, capsys):
    src = tmp_path / "llama"
    deep_tiny("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    code, out, err = cli(capsys, "compress", src, "--out", tmp_path / "o", "--method", "svd", "--keep", 0.3,
                         "--calib", calib_file, "--calib-samples", 4, "--seq-len", 32, "--heal-steps", 3,
                         "--heal-lr", 1e-3, "--json")
    assert code == 0, err
    assert json.loads(out)["heal"]["steps"] == 3
    assert json.loads((tmp_path / "o" / "layerzip.json").read_text())["report"]["heal"]["trained"] == "factors"
    assert load_model(tmp_path / "o").model(input_ids=torch.randint(5, 500, (1, 8))).logits.isfinite().all()
