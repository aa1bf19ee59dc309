"""Backbone registry: `MODELS["SiT-XL/2"](**overrides)` or `build_model(name, **overrides)`."""
from __future__ import annotations

import difflib
import inspect
from functools import partial
from typing import Callable

from torch import nn

from gen.models.dit import FAMILIES, SIZES, BackboneOutput, Transformer


def _build(family: str, size: str, patch_size: int, **overrides) -> Transformer:
    """A family/size/patch entry with user overrides (input_size, in_channels, num_classes, learn_sigma, ...)."""
    allowed = set(inspect.signature(Transformer.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown} for {family}-{size}/{patch_size}; valid: {sorted(allowed)}")
    defaults = {k: v for k, v in FAMILIES[family].items() if k != "patches"}
    return Transformer(**{**SIZES[size], **defaults, "patch_size": patch_size, **overrides})


MODELS: dict[str, Callable[..., nn.Module]] = {
    f"{family}-{size}/{p}": partial(_build, family, size, p)
    for family, spec in FAMILIES.items()
    for size in SIZES
    for p in spec["patches"]
}


def build_model(name: str, **overrides) -> nn.Module:
    """Build the registered backbone `name` (e.g. "SiT-XL/2"), overriding any constructor argument."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (registered: {sorted(MODELS)})")
    return MODELS[name](**overrides)


__all__ = ["MODELS", "SIZES", "FAMILIES", "BackboneOutput", "Transformer", "build_model"]
