"""Sequential calibration: every module is decomposed from the statistics of the inputs it has in the final model."""
import pytest
import torch

from layerzip.stats import collect_stats
from layerzip import SVDLLM, compress_
from layerzip.models import select_targets

from conftest import ARCHS, tiny_model


def batches_for(arch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 1000, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    if arch == "bert":            # padding must be left out of the statistics
        mask[0, 18:] = 0
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids.flip(1)[:2], "attention_mask": mask[:2]}]


class Recording(SVDLLM):
    """SVD-LLM that remembers the Gram each module was decomposed from."""
    seen: dict = {}

    @property
    def reads_gram(self):
        return True                     # it reads the Gram itself (plain SVD-LLM frees it once whitened)

    def build_layer(self, W, bias, stats, rank):
        Recording.seen[len(Recording.seen)] = stats.gram.clone()
        return super().build_layer(W, bias, stats, rank)


@pytest.mark.parametrize("arch", ARCHS)
def test_stats_are_those_of_the_final_model(arch):
    """The invariant that defines sequential calibration: the Gram used for module k equals the Gram of k's input
    in the finished compressed model (modules run before k are already compressed, later ones cannot matter)."""
    model = tiny_model(arch)
    batches = batches_for(arch)
    targets = select_targets(model)
    Recording.seen = {}
    cfg = Recording(keep=0.4, alloc="uniform", fisher=False, sequential=True, correct=False)
    rep = compress_(model, cfg, calib=batches, progress=False)
    assert rep["factorized"] == len(targets)
    order = list(rep["modules"])                  # insertion order = decomposition order
    final = collect_stats(model, {n: model.get_submodule(n) for n in order}, batches, progress=False)
    for i, name in enumerate(order):
        g_used, g_final = Recording.seen[i], final[name].gram
        assert torch.allclose(g_used, g_final, rtol=1e-4, atol=1e-4 * g_final.abs().max().item()), name


@pytest.mark.parametrize("arch", ["gemma3", "bert"])
def test_sequential_differs_from_one_shot_after_block_0(arch):
    model_a, model_b = tiny_model(arch), tiny_model(arch)
    batches = batches_for(arch)
    plain = dict(keep=0.4, alloc="uniform", fisher=False, correct=False, refine_steps=0)   # the decompositions alone
    compress_(model_a, SVDLLM(**plain, sequential=False), calib=batches, progress=False)
    compress_(model_b, SVDLLM(**plain, sequential=True), calib=batches, progress=False)
    names = list(select_targets(tiny_model(arch)))
    first, last = names[0], names[-1]
    w = lambda m, n: m.get_submodule(n).dense_weight()
    assert torch.allclose(w(model_a, first), w(model_b, first), atol=1e-5)      # same inputs in block 0's start
    assert not torch.allclose(w(model_a, last), w(model_b, last), atol=1e-5)    # later blocks see compressed inputs


def test_sequential_global_alloc_and_correct_meet_budget():
    model = tiny_model("qwen2")
    rep = compress_(model, SVDLLM(keep=0.5, alloc="global", sequential=True, correct=True), calib=batches_for("qwen2"),
                    progress=False)
    assert 0.49 <= rep["keep_achieved"] <= 0.5 + 1e-9
