"""prepare.py end to end, in subprocesses: cache contents, resume, multi-process sharding, refusals."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_job
from latent_helpers import save_tiny_vae

from gen.config import Config, DataConfig, LatentConfig
from gen.data import DataError, DigitsDataset, LatentCacheDataset, build_dataset, shard_file
from latents import SDVAE, PixelSpace

REPO = Path(__file__).resolve().parents[2]
SIZE = 16  # digits upsampled to 16 px: 1437 training images, 3 shards of 500


def _config(tmp_path, latent="pixel", vae_path=None):
    lines = ["model: {name: SiT-S/2}", f"data: {{name: digits, image_size: {SIZE}, num_workers: 0}}",
             f"latent: {{name: {latent}" + (f", vae_path: {vae_path}" if vae_path else "") + "}"]
    path = tmp_path / f"{latent}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_prepare(config, out, *overrides, processes=1):
    """Run prepare.py (under `accelerate launch` for several processes); returns the CompletedProcess."""
    args = [str(config), *overrides, "--out", str(out), "--shard-size", "500", "--batch-size", "128"]
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
    cfg = Config(data=DataConfig(name="latent_cache", path=str(out), image_size=SIZE), latent=LatentConfig(name="pixel"))
    assert len(build_dataset(cfg)) == 1437


def test_rerun_skips_complete_shards(pixel_cache, tmp_path):
    config, done = pixel_cache
    out = tmp_path / "cache"
    shutil.copytree(done, out)
    # A run killed while encoding shard 1: no shard 1, no meta.json, a stray temporary file.
    (out / shard_file(1)).unlink()
    (out / "meta.json").unlink()
    (out / "shard-00001.npy.tmp").write_bytes(b"half written")
    kept = {k: (out / shard_file(k)).stat().st_mtime_ns for k in (0, 2)}
    result = _ok(run_prepare(config, out))
    assert "skips 2 complete, encodes 1" in result.stdout
    assert {k: (out / shard_file(k)).stat().st_mtime_ns for k in (0, 2)} == kept
    for name in ("meta.json", shard_file(1)):
        assert (out / name).read_bytes() == (done / name).read_bytes()
    assert "already a complete cache" in _ok(run_prepare(config, out)).stdout


def test_two_processes_write_the_same_cache(pixel_cache, tmp_path):
    config, one = pixel_cache
    result = _ok(run_prepare(config, tmp_path / "cache", processes=2))
    assert "over 2 processes" in result.stdout
    for name in sorted(os.listdir(one)):
        assert (tmp_path / "cache" / name).read_bytes() == (one / name).read_bytes(), name


def test_wrong_caches_are_refused(pixel_cache, tmp_path):
    config, out = pixel_cache
    with pytest.raises(DataError, match=r"\(1, 16, 16\).*needs \(8, 2, 2\).*prepare.py"):
        LatentCacheDataset(out, expected_raw_shape=SDVAE(None, SIZE).raw_shape)
    cfg = Config(data=DataConfig(name="latent_cache", path=str(out), image_size=SIZE),
                 latent=LatentConfig(name="sd-vae", vae_path="unused"))
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
    assert "latent.vae_path" in result.stderr and str(tmp_path / "no-vae") in result.stderr
    assert "stabilityai/sd-vae-ft-ema" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
