"""The offline digits metric: classifier accuracy, class consistency, Frechet distance behaviour, weight cache."""
import itertools

import numpy as np
import pytest
import torch

from gen.eval import digits
from gen.eval.digits import DigitsEvaluator, load_split

SIZE = 16  # configs/quickstart.yaml's image size


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def evaluator(cache_dir):
    return DigitsEvaluator(SIZE, cache_dir=cache_dir)  # trains once for the module (a few seconds)


@pytest.fixture(scope="module")
def heldout():
    return load_split("heldout", SIZE)


def noisy(images, sigma, seed=0):
    """Images plus Gaussian pixel noise of standard deviation sigma (in 0-255 units), requantised."""
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_trains_to_high_heldout_accuracy_and_writes_cache(evaluator, cache_dir):
    assert evaluator.trained_now
    assert evaluator.cache_path.parent == cache_dir and evaluator.cache_path.is_file()
    assert f"{SIZE}px" in evaluator.cache_path.name and digits.VERSION in evaluator.cache_path.name
    _, accuracy = evaluator.reference()
    assert accuracy >= 0.97


def test_class_consistency_true_vs_shuffled_labels(evaluator, heldout):
    images, labels = heldout
    result = evaluator.evaluate(images, labels)
    assert result["class_consistency"] >= 0.95
    assert result["num_samples"] == len(labels)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert 0.02 <= evaluator.evaluate(images, shuffled)["class_consistency"] <= 0.2  # chance is 0.1


def test_frechet_distance_zero_for_heldout_small_for_train_large_for_noise(evaluator, heldout):
    images, labels = heldout
    same = evaluator.evaluate(images, labels)["frechet_distance"]
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    fd_noise = evaluator.evaluate(noise, labels)["frechet_distance"]
    train_images, train_labels = load_split("train", SIZE)
    fd_train = evaluator.evaluate(train_images, train_labels)["frechet_distance"]
    assert abs(same) < 1e-8 * fd_noise
    assert fd_noise > 10.0
    assert fd_train < 0.05 * fd_noise  # other real digits are close, noise is far


def test_frechet_distance_grows_with_noise_level(evaluator, heldout):
    images, labels = heldout
    fds = [evaluator.evaluate(noisy(images, s), labels)["frechet_distance"] for s in (0, 16, 32, 64)]
    assert all(a < b for a, b in itertools.pairwise(fds)), fds


def test_heldout_feature_covariance_is_nonsingular(evaluator):
    stats, _ = evaluator.reference()
    eig = np.linalg.eigvalsh(stats.cov())
    assert stats.count > stats.dim and eig.min() > 1e-7 * eig.max()


def test_second_evaluator_loads_cache_without_training(evaluator, cache_dir, heldout, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(digits, "train_classifier", no_training)
    again = DigitsEvaluator(SIZE, cache_dir=cache_dir)
    assert not again.trained_now
    images = heldout[0][:50]
    assert torch.equal(again.features(images), evaluator.features(images))


def test_input_layouts_and_validation(evaluator, heldout):
    images = heldout[0][:20]
    feats = evaluator.features(images)
    assert feats.dtype == torch.float64 and feats.shape == (20, digits.FEATURE_DIM)
    assert torch.equal(evaluator.features(images.repeat(1, 3, 1, 1)), feats)  # RGB grey -> same features
    assert torch.equal(evaluator.features(images[:, 0].numpy()), feats)  # (N, H, W) numpy
    assert torch.equal(evaluator.predict(images), evaluator.net(digits.to_input(images)).argmax(1))
    with pytest.raises(ValueError, match="uint8"):
        evaluator.features(images.float())
    with pytest.raises(ValueError, match="image_size=8"):
        evaluator.features(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels"):
        evaluator.evaluate(images, torch.zeros(3, dtype=torch.long))


def test_training_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = digits.train_classifier(8, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = digits.train_classifier(8, epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(digits, "train_classifier", lambda size: calls.append(size) or digits.DigitsNet())
    path = tmp_path / f"digits_cnn_{SIZE}px_{digits.VERSION}.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        ev = DigitsEvaluator(SIZE, cache_dir=tmp_path)
    assert calls == [SIZE] and ev.trained_now and ev.cache_path == path
    torch.load(path, weights_only=True)  # replaced by a loadable state dict
