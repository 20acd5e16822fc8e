"""Fuzz table: every bad input to every command -> exit code 2, exactly one line on stderr
(`layerzip: error: ...`, no traceback), nothing on stdout, and nothing written or changed on disk.

Each row of CASES is (id, argv, fragment). argv entries are formatted with the paths of the `env` fixture:
    {bert} {gpt2} {llama} {qwen2} {opt} {gemma3}   tiny saved HF models (conftest.tiny_dirs)
    {calib}                                          a good .txt calibration file
    {lz}                                             a valid layerzip output directory (tiny Llama, svd)
    {bad}                                            the folder of broken inputs built by the `bad` fixture
    {out}                                            a fresh output path under the test's tmp_path (absent)
    {full}                                           a non-empty directory under tmp_path (holds keep.txt)
    {afile}                                          an existing plain file under tmp_path
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import traceback
import warnings
from pathlib import Path

import pytest
import transformers

from layerzip.cli import main

SMALL = ["--calib-samples", "4", "--seq-len", "32"]          # runs that get far stay tiny
HEAL = ["--steps", "1", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
EVAL = ["--samples", "4", "--seq-len", "32"]

CASES = [
    # ---------------------------------------------------------------- top level
    ("top-unknown-command", ["frobnicate"], "frobnicate"),
    ("top-unknown-option", ["--frobnicate"], "frobnicate"),
    ("demo-unknown-option", ["demo", "--frobnicate"], "frobnicate"),
    ("demo-extra-argument", ["demo", "extra"], "extra"),
    # ---------------------------------------------------------------- compress: MODEL and --out
    ("compress-missing-model-arg", ["compress", "--out", "{out}"], "MODEL"),
    ("compress-missing-out-option", ["compress", "{gpt2}"], "--out"),
    ("compress-model-does-not-exist", ["compress", "{bad}/nope", "--out", "{out}"], "does not exist"),
    ("compress-model-is-txt-file", ["compress", "{calib}", "--out", "{out}"], "not a .gguf"),
    ("compress-dir-without-config", ["compress", "{bad}/notmodel", "--out", "{out}"], "no config.json"),
    ("compress-out-is-model", ["compress", "{bert}", "--out", "{bert}", "--force", "--method", "svd"],
     "is the input"),
    ("compress-out-nonempty-no-force", ["compress", "{bert}", "--out", "{full}", "--method", "svd"], "--force"),
    ("compress-out-is-a-file", ["compress", "{bert}", "--out", "{afile}", "--method", "svd"], "is a file"),
    ("compress-unknown-option", ["compress", "{gpt2}", "--out", "{out}", "--frobnicate"], "frobnicate"),
    # ---------------------------------------------------------------- compress: calibration text
    ("compress-calib-missing-file", ["compress", "{llama}", "--out", "{out}", "--calib", "{bad}/nope.txt", *SMALL],
     "not found"),
    ("compress-calib-empty", ["compress", "{llama}", "--out", "{out}", "--calib", "{bad}/empty.txt", *SMALL],
     "no text"),
    ("compress-calib-not-utf8", ["compress", "{llama}", "--out", "{out}", "--calib", "{bad}/latin1.txt", *SMALL],
     "UTF-8"),
    ("compress-calib-jsonl-without-text", ["compress", "{llama}", "--out", "{out}", "--calib",
                                           "{bad}/notext.jsonl", *SMALL], "'text'"),
    ("compress-calib-too-short", ["compress", "{llama}", "--out", "{out}", "--calib", "{bad}/short.txt",
                                  "--calib-samples", "4", "--seq-len", "128"], "too short"),
    ("compress-calib-samples-0", ["compress", "{llama}", "--out", "{out}", "--calib-samples", "0"],
     "calib-samples"),
    ("compress-calib-samples-neg", ["compress", "{llama}", "--out", "{out}", "--calib-samples", "-3"],
     "calib-samples"),
    ("compress-seq-len-1", ["compress", "{llama}", "--out", "{out}", "--seq-len", "1"], "seq-len"),
    ("compress-seq-len-0", ["compress", "{llama}", "--out", "{out}", "--seq-len", "0"], "seq-len"),
    # ---------------------------------------------------------------- compress: --keep and method options
    ("compress-keep-0", ["compress", "{gpt2}", "--out", "{out}", "--keep", "0", *SMALL], "keep"),
    ("compress-keep-1.5", ["compress", "{gpt2}", "--out", "{out}", "--keep", "1.5", *SMALL], "keep"),
    ("compress-keep-neg", ["compress", "{gpt2}", "--out", "{out}", "--keep", "-1", *SMALL], "keep"),
    ("compress-keep-nan", ["compress", "{gpt2}", "--out", "{out}", "--keep", "nan", *SMALL], "keep"),
    ("compress-keep-abc", ["compress", "{gpt2}", "--out", "{out}", "--keep", "abc", *SMALL], "keep"),
    ("compress-unknown-method", ["compress", "{gpt2}", "--out", "{out}", "--method", "magic"], "unknown method"),
    ("compress-alpha-with-svd", ["compress", "{gpt2}", "--out", "{out}", "--method", "svd", "--alpha", "0.3"],
     "does not apply"),
    ("compress-alloc-bogus", ["compress", "{gpt2}", "--out", "{out}", "--alloc", "bogus", *SMALL], "alloc"),
    ("compress-cur-energy-1.5", ["compress", "{gpt2}", "--out", "{out}", "--method", "cur", "--energy", "1.5",
                                 *SMALL], "energy"),
    ("compress-drop-blocks-select-bogus", ["compress", "{llama}", "--out", "{out}", "--method", "drop-blocks",
                                           "--select", "bogus", *SMALL], "select"),
    ("compress-drop-blocks-blocks-0", ["compress", "{llama}", "--out", "{out}", "--method", "drop-blocks",
                                       "--blocks", "0", *SMALL], "blocks"),
    ("compress-drop-blocks-all-blocks", ["compress", "{llama}", "--out", "{out}", "--method", "drop-blocks",
                                         "--blocks", "2", *SMALL], "blocks"),
    ("compress-drop-blocks-too-many", ["compress", "{llama}", "--out", "{out}", "--method", "drop-blocks",
                                       "--blocks", "5", *SMALL], "blocks"),
    ("compress-include-bad-regex", ["compress", "{bert}", "--out", "{out}", "--method", "svd", "--include", "("],
     "regular expression"),
    ("compress-include-matches-nothing", ["compress", "{bert}", "--out", "{out}", "--method", "svd",
                                          "--include", "zzz_nothing"], "no target modules"),
    ("compress-heal-steps-neg", ["compress", "{gpt2}", "--out", "{out}", "--heal-steps", "-1", *SMALL],
     "heal-steps"),
    ("compress-dtype-float8", ["compress", "{gpt2}", "--out", "{out}", "--dtype", "float8", *SMALL], "--dtype"),
    ("compress-dtype-int8", ["compress", "{gpt2}", "--out", "{out}", "--dtype", "int8", *SMALL], "--dtype"),
    ("compress-bits-3", ["compress", "{gpt2}", "--out", "{out}", "--bits", "3", *SMALL], "--bits"),
    ("compress-group-size-0", ["compress", "{gpt2}", "--out", "{out}", "--bits", "8", "--group-size", "0", *SMALL],
     "--group-size"),
    ("compress-bits-8-streamed", ["compress", "{llama}", "--out", "{out}", "--bits", "8", "--stream", *SMALL],
     "--no-stream"),
    # ---------------------------------------------------------------- compress: broken model directories
    ("compress-auto-map-custom-code", ["compress", "{bad}/automap", "--out", "{out}", "--method", "svd"],
     "auto_map"),
    ("compress-only-pytorch-model-bin", ["compress", "{bad}/binonly", "--out", "{out}", "--method", "svd"],
     "pickled"),
    ("compress-truncated-safetensors", ["compress", "{bad}/opt-trunc", "--out", "{out}", "--method", "svd"],
     "complete"),
    ("compress-layerzip-json-not-json", ["compress", "{bad}/lz-notjson", "--out", "{out}", "--method", "svd"],
     "layerzip.json"),
    ("compress-lz-module-named-__class__", ["compress", "{bad}/lz-mod-class", "--out", "{out}", "--method",
                                            "svd"], "module"),
    ("compress-tokenizer-ids-exceed-vocab", ["compress", "{bad}/vocab", "--out", "{out}", "--calib",
                                             "{bad}/vocab_calib.txt", *SMALL], "tokenizer"),
    ("compress-tokenizer-larger-than-vocab-plain-text", ["compress", "{bad}/vocab", "--out", "{out}", "--calib",
                                                         "{calib}", *SMALL], "tokenizer"),
    # ---------------------------------------------------------------- eval
    ("eval-model-does-not-exist", ["eval", "{bad}/nope"], "does not exist"),
    ("eval-model-is-txt-file", ["eval", "{calib}"], "not a .gguf"),
    ("eval-text-missing", ["eval", "{llama}", "--text", "{bad}/nope.txt", *EVAL], "not found"),
    ("eval-text-not-utf8", ["eval", "{llama}", "--text", "{bad}/latin1.txt", *EVAL], "UTF-8"),
    ("eval-seq-len-1", ["eval", "{llama}", "--text", "{calib}", "--samples", "4", "--seq-len", "1"], "seq-len"),
    ("eval-samples-0", ["eval", "{llama}", "--text", "{calib}", "--samples", "0", "--seq-len", "32"], "samples"),
    ("eval-reference-missing", ["eval", "{bert}", "--reference", "{bad}/nope", *EVAL], "does not exist"),
    ("eval-retrieval-missing-file", ["eval", "{bert}", "--retrieval", "{bad}/nope.jsonl"], "not found"),
    ("eval-retrieval-one-pair", ["eval", "{bert}", "--retrieval", "{bad}/pairs1.jsonl"], "at least 2"),
    ("eval-retrieval-bad-row", ["eval", "{bert}", "--retrieval", "{bad}/pairsbad.jsonl"], "'query'"),
    ("eval-latency-threads-0", ["eval", "{bert}", "--latency", "--threads", "0", "--latency-seq-len", "8"],
     "threads"),
    ("eval-latency-threads-neg", ["eval", "{bert}", "--latency", "--threads", "-1", "--latency-seq-len", "8"],
     "threads"),
    ("eval-latency-seq-len-0", ["eval", "{bert}", "--latency", "--latency-seq-len", "0"], "latency-seq-len"),
    ("eval-layerzip-json-not-json", ["eval", "{bad}/lz-notjson"], "layerzip.json"),
    ("eval-format-version-99", ["eval", "{bad}/lz-v99"], "newer layerzip"),
    ("eval-truncated-safetensors-hf", ["eval", "{bad}/opt-trunc"], "cannot load"),
    ("eval-truncated-safetensors-layerzip", ["eval", "{bad}/lz-trunc"], "model.safetensors"),
    ("eval-only-pytorch-model-bin", ["eval", "{bad}/binonly"], "pickled"),
    ("eval-auto-map-custom-code", ["eval", "{bad}/automap", *EVAL], "auto_map"),
    ("eval-lz-module-named-dotdot", ["eval", "{bad}/lz-mod-dotdot", *EVAL], "module"),
    ("eval-tokenizer-ids-exceed-vocab", ["eval", "{bad}/vocab", "--text", "{bad}/vocab_calib.txt", *EVAL],
     "tokenizer"),
    ("eval-tokenizer-larger-than-vocab-plain-text", ["eval", "{bad}/vocab", "--text", "{calib}", "--samples", "16",
                                                     "--seq-len", "32"], "tokenizer"),
    # ---------------------------------------------------------------- analyze
    ("analyze-keep-2", ["analyze", "{llama}", "--out", "{out}", "--keep", "2", *SMALL], "keep"),
    ("analyze-model-does-not-exist", ["analyze", "{bad}/nope", "--out", "{out}"], "does not exist"),
    ("analyze-missing-out-option", ["analyze", "{llama}"], "--out"),
    ("analyze-out-is-a-file", ["analyze", "{llama}", "--out", "{afile}", *SMALL], "is a file"),
    ("analyze-out-nonempty-no-force", ["analyze", "{llama}", "--out", "{full}", *SMALL], "--force"),
    ("analyze-calib-samples-0", ["analyze", "{llama}", "--out", "{out}", "--calib-samples", "0"],
     "calib-samples"),
    ("analyze-calib-empty", ["analyze", "{llama}", "--out", "{out}", "--calib", "{bad}/empty.txt", *SMALL],
     "no text"),
    ("analyze-include-bad-regex", ["analyze", "{llama}", "--out", "{out}", "--include", "(", *SMALL],
     "regular expression"),
    # ---------------------------------------------------------------- heal
    ("heal-missing-teacher-option", ["heal", "{lz}", "--text", "{calib}", "--out", "{out}"], "--teacher"),
    ("heal-steps-0", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{out}",
                      *HEAL, "--steps", "0"], "steps"),
    ("heal-lr-0", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{out}", *HEAL,
                   "--lr", "0"], "lr"),
    ("heal-lr-neg", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{out}", *HEAL,
                     "--lr", "-1"], "lr"),
    ("heal-hints-neg", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{out}", *HEAL,
                        "--hints", "-1"], "hints"),
    ("heal-batch-size-0", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{out}", *HEAL,
                           "--batch-size", "0"], "batch-size"),
    ("heal-teacher-does-not-exist", ["heal", "{lz}", "--teacher", "{bad}/nope", "--text", "{calib}",
                                     "--out", "{out}", *HEAL], "does not exist"),
    ("heal-teacher-other-kind", ["heal", "{llama}", "--teacher", "{bert}", "--text", "{calib}", "--out", "{out}",
                                 *HEAL], "same kind"),
    ("heal-text-missing", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{bad}/nope.txt", "--out", "{out}",
                           *HEAL], "not found"),
    ("heal-out-is-model", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{lz}", "--force",
                           *HEAL], "is the input"),
    ("heal-out-nonempty-no-force", ["heal", "{lz}", "--teacher", "{llama}", "--text", "{calib}", "--out", "{full}",
                                    *HEAL], "--force"),
    ("heal-lz-module-named-config.vocab_size", ["heal", "{bad}/lz-mod-config", "--teacher", "{llama}", "--text",
                                                "{calib}", "--out", "{out}", *HEAL], "module"),
]


# --------------------------------------------------------------------------------------------------- helpers
def snapshot(path: Path) -> dict:
    """{relative path: sha256 | "<dir>"} of a file or of everything under a directory."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(path.rglob("*"))}


# warnings Python shows by default on a real command line (the others are ignored by the default filters)
_SILENT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run(capfd, argv):
    """(exit code, stdout, stderr) of `layerzip argv` in-process. An exception escaping main() is reported as
    code "exception" with its traceback in stderr; a shown warning adds its line to stderr, as on a terminal."""
    code = 0
    tb = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code or 0
        except BaseException:   # noqa: BLE001 - a traceback is exactly what this table looks for
            code = "exception"
            tb = traceback.format_exc()
    cap = capfd.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, _SILENT)]
    return code, cap.out, cap.err + tb + "".join(s + "\n" for s in shown)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_dirs, calib_file):
    """A folder of broken inputs (copies of the tiny models, edited)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "notmodel").mkdir()
    (root / "notmodel" / "readme.txt").write_text("not a model")
    (root / "empty.txt").write_text("\n  \n")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e, na\xefve fa\xe7ade.\n".encode("latin-1") * 200)
    (root / "notext.jsonl").write_text('{"txt": "no text field"}\n{"txt": "still none"}\n')
    (root / "short.txt").write_text("Just a few words.\n")
    (root / "pairs1.jsonl").write_text(json.dumps({"query": "what is a list", "doc": "a list is a sequence"}) + "\n")
    (root / "pairsbad.jsonl").write_text(json.dumps({"query": "q1", "doc": "d1"}) + "\n"
                                         + json.dumps({"question": "q2", "answer": "d2"}) + "\n"
                                         + json.dumps({"query": "q3", "doc": "d3"}) + "\n")

    # a valid layerzip directory, and broken copies of it
    lz = root / "lz"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with pytest.raises(SystemExit) as e:
            main(["compress", str(tiny_dirs["llama"]), "--out", str(lz), "--method", "svd", "--keep", "0.5",
                  "--json"])
            raise SystemExit(0)
    assert (e.value.code or 0) == 0 and (lz / "layerzip.json").is_file()
    meta = json.loads((lz / "layerzip.json").read_text())
    assert meta["modules"]

    def lz_copy(name, edit):
        d = root / name
        shutil.copytree(lz, d)
        m = json.loads((d / "layerzip.json").read_text())
        text = edit(m)
        (d / "layerzip.json").write_text(text if isinstance(text, str) else json.dumps(m, indent=1))

    lz_copy("lz-notjson", lambda m: '{"format_version": 1, "modules": {')
    lz_copy("lz-v99", lambda m: m.update(format_version=99))
    spec = next(iter(meta["modules"].values()))
    for name, module in (("dotdot", "../x"), ("class", "__class__"), ("config", "config.vocab_size")):
        lz_copy(f"lz-mod-{name}", lambda m, module=module: m["modules"].update({module: spec}))
    shutil.copytree(lz, root / "lz-trunc")
    data = (root / "lz-trunc" / "model.safetensors").read_bytes()
    (root / "lz-trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])

    # broken Hugging Face directories
    shutil.copytree(tiny_dirs["opt"], root / "opt-trunc")
    data = (root / "opt-trunc" / "model.safetensors").read_bytes()
    (root / "opt-trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])

    shutil.copytree(tiny_dirs["bert"], root / "binonly")
    (root / "binonly" / "model.safetensors").rename(root / "binonly" / "pytorch_model.bin")

    auto = root / "automap"
    shutil.copytree(tiny_dirs["llama"], auto)
    cfg = json.loads((auto / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (auto / "config.json").write_text(json.dumps(cfg, indent=1))
    marker = root / "EVIL_CODE_RAN"
    (auto / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('custom code was executed')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")

    # a Qwen2 whose embedding has 30522 rows, with the MiniLM tokenizer plus one added token (id 30522)
    from layerzip.io import builtin_path
    vocab = root / "vocab"
    config = transformers.Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                      vocab_size=30522)
    transformers.Qwen2ForCausalLM(config).eval().save_pretrained(vocab)
    tok = transformers.AutoTokenizer.from_pretrained(builtin_path("minilm"))
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert tok.convert_tokens_to_ids("<|endoftext|>") >= 30522
    tok.save_pretrained(vocab)
    lines = calib_file.read_text().splitlines()
    (root / "vocab_calib.txt").write_text("\n".join(f"<|endoftext|> {l}" for l in lines if l.strip()))
    yield root
    assert not marker.exists(), "the custom code of an auto_map model directory was executed"


@pytest.fixture(scope="module")
def env(bad, tiny_dirs, calib_file):
    return {**{arch: str(p) for arch, p in tiny_dirs.items()}, "calib": str(calib_file), "bad": str(bad),
            "lz": str(bad / "lz")}


# --------------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("argv, match", [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_bad_input(argv, match, env, bad, tmp_path, capfd):
    work = tmp_path / "work"
    (work / "full").mkdir(parents=True)
    (work / "full" / "keep.txt").write_text("precious")
    (work / "afile").write_text("a plain file")
    paths = {**env, "out": str(work / "o"), "full": str(work / "full"), "afile": str(work / "afile")}
    args = [a.format(**paths) for a in argv]
    inputs = sorted({a for a in args if Path(a).exists() and not Path(a).is_relative_to(work)})
    before = {a: snapshot(Path(a)) for a in inputs}
    work_before = snapshot(work)

    code, out, err = run(capfd, args)

    lines = [l for l in err.splitlines() if l.strip()]
    cmd = "layerzip " + " ".join(args)
    assert code == 2, f"{cmd}\nexit code {code}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{cmd}\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("layerzip: error:"), f"{cmd}\n{err[-3000:]}"
    assert match in lines[0], f"{match!r} not in: {lines[0]}"
    assert out == "", f"{cmd}\nstdout: {out[-2000:]}"
    assert snapshot(work) == work_before, f"{cmd} wrote or changed files under the output location"
    assert not (work / "o").exists()
    assert (work / "full" / "keep.txt").read_text() == "precious"
    for a in inputs:
        assert snapshot(Path(a)) == before[a], f"{cmd} changed its input {a}"
    assert not (bad / "EVIL_CODE_RAN").exists(), "custom code of an auto_map directory was executed"
