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
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
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
    rope: bool = False
    """2-D rotary position embedding on q/k in every attention (LightningDiT/ERW style); off: DiT/SiT as published."""
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
    """Random horizontal flips of whole images (DiT/SiT use them; REPA does not); not with a latent cache."""
    num_workers: int = 4
    """DataLoader worker processes per training process."""
    cache_features: List[str] = field(default_factory=list)
    """prepare.py: encoders (ENCODERS keys, align.encoder_weights) whose features it caches; training runs none."""


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
    metrics: List[str] = field(default_factory=list)
    """Metrics of the samples: fid, sfid, is, pr, fd_dinov2 or adm (the four ADM ones), streamed while sampling
    against eval.reference; digits (class consistency and Frechet distance on the digits quickstart)."""
    write_images: bool = True
    """Write the .npz and grid; false streams the samples into sample.metrics only (no image kept)."""


@dataclass
class AlignConfig:
    """Representation-alignment losses added to the denoising loss (align.ALIGNERS)."""

    methods: List[str] = field(default_factory=list)
    """Aligners to train with, keys of align.ALIGNERS (e.g. [repa]); empty trains without alignment."""
    encoder_weights: Dict[str, str] = field(default_factory=dict)
    """Local weights per encoder name (file, timm/HF folder, or an HF repo id in the local cache); unlisted: caches."""
    repa_encoders: List[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    """REPA (and ERW) target encoders (align.encoders.ENCODERS keys), one projector each, losses averaged."""
    repa_depth: Optional[int] = None
    """REPA: student block aligned (1-based, output after k blocks); null: size default S 4, B 4, L 8, XL 8."""
    repa_projector_dim: int = 2048
    """REPA and ERW: hidden width of the projector MLP D -> dim -> dim -> encoder width."""
    repa_coeff: float = 0.5
    """REPA: loss weight lambda (paper 0.5)."""
    repa_stop_step: Optional[int] = None
    """REPA: weight 0 from this optimizer step on (early stop of the alignment); null keeps it on."""
    sra_student_layer: Optional[int] = None
    """SRA: student block fed to the head (1-based); null: size default SiT S/B 3, L 6, XL 8, DiT-XL 8."""
    sra_teacher_layer: Optional[int] = None
    """SRA: EMA-teacher block aligned to (1-based, early exit there); null: SiT S/B 8, L 16, XL 20, DiT-XL 16."""
    sra_t_max: float = 0.2
    """SRA: teacher time t_s - u * t_max clamped, u ~ U(0, 1) (DDPM: times T, in steps); paper 0.2."""
    sra_loss: str = "cosine"
    """SRA: alignment loss, cosine (per-token 1 - cos, recommended) or smooth_l1 (beta 0.05, the paper's)."""
    sra_coeff: float = 0.5
    """SRA: loss weight lambda, constant (cosine 0.5; the paper's smooth-L1 uses 0.2)."""
    sra_stop_step: Optional[int] = None
    """SRA: weight 0 from this optimizer step on; null keeps it on."""
    erw_warmup_steps: int = 100_000
    """ERW phase 1: steps training only the embedders, blocks 1..erw_warm_depth and the projector on clean latents
    at t=0 (part of train.max_steps: the paper's XL run is 100K warmup + 200K full = 300K)."""
    erw_warm_depth: int = 4
    """ERW phase 1: blocks warmed; the projector reads block K (reference code default 4, paper's best 5)."""
    erw_warmup_coeff: float = 0.5
    """ERW phase 1: weight of the warmup loss (to align.repa_encoders' patch tokens)."""
    erw_warmup_loss: str = "cosine"
    """ERW phase 1: cosine (per-token negative cosine, the reference code) or nt_xent (token InfoNCE, in-batch
    negatives; the paper names it without a definition)."""
    erw_temperature: float = 0.1
    """ERW phase 1, nt_xent: softmax temperature (not given by the paper: a guess to tune)."""
    erw_depth: Optional[int] = None
    """ERW phase 2: block REPA aligns (1-based); null: SiT/DiT-XL 14 (ERW README), other sizes REPA's default."""
    erw_coeff: Optional[float] = None
    """ERW phase 2: REPA weight c0 at the transition, lambda(k) = c0 * 2^(-(k - W) / H); null: XL 6, L 3, S/B 1."""
    erw_half_life_steps: float = 50_000
    """ERW phase 2: H, the steps over which the REPA weight halves (reference 50K)."""
    erw_reuse_projector: bool = True
    """ERW transition: phase 2 keeps the phase-1 projector (reference; it was trained on block K); false re-draws it."""


@dataclass
class EvalConfig:
    """FID-family evaluation: evaluate.py, the metrics sample.py streams into, training-time tracking (gen.eval)."""

    metrics: List[str] = field(default_factory=lambda: ["fid", "sfid", "is", "pr"])
    """Metrics: fid, sfid, is, pr (the ADM suite) and fd_dinov2."""
    reference: Optional[str] = None
    """Reference: an ADM-layout .npz (VIRTUAL_imagenet256_labeled.npz, or evaluate.py --make-reference) or a folder."""
    inception_weights: Optional[str] = None
    """Local weights-inception-2015-12-05-6726825d.pth (torch-fidelity v0.2.0) or pytorch-fid's pt_inception file."""
    inception_sha256: Optional[str] = None
    """Expected sha256 (or a prefix of >= 8 hex digits) of inception_weights; null skips the check."""
    dinov2_weights: Optional[str] = None
    """FD-DINOv2 encoder: local .pth/.safetensors, or a repo id in the local HF cache; null: timm/<arch>.lvd142m."""
    dinov2_arch: str = "vit_large_patch14_dinov2"
    """timm DINOv2 architecture: vit_large_patch14_dinov2 (Stein et al.), or vit_base/vit_small for cheap tracking."""
    dinov2_sha256: Optional[str] = None
    """Expected sha256 (or a prefix of >= 8 hex digits) of the DINOv2 weights file; null skips the check."""
    pr_mode: str = "fp16"
    """Precision/recall distances: fp16 (ADM parity, fp32 fallback per non-finite block) or fp32."""
    pr_k: int = 3
    """Precision/recall neighbourhood size k (Kynkaanniemi et al., ADM: 3)."""
    pr_reference_size: int = 10_000
    """Images of a reference folder used for precision/recall and written as arr_0 by --make-reference (ADM: 10K)."""
    is_split_size: int = 5000
    """Inception Score split size over global sample indices (ADM: 5000, i.e. 10 splits of 50K)."""
    image_size: Optional[int] = None
    """ADM center-crop size for folders of images of varying size (reference folders); null uses images as they are."""
    batch_per_process: int = 100
    """Images per feature-network forward on each process."""
    cache_dir: Optional[str] = None
    """Cache of reference features computed from images; null: $XDG_CACHE_HOME/repgen/eval (~/.cache/repgen/eval)."""


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """FID-family evaluation."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Representation alignment (REPA, ...)."""


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


BASE_KEY = "base"
"""Top-level YAML key naming another config file (relative to this one) whose values this file overrides."""


def _yaml_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple]:
    """(values, origin) of `path` after those of its `base` chain, the furthest base first."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (the base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config files include each other: {' -> '.join(map(str, (*chain, path.resolve())))}")
    layer = OmegaConf.load(path)
    base = layer.pop(BASE_KEY, None) if isinstance(layer, DictConfig) else None
    below = _yaml_layers(path.parent / str(base), (*chain, path.resolve())) if base is not None else []
    return [*below, (layer, str(path))]


def load_config(yaml_path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (after its `base:` files) <- dotted `key=value` overrides, validated; a plain `Config`."""
    conf = OmegaConf.structured(Config)
    layers = _yaml_layers(Path(yaml_path)) if yaml_path is not None else []
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


def check(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: Config) -> None:
    """Cross-field checks the types cannot express; registries are imported lazily to keep this module light."""
    from gen.models import MODELS
    from gen.objectives import OBJECTIVES

    check(cfg.model.name in MODELS, "model.name",
           f"unknown model {cfg.model.name!r}; close: {difflib.get_close_matches(cfg.model.name, MODELS, n=3)}")
    check(cfg.objective.name in OBJECTIVES, "objective.name", f"one of {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[cfg.objective.name]
    check(cfg.sampler.sampler in objective.SAMPLERS, "sampler.sampler",
           f"{cfg.sampler.sampler!r} is not a {cfg.objective.name} sampler; one of {sorted(objective.SAMPLERS)}")
    check(0.0 <= cfg.objective.label_dropout < 1.0, "objective.label_dropout", "must lie in [0, 1)")
    lo_hi = cfg.sampler.cfg_interval
    check(len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0, "sampler.cfg_interval", "[low, high] within [0, 1]")
    t = cfg.train
    check(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "one of no, fp16, bf16")
    check(t.global_batch_size > 0 and t.grad_accum_steps > 0, "train.global_batch_size", "must be positive")
    check(t.max_steps > 0 and t.ckpt_every_steps > 0, "train.max_steps", "steps must be positive")
    check(cfg.log.tracker in ("tensorboard", "wandb", "none"), "log.tracker", "one of tensorboard, wandb, none")
    check(cfg.log.every_steps > 0, "log.every_steps", "must be positive")
    check(cfg.log.fid_every_steps == 0 or cfg.eval.reference is not None, "eval.reference",
           "log.fid_every_steps needs reference statistics (an ADM .npz or a folder of images)")
    check(not (cfg.data.hflip and cfg.data.name == "latent_cache"), "data.hflip",
          "a latent cache holds the unflipped images' latents (and encoder features); flip with data.name=image_folder")
    check(cfg.sample.labels in ("random", "balanced"), "sample.labels", "random or balanced")
    check(cfg.sample.rounding in ("round", "floor"), "sample.rounding", "round or floor")
    _validate_eval(cfg.eval)
    _validate_align(cfg)


def _validate_eval(e: EvalConfig) -> None:
    """The eval section; registries are imported lazily (no torch-fidelity or timm import here)."""
    from gen.eval.dinov2 import DINOV2_ARCHS
    from gen.eval.metrics import METRICS
    from gen.eval.scores import PR_MODES

    unknown = [m for m in e.metrics if m not in METRICS]
    check(not unknown, "eval.metrics", f"unknown {unknown}; any of {sorted(METRICS)}")
    check(e.pr_mode in PR_MODES, "eval.pr_mode", f"one of {', '.join(PR_MODES)}")
    check(e.dinov2_arch in DINOV2_ARCHS, "eval.dinov2_arch", f"one of {sorted(DINOV2_ARCHS)}")
    check(e.pr_k > 0 and e.pr_reference_size > e.pr_k, "eval.pr_k", "k > 0 and fewer than eval.pr_reference_size")
    check(e.is_split_size > 0 and e.batch_per_process > 0, "eval.batch_per_process", "sizes must be positive")
    check(e.image_size is None or e.image_size > 0, "eval.image_size", "a positive size or null")


def _validate_align(cfg: Config) -> None:
    """The align section: method names and encoder keys here, each method's own keys by its `validate_config`.

    The align package (and timm) is imported only when alignment is configured.
    """
    a = cfg.align
    if not a.methods and not a.encoder_weights:
        return
    from align import ALIGNERS, ENCODERS

    unknown = [m for m in a.methods if m not in ALIGNERS]
    check(not unknown and len(set(a.methods)) == len(a.methods), "align.methods",
          f"distinct keys of {sorted(ALIGNERS)}, got {a.methods}")
    check(not {"repa", "erw"} <= set(a.methods), "align.methods",
          "erw already trains REPA (with a decaying weight) after its warmup: list repa or erw, not both")
    bad = [k for k in a.encoder_weights if k not in ENCODERS]
    check(not bad, "align.encoder_weights", f"unknown encoder(s) {bad}; one of {sorted(ENCODERS)}")
    for method in a.methods:
        ALIGNERS[method].validate_config(cfg)


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
