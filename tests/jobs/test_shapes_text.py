"""Text-conditioned shapes through the jobs: prepare.py caches the captions' text-encoder tokens with the latents
(a stopped conversion resumes without encoding finished shards again), train.py reads them from the cache (the
encoder is never loaded) with text previews, sample.py conditions on sample.captions; the missing pieces are one
line each."""
import json

import numpy as np
import pytest
import torch
from helpers import REPO, assert_two_processes_match_one, tiny_clip
from safetensors.torch import load_file
from test_shapes import TINY as SHAPES_TINY

import prepare as prepare_job
import sample as sample_job
import train as train_job
from gen.config import ConfigError, load_config
from gen.data import DataError, LatentCacheDataset, features_file
from gen.errors import message
from gen.shape_data import ProceduralShapesDataset
from gen.text import TEXT_FEATURE, TextEncoder
from latents.mosaic_sdf.procedural import CLASSES, ProceduralShapes, caption, write_folder

CONFIG = REPO / "configs" / "quickstart_3d_text.yaml"
TINY = [*SHAPES_TINY, "log.preview_every_steps=2", "log.preview_num=6", "sample.metrics=[]", "cond.text_dim=16",
        "cond.text_tokens=8"]  # the untexted tests' sizes, with text tokens and previews
ITEMS = 12  # 3 shards of 4


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip", dim=16, positions=12)


def prepare(out, clip, *extra):
    args = [str(CONFIG), *TINY, "data.name=procedural_shapes", f"data.num_items={ITEMS}", f"cond.text_encoder={clip}",
            *extra, "--out", str(out), "--shard-size", "4", "--batch-size", "2"]
    prepare_job.prepare(prepare_job.parse_args(args))
    return out


def test_prepare_caches_caption_tokens_and_resumes_without_encoding_them_again(tmp_path, clip, monkeypatch,
                                                                                fresh_accelerate):
    encoded, stop = [], True
    encode, convert = TextEncoder.__call__, ProceduralShapesDataset.__getitem__

    def counted(self, captions):
        encoded.extend(captions)
        return encode(self, captions)

    def stopping(self, index):
        if index == 9 and stop:
            raise KeyboardInterrupt  # the conversion is stopped inside shard 2
        return convert(self, index)

    monkeypatch.setattr(TextEncoder, "__call__", counted)
    monkeypatch.setattr(ProceduralShapesDataset, "__getitem__", stopping)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "c", clip)
    assert (tmp_path / "c" / features_file(TEXT_FEATURE, 1)).is_file()
    assert not (tmp_path / "c" / features_file(TEXT_FEATURE, 2)).exists()
    encoded.clear()
    stop = False
    out = prepare(tmp_path / "c", clip)
    shapes = ProceduralShapes(ITEMS)
    captions = [caption(shapes[i][0], CLASSES[i % len(CLASSES)]) for i in range(ITEMS)]
    assert encoded == captions[8:]  # only the unfinished shard's captions are encoded again
    cache = LatentCacheDataset(out)
    assert json.loads((out / "meta.json").read_text())["text"]["shape"] == [8, 16] and cache.text_shape == (8, 16)
    expected = TextEncoder(clip, 8)(captions).half().float()
    stored = torch.stack([cache[i]["text"] for i in range(ITEMS)])
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)  # batched by 2 vs all at once


def test_a_text_run_trains_from_the_cache_and_samples_captions(tmp_path, clip, monkeypatch, fresh_accelerate):
    cache = prepare(tmp_path / "cache", clip)
    captions = tmp_path / "captions.txt"
    captions.write_text("a large tall box\n\na small flat sphere\n")

    def run_cfg(run, *extra):
        return load_config(CONFIG, [*TINY, f"data.path={cache}", f"train.run_dir={run}", "train.max_steps=2",
                                    f"cond.text_encoder={tmp_path / 'absent'}", *extra])

    def no_encoder(*args, **kwargs):
        raise AssertionError("training loaded the text encoder")

    monkeypatch.setattr(TextEncoder, "__init__", no_encoder)
    train_job.train(run_cfg(tmp_path / "run"))  # the encoder folder does not even exist: tokens come from the cache
    assert sorted(p.name for p in (tmp_path / "run" / "previews").glob("*.png")) == ["step-00000002.png"]
    with pytest.raises(DataError, match=r"holds text tokens \(8, 16\), but cond.text_dim=8"):
        train_job.train(run_cfg(tmp_path / "bad", "cond.text_dim=8"))
    monkeypatch.undo()

    out = sample_job.main([str(tmp_path / "run"), f"sample.out={tmp_path / 's' / 'samples.npz'}",
                           f"cond.text_encoder={clip}", f"sample.captions={captions}"])
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 16, 4 + 27) and np.isfinite(data["arr_0"]).all()
    for override, error, text in ((f"cond.text_encoder={tmp_path / 'absent'}", FileNotFoundError,
                                   "cond.text_encoder"), ("sample.captions=null", ConfigError, "sample.captions")):
        with pytest.raises(error) as err:
            sample_job.run(str(tmp_path / "run"), [f"sample.out={tmp_path / 'x' / 'x.npz'}",
                                                   f"cond.text_encoder={clip}", f"sample.captions={captions}",
                                                   override])
        assert text in message(err.value)


def test_mesh_folder_captions_come_from_captions_tsv(tmp_path):
    from gen.shape_data import CAPTIONS_FILE, MeshFolderDataset

    root = tmp_path / "m"
    write_folder(root, 3, seed=0)  # box/000000.obj, sphere/000001.obj, capsule/000002.obj
    assert MeshFolderDataset(root, latent=None, check_files=False).captions is None  # no file: no captions
    (root / CAPTIONS_FILE).write_text("sphere/000001.obj\ta round ball\nbox/000000.obj\ta crate\n\n"
                                      "capsule/000002.obj\ta pill\n")
    dataset = MeshFolderDataset(root, latent=None, check_files=False)
    assert dataset.captions == ["a crate", "a pill", "a round ball"]  # in the dataset's (sorted class) order
    (root / CAPTIONS_FILE).write_text("box/000000.obj\ta crate\n")
    with pytest.raises(DataError, match=r"captions.tsv has no caption for 2 meshes.*capsule/000002.obj"):
        MeshFolderDataset(root, latent=None, check_files=False)
    (root / CAPTIONS_FILE).write_text("box/000000.obj a crate\n")
    with pytest.raises(DataError, match="line 1 has no tab"):
        MeshFolderDataset(root, latent=None, check_files=False)


@pytest.mark.slow
def test_two_processes_match_one_with_text(tmp_path, clip, fresh_accelerate):
    """Text-conditioned training on 1 and 2 processes: same losses and weights (to float reduction order)."""
    cache = prepare(tmp_path / "cache", clip)
    args = [str(CONFIG), *TINY, f"data.path={cache}", "train.max_steps=2", "log.preview_every_steps=0"]
    assert_two_processes_match_one(tmp_path, args, lr=1e-3, steps=2)
    weights = load_file(str(tmp_path / "p1" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert any("context_blocks" in k for k in weights)
