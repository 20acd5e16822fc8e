"""Bad inputs and interruptions (issue: reliability): each check here failed before its fix."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from layerzip.cli import main
from layerzip.io import builtin_path

from conftest import tiny_model


def run(capsys, *argv):
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err[-1000:]
    return code, cap.out, [l for l in cap.err.replace("\r", "\n").splitlines() if l.startswith("layerzip:")]


def refused(capsys, match, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("layerzip: error:") and match in err[0], err
    assert out == ""


@pytest.fixture()
def mismatched(tmp_path):
    """A Qwen2 config of 30522 words with the BERT tokenizer plus an added <|endoftext|> (id 30522)."""
    cfg = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, vocab_size=30522, max_position_embeddings=128)
    d = tmp_path / "qwen-bert-tok"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(builtin_path("minilm"))
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tok.save_pretrained(d)
    return d


def test_tokenizer_of_another_model(capsys, mismatched, calib_file, tmp_path):
    refused(capsys, "does not match the model", "compress", mismatched, "--out", tmp_path / "o", "--calib", calib_file,
            "--calib-samples", 8, "--seq-len", 32)          # windows span documents: the <|endoftext|> between them
    refused(capsys, "30522", "eval", mismatched, "--text", calib_file, "--seq-len", 32)
    assert not (tmp_path / "o").exists()


def test_calibration_used_is_recorded_and_short_text_warned(capsys, tiny_dirs, calib_file, tmp_path):
    code, out, err = run(capsys, "compress", tiny_dirs["llama"], "--out", tmp_path / "o", "--calib", calib_file,
                         "--calib-samples", 500, "--seq-len", 64, "--json")
    assert code == 0 and len(err) == 1 and err[0].startswith("layerzip: warning:") and "of the 500 asked" in err[0]
    cal = json.loads((tmp_path / "o" / "layerzip.json").read_text())["calibration"]
    assert cal["samples_requested"] == 500 and 0 < cal["windows"] == cal["samples"] < 500
    assert cal["tokens"] == cal["windows"] * 64 and cal["documents"] == 40
    meta = json.loads((tmp_path / "o" / "layerzip.json").read_text())
    assert (meta["config"]["alloc"], meta["config"]["fisher"]) == ("global", True)        # what ran
    assert (meta["requested"]["alloc"], meta["requested"]["fisher"]) == (None, None)      # what was asked


def test_heal_caps_seq_len(capsys, tiny_dirs, calib_file, tmp_path):
    code, _, err = run(capsys, "compress", tiny_dirs["gpt2"], "--out", tmp_path / "c", "--method", "svd", "--json")
    assert code == 0, err
    code, out, err = run(capsys, "heal", tmp_path / "c", "--teacher", tiny_dirs["gpt2"], "--text", calib_file,
                         "--steps", 1, "--seq-len", 4096, "--samples", 2, "--out", tmp_path / "h", "--json")
    assert code == 0, err


@pytest.fixture()
def compressed(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "compress", tiny_dirs["llama"], "--out", tmp_path / "lz", "--method", "svd", "--json")
    assert code == 0, err
    return tmp_path / "lz"


@pytest.mark.parametrize("name", ["../x", "__class__", "config.vocab_size", "model.layers.0.__dict__",
                                  "model.layers.0.self_attn.q_proj.weight"])
def test_module_names_outside_the_module_tree(capsys, compressed, name):
    meta = json.loads((compressed / "layerzip.json").read_text())
    spec = next(iter(meta["modules"].values()))
    meta["modules"] = {name: spec}
    (compressed / "layerzip.json").write_text(json.dumps(meta))
    refused(capsys, "not a module of the", "eval", compressed)


def test_architecture_and_custom_code_refused(capsys, compressed, tiny_dirs, tmp_path):
    meta = json.loads((compressed / "layerzip.json").read_text())
    (compressed / "layerzip.json").write_text(json.dumps({**meta, "architecture": "pipeline"}))
    refused(capsys, "not a transformers model class", "eval", compressed)
    src = tmp_path / "custom"
    shutil.copytree(tiny_dirs["bert"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    (src / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    refused(capsys, "auto_map", "compress", src, "--out", tmp_path / "o", "--method", "svd")
    refused(capsys, "auto_map", "eval", src)


def test_tensor_of_the_wrong_shape(capsys, compressed):
    sd = load_file(compressed / "model.safetensors")
    key = next(k for k in sd if k.endswith(".A"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    save_file(sd, compressed / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, "does not match layerzip.json", "eval", compressed)


def _compress_cmd(out):
    return [sys.executable, "-m", "layerzip.cli", "compress", "minilm", "--out", str(out), "--calib-samples", "32",
            "--seq-len", "128", "--json"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_compress_leaves_nothing_complete(sig, tmp_path):
    """A real signal while the blocks are being decomposed: no --out that looks complete, and the same command
    then runs cleanly without --force."""
    out = tmp_path / "o"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # the child gets SIGINT's default disposition whatever the test process has (an ignored SIGINT is inherited,
    # and Python then never raises KeyboardInterrupt)
    p = subprocess.Popen(_compress_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, t0 = b"", time.time()
    while b"blocks" not in seen and time.time() - t0 < 120 and p.poll() is None:
        seen += os.read(p.stderr.fileno(), 65536)          # the block driver's progress bar has started
    assert b"blocks" in seen and p.poll() is None, seen[-500:]
    p.send_signal(sig)
    code = p.wait(timeout=60)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert not (out / "layerzip.json").exists() and not (out.exists() and any(out.iterdir()))
    done = subprocess.run(_compress_cmd(out), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["out"] == str(out) and (out / "layerzip.json").is_file()


def test_command_line_basics(capsys, tiny_dirs, calib_file, tmp_path):
    code, out, _ = run(capsys)                                    # a bare `layerzip`: the help, exit 0
    assert code == 0 and "Usage: layerzip" in out and "compress" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("layerzip, version")
    code, out, _ = run(capsys, "compress", "--help")
    assert "--sequential / --no-sequential" in out and "svd-llm" in out and "MODEL" in out
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    broken = tmp_path / "broken"                                 # would fail to load: --out is checked first
    shutil.copytree(tiny_dirs["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    refused(capsys, "--force", "compress", broken, "--out", full)
    code, out, _ = run(capsys, "eval", tiny_dirs["llama"], "--text", calib_file, "--seq-len", 32, "--samples", 8,
                       "--json")
    res = json.loads(out)
    assert code == 0 and res["windows"] == 2 and res["tokens"] == 2 * 31
