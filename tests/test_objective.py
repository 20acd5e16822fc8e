"""`--objective latency`: global allocation keeps a module dense above the rank where it stops being faster
(speed.py measures that per shape, cached per machine; here a fake curve stands in for the timing)."""
import json

import pytest
import torch

import layerzip as lz
from layerzip import allocate, speed

from conftest import tiny_model
from conftest import run_cli
from test_cli import assert_bad
from test_method_matrix import batches


def fake_curve(m, n, threads=1, **kw):
    """Wide layers (in > out) are never faster; the others up to half their weights."""
    if n > m:
        return [(r, 0.9) for r in (1, 2, 3)]
    r_half = m * n // (2 * (m + n))
    return [(1, 5.0), (r_half, 1.5), (r_half + 1, 0.8)]


@pytest.fixture
def fake_timing(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("LAYERZIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "measure_shape", lambda m, n, threads=1: calls.append((m, n)) or fake_curve(m, n))
    return calls


def test_global_ranks_respect_max_ranks():
    g = torch.Generator().manual_seed(0)
    shapes = {f"m{i}": (32 + 16 * (i % 3), 48) for i in range(9)}
    spectra = {k: torch.rand(min(s), generator=g).sort(descending=True).values for k, s in shapes.items()}
    caps = {k: (0 if i % 3 == 0 else 5 + i) for i, k in enumerate(shapes)}
    ranks = allocate.global_ranks(shapes, spectra, 0.6, max_ranks=caps)
    for k, r in ranks.items():
        assert r is None or r <= caps[k], (k, r, caps[k])
        if caps[k] == 0:
            assert r is None
    assert allocate.factorized_params(shapes, ranks) <= 0.6 * sum(m * n for m, n in shapes.values())
    assert ranks != allocate.global_ranks(shapes, spectra, 0.6)


def test_speedups_are_cached_per_machine(fake_timing):
    shapes = {"a": (48, 96), "b": (96, 48), "c": (96, 48)}
    first = speed.max_ranks(shapes)
    assert first["a"] == 0 and first["b"] == first["c"] == 96 * 48 // (2 * 144)
    assert sorted(fake_timing) == [(48, 96), (96, 48)]          # one timing per distinct shape
    assert speed.max_ranks(shapes) == first and len(fake_timing) == 2   # then the cache
    cache = json.loads(speed.cache_file().read_text())
    assert list(cache) == [speed.machine_key(1)] and set(cache[speed.machine_key(1)]) == {"48x96", "96x48"}


def test_measured_curve_shape():
    curve = speed.measure_shape(24, 40, tokens=(8,), fractions=(0.2, 1.0), repeats=1)
    assert [r for r, _ in curve] == [3, 14] and all(s > 0 for _, s in curve)     # ranks of 0.2 and all weights


def test_compress_with_latency_objective(fake_timing):
    model = tiny_model("llama")
    cfg = lz.SVDLLM(keep=0.6, objective="latency")
    rep = lz.compress_(model, cfg, calib=batches(), progress=False)
    assert rep["config"]["objective"] == "latency" and rep["config"]["alloc"] == "global"
    for name, mod in model.named_modules():
        if isinstance(mod, lz.LowRankLinear):
            assert mod.in_features <= mod.out_features, name                # wide ones stay dense
            assert mod.rank <= mod.out_features * mod.in_features // (2 * (mod.out_features + mod.in_features))
    assert rep["keep_achieved"] <= 0.6 + 1e-9 and rep["factorized"] > 0


def test_cli_objective(fake_timing, tiny_dirs, calib_file, tmp_path, capsys):
    out = tmp_path / "lz"
    code, stdout, err = run_cli(capsys, "compress", str(tiny_dirs["gpt2"]), "--out", str(out), "--keep", "0.6",
                            "--objective", "latency", "--calib", str(calib_file), "--calib-samples", "4",
                            "--seq-len", "32", "--json")
    assert code == 0, err
    meta = json.loads((out / "layerzip.json").read_text())
    assert meta["config"]["objective"] == "latency" and meta["requested"]["objective"] == "latency"
    assert_bad(capsys, "compress", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "x"), "--method", "svd",
               "--objective", "latency", match="--alloc global")
    assert_bad(capsys, "compress", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "x"), "--objective", "speed",
               match="--objective")
    assert not (tmp_path / "x").exists()
