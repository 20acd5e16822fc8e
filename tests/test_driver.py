"""The block driver: block-by-block statistics equal one whole-model pass, events in order, decomposing during the
walk equals decomposing from precollected statistics, and models whose blocks do not chain are refused."""
import pytest
import torch
from torch import nn

import layerzip as lz
from layerzip.driver import BlockDriver
from layerzip.models import find_blocks, select_targets
from layerzip.nn import FactorizedLayer
from layerzip.stats import collect_stats

from conftest import ARCHS, tiny_model


def batches():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(100, 1000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0                       # padding is left out of every statistic
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_statistics_equal_one_forward(arch):
    model = tiny_model(arch)
    targets = select_targets(model)
    events = []
    walked = BlockDriver(model, batches(), progress=False, listeners=[events.append]).collect(targets)
    whole = collect_stats(model, targets, batches(), progress=False)
    assert walked.keys() == whole.keys()
    for n in targets:
        assert walked[n].tokens == whole[n].tokens
        torch.testing.assert_close(walked[n].gram, whole[n].gram, rtol=1e-6, atol=1e-6 * whole[n].gram.abs().max())
    assert len({id(s) for s in walked.values()}) == len({id(s) for s in whole.values()})   # q/k/v share one
    kinds = [(e.kind, e.block) for e in events]
    L = len(find_blocks(model)[1])
    assert kinds == [(k, l) for l in range(L) for k in ("block_started", "stats_ready", "block_done")]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_decomposing_during_the_walk_equals_precollected(arch):
    """Uniform ranks decompose each block right after its statistics; the same from `lz.calibrate`'s statistics."""
    cfg = lz.SVDLLM(keep=0.4, alloc="uniform", fisher=False)
    a, b = tiny_model(arch), tiny_model(arch)
    lz.compress_(a, cfg, calib=batches(), progress=False)
    lz.compress_(b, cfg, calib=batches(), progress=False, stats=lz.calibrate(b, cfg, batches(), progress=False))
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        ya, yb = (m(input_ids=ids)[0] for m in (a, b))     # logits / last hidden state
    assert torch.equal(ya, yb)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h):
        return h + torch.relu(self.fc(h))


class Toy(nn.Module):
    """Any nn.Module with repeated blocks works; `shift` changes the stream between blocks (which the walk refuses)."""

    def __init__(self, shift=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.layers, self.shift = nn.Embedding(50, 8), nn.ModuleList([Block(), Block(), Block()]), shift

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for block in self.layers:
            h = block(h) + self.shift
        return h


def toy_batches():
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids}]


def test_plain_module_and_merge():
    model = Toy()
    ids = toy_batches()[0]["input_ids"]
    dense = model(ids)
    rep = lz.compress_(model, lz.SVDLLM(keep=1.0, alloc="uniform", fisher=False), calib=toy_batches(),
                       progress=False)
    assert rep["factorized"] == 0                      # keep 1: nothing to save anywhere
    for name in select_targets(model):                 # full rank: exact, then merged back
        lz.models.set_module(model, name, lz.LowRankLinear.from_linear(model.get_submodule(name)))
    torch.testing.assert_close(model(ids), dense, rtol=1e-5, atol=1e-5)
    lz.merge_(model)
    assert not any(isinstance(m, FactorizedLayer) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in select_targets(model))
    torch.testing.assert_close(model(ids), dense, rtol=1e-5, atol=1e-5)


def test_blocks_that_do_not_chain_are_refused():
    model = Toy(shift=1.0)
    with pytest.raises(lz.LayerzipError, match="between its blocks"):
        lz.compress_(model, lz.SVDLLM(keep=0.5, alloc="uniform", fisher=False), calib=toy_batches(), progress=False)
