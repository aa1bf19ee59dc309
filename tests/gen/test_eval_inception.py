"""Inception features: the real loader on random-init weights, loud failures, the TF1 resize and the sFID tap, TF32
off, and FID equal to torchmetrics' FrechetInceptionDistance on the same weights and resize."""
import argparse
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from gen.config import EvalConfig, load_config
from gen.eval import split_sample_metrics
from gen.eval.metrics import evaluate_images
from gen.precision import exact_float32
from gen.eval.inception import InceptionFeatures, random_inception_state, save_random_inception
from gen.eval.metrics import MetricSuite


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # 8 live channels per Mixed_7c branch: pool_3 keeps its 2048 coordinates but only ~48 vary, so the Frechet
    # distances below (ours and torchmetrics' non-symmetric eigvals) take a second instead of a minute on CPU.
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0, live_channels=8)


@pytest.fixture(scope="module")
def net(weights):
    return InceptionFeatures(weights)


def photo_patches(n, size=48, seed=0):
    """n uint8 (3, size, size) crops of scikit-learn's two sample photos (china.jpg, flower.jpg)."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % 2]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(img[y:y + size, x:x + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def test_random_weights_load_through_the_real_loader(weights, net):
    images = photo_patches(2)
    again = InceptionFeatures(weights, sha256=hashlib.sha256(weights.read_bytes()).hexdigest()[:8])
    a, b = net(images), again(images)
    assert {k: tuple(v.shape) for k, v in a.items()} == {"pool_3": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert net.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest() == net.describe()["sha256"]


def test_bad_weight_files_fail_loudly(weights, tmp_path):
    for missing in (None, tmp_path / "nothing.pth"):
        with pytest.raises(FileNotFoundError) as err:
            InceptionFeatures(missing)
        message = str(err.value)
        for part in ("eval.inception_weights", "weights-inception-2015-12-05-6726825d.pth",
                     "torch-fidelity/releases/download/v0.2.0", "pytorch-fid/releases/download/fid_weights"):
            assert part in message
    with pytest.raises(ValueError, match="eval.inception_sha256"):
        InceptionFeatures(weights, sha256="0" * 64)
    state = random_inception_state(seed=1)
    renamed = {("Mixed_6d.branch1x1.conv.kernel" if k == "Mixed_6d.branch1x1.conv.weight" else k): v
               for k, v in state.items()}
    reshaped = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    pickled = dict(state, meta=argparse.Namespace(step=1))  # arbitrary objects: never unpickled
    for name, bad, match in [("renamed", renamed, "Mixed_6d.branch1x1.conv"), ("reshaped", reshaped, "fc.weight"),
                             ("pickled", pickled, "not a plain tensor state dict")]:
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=match):
            InceptionFeatures(tmp_path / f"{name}.pth")


def tf1_legacy_bilinear(img, out_h, out_w):
    """TF1 resize_bilinear, align_corners=False, legacy centres: src = dst * in/out, floor/ceil clamped, lerp."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0, y1 = int(np.floor(y)), min(int(np.floor(y)) + 1, in_h - 1)
        for j in range(out_w):
            x = j * in_w / out_w
            x0, x1 = int(np.floor(x)), min(int(np.floor(x)) + 1, in_w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (x - x0)
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


def test_tf1_resize_hand_values_and_torch_differs():
    x = torch.tensor([[0.0, 3.0], [6.0, 9.0]])[None, None]
    # 2 -> 3: sources 0, 2/3, 4/3 (clamped to the last pixel), no half-pixel offset.
    expected = torch.tensor([[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]])
    got = interpolate_bilinear_2d_like_tensorflow1x(x, size=(3, 3), align_corners=False)[0, 0]
    assert torch.allclose(got, expected, atol=1e-6)
    img = np.random.default_rng(0).uniform(0, 255, (4, 4)).astype(np.float32)
    got = interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(img)[None, None], size=(7, 7), align_corners=False)
    np.testing.assert_allclose(got[0, 0].numpy(), tf1_legacy_bilinear(img.astype(np.float64), 7, 7), atol=1e-4)
    half_pixel = F.interpolate(torch.from_numpy(img)[None, None], size=(7, 7), mode="bilinear", align_corners=False)
    assert (half_pixel - got).abs().max() > 1.0


def test_network_input_is_tf_resized_and_spatial_is_mixed_6d_nhwc(net):
    images = photo_patches(2, size=40, seed=1)
    seen = {}
    hooks = [net.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.update(input=args[0].clone())),
             net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, args, out: seen.update(tap=out.clone()))]
    try:
        feats = net(images)
    finally:
        for h in hooks:
            h.remove()
    resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    assert torch.equal(seen["input"], (resized - 128) / 128)
    assert seen["tap"].shape == (2, 192, 17, 17)  # the 1x1 branch of Mixed_6d (TF mixed_6/conv)
    # ADM: spatial[..., :7] of the NHWC tensor, flattened per image -> index (h * 17 + w) * 7 + c.
    assert feats["spatial"][1, (5 * 17 + 11) * 7 + 3] == seen["tap"][1, 3, 5, 11]
    assert torch.equal(feats["spatial"], seen["tap"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    logits = feats["pool_3"] @ net.net.fc.weight.T  # softmax/logits without the bias, as ADM's IS graph
    assert torch.allclose(feats["logits"], logits, atol=1e-5)


def test_exact_float32_turns_tf32_and_autocast_off_and_restores():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with exact_float32("cpu"):
                assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
                assert not torch.is_autocast_enabled("cpu")
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            assert torch.is_autocast_enabled("cpu")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_fid_equals_torchmetrics(weights, net, tmp_path):
    """Same images, same random-init weights file, TF1 resize (antialias=False), uint8 input (normalize=False)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = photo_patches(8, seed=2), photo_patches(8, seed=3)
    fake = (fake.float() * 0.8 + 10).to(torch.uint8)
    metric = FrechetInceptionDistance(feature=2048, normalize=False, antialias=False,
                                      feature_extractor_weights_path=str(weights))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())

    np.savez(tmp_path / "ref.npz", arr_0=real.permute(0, 2, 3, 1).numpy())  # ADM layout; no mu: computed from arr_0
    cfg = EvalConfig(reference=str(tmp_path / "ref.npz"), cache_dir=str(tmp_path / "cache"), batch_per_process=5)
    suite = MetricSuite(["fid"], cfg, networks={"inception": net})
    suite.update(fake)
    got = suite.compute()
    assert got["num_samples"] == 8 and expected > 0.1
    assert got["fid"] == pytest.approx(expected, rel=1e-3)


def test_single_process_suite_and_sample_metric_names(weights):
    """evaluate_images (one process, no collectives) with eval.* keys from a run's config; sample.metrics names."""
    cfg = load_config(None, [f"eval.inception_weights={weights}", "eval.is_split_size=2"])
    assert split_sample_metrics(["digits", "adm", "fid", "fd_dinov2"]) == (["fid", "sfid", "is", "pr", "fd_dinov2"],
                                                                          ["digits"])
    with pytest.raises(ValueError, match="sample.metrics.*'fdi'"):
        split_sample_metrics(["fdi"])
    out = evaluate_images(photo_patches(4, seed=4), ["is"], cfg.eval)
    assert out["is_splits"] == 2 and out["num_samples"] == 4 and out["is"] >= 1.0
    assert out["protocol"]["inception_score"]["split_size"] == 2
    assert out["protocol"]["networks"]["inception"]["weights"] == str(weights)
