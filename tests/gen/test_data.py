"""Datasets (digits, image folders, latent caches) and the resumable distributed batch sampler."""
import itertools
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from torch.utils.data import DataLoader

from gen.config import Config, ConfigError, DataConfig
from gen.data import (
    DATASETS,
    DataError,
    DigitsDataset,
    DistributedBatchSampler,
    ImageFolderDataset,
    LatentCacheDataset,
    adm_center_crop,
    build_dataset,
    dataset_channels,
    features_file,
    labels_file,
    shard_file,
)

# ------------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_balance_and_determinism():
    train, heldout = DigitsDataset("train", 16), DigitsDataset("heldout", 16)
    assert len(train) + len(heldout) == 1797 and len(heldout) == 360
    item = train[3]
    assert set(item) == {"image", "label", "index"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 16, 16)
    assert item["label"].dtype == torch.int64 and int(item["index"]) == 3
    # Disjoint, covering, and the same on every construction.
    assert not set(train.source_indices) & set(heldout.source_indices)
    assert len(set(train.source_indices) | set(heldout.source_indices)) == 1797
    again = DigitsDataset("heldout", 16)
    assert np.array_equal(again.source_indices, heldout.source_indices) and torch.equal(again.images, heldout.images)
    # Stratified: every class keeps its 20% share in the held-out split, to within one image.
    totals = np.bincount(load_digits().target, minlength=10)
    held = torch.bincount(heldout.labels, minlength=10).numpy()
    assert np.all(np.abs(held - 0.2 * totals) <= 1)
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test", 16)


def test_digits_values_and_upsampling():
    native = DigitsDataset("train", 8)  # same size: no resampling, just the 0..16 -> 0..255 scaling
    source = load_digits()
    expected = np.round(source.images[native.source_indices] * 255 / 16).astype(np.uint8)
    assert np.array_equal(native.images[:, 0].numpy(), expected)
    assert torch.equal(native.labels, torch.from_numpy(source.target[native.source_indices]))
    big = DigitsDataset("train", 32)
    assert big.images.shape == (1437, 1, 32, 32) and big.images.max() == 255
    # Upsampling keeps the mean brightness of each digit (bilinear, antialiased).
    assert torch.allclose(big.images.float().mean((1, 2, 3)), native.images.float().mean((1, 2, 3)), atol=6)


# ------------------------------------------------------------------------------------- image folders


def _photos():
    return [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg (640x427)


def test_adm_center_crop_matches_the_adm_steps():
    china = _photos()[0]
    assert china.size == (640, 427)
    out = adm_center_crop(china, 64)
    # 427 >= 128: BOX to 320x213, again to 160x106; BICUBIC to (round(160*64/106)=97, 64); crop 16 px left.
    step = china.resize((320, 213), Image.BOX).resize((160, 106), Image.BOX).resize((97, 64), Image.BICUBIC)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(step)[:, 16:80])
    # Python's round: 27 * 20/24 = 22.5 -> 22 (half to even), so a 27x24 image resizes to 22x20, crop x = 1.
    small = china.crop((0, 0, 27, 24))
    assert np.array_equal(adm_center_crop(small, 20), np.asarray(small.resize((22, 20), Image.BICUBIC))[:, 1:21])
    # An image already at the target size passes through unchanged.
    square = china.crop((100, 100, 164, 164))
    assert np.array_equal(adm_center_crop(square, 64), np.asarray(square))


@pytest.fixture
def folder(tmp_path):
    china, flower = _photos()
    root = tmp_path / "images"
    for name in ("zebra", "apple", "mango/nested"):
        (root / name).mkdir(parents=True)
    china.save(root / "zebra" / "a.png")  # lossless: items compare exactly
    flower.save(root / "apple" / "b.png")
    china.crop((0, 0, 300, 200)).convert("L").save(root / "mango" / "nested" / "grey.png")
    flower.save(root / "mango" / "c.JPEG")
    (root / "apple" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root


def test_image_folder_labels_and_items(folder):
    ds = ImageFolderDataset(folder, 32)
    assert ds.classes == ["apple", "mango", "zebra"] and ds.num_classes == 3 and len(ds) == 4
    assert ds.labels.tolist() == [0, 1, 1, 2]  # mango: c.JPEG, then nested/grey.png
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8 and int(item["label"]) == 2
    expected = adm_center_crop(_photos()[0], 32)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), expected)
    grey = ds[2]["image"]  # an L image becomes RGB with equal channels
    assert grey.shape == (3, 32, 32) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    flips = {bool(torch.equal(ImageFolderDataset(folder, 32, hflip=True)[3]["image"], item["image"].flip(-1)))
             for _ in range(30)}
    assert flips == {True, False}
    # Through the config the dataset never flips: train.py flips whole batches (world-size independent).
    configured = build_dataset(Config(data=DataConfig(name="image_folder", path=str(folder), image_size=32, hflip=True)))
    assert all(torch.equal(configured[3]["image"], item["image"]) for _ in range(5))
    assert dataset_channels(Config(data=DataConfig(name="image_folder", path=str(folder)))) == 3


def test_image_folder_refuses_unreadable_files(folder):
    (folder / "zebra" / "broken.png").write_bytes(b"this is not a png")
    data = (folder / "mango" / "c.JPEG").read_bytes()
    (folder / "zebra" / "cut.jpg").write_bytes(data[: len(data) // 3])  # truncated download
    deep = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(deep).save(folder / "apple" / "deep.png")  # 16-bit grayscale: mode I;16
    ds = ImageFolderDataset(folder, 16)
    for name, match in (("broken.png", "corrupt or not an image"), ("cut.jpg", "corrupt or not an image"),
                        ("deep.png", "I;16")):
        index = next(i for i, f in enumerate(ds.files) if f.endswith(name))
        with pytest.raises(DataError, match=match) as err:
            ds[index]
        assert name in str(err.value) and "remove" in str(err.value)


def test_image_folder_validation(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", 32)
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match=r"without images.*cats"):
        ImageFolderDataset(tmp_path, 32)
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(Config(data=DataConfig(name="image_folder")))
    with pytest.raises(ConfigError, match="data.name"):
        build_dataset(Config(data=DataConfig(name="cifar")))
    assert set(DATASETS) == {"digits", "image_folder", "latent_cache", "hf", "procedural_shapes", "mesh_folder"}


# -------------------------------------------------------------------------------------- latent cache


def _write_cache(path, count=7, shard_size=3, raw_shape=(2, 4, 4), features=None):
    """A cache as prepare.py writes it; `features` {name: (T, d)} adds float16 feature shards (returned too)."""
    path.mkdir()
    values = np.arange(count * int(np.prod(raw_shape)), dtype=np.float32).reshape(count, *raw_shape)
    g = np.random.default_rng(0)
    feats = {name: g.standard_normal((count, *shape)).astype(np.float16) for name, shape in (features or {}).items()}
    for k in range(0, count, shard_size):
        np.save(path / shard_file(k // shard_size), values[k:k + shard_size])
        np.save(path / labels_file(k // shard_size), np.arange(k, min(k + shard_size, count), dtype=np.int64) % 5)
        for name, f in feats.items():
            np.save(path / features_file(name, k // shard_size), f[k:k + shard_size])
    meta = {"raw_shape": list(raw_shape), "dtype": "float32", "count": count, "shard_size": shard_size,
            "latent": {"name": "pixel"}, "image_size": 4, "channels": 2, "num_classes": 5}
    if features:
        meta["features"] = {name: {"shape": list(shape), "dtype": "float16", "encoder": "arch", "weights": None}
                            for name, shape in features.items()}
    (path / "meta.json").write_text(json.dumps(meta))
    return (values, feats) if features else values


def test_latent_cache_reads_shards(tmp_path):
    values = _write_cache(tmp_path / "cache")
    ds = LatentCacheDataset(tmp_path / "cache", expected_raw_shape=(2, 4, 4))
    assert len(ds) == 7 and ds.num_classes == 5
    for i in range(7):
        item = ds[i]
        assert np.array_equal(item["raw"].numpy(), values[i]) and int(item["label"]) == i % 5 and int(item["index"]) == i
        assert "feats" not in item  # a cache without encoder features (or made before they existed)
    assert ds.feature_names == () and ds.feature_shapes == {}
    with pytest.raises(IndexError):
        ds[7]
    assert len(pickle.dumps(ds)) < 4000  # workers get paths, not copies of the memory maps
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["raw"].shape == (4, 2, 4, 4) and batch["label"].dtype == torch.int64


def test_latent_cache_refuses_bad_caches(tmp_path):
    _write_cache(tmp_path / "cache")
    with pytest.raises(DataError, match=r"\(2, 4, 4\).*needs \(8, 4, 4\).*prepare.py"):
        LatentCacheDataset(tmp_path / "cache", expected_raw_shape=(8, 4, 4))
    np.save(tmp_path / "cache" / shard_file(1), np.zeros((3, 2, 4, 5), np.float32))
    with pytest.raises(DataError, match=r"shard-00001.npy.*inconsistent.*prepare.py"):
        LatentCacheDataset(tmp_path / "cache")
    np.save(tmp_path / "cache" / shard_file(1), np.zeros((3, 2, 4, 4), np.float32))
    LatentCacheDataset(tmp_path / "cache")
    (tmp_path / "cache" / shard_file(2)).unlink()
    with pytest.raises(DataError, match="lacks shard-00002.npy"):
        LatentCacheDataset(tmp_path / "cache")
    (tmp_path / "cache" / "meta.json").unlink()
    with pytest.raises(DataError, match=r"incomplete latent cache.*meta.json.*prepare.py"):
        LatentCacheDataset(tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        LatentCacheDataset(tmp_path / "elsewhere")


def test_latent_cache_features(tmp_path):
    shapes = {"dinov2-vit-s": (4, 6), "clip-vit-l": (4, 3)}
    values, feats = _write_cache(tmp_path / "cache", features=shapes)
    ds = LatentCacheDataset(tmp_path / "cache", expected_raw_shape=(2, 4, 4))
    assert ds.feature_names == ("dinov2-vit-s", "clip-vit-l") and ds.feature_shapes == shapes
    item = ds[4]
    assert np.array_equal(item["raw"].numpy(), values[4]) and set(item["feats"]) == set(shapes)
    for name in shapes:
        assert item["feats"][name].dtype == torch.float32
        assert np.array_equal(item["feats"][name].numpy(), feats[name][4].astype(np.float32))
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=1)))  # through a pickled worker copy too
    assert batch["feats"]["clip-vit-l"].shape == (4, 4, 3) and batch["feats"]["dinov2-vit-s"].shape == (4, 4, 6)
    assert np.array_equal(batch["feats"]["dinov2-vit-s"][3].numpy(), feats["dinov2-vit-s"][3].astype(np.float32))

    # A feature shard of the wrong shape or dtype, unreadable, or missing: the file and the fix are named.
    file = tmp_path / "cache" / features_file("clip-vit-l", 1)
    assert file.name == "feats-clip-vit-l-00001.npy"
    for bad in (np.zeros((3, 4, 4), np.float16), np.zeros((3, 4, 3), np.float32)):
        np.save(file, bad)
        with pytest.raises(DataError, match=r"feats-clip-vit-l-00001.npy holds .* implies float16 \(3, 4, 3\).*"
                                            r"inconsistent.*prepare.py.*data.cache_features"):
            LatentCacheDataset(tmp_path / "cache")
    file.write_bytes(b"\x93NUMPY half written")
    with pytest.raises(DataError, match=r"cannot read .*feats-clip-vit-l-00001.npy.*prepare.py"):
        LatentCacheDataset(tmp_path / "cache")
    file.unlink()
    with pytest.raises(DataError, match="lacks feats-clip-vit-l-00001.npy"):
        LatentCacheDataset(tmp_path / "cache")


# ------------------------------------------------------------------------------------------- sampler


def _steps(sampler, num_steps):
    """Per optimizer step: this rank's micro-batches."""
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.grad_accum_steps)] for _ in range(num_steps)]


def _global_steps(num_items, batch, world, accum, num_steps, seed=0):
    """Per optimizer step: the indices of all ranks, in micro-step then rank order."""
    per_rank = [_steps(DistributedBatchSampler(num_items, batch, world, r, accum, seed), num_steps) for r in range(world)]
    return [[i for a in range(accum) for r in range(world) for i in per_rank[r][s][a]] for s in range(num_steps)]


def test_sampler_union_over_ranks_is_independent_of_world_size():
    reference = _global_steps(103, 12, 1, 1, 20)  # 8 steps per epoch: crosses two epoch boundaries
    assert _global_steps(103, 12, 2, 1, 20) == reference
    assert _global_steps(103, 12, 2, 2, 20) == reference
    assert _global_steps(103, 12, 3, 2, 20) == reference
    assert _global_steps(103, 12, 2, 2, 20, seed=1) != reference


def test_sampler_epochs_cover_each_index_once_in_new_orders():
    sampler = DistributedBatchSampler(103, 12, 1, 0, seed=3)
    assert len(sampler) == 8
    first, second = ([i for step in steps for batch in step for i in batch] for steps in
                     (_steps(sampler, 16)[:8], _steps(DistributedBatchSampler(103, 12, 1, 0, seed=3), 16)[8:]))
    assert len(first) == len(set(first)) == 96 and set(first) <= set(range(103))  # tail of 7 dropped
    assert len(second) == len(set(second)) == 96 and first != second
    fixed = DistributedBatchSampler(24, 12, 2, 1, shuffle=False)
    assert _steps(fixed, 3) == [[[6, 7, 8, 9, 10, 11]], [[18, 19, 20, 21, 22, 23]], [[6, 7, 8, 9, 10, 11]]]


@pytest.mark.parametrize("consumed", [5, 9, 16])  # mid-step, mid-epoch, exactly one epoch (8 steps x 2)
def test_sampler_resume_continues_the_uninterrupted_order(consumed):
    def make():
        return DistributedBatchSampler(103, 12, 2, 1, grad_accum_steps=2, seed=5)

    uninterrupted = list(itertools.islice(iter(make()), 40))
    first = make()
    it = iter(first)
    for _ in range(consumed):
        next(it)
    state = first.state_dict()
    done = consumed // 2  # optimizer steps whose micro-batches were all handed out
    assert state == first.position(done) == {"epoch": done // 8, "step_in_epoch": done % 8}
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert list(itertools.islice(iter(resumed), 40 - 2 * done)) == uninterrupted[2 * done:]


def test_sampler_in_a_dataloader_and_errors():
    ds = DigitsDataset("train", 8)
    loader = DataLoader(ds, batch_sampler=DistributedBatchSampler(len(ds), 16, 2, 0, grad_accum_steps=2))
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 8, 8) and batch["index"].shape == (4,)
    with pytest.raises(ConfigError, match="not divisible"):
        DistributedBatchSampler(100, 10, 4, 0)
    with pytest.raises(ConfigError, match="exceeds the dataset"):
        DistributedBatchSampler(10, 16, 1, 0)
