"""Shared pieces of the benchmark harness: the two benchmark models, their data, their quality metric, JSON out.

A `Bench` says how one model is loaded, calibrated and scored:
  - MiniLM (encoder): retrieval over held-out python-docs {query, doc} pairs (Recall@1, MRR) and the mean cosine of
    held-out paragraph embeddings to the dense model's;
  - Gemma-3-270M (causal LM): perplexity on held-out python-docs windows, each starting with BOS.
`--quick` swaps both for tiny random-weight models built from transformers configs (the smoke run / CI test).

`GEMMA_METHOD_KEEPS` is the plan for the methods whose full Gemma curve does not fit the time of one run on the
2-core benchmark machine (see bench/README.md); every other method runs at every keep of `KEEPS`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerzip as lz  # noqa: E402
from layerzip.data import load_documents, token_batches  # noqa: E402
from layerzip.evaluate import embed, mean_cosine, perplexity  # noqa: E402
from layerzip.jobs import retrieval_eval  # noqa: E402

RESULTS = Path(os.environ.get("LAYERZIP_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
DEFAULT_THREADS = 2
# Gemma: the structures use no calibration and collapse as plain `svd` does (perplexity 10⁶–10¹² at keep 0.8 and
# 0.5), so two keeps show where they stand (BLAST at 0.8 alone takes 5 min: more layers get 2 blocks and 100 ALS
# rounds). Hadamard's rank is capped at R² ≤ min(in, out), so every keep ≥ 0.15 is the same model (0.10 of the
# weights) and its ALS projection takes ≈ 7 min of one core: one keep.
GEMMA_METHOD_KEEPS = {**{s: (0.8, 0.5) for s in ("btt", "monarch", "kronecker", "tt", "blast")}, "hadamard": (0.5,)}
DOC_CHARS = 600          # retrieval documents are cut to their first 600 characters (~150 tokens)


@dataclass
class Bench:
    name: str                  # short id used in file names
    title: str
    source: str                # what lz.load_model understands
    causal: bool
    calib_samples: int         # documents (encoder) or windows (causal)
    calib_seq_len: int
    eval_windows: int = 8      # causal: perplexity windows
    eval_seq_len: int = 512
    retrieval_pairs: int = 100  # encoder
    cosine_texts: int = 32      # encoder
    latency_seq_len: int = 128
    quick: bool = False
    keeps: tuple = KEEPS
    method_keeps: dict = field(default_factory=dict)   # fewer keeps for methods too slow for the full curve
    texts: dict = field(default_factory=dict, repr=False)

    def keeps_for(self, method: str) -> tuple:
        return tuple(self.method_keeps.get(method, self.keeps))

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "recall_at_1"

    def load(self) -> lz.models.Loaded:
        return lz.load_model(self.source)

    # ---- data: bench/cache (real, held out) or, for --quick, the built-in docstrings
    def _data(self):
        if not self.texts:
            if self.quick:
                docs = load_documents("builtin", limit=400)
                held = load_documents("builtin-heldout", limit=120)
                pairs = [{"query": " ".join(d.split()[:6]), "doc": " ".join(d.split()[6:40])}
                         for d in held[:self.retrieval_pairs]]
                self.texts = {"calib": docs, "eval": held, "pairs": pairs}
            else:
                import data
                pairs = [{"query": r["query"], "doc": r["doc"][:DOC_CHARS]}
                         for r in data.retrieval_pairs(self.retrieval_pairs)]
                self.texts = {"calib": data.calib_texts(), "eval": data.eval_texts(), "pairs": pairs}
        return self.texts

    def calib(self, loaded) -> list[dict]:
        docs = self._data()["calib"]
        return token_batches(loaded.tokenizer, docs, self.causal, self.calib_samples, self.calib_seq_len, batch_size=8)

    def reference(self, loaded) -> dict:
        """What the compressed models are compared with: the dense model's eval embeddings (encoders)."""
        if self.causal:
            return {}
        return {"emb": embed(loaded.model, loaded.tokenizer, self._data()["eval"][:self.cosine_texts], progress=False)}

    def dense_baseline(self):
        """(loaded dense model, its reference, its evaluation with "seconds_eval", calibration batches): what every
        comparison with the dense model starts from."""
        loaded = self.load()
        ref = self.reference(loaded)
        with Timer() as t:
            dense = self.evaluate(loaded, ref)
        dense["seconds_eval"] = t.s
        return loaded, ref, dense, self.calib(loaded)

    def evaluate(self, loaded, ref: dict) -> dict:
        d = self._data()
        if self.causal:
            return {"perplexity": perplexity(loaded.model, loaded.tokenizer, d["eval"], self.eval_seq_len,
                                             self.eval_windows, progress=False)}
        out = retrieval_eval(loaded, d["pairs"], progress=False)
        emb = embed(loaded.model, loaded.tokenizer, d["eval"][:self.cosine_texts], progress=False)
        out["cosine_to_dense"] = mean_cosine(emb, ref["emb"])
        return out


def benches(quick: bool = False, only: list[str] | None = None) -> list[Bench]:
    if quick:
        out = [Bench("tiny-bert", "tiny BERT (random weights)", tiny_model("bert"), False, 16, 64,
                     retrieval_pairs=16, cosine_texts=16, latency_seq_len=32, quick=True, keeps=(0.8, 0.5)),
               Bench("tiny-gemma", "tiny Gemma-3 (random weights)", tiny_model("gemma"), True, 4, 64,
                     eval_windows=2, eval_seq_len=64, latency_seq_len=32, quick=True, keeps=(0.8, 0.5))]
    else:
        import data
        out = [Bench("minilm", "all-MiniLM-L6-v2", "minilm", False, calib_samples=64, calib_seq_len=256,
                     latency_seq_len=128),
               Bench("gemma", "Gemma-3-270M", str(data.gemma_dir()), True, calib_samples=16, calib_seq_len=256,
                     eval_windows=int(os.environ.get("BENCH_GEMMA_WINDOWS", 2)), eval_seq_len=512,
                     latency_seq_len=32, method_keeps=dict(GEMMA_METHOD_KEEPS))]
    return [b for b in out if not only or b.name in only]


def tiny_model(kind: str) -> str:
    """A tiny random-weight model saved as a HF directory (MiniLM's tokenizer, so nothing is downloaded). Four blocks,
    so that drop-blocks at keep 0.5 leaves repeated blocks."""
    import transformers
    path = Path(tempfile.gettempdir()) / f"layerzip-bench-tiny-{kind}-l4"
    if (path / "config.json").is_file():
        return str(path)
    tok = transformers.AutoTokenizer.from_pretrained(lz.io.builtin_path("minilm"))
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.Gemma3TextConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                            intermediate_size=128, max_position_embeddings=256,
                                            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                            pad_token_id=tok.pad_token_id)
        cfg.architectures = ["Gemma3ForCausalLM"]
        model = transformers.Gemma3ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def methods() -> list[str]:
    """Every registered method, whatever is registered when the benchmark runs (later methods appear here)."""
    return list(lz.METHODS)


def config(method: str, keep: float):
    return lz.config_from_dict({"method": method, "keep": keep})


def stats_key(cfg, calib, model) -> tuple:
    """Statistics depend on the model, the calibration batches and the method's gradient statistics, not on `keep`:
    one key per method family, so the quality curves collect them once and reuse them across keeps."""
    targets = tuple(lz.models.select_targets(model, cfg.include, cfg.exclude))
    return cfg.resolve(model, calib).gradients, id(calib), targets


def cached_stats(cfg, calib, model, cache: dict) -> dict | None:
    """`lz.calibrate`'s statistics for cfg, collected once per `stats_key` (None for methods without statistics)."""
    if not cfg.needs_stats or cfg.sequential:
        return None
    key = stats_key(cfg, calib, model)
    if key not in cache:
        cache[key] = lz.calibrate(model, cfg, calib, progress=False)
    return cache[key]


def env() -> dict:
    import transformers
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "layerzip": lz.__version__,
            "torch_threads": torch.get_num_threads()}


def code_version() -> str:
    """The commit the measured code is at (+ "dirty" with uncommitted changes under src/)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "../src"], capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a matplotlib figure (the bench plots share one style)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(name: str, obj, results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(obj, indent=1, default=str))
    return path


def read_json(name: str, results: Path = RESULTS):
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t


def asdict_bench(b: Bench) -> dict:
    return {k: v for k, v in asdict(b).items() if k != "texts"}
