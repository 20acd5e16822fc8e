"""`compress --method btt|monarch|...`: structured projections under the budget, saved and reloaded exactly."""
import pytest
import torch

import layerzip as lz
from layerzip.nn import STRUCTURES


@pytest.mark.parametrize("name", [s for s in STRUCTURES if s != "lowrank"])
def test_structured_method_roundtrip(name, tiny_dirs, tmp_path):
    loaded = lz.load_model(tiny_dirs["llama"])
    rep = lz.compress_(loaded.model, lz.config_from_dict({"method": name, "keep": 0.5}), progress=False)
    assert rep["factorized"] == rep["targets"] and rep["keep_achieved"] <= 0.5 + 0.01
    ids = torch.randint(0, 1000, (2, 10))
    out = loaded.model(input_ids=ids).logits
    lz.save(loaded.model, tmp_path / "o", tokenizer=loaded.tokenizer)
    assert (lz.load(tmp_path / "o")(input_ids=ids).logits - out).abs().max().item() <= 1e-5


def test_structured_rejects_global_alloc():
    with pytest.raises(lz.LayerzipError, match="uniform"):
        lz.config_from_dict({"method": "btt", "keep": 0.5, "alloc": "global"})
