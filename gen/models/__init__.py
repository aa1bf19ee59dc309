"""Backbone registry: `FAMILIES` (one gen.models.base.Backbone subclass per family, config section model.<key>) and
`MODELS`, the merge of every family's model names (`MODELS["SiT-XL/2"](**overrides)` or `build_model`)."""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from gen.models.addp import ADDPNet
from gen.models.bae import BAEBackbone
from gen.models.base import Backbone, BackboneOutput, require_grid
from gen.models.dit import SIZES, VARIANTS, Transformer
from gen.models.mage import MaskedTokenTransformer
from gen.models.set_transformer import SetTransformer

FAMILIES: dict[str, type[Backbone]] = {
    cls.KEY: cls for cls in (Transformer, MaskedTokenTransformer, ADDPNet, BAEBackbone, SetTransformer)}
"""Backbone families by their key (the config section model.<key>)."""

MODELS: dict[str, Callable[..., nn.Module]] = {name: build for family in FAMILIES.values()
                                               for name, build in family.MODELS.items()}


def family_of(name: str) -> type[Backbone]:
    """The family registering model `name`, or a ConfigError naming model.name and close names."""
    for family in FAMILIES.values():
        if name in family.MODELS:
            return family
    from gen.config import ConfigError

    models = sorted(n for family in FAMILIES.values() for n in family.MODELS)
    close = difflib.get_close_matches(name, models, n=3)
    raise ConfigError(f"config key 'model.name': unknown model {name!r}; "
                      + (f"did you mean {close}?" if close else f"one of {models}"))


def model_size(name: str) -> str | None:
    """The size tag (S, B, L, XL) of a registered model, for per-size method defaults; None if it has none."""
    return family_of(name).SIZES_OF.get(name)


def build_model(name: str, **overrides) -> nn.Module:
    """Build the registered backbone `name` (e.g. "SiT-XL/2"), overriding any constructor argument."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (registered: {sorted(MODELS)})")
    return MODELS[name](**overrides)


def build_backbone(cfg, sample_shape: tuple[int, ...]) -> Backbone:
    """The configured backbone (cfg.model), sized for samples of `sample_shape`, conditioned as cfg.cond says."""
    return family_of(cfg.model.name).from_config(cfg, tuple(sample_shape))


__all__ = ["FAMILIES", "MODELS", "SIZES", "VARIANTS", "Backbone", "BackboneOutput", "SetTransformer", "Transformer",
           "build_backbone", "build_model", "family_of", "model_size", "require_grid"]
