"""sample.py: per-sample seeds (same images for any process count and batch size), ADM layout, clear refusals."""
import json

import numpy as np
import pytest
from helpers import REPO, run_job

import train as train_job
from gen.config import load_config

TINY = ["model.name=SiT-S/4", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
        "data.image_size=8", "train.global_batch_size=64", "log.tracker=none", "log.preview_every_steps=0",
        "data.num_workers=0", "train.max_steps=2"]
SAMPLING = ["sample.num_samples=7", "sampler.sampler=euler_maruyama", "sampler.num_steps=4", "sampler.cfg_scale=2.0",
            "sampler.cfg_interval=[0.0,0.7]", "sample.grid_num=4", "sample.labels=random", "sample.metrics=[]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("sample") / "run"
    train_job.train(load_config(REPO / "configs" / "quickstart.yaml", [*TINY, f"train.run_dir={run}"]))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run


def draw(run_dir, out, processes, batch, *extra):
    result = run_job("sample.py", [run_dir, *SAMPLING, f"sample.batch_per_process={batch}", f"sample.out={out}",
                                   *extra], processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out, allow_pickle=False)


def test_same_images_for_any_process_count_and_batch_size(run_dir, tmp_path):
    one = draw(run_dir, tmp_path / "one.npz", 1, 5)
    two = draw(run_dir, tmp_path / "two.npz", 2, 2)
    assert one["arr_0"].dtype == np.uint8 and one["arr_0"].shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    record = json.loads((tmp_path / "one.json").read_text())
    assert record["rounding"] == "round" and record["labels"] == "random" and record["num_samples"] == 7
    assert (tmp_path / "one.png").is_file() and not list(tmp_path.glob(".tmp-*"))


def test_balanced_labels_and_floor_rounding(run_dir, tmp_path):
    rounded = draw(run_dir, tmp_path / "r.npz", 1, 7, "sample.labels=balanced", "sample.metrics=[digits]")
    floored = draw(run_dir, tmp_path / "f.npz", 1, 7, "sample.labels=balanced", "sample.rounding=floor")
    np.testing.assert_array_equal(rounded["arr_1"], np.arange(7) % 10)
    diff = rounded["arr_0"].astype(int) - floored["arr_0"].astype(int)
    assert diff.min() >= 0 and diff.max() <= 1 and diff.any()
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # an untrained model: only the keys are checked
    assert set(metrics["digits"]) >= {"class_consistency", "frechet_distance"} and metrics["protocol"]["num_samples"] == 7


def test_refusals_are_clear(run_dir, tmp_path):
    wrong = run_job("sample.py", [run_dir, "model.dit.hidden_size=64", f"sample.out={tmp_path / 'x.npz'}"])
    assert wrong.returncode != 0 and "does not fit the configured model" in wrong.stderr
    assert not (tmp_path / "x.npz").exists()
    missing = run_job("sample.py", [tmp_path / "nothing"])
    assert missing.returncode != 0 and "holds no checkpoint" in missing.stderr
    typo = run_job("sample.py", [run_dir, "sample.num_sample=3"])
    assert typo.returncode != 0 and "did you mean 'sample.num_samples'" in typo.stderr


def test_streamed_metrics_match_across_processes_without_writing_images(run_dir, tmp_path):
    """sample.metrics=[fid,is] streams samples into one Inception pass; 1 and 2 processes agree; no .npz written."""
    from gen.eval.inception import save_random_inception

    weights = save_random_inception(tmp_path / "inception.pth", seed=0, live_channels=8)
    reference = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    scores = {}
    for processes in (1, 2):
        out = tmp_path / f"stream{processes}.npz"
        result = run_job("sample.py", [run_dir, *SAMPLING, "sample.batch_per_process=3", f"sample.out={out}",
                                       "sample.metrics=[fid,is]", "sample.write_images=false",
                                       f"eval.inception_weights={weights}", f"eval.reference={tmp_path / 'ref.npz'}",
                                       f"eval.cache_dir={tmp_path / f'cache{processes}'}", "eval.is_split_size=4"],
                         processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not out.exists() and not out.with_suffix(".png").exists()
        scores[processes] = json.loads(out.with_suffix(".json").read_text())["metrics"]
    assert scores[1]["num_samples"] == scores[2]["num_samples"] == 7
    assert scores[1]["fid"] == pytest.approx(scores[2]["fid"], rel=1e-5)
    assert scores[1]["is"] == pytest.approx(scores[2]["is"], rel=1e-6)
