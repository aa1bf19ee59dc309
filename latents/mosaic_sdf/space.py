"""The `mosaic-sdf` latent space: shapes as unordered sets of n tokens [centre, half side, k^3 SDF values]
(Yariv et al., "Mosaic-SDF for 3D Generative Models", CVPR 2024, arXiv 2312.09222).

Raw encoding (what a cache stores): float32 token matrices (n, 4 + k^3) built from meshes. Model input: the tokens
standardised per column (statistics pooled over all rows of the training shapes, saved in every checkpoint) with
their rows in a fresh random order each step (a draw, so runs stay invariant to the number of processes).
Decoded samples: a list of trimesh.Trimesh in the normalised box [-1, 1]^3, one per sample (empty when the
field has no zero crossing).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gen.config import ComponentConfig, check
from gen.io import atomic_write
from gen.validation import in_range
from latents.base import LatentSpace
from latents.mosaic_sdf.build import from_mesh
from latents.mosaic_sdf.extract import to_mesh
from latents.mosaic_sdf.normaliser import ColumnNormaliser
from latents.mosaic_sdf.render import render_mesh
from latents.mosaic_sdf.representation import MosaicSDF, token_width

TOKENS_KEY = "mosaic_sdf_tokens"
"""Key of a decoded mesh's metadata holding its raw token matrix (n, d)."""

OPEN_MESHES = ("refuse", "winding")
"""What latent.mosaic_sdf.open_meshes may say about meshes that are not watertight."""


@dataclass
class MosaicSDFConfig(ComponentConfig):
    """Mosaic-SDF: n local k^3 SDF grids per shape (one token per grid, no order)."""

    n: int = 1024
    """Grids per shape (tokens per sample); the paper's setting is 1024."""
    k: int = 7
    """Lattice nodes per grid axis (token width 4 + k^3); the paper's setting is 7."""
    margin: float = 0.9
    """Largest half extent of each mesh's centred bounding box (< 1: marching cubes on [-1, 1]^3 never clips it)."""
    alpha: float = 1.5
    """Common half side = alpha * max over surface samples of the L-inf distance to the nearest centre (> 1)."""
    surface_samples: int = 20000
    """Surface points sampled per mesh for the farthest-point centres and the scale rule."""
    log_scale: bool = True
    """Standardise log(half side) instead of the half side (de-normalised samples then always have s > 0)."""
    shuffle_rows: bool = True
    """Give each training sample's rows a fresh random order every step (a set has no order)."""
    mc_resolution: int = 128
    """Nodes per axis of the dense grid over [-1, 1]^3 that marching cubes runs on when decoding."""
    render_size: int = 128
    """Side in pixels of the shaded pictures of decoded meshes (previews, sample grids)."""
    mesh_format: str = "obj"
    """File format of the meshes sample.py writes: obj or ply."""
    open_meshes: str = "refuse"
    """Meshes that are not watertight: refuse (naming the file) or winding (the generalised winding number decides
    inside; ShapeNet's meshes are mostly open)."""

    def validate(self, cfg) -> None:
        """Positive sizes, a margin in (0, 1], alpha > 1 and enough surface samples for n centres."""
        in_range("latent.mosaic_sdf.n", self.n, 1)
        in_range("latent.mosaic_sdf.k", self.k, 2, why="a grid needs two nodes per axis")
        in_range("latent.mosaic_sdf.margin", self.margin, 0.0, 1.0, above=True)
        in_range("latent.mosaic_sdf.alpha", self.alpha, 1.0, above=True, why="else surface points may be uncovered")
        in_range("latent.mosaic_sdf.surface_samples", self.surface_samples, self.n,
                 why="the n centres are picked among them")
        in_range("latent.mosaic_sdf.mc_resolution", self.mc_resolution, 8)
        in_range("latent.mosaic_sdf.render_size", self.render_size, 8)
        check(self.mesh_format in ("obj", "ply"), "latent.mosaic_sdf.mesh_format",
              f"{self.mesh_format!r} is not obj or ply")
        check(self.open_meshes in OPEN_MESHES, "latent.mosaic_sdf.open_meshes",
              f"{self.open_meshes!r} is not one of {list(OPEN_MESHES)}")


class MosaicSDFSpace(LatentSpace):
    """Meshes <-> standardised, row-shuffled Mosaic-SDF token sets."""

    name = "mosaic-sdf"
    Config = MosaicSDFConfig
    kind = "continuous"
    layout = "set"
    modality = "shape"
    raw_dtype = torch.float32
    fitted = True  # the column normaliser: prepare.py fits it over the cache
    DRAWS = {"order": "sample"}

    def __init__(self, n: int = 1024, k: int = 7, margin: float = 0.9, alpha: float = 1.5,
                 surface_samples: int = 20000, log_scale: bool = True, shuffle_rows: bool = True,
                 mc_resolution: int = 128, open_meshes: str = "refuse", render_size: int = 128,
                 mesh_format: str = "obj"):
        self.n, self.k = int(n), int(k)
        self.margin, self.alpha = float(margin), float(alpha)
        self.surface_samples = int(surface_samples)
        self.shuffle_rows = bool(shuffle_rows)
        self.mc_resolution = int(mc_resolution)
        self.open_meshes = str(open_meshes)
        self.render_size, self.mesh_format = int(render_size), str(mesh_format)
        self.shape = self.raw_shape = (self.n, token_width(self.k))
        self.normaliser = ColumnNormaliser(token_width(self.k), log_scale=log_scale)

    @classmethod
    def from_config(cls, cfg) -> MosaicSDFSpace:
        """From cfg.latent.mosaic_sdf."""
        c = cfg.latent.mosaic_sdf
        return cls(c.n, c.k, c.margin, c.alpha, c.surface_samples, c.log_scale, c.shuffle_rows, c.mc_resolution,
                   c.open_meshes, c.render_size, c.mesh_format)

    def encode_raw(self, meshes, seed: int = 0) -> Tensor:
        """A sequence of watertight trimesh meshes -> float32 token matrices (N, n, 4 + k^3), without fine-tune.
        Every mesh's surface samples are drawn with the same `seed`, so a mesh's encoding does not depend on the
        batch it comes in."""
        return torch.stack([from_mesh(m, self.n, self.k, self.alpha, self.margin, self.surface_samples, seed=seed,
                                      allow_open=self.open_meshes == "winding").to_tokens() for m in meshes]).float()

    def encode(self, meshes, generator: torch.Generator | None = None, order: Tensor | None = None) -> Tensor:
        """On-the-fly encoding: meshes -> model inputs (standardised, rows in `order` or a drawn order)."""
        return self.to_model(self.encode_raw(meshes), generator=generator, order=order)

    def fit(self, raw: Tensor) -> MosaicSDFSpace:
        """Add raw token matrices (..., n, 4 + k^3) to the normalisation statistics (call once per shard)."""
        self.normaliser.update(raw)
        return self

    def draw(self, n: int, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """A random row order (argsort of uniforms) for each of n samples, (n, self.n) int64."""
        return {"order": torch.rand((n, self.n), generator=generator, device=device).argsort(dim=1)}

    def to_model(self, raw: Tensor, generator: torch.Generator | None = None, order: Tensor | None = None) -> Tensor:
        """Standardised tokens, rows taken in `order` (or an order drawn from `generator`) when shuffle_rows."""
        if self.normaliser.count == 0:
            raise ValueError("the Mosaic-SDF column normaliser is not fitted; train on a cache that prepare.py wrote "
                             "(data.name=latent_cache, it fits the normaliser), or call fit(raw) first")
        z = self.normaliser.encode(raw.to(torch.float32))
        if not self.shuffle_rows:
            return z
        if order is None:
            order = self.draw(z.shape[0], generator, None if generator is None else generator.device)["order"]
        return torch.gather(z, 1, order.to(z.device)[..., None].expand_as(z))

    def tokens(self, z: Tensor) -> Tensor:
        """Model-space samples (N, n, d) -> raw token matrices (half sides clamped to >= 1e-6)."""
        raw = self.normaliser.decode(z.to(torch.float32))
        return torch.cat([raw[..., :3], raw[..., 3:4].clamp_min(1e-6), raw[..., 4:]], dim=-1)

    def mesh(self, tokens: Tensor):
        """Raw tokens (n, d) -> the decoded trimesh.Trimesh, carrying the tokens in metadata[TOKENS_KEY]."""
        mesh = to_mesh(MosaicSDF.from_tokens(tokens), self.mc_resolution)
        mesh.metadata[TOKENS_KEY] = tokens.detach().cpu().float()
        return mesh

    @torch.no_grad()
    def decode(self, z: Tensor, rounding: str = "round") -> list:
        """Model-space samples (N, n, d) -> N trimesh.Trimesh meshes in [-1, 1]^3, each carrying its raw tokens in
        metadata[TOKENS_KEY] (what to_storage keeps); `rounding` is for images and is ignored."""
        return [self.mesh(t) for t in self.tokens(z)]

    def render(self, samples) -> Tensor:
        """Shaded pictures of meshes (headless CPU z-buffer, latents.mosaic_sdf.render), uint8 (N, 3, S, S)."""
        return torch.from_numpy(np.stack([render_mesh(m, self.render_size) for m in samples]))

    def to_storage(self, samples) -> np.ndarray:
        """Decoded meshes -> their raw token matrices, float32 (N, n, d): fixed-size rows, exact, decodable again."""
        return np.stack([m.metadata[TOKENS_KEY].numpy() for m in samples]).astype(np.float32)

    def from_storage(self, rows) -> list:
        """Stored token matrices -> meshes (decoded again, deterministically)."""
        return [self.mesh(torch.from_numpy(np.array(r, dtype=np.float32))) for r in rows]

    def export(self, mesh, path: Path) -> None:
        """Write one mesh in mesh_format (an empty one as a readable empty OBJ: trimesh writes an unreadable one)."""
        if len(mesh.faces) == 0 and self.mesh_format == "obj":
            Path(path).write_text("# no zero crossing: an empty mesh\n")
        else:
            mesh.export(str(path), file_type=self.mesh_format)

    def save_samples(self, path, rows, labels) -> Path:
        """The raw tokens and labels as .npz (arr_0, arr_1; written last, atomically) and one mesh file per sample
        in the folder next to it, <stem>/<index>-<label>.<mesh_format>, each written atomically."""
        path = Path(path)
        folder = path.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        for i, (row, label) in enumerate(zip(rows, labels)):
            mesh = self.from_storage(row[None])[0]
            atomic_write(folder / f"{i:06d}-{int(label)}.{self.mesh_format}", lambda tmp, m=mesh: self.export(m, tmp))
        return atomic_write(path, lambda tmp: np.savez(tmp, arr_0=np.asarray(rows), arr_1=np.asarray(labels)))

    def settings(self) -> dict:
        """What determines the raw encoding (the cache): n, k, margin, alpha, surface samples."""
        return {"n": self.n, "k": self.k, "margin": self.margin, "alpha": self.alpha,
                "surface_samples": self.surface_samples, "open_meshes": self.open_meshes}

    def state_dict(self) -> dict:
        """The per-column normalisation statistics."""
        return {"normaliser": self.normaliser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict's output."""
        unknown = set(state) - {"normaliser"}
        if unknown:
            raise KeyError(f"{type(self).__name__} has no state {sorted(unknown)}")
        if "normaliser" in state:
            self.normaliser.load_state_dict(state["normaliser"])
