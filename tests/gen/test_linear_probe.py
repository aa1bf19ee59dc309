"""The linear probe's classifier and split (gen.eval.probe): separable features score 100 %, random labels chance,
the fit is the penalised optimum, the split is stratified, disjoint and fixed."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen.eval.probe import fit_linear, linear_probe, stratified_split

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n, classes, dim, seed, spread=0.3):
    """n points around `classes` random unit-scale centres in `dim` dimensions, and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linearly_separable_features_score_100_percent():
    fx, fy = clusters(300, 5, 16, seed=1)
    hx, hy = clusters(200, 5, 16, seed=2)
    scores = linear_probe(fx, fy, hx, hy, l2=1e-3)
    assert scores["fit_acc"] == 1.0 and scores["heldout_acc"] == 1.0
    assert (scores["num_fit"], scores["num_heldout"], scores["feature_dim"], scores["num_classes"]) == (300, 200, 16, 5)


def test_random_labels_score_chance_on_the_heldout_part():
    g = torch.Generator().manual_seed(3)
    fx, hx = torch.randn(1000, 32, generator=g), torch.randn(2000, 32, generator=g)
    fy, hy = torch.randint(0, 10, (1000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    scores = linear_probe(fx, fy, hx, hy, l2=1e-3)
    assert abs(scores["heldout_acc"] - 0.1) < 0.03  # 3 binomial standard deviations at n = 2000
    assert scores["fit_acc"] > 0.15  # it does fit the noise it saw


def test_the_fit_is_the_penalised_optimum_and_deterministic():
    x, y = clusters(200, 4, 8, seed=4, spread=1.5)  # overlapping: a finite optimum away from zero
    x = (x - x.mean(0)) / x.std(0)
    x = x.double()
    w, b = fit_linear(x, y, 4, l2=1e-2)
    w2, b2 = fit_linear(x, y, 4, l2=1e-2)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = F.cross_entropy(x @ w + b, y) + 0.5 * 1e-2 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert float(gw.abs().max()) < 1e-6 and float(gb.abs().max()) < 1e-6  # stationary: the convex problem's minimum


def test_stratified_split_is_disjoint_per_class_and_fixed():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    fit, held = stratified_split(labels, 0.2)
    assert not set(fit) & set(held) and sorted([*fit, *held]) == list(range(35))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 4, 1]
    again = stratified_split(labels, 0.2)
    assert np.array_equal(fit, again[0]) and np.array_equal(held, again[1])
    fit, held = stratified_split(labels, 0.2, limit=14)
    assert len(fit) + len(held) == 4 + 8 + 2
    with pytest.raises(ValueError, match="at least 2 per class"):
        stratified_split(np.array([0, 0, 1]), 0.5)
