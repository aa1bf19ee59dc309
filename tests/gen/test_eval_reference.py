"""Reference batches and the streaming suite: ADM-layout .npz round trip, image sources, statistics computed from
arr_0 and cached, --make-reference files, and FD growing with noise on real offline images.

A small fixed random-conv feature map stands in for Inception here (the Inception tests use the real loader):
it keeps N well above the feature width on real photos without 2048-d covariances (N < d: singular
covariance, bioinf-jku/TTUR issue #4).
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from gen.config import EvalConfig
from gen.data import DataError
from gen.eval.collective import Collective
from gen.eval.frechet import GaussianStats
from gen.eval.metrics import MetricSuite
from gen.eval.reference import NpzImages, make_reference, open_images, read_stats, resolve_reference, write_stats


class ConvFeatures(torch.nn.Module):
    """Fixed random 3x3 conv + ReLU, pooled to small pool_3 / spatial / logits features."""

    sha256 = "stand-in"

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(16, 3, 3, 3, generator=g) / 4)
        self.register_buffer("head", torch.randn(32, 10, generator=g))
        self.dims = {"pool_3": 32, "spatial": 16, "logits": 10}
        self.calls = 0

    def describe(self):
        return {"network": "random conv stand-in", "sha256": self.sha256}

    def forward(self, images):
        self.calls += len(images)
        h = F.relu(F.conv2d(images.float() / 127.5 - 1, self.w))  # (N, 16, H - 2, W - 2)
        pool = torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)  # (N, 32)
        spatial = F.adaptive_avg_pool2d(h[:, :4], 2).flatten(1)  # (N, 16)
        return {"pool_3": pool, "spatial": spatial, "logits": pool @ self.head}


def photo_patches(size=32, stride=24):
    """All size x size crops on a stride grid of scikit-learn's china.jpg and flower.jpg, uint8 (N, 3, size, size)."""
    crops = [img[y:y + size, x:x + size] for img in load_sample_images().images
             for y in range(0, img.shape[0] - size, stride) for x in range(0, img.shape[1] - size, stride)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def to_nhwc(images):
    return images.permute(0, 2, 3, 1).numpy()


def test_stats_npz_round_trip_is_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    stats = {}
    for feature, d in (("pool_3", 6), ("spatial", 5), ("dinov2", 4)):
        x = rng.standard_normal((50, d))
        stats[feature] = (x.mean(0), np.cov(x, rowvar=False))
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    path = write_stats(tmp_path / "ref.npz", stats, images)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "mu", "mu_dinov2", "mu_s", "sigma", "sigma_dinov2", "sigma_s"]
    back, has_images = read_stats(path)
    assert has_images
    for feature, (mu, sigma) in stats.items():
        assert back[feature][0].dtype == back[feature][1].dtype == np.float64
        assert np.array_equal(back[feature][0], mu) and np.array_equal(back[feature][1], sigma)
    # Images read by slices: memory-mapped (np.savez stores uncompressed) and through a compressed archive.
    np.savez_compressed(tmp_path / "zipped.npz", arr_0=images)
    for source in (NpzImages(path), NpzImages(tmp_path / "zipped.npz")):
        assert len(source) == 7
        assert np.array_equal(source.read(range(2, 5)), images[2:5])
        assert np.array_equal(source.read(np.array([0, 3, 6])), images[[0, 3, 6]])
    assert not list(tmp_path.glob(".*tmp*"))


def test_image_sources_refuse_what_they_cannot_read(tmp_path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="expected uint8"):
        open_images(tmp_path / "floats.npz")
    np.savez(tmp_path / "labels.npz", arr_1=np.zeros(3))
    with pytest.raises(DataError, match="no 'arr_0'"):
        open_images(tmp_path / "labels.npz")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate([(20, 16), (16, 24)]):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(DataError, match="eval.image_size"):
        open_images(folder).read(range(2))
    assert open_images(folder, image_size=12).read(range(2)).shape == (2, 12, 12, 3)  # ADM center crop


def test_reference_with_only_arr_0_is_computed_once_and_cached(tmp_path):
    net, images = ConvFeatures(), photo_patches()[:40]
    np.savez(tmp_path / "ref.npz", arr_0=to_nhwc(images))
    cfg = EvalConfig(reference=str(tmp_path / "ref.npz"), cache_dir=str(tmp_path / "cache"), batch_per_process=16)
    comm = Collective(False)
    ref = resolve_reference(cfg.reference, {"pool_3", "spatial"}, {"pool_3"}, {"inception": net}, cfg, "cpu", comm)
    parts = [net(images[i:i + 16]) for i in range(0, 40, 16)]  # the batches the reference pass ran
    feats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    expected = GaussianStats().update(feats["pool_3"])
    np.testing.assert_allclose(ref.stats["pool_3"][0], expected.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.stats["pool_3"][1], expected.cov(), rtol=0, atol=1e-12)
    assert torch.equal(ref.features["pool_3"], feats["pool_3"])  # all of arr_0, in index order (ADM's P/R set)
    assert ref.record["computed_from_images"]["num_images"] == 40
    calls = net.calls
    again = resolve_reference(cfg.reference, {"pool_3", "spatial"}, {"pool_3"}, {"inception": net}, cfg, "cpu", comm)
    assert net.calls == calls  # served from the cache
    assert np.array_equal(again.stats["spatial"][1], ref.stats["spatial"][1])
    # Stored statistics win over the images (ADM: "if mu is present"); only what is missing is computed.
    write_stats(tmp_path / "stored.npz", {"pool_3": (np.zeros(32), np.eye(32))}, to_nhwc(images))
    stored = resolve_reference(tmp_path / "stored.npz", {"pool_3", "spatial"}, (), {"inception": net}, cfg, "cpu",
                               comm)
    assert np.array_equal(stored.stats["pool_3"][1], np.eye(32)) and stored.record["stats_from_file"] == ["pool_3"]
    assert stored.record["computed_from_images"]["statistics"] == ["spatial"]


def test_make_reference_writes_adm_layout_that_evaluates_to_zero(tmp_path):
    net, images = ConvFeatures(), photo_patches()[:30]
    folder = tmp_path / "dataset"
    folder.mkdir()
    for i, img in enumerate(to_nhwc(images)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    cfg = EvalConfig(pr_reference_size=12, batch_per_process=8, cache_dir=str(tmp_path / "cache"))
    out = make_reference(folder, tmp_path / "ref.npz", ["pool_3", "spatial"], {"inception": net}, cfg, "cpu",
                         Collective(False))
    with np.load(out, allow_pickle=False) as z:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} <= set(z.files) and int(z["num_images"]) == 30
        subset = z["arr_0"]
        assert subset.shape == (12, 32, 32, 3) and z["sigma"].dtype == np.float64
    assert all(any(np.array_equal(s, img) for img in to_nhwc(images)) for s in subset)
    suite = MetricSuite(["fid", "sfid", "pr"], EvalConfig(reference=str(out), cache_dir=str(tmp_path / "cache")),
                        networks={"inception": net})
    suite.update(images)
    scores = suite.compute()
    assert abs(scores["fid"]) < 1e-8 and abs(scores["sfid"]) < 1e-8 and scores["recall"] == 1.0
    assert suite.protocol()["reference"]["computed_from_images"]["num_pr_images"] == 12


def gaussian_blur(images, sigma):
    """Separable Gaussian blur of uint8 images (N, 3, H, W), returned as uint8."""
    radius = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.pad(images.float(), (radius,) * 4, mode="replicate")
    x = F.conv2d(F.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_fd_grows_as_real_images_get_noisier_or_blurrier(tmp_path):
    digits = torch.from_numpy(load_digits().images * (255 / 16)).round().to(torch.uint8)  # 1797 x 8 x 8
    digits = F.interpolate(digits[:, None].float(), scale_factor=3, mode="nearest").to(torch.uint8).repeat(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    cases = {"photos": (photo_patches(), lambda x, s: (x + s * torch.randn(x.shape, generator=g)).round().clamp(0, 255)
                        .to(torch.uint8), [4.0, 8.0, 16.0, 32.0]),
             "digits": (digits, gaussian_blur, [0.5, 1.0, 1.5, 2.5])}
    for name, (clean, corrupt, levels) in cases.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=to_nhwc(clean))
        cfg = EvalConfig(reference=str(tmp_path / f"{name}.npz"), cache_dir=str(tmp_path / "cache"),
                         batch_per_process=512)
        suite = MetricSuite(["fid"], cfg, networks={"inception": ConvFeatures()})
        assert len(clean) > 20 * 32  # N well above the feature width: a well-conditioned covariance
        fds = []
        for level in [None, *levels]:
            suite.reset()
            suite.update(clean if level is None else corrupt(clean, level))
            fds.append(suite.compute()["fid"])
        assert abs(fds[0]) < 1e-8, name
        assert all(a < b for a, b in itertools.pairwise(fds)), (name, fds)


def test_suite_refuses_clearly(tmp_path):
    net = ConvFeatures()
    with pytest.raises(ValueError, match="eval.metrics"):
        MetricSuite(["fid", "kid"], EvalConfig(), networks={"inception": net})
    suite = MetricSuite(["fid"], EvalConfig(), networks={"inception": net})
    suite.update(photo_patches()[:4])
    with pytest.raises(ValueError, match="eval.reference"):
        suite.compute()
    only_is = MetricSuite(["is"], EvalConfig(), networks={"inception": net})  # IS needs no reference
    with pytest.raises(ValueError, match="no samples"):
        only_is.compute()
    with pytest.raises(ValueError, match="uint8"):
        only_is.update(torch.zeros(2, 3, 8, 8))
