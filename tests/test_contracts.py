"""The core contracts (docs/architecture.md) through the jobs' own code.

Every compatible (backbone family, objective, latent space) combination trains two steps, checkpoints, resumes
bitwise and samples through train.py and sample.py; every incompatible pairing is refused at config load naming
both. A toy aligner, a toy latent space (token sets: one token per image row) and a toy backbone family (a
per-token MLP on sets) are defined here, each with its own config dataclass, registered with one line, and run
through train.py without any edit under gen/.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
from helpers import REPO
from latent_helpers import TINY_BAE, save_tiny_bae, save_tiny_vae
from safetensors.torch import load_file
from torch import Tensor, nn

import sample as sample_job
import train as train_job
from align import ALIGNERS
from gen.aligner import Aligner, WeightSchedule
from gen.cond import as_cond
from gen.config import ComponentConfig, ConfigError, check, load_config
from gen.layers import LabelEmbedder, TimestepEmbedder
from gen.models import FAMILIES
from gen.models.base import Backbone, BackboneOutput
from gen.objectives import OBJECTIVES, FlowObjective
from latents import LATENTS, LatentSpace, to_uint8

pytestmark = pytest.mark.usefixtures("fresh_accelerate", "one_thread")


# ---------------------------------------------------------------------------------------------------
# A toy latent space: each image row is one token of a set (layout "set", no grid).


@dataclass
class RowsConfig(ComponentConfig):
    """Image rows as a token set (a test's toy latent space)."""

    gain: float = 1.0
    """Scale of the [-1, 1] pixel values the model sees."""

    def validate(self, cfg) -> None:
        check(self.gain > 0, "latent.rows.gain", "must be positive")


class RowSpace(LatentSpace):
    """Grey images (1, S, S) as S tokens of S values; its normalisation `gain` is state saved in checkpoints."""

    name = "rows"
    Config = RowsConfig
    layout = "set"

    def __init__(self, size: int, gain: float):
        self.size, self.gain = size, float(gain)
        self.shape = self.raw_shape = (size, size)

    @classmethod
    def from_config(cls, cfg) -> RowSpace:
        return cls(cfg.data.image_size, cfg.latent.rows.gain)

    def encode_raw(self, images: Tensor) -> Tensor:
        return images.float().mean(dim=1) / 127.5 - 1.0  # (N, S, S)

    def to_model(self, raw: Tensor, generator=None) -> Tensor:
        return raw * self.gain

    def decode(self, z: Tensor, rounding: str = "round") -> Tensor:
        return to_uint8(z[:, None] / self.gain, rounding).expand(-1, 3, -1, -1).contiguous()

    def settings(self) -> dict:
        return {"size": self.size}

    def state_dict(self) -> dict:
        return {"gain": self.gain}

    def load_state_dict(self, state: dict) -> None:
        RESTORED.append(dict(state))
        super().load_state_dict(state)


RESTORED: list[dict] = []  # every state RowSpace.load_state_dict received


# ---------------------------------------------------------------------------------------------------
# A toy backbone family: a per-token residual MLP over sets (no positions, so permutation equivariant).


@dataclass
class TokenMLPConfig(ComponentConfig):
    """Per-token MLP on token sets (a test's toy backbone family)."""

    width: int = 16
    """Token width D."""
    depth: Optional[int] = None
    """Blocks; null: 3."""

    def validate(self, cfg) -> None:
        check(self.width > 0, "model.token_mlp.width", "must be positive")


class TokenMLP(Backbone):
    KEY = "token_mlp"
    Config = TokenMLPConfig
    LAYOUTS = ("set",)
    MODELS = {}

    def __init__(self, sample_shape, width: int, depth: int, num_classes: int):
        super().__init__()
        n, d = sample_shape
        self.sample_shape, self.num_blocks, self.token_grid = tuple(sample_shape), depth, None
        self.null_class, self.width = num_classes, width
        self.embed, self.out = nn.Linear(d, width), nn.Linear(width, d)
        self.t_embedder, self.y_embedder = TimestepEmbedder(width), LabelEmbedder(num_classes, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU())
                                    for _ in range(depth))

    @classmethod
    def from_config(cls, cfg, sample_shape):
        o = cfg.model.token_mlp
        return cls(sample_shape, o.width, o.depth or 3, cfg.cond.num_classes)

    @classmethod
    def config_blocks(cls, cfg) -> int:
        return cfg.model.token_mlp.depth or 3

    def token_width(self, block: int) -> int:
        return self.width

    def warm_parameters(self, blocks: int) -> tuple[str, ...]:
        return ("embed.", "t_embedder.", "y_embedder.", *(f"blocks.{i}." for i in range(blocks)))

    def forward(self, x, t, cond, *, taps=(), stop_at=None) -> BackboneOutput:
        taps = frozenset(taps)
        last = self.check_taps(taps, stop_at)
        c = (self.t_embedder(t) + self.y_embedder(as_cond(cond).labels))[:, None]
        h, feats = self.embed(x) + c, {}
        for k, block in enumerate(self.blocks[:last], start=1):
            h = h + block(h + c)
            if k in taps:
                feats[k] = h
        return BackboneOutput(None if stop_at is not None else self.out(h), feats)


TokenMLP.MODELS = {"TokenMLP": TokenMLP}


# ---------------------------------------------------------------------------------------------------
# A toy aligner: pulls a projection of the student's tokens after one block towards the clean input's mean.


@dataclass
class MeanMatchConfig(ComponentConfig):
    """Projected student tokens regressed onto the clean sample's mean value (a test's toy aligner)."""

    layer: int = 1
    """Student block read (1-based)."""
    coeff: float = 0.3
    """Loss weight."""

    def validate(self, cfg) -> None:
        check(self.layer >= 1, "align.mean_match.layer", "must be >= 1")


class MeanMatch(Aligner):
    KEY = "mean_match"
    Config = MeanMatchConfig

    def __init__(self, width: int, layer: int, coeff: float):
        super().__init__(WeightSchedule(coeff))
        self.taps, self.head = (layer,), nn.Linear(width, 1)

    @classmethod
    def from_config(cls, cfg, model, objective, *, cached_targets=()):
        a = cfg.align.mean_match
        return cls(model.token_width(a.layer), a.layer, a.coeff)

    def forward(self, feats, batch):
        pred = self.head(feats[self.taps[0]]).mean(dim=(1, 2))  # (N,)
        target = batch.x0.reshape(len(pred), -1).mean(dim=1)
        return {"loss": (pred.float() - target.float()) ** 2}


# ---------------------------------------------------------------------------------------------------
# A toy objective with a frozen part: flow matching whose regression target goes through a frozen linear map.


@dataclass
class FrozenTargetConfig(ComponentConfig):
    """Flow matching with a frozen per-value linear map on the velocity target (a test's toy objective)."""

    gain: float = 0.5
    """Weight of the frozen map."""


class FrozenTargetFlow(FlowObjective):
    """Holds a frozen module (weights loaded by `load_weights`): never in the optimizer, the EMA or checkpoints."""

    KEY = "frozen_target"
    Config = FrozenTargetConfig

    def __init__(self, gain: float, **kwargs):
        super().__init__(**kwargs)
        self.target_map = nn.Linear(1, 1).requires_grad_(False)
        self.gain, self.loaded = gain, False

    @classmethod
    def from_config(cls, cfg, model):
        return cls(cfg.objective.frozen_target.gain, label_dropout=cfg.cond.label_dropout,
                   null_class=model.null_class)

    def load_weights(self, device="cpu"):
        with torch.no_grad():
            self.target_map.weight.fill_(self.gain)
            self.target_map.bias.zero_()
        self.target_map.to(device)
        self.loaded = True
        return self

    def compute_loss(self, model, x0, cond, *, taps, t, noise):
        assert self.loaded, "the jobs call load_weights before training"
        out = super().compute_loss(model, x0, cond, taps=taps, t=t, noise=noise)
        mapped = self.target_map(x0.reshape(-1, 1)).reshape(x0.shape)
        return replace(out, loss=out.loss + (mapped.reshape(len(x0), -1).mean(dim=1) ** 2))


@pytest.fixture
def toys(monkeypatch):
    """Register the toy latent space, backbone family, aligner and objective: one line each."""
    monkeypatch.setitem(LATENTS, "rows", RowSpace)
    monkeypatch.setitem(FAMILIES, "token_mlp", TokenMLP)
    monkeypatch.setitem(ALIGNERS, "mean_match", MeanMatch)
    monkeypatch.setitem(OBJECTIVES, "frozen_target", FrozenTargetFlow)


# ---------------------------------------------------------------------------------------------------

BASE = ["data.name=digits", "data.image_size=16", "data.num_workers=0", "cond.num_classes=10",
        "train.global_batch_size=8", "train.lr=1e-3", "train.ema_decay=0.9", "train.ckpt_every_steps=1",
        "train.keep_checkpoints=0", "log.tracker=none", "log.every_steps=1", "log.preview_every_steps=0",
        "sampler.num_steps=2", "sampler.cfg_scale=1.5", "train.seed=3"]
TINY_DIT = ["model.dit.depth=2", "model.dit.hidden_size=16", "model.dit.num_heads=2"]
OBJECTIVE_SETTINGS = {"flow": ["objective.name=flow", "sampler.sampler=euler"],
                      "ddpm": ["objective.name=ddpm", "objective.ddpm.num_timesteps=20", "sampler.sampler=ddpm"],
                      "bernoulli": ["objective.name=bernoulli", "objective.bernoulli.num_timesteps=8",
                                    "sampler.sampler=ancestral"],
                      "masked_tokens": ["objective.name=masked_tokens", "sampler.sampler=maskgit"],
                      "addp": ["objective.name=addp", "objective.addp.predictor=oracle", "sampler.sampler=alternating",
                               "sampler.cfg_scale=1.0"]}
LATENT_SETTINGS = {"pixel": ["latent.name=pixel"], "sd-vae": ["latent.name=sd-vae"], "rows": ["latent.name=rows"],
                   "binary": ["latent.name=binary", *TINY_BAE],
                   "vq": ["latent.name=vq", "latent.vq.quantizer=palette", "latent.vq.codebook_size=8",
                          "latent.vq.code_dim=3", "latent.vq.factor=4"]}
FAMILY_SETTINGS = {"dit": ["model.name=SiT-S/2", *TINY_DIT], "token_mlp": ["model.name=TokenMLP"],
                   "mage": ["model.name=MAGE-T"], "addp": ["model.name=ADDP-T", "model.addp.patch_size=4"]}


def combination(family: str, objective: str, latent: str, tmp_path) -> list[str]:
    """The overrides of a combination; weights files are written only for combinations that run."""
    run = compatible(family, objective, latent)
    vae = [f"latent.sd_vae.vae_path={save_tiny_vae(tmp_path / 'vae')}"] if latent == "sd-vae" and run else []
    if latent == "binary" and run:
        vae = [f"latent.binary.weights={save_tiny_bae(tmp_path / 'bae.pt')}"]
    return [*BASE, *FAMILY_SETTINGS[family], *OBJECTIVE_SETTINGS[objective], *LATENT_SETTINGS[latent], *vae]


def compatible(family: str, objective: str, latent: str) -> bool:
    backbones = OBJECTIVES[objective].BACKBONES
    return LATENTS[latent].kind in OBJECTIVES[objective].LATENT_KINDS and \
        LATENTS[latent].layout in FAMILIES[family].LAYOUTS and (backbones is None or family in backbones)


def weights(ckpt) -> dict:
    return {**load_file(str(ckpt / "model.safetensors")),
            **{f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()}}


COMBINATIONS = list(itertools.product(["dit", "token_mlp", "mage", "addp"],
                                      ["ddpm", "flow", "bernoulli", "masked_tokens", "addp"],
                                      ["pixel", "sd-vae", "rows", "binary", "vq"]))


@pytest.mark.parametrize("family,objective,latent", COMBINATIONS, ids=lambda v: v)
def test_every_combination_trains_resumes_and_samples_or_is_refused(toys, tmp_path, family, objective, latent):
    overrides = combination(family, objective, latent, tmp_path)
    if not compatible(family, objective, latent):
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert latent in str(err.value) and any(name in str(err.value)
                                                for name in (objective, "TokenMLP", "SiT-S/2", "MAGE-T", "ADDP-T"))
        return
    straight = train_job.train(load_config(None, [*overrides, f"train.run_dir={tmp_path / 'a'}",
                                                  "train.max_steps=2"]))
    train_job.train(load_config(None, [*overrides, f"train.run_dir={tmp_path / 'b'}", "train.max_steps=1"]))
    resumed = train_job.train(load_config(None, [*overrides, f"train.run_dir={tmp_path / 'b'}",
                                                 "train.max_steps=2"]), resume=True)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], weights(straight.parent / "step-00000001")[k]) for k in a)  # it trained
    assert (straight / "latent_state.pt").is_file()
    out = sample_job.main([str(tmp_path / "a"), "sample.num_samples=3", "sample.batch_per_process=2",
                           "sample.grid_num=3", f"sample.out={tmp_path / 's.npz'}"])
    arrays = __import__("numpy").load(out)
    assert arrays["arr_0"].shape == (3, 16, 16, 3) and arrays["arr_0"].dtype == "uint8"


def test_toy_aligner_trains_through_train_py(toys, tmp_path):
    """A new aligner with its own config section trains through train.py by align.methods alone."""
    overrides = [*combination("token_mlp", "flow", "rows", tmp_path), f"train.run_dir={tmp_path / 'r'}",
                 "train.max_steps=2", "align.methods=[mean_match]", "align.mean_match.layer=2"]
    with pytest.raises(ConfigError, match="align.mean_match.layr"):
        load_config(None, [*overrides, "align.mean_match.layr=2"])
    cfg = load_config(None, overrides)
    assert cfg.align.mean_match.layer == 2 and cfg.align.mean_match.coeff == 0.3
    ckpt = train_job.train(cfg)
    head = [k for k in load_file(str(ckpt / "model.safetensors")) if k.startswith("aligners.mean_match.head")]
    assert head, "the aligner's head is trained and checkpointed with the backbone"
    logs = (tmp_path / "r" / "logs" / "scalars.jsonl").read_text()
    assert '"mean_match"' in logs


def test_toy_objective_with_frozen_parts_trains_through_train_py(toys, tmp_path):
    """A new objective (own config section, one registry line) trains through train.py, samples through sample.py;
    its frozen module is loaded by the jobs and kept out of the optimizer, the EMA and the checkpoint."""
    overrides = [*combination("dit", "flow", "pixel", tmp_path), "objective.name=frozen_target",
                 "objective.frozen_target.gain=0.25", f"train.run_dir={tmp_path / 'o'}", "train.max_steps=2"]
    ckpt = train_job.train(load_config(None, overrides))
    model, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert not any("target_map" in k for k in [*model, *ema])
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == len(model) - 1  # every trained tensor but the frozen pos_embed, nothing else
    out = sample_job.main([str(tmp_path / "o"), "sample.num_samples=2", "sample.grid_num=2",
                           f"sample.out={tmp_path / 'o.npz'}"])
    assert out.is_file()


def test_latent_state_round_trips_through_checkpoints(toys, tmp_path):
    """A latent space's state_dict is saved in every checkpoint and restored on resume and by sample.py."""
    overrides = [*combination("token_mlp", "flow", "rows", tmp_path), f"train.run_dir={tmp_path / 'r'}",
                 "latent.rows.gain=2.0", "train.max_steps=1"]
    ckpt = train_job.train(load_config(None, overrides))
    assert torch.load(ckpt / "latent_state.pt", weights_only=True) == {"gain": 2.0}
    RESTORED.clear()
    train_job.train(load_config(None, [*overrides[:-1], "train.max_steps=2"]), resume=True)
    sample_job.main([str(tmp_path / "r"), "sample.num_samples=2", "sample.grid_num=2",
                     f"sample.out={tmp_path / 'r.npz'}"])
    assert RESTORED == [{"gain": 2.0}, {"gain": 2.0}]


def test_incompatible_pairs_name_both(toys):
    with pytest.raises(ConfigError, match=r"model.name.*SiT-S/2.*rows|model.name.*rows.*SiT-S/2"):
        load_config(None, ["model.name=SiT-S/2", "latent.name=rows"])
    with pytest.raises(ConfigError, match=r"TokenMLP.*pixel"):
        load_config(None, ["model.name=TokenMLP", "latent.name=pixel", "data.name=digits"])

    class TokenIds(RowSpace):
        kind = "tokens"

    with pytest.MonkeyPatch.context() as m:
        m.setitem(LATENTS, "ids", TokenIds)
        with pytest.raises(ConfigError, match=r"objective 'flow'.*continuous.*'ids' \(tokens\)"):
            load_config(None, ["model.name=TokenMLP", "latent.name=ids", "objective.name=flow"])


def test_repa_refuses_a_backbone_without_token_grid(toys, tmp_path):
    overrides = [*combination("token_mlp", "flow", "rows", tmp_path), "align.methods=[repa]",
                 "align.repa.depth=1"]
    cfg = load_config(None, overrides)
    from gen.models import build_backbone
    from gen.objectives import build_objective
    from gen.step import build_aligners

    model = build_backbone(cfg, (16, 16))
    with pytest.raises(ValueError, match="no grid"):
        build_aligners(cfg, model, build_objective(cfg, model))


def test_config_module_imports_no_registry():
    """gen.config imports neither align, gen.eval, gen.models, gen.objectives nor latents at import time."""
    import subprocess
    import sys

    code = ("import sys, gen.config; bad = [m for m in ('align', 'gen.eval', 'gen.models', 'gen.objectives', "
            "'latents') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_per_batch_draws_stay_whole_when_split_over_processes():
    """StepDraws splits per-sample draws across processes and micro-steps and hands per-batch draws over whole."""
    from gen.objectives.flow import FlowObjective
    from gen.step import StepDraws
    from latents import SDVAE

    class RatioFlow(FlowObjective):
        DRAWS = {**FlowObjective.DRAWS, "ratio": "batch"}

        def draw(self, n, sample_shape, generator=None, device=None):
            drawn = super().draw(n, sample_shape, generator, device)
            return {**drawn, "ratio": torch.rand(2, generator=generator, device=device)}

    objective, latent = RatioFlow(null_class=10, label_dropout=0.1), SDVAE(None, 16)
    full = StepDraws.draw(objective, latent, 8, seed=1, step=5, hflip=True, device="cpu")
    assert full.per_batch == {"ratio"} and full.objective["ratio"].shape == (2,)
    again = StepDraws.draw(objective, latent, 8, seed=1, step=5, hflip=True, device="cpu")
    assert all(torch.equal(full.objective[k], again.objective[k]) for k in full.objective)
    parts = [full.micro(micro, rank, world=2, per_process=2) for micro in range(2) for rank in range(2)]
    for part in parts:
        assert torch.equal(part.objective["ratio"], full.objective["ratio"])
    for key in ("t", "noise", "drop"):
        assert torch.equal(torch.cat([p.objective[key] for p in parts]), full.objective[key])
    assert torch.equal(torch.cat([p.latent["noise"] for p in parts]), full.latent["noise"])
    assert torch.equal(torch.cat([p.uniform for p in parts]), full.uniform)
    assert torch.equal(torch.cat([p.flip for p in parts]), full.flip)
