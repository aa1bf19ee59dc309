"""3D shapes (Mosaic-SDF) through the jobs: prepare.py (procedural shapes and mesh folders, the fitted normaliser,
resume without redoing finished shards, refusals naming the file), train.py (bitwise resume, 1 vs 2 processes, SRA
works, REPA is refused), sample.py (meshes, grid, shape metrics) and evaluate.py (mesh folders, point clouds)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from helpers import REPO, assert_two_processes_match_one, run_job
from safetensors.torch import load_file

import evaluate as evaluate_job
import prepare as prepare_job
import sample as sample_job
import train as train_job
from gen.config import load_config
from gen.data import LATENT_STATE, DataError, LatentCacheDataset, shard_file
from gen.shape_data import ProceduralShapesDataset
from latents.mosaic_sdf.procedural import write_folder

pytestmark = pytest.mark.usefixtures("fresh_accelerate", "one_thread")

CONFIG = REPO / "configs" / "quickstart_3d.yaml"
TINY = ["latent.mosaic_sdf.n=16", "latent.mosaic_sdf.k=3", "latent.mosaic_sdf.surface_samples=600",
        "latent.mosaic_sdf.mc_resolution=24", "latent.mosaic_sdf.render_size=32", "model.set_transformer.depth=2",
        "model.set_transformer.hidden_size=32", "model.set_transformer.num_heads=2", "train.global_batch_size=4",
        "train.ckpt_every_steps=1", "train.keep_checkpoints=0", "log.every_steps=1", "log.preview_every_steps=0",
        "data.num_workers=0", "sampler.num_steps=3", "eval.shape_points=64", "eval.emd_points=16",
        "sample.num_samples=4", "sample.batch_per_process=4", "sample.grid_num=4"]
ITEMS = 12  # 3 shards of 4


def prepare(out, *extra):
    args = [str(CONFIG), *TINY, "data.name=procedural_shapes", f"data.num_items={ITEMS}", *extra, "--out", str(out),
            "--shard-size", "4", "--batch-size", "2"]
    prepare_job.prepare(prepare_job.parse_args(args))
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A prepared procedural cache and a held-out reference mesh folder."""
    import accelerate.state

    root = tmp_path_factory.mktemp("shapes")
    prepare(root / "cache")
    write_folder(root / "heldout", 6, seed=1)
    accelerate.state.AcceleratorState._reset_state(True)
    return root


def run_config(shapes, run_dir, *extra):
    return load_config(CONFIG, [*TINY, f"data.path={shapes / 'cache'}", f"eval.reference={shapes / 'heldout'}",
                                f"train.run_dir={run_dir}", *extra])


def test_cache_holds_the_procedural_tokens_and_the_fitted_normaliser(shapes):
    cfg = run_config(shapes, "unused")
    cache = LatentCacheDataset(shapes / "cache")
    online = ProceduralShapesDataset.from_config(load_config(CONFIG, [*TINY, "data.num_items=12"]))
    raw = torch.stack([cache[i]["raw"] for i in range(ITEMS)])
    assert torch.equal(raw[5], online[5]["raw"]) and torch.equal(cache.labels, online.labels)
    from latents import build_latent

    expected = build_latent(cfg).fit(raw[:4]).fit(raw[4:8]).fit(raw[8:]).state_dict()["normaliser"]
    stored = torch.load(shapes / "cache" / LATENT_STATE, weights_only=True)["normaliser"]
    assert torch.equal(stored["mean"], expected["mean"]) and torch.equal(stored["std"], expected["std"])
    assert torch.equal(cache.latent_state["normaliser"]["mean"], stored["mean"])
    assert stored["count"] == ITEMS * 16  # every row of every shape


def test_a_stopped_conversion_resumes_without_redoing_finished_shards(tmp_path, monkeypatch, fresh_accelerate):
    calls = []
    convert = ProceduralShapesDataset.__getitem__

    def counted(self, index):
        calls.append(index)
        if index == 9 and stop:
            raise KeyboardInterrupt  # the conversion is stopped inside shard 2
        return convert(self, index)

    monkeypatch.setattr(ProceduralShapesDataset, "__getitem__", counted)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [shard_file(0), shard_file(1)]
    assert not (tmp_path / "c" / "meta.json").exists() and not list((tmp_path / "c").glob("*.tmp*"))
    calls.clear()
    stop = False
    prepare(tmp_path / "c")
    assert sorted(calls) == [8, 9, 10, 11]  # only the unfinished shard is converted again
    assert (tmp_path / "c" / "meta.json").is_file() and (tmp_path / "c" / LATENT_STATE).is_file()


def test_mesh_folders_convert_and_bad_meshes_are_refused_naming_the_file(tmp_path):
    write_folder(tmp_path / "m", 4, seed=0)
    out = prepare(tmp_path / "ok", "data.name=mesh_folder", f"data.path={tmp_path / 'm'}")
    assert LatentCacheDataset(out).count == 4
    box = trimesh.creation.box()
    bad = tmp_path / "m" / "box" / "open.obj"
    trimesh.Trimesh(box.vertices, box.faces[:-1]).export(bad)
    with pytest.raises(DataError, match=r"open\.obj.*not watertight.*open_meshes=winding"):
        prepare(tmp_path / "bad", "data.name=mesh_folder", f"data.path={tmp_path / 'm'}")
    assert not (tmp_path / "bad").exists()
    out = prepare(tmp_path / "winding", "data.name=mesh_folder", f"data.path={tmp_path / 'm'}",
                  "latent.mosaic_sdf.open_meshes=winding")
    assert LatentCacheDataset(out).count == 5
    bad.write_text("# an empty mesh\n")
    with pytest.raises(DataError, match=r"open\.obj"):
        prepare(tmp_path / "empty", "data.name=mesh_folder", f"data.path={tmp_path / 'm'}")


def weights(ckpt):
    return {**load_file(str(ckpt / "model.safetensors")), **{f"ema.{k}": v for k, v in
                                                            load_file(str(ckpt / "ema.safetensors")).items()}}


def test_training_resumes_bitwise_samples_meshes_and_scores_them(shapes, tmp_path):
    straight = train_job.train(run_config(shapes, tmp_path / "a", "train.max_steps=2"))
    train_job.train(run_config(shapes, tmp_path / "b", "train.max_steps=1"))
    resumed = train_job.train(run_config(shapes, tmp_path / "b", "train.max_steps=2"), resume=True)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(straight / "latent_state.pt", weights_only=True)["normaliser"]
    assert state["count"] == ITEMS * 16  # the cache's normaliser travels with every checkpoint

    out = sample_job.main([str(tmp_path / "a"), f"sample.out={tmp_path / 's' / 'samples.npz'}"])
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 16, 4 + 27) and list(data["arr_1"]) == [0, 1, 2, 3]
    meshes = sorted((tmp_path / "s" / "samples").glob("*.obj"))
    assert [m.name.split("-")[1] for m in meshes] == ["0.obj", "1.obj", "2.obj", "3.obj"]
    assert (tmp_path / "s" / "samples.png").is_file()
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert set(record["cd"]) >= {"cov-cd", "mmd-cd", "1-nna-cd"} and "1-nna-emd" in record["emd"]

    scores = evaluate_job.main([str(tmp_path / "s" / "samples"), f"eval.reference={shapes / 'heldout'}",
                                "eval.metrics=[cd,emd]", "eval.shape_points=64", "eval.emd_points=16",
                                "--out", str(tmp_path / "e.json")])
    found = json.loads(Path(scores).read_text())["metrics"]
    for key in ("cov-cd", "1-nna-cd", "cov-emd"):  # the .obj files hold the sampled meshes (to OBJ's digits)
        assert found[key] == pytest.approx(record[key.split("-")[-1]][key], abs=1e-6)
    assert found["mmd-cd"] == pytest.approx(record["cd"]["mmd-cd"], rel=1e-3)


def test_sra_trains_on_token_sets_and_repa_is_refused(shapes, tmp_path):
    train_job.train(run_config(shapes, tmp_path / "s", "train.max_steps=1", "align.methods=[sra]",
                               "align.sra.student_layer=1", "align.sra.teacher_layer=2"))
    assert '"sra"' in (tmp_path / "s" / "logs" / "scalars.jsonl").read_text()
    with pytest.raises(ValueError, match="token set with no grid"):
        train_job.train(run_config(shapes, tmp_path / "r", "train.max_steps=1", "align.methods=[repa]",
                                   "align.repa.depth=1"))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_two_processes_match_one(shapes, tmp_path):
    """Training and evaluation on 1 and 2 processes: same losses, weights (to float reduction order) and scores."""
    args = [str(CONFIG), *TINY, f"data.path={shapes / 'cache'}", "train.max_steps=2"]
    assert_two_processes_match_one(tmp_path, args, lr=1e-3, steps=2)  # configs/quickstart_3d.yaml's train.lr
    scores = {}
    for processes in (1, 2):
        args = [str(shapes / "heldout"), f"eval.reference={shapes / 'heldout'}", "eval.metrics=[cd,emd]",
                "eval.shape_points=64", "eval.emd_points=16", "--out", str(tmp_path / f"e{processes}.json")]
        result = run_job("evaluate.py", args, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[processes] = json.loads((tmp_path / f"e{processes}.json").read_text())["metrics"]
    assert scores[1] == scores[2]
    assert scores[1]["cov-cd"] == 1.0 and scores[1]["mmd-cd"] == 0.0  # a set against itself
