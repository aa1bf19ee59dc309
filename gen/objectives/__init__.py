"""Training objectives: `OBJECTIVES[name]` is the class; each owns its noising, loss and samplers."""
from gen.objectives.base import LossOutput, Objective
from gen.objectives.ddpm import DDPMObjective
from gen.objectives.flow import FlowObjective

OBJECTIVES: dict[str, type[Objective]] = {"flow": FlowObjective, "ddpm": DDPMObjective}

__all__ = ["OBJECTIVES", "DDPMObjective", "FlowObjective", "LossOutput", "Objective"]
