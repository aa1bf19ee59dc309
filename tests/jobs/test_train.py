"""train.py: exact resume, atomic checkpoints, the NaN guard, config mismatch, 1 vs 2 processes, cache vs online."""
import json

import numpy as np
import pytest
import torch
from helpers import REPO, make_image_folder, run_job
from latent_helpers import TINY_BAE, save_tiny_bae, save_tiny_vae
from safetensors.torch import load_file

import gen.checkpoint
import train as train_job
from gen.checkpoint import CheckpointError, latest_checkpoint
from gen.config import load_config
from gen.objectives.flow import FlowObjective

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# A tiny SiT on 8 px digits (2 x 2 tokens); 256 images a step, so 5 steps make an epoch of the 1437 digits.
TINY = ["model.name=SiT-S/4", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
        "data.image_size=8", "train.global_batch_size=256", "train.lr=1e-3", "train.ema_decay=0.9", "log.tracker=none",
        "log.preview_every_steps=0", "log.every_steps=1", "data.num_workers=0"]


def tiny(run_dir, *extra):
    return load_config(REPO / "configs" / "quickstart.yaml", [*TINY, f"train.run_dir={run_dir}", *extra])


def final_state(ckpt):
    model = load_file(str(ckpt / "model.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return model, ema, opt


def assert_bitwise_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_resume_equals_uninterrupted(tmp_path):
    """2N steps straight and N steps + --resume + N steps: bitwise-equal model, EMA and optimizer (epoch crossed)."""
    straight = train_job.train(tiny(tmp_path / "a", "train.max_steps=8", "train.ckpt_every_steps=4"))
    train_job.train(tiny(tmp_path / "b", "train.max_steps=4", "train.ckpt_every_steps=4"))
    resumed = train_job.train(tiny(tmp_path / "b", "train.max_steps=8", "train.ckpt_every_steps=4"), resume=True)
    assert straight.name == resumed.name == "step-00000008"
    assert_bitwise_equal(final_state(straight), final_state(resumed))
    state = json.loads((resumed / "train_state.json").read_text())
    assert state["step"] == 8 and state["data_position"] == {"epoch": 1, "step_in_epoch": 3}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "b" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls = gen.checkpoint.save_file, []

    def dies_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash while writing ema.safetensors")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(gen.checkpoint, "save_file", dies_on_second_save)
    cfg = tiny(tmp_path / "run", "train.max_steps=4", "train.ckpt_every_steps=2")
    with pytest.raises(OSError, match="simulated"):
        train_job.train(cfg)
    assert latest_checkpoint(cfg.train.run_dir).name == "step-00000002"
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-00000004").exists()  # the failed write is removed
    monkeypatch.setattr(gen.checkpoint, "save_file", real_save)
    last = train_job.train(cfg, resume=True)
    assert last.name == "step-00000004"
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-00000004").exists()


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = FlowObjective.loss, []

    def poisoned(self, *args, **kwargs):
        out = real_loss(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the fourth step, logged as step 4 (steps count from 1)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FlowObjective, "loss", poisoned)
    cfg = tiny(tmp_path / "run", "train.max_steps=6", "train.ckpt_every_steps=2")
    with pytest.raises(train_job.NonFiniteLoss, match=r"step 4, micro-batch 0.*step-00000002"):
        train_job.train(cfg)
    assert latest_checkpoint(cfg.train.run_dir).name == "step-00000002"


def test_checkpoint_from_another_config_is_refused(tmp_path):
    train_job.train(tiny(tmp_path / "run", "train.max_steps=1"))
    with pytest.raises(CheckpointError, match=r"model.dit.hidden_size: 32 -> 64"):
        train_job.train(tiny(tmp_path / "run", "train.max_steps=2", "model.dit.hidden_size=64"), resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train_job.train(tiny(tmp_path / "run", "train.max_steps=2"))


SRA = ["align.methods=[sra]", "align.sra.student_layer=1", "align.sra.teacher_layer=2"]


BITS = ["latent.name=binary", *TINY_BAE, "objective.name=bernoulli",
        "objective.bernoulli.num_timesteps=8", "sampler.sampler=ancestral", "sampler.num_steps=4", "model.name=SiT-S/1"]
"""Bernoulli diffusion on the bits of a tiny binary autoencoder (latent.binary.weights added by the test)."""


@pytest.mark.parametrize("extra", [[], [*SRA, "align.sra.stop_step=2"], BITS],
                         ids=["plain", "sra-stopped-at-2", "bernoulli-binary"])
def test_two_processes_match_one(tmp_path, extra):
    """Same global batch on 1 and 2 processes: same losses and weights up to float reduction order (SRA included:
    its teacher-time offsets come from the trainer's global draws; switching it off at step 2 re-wraps DDP; binary
    latents: the Bernoulli draws are the trainer's too)."""
    if extra == BITS:
        extra = [*BITS, f"latent.binary.weights={save_tiny_bae(tmp_path / 'bae.pt', image_size=8)}"]
    runs = {}
    for processes in (1, 2):
        run = tmp_path / f"p{processes}"
        args = ["configs/quickstart.yaml", *TINY, f"train.run_dir={run}", "train.max_steps=3", "model.dit.depth=2",
                *extra]
        result = run_job("train.py", args, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{processes} process(es)" in result.stdout + result.stderr
        runs[processes] = run
    loss = {p: [json.loads(x)["loss"] for x in (r / "logs" / "scalars.jsonl").read_text().splitlines()]
            for p, r in runs.items()}
    np.testing.assert_allclose(loss[1], loss[2], rtol=1e-5)
    w1, w2 = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in runs.values())
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Same global batch as 1 x 256 and as 4 accumulated micro-batches of 64: same losses and weights."""
    big = train_job.train(tiny(tmp_path / "big", "train.max_steps=3"))
    acc = train_job.train(tiny(tmp_path / "acc", "train.max_steps=3", "train.grad_accum_steps=4"))
    loss = [[json.loads(x)["loss"] for x in (tmp_path / r / "logs" / "scalars.jsonl").read_text().splitlines()]
            for r in ("big", "acc")]
    np.testing.assert_allclose(loss[0], loss[1], rtol=1e-5)
    a, b = load_file(str(big / "model.safetensors")), load_file(str(acc / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_latent_cache_training_equals_online_encoding(tmp_path):
    """prepare.py's cache + training == online encoding, given the same posterior noise (tiny random VAE)."""
    vae, images = save_tiny_vae(tmp_path / "vae"), make_image_folder(tmp_path / "images")
    common = ["model.name=SiT-S/2", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
              "cond.num_classes=2", "data.image_size=32", "latent.name=sd-vae", f"latent.sd_vae.vae_path={vae}",
              "train.global_batch_size=8", "log.tracker=none", "log.preview_every_steps=0", "data.num_workers=0",
              "train.max_steps=3"]
    online = train_job.train(load_config(None, [*common, "data.name=image_folder", f"data.path={images}",
                                                f"train.run_dir={tmp_path / 'online'}"]))
    result = run_job("prepare.py", ["configs/quickstart.yaml", *common, "data.name=image_folder",
                                    f"data.path={images}", "--out", tmp_path / "cache"])
    assert result.returncode == 0, result.stderr[-3000:]
    cached = train_job.train(load_config(None, [*common, "data.name=latent_cache", f"data.path={tmp_path / 'cache'}",
                                                f"train.run_dir={tmp_path / 'cached'}"]))
    a, b = load_file(str(online / "model.safetensors")), load_file(str(cached / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_missing_vae_fails_before_writing(tmp_path):
    cfg = tiny(tmp_path / "run", "latent.name=sd-vae", f"latent.sd_vae.vae_path={tmp_path / 'no-vae'}",
               "data.name=digits", "data.image_size=16")
    with pytest.raises(FileNotFoundError, match="latent.sd_vae.vae_path"):
        train_job.train(cfg)
    assert not (tmp_path / "run").exists()


def test_training_time_fid_is_logged(tmp_path):
    """log.fid_every_steps streams k EMA samples into FID against eval.reference (random-init Inception)."""
    from gen.eval.inception import save_random_inception

    weights = save_random_inception(tmp_path / "inception.pth", seed=0, live_channels=8)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8))
    train_job.train(tiny(tmp_path / "run", "train.max_steps=2", "log.fid_every_steps=1", "log.fid_num_samples=6",
                         "log.fid_num_steps=2", f"eval.inception_weights={weights}",
                         f"eval.reference={tmp_path / 'ref.npz'}", f"eval.cache_dir={tmp_path / 'cache'}"))
    records = [json.loads(x) for x in (tmp_path / "run" / "logs" / "scalars.jsonl").read_text().splitlines()]
    fids = [r["fid6"] for r in records if "fid6" in r]
    assert len(fids) == 2 and all(np.isfinite(fids)) and min(fids) > 0


def test_a_stopped_aligner_is_no_longer_computed_and_resume_across_the_stop_is_exact(tmp_path):
    """From align.sra.stop_step on SRA is skipped (no loss term, head frozen), the optimizer keeps its state, and
    a run resumed at the stop equals the uninterrupted one."""
    args = [*SRA, "align.sra.stop_step=2", "train.ckpt_every_steps=2"]
    straight = train_job.train(tiny(tmp_path / "a", *args, "train.max_steps=4"))
    train_job.train(tiny(tmp_path / "b", *args, "train.max_steps=2"))
    resumed = train_job.train(tiny(tmp_path / "b", *args, "train.max_steps=4"), resume=True)
    assert_bitwise_equal(final_state(straight), final_state(resumed))
    logs = [json.loads(x) for x in (tmp_path / "a" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert ["sra" in r for r in logs] == [True, True, False, False]
    for r in logs[2:]:
        assert r["loss"] == pytest.approx(r["denoise"], rel=1e-6)
    at_stop = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000002" / "model.safetensors"))
    end = load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(end[k], at_stop[k]) == k.startswith("aligners.sra.") for k in end if "pos_embed" not in k)
    assert len(final_state(straight)[2]["state"]) == len(final_state(straight)[2]["param_groups"][0]["params"])


def test_resume_applies_the_new_optimizer_settings_and_records_them(tmp_path):
    """--resume train.lr=... trains with the new value (it was silently kept at the checkpoint's) and records it."""
    train_job.train(tiny(tmp_path / "run", "train.max_steps=1", "train.ckpt_every_steps=1"))
    ckpt = train_job.train(tiny(tmp_path / "run", "train.max_steps=2", "train.ckpt_every_steps=1", "train.lr=3e-4",
                                "train.weight_decay=0.01"), resume=True)
    groups = torch.load(ckpt / "optimizer.bin", weights_only=True)["param_groups"]
    assert all(g["lr"] == 3e-4 and g["weight_decay"] == 0.01 for g in groups)
    assert load_config(ckpt / "config.yaml").train.lr == 3e-4


def test_lr_warmup_is_linear_in_the_step_and_resumes_exactly(tmp_path):
    """train.lr_warmup_steps=3: step s trains at lr (s + 1) / 3 (the checkpoint after step s holds that value), then
    lr; a run resumed inside the warm-up equals the uninterrupted one."""
    args = ["train.lr=1e-3", "train.lr_warmup_steps=3", "train.ckpt_every_steps=2"]
    straight = train_job.train(tiny(tmp_path / "a", *args, "train.max_steps=4"))
    train_job.train(tiny(tmp_path / "b", *args, "train.max_steps=2"))
    resumed = train_job.train(tiny(tmp_path / "b", *args, "train.max_steps=4"), resume=True)
    assert_bitwise_equal(final_state(straight), final_state(resumed))
    for step, lr in ((2, 2e-3 / 3), (4, 1e-3)):
        groups = torch.load(tmp_path / "a" / "checkpoints" / f"step-{step:08d}" / "optimizer.bin",
                            weights_only=True)["param_groups"]
        assert all(g["lr"] == pytest.approx(lr, rel=1e-12) for g in groups)
    assert train_job.learning_rate(load_config(straight / "config.yaml"), 0) == pytest.approx(1e-3 / 3)


def test_resume_on_a_finished_run_says_so_and_writes_nothing(tmp_path):
    train_job.train(tiny(tmp_path / "run", "train.max_steps=1"))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    result = run_job("train.py", ["configs/quickstart.yaml", *TINY, f"train.run_dir={tmp_path / 'run'}",
                                  "train.max_steps=1", "--resume"])
    assert result.returncode == 0
    assert "is finished" in result.stdout + result.stderr and "raise train.max_steps" in result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_resume_logs_each_step_once(tmp_path):
    """Steps logged after the last checkpoint of a run that died are logged once, from the resumed run."""
    train_job.train(tiny(tmp_path / "run", "train.max_steps=3", "train.ckpt_every_steps=2"))
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000003")  # as if killed after logging step 3
    train_job.train(tiny(tmp_path / "run", "train.max_steps=4", "train.ckpt_every_steps=2"), resume=True)
    lines = (tmp_path / "run" / "logs" / "scalars.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2, 3, 4]


def test_an_exploding_finite_loss_stops_like_a_nan(tmp_path, monkeypatch):
    """A finite loss 1000x its running median stops the run at that step, naming the last good checkpoint."""
    real_loss, calls = FlowObjective.loss, []

    def exploding(self, *args, **kwargs):
        out = real_loss(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 8:  # from the step with index 7 on: finite but 1000x larger
            out.loss = out.loss * 1000.0
        return out

    monkeypatch.setattr(FlowObjective, "loss", exploding)
    cfg = tiny(tmp_path / "run", "train.max_steps=12", "train.ckpt_every_steps=4")
    with pytest.raises(train_job.NonFiniteLoss, match=r"diverging denoising loss at step 8: .*divergence_factor=100.*"
                                                       r"step-00000004"):
        train_job.train(cfg)
    assert latest_checkpoint(cfg.train.run_dir).name == "step-00000004"
    calls.clear()
    off = tiny(tmp_path / "off", "train.max_steps=12", "train.ckpt_every_steps=4", "train.divergence_factor=0")
    assert train_job.train(off).name == "step-00000012"  # the guard can be switched off
