"""Every shipped YAML builds at tiny size and takes a training step; config errors name the key and the fix."""
from pathlib import Path

import pytest
import torch
from helpers import REPO

from align.encoders import ENCODERS
from gen.cond import Cond
from gen.config import ConfigError, default_config, describe, field_docs, load_config
from gen.ema import EMA
from gen.models import build_backbone
from gen.objectives import build_objective
from gen.step import StepDraws, Trainee, build_aligners
from latents import build_latent

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SHRINK = ["model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2", "model.set_transformer.depth=2",
          "model.set_transformer.hidden_size=32", "model.set_transformer.num_heads=2",
          "objective.addp.predictor=oracle",  # ADDP's frozen predictor: the test double instead of a weights file
          "latent.vq.quantizer=palette",  # and the palette instead of the VQGAN checkpoint
          "model.addp.depth=2", "model.addp.hidden_size=32", "model.addp.num_heads=2", "model.addp.decoder_depth=1",
          "model.addp.decoder_num_heads=2"]
# Aligner layers that fit the 2 shrunk blocks, per method a config trains with.
SHRINK_ALIGN = {"repa": ["align.repa.depth=1"], "sra": ["align.sra.student_layer=1", "align.sra.teacher_layer=2"],
                "erw": ["align.erw.depth=2", "align.erw.warm_depth=1"]}


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "sit_b2.yaml", "sit_xl2.yaml", "dit_xl2.yaml",
                                         "quickstart_sra.yaml", "sit_b2_repa.yaml", "sit_xl2_repa.yaml",
                                         "sit_xl2_sra.yaml", "sit_xl2_erw.yaml", "dit_xl2_repa.yaml",
                                         "dit_xl2_sra.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_builds_tiny_and_steps(path: Path):
    """Backbone, objective and aligners (encoder targets as if cached) of every config; a step of every phase."""
    shrink_align = [o for m in load_config(path).align.methods for o in SHRINK_ALIGN[m]]
    cfg = load_config(path, SHRINK + shrink_align)
    latent = build_latent(cfg)
    model = build_backbone(cfg, latent.shape)
    objective = build_objective(cfg, model).load_weights()
    assert cfg.sampler.sampler in objective.SAMPLERS
    ema = EMA(model, cfg.train.ema_decay)
    tokens = model.token_grid[0] * model.token_grid[1] if model.token_grid else latent.shape[0]  # token sets: rows
    cached = {name: (tokens, spec.dim) for name, spec in ENCODERS.items()}  # every target as if prepare.py cached it
    trainee = Trainee(model, objective, build_aligners(cfg, model, objective, cached_targets=cached),
                      teacher=ema.model)
    assert not trainee.needs_pixels
    targets = {name for aligner in trainee.aligners.values() for name in aligner.target_encoders()}
    feats = {name: torch.randn(2, tokens, ENCODERS[name].dim) for name in targets}
    x0 = torch.zeros(2, *latent.shape, dtype=torch.long) if latent.kind == "tokens" else torch.randn(2, *latent.shape)
    for phase in sorted({trainee.phase_at(0), "full"}):
        trainee.set_phase(phase)
        draws = StepDraws(objective={}, latent={}, uniform=torch.rand(2))
        text = torch.randn(2, cfg.cond.text_tokens, cfg.cond.text_dim) if cfg.cond.text_dim else None
        loss, terms = trainee(x0, Cond(torch.tensor([0, 1]), text), 0, draws, target_feats=feats)
        loss.mean().backward()
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        assert set(cfg.align.methods) <= {k.split("/")[0] for k in terms}


def test_paper_recipes_follow_the_spec_table():
    for name in ("sit_b2.yaml", "sit_xl2.yaml", "dit_xl2.yaml"):
        t = load_config(REPO / "configs" / name).train
        assert (t.lr, t.global_batch_size, t.ema_decay, t.weight_decay, tuple(t.betas)) == (
            1e-4, 256, 0.9999, 0.0, (0.9, 0.999))
        assert t.max_steps == 400_000 and t.ckpt_every_steps == 50_000
    assert load_config(REPO / "configs" / "dit_xl2.yaml").objective.name == "ddpm"
    for name, depth in (("sit_b2_repa.yaml", 4), ("sit_xl2_repa.yaml", 8), ("dit_xl2_repa.yaml", 8)):
        # REPA README / train.py: DINOv2-B, lambda 0.5, clip 1.0; depth per size
        cfg = load_config(REPO / "configs" / name)
        assert (cfg.align.methods, cfg.align.repa.encoders, cfg.align.repa.coeff, cfg.align.repa.depth,
                cfg.train.grad_clip, cfg.data.cache_features) == (["repa"], ["dinov2-vit-b"], 0.5, depth, 1.0,
                                                                  ["dinov2-vit-b"])
    erw = load_config(REPO / "configs" / "sit_xl2_erw.yaml")  # the ERW paper and the ERW README command
    a = erw.align
    assert (a.erw.warmup_steps, erw.train.max_steps, a.erw.warm_depth, a.erw.depth, a.erw.coeff,
            a.erw.half_life_steps, erw.model.dit.rope) == (100_000, 300_000, 4, 14, 6.0, 50_000, True)


def test_addp_recipes_follow_the_reference_scripts():
    """ChangyaoTian/ADDP configs/release/{base,large}: batch 4096, lr 1e-4 * 4096 / 256, AdamW (0.9, 0.95), weight
    decay 0.05, clip 3.0, dropout 0.1, 1600 / 800 epochs; MAGE's VQGAN and predictor from local files."""
    for size, steps in (("B", 500_456), ("L", 250_228)):
        path = REPO / "configs" / f"addp_vit{size.lower()}_imagenet256.yaml"
        cfg, t = load_config(path), load_config(path).train
        assert (t.global_batch_size, t.lr, tuple(t.betas), t.weight_decay, t.grad_clip, t.max_steps) == (
            4096, 1e-4 * 4096 / 256, (0.9, 0.95), 0.05, 3.0, steps)
        assert (cfg.model.name, cfg.model.addp.dropout, cfg.objective.addp.predictor_model) == (
            f"ADDP-{size}", 0.1, f"MAGE-{size}")
        assert cfg.latent.vq.weights.endswith("vqgan_jax_strongaug.ckpt")
        assert cfg.objective.addp.predictor_weights.endswith(f"mage-vit{size.lower()}-1600.pth")
        assert ("FID 8.9" if size == "B" else "FID 7.6") in path.read_text()


def test_dit_sra_recipe_is_the_reference_dit_sra():
    """vvvvvjdy/SRA DiT-SRA (train.py, README 5.2): 8 -> 16, t_max 0.2, smooth-L1, clip 1.0, fp16, and the weight
    0.4 * 0.1^(1 + max(0, e - 149) / 1000) at epoch e = step // 5004, here by step (within 0.23%)."""
    from align.sra import SRA

    path = REPO / "configs" / "dit_xl2_sra.yaml"
    cfg = load_config(path)
    a, t = cfg.align.sra, cfg.train
    assert (cfg.align.methods, a.student_layer, a.teacher_layer, a.t_max, a.loss) == (["sra"], 8, 16, 0.2, "smooth_l1")
    assert (t.grad_clip, t.mixed_precision, t.lr, t.global_batch_size, t.ema_decay, cfg.cond.label_dropout) == (
        1.0, "fp16", 1e-4, 256, 0.9999, 0.1)
    assert (cfg.objective.name, cfg.sampler.sampler, cfg.sampler.num_steps, cfg.sampler.cfg_scale) == (
        "ddpm", "ddpm", 250, 1.0)
    tiny = load_config(path, SHRINK + SHRINK_ALIGN["sra"])
    model = build_backbone(tiny, build_latent(tiny).shape)
    sra = SRA.from_config(tiny, model, build_objective(tiny, model))

    def reference(step):
        epoch = step // 5004
        return 0.4 * 0.1 ** ((epoch - 149) / 1000 + 1) if epoch > 149 else 0.4 * 0.1

    for step in (0, 400_000, 745_595, 745_596, 750_600, 1_000_000, 2_251_950, 4_000_000, 5_749_596):
        assert sra.weight(step) == pytest.approx(reference(step), rel=0.0024), step
    assert sra.weight(745_596) == 0.04 and sra.weight(745_596 + 1_506_354) == pytest.approx(0.02, rel=1e-12)
    with pytest.raises(ConfigError, match="align.sra.half_life_steps"):
        load_config(path, ["align.sra.half_life_steps=null"])


def test_unknown_keys_suggest_the_closest(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'train.lrr' in the command line; did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  cfg_scal: 1.5\n")
    with pytest.raises(ConfigError, match=rf"'sampler.cfg_scal' in {bad}; did you mean 'sampler.cfg_scale'"):
        load_config(bad)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="sampler.sampler.*ddpm"):
        load_config(None, ["objective.name=ddpm", "sampler.sampler=heun"])
    with pytest.raises(ConfigError, match="model.name.*SiT-XL/2"):
        load_config(None, ["model.name=SiT-XL2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="data.hflip.*unflipped"):  # it used to be ignored silently
        load_config(None, ["data.name=latent_cache", "data.hflip=true"])


def test_every_field_has_a_docstring():
    """Every key of the composed schema (run-level sections and every component's own section) is documented."""
    import dataclasses

    def check(node, where):
        cls = type(node)
        docs = field_docs(cls)
        assert set(docs) <= {f.name for f in dataclasses.fields(cls)}, cls.__name__  # no doc of a removed key
        for f in dataclasses.fields(cls):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):  # a component's sub-section: its class docstring describes it
                assert docs.get(f.name) or (type(value).__doc__ or "").strip(), f"{where}{f.name}"
                check(value, f"{where}{f.name}.")
            else:
                assert f.name in docs, f"{where}{f.name} ({cls.__name__})"

    check(default_config(), "")
    assert "train.global_batch_size=256" in describe()


def test_base_files_are_merged_first_and_checked(tmp_path):
    """`base: other.yaml` (relative to the file) is loaded first; the file, then the command line, override it."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("train:\n  lr: 1.0e-3\n  max_steps: 7\nlog:\n  every_steps: 5\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ntrain:\n  lr: 2.0e-3\n")
    (tmp_path / "sub" / "c.yaml").write_text("base: b.yaml\nlog:\n  every_steps: 9\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["train.max_steps=11"])
    assert (cfg.train.lr, cfg.log.every_steps, cfg.train.max_steps) == (2e-3, 9, 11)
    (tmp_path / "a.yaml").write_text("base: sub/c.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "sub" / "c.yaml")
    (tmp_path / "sub" / "b.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml does not exist \(the base of .*b.yaml\)"):
        load_config(tmp_path / "sub" / "c.yaml")
    (tmp_path / "sub" / "b.yaml").write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"'train.lrr' in .*b.yaml"):
        load_config(tmp_path / "sub" / "c.yaml")


def test_derived_recipes_change_only_what_their_method_needs():
    """The alignment recipes sit on the baselines through `base:`; the backbone and objective stay the baseline's."""
    pairs = {"sit_xl2_repa": "sit_xl2", "sit_b2_repa": "sit_b2", "dit_xl2_repa": "dit_xl2", "sit_xl2_sra": "sit_xl2",
             "dit_xl2_sra": "dit_xl2", "quickstart_sra": "quickstart"}
    for derived, base in pairs.items():
        a, b = (load_config(REPO / "configs" / f"{n}.yaml") for n in (derived, base))
        assert (a.model, a.cond, a.objective, a.latent, a.train.lr, a.train.global_batch_size) == (
            b.model, b.cond, b.objective, b.latent, b.train.lr, b.train.global_batch_size), derived
