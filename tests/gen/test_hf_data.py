"""data.name=hf: Hugging Face datasets read offline (save_to_disk folders, parquet/arrow files, the local HF caches),
item for item what the image folder gives for the same images, and through prepare.py and train.py."""
import io
import json
import pickle
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, run_job
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits, load_sample_images
from torch.utils.data import DataLoader

import prepare
import train as train_job
from gen.config import Config, ConfigError, DataConfig, CondConfig, load_config
from gen.data import DATASETS, DataError, ImageFolderDataset, LatentCacheDataset, build_dataset, dataset_channels
from gen.hf_data import HFDataset, load_hf
from latents import PixelSpace

FEATURES = datasets.Features({"image": datasets.Image(),
                              "label": datasets.ClassLabel(names=["apple", "mango", "zebra"])})
INT_LABELS = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


@pytest.fixture(autouse=True)
def hf_caches(tmp_path, monkeypatch):
    """Empty Hugging Face caches in tmp_path, here and in the jobs' subprocesses; `datasets` must not go online."""
    caches = {"HF_DATASETS_CACHE": tmp_path / "hf-datasets", "HF_HUB_CACHE": tmp_path / "hf-hub"}
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(caches["HF_DATASETS_CACHE"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(caches["HF_HUB_CACHE"]))
    for name, path in caches.items():
        monkeypatch.setenv(name, str(path))
    calls = []
    for name in ("hf_hub_download", "dataset_info", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, _name=name, **k: calls.append(_name))
    datasets.disable_progress_bars()
    yield caches
    assert not calls, f"the Hub was asked for {calls}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """An image folder (RGB photos, a greyscale and an RGBA crop) and the same PNG files as rows of an HF dataset."""
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)  # 640x427
    root = tmp_path / "images"
    files = {"zebra/a.png": china, "apple/b.png": flower, "mango/grey.png": china.crop((0, 0, 300, 200)).convert("L"),
             "mango/rgba.png": flower.crop((50, 20, 250, 170)).convert("RGBA")}
    for name, image in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    reference = ImageFolderDataset(root, 32)
    rows = {"image": [{"bytes": Path(f).read_bytes(), "path": None} for f in reference.files],
            "label": reference.labels.tolist()}
    return reference, datasets.Dataset.from_dict(rows, features=FEATURES)


def _digits(n=None):
    """scikit-learn's 8x8 digits as greyscale PNG rows (Image feature) with int labels."""
    digits = load_digits()
    images = np.round(digits.images[:n] * 255 / 16).astype(np.uint8)
    rows = {"image": [{"bytes": _png(Image.fromarray(a)), "path": None} for a in images],
            "label": digits.target[:n].tolist()}
    return datasets.Dataset.from_dict(rows, features=INT_LABELS)


def _same(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and int(x["label"]) == int(y["label"]) and int(x["index"]) == i


# ------------------------------------------------------------------------------------------------ sources


def test_save_to_disk_items_equal_the_image_folder(folder, tmp_path):
    reference, rows = folder
    rows.save_to_disk(str(tmp_path / "saved"))
    ds = HFDataset(str(tmp_path / "saved"), 32, num_classes=3)
    assert ds.classes == ["apple", "mango", "zebra"] and ds.num_classes == 3 and ds.labels.tolist() == [0, 1, 1, 2]
    _same(ds, reference)  # same bytes, same ADM center crop, grey and RGBA -> RGB
    item = ds[1]
    assert set(item) == {"image", "label", "index"} and item["image"].dtype == torch.uint8
    assert item["image"].shape == (3, 32, 32) and item["label"].dtype == torch.int64
    grey = item["image"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # Through the config: the registry, channels, and DataLoader workers on a pickled (memory-mapped) copy.
    cfg = Config(data=DataConfig(name="hf", path=str(tmp_path / "saved"), image_size=32, hflip=True),
                 cond=CondConfig(num_classes=3))
    configured = build_dataset(cfg)
    assert DATASETS["hf"] is HFDataset and dataset_channels(cfg) == 3
    assert all(torch.equal(configured[3]["image"], reference[3]["image"]) for _ in range(5))  # never flips
    assert len(pickle.dumps(configured)) < 20_000  # workers get the arrow file's path, not the images
    batch = next(iter(DataLoader(configured, batch_size=4, num_workers=2)))
    assert torch.equal(batch["image"], torch.stack([reference[i]["image"] for i in range(4)]))
    assert batch["label"].tolist() == [0, 1, 1, 2]
    flips = {bool(torch.equal(HFDataset(str(tmp_path / "saved"), 32, hflip=True)[3]["image"],
                              reference[3]["image"].flip(-1))) for _ in range(30)}
    assert flips == {True, False}


def test_parquet_arrow_and_split_folders(tmp_path):
    rows = _digits(60)
    rows.save_to_disk(str(tmp_path / "saved"))
    reference = HFDataset(str(tmp_path / "saved"), 16)
    assert reference.classes is None and reference.num_classes == 10
    assert reference.labels.tolist() == load_digits().target[:60].tolist()
    rows.to_parquet(str(tmp_path / "digits.parquet"))
    _same(HFDataset(str(tmp_path / "digits.parquet"), 16), reference)
    arrow = next((tmp_path / "saved").glob("*.arrow"))  # save_to_disk's own shard: an arrow stream file
    _same(HFDataset(str(arrow), 16), reference)
    # A folder of split-named files, and a DatasetDict folder: data.split picks one.
    (tmp_path / "files" / "data").mkdir(parents=True)
    rows.select(range(40)).to_parquet(str(tmp_path / "files" / "data" / "train-00000-of-00001.parquet"))
    rows.select(range(40, 60)).to_parquet(str(tmp_path / "files" / "data" / "test-00000-of-00001.parquet"))
    datasets.DatasetDict({"train": rows.select(range(40)), "test": rows.select(range(40, 60))}).save_to_disk(
        str(tmp_path / "dict"))
    for source in ("files", "dict"):
        train, test = (HFDataset(str(tmp_path / source), 16, split=s) for s in ("train", "test"))
        assert len(train) == 40 and len(test) == 20
        assert torch.equal(test[5]["image"], reference[45]["image"])
        assert int(test[5]["label"]) == int(reference[45]["label"])
        with pytest.raises(ConfigError, match=r"'data.split'.*no split 'validation'.*\['test', 'train'\]"):
            HFDataset(str(tmp_path / source), 16, split="validation")
    cfg = Config(data=DataConfig(name="hf", path=str(tmp_path / "dict"), split="test", image_size=16))
    assert len(build_dataset(cfg)) == 20
    with pytest.raises(ConfigError, match=r"'data.split'.*single split"):
        HFDataset(str(tmp_path / "digits.parquet"), 16, split="test")


def test_raw_structs_and_arrays(tmp_path):
    """Image columns without the Image feature: {bytes, path} structs (plain parquet) and uint8 arrays."""
    rows = _digits(12)
    saved = tmp_path / "saved"
    rows.save_to_disk(str(saved))
    reference = HFDataset(str(saved), 8)
    png = [_png(Image.fromarray(a)) for a in np.round(load_digits().images[:12] * 255 / 16).astype(np.uint8)]
    (tmp_path / "a.png").write_bytes(png[1])
    structs = pa.array([{"bytes": b, "path": None} for b in png])
    structs = pa.array([*structs.to_pylist()[:1], {"bytes": None, "path": str(tmp_path / "a.png")},
                        *structs.to_pylist()[2:]])  # a row that names a file instead
    pq.write_table(pa.table({"img": structs, "y": pa.array(load_digits().target[:12])}), tmp_path / "plain.parquet")
    plain = HFDataset(str(tmp_path / "plain.parquet"), 8, image_column="img", label_column="y")
    _same(plain, reference)
    pixels = np.round(load_digits().images[:12] * 255 / 16).astype(np.uint8)
    arrays = datasets.Dataset.from_dict(
        {"grey": list(pixels), "rgb": list(np.repeat(pixels[..., None], 3, -1)), "label": load_digits().target[:12]},
        features=datasets.Features({"grey": datasets.Array2D((8, 8), "uint8"),
                                    "rgb": datasets.Array3D((8, 8, 3), "uint8"), "label": datasets.Value("int64")}))
    arrays.save_to_disk(str(tmp_path / "arrays"))
    for column in ("grey", "rgb"):
        _same(HFDataset(str(tmp_path / "arrays"), 8, image_column=column), reference)
    floats = datasets.Dataset.from_dict({"image": list(pixels.astype(np.float32)), "label": [0] * 12})
    floats.save_to_disk(str(tmp_path / "floats"))
    with pytest.raises(ConfigError, match=r"'data.image_column'.*'image'.*float32.*not images or uint8 arrays"):
        HFDataset(str(tmp_path / "floats"), 8)


def test_labels_unlabelled_and_extra_columns(tmp_path):
    rows = _digits(20).add_column("caption", [f"digit {t}" for t in load_digits().target[:20]])
    rows.save_to_disk(str(tmp_path / "saved"))
    path = str(tmp_path / "saved")
    unlabelled = HFDataset(path, 8, label_column=None)
    assert unlabelled.labels.tolist() == [0] * 20 and unlabelled.num_classes == 1
    ds = HFDataset(path, 8, extra_columns=["caption"])
    assert ds[3]["caption"] == f"digit {load_digits().target[3]}"
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["caption"] == [f"digit {t}" for t in load_digits().target[:4]]
    with pytest.raises(ConfigError, match=r"'cond.num_classes'.*labels up to 9, outside \[0, 5\).*num_classes=10"):
        HFDataset(path, 8, num_classes=5)
    cfg = Config(data=DataConfig(name="hf", path=path, image_size=8), cond=CondConfig(num_classes=5))
    with pytest.raises(ConfigError, match="cond.num_classes"):
        build_dataset(cfg)
    with pytest.raises(ConfigError, match=r"'data.label_column'.*'caption'.*string.*not integer"):
        HFDataset(path, 8, label_column="caption")
    with pytest.raises(ConfigError, match=r"'data.extra_columns'.*\['label'\]"):
        HFDataset(path, 8, extra_columns=["label"])
    bad = datasets.Dataset.from_dict({"image": rows["image"][:3], "label": [0, -1, 2]}, features=INT_LABELS)
    bad.save_to_disk(str(tmp_path / "negative"))
    with pytest.raises(DataError, match=r"negative label -1 \(row 1\)"):
        HFDataset(str(tmp_path / "negative"), 8)
    holes = datasets.Dataset.from_dict({"image": rows["image"][:3], "label": [0, None, 2]}, features=INT_LABELS)
    holes.save_to_disk(str(tmp_path / "holes"))
    with pytest.raises(DataError, match=r"1 rows without a label.*data.label_column=null"):
        HFDataset(str(tmp_path / "holes"), 8)


# ------------------------------------------------------------------------------------------------ the caches


def test_a_name_in_the_local_caches_is_read_offline(tmp_path, hf_caches):
    rows = _digits(30)
    source = tmp_path / "src" / "tinydigits" / "data"
    source.mkdir(parents=True)
    rows.select(range(20)).to_parquet(str(source / "train-00000-of-00001.parquet"))
    rows.select(range(20, 30)).to_parquet(str(source / "test-00000-of-00001.parquet"))
    datasets.load_dataset(str(source.parent))  # prepares the datasets cache, as load_dataset("NAME") would
    shutil.move(source.parent, tmp_path / "moved")  # only the cache is left
    cached = HFDataset("tinydigits", 8, split="test")
    assert len(cached) == 10 and cached.labels.tolist() == load_digits().target[20:30].tolist()
    assert datasets.config.HF_HUB_OFFLINE == huggingface_hub.constants.HF_HUB_OFFLINE  # restored afterwards
    # The hub cache, as `hf download --repo-type dataset me/digits` leaves it.
    repo = hf_caches["HF_HUB_CACHE"] / "datasets--me--digits"
    shutil.copytree(tmp_path / "moved" / "data", repo / "snapshots" / "0123abcd" / "data")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    hub = HFDataset("me/digits", 8)
    assert len(hub) == 20
    for i in range(10):
        assert torch.equal(cached[i]["image"], HFDataset("me/digits", 8, split="test")[i]["image"])


def test_errors_name_the_path_key_and_fix(tmp_path, folder):
    _, rows = folder
    with pytest.raises(DataError, match=r"data.path=.*nowhere does not exist.*offline.*save_to_disk"):
        HFDataset(str(tmp_path / "nowhere"), 32)
    with pytest.raises(DataError, match=r"data.path=someone/imagenet is neither a local file or folder nor a "
                                        r"dataset in the local Hugging Face caches .*hf-datasets.*hf-hub.*nothing "
                                        r"is downloaded"):
        HFDataset("someone/imagenet", 32)
    (tmp_path / "notes.txt").write_text("no data")
    with pytest.raises(DataError, match=r"notes.txt is not a .parquet or .arrow file"):
        HFDataset(str(tmp_path / "notes.txt"), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no dataset in .*empty"):
        HFDataset(str(tmp_path / "empty"), 32)
    with pytest.raises(ConfigError, match="config key 'data.path': data.name=hf needs"):
        build_dataset(Config(data=DataConfig(name="hf")))
    with pytest.raises(ConfigError, match="data.name=hf reads the one split"):
        build_dataset(Config(data=DataConfig(name="hf", path=str(tmp_path))), split="heldout")
    rows.save_to_disk(str(tmp_path / "saved"))
    path = str(tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"'data.image_column': no column 'img' in .*saved \(split train\); its "
                                          r"columns: \['image', 'label'\]"):
        HFDataset(path, 32, image_column="img")
    with pytest.raises(ConfigError, match=r"'data.label_column': no column 'class'"):
        HFDataset(path, 32, label_column="class")
    with pytest.raises(ConfigError, match=r"'data.image_column': column 'label' .* not images"):
        HFDataset(path, 32, image_column="label")
    next((tmp_path / "saved").glob("*.arrow")).unlink()
    with pytest.raises(DataError, match=r"cannot read the save_to_disk dataset .*saved.*write it again"):
        HFDataset(path, 32)
    # Unreadable rows are named when read, as the image folder names its files.
    deep = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))  # mode I;16
    broken = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not a png", "path": None}, {"bytes": _png(deep), "path": None}], "label": [0, 1]},
        features=FEATURES)
    broken.save_to_disk(str(tmp_path / "broken"))
    ds = HFDataset(str(tmp_path / "broken"), 16)
    with pytest.raises(DataError, match=r"row 0 of column 'image' of .*broken \(split train\).*corrupt or not an "
                                        r"image"):
        ds[0]
    with pytest.raises(DataError, match=r"row 1 of column 'image'.*'I;16'.*8-bit"):
        ds[1]


def test_load_hf_restores_the_online_setting(tmp_path):
    _digits(4).save_to_disk(str(tmp_path / "saved"))
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    assert len(load_hf(str(tmp_path / "saved"))) == 4
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


# ------------------------------------------------------------------------------------------------ the jobs


COMMON = ["model.name=SiT-S/4", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2", "data.image_size=8",
          "cond.num_classes=10", "latent.name=pixel", "log.tracker=none", "log.preview_every_steps=0",
          "data.num_workers=0", "train.global_batch_size=32", "train.max_steps=2"]


def test_prepare_caches_an_hf_dataset(tmp_path, fresh_accelerate):
    """prepare.py encodes exactly the images HFDataset gives, records the hf source, and refuses a missing one."""
    _digits(128).save_to_disk(str(tmp_path / "saved"))
    args = ["configs/quickstart.yaml", *COMMON, "data.name=hf", f"data.path={tmp_path / 'saved'}"]
    result = run_job("prepare.py", [*args, "--out", tmp_path / "cache", "--shard-size", "50"])
    assert result.returncode == 0, result.stderr[-3000:]
    cache = LatentCacheDataset(tmp_path / "cache", expected_raw_shape=(3, 8, 8))
    direct = HFDataset(str(tmp_path / "saved"), 8)
    assert len(cache) == 128 and torch.equal(cache.labels, direct.labels)
    assert torch.equal(torch.stack([cache[i]["raw"] for i in range(128)]),
                       PixelSpace(3, 8).encode_raw(torch.stack([direct[i]["image"] for i in range(128)])))
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["channels"] == 3
    assert meta["source"] == {"name": "hf", "path": str(tmp_path / "saved"), "split": "train", "hflip": False,
                              "image_column": "image", "label_column": "label"}
    with pytest.raises(SystemExit, match=r"^error: hf dataset data.path=.*nowhere does not exist"):
        prepare.main(["configs/quickstart.yaml", *COMMON, "data.name=hf", f"data.path={tmp_path / 'nowhere'}",
                      "--out", str(tmp_path / "cache2")])
    assert not (tmp_path / "cache2").exists()


def test_training_on_hf_equals_training_on_the_same_image_folder(tmp_path, fresh_accelerate):
    rows = _digits(128)
    folder = tmp_path / "images"
    for i, (image, label) in enumerate(zip(rows.cast_column("image", datasets.Image(decode=False))["image"],
                                           rows["label"])):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{i:04d}.png").write_bytes(image["bytes"])
    # The folder sorts the images by class (folders "0".."9"), then name: give the hf rows that order too.
    order = np.argsort([f"{label}/{i:04d}" for i, label in enumerate(rows["label"])], kind="stable")
    assert [f.split("/")[-2:] for f in ImageFolderDataset(folder, 8).files] == \
        [[str(rows["label"][k]), f"{k:04d}.png"] for k in order]
    rows.select(order).save_to_disk(str(tmp_path / "sorted"))
    runs = {}
    for name, data in (("hf", ["data.name=hf", f"data.path={tmp_path / 'sorted'}"]),
                       ("folder", ["data.name=image_folder", f"data.path={folder}"])):
        cfg = load_config(REPO / "configs" / "quickstart.yaml", [*COMMON, *data, f"train.run_dir={tmp_path / name}"])
        runs[name] = load_file(str(train_job.train(cfg) / "model.safetensors"))
    assert runs["hf"].keys() == runs["folder"].keys()
    assert all(torch.equal(runs["hf"][k], runs["folder"][k]) for k in runs["hf"])
