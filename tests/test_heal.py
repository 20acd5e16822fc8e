"""heal: distillation lowers the loss in a few steps, trains only the factors, saves and reloads."""
import json

import pytest
import torch

from layerzip import SVD, compress_, load_model, save
from layerzip.data import builtin_documents, token_batches
from layerzip.methods.drop_blocks import drop_blocks_
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


def test_default_heal_steps_only_for_causal_svdllm_in_memory(tokenizer):
    from types import SimpleNamespace

    from layerzip import SVDLLM
    from layerzip.heal import HEAL_STEPS
    from layerzip.jobs import default_heal_steps
    llama, bert = deep_tiny("llama"), deep_tiny("bert")
    compress_(llama, SVD(keep=0.5), calib=batches_for(tokenizer, True), progress=False)
    compress_(bert, SVD(keep=0.5), calib=batches_for(tokenizer, False), progress=False)
    causal, encoder = SimpleNamespace(model=llama, causal=True), SimpleNamespace(model=bert, causal=False)
    warnings = []
    assert default_heal_steps(causal, SVDLLM(keep=0.5), False, 1, warnings) == HEAL_STEPS > 0
    assert default_heal_steps(encoder, SVDLLM(keep=0.5), False, 1, warnings) == 0
    assert default_heal_steps(causal, SVD(keep=0.5), False, 1, warnings) == 0                     # not measured
    assert default_heal_steps(causal, SVDLLM(keep=0.5, share=2), False, 1, warnings) == 0
    assert default_heal_steps(SimpleNamespace(model=deep_tiny("llama"), causal=True), SVDLLM(keep=1.0), False, 1,
                              warnings) == 0                                                   # nothing factorized
    assert not warnings
    assert default_heal_steps(causal, SVDLLM(keep=0.5), False, 2**60, warnings) == 0              # teacher too big
    assert default_heal_steps(causal, SVDLLM(keep=0.5), True, 1, warnings) == 0                   # streamed
    assert len(warnings) == 2 and "not fit" in warnings[0] and "streams" in warnings[1]


@pytest.mark.slow
def test_compress_heals_causal_svdllm_by_default(tokenizer, calib_file, tmp_path, capsys, monkeypatch):
    src = tmp_path / "llama"
    deep_tiny("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["--keep", 0.5, "--calib", calib_file, "--calib-samples", 4, "--seq-len", 32, "--refine-steps", 0, "--json"]
    code, out, err = cli(capsys, "compress", src, "--out", tmp_path / "o", *args)
    assert code == 0, err
    heal = json.loads(out)["heal"]
    assert (heal["steps"], heal["lr"], heal["trained"]) == (32, 5e-5, "factors")
    code, out, err = cli(capsys, "compress", src, "--out", tmp_path / "o0", *args, "--heal-steps", 0)
    assert code == 0, err
    assert "heal" not in json.loads(out)
    x = torch.randint(5, 500, (1, 8))
    healed, plain = (load_model(tmp_path / d).model(input_ids=x).logits for d in ("o", "o0"))
    assert not torch.equal(healed, plain)
    for where in ("layerzip.jobs", "layerzip.heal"):                   # logits heal cannot rebuild
        monkeypatch.setattr(f"{where}.head_supported", lambda model, batch: False)
    code, out, err = cli(capsys, "compress", src, "--out", tmp_path / "o1", *args)
    assert code == 0, err                                               # the default is skipped, not refused
    rep = json.loads(out)
    assert "heal" not in rep and any(w.startswith("not healed") for w in rep["warnings"])
    code, _, err = cli(capsys, "compress", src, "--out", tmp_path / "o2", *args, "--heal-steps", 2)
    assert code == 2 and "does not reproduce" in err                    # asked for: refused


# ------------------------------------------------------------------------------------------- images (any nn.Module)
class _MapNet(torch.nn.Module):
    """Conv features and a 1-channel map (a detector's output form: no class logits)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
        self.out = torch.nn.Conv2d(16, 1, 1)

    def forward(self, x):
        return self.out(self.body(x)), self.body[0](x)      # the map, and a feature tensor


def _classifier():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(24, 10))


@pytest.mark.parametrize("kind", ["output-kl", "output-nmse"])
def test_heal_on_images_lowers_loss_and_trains_only_conv_factors(kind):
    import copy

    from layerzip import ConvSVD
    from layerzip.heal import output_loss
    torch.manual_seed(0)
    teacher = (_classifier() if kind == "output-kl" else _MapNet()).eval()
    images = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    student = copy.deepcopy(teacher)
    compress_(student, ConvSVD(keep=0.3), calib=images, progress=False)
    frozen = {n: p.clone() for n, p in student.named_parameters() if ".A" not in n and ".B" not in n
              and not isinstance(student.get_submodule(n.rpartition(".")[0]), FactorizedLayer)}
    with torch.no_grad():
        before = sum(output_loss(student, teacher, x)[0].item() for x in images)
    rep = heal_(student, teacher, images, steps=30, lr=3e-3, progress=False)
    with torch.no_grad():
        after = sum(output_loss(student, teacher, x)[0].item() for x in images)
    assert rep["loss"] == kind and rep["trained"] == "factors" and after < 0.85 * before
    assert all(torch.equal(p, dict(student.named_parameters())[n]) for n, p in frozen.items())


def test_heal_on_images_refuses_an_uncompressed_model_and_hints():
    model = _classifier()
    images = [torch.randn(2, 3, 8, 8)]
    with pytest.raises(LayerzipError, match="no factorized layers"):
        heal_(model, _classifier(), images, steps=1, progress=False)
    with pytest.raises(LayerzipError, match="hints"):
        heal_(model, _classifier(), images, steps=1, hint_weight=1.0, progress=False)


def test_cli_heals_a_transformers_vision_model_on_images(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    from conftest import run_cli
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                    num_labels=6)
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(cfg).save_pretrained(tmp_path / "resnet")
    (tmp_path / "imgs").mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(4):
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            tmp_path / "imgs" / f"{k}.png")
    code, out, err = run_cli(capsys, "compress", str(tmp_path / "resnet"), "--out", str(tmp_path / "o"), "--method",
                             "conv-svd", "--keep", "0.5", "--calib", str(tmp_path / "imgs"), "--heal-steps", "4",
                             "--heal-lr", "1e-3", "--json")
    assert code == 0, err
    heal = json.loads(out)["heal"]
    assert heal["loss"] == "output-kl" and heal["steps"] == 4 and heal["trained"] == "factors"
    code, out, err = run_cli(capsys, "heal", str(tmp_path / "o"), "--teacher", str(tmp_path / "resnet"), "--text",
                             str(tmp_path / "imgs"), "--out", str(tmp_path / "h"), "--steps", "3", "--lr", "1e-3",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == "output-kl"
    assert isinstance(load_model(str(tmp_path / "h")).model, transformers.ResNetForImageClassification)
    code, out, err = run_cli(capsys, "compress", str(tmp_path / "resnet"), "--out", str(tmp_path / "p"), "--method",
                             "conv-svd", "--heal-steps", "2")
    assert code == 2 and err.count("\n") == 1 and "--calib" in err and not (tmp_path / "p").exists()
