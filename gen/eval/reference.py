"""Image sources (.npz sample/reference batches, image folders) and ADM-layout reference statistics files.

Layout (guided-diffusion evaluations/README.md and evaluator.py, ADM's `VIRTUAL_imagenet256_labeled.npz`):
`arr_0` uint8 (N, H, W, 3) images (the reference batch's 10K images, used for precision/recall), float64 `mu`/`sigma`
(pool_3, 2048) and `mu_s`/`sigma_s` (sFID spatial features, 2023). Files written here use the same keys and dtypes,
plus `mu_dinov2`/`sigma_dinov2` when FD-DINOv2 statistics are included (ADM's evaluator reads only the keys it knows,
so the file stays usable there). Everything is read with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gen.config import ConfigError
from gen.data import IMAGE_EXTENSIONS, DataError, adm_center_crop, load_rgb, prescan
from gen.eval.accumulate import Accumulator, feed
from gen.io import NpyWriter, atomic_write

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

# Feature name -> (mean key, covariance key) in a reference .npz.
REFERENCE_KEYS = {"pool_3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("mu_dinov2", "sigma_dinov2")}


class NpzImages:
    """The uint8 (N, H, W, 3) array `arr_0` of an .npz, read by slices: memory-mapped when stored uncompressed."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        try:
            zf = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"{self.path} is not a readable .npz file ({err}); give an .npz batch with arr_0 (as "
                            f"sample.py writes) or a folder of images") from None
        with zf:
            if f"{key}.npy" not in zf.namelist():
                raise DataError(f"{self.path} holds no '{key}' array (keys: {[n[:-4] for n in zf.namelist()]}); "
                                f"a sample or reference batch stores its images as arr_0 (uint8 N x H x W x 3)")
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in _HEADER_READERS:
                    raise DataError(f"{self.path}: '{key}' has .npy format {version}, not a plain array")
                shape, fortran, dtype = _HEADER_READERS[version](f)
                header = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise DataError(f"{self.path}: '{key}' is {dtype} {shape}, expected uint8 (N, H, W, 3) in C order "
                            f"(ADM layout: NHWC RGB images)")
        self.shape = tuple(shape)
        self._info, self._memmap = info, None
        if info.compress_type == zipfile.ZIP_STORED:
            # np.savez stores members uncompressed: map the array bytes in place instead of reading 10 GB through.
            with open(self.path, "rb") as raw:
                raw.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", raw.read(30)[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header
            self._memmap = np.memmap(self.path, np.uint8, "r", offset=offset, shape=self.shape)
        self._header = header

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices) -> np.ndarray:
        """Images at the given sorted global indices (a range or an int array) as uint8 (n, H, W, 3)."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return np.zeros((0, *self.shape[1:]), np.uint8)
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        contiguous = hi - lo == len(indices)
        if self._memmap is not None:
            return np.array(self._memmap[lo:hi] if contiguous else self._memmap[indices])
        item = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(self._info) as f:  # compressed: decompress up to `lo`
            f.seek(self._header + lo * item)
            block = np.frombuffer(f.read((hi - lo) * item), np.uint8).reshape(hi - lo, *self.shape[1:])
        return block.copy() if contiguous else block[indices - lo]


class FolderImages:
    """Image files under a folder (recursive, sorted), as uint8 (n, H, W, 3); ADM center crop when image_size is set."""

    def __init__(self, root: str | Path, image_size: int | None = None, check_files: bool = False):
        self.path, self.image_size = Path(root), image_size
        if not self.path.is_dir():
            raise DataError(f"{self.path} is neither an .npz file nor a folder of images")
        files = []
        for folder, subdirs, names in os.walk(self.path, followlinks=True):
            subdirs.sort()
            files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.path}")
        self.files = files
        self._shape = None
        if check_files:  # eval.prescan: every file readable, and of one size unless center-cropped, before any pass
            sizes = prescan(files, "eval.prescan")
            odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
            if odd is not None and not image_size:
                raise _mixed_sizes(files[odd], sizes[odd], sizes[0])

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices) -> np.ndarray:
        """Images at the given global indices (a range or an int array) as uint8 (n, H, W, 3)."""
        out = []
        for i in indices:
            path = self.files[int(i)]
            image = load_rgb(path)
            arr = adm_center_crop(image, self.image_size) if self.image_size else np.asarray(image)
            self._shape = self._shape or arr.shape
            if arr.shape != self._shape:
                raise _mixed_sizes(path, arr.shape[1::-1], self._shape[1::-1])
            out.append(arr)
        return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def _mixed_sizes(path, size: tuple, first: tuple) -> DataError:
    return DataError(f"{path} is {size[0]}x{size[1]}, other images are {first[0]}x{first[1]}: set eval.image_size to "
                     f"center-crop them all (ADM's crop)")


def open_images(path: str | Path, image_size: int | None = None, check_files: bool = False) -> NpzImages | FolderImages:
    """The images of an .npz batch (arr_0) or of a folder (`check_files`: pre-scanned, see FolderImages)."""
    path = Path(path)
    if path.is_file():
        return NpzImages(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected an .npz batch with arr_0, or a folder of images)")
    return FolderImages(path, image_size, check_files)


# ---------------------------------------------------------------------------------------------------
# Statistics files


def npz_headers(path: str | Path) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of every array of an .npz, from the headers alone (nothing is loaded)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in _HEADER_READERS:
                        raise DataError(f"{path}: '{name[:-4]}' has .npy format {version}, not a plain array")
                    shape, _, dtype = _HEADER_READERS[version](f)
                out[name[:-4]] = (tuple(shape), dtype)
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise DataError(f"{path} is not a readable .npz file ({err}); config key 'eval.reference'") from None
    return out


def _not_set() -> ConfigError:
    return ConfigError("config key 'eval.reference' is not set: FID, sFID, precision/recall and FD-DINOv2 compare "
                       "against a reference, e.g. ADM's VIRTUAL_imagenet256_labeled.npz (https://openaipublic.blob."
                       "core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz),"
                       " a file written by `evaluate.py --make-reference`, or a folder of images")


def check_reference(path, stats, gather, dims: dict[str, int], image_size: int | None = None,
                    check_files: bool = False, min_images: tuple[int, str, str] = (1, "", "")) -> None:
    """Before any feature pass: the reference at `path` (eval.reference) exists and an .npz holds, for each feature of
    `stats`, its mean/covariance pair of the network's width `dims[feature]` or arr_0 images to compute it from, and
    arr_0 images (uint8 N x H x W x 3) when features are gathered from it (precision/recall); a folder holds images
    (`check_files`: all readable, of one size unless center-cropped to `image_size`). Reference images, where they
    are read, number at least `min_images` = (count, the clause naming who needs them, the other fix)."""
    if not stats and not gather:
        return
    if not path:
        raise _not_set()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"config key 'eval.reference': {path} does not exist")
    if path.is_dir():
        folder = FolderImages(path, image_size, check_files)  # images there, readable, of one size (eval.prescan)
        _enough_images(path, len(folder), min_images)
        return
    arrays = npz_headers(path)
    lacking = []
    for f in sorted(stats):
        mu_key, sigma_key = REFERENCE_KEYS[f]
        if mu_key in arrays and sigma_key in arrays:
            mu, sigma = arrays[mu_key][0], arrays[sigma_key][0]
            if mu != (dims[f],) or sigma != (dims[f], dims[f]):
                raise DataError(f"{path}: {mu_key} {mu} and {sigma_key} {sigma} do not fit the feature network's "
                                f"width {dims[f]}; config key 'eval.reference': statistics of another network")
        else:
            lacking.append(f"{mu_key}/{sigma_key}")
    if (lacking or gather) and "arr_0" not in arrays:
        needs = lacking + (["arr_0 images for precision/recall"] if gather else [])
        raise DataError(f"config key 'eval.reference': {path} lacks {needs} and has no arr_0 images to compute them "
                        f"from (it holds {sorted(arrays)}); use an ADM reference batch or a file written by "
                        f"`evaluate.py --make-reference`")
    if lacking or gather:
        NpzImages(path)  # arr_0 must be uint8 NHWC RGB
        _enough_images(path, arrays["arr_0"][0][0], min_images)


def _enough_images(path: Path, n: int, min_images: tuple[int, str, str]) -> None:
    need, needs, fix = min_images
    if n < need:
        raise DataError(f"config key 'eval.reference': {path} holds {n} reference image(s), and {needs}; give a "
                        f"larger reference{fix}")


def read_stats(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """({feature: (mu, sigma) float64} for the keys present, whether arr_0 is present) of a reference .npz."""
    stats = {}
    with np.load(path, allow_pickle=False) as z:
        for feature, (mu_key, sigma_key) in REFERENCE_KEYS.items():
            if mu_key in z.files and sigma_key in z.files:
                mu, sigma = z[mu_key].astype(np.float64), z[sigma_key].astype(np.float64)
                if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                    raise DataError(f"{path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} are not a mean "
                                    f"vector and its square covariance")
                stats[feature] = (mu, sigma)
        return stats, "arr_0" in z.files


def write_stats(path: str | Path, stats: dict[str, tuple[np.ndarray, np.ndarray]], images=None, **extra) -> Path:
    """Write an ADM-layout reference .npz atomically: float64 mu/sigma pairs, optional arr_0 images, extra arrays."""
    path = Path(path)
    arrays = {}
    for feature, (mu, sigma) in stats.items():
        mu_key, sigma_key = REFERENCE_KEYS[feature]
        arrays[mu_key], arrays[sigma_key] = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if images is not None:
        arrays["arr_0"] = images
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def cache_file(cache_dir: str | Path, source: str | Path, tags: dict) -> Path:
    """Where computed reference quantities of `source` are cached: keyed by its identity (path, size, mtime) and
    tags."""
    source = Path(source).resolve()
    st = source.stat()
    key = json.dumps({"source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **tags}, sort_keys=True)
    return Path(cache_dir).expanduser() / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/repgen/eval, else ~/.cache/repgen/eval."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "repgen" / "eval"


# ---------------------------------------------------------------------------------------------------
# Resolving a reference for the metrics, and writing one for any dataset

PR_SUBSET_SEED = 0


@dataclass
class Reference:
    """What the metrics compare against: (mu, sigma) per feature, the P/R reference features, and their provenance."""

    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    features: dict[str, Tensor] = field(default_factory=dict)  # e.g. pool_3 of the P/R reference images
    record: dict = field(default_factory=dict)


def pr_subset(n: int, size: int) -> np.ndarray:
    """Sorted indices of the precision/recall reference images: all if n <= size, else a fixed random subset."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(PR_SUBSET_SEED).choice(n, size, replace=False))


def resolve_reference(path, stats, gather, networks, cfg, device, comm) -> Reference:
    """Statistics of `stats` features and gathered `gather` features of the reference at `path` (collective).

    A reference .npz's stored mu/sigma pairs are used as they are (ADM: "if mu is present"); the rest is computed
    from its images (arr_0, all of them, as ADM does for precision/recall) or from a folder's images (statistics
    over all, P/R features over eval.pr_reference_size of them), sharded over the processes and cached.
    """
    stats, gather = sorted(set(stats)), sorted(set(gather))
    if not stats and not gather:
        return Reference()
    if not path:
        raise _not_set()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"config key 'eval.reference': {path} does not exist")
    ref = Reference(record={"path": str(path)})
    if path.is_file():
        stored, _ = read_stats(path)
        dims = {f: d for net in networks.values() for f, d in net.dims.items()}
        for f in stats:
            if f in stored and len(stored[f][0]) != dims[f]:
                raise DataError(f"{path}: {REFERENCE_KEYS[f][0]} has {len(stored[f][0])} entries, the feature "
                                f"network gives {dims[f]}: the statistics come from another network")
        ref.stats = {f: stored[f] for f in stats if f in stored}
        ref.record["stats_from_file"] = sorted(ref.stats)
    missing = [f for f in stats if f not in ref.stats]
    if missing or gather:
        computed, counts = _from_images(path, missing, gather, networks, cfg, device, comm)
        ref.stats.update(computed.stats)
        ref.features = computed.features
        ref.record["computed_from_images"] = {"statistics": missing, "gathered": gather, **counts}
    return ref


def _from_images(path: Path, stats: list, gather: list, networks, cfg, device, comm) -> tuple[Reference, dict]:
    """Compute (or load from the cache) reference statistics and gathered features from the images at `path`."""
    source = open_images(path, cfg.image_size)
    pr_idx = pr_subset(len(source), cfg.pr_reference_size) if path.is_dir() else np.arange(len(source))
    wanted = set(stats) | set(gather)
    shas = {name: net.sha256 for name, net in networks.items() if wanted & set(net.dims)}
    tags = {"stats": stats, "gather": gather, "sha256": shas, "image_size": cfg.image_size, "pr_images": len(pr_idx)}
    cache = cache_file(cfg.cache_dir or default_cache_dir(), path, tags)
    counts = {"num_images": len(source), "num_pr_images": len(pr_idx) if gather else 0, "cache": str(cache)}
    out = Reference()
    if comm.broadcast(cache.is_file()):  # one decision for all processes: they must join the same collectives
        with np.load(cache, allow_pickle=False) as z:
            out.stats = {f: (z[REFERENCE_KEYS[f][0]], z[REFERENCE_KEYS[f][1]]) for f in stats}
            out.features = {f: torch.from_numpy(z[f"features_{f}"]).to(device) for f in gather}
        return out, counts
    one_pass = len(pr_idx) == len(source)
    passes = [(stats, gather, np.arange(len(source)))] if one_pass else [(stats, [], np.arange(len(source))),
                                                                        ([], gather, pr_idx)]
    for pass_stats, pass_gather, idx in passes:
        if not pass_stats and not pass_gather:
            continue
        acc = Accumulator(networks, pass_stats, pass_gather, device=device)
        feed(acc.update, source, idx, cfg.batch_per_process, comm, f"reference {path.name}")
        total = acc.reduce(comm)
        out.stats.update({f: (st.mean(), st.cov()) for f, st in total.stats.items()})
        out.features.update(total.gathered)
    if comm.rank == 0:
        write_stats(cache, out.stats, **{f"features_{f}": t.cpu().numpy() for f, t in out.features.items()})
    return out, counts


def make_reference(images, out, stats, networks, cfg, device, comm, with_images: bool = True) -> Path:
    """Write an ADM-layout reference .npz for any dataset (collective; rank 0 writes).

    float64 mu/sigma (and mu_s/sigma_s, mu_dinov2/sigma_dinov2) over all images of `images` (an .npz with arr_0 or a
    folder, ADM center-cropped to eval.image_size when set), and with `with_images` arr_0 = eval.pr_reference_size
    of them (a fixed random subset), the precision/recall reference set, as in ADM's reference batches.
    """
    if not stats and not with_images:
        raise ConfigError("config key 'eval.metrics': no metric needs a reference (fid, sfid, pr or fd_dinov2)")
    out = Path(out)
    source = open_images(images, cfg.image_size, cfg.prescan)
    moments = {}
    if stats:
        acc = Accumulator(networks, stats, device=device)
        feed(acc.update, source, np.arange(len(source)), cfg.batch_per_process, comm, "reference statistics")
        moments = {f: (st.mean(), st.cov()) for f, st in acc.reduce(comm).stats.items()}
    if comm.rank != 0:
        return out
    subset, tmp = None, out.with_name(f".{out.stem}.arr_0.npy")
    try:
        if with_images:
            idx = pr_subset(len(source), cfg.pr_reference_size)
            first = source.read(idx[:1])
            out.parent.mkdir(parents=True, exist_ok=True)
            writer = NpyWriter(tmp, (len(idx), *first.shape[1:]), np.uint8)  # a full disk: OSError, not SIGBUS
            for start in range(0, len(idx), cfg.batch_per_process):
                writer.write(source.read(idx[start:start + cfg.batch_per_process]))
            subset = np.load(writer.close(), mmap_mode="r")
        write_stats(out, moments, subset, num_images=np.int64(len(source)))
    finally:
        del subset
        tmp.unlink(missing_ok=True)
    return out
