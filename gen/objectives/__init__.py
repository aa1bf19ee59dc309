"""Training objectives: `OBJECTIVES[key]` is the class (config section objective.<key>); each owns its corruption,
loss, prior and samplers (gen.objectives.base.Objective)."""
from gen.objectives.addp import ADDPObjective
from gen.objectives.autoencoder import AutoencoderObjective
from gen.objectives.base import LossOutput, Objective
from gen.objectives.bernoulli import BernoulliObjective
from gen.objectives.ddpm import DDPMObjective
from gen.objectives.flow import FlowObjective
from gen.objectives.masked_tokens import MaskedTokensObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.KEY: cls for cls in (FlowObjective, DDPMObjective, BernoulliObjective, MaskedTokensObjective,
                             ADDPObjective, AutoencoderObjective)}


def build_objective(cfg, model) -> Objective:
    """The configured objective (cfg.objective) for `model` (its null class and output head)."""
    return OBJECTIVES[cfg.objective.name].from_config(cfg, model)


__all__ = ["OBJECTIVES", "ADDPObjective", "AutoencoderObjective", "BernoulliObjective", "DDPMObjective",
           "FlowObjective", "LossOutput", "MaskedTokensObjective", "Objective", "build_objective"]
