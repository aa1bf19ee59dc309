"""Hugging Face `datasets` sources (data.name=hf), offline: a save_to_disk folder, parquet/arrow files, or a dataset
already in the local Hugging Face caches.

Items are those of the image folder: {"image": uint8 (3, H, W), "label": int64, "index": int64}, the image read as
ADM/REPA read files (PIL, 8-bit modes only, convert("RGB"), no EXIF rotation) and ADM-center-cropped to
data.image_size; data.extra_columns are passed through under their own names. Nothing is ever downloaded:
`datasets` and `huggingface_hub` run in offline mode while the source is opened.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gen.config import ConfigError

# gen.data (DataError, the ADM crop, ...) is imported inside the functions: its registry imports this module.

DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
"""Single files data.path may name, and the `datasets` builder that reads each."""

RESERVED_KEYS = ("image", "label", "index", "raw", "feats")
"""Item keys the datasets and the trainer use; data.extra_columns may not take them."""

_SOURCES = ("a save_to_disk folder, a .parquet/.arrow file, a folder of such files, or the name of a dataset already "
            "in the local Hugging Face cache")


@contextlib.contextmanager
def offline():
    """`datasets` and `huggingface_hub` in offline mode (HF_DATASETS_OFFLINE=1 semantics) within the block."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _one_split(dataset, path, split: str):
    """A DatasetDict's `split`, or a single Dataset (read as 'train')."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ConfigError(f"config key 'data.split': {path} has no split {split!r}; its splits: {sorted(dataset)}")
        return dataset[split]
    if split != "train":
        raise ConfigError(f"config key 'data.split': {path} holds a single split (read as 'train'), not {split!r}; "
                          f"leave data.split=train or point data.path at a DatasetDict folder")
    return dataset


def _load_builder(source: str, path, split: str, **kwargs):
    """load_dataset offline for a local source, with the split errors turned into one line naming data.split."""
    import datasets

    from gen.data import DataError

    try:
        loaded = datasets.load_dataset(source, **kwargs)  # a DatasetDict: all splits, to name them in an error
    except FileNotFoundError as err:  # EmptyDatasetError, DataFilesNotFoundError too
        raise DataError(f"no dataset in {path} ({type(err).__name__}: {str(err).splitlines()[0]}); data.path takes "
                        f"{_SOURCES}") from err
    return _one_split(loaded, path, split)


def load_hf(path: str, split: str = "train"):
    """The `datasets.Dataset` that data.path and data.split name, opened offline (memory-mapped, nothing downloaded).

    A local folder written by save_to_disk (Dataset or DatasetDict), a .parquet/.arrow file, or a folder of data files
    (load_dataset's layout: split names in file or folder names, else all 'train'); otherwise a dataset name looked
    up in the `datasets` cache (HF_DATASETS_CACHE: what load_dataset prepared) and then the hub cache (HF_HUB_CACHE:
    what `hf download --repo-type dataset NAME` fetched).
    """
    import datasets

    from gen.data import DataError

    local = Path(path).expanduser()
    with offline():
        if local.is_file():
            builder = DATA_FILE_SUFFIXES.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{local} is not a .parquet or .arrow file; data.path takes {_SOURCES}")
            return _one_split(_load_builder(builder, local, "train", data_files=str(local)), local, split)
        if local.is_dir():
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                try:
                    saved = datasets.load_from_disk(str(local))
                except (OSError, ValueError) as err:
                    raise DataError(f"cannot read the save_to_disk dataset {local} ({type(err).__name__}: {err}); "
                                    f"write it again with save_to_disk") from err
                return _one_split(saved, local, split)
            return _load_builder(str(local), local, split)
        looks_like_a_name = not local.is_absolute() and path.count("/") <= 1 and not path.startswith(".")
        failed = None  # why a dataset the datasets cache holds could not be read
        if looks_like_a_name:
            try:
                return _one_split(datasets.load_dataset(path), path, split)  # the datasets cache (offline)
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001 - not in the datasets cache: try the hub cache next
                if not isinstance(err, ConnectionError):  # offline and not cached: ConnectionError
                    failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            from huggingface_hub import snapshot_download

            try:
                snapshot = snapshot_download(path, repo_type="dataset", local_files_only=True)
            except Exception:  # noqa: BLE001 - not there either: one error below
                snapshot = None
            if snapshot is not None:
                return _load_builder(snapshot, f"{path} (hub cache {snapshot})", split)
    from datasets.config import HF_DATASETS_CACHE
    from huggingface_hub.constants import HF_HUB_CACHE

    where = (f"is neither a local file or folder nor a dataset in the local Hugging Face caches ({HF_DATASETS_CACHE}"
             f", {HF_HUB_CACHE}){f' ({failed})' if failed else ''}" if looks_like_a_name else "does not exist")
    raise DataError(f"hf dataset data.path={path} {where}; nothing is downloaded (offline): point data.path at "
                    f"{_SOURCES} (e.g. fetched elsewhere with load_dataset(...).save_to_disk(DIR) or "
                    f"`hf download --repo-type dataset NAME`)")


def _rgb(image: Image.Image, where: str) -> Image.Image:
    """`image` as RGB the way ImageFolderDataset reads files, refusing modes that 8-bit RGB would clip."""
    from gen.data import _RGB_CONVERTIBLE, DataError

    if image.mode not in _RGB_CONVERTIBLE:
        raise DataError(f"image {where} has mode {image.mode!r} (16-bit or floating point), which cannot be converted "
                        f"to 8-bit RGB without clipping; store 8-bit RGB or grayscale images")
    image.load()
    return image.convert("RGB")


def _array_dtype(feature) -> str | None:
    """The element dtype of an array feature (Array2D/3D, nested List/Sequence of Value), else None."""
    while not hasattr(feature, "dtype") and hasattr(feature, "feature"):
        feature = feature.feature
    return getattr(feature, "dtype", None)


class HFDataset(Dataset):
    """A split of a Hugging Face dataset (see load_hf): an image column (datasets Image feature, {bytes, path} dicts or
    uint8 HxW / HxWxC arrays) and an integer or ClassLabel label column; ADM center crop to image_size."""

    channels = 3

    def __init__(self, path: str, image_size: int, split: str = "train", image_column: str = "image",
                 label_column: str | None = "label", extra_columns=(), num_classes: int | None = None,
                 hflip: bool = False):
        import datasets

        from gen.data import DataError

        self.path, self.split, self.image_size, self.hflip = str(path), split, int(image_size), bool(hflip)
        dataset = load_hf(self.path, split)
        where = f"{self.path} (split {split})"
        self.where = where
        columns = list(dataset.column_names)
        wanted = {"data.image_column": [image_column], "data.label_column": [label_column] if label_column else [],
                  "data.extra_columns": list(extra_columns)}
        for key, names in wanted.items():
            missing = [name for name in names if name not in columns]
            if missing:
                raise ConfigError(f"config key '{key}': no column {missing[0]!r} in {where}; its columns: {columns}")
        taken = [name for name in extra_columns if name in RESERVED_KEYS or name in (image_column, label_column)]
        if taken:
            raise ConfigError(f"config key 'data.extra_columns': {taken} would replace item keys {RESERVED_KEYS} "
                              f"or the image/label columns; rename the column(s) or drop them from data.extra_columns")
        self.image_column, self.label_column, self.extra_columns = image_column, label_column, list(extra_columns)
        dataset = dataset.select_columns([image_column, *([label_column] if label_column else []), *extra_columns])

        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image):
            # Undecoded {bytes, path}: read here as ImageFolderDataset reads files (datasets would EXIF-rotate).
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Value, datasets.ClassLabel)):
            raise ConfigError(f"config key 'data.image_column': column {image_column!r} of {where} holds {feature}, "
                              f"not images; its columns: {columns}")
        elif not (isinstance(feature, dict) and {"bytes", "path"} <= set(feature)):
            dtype = _array_dtype(feature)
            if dtype != "uint8":
                raise ConfigError(f"config key 'data.image_column': column {image_column!r} of {where} holds "
                                  f"{feature}, not images or uint8 arrays; store 8-bit images (an Image feature or "
                                  f"uint8 HxW / HxWxC arrays), or name another column of {columns}")
            # Arrays as uint8 numpy (the numpy format's default is int64); the other columns stay python.
            dataset = dataset.with_format("numpy", columns=[image_column], output_all_columns=True, dtype=np.uint8)
        self.dataset = dataset

        self.classes = None
        if label_column is None:
            self.labels = torch.zeros(len(dataset), dtype=torch.int64)
            self.num_classes = 1
        else:
            self.labels = self._read_labels(dataset, label_column, where)
            label_feature = dataset.features[label_column]
            if isinstance(label_feature, datasets.ClassLabel):
                self.classes = list(label_feature.names)
            found = int(self.labels.max()) + 1 if len(self.labels) else 0
            self.num_classes = max(len(self.classes or ()), found)
            if num_classes is not None and found > num_classes:
                raise ConfigError(f"config key 'cond.num_classes': column {label_column!r} of {where} has labels up "
                                  f"to {found - 1}, outside [0, {num_classes}); set cond.num_classes={found} (or "
                                  f"more), or data.label_column=null for unlabelled training")
        if len(dataset) == 0:
            raise DataError(f"{where} has no rows; point data.path / data.split at a non-empty dataset")

    @staticmethod
    def _read_labels(dataset, column: str, where: str) -> torch.Tensor:
        import pyarrow as pa

        from gen.data import DataError

        values = dataset.select_columns([column]).with_format("arrow")[:].column(column)  # honours any index mapping
        if not pa.types.is_integer(values.type):
            raise ConfigError(f"config key 'data.label_column': column {column!r} of {where} holds {values.type}, "
                              f"not integer class labels; name an int or ClassLabel column, or null for no labels")
        if values.null_count:
            raise DataError(f"column {column!r} of {where} has {values.null_count} rows without a label; fill them "
                            f"or set data.label_column=null")
        labels = torch.from_numpy(values.to_numpy().astype(np.int64))
        if len(labels) and int(labels.min()) < 0:
            row = int(torch.argmin(labels))
            raise DataError(f"column {column!r} of {where} has the negative label {int(labels[row])} (row {row}); "
                            f"labels must lie in [0, cond.num_classes)")
        return labels

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> HFDataset:
        """Build from cfg.data (the split data.split names), labels checked against cond.num_classes, unflipped:
        train.py applies data.hflip to whole batches."""
        d = cfg.data
        if split != "train":
            raise ConfigError(f"data.name=hf reads the one split data.split={d.split!r} names, not {split!r}")
        if not d.path:
            raise ConfigError(f"config key 'data.path': data.name=hf needs {_SOURCES}")
        return cls(d.path, d.image_size, d.split, d.image_column, d.label_column, d.extra_columns,
                   num_classes=cfg.cond.num_classes)

    @classmethod
    def config_channels(cls, cfg) -> int:
        """Image channels of the configured dataset (always RGB)."""
        return cls.channels

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, value, index: int) -> Image.Image:
        from gen.data import DataError

        where = f"row {index} of column {self.image_column!r} of {self.where}"
        if isinstance(value, Image.Image):
            return _rgb(value, where)
        try:
            if isinstance(value, dict) and value.get("bytes") is not None:
                with Image.open(io.BytesIO(value["bytes"])) as image:
                    return _rgb(image, where)
            if isinstance(value, dict) and value.get("path"):
                with Image.open(value["path"]) as image:
                    return _rgb(image, f"{value['path']} ({where})")
            if isinstance(value, dict):
                raise DataError(f"{where} has neither image bytes nor a path; fill it or remove the row")
            arr = np.asarray(value)
            if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
                raise DataError(f"{where} is an array of {arr.dtype} {arr.shape}; image arrays must be uint8 HxW or "
                                f"HxWxC (C 1, 3 or 4); store them so, or as an Image feature")
            return _rgb(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr), where)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read the image in {where} ({type(err).__name__}: {err}); the data is corrupt "
                            f"or not an image: remove the row or store it again as PNG/JPEG") from err

    def __getitem__(self, index: int) -> dict:
        from gen.data import _item, adm_center_crop

        index = int(index)
        row = self.dataset[index]
        arr = adm_center_crop(self._image(row[self.image_column], index), self.image_size)
        # For direct use (the trainer flips batches itself): torch's RNG, which DataLoader seeds per worker.
        if self.hflip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # PIL arrays are read-only
        item = _item("image", image, int(self.labels[index]), index)
        item.update((name, row[name]) for name in self.extra_columns)
        return item
