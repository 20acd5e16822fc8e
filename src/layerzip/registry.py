"""One registry class for everything looked up by name: compression methods and factorized layer types.

A name is registered once: a second, different class under the same name raises (no silent overwrite). Lookups of
an unknown name raise a `LayerzipError` that lists the known names.

>>> reg = Registry("widget")
>>> @reg.register("a")
... class A: pass
>>> reg["a"] is A, A.name, list(reg)
(True, 'a', ['a'])
>>> @reg.register("a")
... class B: pass
Traceback (most recent call last):
ValueError: widget 'a' is registered twice (A and B)
"""
from __future__ import annotations

from collections.abc import Mapping

from .errors import LayerzipError


class Registry(Mapping):
    """name -> class. `attr`: the class attribute that receives its registered name."""

    def __init__(self, kind: str, attr: str = "name"):
        self.kind, self.attr = kind, attr
        self._items: dict[str, type] = {}

    def register(self, name: str):
        def deco(cls):
            old = self._items.get(name)
            if old is not None and old is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({old.__qualname__} and {cls.__qualname__})")
            self._items[name] = cls
            setattr(cls, self.attr, name)
            return cls
        return deco

    def __getitem__(self, name: str) -> type:
        try:
            return self._items[name]
        except KeyError:
            raise LayerzipError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._items)}") from None

    def __contains__(self, name) -> bool:
        return name in self._items

    def get(self, name, default=None):
        return self._items.get(name, default)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


METHODS = Registry("method", attr="name")            # compression methods: CompressConfig subclasses (methods/)
LAYERS = Registry("layer type", attr="layer_type")   # factorized layers: FactorizedLayer subclasses (nn/)
