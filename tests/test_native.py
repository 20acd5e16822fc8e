"""Native loading (hf.py): after `import layerzip`, transformers' own `from_pretrained` / `pipeline` on a directory
layerzip wrote gives the model `lz.load` gives; without layerzip, transformers refuses it instead of loading random
weights; older directories still load; the source's dtype is kept (a .gguf file: bfloat16 unless asked)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import layerzip as lz
from layerzip.cli import main
from layerzip.io import GUARD, load_model

from conftest import tiny_model

NATIVE = ["llama", "gemma3", "gpt2", "bert"]


def auto_class(arch: str):
    return transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM


def output(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def ids_for(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(model.config.vocab_size, 1000), (2, 16), generator=g)


def compress_save(loaded, out, include: str | None = None):
    batches = lz.calibration_batches(loaded, "builtin", n_samples=8, seq_len=32, batch_size=4)
    lz.compress_(loaded.model, lz.SVDLLM(keep=0.5, include=include), calib=batches, progress=False)
    lz.save(loaded.model, out, tokenizer=loaded.tokenizer, meta={"method": "svd-llm"})
    return out


@pytest.fixture(scope="module")
def compressed(tiny_dirs, tmp_path_factory):
    """{arch: directory} of tiny models compressed with svd-llm and saved by lz.save."""
    root = tmp_path_factory.mktemp("native")
    return {arch: compress_save(load_model(tiny_dirs[arch]), root / arch) for arch in NATIVE}


def count_factorized(model) -> int:
    return sum(isinstance(m, lz.FactorizedLayer) for m in model.modules())


@pytest.mark.parametrize("arch", NATIVE)
def test_native_load_equals_lz_load(compressed, arch):
    out = compressed[arch]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "layerzip" and cfg["transformers_weights"] == GUARD
    ref = lz.load(out)
    native = auto_class(arch).from_pretrained(out)
    assert type(native) is type(ref) and count_factorized(native) == count_factorized(ref) > 0
    assert next(native.parameters()).dtype == torch.float32
    ids = ids_for(ref)
    assert (output(native, ids) - output(ref, ids)).abs().max().item() <= 1e-5
    # lz.load gives a plain transformers model: the keys save adds are not in its config
    assert not hasattr(ref.config, "quantization_config") and not hasattr(ref.config, "transformers_weights")


@pytest.mark.slow
def test_real_minilm_native(tmp_path):
    # the first and last of its 6 blocks (all 36 modules take minutes on a busy 2-core machine)
    out = compress_save(load_model("minilm"), tmp_path / "minilm", include=r"encoder\.layer\.[05]\.")
    ref = lz.load(out)
    native = transformers.AutoModel.from_pretrained(out)
    assert count_factorized(native) == count_factorized(ref) == 12
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(["Return the sum of the values.", "Open the file for reading."], padding=True,
              return_tensors="pt")["input_ids"]
    assert (output(native, ids) - output(ref, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_native_dtype_and_device_map(compressed, device_map):
    out = compressed["llama"]
    native = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map=device_map)
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in native.parameters()} == {"cpu"} and count_factorized(native) > 0
    ref = lz.load(out)
    ids = ids_for(ref)
    torch.testing.assert_close(output(native, ids).float(), output(ref, ids), atol=0.03, rtol=0.03)


def test_pipeline_and_resave(compressed, tmp_path):
    out = compressed["llama"]
    gen = transformers.pipeline("text-generation", model=str(out))
    assert count_factorized(gen.model) > 0
    text = gen("The file is", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("The file is")
    # transformers' save_pretrained would drop the guard, so it is refused; lz.save writes it again
    with pytest.raises(ValueError, match="not serializable"):
        gen.model.save_pretrained(tmp_path / "hf")
    lz.save(gen.model, tmp_path / "again", tokenizer=gen.tokenizer)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["transformers_weights"] == GUARD
    ids = ids_for(gen.model)
    assert torch.equal(output(lz.load(tmp_path / "again"), ids), output(gen.model, ids))


def test_without_layerzip_transformers_refuses(compressed):
    """A fresh interpreter that never imports layerzip: the tokenizer loads, the model does not (no random
    weights), and the error names layerzip."""
    script = f"""
import sys, transformers
transformers.utils.logging.set_verbosity_error()
path = {str(compressed["gpt2"])!r}
transformers.AutoTokenizer.from_pretrained(path)
for load in (lambda: transformers.AutoModelForCausalLM.from_pretrained(path),
             lambda: transformers.pipeline("text-generation", model=path)):
    try:
        load()
    except Exception as e:
        print("REFUSED", "layerzip" in str(e), type(e).__name__)
    else:
        print("LOADED")
assert "layerzip" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:2] == ["REFUSED True ValueError", "REFUSED True ValueError"], res.stdout


def test_damaged_quantization_config_is_refused(compressed, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(compressed["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    spec = next(iter(cfg["quantization_config"]["modules"].values()))
    cfg["quantization_config"]["modules"]["config.vocab_size"] = spec
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lz.LayerzipError, match="module 'config.vocab_size'"):
        transformers.AutoModelForCausalLM.from_pretrained(d)
    cfg["quantization_config"] = {"quant_method": "layerzip", "format_version": 99, "modules": {}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lz.LayerzipError, match="newer layerzip"):
        transformers.AutoModelForCausalLM.from_pretrained(d)


def test_old_format_still_loads(compressed, tmp_path):
    """A directory of format 1 (config.json without quantization_config and guard) loads with lz.load."""
    old = tmp_path / "old"
    shutil.copytree(compressed["gpt2"], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization_config"], cfg["transformers_weights"]
    (old / "config.json").write_text(json.dumps(cfg, indent=2))
    meta = json.loads((old / "layerzip.json").read_text())
    meta["format_version"] = 1
    (old / "layerzip.json").write_text(json.dumps(meta, indent=1))
    ref = lz.load(compressed["gpt2"])
    ids = ids_for(ref)
    assert torch.equal(output(lz.load(old), ids), output(ref, ids))


def test_merged_model_is_plain_transformers(compressed, tmp_path):
    """No factorized module left (merge_, or drop-blocks alone): a plain transformers directory, no guard."""
    model = lz.load(compressed["llama"])
    lz.merge_(model)
    lz.save(model, tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and "transformers_weights" not in cfg
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = ids_for(model)
    assert (output(plain, ids) - output(model, ids)).abs().max().item() <= 1e-5


def test_streamed_save_loads_natively(tiny_dirs, tmp_path):
    """A streamed model (read block by block) saved as HF shards + index loads natively too."""
    out = compress_save(load_model(tiny_dirs["llama"], stream=True), tmp_path / "streamed")
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    ref = lz.load(out)
    native = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert count_factorized(native) == count_factorized(ref) > 0
    ids = ids_for(ref)
    assert (output(native, ids) - output(ref, ids)).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------------- dtype
def cli(*argv) -> dict:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()) as buf:
        with pytest.raises(SystemExit) as e:
            main(list(argv))
            raise SystemExit(0)
    assert (e.value.code or 0) == 0
    return json.loads(buf.getvalue())


def saved_dtypes(out) -> set[str]:
    dtypes = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            dtypes |= {h.get_slice(k).get_dtype() for k in h.keys()}
    return dtypes


def test_bf16_stays_bf16(tokenizer, calib_file, tmp_path):
    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "lz"
    cli("compress", str(src), "--out", str(out), "--keep", "0.5", "--calib", str(calib_file), "--calib-samples", "4",
        "--seq-len", "32", "--json")
    assert saved_dtypes(out) == {"BF16"}
    assert json.loads((out / "layerzip.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    native = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lz.load(out).parameters()} == {torch.bfloat16}
    cli("compress", str(src), "--out", str(tmp_path / "f32"), "--method", "svd", "--dtype", "float32", "--json")
    assert saved_dtypes(tmp_path / "f32") == {"F32"}


def write_tiny_llama_gguf(path, hidden: int = 32, layers: int = 2, heads: int = 4, kv: int = 2, ffn: int = 64):
    """A float32 GGUF Llama with a byte-level BPE tokenizer (257 tokens), as llama.cpp names its tensors."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    tokens = list(bytes_to_unicode().values()) + ["<|endoftext|>"]
    n = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 128), (w.add_block_count, layers), (w.add_feed_forward_length, ffn),
                       (w.add_embedding_length, hidden), (w.add_rope_dimension_count, hidden // heads),
                       (w.add_head_count, heads), (w.add_head_count_kv, kv), (w.add_layer_norm_rms_eps, 1e-6),
                       (w.add_vocab_size, n), (w.add_rope_freq_base, 10000.0), (w.add_tokenizer_model, "gpt2"),
                       (w.add_token_list, tokens), (w.add_token_merges, []), (w.add_token_scores, [0.0] * n),
                       (w.add_token_types, [1] * (n - 1) + [3]), (w.add_eos_token_id, n - 1),
                       (w.add_bos_token_id, n - 1)):
        add(value)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    kvd = kv * hidden // heads
    w.add_tensor("token_embd.weight", rand(n, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(n, hidden))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kvd, hidden)), ("attn_v", (kvd, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_saved_in_bf16_unless_asked(tmp_path):
    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    cli("compress", str(src), "--out", str(tmp_path / "bf16"), "--method", "svd", "--json")
    assert saved_dtypes(tmp_path / "bf16") == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16} and count_factorized(native) > 0
    cli("compress", str(src), "--out", str(tmp_path / "f32"), "--method", "svd", "--dtype", "float32", "--json")
    assert saved_dtypes(tmp_path / "f32") == {"F32"}
    assert json.loads((tmp_path / "f32" / "layerzip.json").read_text())["dtype"] == "float32"
