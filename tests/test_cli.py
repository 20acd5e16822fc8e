"""The command line: JSON output, and every bad input -> one line on stderr, exit code 2, input untouched."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerzip.cli import main
from layerzip.io import FORMAT_VERSION

from conftest import run_cli


def digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def assert_bad(capsys, *argv, match):
    code, out, err = run_cli(capsys, *argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("layerzip: error:"), err
    assert match in lines[0], lines[0]
    assert out == ""


@pytest.fixture(scope="module")
def compressed(tiny_dirs, calib_file, tmp_path_factory):
    """A tiny Llama compressed through the CLI (--json)."""
    out = tmp_path_factory.mktemp("cli") / "llama-lz"
    main_args = ["compress", str(tiny_dirs["llama"]), "--out", str(out), "--keep", "0.5", "--calib", str(calib_file),
                 "--calib-samples", "8", "--seq-len", "32", "--json"]
    with pytest.raises(SystemExit) as e:
        main(main_args)
        raise SystemExit(0)
    assert (e.value.code or 0) == 0
    return out


def test_compress_json_and_eval(compressed, tiny_dirs, capsys, calib_file):
    meta = json.loads((compressed / "layerzip.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["method"] == "svd-llm" and meta["modules"]
    code, out, _ = run_cli(capsys, "eval", str(compressed), "--text", str(calib_file), "--seq-len", "32", "--json")
    res = json.loads(out)
    assert code == 0 and res["params"] > 0 and res["perplexity"] > 1 and res["size_on_disk"] > 0


def test_compress_prints_contract_keys(tiny_dirs, calib_file, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "compress", str(tiny_dirs["bert"]), "--out", str(tmp_path / "o"), "--method", "asvd",
                       "--keep", "0.6", "--calib", str(calib_file), "--calib-samples", "8", "--seq-len", "32",
                       "--json")
    rep = json.loads(out)
    for key in ("params_before", "params_after", "target_params_before", "target_params_after", "keep_achieved",
                "seconds", "method", "out"):
        assert key in rep
    assert code == 0 and rep["method"] == "asvd" and abs(rep["keep_achieved"] - 0.6) < 0.006
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "o"), "--reference", str(tiny_dirs["bert"]),
                       "--text", str(calib_file), "--samples", "8", "--json")
    assert -1 <= json.loads(out)["cosine_to_reference"] <= 1


def test_missing_path(capsys, tmp_path):
    assert_bad(capsys, "compress", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), match="does not exist")
    assert not (tmp_path / "o").exists()


def test_not_a_model(capsys, tmp_path, calib_file):
    assert_bad(capsys, "compress", str(tmp_path), "--out", str(tmp_path / "o"), match="no config.json")
    assert_bad(capsys, "eval", str(calib_file), match="not a .gguf")


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2", "abc"])
def test_bad_keep(capsys, tiny_dirs, tmp_path, keep):
    before = digest(tiny_dirs["gpt2"])
    assert_bad(capsys, "compress", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "o"), "--keep", keep,
               match="keep")
    assert digest(tiny_dirs["gpt2"]) == before and not (tmp_path / "o").exists()


def test_unknown_method(capsys, tiny_dirs, tmp_path):
    assert_bad(capsys, "compress", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "o"), "--method", "magic",
               match="unknown method")


def test_empty_and_short_calibration(capsys, tiny_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_bad(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--calib", str(empty),
               match="no text")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.\n")
    assert_bad(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--calib", str(short),
               "--seq-len", "128", match="too short")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    assert_bad(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--calib", str(bad),
               match="'text' field")
    assert not (tmp_path / "o").exists()


def test_out_not_empty_needs_force(capsys, tiny_dirs, tmp_path, calib_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_bad(capsys, "compress", str(tiny_dirs["bert"]), "--out", str(out), "--method", "svd", match="--force")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, _ = run_cli(capsys, "compress", str(tiny_dirs["bert"]), "--out", str(out), "--method", "svd", "--force",
                     "--json")
    assert code == 0 and (out / "layerzip.json").exists() and not (out / "keep.txt").exists()
    assert not list(tmp_path.glob(".o.*"))      # no temporary directories left behind


def test_out_is_input(capsys, tiny_dirs):
    before = digest(tiny_dirs["bert"])
    assert_bad(capsys, "compress", str(tiny_dirs["bert"]), "--out", str(tiny_dirs["bert"]), "--force",
               match="is the input")
    assert digest(tiny_dirs["bert"]) == before


def test_nan_weights(capsys, tiny_dirs, tmp_path):
    src = tmp_path / "nan"
    shutil.copytree(tiny_dirs["gpt2"], src)
    sd = load_file(src / "model.safetensors")
    key = next(k for k in sd if k.endswith("mlp.c_fc.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    before = digest(src)
    assert_bad(capsys, "compress", str(src), "--out", str(tmp_path / "o"), "--method", "svd", match="NaN")
    assert digest(src) == before and not (tmp_path / "o").exists()


def test_corrupt_safetensors(capsys, compressed, tiny_dirs, tmp_path):
    for src in (compressed, tiny_dirs["opt"]):
        bad = tmp_path / src.name
        shutil.copytree(src, bad)
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
        before = digest(bad)
        assert_bad(capsys, "eval", str(bad), match="model.safetensors" if src == compressed else "cannot load")
        assert_bad(capsys, "compress", str(bad), "--out", str(tmp_path / "o"), "--method", "svd",
                   match="re-run" if src == compressed else "complete")
        assert digest(bad) == before


def test_newer_format_version(capsys, compressed, tmp_path):
    bad = tmp_path / "newer"
    shutil.copytree(compressed, bad)
    meta = json.loads((bad / "layerzip.json").read_text())
    meta["format_version"] = 99
    (bad / "layerzip.json").write_text(json.dumps(meta))
    assert_bad(capsys, "eval", str(bad), match="newer layerzip")


def test_bad_regex(capsys, tiny_dirs, tmp_path):
    assert_bad(capsys, "compress", str(tiny_dirs["bert"]), "--out", str(tmp_path / "o"), "--method", "svd",
               "--include", "(", match="regular expression")


def test_lz_load_matches_cli_output(compressed, tiny_dirs, calib_file, capsys):
    """The CLI's directory holds exactly what the Python API computes with the same settings (compress_, then the
    default healing of a causal LM: heal_ towards the original on the calibration windows), and `eval --json`
    prints the perplexity of that model."""
    import layerzip as lz
    from layerzip.evaluate import perplexity
    from layerzip.heal import HEAL_LR, HEAL_STEPS, windows_per_step
    from layerzip.nn import LowRankLinear
    model = lz.load(compressed)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    loaded = lz.load_model(tiny_dirs["llama"])
    batches = lz.calibration_batches(loaded, str(calib_file), n_samples=8, seq_len=32)
    torch.manual_seed(0)
    rep = lz.compress_(loaded.model, lz.SVDLLM(keep=0.5), calib=batches, progress=False)
    lz.heal_(loaded.model, lz.load_model(tiny_dirs["llama"]).model,
             lz.calibration_batches(loaded, str(calib_file), 8, 32, windows_per_step(32)), HEAL_STEPS, HEAL_LR,
             progress=False)
    meta = json.loads((compressed / "layerzip.json").read_text())
    assert rep["ranks"] == meta["report"]["ranks"] and rep["config"] == meta["config"]
    ids = torch.tensor([[1, 2, 3, 400, 5000]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    code, out, _ = run_cli(capsys, "eval", str(compressed), "--text", str(calib_file), "--seq-len", "32", "--json")
    texts = lz.data.load_documents(str(calib_file))
    assert json.loads(out)["perplexity"] == pytest.approx(perplexity(model, loaded.tokenizer, texts, 32, 32, False),
                                                          rel=1e-5)


def test_pickled_weights_refused(capsys, tiny_dirs, tmp_path):
    """A directory with only pytorch_model.bin is refused: nothing is ever unpickled."""
    src = tmp_path / "bin"
    shutil.copytree(tiny_dirs["bert"], src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert_bad(capsys, "eval", str(src), match="never loads")


def test_option_of_another_method_is_refused(tmp_path):
    from layerzip import config_from_dict
    from layerzip.errors import LayerzipError
    import pytest as _pytest
    with _pytest.raises(LayerzipError, match="--fisher does not apply to method svd"):
        config_from_dict({"method": "svd", "keep": 0.5, "fisher": True})
    assert config_from_dict({"method": "svd-llm", "keep": 0.5, "fisher": True}).fisher
