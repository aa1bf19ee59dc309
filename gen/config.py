"""Typed configuration: the single source of defaults for every job.

A run's config is `Config()` overridden by a YAML file (`configs/*.yaml`) and then by dotted
`key=value` arguments (`train.lr=2e-4 model.name=SiT-B/2`), through OmegaConf structured configs.
Every field carries a one-line docstring (the string under it); `describe()` prints them for `--help`.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem, named by its dotted key, with the fix."""


@dataclass
class ModelConfig:
    """The backbone."""

    name: str = "SiT-XL/2"
    """Registry key in gen.models.MODELS: SiT-{S,B,L,XL}/{1,2,4,8} or DiT-{S,B,L,XL}/{2,4,8}."""
    num_classes: int = 1000
    """Number of classes; label `num_classes` is the null (unconditional) class."""
    learn_sigma: Optional[bool] = None
    """Predict a variance too (2x output channels); null keeps the family default (DiT yes, SiT no)."""
    qk_norm: bool = False
    """Per-head LayerNorm on queries and keys (REPA's --qk-norm)."""
    depth: Optional[int] = None
    """Number of blocks; null keeps the size table's value."""
    hidden_size: Optional[int] = None
    """Token width D; null keeps the size table's value."""
    num_heads: Optional[int] = None
    """Attention heads; null keeps the size table's value."""


@dataclass
class ObjectiveConfig:
    """The training objective (gen.objectives.OBJECTIVES)."""

    name: str = "flow"
    """Objective registry key: flow (SiT/REPA interpolants) or ddpm (DiT's diffusion)."""
    path: str = "linear"
    """Flow interpolant: linear, cosine or vp (t = 0 data, t = 1 noise)."""
    prediction: str = "velocity"
    """Flow network target: velocity, noise or score."""
    weighting: str = "none"
    """Loss weighting for noise/score predictions: none, velocity or likelihood."""
    time_sampler: str = "uniform"
    """Training time distribution for flow: uniform or lognormal."""
    label_dropout: float = 0.1
    """Probability of replacing a label by the null class (classifier-free guidance training)."""
    num_timesteps: int = 1000
    """DDPM: length of the diffusion chain (linear betas 1e-4..0.02)."""


@dataclass
class SamplerConfig:
    """How samples are drawn (previews during training and sample.py)."""

    sampler: str = "euler_maruyama"
    """flow: euler, heun or euler_maruyama; ddpm: ddpm or ddim."""
    num_steps: int = 250
    """Solver steps (flow: NFE is 2N-1 for heun, N otherwise; ddpm: respaced chain length)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale w (v = v_u + w (v_c - v_u)); 1 disables guidance."""
    cfg_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])
    """Guide only for t in [low, high] (flow time; ddpm: fraction of the chain). REPA's best: [0, 0.7]."""
    eta: float = 0.0
    """DDIM stochasticity (0: deterministic)."""


@dataclass
class DataConfig:
    """The training data."""

    name: str = "latent_cache"
    """Dataset registry key: digits (embedded, offline), image_folder or latent_cache (from prepare.py)."""
    path: Optional[str] = None
    """Folder of class sub-folders (image_folder), or the cache folder written by prepare.py (latent_cache)."""
    image_size: int = 256
    """Side of the square training images: ADM center-crop size, or the digits' upsampled size."""
    hflip: bool = False
    """Random horizontal flips (DiT/SiT use them; REPA does not)."""
    num_workers: int = 4
    """DataLoader worker processes per training process."""


@dataclass
class LatentConfig:
    """The space the model runs in (latents.LATENTS)."""

    name: str = "sd-vae"
    """Latent registry key: pixel or sd-vae."""
    vae_path: Optional[str] = None
    """sd-vae: local diffusers folder of AutoencoderKL, or a repo id already in the local HF cache."""
    scale: float = 0.18215
    """sd-vae: latent scale factor applied to posterior samples (SD's 0.18215, one for all channels)."""


@dataclass
class TrainConfig:
    """The optimisation loop of train.py."""

    run_dir: str = "runs/default"
    """Folder for config.yaml, checkpoints, logs and previews."""
    max_steps: int = 400_000
    """Optimizer steps to train for."""
    global_batch_size: int = 256
    """Images per optimizer step over all processes and accumulation steps."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate (constant, no warm-up)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (REPA 1.0); 0 disables clipping (DiT/SiT)."""
    ema_decay: float = 0.9999
    """EMA decay per step, no warm-up, all parameters including pos_embed."""
    mixed_precision: str = "no"
    """Accelerate mixed precision: no, fp16 (with a GradScaler) or bf16."""
    allow_tf32: bool = True
    """TF32 matmuls on Ampere+ GPUs."""
    compile: bool = False
    """torch.compile the backbone."""
    seed: int = 0
    """Global seed: initialisation, data order, noise."""
    ckpt_every_steps: int = 50_000
    """Write a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed first); 0 keeps all."""


@dataclass
class LogConfig:
    """Logging and preview grids."""

    every_steps: int = 100
    """Log averaged losses every N steps (the only host sync of the loop)."""
    tracker: str = "tensorboard"
    """Accelerate tracker: tensorboard, wandb or none."""
    preview_every_steps: int = 10_000
    """Draw a grid with the EMA model every N steps (0 disables)."""
    preview_num: int = 64
    """Images in a preview grid."""


@dataclass
class SampleConfig:
    """What sample.py produces."""

    num_samples: int = 50_000
    """Images to generate over all processes."""
    batch_per_process: int = 64
    """Images per forward batch on each process."""
    seed: int = 0
    """Global seed; sample i uses its own generator seeded from (seed, i)."""
    labels: str = "random"
    """Label scheme: random (uniform, as the reference repos) or balanced (equal count per class)."""
    rounding: str = "round"
    """Pixel quantisation: round (clamp(127.5 x + 128), DiT/SiT) or floor (clamp(255 (x+1)/2), REPA)."""
    out: Optional[str] = None
    """Output .npz path; null writes RUN_DIR/samples/<name>.npz."""
    grid_num: int = 64
    """Images in the PNG grid written next to the .npz."""
    use_ema: bool = True
    """Sample with the EMA weights (all papers evaluate EMA)."""
    metrics: List[str] = field(default_factory=list)
    """Metrics computed on the samples, e.g. [digits] (class consistency and Frechet distance on digits)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The training objective."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampling for previews and sample.py."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    latent: LatentConfig = field(default_factory=LatentConfig)
    """The latent space."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging and previews."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """sample.py."""


def _valid_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    """Turn an OmegaConf error into one message naming the dotted key, the source and the fix."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _valid_keys(Config()), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else "; run with --help for the valid keys"
        return ConfigError(f"unknown config key '{key}' in {origin}{hint}")
    return ConfigError(f"bad value for config key '{key}' in {origin}: {str(err).splitlines()[0]}")


def load_config(yaml_path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides, validated; returns a plain `Config`."""
    conf = OmegaConf.structured(Config)
    layers = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append((OmegaConf.load(path), str(path)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    layers.append((OmegaConf.from_dotlist(list(overrides)), "the command line"))
    for layer, origin in layers:
        try:
            conf = OmegaConf.merge(conf, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, origin) from None
    cfg: Config = OmegaConf.to_object(conf)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written next to every run and checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: Config) -> None:
    """Cross-field checks the types cannot express; registries are imported lazily to keep this module light."""
    from gen.models import MODELS
    from gen.objectives import OBJECTIVES

    _check(cfg.model.name in MODELS, "model.name",
           f"unknown model {cfg.model.name!r}; close: {difflib.get_close_matches(cfg.model.name, MODELS, n=3)}")
    _check(cfg.objective.name in OBJECTIVES, "objective.name", f"one of {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[cfg.objective.name]
    _check(cfg.sampler.sampler in objective.SAMPLERS, "sampler.sampler",
           f"{cfg.sampler.sampler!r} is not a {cfg.objective.name} sampler; one of {sorted(objective.SAMPLERS)}")
    _check(0.0 <= cfg.objective.label_dropout < 1.0, "objective.label_dropout", "must lie in [0, 1)")
    lo_hi = cfg.sampler.cfg_interval
    _check(len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0, "sampler.cfg_interval", "[low, high] within [0, 1]")
    t = cfg.train
    _check(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "one of no, fp16, bf16")
    _check(t.global_batch_size > 0 and t.grad_accum_steps > 0, "train.global_batch_size", "must be positive")
    _check(t.max_steps > 0 and t.ckpt_every_steps > 0, "train.max_steps", "steps must be positive")
    _check(cfg.log.tracker in ("tensorboard", "wandb", "none"), "log.tracker", "one of tensorboard, wandb, none")
    _check(cfg.log.every_steps > 0, "log.every_steps", "must be positive")
    _check(cfg.sample.labels in ("random", "balanced"), "sample.labels", "random or balanced")
    _check(cfg.sample.rounding in ("round", "floor"), "sample.rounding", "round or floor")


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def describe(cfg: Config | None = None) -> str:
    """Every key with its current value and docstring, for `--help`."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(Config):
        node = getattr(cfg, section.name)
        docs = field_docs(type(node))
        lines.append(f"{section.name}:  # {field_docs(Config)[section.name]}")
        for f in dataclasses.fields(node):
            lines.append(f"  {section.name}.{f.name}={getattr(node, f.name)!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)
