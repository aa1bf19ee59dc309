"""prepare.py end to end, in subprocesses: cache contents, encoder features, resume, multi-process sharding,
refusals."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_job
from latent_helpers import save_tiny_vae
from torch.utils.data import DataLoader
from tqdm import tqdm

import prepare
from align import REPA, AlignBatch, build_encoder
from gen.config import ConfigError, default_config, load_config
from gen.data import (
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    LatentCacheDataset,
    build_dataset,
    features_file,
    labels_file,
    shard_file,
)
from gen.models import build_backbone
from gen.objectives import build_objective
from latents import SDVAE, PixelSpace

REPO = Path(__file__).resolve().parents[2]
SIZE = 16  # digits upsampled to 16 px: 1437 training images, 3 shards of 500
FEAT = "dinov2-vit-s"  # the `assets` random-init DINOv2 ViT-S/14
FEAT_SIZE, FEAT_SHARD = 16, 6  # 16 crops of 16 px, shards of 6, 6, 4; SiT-S/2 grid 8 x 8: the encoder at 112 px


def _config(tmp_path, latent="pixel", vae_path=None):
    lines = ["model: {name: SiT-S/2}", f"data: {{name: digits, image_size: {SIZE}, num_workers: 0}}",
             f"latent: {{name: {latent}" + (f", sd_vae: {{vae_path: {vae_path}}}" if vae_path else "") + "}"]
    path = tmp_path / f"{latent}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cache_config(out, latent, **sd_vae):
    """A run config training from the cache `out` in latent space `latent` (the keys build_dataset reads)."""
    cfg = default_config()
    cfg.data.name, cfg.data.path, cfg.data.image_size, cfg.latent.name = "latent_cache", str(out), SIZE, latent
    for key, value in sd_vae.items():
        setattr(cfg.latent.sd_vae, key, value)
    return cfg


def _feature_config(tmp_path, images, weights):
    lines = ["model: {name: SiT-S/2}", "latent: {name: pixel}",
             (f"data: {{name: image_folder, path: {images}, image_size: {FEAT_SIZE}, num_workers: 0, "
              f"cache_features: [{FEAT}]}}"),
             f"align: {{encoder_weights: {{{FEAT}: {weights}}}}}"]
    path = tmp_path / "features.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_prepare(config, out, *overrides, processes=1, shard_size=500):
    """Run prepare.py (under `accelerate launch` for several processes); returns the CompletedProcess."""
    args = [str(config), *overrides, "--out", str(out), "--shard-size", str(shard_size), "--batch-size", "128"]
    return run_job("prepare.py", args, processes=processes)


def _ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pixel")
    config = _config(tmp)
    _ok(run_prepare(config, tmp / "cache"))
    return config, tmp / "cache"


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory, assets):
    """A pixel cache of the assets' image folder with DINOv2-S features."""
    tmp = tmp_path_factory.mktemp("features")
    _, images, weights = assets
    config = _feature_config(tmp, images, weights)
    _ok(run_prepare(config, tmp / "cache", shard_size=FEAT_SHARD))
    return config, tmp / "cache"


def test_pixel_cache_equals_direct_encoding(pixel_cache):
    _, out = pixel_cache
    assert sorted(p.name for p in out.iterdir()) == [
        "labels-00000.npy", "labels-00001.npy", "labels-00002.npy", "meta.json",
        "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]  # no temporaries or markers left
    cache = LatentCacheDataset(out, expected_raw_shape=(1, SIZE, SIZE))
    digits = DigitsDataset("train", SIZE)
    assert len(cache) == len(digits) == 1437 and cache.num_classes == 10 and cache.meta["latent"]["name"] == "pixel"
    raw = torch.stack([cache[i]["raw"] for i in range(len(cache))])
    assert torch.equal(raw, PixelSpace(1, SIZE).encode_raw(digits.images))
    assert torch.equal(cache.labels, digits.labels)
    # Training reads it through the config, checked against the run's latent space.
    cfg = _cache_config(out, "pixel")
    assert len(build_dataset(cfg)) == 1437


def test_rerun_skips_complete_shards(pixel_cache, tmp_path):
    config, done = pixel_cache
    out = tmp_path / "cache"
    shutil.copytree(done, out)
    # A run killed while encoding shard 1: no shard 1, no meta.json, a stray temporary file.
    (out / shard_file(1)).unlink()
    (out / "meta.json").unlink()
    (out / ".shard-00001.tmp.npy").write_bytes(b"half written")  # gen.io.atomic_write's temporary name
    kept = {k: (out / shard_file(k)).stat().st_mtime_ns for k in (0, 2)}
    result = _ok(run_prepare(config, out))
    assert "skips 2 complete, encodes 1" in result.stdout
    assert {k: (out / shard_file(k)).stat().st_mtime_ns for k in (0, 2)} == kept
    for name in ("meta.json", shard_file(1)):
        assert (out / name).read_bytes() == (done / name).read_bytes()
    assert "already a complete cache" in _ok(run_prepare(config, out)).stdout


@pytest.mark.parametrize("cache, shard_size", [("pixel_cache", 500), ("feature_cache", FEAT_SHARD)])
def test_two_processes_write_the_same_cache(cache, shard_size, request, tmp_path):
    config, one = request.getfixturevalue(cache)
    result = _ok(run_prepare(config, tmp_path / "cache", processes=2, shard_size=shard_size))
    assert "over 2 processes" in result.stdout
    for name in sorted(os.listdir(one)):
        assert (tmp_path / "cache" / name).read_bytes() == (one / name).read_bytes(), name


def test_wrong_caches_are_refused(pixel_cache, tmp_path):
    config, out = pixel_cache
    with pytest.raises(DataError, match=r"\(1, 16, 16\).*needs \(8, 2, 2\).*prepare.py"):
        LatentCacheDataset(out, expected_raw_shape=SDVAE(None, SIZE).raw_shape)
    cfg = _cache_config(out, "sd-vae", vae_path="unused")
    with pytest.raises(DataError, match="prepare.py"):
        build_dataset(cfg)
    # prepare.py itself refuses to mix a different cache into an existing folder.
    result = run_prepare(config, out, "data.image_size=8")
    assert result.returncode != 0 and "describes a different cache" in result.stderr
    assert "Traceback" not in result.stderr


def test_vae_cache_equals_direct_encoding(tmp_path):
    vae = save_tiny_vae(tmp_path / "tiny-vae")
    out = tmp_path / "cache"
    _ok(run_prepare(_config(tmp_path, "sd-vae", vae), out))
    cache = LatentCacheDataset(out, expected_raw_shape=(8, SIZE // 8, SIZE // 8))
    assert cache.meta["latent"] == {"name": "sd-vae", "vae_path": str(vae), "image_size": SIZE, "scale": 0.18215}
    digits = DigitsDataset("train", SIZE)
    some = list(range(0, len(digits), 7))  # every shard, in order, at a fraction of the encoding time
    direct = SDVAE(vae, SIZE).encode_raw(digits.images[some])
    raw = torch.stack([cache[i]["raw"] for i in some])
    torch.testing.assert_close(raw, direct, atol=1e-5, rtol=1e-5)
    assert np.array_equal(cache.labels.numpy(), digits.labels.numpy())


def test_missing_vae_writes_nothing(tmp_path):
    out = tmp_path / "cache"
    result = run_prepare(_config(tmp_path, "sd-vae", tmp_path / "no-vae"), out)
    assert result.returncode != 0
    assert "latent.sd_vae.vae_path" in result.stderr and str(tmp_path / "no-vae") in result.stderr
    assert "stabilityai/sd-vae-ft-ema" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------ encoder features


def test_feature_cache_equals_direct_encoding(feature_cache, assets):
    _, out = feature_cache
    _, images, weights = assets
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [f(k) for k in range(3) for f in (shard_file, labels_file, lambda k: features_file(FEAT, k))])
    cache = LatentCacheDataset(out, expected_raw_shape=(3, FEAT_SIZE, FEAT_SIZE))
    assert cache.meta["features"] == {FEAT: {"shape": [64, 384], "dtype": "float16", "computed_in": "float32",
                                             "encoder": "vit_small_patch14_dinov2", "weights": str(weights)}}
    assert cache.feature_names == (FEAT,) and cache.feature_shapes == {FEAT: (64, 384)}
    folder = ImageFolderDataset(images, FEAT_SIZE)
    pixels = torch.stack([folder[i]["image"] for i in range(len(folder))])
    direct = build_encoder(FEAT, weights, FEAT_SIZE, 8)(pixels)  # on the backbone's 8 x 8 grid
    items = [cache[i] for i in range(len(cache))]
    cached = torch.stack([item["feats"][FEAT] for item in items])
    assert cached.dtype == torch.float32 and cached.shape == (16, 64, 384)
    torch.testing.assert_close(cached, direct, rtol=1e-3, atol=1e-4)  # float16 storage
    assert torch.equal(torch.stack([item["raw"] for item in items]), PixelSpace(3, FEAT_SIZE).encode_raw(pixels))


def test_resume_re_encodes_a_shard_with_bad_features(feature_cache, tmp_path):
    config, done = feature_cache
    out = tmp_path / "cache"
    shutil.copytree(done, out)
    # Shard 1's latents are whole but its features are not what was asked for (float32): the shard is redone.
    np.save(out / features_file(FEAT, 1), np.zeros((FEAT_SHARD, 64, 384), np.float32))
    (out / "meta.json").unlink()
    kept = {name: (out / name).stat().st_mtime_ns for k in (0, 2) for name in (shard_file(k), features_file(FEAT, k))}
    result = _ok(run_prepare(config, out, shard_size=FEAT_SHARD))
    assert "skips 2 complete, encodes 1" in result.stdout and "dinov2-vit-s features (64, 384)" in result.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    for name in ("meta.json", shard_file(1), features_file(FEAT, 1)):
        assert (out / name).read_bytes() == (done / name).read_bytes(), name


def test_feature_requests_are_checked_before_writing(feature_cache, tmp_path, fresh_accelerate):
    config, out = feature_cache
    # The same folder without features (or with others) is a different cache.
    meta = LatentCacheDataset(out).meta
    with pytest.raises(DataError, match=r"differs in \['features'\]"):
        prepare.check_out(out, {k: v for k, v in meta.items() if k != "features"})
    # Missing encoder weights fail before anything is written.
    with pytest.raises(SystemExit, match="^error: .*align.encoder_weights.dinov2-vit-s"):
        prepare.main([str(config), f"align.encoder_weights.{FEAT}={tmp_path / 'none'}", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    # Unknown encoders are refused; the encoders run on the backbone's grid (16 px / patch 4 = 4 x 4).
    with pytest.raises(ConfigError, match="data.cache_features"):
        prepare.build_encoders(load_config(config, ["data.cache_features=[dinov2-vit-s,nope]"]), None, "cpu")
    encoders = prepare.build_encoders(load_config(config, ["model.name=SiT-S/4"]), PixelSpace(3, FEAT_SIZE), "cpu")
    assert encoders[FEAT].grid == (4, 4) and encoders[FEAT].input_size == (56, 56)


class _StubEncoder:
    """Records the pixels it is given; returns constant tokens."""

    num_tokens, dim = 4, 2

    def __init__(self, value):
        self.value, self.seen = value, []

    def __call__(self, pixels):
        self.seen.append(pixels)
        return torch.full((len(pixels), 4, 2), self.value)


def test_encode_shard_feeds_rgb_and_refuses_float16_overflow():
    digits, latent, bar = DigitsDataset("train", 8), PixelSpace(1, 8), tqdm(disable=True)
    stub = _StubEncoder(1 / 3)
    raw, labels, feats = prepare.encode_shard(digits, latent, 1, 5, 2, 0, "cpu", bar, {"stub": stub})
    assert raw.shape == (5, 1, 8, 8) and np.array_equal(labels, digits.labels[5:10].numpy())
    seen = torch.cat(stub.seen)  # grayscale digits reach the encoder as uint8 RGB, as in train.py
    assert seen.dtype == torch.uint8 and torch.equal(seen, digits.images[5:10].expand(-1, 3, -1, -1))
    assert feats["stub"].dtype == np.float16 and feats["stub"].shape == (5, 4, 2)
    assert np.all(feats["stub"] == np.float16(1 / 3))
    for value in (7e4, float("nan")):
        with pytest.raises(DataError, match=r"'big'.*shard 1, beyond float16's range.*data.cache_features"):
            prepare.encode_shard(digits, latent, 1, 5, 2, 0, "cpu", bar, {"big": _StubEncoder(value)})


def test_repa_on_cached_features_gives_the_online_loss(feature_cache, assets):
    config, out = feature_cache
    _, images, _ = assets
    cfg = load_config(config, ["align.methods=[repa]", f"align.repa.encoders=[{FEAT}]", "align.repa.depth=2",
                               "align.repa.projector_dim=64", "model.dit.depth=4", "model.dit.hidden_size=32",
                               "model.dit.num_heads=2", "cond.num_classes=2"])
    cache = LatentCacheDataset(out)
    batch = next(iter(DataLoader(cache, batch_size=len(cache), shuffle=True)))  # feats collated: {name: (N, T, d)}
    torch.manual_seed(0)
    model = build_backbone(cfg, (3, FEAT_SIZE, FEAT_SIZE))
    objective = build_objective(cfg, model)
    online = REPA.from_config(cfg, model, objective)  # runs the encoder on the images
    cached = REPA.from_config(cfg, model, objective, cached_targets=cache.feature_names)  # builds no encoder
    assert online.needs_pixels and not cached.needs_pixels
    cached.load_state_dict(online.state_dict())
    folder = ImageFolderDataset(images, FEAT_SIZE)
    pixels = torch.stack([folder[int(i)]["image"] for i in batch["index"]])

    x0, g = batch["raw"], torch.Generator().manual_seed(1)
    t, noise = torch.rand(len(x0), generator=g), torch.randn(x0.shape, generator=g)
    loss = objective.loss(model, x0, batch["label"], taps=online.taps, t=t, noise=noise)
    from_images = online(loss.feats, AlignBatch.from_loss(loss, x0, 0, pixels=pixels))["loss"]
    from_cache = cached(loss.feats, AlignBatch.from_loss(loss, x0, 0, target_feats=batch["feats"]))["loss"]
    assert from_cache.shape == (16,)
    torch.testing.assert_close(from_cache, from_images, rtol=0, atol=1e-4)
