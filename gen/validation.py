"""Checks of a whole resolved config, run by `gen.config.load_config` before any job builds or writes anything.

The run-level sections (gen.config) are checked here: every numeric key against its allowed range (`in_range`, one
line naming the key, the value and the range), every choice against its registry, and the combinations of keys;
then each component the run uses checks its own section (its Config's `validate`). The data and files a job reads
are checked by the jobs themselves, once the data is opened (gen.data.check_classes, the image-folder pre-scan,
gen.eval.reference.check_reference).
"""
from __future__ import annotations

import importlib
import math

from gen.config import Config, EvalConfig, check, component_config, registry, selected


def _interval(low, high, above: bool, below: bool) -> str:
    """'>= 1', '> 0', '[0, 1)' ..."""
    if high is None:
        return f"{'>' if above else '>='} {low:g}"
    if low is None:
        return f"{'<' if below else '<='} {high:g}"
    return f"{'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"


def in_range(key: str, value, low=None, high=None, *, above: bool = False, below: bool = False,
             nullable: bool = False, why: str = "") -> None:
    """Raise ConfigError "config key 'KEY' is VALUE; allowed: RANGE" unless `value` is finite and in the range.

    `low`/`high` are inclusive unless `above`/`below`; `nullable` also allows None (written 'or null').
    """
    if value is None and nullable:
        return
    ok = (isinstance(value, (int, float)) and math.isfinite(value)
          and (low is None or (value > low if above else value >= low))
          and (high is None or (value < high if below else value <= high)))
    allowed = _interval(low, high, above, below) + (" or null" if nullable else "")
    check(ok, key, f"is {value!r}; allowed: {allowed}{f' ({why})' if why else ''}")


def validate(cfg: Config) -> None:
    """Run-level checks here; every used component validates its own section (its Config's `validate`), and the
    objective, latent space and backbone must fit together."""
    parts = selected(cfg)
    objective, latent, family = parts["objective"], parts["latent"], parts["model"]
    check(latent.kind in objective.LATENT_KINDS, "objective.name",
          f"objective {cfg.objective.name!r} runs on {'/'.join(objective.LATENT_KINDS)} latents, not on latent "
          f"space {cfg.latent.name!r} ({latent.kind}); choose another objective.name or latent.name")
    check(latent.layout in family.LAYOUTS, "model.name",
          f"backbone {cfg.model.name!r} takes {'/'.join(family.LAYOUTS)} samples, not latent space "
          f"{cfg.latent.name!r} ({latent.layout}); choose another model.name or latent.name")
    check(objective.BACKBONES is None or family.KEY in objective.BACKBONES, "model.name",
          f"objective {cfg.objective.name!r} trains {'/'.join(objective.BACKBONES or ())} backbones, not "
          f"{cfg.model.name!r} ({family.KEY}) on latent space {cfg.latent.name!r}; choose another model.name or "
          f"objective.name")
    check(cfg.sampler.sampler in objective.SAMPLERS, "sampler.sampler",
          f"{cfg.sampler.sampler!r} is not a {cfg.objective.name} sampler; one of {sorted(objective.SAMPLERS)}")
    in_range("cond.label_dropout", cfg.cond.label_dropout, 0.0, 1.0, below=True)
    in_range("cond.num_classes", cfg.cond.num_classes, 1)
    in_range("cond.text_dim", cfg.cond.text_dim, 0)
    in_range("cond.text_tokens", cfg.cond.text_tokens, 1)
    check(not cfg.cond.text_dim or family.TEXT, "cond.text_dim",
          f"{cfg.model.name!r} ({family.KEY}) reads no text tokens; set cond.text_dim=0 or use a text-conditioned "
          f"backbone (set_transformer)")
    _validate_sampler(cfg)
    _validate_data(cfg)
    _validate_train(cfg)
    _validate_log(cfg)
    _validate_sample(cfg)
    _validate_eval(cfg.eval)
    for section, name in (("model", family.KEY), ("objective", cfg.objective.name), ("latent", cfg.latent.name)):
        component_config(cfg, section, name).validate(cfg)
    _validate_align(cfg)


def _validate_sampler(cfg: Config) -> None:
    s = cfg.sampler
    in_range("sampler.num_steps", s.num_steps, 1)
    in_range("sampler.cfg_scale", s.cfg_scale, 0.0, why="1 disables guidance")
    check(s.cfg_scale == 1.0 or cfg.cond.label_dropout > 0, "sampler.cfg_scale",
          f"is {s.cfg_scale:g}, but cond.label_dropout=0: the null condition is never trained, so guidance would "
          f"extrapolate from an untrained embedding; set sampler.cfg_scale=1, or train with cond.label_dropout > 0 "
          f"(DiT, SiT and REPA use 0.1)")
    in_range("sampler.eta", s.eta, 0.0)
    check(s.precision in ("fp32", "tf32", "bf16"), "sampler.precision", "one of fp32, tf32, bf16")
    lo_hi = s.cfg_interval
    check(len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0, "sampler.cfg_interval",
          f"is {list(lo_hi)}; allowed: [low, high] with 0 <= low <= high <= 1")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    in_range("data.image_size", d.image_size, 1)
    in_range("data.num_workers", d.num_workers, 0)
    in_range("data.num_items", d.num_items, 1, nullable=True)
    check(not (d.hflip and d.name == "latent_cache"), "data.hflip",
          "a latent cache holds the unflipped images' latents (and encoder features); flip with data.name=image_folder")


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    check(t.mixed_precision in ("auto", "no", "fp16", "bf16"), "train.mixed_precision", "one of auto, no, fp16, bf16")
    in_range("train.max_steps", t.max_steps, 1)
    in_range("train.global_batch_size", t.global_batch_size, 1)
    in_range("train.grad_accum_steps", t.grad_accum_steps, 1)
    in_range("train.lr", t.lr, 0.0, above=True)
    in_range("train.lr_warmup_steps", t.lr_warmup_steps, 0)
    check(len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas), "train.betas",
          f"is {list(t.betas)}; allowed: two values in [0, 1)")
    in_range("train.adam_eps", t.adam_eps, 0.0)
    in_range("train.weight_decay", t.weight_decay, 0.0)
    in_range("train.grad_clip", t.grad_clip, 0.0, why="0 disables clipping")
    check(t.divergence_factor == 0 or t.divergence_factor > 1, "train.divergence_factor",
          f"is {t.divergence_factor!r}; allowed: 0 (off) or > 1")
    in_range("train.ema_decay", t.ema_decay, 0.0, 1.0, below=True)
    in_range("train.seed", t.seed, 0)
    in_range("train.ckpt_every_steps", t.ckpt_every_steps, 1)
    in_range("train.keep_checkpoints", t.keep_checkpoints, 0, why="0 keeps all")


def _validate_log(cfg: Config) -> None:
    g = cfg.log
    check(g.tracker in ("tensorboard", "wandb", "none"), "log.tracker", "one of tensorboard, wandb, none")
    in_range("log.every_steps", g.every_steps, 1)
    in_range("log.preview_every_steps", g.preview_every_steps, 0, why="0 disables previews")
    if g.preview_every_steps:
        in_range("log.preview_num", g.preview_num, 1, why="images per preview grid; or log.preview_every_steps=0")
    in_range("log.fid_every_steps", g.fid_every_steps, 0, why="0 disables tracked FID")
    if g.fid_every_steps:
        in_range("log.fid_num_samples", g.fid_num_samples, 2, why="a Frechet distance needs 2 samples or more")
        in_range("log.fid_num_steps", g.fid_num_steps, 1, nullable=True)
    check(g.fid_every_steps == 0 or cfg.eval.reference is not None, "eval.reference",
          "log.fid_every_steps needs reference statistics (an ADM .npz or a folder of images)")


def _validate_sample(cfg: Config) -> None:
    s = cfg.sample
    in_range("sample.num_samples", s.num_samples, 1)
    in_range("sample.batch_per_process", s.batch_per_process, 1)
    in_range("sample.seed", s.seed, 0)
    in_range("sample.grid_num", s.grid_num, 1)
    check(s.labels in ("random", "balanced"), "sample.labels", "random or balanced")
    check(s.rounding in ("round", "floor"), "sample.rounding", "round or floor")
    check(not s.captions or cfg.cond.text_dim > 0, "sample.captions",
          f"is {s.captions!r}, but this run reads no text (cond.text_dim=0); drop sample.captions")
    sample_metrics = importlib.import_module("gen.eval")
    modality = selected(cfg)["latent"].modality
    streamed, after = sample_metrics.split_sample_metrics(s.metrics, modality)
    for name in streamed + after:
        need = sample_metrics.min_samples(name, cfg.eval, modality)
        in_range("sample.num_samples", s.num_samples, need, why=f"sample.metrics has {name}")


def _validate_eval(e: EvalConfig) -> None:
    """The eval section; its registries are imported on demand (no torch-fidelity or timm import here)."""
    metrics = importlib.import_module("gen.eval.metrics")
    scores = importlib.import_module("gen.eval.scores")
    dinov2 = importlib.import_module("gen.eval.dinov2")
    shapes = importlib.import_module("gen.eval.shapes").SHAPE_METRICS
    unknown = [m for m in e.metrics if m not in metrics.METRICS and m not in shapes]
    check(not unknown, "eval.metrics", f"unknown {unknown}; any of {sorted(metrics.METRICS)} (images) or "
                                       f"{list(shapes)} (3D shapes)")
    check(all(m in shapes for m in e.metrics) or not any(m in shapes for m in e.metrics), "eval.metrics",
          f"{list(e.metrics)} mixes image and 3D shape metrics; evaluate one kind of samples at a time")
    in_range("eval.shape_points", e.shape_points, 1)
    in_range("eval.emd_points", e.emd_points, 1, e.shape_points, why="a subset of eval.shape_points")
    check(e.pr_mode in scores.PR_MODES, "eval.pr_mode", f"one of {', '.join(scores.PR_MODES)}")
    check(e.dinov2_arch in dinov2.DINOV2_ARCHS, "eval.dinov2_arch", f"one of {sorted(dinov2.DINOV2_ARCHS)}")
    in_range("eval.pr_k", e.pr_k, 1)
    in_range("eval.pr_reference_size", e.pr_reference_size, e.pr_k, above=True, why="more images than eval.pr_k")
    in_range("eval.is_split_size", e.is_split_size, 1)
    in_range("eval.batch_per_process", e.batch_per_process, 1)
    in_range("eval.image_size", e.image_size, 1, nullable=True)
    probe = importlib.import_module("gen.eval.probe")
    check(e.probe_encoder in probe.ENCODERS, "eval.probe_encoder", f"one of {', '.join(probe.ENCODERS)}")
    check(e.probe_pool in probe.POOLS, "eval.probe_pool", f"one of {', '.join(probe.POOLS)}")
    in_range("eval.probe_l2", e.probe_l2, 0.0)
    in_range("eval.probe_heldout_fraction", e.probe_heldout_fraction, 0.0, 1.0, above=True, below=True)
    in_range("eval.probe_max_images", e.probe_max_images, 2, nullable=True)


def _validate_align(cfg: Config) -> None:
    """Method names and encoder keys here, each listed method's own section by its Config's `validate`."""
    a = cfg.align
    if not a.methods and not a.encoder_weights:
        return
    aligners = registry("align")
    encoders = importlib.import_module("align.encoders").ENCODERS
    unknown = [m for m in a.methods if m not in aligners]
    check(not unknown and len(set(a.methods)) == len(a.methods), "align.methods",
          f"distinct keys of {sorted(aligners)}, got {a.methods}")
    bad = [k for k in a.encoder_weights if k not in encoders]
    check(not bad, "align.encoder_weights", f"unknown encoder(s) {bad}; one of {sorted(encoders)}; give each as "
          f"align.encoder_weights.NAME=PATH")
    for method in a.methods:
        exclusive = set(aligners[method].EXCLUDES) & set(a.methods)
        check(not exclusive, "align.methods", f"{method} cannot train together with {sorted(exclusive)}; list one")
        component_config(cfg, "align", method).validate(cfg)
