"""Native loading: after `import layerzip`, `AutoModel*.from_pretrained(DIR)` (and `transformers.pipeline`) on a
directory written by `lz.save` builds the factorized modules before the weights load.

layerzip registers a transformers quantization method, "layerzip". io.save writes into config.json

    "quantization_config": {"quant_method": "layerzip", "format_version": 2, "modules": {name: spec, ...}}
    "transformers_weights": io.GUARD

transformers builds the architecture on the meta device in the requested dtype, LayerzipQuantizer swaps each named
module for an empty layer of its spec (io.place_factorized, the same as lz.load), then transformers loads the
safetensors weights (single file or shards), casts them to `dtype` and places them by `device_map` itself. Low-bit
factors (format 3: int8 / packed int4 buffers and float32 scales) are then dequantized into plain LowRankLinear
layers in the model's dtype, as lz.load does. An elastic directory (format 4, `compress --elastic`) is built at the
size `config.keep` names — config.json holds the default size, and `from_pretrained(DIR, keep=K)` sets another, as
any config attribute given to from_pretrained is — by the global allocation over the stored spectra (elastic.py):
its ElasticLinear modules become the plain LowRankLinear / nn.Linear modules of that size.

The guard: without layerzip, transformers only warns about an unknown quantization method and would fill every
factorized module with random weights. `transformers_weights` names the weights file transformers reads; the guard
is not a safetensors name, so plain transformers stops with a ValueError quoting it (it names layerzip and says
what to do). The quantizer clears it in `update_attn_implementation`, the one hook that sees the config before
transformers resolves the weight files, so the files are then found by their usual names.
"""
from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import LayerzipError
from . import elastic
from .io import FORMAT_VERSION, GUARD, NEWEST_FORMAT, QUANT_METHOD, place_factorized
from .nn import LowBitTiedHead, dequantize_factors_, share_bases_, tie_heads_

logger = logging.get_logger(__name__)


class LayerzipConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a layerzip directory: {module name: layer spec}."""

    def __init__(self, modules: dict | None = None, format_version: int = FORMAT_VERSION,
                 elastic: dict | None = None, **kwargs):
        if not isinstance(format_version, int) or format_version > NEWEST_FORMAT:
            raise LayerzipError(f"this model was written by a newer layerzip (format {format_version}, this one "
                                f"reads up to {NEWEST_FORMAT}); upgrade layerzip: pip install -U layerzip")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = dict(modules or {})
        if elastic is not None:
            self.elastic = elastic


class LayerzipQuantizer(HfQuantizer):
    """Puts layerzip's factorized layers in place before transformers loads their weights."""

    requires_calibration = True         # only a directory layerzip wrote: nothing is factorized while loading

    def update_attn_implementation(self, config):
        if getattr(config, "transformers_weights", None) == GUARD:
            del config.transformers_weights
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, **kwargs):
        modules = self.quantization_config.modules
        place_factorized(model, modules, where="config.json's quantization_config")
        _tied_factor_keys(model)
        # transformers runs `_init_weights` on every module whose tensors it did not all mark as loaded, and some
        # reach into a child's weight from the parent (GPT-2 rescales `attn.c_proj.weight`); a factorized child has
        # no `weight`. Every tensor of such a parent comes from the checkpoint, so its init is skipped (not where
        # it holds a buffer of its own, which that init may compute).
        for name in modules:
            parent = model.get_submodule(name.rpartition(".")[0])
            if next(parent.buffers(recurse=False), None) is None:
                parent._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        dequantize_factors_(model)      # low-bit factors (int8 / int4 + scales) -> LowRankLinear in the model's dtype
        tie_heads_(model)
        share_bases_(model)
        info = getattr(self.quantization_config, "elastic", None)
        if info is None and getattr(model.config, "keep", None) is not None:
            raise LayerzipError(f"keep={model.config.keep} picks a width of an elastic model (compress --elastic), "
                                "and this directory is not one; drop keep=")
        if info is not None:            # elastic: the size config.keep names (from_pretrained(DIR, keep=K))
            where = "config.json's quantization_config"
            setattr(model, elastic.ATTR, elastic.check_settings(info, where))
            elastic.materialize_(model, elastic.check_keep(info, getattr(model.config, "keep", None), "this model"))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        logger.warning("save a layerzip model with layerzip.save(model, DIR): it writes layerzip.json and the guard "
                       "that keeps plain transformers from loading random weights")
        return False

    @property
    def is_trainable(self) -> bool:
        return True                     # the factors are plain parameters (heal trains them)


def _tied_factor_keys(model) -> None:
    """transformers ties `lm_head.weight` to the embedding's weight after loading; a factorized pair has neither,
    so the pairs it ties become the factors of each TiedLowRankHead and its embedding (the file holds one copy)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keys = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items() if t in names and s in names}
    for head, emb in tie_heads_(model):
        if not isinstance(model.get_submodule(head), LowBitTiedHead):     # a low-bit one holds no tensors
            keys.update({f"{emb}.{p}": f"{head}.{p}" for p in ("A", "B")})
    keys.update({f"{member}.B": f"{owner}.B" for member, owner in share_bases_(model)})   # --share: B once
    model.all_tied_weights_keys = keys


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:       # a reload of this module registers nothing twice
    register_quantization_config(QUANT_METHOD)(LayerzipConfig)
    register_quantizer(QUANT_METHOD)(LayerzipQuantizer)
