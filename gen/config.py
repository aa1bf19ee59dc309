"""Typed configuration: the single source of defaults for every job.

A run's config is the composed schema (`schema()`: the run-level sections below plus one sub-section per
registered backbone family, objective, latent space and aligner, each a small dataclass next to its component)
overridden by a YAML file (`configs/*.yaml`, with `base:` includes) and then by dotted `key=value` arguments
(`train.lr=2e-4 align.repa.depth=8`), through OmegaConf structured configs. Every field carries a one-line
docstring (the string under it); `describe()` prints them for `--help-config`. This module imports no registry
at import time: the registries are imported when the schema is first composed.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from gen.eval_config import EvalConfig  # a module of its own: gen.eval is a registry package


class ConfigError(ValueError):
    """A config problem, named by its dotted key, with the fix."""


@dataclass
class ModelConfig:
    """The backbone: a registered model name; each backbone family's own keys sit under model.<family>."""

    name: str = "SiT-XL/2"
    """Registry key in gen.models.MODELS, e.g. SiT-{S,B,L,XL}/{1,2,4,8} or DiT-{S,B,L,XL}/{2,4,8}."""


@dataclass
class CondConfig:
    """What the model is conditioned on (gen.cond): class labels, with a null label for guidance."""

    num_classes: int = 1000
    """Number of classes; label `num_classes` is the null (unconditional) class."""
    label_dropout: float = 0.1
    """Probability of replacing a sample's condition by the null one (classifier-free guidance training)."""
    text_dim: int = 0
    """Width D of the text-encoder tokens the backbone cross-attends to (gen.text; CLIP ViT-L/14: 768); 0: no text.
    Training reads the tokens from a latent cache that prepare.py wrote with cond.text_encoder set."""
    text_encoder: Optional[str] = None
    """Local folder of the CLIP text encoder (transformers layout, e.g. openai/clip-vit-large-patch14) that encodes
    captions in prepare.py and sample.py (sample.captions); never loaded in training."""
    text_tokens: int = 77
    """Tokens per caption (padded or truncated; CLIP's context is 77)."""


@dataclass
class ObjectiveConfig:
    """The training objective (gen.objectives.OBJECTIVES); each objective's own keys sit under objective.<name>."""

    name: str = "flow"
    """Objective registry key, e.g. flow (SiT/REPA interpolants) or ddpm (DiT's diffusion)."""


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
    heun_guidance: str = "step_start"
    """heun with cfg_interval: step_start guides a step's corrector iff its start time lies in the interval, like its
    predictor (REPA samplers.py); each_eval judges the corrector at its own time. They differ only on the step
    that straddles an interval edge."""
    eta: float = 0.0
    """DDIM stochasticity (0: deterministic)."""
    precision: str = "tf32"
    """Network precision while sampling on a GPU: fp32 (exact), tf32 (TF32 matmuls; REPA generate.py's default) or
    bf16 (autocast; the sampler's state stays float64). The CPU computes fp32 and tf32 alike."""


@dataclass
class DataConfig:
    """The training data."""

    name: str = "latent_cache"
    """Dataset registry key: digits (embedded, offline), image_folder, hf (Hugging Face datasets, offline),
    latent_cache (from prepare.py), or for 3D shapes procedural_shapes (embedded) and mesh_folder (gen.shape_data)."""
    path: Optional[str] = None
    """Folder of class sub-folders (image_folder), the cache folder written by prepare.py (latent_cache), or for hf a
    save_to_disk folder, a .parquet/.arrow file or folder of them, or a dataset name in the local HF cache."""
    split: str = "train"
    """hf: the split to read (a DatasetDict folder, split-named data files, a cached dataset); one file is 'train'.
    procedural_shapes: train or heldout."""
    num_items: Optional[int] = None
    """procedural_shapes: how many shapes the split holds."""
    image_column: str = "image"
    """hf: column of the images (datasets Image feature, {bytes, path} dicts or uint8 HxW(xC) arrays)."""
    label_column: Optional[str] = "label"
    """hf: column of the integer (or ClassLabel) class labels, in [0, cond.num_classes); null: every label 0."""
    extra_columns: List[str] = field(default_factory=list)
    """hf: further columns passed through into each item under their own names (for other modalities)."""
    image_size: int = 256
    """Side of the square training images: ADM center-crop size, or the digits' upsampled size."""
    hflip: bool = False
    """Random horizontal flips of whole images (DiT/SiT use them; REPA does not); not with a latent cache."""
    num_workers: int = 4
    """DataLoader worker processes per training process."""
    prescan: bool = True
    """image_folder: open and verify every image (PIL verify: header, PNG checksums; no decoding) before training or
    prepare.py writes anything, naming the first corrupt file. Measured on one core from the page cache: ~15,000
    images/s for 64 px PNGs or 500x400 JPEGs, ~4,000/s for 256 px PNGs (ImageNet's 1.28M JPEGs: ~1.5 min, more from
    a cold disk); false skips it for huge sets (a corrupt file then fails when first read)."""
    cache_features: List[str] = field(default_factory=list)
    """prepare.py: encoders (ENCODERS keys, align.encoder_weights) whose features it caches; training runs none."""


@dataclass
class LatentConfig:
    """The space the model runs in (latents.LATENTS); each space's own keys sit under latent.<name> (- as _)."""

    name: str = "sd-vae"
    """Latent registry key, e.g. pixel or sd-vae."""


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
    """AdamW learning rate (constant after train.lr_warmup_steps)."""
    lr_warmup_steps: int = 0
    """Linear warm-up: step s (from 0) trains at lr * min(1, (s + 1) / lr_warmup_steps); 0: constant from the start
    (DiT/SiT/REPA). MAGE/ADDP warm up for 40 epochs."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (REPA 1.0); 0 disables clipping (DiT/SiT)."""
    divergence_factor: float = 100.0
    """Stop like on a NaN when a logged denoising loss exceeds this factor times the median of the last 20 logged
    ones (the first being the run's first micro-batch's); 0 disables the guard."""
    ema_decay: float = 0.9999
    """EMA decay per step, no warm-up, all parameters including pos_embed."""
    mixed_precision: str = "auto"
    """Accelerate mixed precision: auto (bf16 on a GPU that has it, else no), no, fp16 (with a GradScaler) or bf16."""
    allow_tf32: bool = True
    """TF32 matmuls on Ampere+ GPUs."""
    compile: Optional[bool] = None
    """torch.compile the backbone's blocks (regional, about 20 s on a GPU; 1.5x the training images/s of SiT-XL/2 on
    an H200); null: on a GPU, not on the CPU (minutes of compiling there)."""
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
    fid_every_steps: int = 0
    """Track FID of the EMA model every N steps (and at the end) against eval.reference; 0 disables."""
    fid_num_samples: int = 10_000
    """Samples per tracked FID (FID-10K: cheaper than FID-50K and biased upwards; compare runs, not papers)."""
    fid_num_steps: Optional[int] = None
    """Sampler steps for tracked FID; null uses sampler.num_steps."""


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
    captions: Optional[str] = None
    """Text runs (cond.text_dim > 0): a UTF-8 file of captions, one per line; sample i takes caption i mod their number
    (with sample.labels=balanced and K captions in class order, caption and label agree), encoded by
    cond.text_encoder."""
    metrics: List[str] = field(default_factory=list)
    """Metrics of the samples: fid, sfid, is, pr, fd_dinov2 or adm (the four ADM ones), streamed while sampling
    against eval.reference; digits (class consistency and Frechet distance on the digits quickstart)."""
    compile: Optional[bool] = None
    """torch.compile the backbone's blocks for sampling (regional; 1.6x the images/s of SiT-XL/2 in bf16 on an
    H200); null: on a GPU, not on the CPU."""
    write_images: bool = True
    """Write the .npz and grid; false streams the samples into sample.metrics only (no image kept)."""


@dataclass
class AlignConfig:
    """Representation-alignment losses added to the denoising loss (align.ALIGNERS); each method's own keys sit
    under align.<method>."""

    methods: List[str] = field(default_factory=list)
    """Aligners to train with, keys of align.ALIGNERS (e.g. [repa]); empty trains without alignment."""
    encoder_weights: Dict[str, str] = field(default_factory=dict)
    """Local weights per encoder name (file, timm/HF folder, or an HF repo id in the local cache); unlisted: caches."""


@dataclass
class Config:
    """A whole run. The component sections (model, objective, latent, align) gain one sub-section per registered
    component when the schema is composed (`schema()`); this class alone holds the run-level keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    cond: CondConfig = field(default_factory=CondConfig)
    """The conditioning."""
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """FID-family evaluation."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Representation alignment (REPA, ...)."""


# ---------------------------------------------------------------------------------------------------
# Composition: every registered component contributes its own config dataclass as a sub-section.

COMPONENTS: dict[str, tuple[str, str]] = {
    "model": ("gen.models", "FAMILIES"),
    "objective": ("gen.objectives", "OBJECTIVES"),
    "latent": ("latents", "LATENTS"),
    "align": ("align", "ALIGNERS"),
}
"""Section -> (module, registry) whose entries each own a `Config` dataclass, composed into the section as
`<section>.<key>` (a key's '-' becomes '_'). The modules are imported when a schema is first composed, never when
this module is imported, so no registry imports gen.config in a circle."""


def section_key(name: str) -> str:
    """The sub-section a registry key's config sits under (`sd-vae` -> `sd_vae`)."""
    return name.replace("-", "_").replace("/", "_")


def registry(section: str) -> dict:
    """The registry composing `section` (imported on demand)."""
    module, attribute = COMPONENTS[section]
    return getattr(importlib.import_module(module), attribute)


_SCHEMA: dict[tuple, type] = {}


def schema() -> type:
    """The run config class: `Config` whose component sections hold one sub-section per registered component.

    Composed from the registries as they are now (a component registered later, e.g. a test's toy aligner, is in
    the next schema), and cached per set of registered components.
    """
    signature = tuple((section, tuple((key, component.Config) for key, component in registry(section).items()))
                      for section in COMPONENTS)
    if signature not in _SCHEMA:
        fields = []
        for f in dataclasses.fields(Config):
            base = f.default_factory
            if f.name in COMPONENTS:
                parts = []
                for key, component in registry(f.name).items():
                    sub = component.Config
                    parts.append((section_key(key), sub, field(default_factory=sub)))
                base = _composed(f"{base.__name__}", base, parts)
            fields.append((f.name, base, field(default_factory=base)))
        _SCHEMA[signature] = _composed("Config", Config, fields)
    return _SCHEMA[signature]


def _composed(name: str, base: type, fields: list) -> type:
    """A dataclass `name` extending `base` with `fields`, registered in this module so instances pickle."""
    cls = dataclasses.make_dataclass(name, fields, bases=(base,))
    cls.__module__ = __name__
    cls.__qualname__ = f"_composed_{name}"
    cls.__doc__ = base.__doc__
    globals()[cls.__qualname__] = cls
    return cls


def default_config() -> Config:
    """Every key at its default."""
    return schema()()


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
        close = difflib.get_close_matches(key, _valid_keys(default_config()), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else "; run with --help-config for the valid keys"
        return ConfigError(f"unknown config key '{key}' in {origin}{hint}")
    return ConfigError(f"bad value for config key '{key}' in {origin}: {str(err).splitlines()[0]}")


BASE_KEY = "base"
"""Top-level YAML key naming another config file (relative to this one) whose values this file overrides."""


def _yaml_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple]:
    """(values, origin) of `path` after those of its `base` chain, the furthest base first."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (the base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config files include each other: {' -> '.join(map(str, (*chain, path.resolve())))}")
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix that line of the config file") from None
    base = layer.pop(BASE_KEY, None) if isinstance(layer, DictConfig) else None
    below = _yaml_layers(path.parent / str(base), (*chain, path.resolve())) if base is not None else []
    return [*below, (layer, str(path))]


def _colon_mappings(node):
    """`key={name:value}` written without a space after the colon parses as {'name:value': None}; split such keys
    (e.g. align.encoder_weights={dinov2-vit-b:/w/dinov2.pth}) into name -> value, as `{name: value}` would give."""
    if isinstance(node, DictConfig):
        for key in list(node.keys()):
            if isinstance(key, str) and ":" in key and node[key] is None:
                name, value = key.split(":", 1)
                del node[key]
                node[name.strip()] = value.strip()
            else:
                _colon_mappings(node[key])
    return node


def load_config(yaml_path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (after its `base:` files) <- dotted `key=value` overrides, validated."""
    conf = OmegaConf.structured(schema())
    layers = _yaml_layers(Path(yaml_path)) if yaml_path is not None else []
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    layers.append((_colon_mappings(OmegaConf.from_dotlist(list(overrides))), "the command line"))
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
    from gen.io import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


def check(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def choose(section: str, name: str, key: str) -> type:
    """The registered component `name` of `section`, or a ConfigError naming `key` and close names."""
    entries = registry(section)
    if name not in entries:
        close = difflib.get_close_matches(name, entries, n=3)
        raise ConfigError(f"config key '{key}': unknown {section} {name!r}; "
                          + (f"did you mean {close}?" if close else f"one of {sorted(entries)}"))
    return entries[name]


def selected(cfg: Config) -> dict[str, type]:
    """The components a run uses: backbone family, objective, latent space, by section (aligners excluded)."""
    from gen.models import family_of

    return {"model": family_of(cfg.model.name), "objective": choose("objective", cfg.objective.name, "objective.name"),
            "latent": choose("latent", cfg.latent.name, "latent.name")}


def component_config(cfg: Config, section: str, name: str):
    """The sub-section of `section` that component `name` owns (e.g. cfg.align.repa)."""
    return getattr(getattr(cfg, section), section_key(name))


def validate(cfg: Config) -> None:
    """Check the whole resolved config (gen.validation: value ranges, choices, the components' own sections)."""
    importlib.import_module("gen.validation").validate(cfg)


@dataclass
class ComponentConfig:
    """Base of every component's own config section: field docstrings like the run-level ones, and `validate`."""

    def validate(self, cfg: Config) -> None:
        """Check this section against the whole run config; raise ConfigError (use `check`) naming the key."""


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a config dataclass and its bases (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == __name__ and klass.__qualname__.startswith(
                "_composed_"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = nxt.value.value
    return docs


def describe(cfg: Config | None = None) -> str:
    """Every key with its current value and docstring, for `--help-config`."""
    cfg = cfg or default_config()
    lines: list[str] = []

    def walk(node, prefix: str, depth: int) -> None:
        docs = field_docs(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                doc = docs.get(f.name) or (type(value).__doc__ or "").strip().splitlines()[0]
                lines.append(f"{'  ' * depth}{prefix}{f.name}:  # {doc}")
                walk(value, f"{prefix}{f.name}.", depth + 1)
            else:
                lines.append(f"{'  ' * depth}{prefix}{f.name}={value!r}  # {docs.get(f.name, '')}")

    walk(cfg, "", 0)
    return "\n".join(lines)
