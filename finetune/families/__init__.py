"""Registry of model families. ``get_family("wan")`` returns the class; importing this package
imports every family module so each registers itself."""

from __future__ import annotations

import difflib
import importlib

from finetune.families.base import Components, Expert, Family, FrameRule, ModelSpec, Noised

_REGISTRY: dict[str, type[Family]] = {}
# One module per family, named as the family; add a new family by adding its name here.
_FAMILY_MODULES = ("wan", "ltx", "wan22", "wan22_5b", "ltxv095", "hunyuanvideo15", "cogvideox", "cogvideox15",
                   "longcat", "mochi", "hunyuanvideo", "ltx2", "kandinsky5", "opensora2")


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make ``cls`` reachable as ``get_family(cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in _FAMILY_MODULES:
        importlib.import_module(f"finetune.families.{mod}")


def family_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_family(name: str) -> type[Family]:
    """The family class registered as ``name``, importing only its module.
    Raises KeyError naming the closest known family."""
    if name not in _REGISTRY and name in _FAMILY_MODULES:
        importlib.import_module(f"finetune.families.{name}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _FAMILY_MODULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown model family {name!r}{hint}; known: {', '.join(sorted(_FAMILY_MODULES))}")
    return _REGISTRY[name]


__all__ = ["Components", "Expert", "Family", "Noised", "FrameRule", "ModelSpec", "get_family", "family_names", "register"]
