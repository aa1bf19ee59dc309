"""3D shape datasets for latent spaces of modality "shape" (latents.mosaic_sdf): procedural shapes and mesh folders.

Items are {"raw": the latent's raw encoding of the mesh (Mosaic-SDF tokens (n, 4 + k^3) float32), "label", "index",
"caption" (a string, where the dataset has captions)}:
the conversion runs in `__getitem__`, so prepare.py's DataLoader workers convert meshes in parallel, and training
reads the raw encodings through the same path as a latent cache's. `mesh(i)` gives item i's mesh as read.

- data.name=procedural_shapes: latents.mosaic_sdf.procedural's shape classes with random proportions, item i a pure
  function of (split seed, i); data.num_items shapes per split; data.split train (seed 0) or heldout (seed 1); each
  item's caption is templated from its class and proportions (procedural.caption: "a large tall cylinder").
- data.name=mesh_folder: data.path/<class>/**/<mesh file> with trimesh (obj, off, ply, stl, glb; ShapeNetCore v2's
  <synset>/<model id>/models/model_normalized.obj layout works as is); labels are the sorted class folders' indices.
  data.prescan reads every mesh first and refuses an empty or (with latent.mosaic_sdf.open_meshes=refuse) a
  non-watertight one, naming the file, before anything is written. Captions (for text conditioning, gen.text) come
  from an optional file data.path/captions.tsv, one line per mesh: its path relative to data.path, a tab, the
  caption (UTF-8); when the file exists every mesh needs a line.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gen.config import ConfigError

# gen.data (DataError, _item) is imported inside the functions: its registry imports this module.

CAPTIONS_FILE = "captions.tsv"
"""A mesh folder's optional captions: `relative/path/of/mesh<TAB>caption` per line."""

MESH_EXTENSIONS = (".obj", ".off", ".ply", ".stl", ".glb")
"""Mesh file suffixes a mesh folder is scanned for (case-insensitive)."""

SPLIT_SEEDS = {"train": 0, "heldout": 1}
"""Procedural shapes: the seed of each split (items of different seeds are independent draws)."""


def read_mesh(path):
    """One mesh file as a single trimesh.Trimesh (scenes concatenated; a file without faces gives an empty mesh), or a
    DataError naming the file."""
    import trimesh

    from gen.data import DataError

    try:
        mesh = trimesh.load(str(path), force="mesh", process=True)
    except Exception as err:  # noqa: BLE001 -- trimesh raises many types for foreign or corrupt files
        raise DataError(f"cannot read mesh {path} ({type(err).__name__}: {' '.join(str(err).split())}); remove it or "
                        f"re-export it as one of {', '.join(MESH_EXTENSIONS)}") from err
    if not isinstance(mesh, trimesh.Trimesh):
        raise DataError(f"mesh {path} holds no triangles ({type(mesh).__name__}); remove the file")
    return mesh


def load_mesh(path, allow_open: bool = False):
    """read_mesh, refusing empty and, unless `allow_open`, non-watertight meshes with a DataError naming the file."""
    from gen.data import DataError
    from latents.mosaic_sdf.build import check_mesh

    mesh = read_mesh(path)
    try:
        check_mesh(mesh, allow_open)
    except ValueError as err:
        raise DataError(f"mesh {path}: {err}") from None
    return mesh


def _encode(latent, mesh, where: str) -> torch.Tensor:
    from gen.data import DataError

    try:
        return latent.encode_raw([mesh])[0]
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def _check_shape_latent(cfg, latent) -> None:
    if latent.modality != "shape":
        raise ConfigError(f"config key 'data.name': {cfg.data.name} holds 3D shapes, but latent.name="
                          f"{cfg.latent.name} encodes {latent.modality}s; use latent.name=mosaic-sdf")


def read_captions(root: Path, files: list[str]) -> list[str] | None:
    """The captions of `files` (paths under `root`) from root/captions.tsv, None without that file; a DataError names
    the file and the first meshes it lacks, or a line without a tab."""
    from gen.data import DataError

    path = root / CAPTIONS_FILE
    if not path.is_file():
        return None
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, text = line.partition("\t")
        if not tab:
            raise DataError(f"{path} line {number} has no tab; each line is <mesh path relative to {root}><TAB>"
                            f"<caption>")
        table[Path(name).as_posix()] = text.strip()
    relative = [Path(f).relative_to(root).as_posix() for f in files]
    missing = [r for r in relative if r not in table]
    if missing:
        raise DataError(f"{path} has no caption for {len(missing)} meshes, e.g. {missing[:3]}; add a line "
                        f"<path><TAB><caption> for each mesh, or remove the file")
    return [table[r] for r in relative]


class ProceduralShapesDataset(Dataset):
    """data.num_items procedural meshes of a split, encoded by the run's latent space on access."""

    def __init__(self, latent, num_items: int, split: str = "train"):
        from latents.mosaic_sdf.procedural import CLASSES, ProceduralShapes

        if split not in SPLIT_SEEDS:
            raise ConfigError(f"config key 'data.split': procedural_shapes has splits {sorted(SPLIT_SEEDS)}, "
                              f"not {split!r}")
        self.latent, self.split = latent, split
        self.shapes = ProceduralShapes(num_items, seed=SPLIT_SEEDS[split])
        self.classes, self.num_classes = CLASSES, len(CLASSES)
        self.labels = torch.arange(num_items, dtype=torch.int64) % self.num_classes

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> ProceduralShapesDataset:
        """From cfg.data.num_items and cfg.data.split (train.py's split "train" reads cfg.data.split too, so that
        prepare.py can write a held-out cache)."""
        from latents import build_latent

        if not cfg.data.num_items:
            raise ConfigError("config key 'data.num_items': data.name=procedural_shapes needs the number of shapes")
        latent = build_latent(cfg)
        _check_shape_latent(cfg, latent)
        return cls(latent, cfg.data.num_items, cfg.data.split if split == "train" else split)

    @classmethod
    def config_channels(cls, cfg) -> int:
        """Shapes have no image channels: 0."""
        return 0

    def __len__(self) -> int:
        return len(self.shapes)

    def mesh(self, index: int):
        """Item `index`'s mesh, as made (not normalised)."""
        return self.shapes[index][0]

    def __getitem__(self, index: int) -> dict:
        from gen.data import _item

        from latents.mosaic_sdf.procedural import caption

        mesh = self.mesh(index)
        raw = _encode(self.latent, mesh, f"procedural shape {index} ({self.split})")
        item = _item("raw", raw, int(self.labels[index]), index)
        item["caption"] = caption(mesh, self.classes[int(self.labels[index])])
        return item


class MeshFolderDataset(Dataset):
    """Class sub-folders of mesh files (searched recursively), encoded by the run's latent space on access."""

    def __init__(self, root, latent, check_files: bool = True, allow_open: bool = False):
        from gen.data import DataError

        self.root, self.latent, self.allow_open = Path(root), latent, bool(allow_open)
        layout = "expected data.path=ROOT with ROOT/<class name>/.../<mesh files> (ShapeNetCore v2's layout works)"
        if not self.root.is_dir():
            raise DataError(f"mesh folder {self.root} does not exist or is not a folder; {layout}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"mesh folder {self.root} has no class sub-folders; {layout}")
        files, labels, empty = [], [], []
        for label, name in enumerate(self.classes):
            found = []
            for folder, subdirs, names in os.walk(self.root / name, followlinks=True):
                subdirs.sort()
                found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(MESH_EXTENSIONS)]
            empty += [] if found else [name]
            files += found
            labels += [label] * len(found)
        if empty:
            raise DataError(f"class folders without meshes in {self.root}: {empty[:5]}; add meshes "
                            f"({', '.join(MESH_EXTENSIONS)}) or remove those folders")
        if check_files:
            for path in files:
                load_mesh(path, self.allow_open)
        self.files = files
        self.captions = read_captions(self.root, files)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.classes)

    @classmethod
    def from_config(cls, cfg, split: str = "train") -> MeshFolderDataset:
        """From cfg.data.path (train split only) and cfg.data.prescan."""
        from latents import build_latent

        if split != "train":
            raise ConfigError(f"data.name=mesh_folder has only the 'train' split, not {split!r}")
        if not cfg.data.path:
            raise ConfigError("config key 'data.path': data.name=mesh_folder needs the folder of class sub-folders")
        latent = build_latent(cfg)
        _check_shape_latent(cfg, latent)
        return cls(cfg.data.path, latent, check_files=cfg.data.prescan,
                   allow_open=cfg.latent.mosaic_sdf.open_meshes == "winding")

    @classmethod
    def config_channels(cls, cfg) -> int:
        """Shapes have no image channels: 0."""
        return 0

    def __len__(self) -> int:
        return len(self.files)

    def mesh(self, index: int):
        """Item `index`'s mesh, as read (checked, not normalised)."""
        return load_mesh(self.files[index], self.allow_open)

    def __getitem__(self, index: int) -> dict:
        from gen.data import _item

        raw = _encode(self.latent, self.mesh(index), f"mesh {self.files[index]}")
        item = _item("raw", raw, int(self.labels[index]), index)
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item
