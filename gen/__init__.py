"""repgen's generative core: backbones, objectives, samplers."""
