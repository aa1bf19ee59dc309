"""REPA through train.py on SiT (flow) and DiT (DDPM): one student forward, projectors trained and checkpointed."""
import json

import pytest
from helpers import REPO, run_job
from safetensors.torch import load_file

import train as train_job
from gen.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def repa_config(run_dir, assets, model, *extra):
    vae, images, encoder = assets
    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={model}", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
        "cond.num_classes=2",
        "data.name=image_folder", f"data.path={images}", "data.image_size=32", "latent.name=sd-vae",
        f"latent.sd_vae.vae_path={vae}", "train.global_batch_size=8", "train.max_steps=3", "log.tracker=none",
        "log.preview_every_steps=0", "log.every_steps=1", "data.num_workers=0", f"train.run_dir={run_dir}",
        "align.methods=[repa]", "align.repa.encoders=[dinov2-vit-s]",
        f"align.encoder_weights={{dinov2-vit-s: {encoder}}}",
        "align.repa.depth=1", *extra])


@pytest.mark.parametrize("model,objective", [("SiT-S/2", "flow"), ("DiT-S/2", "ddpm")])
def test_repa_trains_on_sit_and_dit(tmp_path, assets, model, objective):
    cfg = repa_config(tmp_path / "run", assets, model, f"objective.name={objective}",
                      "sampler.sampler=" + ("heun" if objective == "flow" else "ddim"))
    ckpt = train_job.train(cfg)
    logs = [json.loads(x) for x in (tmp_path / "run" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert all({"loss", "denoise", "repa"} <= set(rec) for rec in logs)
    assert all(-1.0 <= rec["repa"] <= 1.0 for rec in logs)
    for rec in logs:  # total = denoise + 0.5 * repa, averaged over the same samples
        assert rec["loss"] == pytest.approx(rec["denoise"] + 0.5 * rec["repa"], rel=1e-5, abs=1e-6)
    state = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("aligners.repa.projectors.0.") for k in state)
    assert not any("encoder" in k for k in state)  # frozen encoders never reach a checkpoint
    assert all(not k.startswith("aligners") for k in load_file(str(ckpt / "ema.safetensors")))


def test_repa_from_a_latent_cache_without_features_is_refused(tmp_path, assets):
    vae, images, _ = assets
    result = run_job("prepare.py", ["configs/quickstart.yaml", "data.name=image_folder", f"data.path={images}",
                                    "data.image_size=32", "latent.name=sd-vae", f"latent.sd_vae.vae_path={vae}",
                                    "--out", tmp_path / "cache"])
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = repa_config(tmp_path / "run", assets, "SiT-S/2", "data.name=latent_cache", f"data.path={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match="align.methods.*does not hold.*data.cache_features"):
        train_job.train(cfg)
    assert not (tmp_path / "run").exists()


def test_repa_from_cached_features_runs_no_encoder_and_matches_online(tmp_path, assets):
    """prepare.py data.cache_features=[...] then train: the encoder is never built, and the losses equal online REPA's
    up to the features' fp16 storage."""
    vae, images, encoder = assets
    result = run_job("prepare.py", ["configs/quickstart.yaml", "model.name=SiT-S/2", "data.name=image_folder",
                                    f"data.path={images}", "data.image_size=32", "latent.name=sd-vae",
                                    f"latent.sd_vae.vae_path={vae}", "data.cache_features=[dinov2-vit-s]",
                                    f"align.encoder_weights={{dinov2-vit-s: {encoder}}}", "--out", tmp_path / "cache"])
    assert result.returncode == 0, result.stderr[-2000:]
    online = repa_config(tmp_path / "online", assets, "SiT-S/2", "data.hflip=false")
    cached = repa_config(tmp_path / "cached", assets, "SiT-S/2", "data.hflip=false", "data.name=latent_cache",
                         f"data.path={tmp_path / 'cache'}", "align.encoder_weights={dinov2-vit-s: /nonexistent.pth}")
    train_job.train(online)
    train_job.train(cached)  # would fail on the missing encoder file if it built the encoder
    logs = {run: [json.loads(x) for x in (tmp_path / run / "logs" / "scalars.jsonl").read_text().splitlines()]
            for run in ("online", "cached")}
    for a, b in zip(logs["online"], logs["cached"], strict=True):
        assert b["repa"] == pytest.approx(a["repa"], rel=1e-3, abs=1e-4)
        assert b["denoise"] == pytest.approx(a["denoise"], rel=1e-3)
