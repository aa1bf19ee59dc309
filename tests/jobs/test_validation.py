"""Bad input is refused before anything is written, and every expected failure ends a job in one line.

Each case runs a job's `main` (in this process, or in a subprocess where the exit code and the absence of a
traceback matter) and checks the exit, that the message is one line `error: ...` naming the key or file, and
what is on disk afterwards.
"""
import errno
import json
import os

import numpy as np
import pytest
from helpers import REPO, run_job
from PIL import Image

import evaluate
import prepare
import sample as sample_job
import train as train_job
from gen.config import ConfigError, load_config
from gen.data import build_dataset
from gen.io import NpyWriter
from gen.objectives.flow import FlowObjective

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

QUICK = str(REPO / "configs" / "quickstart.yaml")
TINY = ["model.dit.depth=1", "model.dit.hidden_size=16", "model.dit.num_heads=2", "data.image_size=8",
        "train.global_batch_size=16", "log.tracker=none", "log.preview_every_steps=0", "log.every_steps=1",
        "data.num_workers=0", "train.max_steps=1"]


def refused(job, argv) -> str:
    """Run `job.main(argv)` expecting an expected failure; return its one-line message."""
    with pytest.raises(SystemExit) as exit_:
        job.main([str(a) for a in argv])
    line = exit_.value.code
    assert isinstance(line, str), f"exit code {line!r}: not an error message"  # a str exits with status 1
    assert line.startswith("error: ") and "\n" not in line, line
    return line


def train_args(run_dir, *extra):
    return [QUICK, *TINY, f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step tiny run (digits, pixels) for sample.py and resume cases."""
    from accelerate.state import AcceleratorState, GradientState

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_job.train(load_config(QUICK, [*TINY, f"train.run_dir={run_dir}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run_dir


def image_folder(root, classes, per_class=2, size=12):
    """`classes` class folders of tiny RGB PNGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------
# Value ranges: every job refuses them before writing


@pytest.mark.parametrize("override", [
    "sampler.num_steps=0", "log.preview_num=0 log.preview_every_steps=5", "log.preview_every_steps=-1", "data.num_workers=-1",
    "data.image_size=-16", "train.global_batch_size=0", "train.grad_accum_steps=0", "train.lr=-1",
    "train.ema_decay=1.5", "train.keep_checkpoints=-1", "train.ckpt_every_steps=0", "train.seed=-1",
    "sample.batch_per_process=0", "sample.num_samples=0", "eval.batch_per_process=0", "log.fid_every_steps=-1",
    "sampler.cfg_scale=-1", "train.adam_eps=-1", "train.weight_decay=-0.1", "train.grad_clip=-1",
])
def test_train_refuses_out_of_range_values_before_writing(tmp_path, override):
    key, value = override.split()[0].split("=")
    line = refused(train_job, train_args(tmp_path / "run", *override.split()))
    assert f"'{key}'" in line and f"is {value}" in line and "allowed:" in line
    assert not (tmp_path / "run").exists()


def test_the_other_jobs_refuse_out_of_range_values(tmp_path, trained):
    line = refused(sample_job, [trained, "sampler.num_steps=0", f"sample.out={tmp_path / 's.npz'}"])
    assert "'sampler.num_steps'" in line and "is 0" in line
    line = refused(evaluate, [tmp_path / "x.npz", "eval.batch_per_process=0"])
    assert "'eval.batch_per_process'" in line
    line = refused(prepare, [QUICK, "data.num_workers=-1", "--out", tmp_path / "cache"])
    assert "'data.num_workers'" in line and "is -1" in line
    line = refused(prepare, [QUICK, "--out", tmp_path / "cache", "--shard-size", "0"])
    assert "--shard-size is 0" in line
    assert sorted(os.listdir(tmp_path)) == []


# ---------------------------------------------------------------------------------------------------
# Data: class counts and corrupt images


def test_digits_with_fewer_configured_classes_is_refused(tmp_path):
    line = refused(train_job, train_args(tmp_path / "run", "cond.num_classes=9"))
    assert "'cond.num_classes'" in line and "10 classes" in line and "cond.num_classes=9" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folders,classes", [(3, 2), (12, 2)])
def test_an_image_folder_with_more_classes_than_configured_is_refused(tmp_path, folders, classes):
    root = image_folder(tmp_path / "images", folders)
    args = train_args(tmp_path / "run", "data.name=image_folder", f"data.path={root}", f"cond.num_classes={classes}")
    line = refused(train_job, args)
    assert "'cond.num_classes'" in line and f"{folders} classes" in line and f"cond.num_classes={classes}" in line
    assert not (tmp_path / "run").exists()
    line = refused(prepare, [QUICK, "data.name=image_folder", f"data.path={root}", f"cond.num_classes={classes}",
                             "data.image_size=8", "--out", tmp_path / "cache"])
    assert "'cond.num_classes'" in line and not (tmp_path / "cache").exists()


def test_a_corrupt_image_is_named_before_training_and_the_prescan_can_be_skipped(tmp_path):
    root = image_folder(tmp_path / "images", 2)
    bad = root / "c01" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: header intact, data cut
    args = train_args(tmp_path / "run", "data.name=image_folder", f"data.path={root}", "cond.num_classes=2",
                      "train.global_batch_size=2")
    line = refused(train_job, args)
    assert str(bad) in line and "data.prescan=false" in line
    assert not (tmp_path / "run").exists()
    cfg = load_config(QUICK, [*TINY, "data.name=image_folder", f"data.path={root}", "cond.num_classes=2",
                              "data.prescan=false"])
    assert len(build_dataset(cfg)) == 4  # not scanned: the file fails only when read


# ---------------------------------------------------------------------------------------------------
# Reference statistics: checked before any Inception pass


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from gen.eval.inception import save_random_inception

    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0, live_channels=8)


def test_a_reference_without_its_keys_fails_before_the_inception_pass(tmp_path, inception, monkeypatch):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", labels=np.arange(3))  # neither mu/sigma nor arr_0
    monkeypatch.setattr(evaluate, "feed", lambda *a, **k: pytest.fail("the samples were scored"))
    line = refused(evaluate, [tmp_path / "samples.npz", f"eval.reference={tmp_path / 'ref.npz'}",
                              f"eval.inception_weights={inception}", "eval.metrics=[fid]"])
    assert str(tmp_path / "ref.npz") in line and "mu/sigma" in line and "eval.reference" in line
    assert not (tmp_path / "samples.metrics.json").exists()


def test_sample_checks_the_reference_before_sampling(tmp_path, trained, inception, monkeypatch):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(7), sigma=np.eye(7))  # another network's width
    monkeypatch.setattr(sample_job, "generate_indexed", lambda *a, **k: pytest.fail("sampling started"))
    line = refused(sample_job, [trained, "sample.metrics=[fid]", f"eval.reference={tmp_path / 'ref.npz'}",
                                f"eval.inception_weights={inception}", f"sample.out={tmp_path / 'out' / 's.npz'}"])
    assert str(tmp_path / "ref.npz") in line and "2048" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Files: YAML, weights, checkpoints


def test_a_yaml_syntax_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: quickstart.yaml\ntrain:\n  lr: [1e-3, 2\n")
    result = run_job("train.py", [bad])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {bad}:4:1: YAML syntax error: did not find expected ',' "
                                                  f"or ']'; fix that line of the config file"]
    debug = run_job("train.py", [bad, "--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_repgen_debug_re_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("REPGEN_DEBUG", "1")
    with pytest.raises(ConfigError, match="sampler.num_steps"):
        train_job.main(train_args(tmp_path / "run", "sampler.num_steps=0"))


def test_encoder_weights_mapping_on_the_command_line():
    cfg = load_config(QUICK, ["align.encoder_weights={dinov2-vit-s:/w/dinov2.pth}"])
    assert cfg.align.encoder_weights == {"dinov2-vit-s": "/w/dinov2.pth"}
    with pytest.raises(ConfigError, match=r"align.encoder_weights.*unknown encoder\(s\) \['dino'\]"):
        load_config(QUICK, ["align.encoder_weights={dino:/w/x.pth}"])


def test_encoder_weights_that_are_not_a_checkpoint_name_the_key(tmp_path):
    junk = tmp_path / "dinov2.pth"
    junk.write_text("not a checkpoint")
    line = refused(prepare, [QUICK, "data.cache_features=[dinov2-vit-s]", f"align.encoder_weights.dinov2-vit-s={junk}",
                             "--out", tmp_path / "cache"])
    assert str(junk) in line and "align.encoder_weights" in line
    assert not (tmp_path / "cache").exists()


def test_missing_weights_are_one_line(tmp_path):
    line = refused(train_job, train_args(tmp_path / "run", "latent.name=sd-vae", "data.image_size=16",
                                         f"latent.sd_vae.vae_path={tmp_path / 'no-vae'}"))
    assert "latent.sd_vae.vae_path" in line and not (tmp_path / "run").exists()
    line = refused(sample_job, [tmp_path / "no-run"])
    assert str(tmp_path / "no-run") in line


# ---------------------------------------------------------------------------------------------------
# Writes that fail: disk full, read-only folders; nothing half-written stays


@pytest.mark.parametrize("failure", ["enospc", "torch"])
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, failure):
    import gen.checkpoint

    def full(*args, **kwargs):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(gen.checkpoint, "save_file", full)
    line = refused(train_job, train_args(tmp_path / "run"))
    assert line.startswith("error: disk full while writing") and ".tmp-step-00000001" in line and "free space" in line
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_read_only_folder_while_writing_is_one_line(tmp_path, monkeypatch, code):
    import gen.checkpoint

    def denied(tensors, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(gen.checkpoint, "save_file", denied)
    line = refused(train_job, train_args(tmp_path / "run"))
    assert line.startswith("error: cannot write") and "ema.safetensors" in line and "writable" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")
def test_a_read_only_run_dir_is_refused_before_anything_is_built(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        line = refused(train_job, train_args(tmp_path / "ro" / "run"))
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert "'train.run_dir'" in line and "not writable" in line
    assert not (tmp_path / "ro" / "run").exists()


def test_a_run_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    line = refused(train_job, train_args(tmp_path / "file" / "run"))
    assert "'train.run_dir'" in line and "is a file" in line


def test_sample_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, trained, monkeypatch):
    class FullDisk(NpyWriter):
        def write(self, rows):
            self._guard(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))

    monkeypatch.setattr(sample_job, "NpyWriter", FullDisk)
    out = tmp_path / "samples" / "s.npz"
    line = refused(sample_job, [trained, "sample.num_samples=4", "sampler.num_steps=2", "sample.metrics=[]",
                                f"sample.out={out}"])
    assert line.startswith("error: disk full while writing") and "part-0.npy" in line
    assert [p for p in os.listdir(out.parent) if not p.endswith(".lock")] == []


def test_sample_failure_removes_its_temporary_files(tmp_path, trained, monkeypatch):
    def dies(*args, **kwargs):
        raise RuntimeError("simulated crash while sampling")
        yield  # a generator, as generate_indexed

    monkeypatch.setattr(sample_job, "generate_indexed", dies)
    out = tmp_path / "s.npz"
    with pytest.raises(RuntimeError, match="simulated"):  # a bug keeps its traceback
        sample_job.main([str(trained), "sample.num_samples=4", "sample.metrics=[]", f"sample.out={out}"])
    assert not (tmp_path / ".tmp-s").exists() and not out.exists()


def test_the_npy_writer_reports_a_full_disk_as_an_oserror():
    writer = NpyWriter("/dev/full", (4, 2), np.uint8)
    writer.write(np.zeros((4, 2), np.uint8))
    with pytest.raises(OSError) as err:
        writer.close()
    assert err.value.errno == errno.ENOSPC and err.value.filename == "/dev/full"


def test_the_npy_writer_writes_a_loadable_array(tmp_path):
    rows = np.arange(24, dtype=np.uint8).reshape(4, 3, 2)
    writer = NpyWriter(tmp_path / "a.npy", rows.shape, rows.dtype)
    writer.write(rows[:1])
    writer.write(rows[1:])
    np.testing.assert_array_equal(np.load(writer.close()), rows)


# ---------------------------------------------------------------------------------------------------
# Resume and the NaN guard


@pytest.mark.parametrize("change,diff", [
    (["align.methods=[sra]", "align.sra.student_layer=1", "align.sra.teacher_layer=1"],
     "align.methods: [] -> ['sra']"),
    (["model.dit.hidden_size=32"], "model.dit.hidden_size: 16 -> 32"),
])
def test_resume_refuses_keys_that_may_not_change(tmp_path, trained, change, diff):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    line = refused(train_job, train_args(run_dir, "train.max_steps=2", *change) + ["--resume"])
    assert diff in line and "may not change on resume" in line
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_resume_refuses_an_aligner_removed(tmp_path):
    sra = ["align.methods=[sra]", "align.sra.student_layer=1", "align.sra.teacher_layer=1"]
    train_job.train(load_config(QUICK, [*TINY, f"train.run_dir={tmp_path / 'run'}", *sra]))
    line = refused(train_job, train_args(tmp_path / "run", "train.max_steps=2") + ["--resume"])
    assert "align.methods: ['sra'] -> []" in line
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000001"]


def test_the_nan_message_counts_steps_like_the_logs(tmp_path, monkeypatch):
    real_loss, calls = FlowObjective.loss, []

    def poisoned(self, *args, **kwargs):
        out = real_loss(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FlowObjective, "loss", poisoned)
    line = refused(train_job, train_args(tmp_path / "run", "train.max_steps=5"))
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert logged == [1, 2] and "non-finite loss at step 3, micro-batch 0" in line
