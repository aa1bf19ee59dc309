"""Datasets (embedded digits, image folders, latent caches from prepare.py) and the resumable batch sampler.

Every item is a dict: {"image": uint8 (C, H, W)} or {"raw": raw_shape of the raw dtype}, plus "label" and "index"
(int64), so the default collate works and a batch always says which items it holds; items of a cache with
encoder features (data.cache_features) also hold "feats": {encoder name: float32 (T, d)}.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from gen.config import ConfigError
from gen.hf_data import HFDataset
from gen.io import load_state
from gen.shape_data import MeshFolderDataset, ProceduralShapesDataset
from gen.text import TEXT_FEATURE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes an image folder is scanned for (case-insensitive; torchvision's list)."""

# Modes that convert("RGB") maps faithfully (ADM/REPA call it on every image). 16-bit and float modes
# ("I;16", "I", "F") are clipped at 255 by PIL, which silently turns most of the image white.
_RGB_CONVERTIBLE = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr"})

META = "meta.json"
"""The file prepare.py writes last; a cache without it is incomplete."""

LATENT_STATE = "latent_state.pt"
"""A cache's fitted latent statistics (latents.LatentSpace.fitted: e.g. Mosaic-SDF's column normaliser)."""


class DataError(ValueError):
    """Bad, missing or unreadable data: the message names the file and the fix."""


def shard_file(k: int) -> str:
    """Name of cache shard k (raw encodings)."""
    return f"shard-{k:05d}.npy"


def labels_file(k: int) -> str:
    """Name of cache label shard k (int64)."""
    return f"labels-{k:05d}.npy"


def features_file(name: str, k: int) -> str:
    """Name of cache shard k of encoder `name`'s features (float16 (n, T, d))."""
    return f"feats-{name}-{k:05d}.npy"


def _item(key: str, value: torch.Tensor, label: int, index: int) -> dict:
    return {key: value, "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64)}


# ---------------------------------------------------------------------------------------------------
# Embedded digits


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits (offline), upsampled to image_size, one channel, with a fixed stratified split."""

    channels = 1
    num_classes = 10
    HELDOUT_FRACTION = 0.2
    SPLIT_SEED = 0

    def __init__(self, split: str = "train", image_size: int = 32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "heldout"):
            raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
        digits = load_digits()
        order = np.arange(len(digits.target))
        # Stratified so both splits keep the ~10% per-class balance; a fixed seed makes it the same everywhere.
        train, heldout = train_test_split(order, test_size=self.HELDOUT_FRACTION, stratify=digits.target,
                                          random_state=self.SPLIT_SEED)
        self.source_indices = np.sort(train if split == "train" else heldout)
        pixels = torch.from_numpy(digits.images[self.source_indices]).to(torch.float32)[:, None] * (255.0 / 16.0)
        # Bilinear with antialiasing on CPU is deterministic; quantise once, after resizing.
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False)
        self.images = pixels.round().clamp(0, 255).to(torch.uint8)  # (N, 1, S, S)
        self.labels = torch.from_numpy(digits.target[self.source_indices]).to(torch.int64)
        self.split, self.image_size = split, image_size

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> DigitsDataset:
        """Build from cfg.data."""
        return cls(split, cfg.data.image_size)

    @classmethod
    def config_channels(cls, cfg) -> int:
        """Image channels of the configured dataset."""
        return cls.channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return _item("image", self.images[index], int(self.labels[index]), index)


# ---------------------------------------------------------------------------------------------------
# Image folders (ImageNet layout: root/<class>/<image>)


def adm_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion image_datasets.py): BOX halvings, BICUBIC to size, center crop -> HWC."""
    # Halving with BOX while the short side stays >= 2x the target keeps the final BICUBIC step small
    # (guided-diffusion predates PIL's reducing_gap).
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    # Python's round (half to even), as ADM: a side can land one pixel off with another rounding.
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for a corrupt, truncated or foreign file."""


def _check_mode(path, image: Image.Image) -> None:
    if image.mode not in _RGB_CONVERTIBLE:
        raise DataError(f"image {path} has mode {image.mode!r} (16-bit or floating point), which cannot be "
                        f"converted to 8-bit RGB without clipping; convert it to an 8-bit RGB or grayscale "
                        f"PNG/JPEG, or remove it")


def _unreadable(path, err: BaseException, fix: str = "") -> DataError:
    return DataError(f"cannot read image {path} ({type(err).__name__}: {' '.join(str(err).split())}); the file is "
                     f"corrupt or not an image: remove it or re-save it as PNG/JPEG{fix}")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB the way ADM/REPA do, refusing modes and files that cannot be read faithfully."""
    try:
        with Image.open(path) as image:
            _check_mode(path, image)
            image.load()
            return image.convert("RGB")
    except DataError:
        raise
    except _UNREADABLE as err:
        raise _unreadable(path, err) from err


def prescan(files, key: str = "data.prescan") -> list[tuple[int, int]]:
    """Open every image and verify it (PIL `verify`: the header, and for PNG the chunk checksums, without decoding),
    raising DataError naming the first corrupt or unconvertible file and `key`, the switch that skips this scan;
    returns each image's (width, height)."""
    sizes = []
    for path in files:
        try:
            with Image.open(path) as image:
                _check_mode(path, image)
                image.verify()
                sizes.append(image.size)
        except DataError:
            raise
        except _UNREADABLE as err:
            raise _unreadable(path, err, f" (or skip this check with {key}=false)") from err
    return sizes


def check_classes(dataset, cfg) -> None:
    """Refuse a dataset with more classes than cond.num_classes: its labels must lie in [0, cond.num_classes), label
    cond.num_classes being the null label of guidance (a dataset label there would train as unconditional)."""
    found = getattr(dataset, "num_classes", None)
    if found is not None and int(found) > cfg.cond.num_classes:
        source = cfg.data.name + (f" {cfg.data.path}" if cfg.data.path else "")
        raise ConfigError(f"config key 'cond.num_classes': the dataset ({source}) has "
                          f"{int(found)} classes but cond.num_classes={cfg.cond.num_classes}; labels must lie below "
                          f"cond.num_classes (that label is guidance's null class): set cond.num_classes={int(found)}")


class ImageFolderDataset(Dataset):
    """Class sub-folders of images; label = index of the sorted folder name; ADM center crop to image_size;
    `check_files` pre-scans every file (data.prescan)."""

    channels = 3

    def __init__(self, root: str | Path, image_size: int, hflip: bool = False, check_files: bool = False):
        self.root, self.image_size, self.hflip = Path(root), int(image_size), bool(hflip)
        layout = "expected data.path=ROOT with ROOT/<class name>/<image files> (the ImageNet train layout)"
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder; {layout}")
        # Hidden folders (.ipynb_checkpoints, ...) are not classes.
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"image folder {self.root} has no class sub-folders; {layout}")
        files, labels, empty = [], [], []
        for label, name in enumerate(self.classes):
            found = []
            for folder, subdirs, names in os.walk(self.root / name, followlinks=True):
                subdirs.sort()
                found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                empty.append(name)
            files += found
            labels += [label] * len(found)
        if empty:
            more = " ..." if len(empty) > 5 else ""
            raise DataError(f"class folders without images in {self.root}: {empty[:5]}{more}"
                            f"; add images ({', '.join(IMAGE_EXTENSIONS)}) or remove those folders")
        if check_files:
            prescan(files)
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.classes)

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> ImageFolderDataset:
        """Build from cfg.data (train split only), unflipped: train.py applies data.hflip to whole batches."""
        # One flip draw per global index in the trainer keeps flips independent of processes and workers.
        if split != "train":
            raise ConfigError(f"data.name=image_folder has only the 'train' split, not {split!r}")
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': data.name=image_folder needs the folder of class sub-folders")
        return cls(cfg.data.path, cfg.data.image_size, check_files=cfg.data.prescan)

    @classmethod
    def config_channels(cls, cfg) -> int:
        """Image channels of the configured dataset (always RGB)."""
        return cls.channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        arr = adm_center_crop(load_rgb(self.files[index]), self.image_size)
        # For direct use (the trainer flips batches itself): torch's RNG, which DataLoader seeds per worker.
        if self.hflip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # PIL arrays are read-only
        return _item("image", image, int(self.labels[index]), index)


# ---------------------------------------------------------------------------------------------------
# Latent caches written by prepare.py


def read_meta(path: str | Path) -> dict:
    """A cache's meta.json, or one clear error saying the cache is missing or incomplete."""
    path = Path(path)
    meta_path = path / META
    rerun = (f"run `python prepare.py CONFIG --out {path}` with the source dataset's config (data.name=digits or "
             f"image_folder, and the run's latent.* and data.image_size); it resumes, skipping complete shards")
    if not path.is_dir():
        raise DataError(f"latent cache {path} does not exist; {rerun}")
    if not meta_path.is_file():
        raise DataError(f"incomplete latent cache: {meta_path} is missing (prepare.py writes it last); {rerun}")
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {meta_path} ({err}); delete it and {rerun}") from err


class LatentCacheDataset(Dataset):
    """Raw encodings from prepare.py: fixed-size .npy shards of the latent space's raw dtype (meta.json "raw_dtype":
    float32 moments, uint8 bits, int64 ids), memory-mapped, plus int64 labels and, when prepare.py was asked for
    them (meta.json "features"), frozen-encoder features in float16 shards."""

    def __init__(self, path: str | Path, expected_raw_shape: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.meta = meta = read_meta(self.path)
        self.raw_shape = tuple(meta["raw_shape"])
        self.raw_dtype = np.dtype(meta.get("raw_dtype", "float32"))
        fix = "re-run prepare.py with this run's latent.* and data.image_size into a new --out folder"
        if expected_raw_shape is not None and tuple(expected_raw_shape) != self.raw_shape:
            raise DataError(f"latent cache {self.path / META} holds raw latents of shape {self.raw_shape} (latent "
                            f"{meta.get('latent')}, image_size {meta.get('image_size')}), but this run needs "
                            f"{tuple(expected_raw_shape)}; {fix}, or point data.path at a matching cache")
        self.count, self.shard_size = int(meta["count"]), int(meta["shard_size"])
        self.num_classes = meta.get("num_classes")
        self.channels = meta.get("channels")
        features = meta.get("features") or {}  # absent in caches without encoder features
        self.feature_names = tuple(features)
        self.feature_shapes = {name: tuple(f["shape"]) for name, f in features.items()}
        feature_fix = ("re-run prepare.py with this run's latent.*, data.image_size and data.cache_features into a "
                       "new --out folder")
        labels = []
        text = meta.get("text")  # present when prepare.py encoded captions (gen.text)
        self.text_shape = tuple(text["shape"]) if text else None
        for k in range(math.ceil(self.count / self.shard_size)):
            n = min(self.shard_size, self.count - k * self.shard_size)
            self._check(shard_file(k), (n, *self.raw_shape), self.raw_dtype, fix)
            if text:
                self._check(features_file(TEXT_FEATURE, k), (n, *self.text_shape), np.float16, fix)
            labels.append(np.asarray(self._check(labels_file(k), (n,), np.int64, fix)))
            for name, f in features.items():
                self._check(features_file(name, k), (n, *f["shape"]), np.dtype(f["dtype"]), feature_fix)
        self.labels = torch.from_numpy(np.concatenate(labels)) if labels else torch.zeros(0, dtype=torch.int64)
        state = self.path / LATENT_STATE  # only caches of fitted latent spaces have one
        self.latent_state = load_state(state, "the latent statistics prepare.py fitted") if state.is_file() else {}
        self._shards: dict[str, np.ndarray] = {}  # memory maps by file name

    def _check(self, name: str, shape: tuple, dtype, fix: str) -> np.ndarray:
        file = self.path / name
        if not file.is_file():
            raise DataError(f"latent cache {self.path} lacks {name} although {META} lists {self.count} items; {fix}")
        try:
            arr = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {file} ({err}); {fix}") from err
        if arr.shape != shape or arr.dtype != dtype:
            raise DataError(f"{file} holds {arr.dtype} {arr.shape} but {META} implies {np.dtype(dtype)} {shape}; "
                            f"the cache is inconsistent: {fix}")
        return arr

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> LatentCacheDataset:
        """Build from cfg.data, checking the cache against the run's latent space (cfg.latent, image size)."""
        from latents import build_latent

        if split != "train":
            raise ConfigError(f"data.name=latent_cache holds the training split only, not {split!r}")
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': data.name=latent_cache needs the folder prepare.py wrote")
        dataset = cls(cfg.data.path, expected_raw_shape=build_latent(cfg).raw_shape)
        if cfg.cond.text_dim and (dataset.text_shape or (0, 0))[1] != cfg.cond.text_dim:
            held = f"text tokens {dataset.text_shape}" if dataset.text_shape else "no text tokens"
            raise DataError(f"latent cache {dataset.path} holds {held}, but cond.text_dim={cfg.cond.text_dim}; run "
                            f"prepare.py with cond.text_encoder=FOLDER (an encoder of that width) into a new --out "
                            f"folder, or set cond.text_dim to the cache's width (0: no text)")
        made_with = dataset.meta.get("latent", {}).get("name")
        if made_with != cfg.latent.name:
            raise DataError(f"latent cache {dataset.path / META} was made with latent {made_with!r} but "
                            f"latent.name={cfg.latent.name!r}; set latent.name={made_with} or re-run prepare.py")
        return dataset

    @classmethod
    def config_channels(cls, cfg) -> int:
        """Image channels of the images the cache was made from (meta.json)."""
        return int(read_meta(cfg.data.path)["channels"])

    def __getstate__(self) -> dict:
        # Memory maps pickle as full copies; each DataLoader worker reopens its own.
        return {**self.__dict__, "_shards": {}}

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(self.path / name, mmap_mode="r")
        return self._shards[name]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for a cache of {self.count} items")
        k, j = divmod(index, self.shard_size)
        raw = torch.from_numpy(np.array(self._shard(shard_file(k))[j]))  # copy out of the memory map
        item = _item("raw", raw, int(self.labels[index]), index)
        if self.feature_names:
            item["feats"] = {name: torch.from_numpy(self._shard(features_file(name, k))[j].astype(np.float32))
                             for name in self.feature_names}
        if self.text_shape:
            item["text"] = torch.from_numpy(self._shard(features_file(TEXT_FEATURE, k))[j].astype(np.float32))
        return item


DATASETS = {"digits": DigitsDataset, "image_folder": ImageFolderDataset, "latent_cache": LatentCacheDataset,
            "hf": HFDataset, "procedural_shapes": ProceduralShapesDataset, "mesh_folder": MeshFolderDataset}
"""Datasets by the name `data.name` takes."""


def _dataset_class(cfg):
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"config key 'data.name': unknown dataset {cfg.data.name!r}; one of {sorted(DATASETS)}")
    return DATASETS[cfg.data.name]


def build_dataset(cfg, split: str = "train") -> Dataset:
    """The dataset named by cfg.data.name, its class count checked against cond.num_classes."""
    dataset = _dataset_class(cfg).from_config(cfg, split)
    check_classes(dataset, cfg)
    return dataset


def dataset_channels(cfg) -> int:
    """Channels of the configured dataset's images (digits 1, image folders 3, caches: their source's)."""
    return _dataset_class(cfg).config_channels(cfg)


# ---------------------------------------------------------------------------------------------------
# Sampler


class DistributedBatchSampler:
    """Resumable micro-batches (lists of indices, forever) whose union over ranks does not depend on the world size."""

    # Each optimizer step takes the next global_batch_size indices of an epoch-seeded permutation, splits them
    # into grad_accum_steps micro-steps and each micro-step contiguously across ranks; use it as a DataLoader's
    # batch_sampler. Positions count optimizer steps, so a resume never lands inside a step.

    def __init__(self, num_items: int, global_batch_size: int, world_size: int = 1, rank: int = 0,
                 grad_accum_steps: int = 1, seed: int = 0, shuffle: bool = True):
        per_step = world_size * grad_accum_steps
        if global_batch_size % per_step:
            raise ConfigError(f"config key 'train.global_batch_size': {global_batch_size} is not divisible by "
                              f"processes x train.grad_accum_steps = {world_size} x {grad_accum_steps}")
        if num_items < global_batch_size:
            raise ConfigError(f"config key 'train.global_batch_size': {global_batch_size} exceeds the dataset "
                              f"({num_items} items); lower it or use more data")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.num_items, self.global_batch_size = num_items, global_batch_size
        self.world_size, self.rank, self.grad_accum_steps = world_size, rank, grad_accum_steps
        self.seed, self.shuffle = seed, shuffle
        self.micro_batch_size = global_batch_size // per_step
        self.steps_per_epoch = num_items // global_batch_size  # the incomplete tail of each epoch is dropped
        self.epoch, self.step_in_epoch = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self):
        micro, width = self.micro_batch_size, self.micro_batch_size * self.world_size
        while True:
            self.epoch, self.step_in_epoch = self._normalised(self.epoch, self.step_in_epoch)
            order = self._order(self.epoch)
            while self.step_in_epoch < self.steps_per_epoch:
                step = order[self.step_in_epoch * self.global_batch_size:][:self.global_batch_size]
                for a in range(self.grad_accum_steps):
                    batch = step[a * width + self.rank * micro:][:micro].tolist()
                    if a == self.grad_accum_steps - 1:
                        # Counted when the step's last micro-batch is handed out, so state_dict taken right
                        # after a step names that step as done, and a partly handed-out step is redone whole.
                        self.step_in_epoch += 1
                    yield batch

    def _normalised(self, epoch: int, step_in_epoch: int) -> tuple[int, int]:
        full, rest = divmod(step_in_epoch, self.steps_per_epoch)
        return epoch + full, rest

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.grad_accum_steps

    def position(self, steps: int) -> dict:
        """The data position after `steps` optimizer steps from the start of training (epoch 0, step 0)."""
        # A DataLoader with workers draws batches ahead of training, so a trainer should checkpoint
        # position(global_step) rather than state_dict(), which counts what was handed to the loader.
        epoch, step_in_epoch = self._normalised(0, steps)
        return {"epoch": epoch, "step_in_epoch": step_in_epoch}

    def state_dict(self) -> dict:
        """Epoch and optimizer steps of it handed out so far."""
        epoch, step_in_epoch = self._normalised(self.epoch, self.step_in_epoch)
        return {"epoch": epoch, "step_in_epoch": step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the first micro-batch of the step after `state` (takes effect at the next iter())."""
        self.epoch, self.step_in_epoch = self._normalised(int(state["epoch"]), int(state["step_in_epoch"]))
