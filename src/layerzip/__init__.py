"""layerzip: decompose the layers of trained neural networks.

>>> import layerzip as lz
>>> loaded = lz.load_model("minilm")                                   # doctest: +SKIP
>>> batches = lz.calibration_batches(loaded, "builtin", n_samples=64)  # doctest: +SKIP
>>> report = lz.compress_(loaded.model, lz.SVDLLM(keep=0.5), calib=batches)   # doctest: +SKIP
>>> lz.save(loaded.model, "minilm-lz", tokenizer=loaded.tokenizer)     # doctest: +SKIP
>>> model = lz.load("minilm-lz")                                       # doctest: +SKIP
>>> lz.merge_(model)                                                   # doctest: +SKIP

Layers, each importing only those before it: nn -> models -> lazy -> data, stats -> allocate -> methods -> elastic ->
executors -> driver -> compress -> heal, evaluate, analyze, report, training -> export -> io -> hf -> jobs -> cli.
Importing layerzip registers the transformers quantization method "layerzip" (hf.py), so
`AutoModel*.from_pretrained(DIR)` loads a directory layerzip wrote.
"""
from ._version import __version__
from .errors import LayerzipError
from .registry import LAYERS, METHODS
from .nn import FactorizedLayer, LowRankLinear
from .methods import CONFIGS, CompressConfig, config_from_dict, register_method
from .data import calibration_batches
from .compress import calibrate, compress_, merge_
from .heal import heal_
from .analyze import analyze
from .training import Cuttlefish, Maestro, structurize
from .export import export_onnx
from .io import load_model, save
from . import hf  # noqa: F401  (registers the "layerzip" quantization method with transformers)
from .jobs import analyze_model, compress_model, evaluate_model, export_model, heal_model

globals().update(CONFIGS)       # lz.SVD, lz.SVDLLM, lz.DropBlocks, ...: every registered method's config


def load(source, stream: bool = False, device: str = "cpu", keep: float | None = None):
    """A transformers model from a layerzip directory, a HF directory, a .gguf file or 'minilm'. `stream=True`:
    its blocks stay on disk and are read one at a time by compress_ and the evaluations (a safetensors
    directory). `keep`: the size built from an elastic directory (`compress --elastic`; None: its default size)
    — a plain compressed model, as a direct compression at that keep gives; refused for any other MODEL."""
    return load_model(source, stream=stream, device=device, keep=keep).model


__all__ = ["CompressConfig", "Cuttlefish", "FactorizedLayer", "LAYERS", "LayerzipError", "LowRankLinear",
           "METHODS", "Maestro", "__version__", "analyze", "analyze_model", "calibrate", "calibration_batches", "compress_",
           "compress_model", "config_from_dict", "evaluate_model", "export_model", "export_onnx", "heal_",
           "heal_model", "load", "load_model", "merge_", "register_method", "save", "structurize", *CONFIGS]
