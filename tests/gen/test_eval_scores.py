"""Inception Score, precision/recall and the pruned Frechet distance against straightforward reference formulas."""
import numpy as np
import pytest
import torch

from gen.eval.frechet import frechet_distance
from gen.eval.scores import SplitEntropySums, frechet_distance_pruned, manifold_radii, precision_recall


def adm_inception_score(probs, split_size):
    """ADM evaluator's formula (evaluations/evaluator.py) in numpy: mean over splits of exp(mean_x KL(p || pbar))."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def inception_score(logits, split_size, index=None, batches=1):
    sums = SplitEntropySums(logits.shape[1], split_size)
    index = np.arange(len(logits)) if index is None else index
    for part in np.array_split(np.arange(len(logits)), batches):
        sums.update(torch.from_numpy(logits[part]), torch.from_numpy(index[part]))
    return sums


def test_inception_score_matches_adm_formula_with_uneven_splits():
    logits = np.random.default_rng(0).standard_normal((23, 7)) * 2
    got = inception_score(logits, split_size=10).score()  # splits of 10, 10 and 3, unweighted mean as ADM
    assert got["is_splits"] == 3
    assert got["is"] == pytest.approx(adm_inception_score(softmax(logits), 10), rel=1e-12)


def test_inception_score_on_known_distributions():
    same = np.tile(np.random.default_rng(1).standard_normal(5), (40, 1))  # p(y|x) = p(y): no information
    assert inception_score(same, 40).score()["is"] == pytest.approx(1.0, abs=1e-12)
    confident = 50.0 * np.eye(8)[np.arange(40) % 8]  # one confident class each, classes balanced: IS = C
    assert inception_score(confident, 40).score()["is"] == pytest.approx(8.0, rel=1e-9)


def test_inception_score_splits_follow_global_indices_not_arrival_order():
    """Shuffled arrival, other batch sizes and two 'processes' summed as an all-reduce give the same score."""
    logits = np.random.default_rng(2).standard_normal((30, 6)) * 3
    whole = inception_score(logits, 7).score()
    perm = np.random.default_rng(3).permutation(30)
    rank0 = inception_score(logits[perm[:11]], 7, index=perm[:11], batches=3)
    rank1 = inception_score(logits[perm[11:]], 7, index=perm[11:], batches=2)
    n = max(len(rank0.count), len(rank1.count))
    merged = SplitEntropySums(6, 7)
    merged.count, merged.plogp, merged.prob = [a + b for a, b in zip(rank0.tensors(n), rank1.tensors(n))]
    got = merged.score()
    assert got["is_splits"] == whole["is_splits"] == 5
    assert got["is"] == pytest.approx(whole["is"], rel=1e-12)


def pr_reference(ref, smp, k):
    """Kynkaanniemi et al. from the definition, float64: k-th neighbour radii (self excluded), ball membership."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    cross = d2(ref, smp)  # (R, S)
    return (cross <= r_ref[:, None]).any(0).mean(), (cross <= r_smp[None, :]).any(1).mean()


@pytest.mark.parametrize("mode", ["fp32", "fp16"])
def test_precision_recall_hand_checked_k3(mode):
    """1-d points: reference clusters {0..3} and {20..23}; samples near the first cluster plus an outlier at 10."""
    ref = torch.tensor([0, 1, 2, 3, 20, 21, 22, 23], dtype=torch.float32)[:, None]
    smp = torch.tensor([0.5, 1.5, 2.5, 3.5, 10], dtype=torch.float32)[:, None]
    # Sample radii (3rd neighbour, squared): 9, 4, 4, 9, 72.25 -> no sample ball reaches 20..23: recall 4/8.
    # Reference radii: 9, 4, 4, 9 (each cluster) -> only 10 lies outside every reference ball: precision 4/5.
    assert manifold_radii(smp, 3, mode).tolist() == [9.0, 4.0, 4.0, 9.0, 72.25]
    assert precision_recall(ref, smp, k=3, mode=mode) == {"precision": 0.8, "recall": 0.5}
    assert pr_reference(ref.double().numpy(), smp.double().numpy(), 3) == (0.8, 0.5)


def test_precision_recall_matches_definition_identical_and_disjoint_sets():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((150, 8))
    smp = 0.8 * rng.standard_normal((120, 8)) + 0.5
    got = precision_recall(torch.from_numpy(ref).float(), torch.from_numpy(smp).float(), k=3, mode="fp32")
    p, r = pr_reference(ref.astype(np.float32).astype(np.float64), smp.astype(np.float32).astype(np.float64), 3)
    assert 0 < p < 1 and 0 < r < 1
    assert (got["precision"], got["recall"]) == (pytest.approx(p, abs=1e-12), pytest.approx(r, abs=1e-12))
    x = torch.from_numpy(ref).float()
    assert precision_recall(x, x.clone(), mode="fp16") == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 100.0, mode="fp32") == {"precision": 0.0, "recall": 0.0}


def test_fp16_overflow_falls_back_to_fp32_per_block():
    """Norms beyond float16 (65504) make the fp16 block non-finite: ADM recomputes it in float32."""
    rng = np.random.default_rng(5)
    ref, smp = rng.standard_normal((60, 4)), rng.standard_normal((50, 4)) + 0.3
    small = precision_recall(torch.from_numpy(ref).float(), torch.from_numpy(smp).float(), mode="fp32")
    big_ref, big_smp = torch.from_numpy(ref * 1000).float(), torch.from_numpy(smp * 1000).float()
    assert not torch.isfinite((big_ref.half() ** 2).sum(1)).all()
    # All distances scale by 1e6: the sets of balls and members do not change.
    assert precision_recall(big_ref, big_smp, mode="fp16") == small
    with pytest.raises(ValueError, match="more than 3 points"):
        manifold_radii(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="eval.pr_mode"):
        precision_recall(big_ref, big_smp, mode="bf16")


def test_pruned_frechet_distance_is_exact():
    """Coordinates with zero variance in both Gaussians (dead ReLU channels) add only their squared mean gap."""
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((200, 5)), rng.standard_normal((200, 5)) * 1.3 + 0.2
    live = [0, 3, 4, 7, 9]
    mu1, mu2, s1, s2 = np.zeros(10), np.zeros(10), np.zeros((10, 10)), np.zeros((10, 10))
    mu1[live], mu2[live] = a.mean(0), b.mean(0)
    s1[np.ix_(live, live)], s2[np.ix_(live, live)] = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu2[1] = 0.7  # a dead coordinate whose constant value differs
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)) + 0.7**2
    assert frechet_distance_pruned(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    # The full singular matrices give the same value up to sqrt(eps)-sized errors of their zero eigenvalues.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_pruned(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
