"""One writer per run directory (train.py) and per sample output (sample.py); a killed holder's lock is taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

from gen.io import FolderLock, LockHeld

TINY = ["model.name=SiT-S/4", "model.dit.depth=1", "model.dit.hidden_size=16", "model.dit.num_heads=2",
        "data.image_size=8", "train.global_batch_size=16", "log.tracker=none", "log.preview_every_steps=0",
        "data.num_workers=0", "train.ckpt_every_steps=1", "train.keep_checkpoints=0"]


def job(*args):
    """train.py in a subprocess (one thread), its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "train.py", "configs/quickstart.yaml", *TINY, *map(str, args)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def holder(run_dir) -> dict:
    text = (run_dir / FolderLock.NAME).read_text() if (run_dir / FolderLock.NAME).is_file() else ""
    return json.loads(text) if text else {}


def test_second_train_refuses_and_a_killed_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = job(f"train.run_dir={run_dir}", "train.max_steps=100000")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-00000001").is_dir())
        assert holder(run_dir)["pid"] == first.pid and holder(run_dir)["job"] == "train.py"
        second = job(f"train.run_dir={run_dir}", "train.max_steps=100000", "--resume")
        out, err = second.communicate(timeout=300)
        assert second.returncode != 0
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "held by another job" in last and f'"pid": {first.pid}' in last
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.communicate(timeout=60)
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    resume_at = int(steps[-1].split("-")[1])
    third = job(f"train.run_dir={run_dir}", f"train.max_steps={resume_at + 1}", "--resume")
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-2000:]
    assert (run_dir / "checkpoints" / f"step-{resume_at + 1:08d}").is_dir()
    assert holder(run_dir)["pid"] == third.pid  # the stale record was rewritten by the new holder


def test_folder_lock_is_exclusive_while_held_and_free_after_release(tmp_path):
    """In one process: a second descriptor cannot take the held lock; after release it can."""
    with FolderLock(tmp_path, "a"):
        with pytest.raises(LockHeld, match=r'held by another job \(\{"job": "a"'):
            FolderLock(tmp_path, "b").acquire()
    with FolderLock(tmp_path, "b"):
        assert holder(tmp_path)["job"] == "b"


@pytest.mark.usefixtures("fresh_accelerate")
def test_sample_refuses_an_output_another_job_writes(tmp_path):
    """sample.py refuses an output whose lock is held (another sample.py writing the same file) and writes nothing."""
    import sample as sample_job
    import train as train_job
    from gen.config import load_config

    run_dir = tmp_path / "run"
    train_job.train(load_config(REPO / "configs" / "quickstart.yaml", [*TINY, f"train.run_dir={run_dir}",
                                                                        "train.max_steps=1"]))
    out = tmp_path / "s.npz"
    with FolderLock(tmp_path, "sample.py", f".{out.stem}.lock"):
        with pytest.raises(SystemExit, match="held by another job"):
            sample_job.main([str(run_dir), "sample.num_samples=2", f"sample.out={out}", "sampler.num_steps=2"])
    assert not out.exists() and not (tmp_path / ".tmp-s").exists()
    sample_job.main([str(run_dir), "sample.num_samples=2", f"sample.out={out}", "sampler.num_steps=2"])
    assert out.is_file()


def test_two_process_train_refuses_a_held_run_dir_on_every_rank(tmp_path):
    """Under `accelerate launch` with 2 processes, the main process's verdict on a held lock reaches the other rank:
    both end with the one-line error (no rank hangs waiting for the other, none writes)."""
    from helpers import run_job

    run_dir = tmp_path / "run"
    with FolderLock(run_dir, "another job"):
        done = run_job("train.py", ["configs/quickstart.yaml", *TINY, f"train.run_dir={run_dir}",
                                    "train.max_steps=1"], processes=2)
        assert sorted(p.name for p in run_dir.iterdir()) == [FolderLock.NAME]
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all('held by another job ({"job": "another job"' in e for e in errors), done.stderr
    ranks = done.stderr.split("torch/distributed/elastic")[0]  # what follows is the launcher's own report
    assert "Traceback" not in ranks
