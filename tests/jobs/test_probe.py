"""evaluate.py --probe on a tiny ADDP run: the trained (EMA) and the init encoder on digits and on an image folder,
the JSON it writes, and one-line errors for what cannot be probed."""
import json

import pytest
import torch

import evaluate
from gen.config import load_config

RUN = ["data.name=digits", "data.image_size=16", "data.num_workers=0", "model.name=ADDP-T", "model.addp.patch_size=4",
       "latent.name=vq", "latent.vq.quantizer=palette", "latent.vq.codebook_size=8", "latent.vq.code_dim=3",
       "latent.vq.factor=4", "objective.name=addp", "objective.addp.predictor=oracle", "sampler.sampler=alternating",
       "train.global_batch_size=16", "train.lr=1e-3", "train.max_steps=2", "train.ema_decay=0.5", "log.tracker=none",
       "log.preview_every_steps=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import train as train_job
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("probe")
    try:
        train_job.train(load_config(None, [*RUN, f"train.run_dir={root / 'run'}"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return root / "run"


def probe(*args):
    return json.loads(evaluate.main([str(a) for a in args]).read_text())


@pytest.mark.usefixtures("one_thread")
def test_probe_of_the_ema_and_the_init_encoder_on_digits(run_dir, tmp_path):
    ema = probe(run_dir, "--probe", "eval.probe_max_images=300")
    assert (run_dir / "probe-ema-mean-digits.json").is_file()
    init = probe(run_dir, "--probe", "eval.probe_max_images=300", "eval.probe_encoder=init", "--out",
                 tmp_path / "init.json")
    for scores in (ema["metrics"], init["metrics"]):
        assert 295 <= scores["num_fit"] + scores["num_heldout"] <= 305 and scores["feature_dim"] == 64
        assert scores["num_classes"] == 10 and 0.3 < scores["heldout_acc"] <= 1.0  # chance is 0.1
    assert ema["protocol"]["weights"].endswith("ema.safetensors") and init["protocol"]["weights"].startswith("init")
    assert ema["metrics"] != init["metrics"]  # two steps at EMA decay 0.5 moved the encoder
    both = probe(run_dir, "--probe", "eval.probe_max_images=300", "eval.probe_pool=both", "--out", tmp_path / "b.json")
    assert both["metrics"]["feature_dim"] == 128
    again = probe(run_dir, "--probe", "eval.probe_max_images=300", "eval.probe_encoder=init", "--out",
                  tmp_path / "again.json")
    assert again["metrics"] == init["metrics"]  # deterministic


@pytest.mark.usefixtures("one_thread")
def test_probe_on_an_image_folder(run_dir, tmp_path):
    from helpers import make_image_folder

    folder = make_image_folder(tmp_path / "images", n_per_class=10, size=40)
    out = probe(run_dir, "--probe", "data.name=image_folder", f"data.path={folder}", "cond.num_classes=2",
                "eval.probe_heldout_fraction=0.3", "--out", tmp_path / "folder.json")
    assert (out["metrics"]["num_fit"], out["metrics"]["num_heldout"], out["metrics"]["num_classes"]) == (14, 6, 2)
    assert out["protocol"]["data_path"] == str(folder)


@pytest.mark.parametrize("args, words", [
    (["model.name=MAGE-T", "objective.name=masked_tokens", "sampler.sampler=maskgit"], ["has no image encoder"]),
    (["eval.probe_pool=max"], ["eval.probe_pool", "mean"]),
    (["data.name=latent_cache", "data.path=/nonexistent"], ["latent cache", "/nonexistent"]),
])
def test_what_cannot_be_probed_is_one_clear_line(run_dir, args, words):
    with pytest.raises(SystemExit) as err:
        evaluate.main([str(run_dir), "--probe", *args])
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_folder_without_a_run_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        evaluate.main([str(tmp_path), "--probe"])
    assert "holds no checkpoint" in str(err.value)
    assert torch.get_num_threads() >= 1
