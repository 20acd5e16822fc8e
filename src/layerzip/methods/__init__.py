"""Compression methods, one file each: its config dataclass (registered by name), its pure math and its spectrum.

Every module of this package is imported here, so a new method is one new file: its `@register_method` config
appears in `METHODS`, in `layerzip`'s namespace and on the command line without touching any other file.
"""
import importlib
import pkgutil

from ..registry import METHODS
from .base import CompressConfig, config_from_dict, option, register_method

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

CONFIGS = {cls.__name__: cls for cls in METHODS.values()}    # SVD, SVDLLM, ... : the registered config classes
globals().update(CONFIGS)

__all__ = ["METHODS", "CompressConfig", "config_from_dict", "option", "register_method", *CONFIGS]
