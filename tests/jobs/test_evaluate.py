"""evaluate.py: 2 processes give the 1-process scores, the protocol is recorded, --make-reference writes the ADM
layout, and a missing weights file is one clear error. Random-init Inception weights go through the real loader."""
import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import run_job
from sklearn.datasets import load_sample_images

import evaluate
from gen.eval.frechet import GaussianStats
from gen.eval.inception import InceptionFeatures, save_random_inception


def patches(n, seed, size=40):
    """n uint8 (size, size, 3) crops of scikit-learn's sample photos (NHWC, as .npz batches store them)."""
    photos, rng = load_sample_images().images, np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % 2]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(img[y:y + size, x:x + size])
    return np.stack(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    weights = save_random_inception(root / "inception.pth", seed=0, live_channels=8)  # cheap 2048-d FDs, see there
    np.savez(root / "samples.npz", arr_0=patches(7, seed=1), arr_1=np.arange(7) % 10)
    (root / "samples.json").write_text(json.dumps({"labels": "balanced", "rounding": "round", "num_samples": 7}))
    np.savez(root / "ref.npz", arr_0=patches(8, seed=2))
    return root, weights


def in_process(argv):
    """evaluate.main in this process, leaving accelerate's global state as it found it."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return evaluate.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def score(root, weights, processes):
    out = root / f"scores-{processes}.json"
    # Own cache per run: each run computes the reference from its arr_0, sharded over its processes.
    args = [root / "samples.npz", f"eval.reference={root / 'ref.npz'}", f"eval.inception_weights={weights}",
            f"eval.cache_dir={root / f'cache-{processes}'}", "eval.metrics=[fid,sfid,is,pr]", "eval.is_split_size=3",
            "eval.batch_per_process=2", "--out", out, "--save-stats", root / f"stats-{processes}.npz"]
    result = run_job("evaluate.py", args, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_give_the_one_process_scores(files):
    root, weights = files
    one, two = score(root, weights, 1), score(root, weights, 2)
    with np.load(root / "stats-1.npz") as s1, np.load(root / "stats-2.npz") as s2:
        assert sorted(s1.files) == ["mu", "mu_s", "num_images", "sigma", "sigma_s"]
        for key in ("mu", "sigma", "mu_s", "sigma_s"):  # float64 sums, summed in another order across processes
            np.testing.assert_allclose(s2[key], s1[key], rtol=0, atol=1e-12 * max(1.0, np.abs(s1[key]).max()))
    a, b = one["metrics"], two["metrics"]
    assert a["num_samples"] == b["num_samples"] == 7 and a["is_splits"] == b["is_splits"] == 3
    assert a["fid"] > 0 and a["sfid"] > 0
    # 7 samples: rank-deficient covariances, whose zero eigenvalues give sqrt(eps)-sized noise in the distances;
    # identical gathered features (P/R); float32 logits from other batch compositions (IS, ~1e-8).
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-5) and b["sfid"] == pytest.approx(a["sfid"], rel=1e-5)
    assert b["is"] == pytest.approx(a["is"], rel=1e-6)
    assert (b["precision"], b["recall"]) == (a["precision"], a["recall"])
    p = two["protocol"]
    assert p["processes"] == 2 and p["num_samples"] == 7 and p["sampling"]["labels"] == "balanced"
    assert p["networks"]["inception"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert p["precision_recall"] == {"k": 3, "distances": "fp16"}
    assert p["reference"]["computed_from_images"]["num_images"] == 8


def test_make_reference_and_missing_weights(files, tmp_path):
    root, weights = files
    out = in_process(["--make-reference", root / "ref.npz", "--out", tmp_path / "own_ref.npz",
                      f"eval.inception_weights={weights}", "eval.metrics=[fid,sfid,pr]", "eval.pr_reference_size=5"])
    with np.load(out, allow_pickle=False) as z:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} <= set(z.files)
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023) and z["mu"].dtype == np.float64
        assert z["arr_0"].shape == (5, 40, 40, 3) and int(z["num_images"]) == 8
        mu = z["mu"]
    images = np.load(root / "ref.npz")["arr_0"]
    feats = InceptionFeatures(weights)(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(mu, GaussianStats().update(feats["pool_3"]).mean(), rtol=0, atol=1e-6)
    with pytest.raises(SystemExit) as err:
        in_process([root / "samples.npz", f"eval.reference={out}", f"eval.inception_weights={tmp_path / 'no.pth'}"])
    assert "eval.inception_weights" in str(err.value) and "torch-fidelity/releases/download/v0.2.0" in str(err.value)
