"""layerzip: decompose the layers of trained neural networks.

>>> import layerzip as lz
>>> loaded = lz.load_model("minilm")                                   # doctest: +SKIP
>>> batches = lz.calibration_batches(loaded, "builtin", n_samples=64)  # doctest: +SKIP
>>> report = lz.compress_(loaded.model, lz.SVDLLM(keep=0.5), calib=batches)   # doctest: +SKIP
>>> lz.save(loaded.model, "minilm-lz", tokenizer=loaded.tokenizer)     # doctest: +SKIP
>>> model = lz.load("minilm-lz")                                       # doctest: +SKIP
"""
__version__ = "0.1.0"

from .compress import (ASVD, CUR, FWSVD, METHODS, SVD, SVDLLM, CompressConfig, compress_, config_from_dict,
                       register_method)
from .errors import LayerzipError
from .io import save
from .nn import FactorizedLayer, LowRankLinear
from .models import load_model
from .pipeline import calibration_batches, compress_model, evaluate_model
from . import structured  # noqa: F401  registers btt, monarch, ... as compress methods
from .analyze import analyze_model
from .depth import DropBlocks
from .heal import heal_, heal_model


def load(source):
    """A transformers model from a layerzip directory, a HF directory, a .gguf file or 'minilm'."""
    return load_model(source).model


__all__ = ["ASVD", "CUR", "FWSVD", "METHODS", "SVD", "SVDLLM", "CompressConfig", "DropBlocks", "FactorizedLayer",
           "LayerzipError", "LowRankLinear", "analyze_model", "calibration_batches", "compress_", "compress_model",
           "config_from_dict", "evaluate_model", "heal_", "heal_model", "load", "load_model", "register_method",
           "save"]
