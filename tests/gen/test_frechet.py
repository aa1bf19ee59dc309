"""Frechet distance and Gaussian statistics: closed forms, identities, scipy agreement, shard merging."""
import numpy as np
import pytest
import scipy.linalg
import torch

from gen.eval.frechet import GaussianStats, frechet_distance


def random_spd(rng, d, cond=10.0):
    """A random symmetric positive-definite matrix with eigenvalues spread over [1, cond]."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def sqrtm_reference(mu1, s1, mu2, s2):
    """The ADM / pytorch-fid formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)


def test_commuting_full_covariances_closed_form():
    """Diagonal covariances rotated by a shared random rotation commute; FD is rotation invariant."""
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(q @ mu1, (q * a) @ q.T, q @ mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_scaled_covariance_closed_form():
    """Sigma2 = c^2 Sigma1 gives FD = |mu1 - mu2|^2 + (1 - c)^2 Tr Sigma1 (FID formula, Heusel et al. 2017)."""
    rng = np.random.default_rng(2)
    s1, c = random_spd(rng, 10), 1.7
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = ((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c**2 * s1) == pytest.approx(expected, rel=1e-9)


def test_identity_symmetry_translation_and_torch_inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-8 * np.trace(sigma)
    mu2, sigma2 = mu + 0.3, random_spd(rng, 8)
    ab, ba = frechet_distance(mu, sigma, mu2, sigma2), frechet_distance(mu2, sigma2, mu, sigma)
    assert ab == pytest.approx(ba, rel=1e-10)
    shift = rng.standard_normal(8)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx((shift**2).sum(), rel=1e-8)
    as_torch = frechet_distance(*(torch.from_numpy(v).float() for v in (mu, sigma, mu2, sigma2)))
    assert as_torch == pytest.approx(ab, rel=1e-5)  # float32 inputs: only their rounding differs


def test_agrees_with_scipy_sqrtm():
    rng = np.random.default_rng(4)
    for d in (3, 10, 24):
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_singular_covariance_stays_finite_and_nonnegative():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 20))  # N < d: rank-deficient covariance
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    fd = frechet_distance(mu, sigma, np.zeros(20), np.eye(20))
    assert np.isfinite(fd) and fd > 0


def test_rejects_bad_shapes_and_nonfinite():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3))


def test_stats_match_numpy_and_merge_of_halves_equals_whole():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1001, 7)) @ rng.standard_normal((7, 7)) + 3.0
    whole = GaussianStats().update(x)
    np.testing.assert_allclose(whole.mean(), x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(whole.cov(), np.cov(x, rowvar=False), rtol=0, atol=1e-12)
    halves = GaussianStats().update(x[:400]) + GaussianStats().update(torch.from_numpy(x[400:]))
    assert halves.count == whole.count == 1001
    np.testing.assert_allclose(halves.mean(), whole.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(halves.cov(), whole.cov(), rtol=0, atol=1e-12)
    # Merging an empty shard (a rank that drew no samples) changes nothing.
    assert (halves + GaussianStats(dim=7)).count == 1001


def test_float32_features_are_summed_in_float64():
    """Large-mean float32 features: the covariance must match float64 numpy, not a float32 one-pass estimate."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4000, 4)) + 100.0).astype(np.float32)
    stats = GaussianStats()
    for chunk in np.array_split(x, 8):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.cov(), np.cov(x.astype(np.float64), rowvar=False), rtol=0, atol=1e-9)


def test_state_round_trip_as_an_all_reduce_would_sum_it():
    rng = np.random.default_rng(8)
    shards = [rng.standard_normal((n, 5)) for n in (30, 0, 71)]
    states = [GaussianStats(dim=5).update(s).state() for s in shards]
    assert all(v.dtype == torch.float64 for st in states for v in st.values())
    reduced = {k: sum(st[k] for st in states) for k in states[0]}  # what all_reduce(SUM) leaves on every rank
    merged = GaussianStats.from_state(reduced)
    x = np.concatenate(shards)
    assert merged.count == len(x)
    np.testing.assert_allclose(merged.mean(), x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=0, atol=1e-12)
    assert merged.frechet_distance(GaussianStats().update(x)) == pytest.approx(0.0, abs=1e-9)
