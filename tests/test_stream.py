"""Streaming: a model read block by block from sharded safetensors gives the same ranks and factors as the same
model in memory; block-wise gradients equal the whole-model backward; shards round-trip; killed runs resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import layerzip as lz
from layerzip.compress import gradients
from layerzip.driver import BlockDriver
from layerzip.io import load_model
from layerzip.lazy import is_meta, source_of
from layerzip.models import find_blocks, select_targets

from conftest import ARCHS, TINY, tiny_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    """{arch: dir} of tiny models saved in several shards (so lazy reads cross files)."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for arch in ARCHS:
        tiny_model(arch).save_pretrained(root / arch, max_shard_size="200KB")
        tokenizer.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _batches(causal: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(5, 1000, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        if not causal:
            mask[1, 20:] = 0                              # padding, as encoders' batches have
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _output(model, batch, causal):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if causal else out.last_hidden_state


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_streamed_model_is_lazy(sharded):
    loaded = load_model(sharded["llama"], stream=True)
    m = loaded.model
    blocks = find_blocks(m)[1]
    assert source_of(m) is not None and all(is_meta(b) for b in blocks)
    emb, head = m.get_input_embeddings(), m.lm_head
    assert is_meta(emb) and is_meta(head)              # the rest too: read only while it runs
    src = source_of(m)
    with src.hold(blocks[1]):
        assert not is_meta(blocks[1]) and is_meta(blocks[0])
    assert is_meta(blocks[1])
    with src.hold_rest():
        with src.hold_rest():                          # reentrant
            assert not is_meta(emb) and not is_meta(head) and is_meta(blocks[0])
        assert not is_meta(emb)
    assert is_meta(emb) and is_meta(head) and is_meta(m.model.norm)
    ref = load_model(sharded["llama"]).model
    batch = _batches(True)[0]
    driver = BlockDriver(m, [batch], progress=False)
    logits = driver.head(batch, driver.final_states([batch])[0]).logits
    assert _rel(logits, _output(ref, batch, True)) < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["output", "output_cov", "weight"])
def test_blockwise_gradients_equal_whole_model(sharded, arch, kind):
    """The driver's block-by-block backward gives the whole-model Fisher (every target, 1e-6 relative)."""
    model = load_model(sharded[arch]).model
    causal = lz.models.is_causal(model)
    batches = _batches(causal)
    targets = select_targets(model)
    ref = gradients(model, targets, kind, batches, progress=False)
    got = BlockDriver(model, batches, progress=False).gradients(targets, kind)
    streamed = load_model(sharded[arch], stream=True).model
    got_streamed = gradients(streamed, select_targets(streamed), kind, batches, progress=False)
    for n in targets:
        assert _rel(got[n], ref[n]) < 1e-6, n
        assert _rel(got_streamed[n], ref[n]) < 1e-6, n


@pytest.mark.parametrize("arch", [a for a in ARCHS if not lz.models.is_causal(tiny_model(a))])
def test_blockwise_contrastive_gradients_equal_whole_model(sharded, arch):
    """An encoder's contrastive Fisher (two views per document, the dense model's views as negatives) block by
    block and streamed equals the whole-model one."""
    model = load_model(sharded[arch]).model
    batches = _batches(False)
    targets = select_targets(model)
    ref = gradients(model, targets, "output", batches, progress=False, encoder_loss="contrastive")
    got = BlockDriver(model, batches, progress=False).gradients(targets, "output", encoder_loss="contrastive")
    streamed = load_model(sharded[arch], stream=True).model
    got_streamed = gradients(streamed, select_targets(streamed), "output", batches, progress=False,
                             encoder_loss="contrastive")
    emb = gradients(model, targets, "output", batches, progress=False)
    for n in targets:
        assert _rel(got[n], ref[n]) < 1e-6 and _rel(got_streamed[n], ref[n]) < 1e-6, n
    assert max(_rel(emb[n], ref[n]) for n in targets) > 1e-2        # not the embedding's Fisher


CONFIGS = {
    "svd-llm global+fisher": lambda: lz.SVDLLM(keep=0.6, alloc="global", fisher=True),
    "svd-llm uniform": lambda: lz.SVDLLM(keep=0.5, alloc="uniform", fisher=False),
    "svd-llm sequential": lambda: lz.SVDLLM(keep=0.5, alloc="uniform", fisher=False, sequential=True),
    "asvd": lambda: lz.ASVD(keep=0.5),
    "svd": lambda: lz.SVD(keep=0.5),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_compression_equals_in_memory(sharded, arch, name, tmp_path):
    """Same ranks, same factors (1e-6 relative), and the saved shards load back to the same outputs."""
    if name != "svd-llm global+fisher" and arch not in ("llama", "bert"):
        pytest.skip("the default is checked on every architecture, the other methods on two")
    mem = load_model(sharded[arch]).model
    causal = lz.models.is_causal(mem)
    batches = _batches(causal)
    r_mem = lz.compress_(mem, CONFIGS[name](), calib=batches, progress=False)
    lazy = load_model(sharded[arch], stream=True).model
    r_lazy = lz.compress_(lazy, CONFIGS[name](), calib=batches, progress=False)
    assert r_lazy["ranks"] == r_mem["ranks"] and r_lazy["modules"] == r_mem["modules"]
    assert r_lazy["keep_achieved"] == pytest.approx(r_mem["keep_achieved"])
    lz.save(lazy, tmp_path / "o")
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    n = len(find_blocks(mem)[1]) + 1
    assert f"model-00001-of-{n:05d}.safetensors" in files and "model.safetensors.index.json" in files
    back = lz.load(tmp_path / "o")
    sd_mem, sd_back = mem.state_dict(), back.state_dict()
    assert set(sd_mem) == set(sd_back)
    for k, v in sd_mem.items():
        assert _rel(sd_back[k], v) < 1e-6 or (v.abs().max() == 0 and sd_back[k].abs().max() == 0), k
    batch = batches[0]
    assert _rel(_output(back, batch, causal), _output(mem, batch, causal)) < 1e-6


def _count_block_runs(monkeypatch):
    import layerzip.driver as driver_mod
    runs = [0]
    real = driver_mod.run_block

    def counting(*a, **k):
        runs[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(driver_mod, "run_block", counting)
    return runs


@pytest.mark.parametrize("on_disk", [True, False])
def test_global_allocation_reads_its_statistics_from_disk(sharded, monkeypatch, on_disk):
    """Streamed global allocation keeps each block's statistics from its first walk on disk, so the second walk
    runs no block (one walk in all, as uniform ranks need); with no room on disk it walks twice. Same result."""
    from layerzip.compress import _Progress
    monkeypatch.setattr(_Progress, "STATS_DISK_SHARE", 0.5 if on_disk else 0.0)
    batches = _batches(True)
    runs = _count_block_runs(monkeypatch)
    r_uni = lz.compress_(load_model(sharded["llama"], stream=True).model,
                         lz.SVDLLM(keep=0.5, alloc="uniform", fisher=False, refine_steps=0), calib=batches,
                         progress=False)
    one_walk, runs[0] = runs[0], 0
    lazy = load_model(sharded["llama"], stream=True).model
    r_lazy = lz.compress_(lazy, lz.SVDLLM(keep=0.6, alloc="global", fisher=False, refine_steps=0), calib=batches,
                          progress=False)
    assert one_walk == len(find_blocks(lazy)[1]) * len(batches) and r_uni["ranks"]
    assert runs[0] == one_walk * (1 if on_disk else 2)
    mem = load_model(sharded["llama"]).model
    r_mem = lz.compress_(mem, lz.SVDLLM(keep=0.6, alloc="global", fisher=False, refine_steps=0), calib=batches,
                         progress=False)
    assert r_lazy["ranks"] == r_mem["ranks"] and r_lazy["calibration"] == r_mem["calibration"]
    assert not list(source_of(lazy).workdir.glob("stats-*")), "the statistics are removed as blocks are done"


def test_interrupted_spectra_walk_resumes_at_its_block(sharded, tmp_path):
    """A run stopped inside global allocation's first walk (after block 0) continues that walk at block 1 and
    ends with the ranks and factors of an uninterrupted run."""
    batches = _batches(False)
    whole = load_model(sharded["bert"], stream=True).model
    r_whole = lz.compress_(whole, CONFIGS["svd-llm global+fisher"](), calib=batches, progress=False)

    class Stop(Exception):
        pass

    def stop_at_block_1(ev):
        if ev.kind == "block_started" and ev.block == 1:
            raise Stop
    lazy = load_model(sharded["bert"], stream=True).model
    with pytest.raises(Stop):
        lz.compress_(lazy, CONFIGS["svd-llm global+fisher"](), calib=batches, progress=False,
                     listeners=[stop_at_block_1])
    work = source_of(lazy).workdir
    assert json.loads((work / "progress.json").read_text())["spectra_blocks"] == 1
    again = load_model(sharded["bert"], stream=True).model
    source_of(again).workdir = work
    started = []
    r = lz.compress_(again, CONFIGS["svd-llm global+fisher"](), calib=batches, progress=False,
                     listeners=[lambda ev: started.append(ev.block) if ev.kind == "block_started" else None])
    assert started[0] == 1
    assert r["ranks"] == r_whole["ranks"] and r["modules"] == r_whole["modules"]
    lz.save(again, tmp_path / "again")
    lz.save(whole, tmp_path / "whole")
    sd, sd_whole = lz.load(tmp_path / "again").state_dict(), lz.load(tmp_path / "whole").state_dict()
    for k, v in sd_whole.items():
        assert _rel(sd[k], v) < 1e-6 or v.abs().max() == 0, k


def test_half_precision_source_computes_in_float32_and_is_written_back_in_its_dtype(tmp_path, tokenizer):
    """A bf16 checkpoint streamed on the CPU: weights held in float32 (the in-memory model loaded in float32 gives
    the same ranks and factors), the output shards in bf16 and equal to the in-memory factors cast to bf16."""
    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="200KB")
    tokenizer.save_pretrained(src)
    batches = _batches(True)
    lazy = load_model(src, stream=True).model
    assert source_of(lazy).storage_dtype == torch.bfloat16 and next(lazy.parameters()).dtype == torch.float32
    mem = load_model(src, dtype=torch.float32).model
    r_mem = lz.compress_(mem, CONFIGS["svd-llm global+fisher"](), calib=batches, progress=False)
    r_lazy = lz.compress_(lazy, CONFIGS["svd-llm global+fisher"](), calib=batches, progress=False)
    assert r_lazy["ranks"] == r_mem["ranks"]
    lz.save(lazy, tmp_path / "o")
    back = lz.load(tmp_path / "o")
    for k, v in mem.state_dict().items():
        got = back.state_dict()[k]
        assert got.dtype == torch.bfloat16, k
        assert _rel(got, v.to(torch.bfloat16)) < 1e-3, k


def test_streamed_refusals(sharded):
    lazy = load_model(sharded["llama"], stream=True).model
    with pytest.raises(lz.LayerzipError, match="--no-stream"):
        lz.compress_(lazy, lz.DropBlocks(keep=0.5), calib=_batches(True), progress=False)
    with pytest.raises(lz.LayerzipError, match="--no-stream"):
        lz.compress_(lazy, lz.SVDLLM(keep=0.5, kfac=True), calib=_batches(True), progress=False)
    with pytest.raises(lz.LayerzipError, match="outside the repeated blocks"):
        lz.compress_(lazy, lz.SVDLLM(keep=0.5, include="lm_head"), calib=_batches(True), progress=False)


# --------------------------------------------------------------------------------------------------- resume
def _cmd(src, out):
    return [sys.executable, "-m", "layerzip.cli", "compress", str(src), "--out", str(out), "--stream",
            "--alloc", "global", "--fisher", "--refine-steps", "8", "--calib-samples", "48", "--seq-len", "128",
            "--json"]


@pytest.mark.slow
def test_killed_streamed_run_resumes_byte_identical(tmp_path):
    """SIGKILL after block 2 of MiniLM; the same command continues from block 2 (its progress says so) and writes
    the same shards, byte for byte, as an uninterrupted run (block refinement on: the compressed stream resumes
    too)."""
    src = tmp_path / "minilm"
    loaded = load_model("minilm")
    loaded.model.save_pretrained(src)
    loaded.tokenizer.save_pretrained(src)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    whole = subprocess.run(_cmd(src, tmp_path / "whole"), capture_output=True, text=True, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-800:]

    out = tmp_path / "o"
    progress = tmp_path / ".o.partial" / "progress.json"
    p = subprocess.Popen(_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while time.time() - t0 < 900 and p.poll() is None:
        try:
            if json.loads(progress.read_text()).get("blocks_done", 0) >= 2:
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "layerzip.json").exists()
    done_before = json.loads(progress.read_text())["blocks_done"]
    assert 2 <= done_before < 6

    again = subprocess.run(_cmd(src, out), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-800:]
    report = json.loads(again.stdout.strip().splitlines()[-1])
    assert report["resumed_from_block"] == done_before
    assert not progress.parent.exists()
    shards = sorted(f.name for f in (tmp_path / "whole").iterdir() if f.suffix == ".safetensors")
    assert len(shards) == 7
    for f in shards:
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


def test_ray_executor_gives_the_local_result(sharded):
    """Each block's decompositions as Ray tasks on a local 2-CPU cluster: the same ranks and factors."""
    pytest.importorskip("ray")
    from layerzip.executors import make_executor
    batches = _batches(True)
    local = load_model(sharded["llama"], stream=True).model
    r_local = lz.compress_(local, lz.SVDLLM(keep=0.6), calib=batches, progress=False)
    pool = make_executor("ray", workers=2)
    try:
        remote = load_model(sharded["llama"], stream=True).model
        r_remote = lz.compress_(remote, lz.SVDLLM(keep=0.6), calib=batches, progress=False, executor=pool)
    finally:
        pool.close()
    assert r_remote["ranks"] == r_local["ranks"]
    batch = batches[0]
    driver = BlockDriver(local, [batch], progress=False)
    a = driver.head(batch, driver.final_states([batch])[0]).logits
    driver = BlockDriver(remote, [batch], progress=False)
    b = driver.head(batch, driver.final_states([batch])[0]).logits
    assert _rel(b, a) < 1e-6


def test_streamed_memory_does_not_grow_with_depth(tmp_path, monkeypatch):
    """What is alive after each block is decomposed and written stays flat along the walk: the replaced layers'
    weights are not kept (they were, ~one dense block per block, so peak memory grew with depth)."""
    import gc
    import warnings
    from layerzip.lazy import LazyWeights
    config, cls = TINY["llama"]()
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "m", max_shard_size="200KB")
    streamed = load_model(tmp_path / "m", stream=True).model

    def alive() -> int:
        seen = {}
        with warnings.catch_warnings():         # isinstance on some objects touches deprecated torch attributes
            warnings.simplefilter("ignore")
            for o in gc.get_objects():
                if isinstance(o, torch.Tensor) and not o.is_meta:
                    seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        return sum(seen.values())
    after = []
    offload = LazyWeights.offload

    def counting(self, module, path):
        offload(self, module, path)
        gc.collect()
        after.append(alive())
    monkeypatch.setattr(LazyWeights, "offload", counting)
    block = sum(p.numel() * p.element_size() for p in cls(config).model.layers[0].parameters())
    lz.compress_(streamed, lz.SVDLLM(keep=0.6), calib=_batches(True), progress=False)
    assert len(after) == 6
    assert after[-1] - after[2] < 0.5 * block, (after, block)     # it grew by ~0.9 block per block
