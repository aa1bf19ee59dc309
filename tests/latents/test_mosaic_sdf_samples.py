"""Mosaic-SDF samples: the headless renderer (coverage against the projected silhouette, occlusion, shading), storage
rows (exact tokens) and mesh files, the unfitted-normaliser refusal, and shape metrics from folders and point clouds."""
import math

import numpy as np
import pytest
import torch
import trimesh

from gen.data import DataError
from gen.eval.shapes import load_clouds, shape_scores
from latents.mosaic_sdf import MosaicSDFSpace
from latents.mosaic_sdf.procedural import ProceduralShapes, write_folder
from latents.mosaic_sdf.render import EXTENT, camera_rotation, render_mesh

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_sphere_covers_its_projected_disc_and_is_lit_from_the_light_side():
    size, radius = 96, 0.8
    picture = render_mesh(trimesh.creation.icosphere(4, radius), size)
    covered = (picture != 255).any(0)
    expected = math.pi * (radius / EXTENT * size / 2) ** 2
    assert abs(covered.sum() - expected) < 0.03 * expected  # the silhouette: a disc of the projected radius
    rows, cols = np.nonzero(covered)
    assert abs(rows.mean() - size / 2) < 1 and abs(cols.mean() - size / 2) < 1
    grey = picture.astype(float).mean(0)
    upper_left, lower_right = grey[size // 2 - 10, size // 2 - 6], grey[size // 2 + 10, size // 2 + 6]
    assert upper_left > lower_right + 20  # the light comes from the upper left


def test_the_nearer_surface_hides_the_farther_one():
    size = 64
    rot = camera_rotation()
    near, far = trimesh.creation.box((0.4, 0.4, 0.4)), trimesh.creation.icosphere(3, 0.7)
    near.apply_translation(rot[2] * 1.2)  # towards the viewer
    far.apply_translation(-rot[2] * 1.2)
    both = render_mesh(trimesh.util.concatenate([far, near]), size)
    alone = render_mesh(near, size)
    mask = (alone != 255).any(0)
    assert np.array_equal(both[:, mask], alone[:, mask])


def test_empty_mesh_renders_blank():
    assert (render_mesh(trimesh.Trimesh(), 16) == 255).all()


@pytest.fixture(scope="module")
def space():
    shapes = ProceduralShapes(3)
    space = MosaicSDFSpace(n=24, k=3, surface_samples=1000, mc_resolution=32, render_size=32)
    return space.fit(space.encode_raw([shapes[i][0] for i in range(3)]))


def test_storage_rows_are_the_exact_tokens_and_save_samples_writes_meshes(space, tmp_path):
    z = torch.randn(3, *space.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    meshes = space.decode(z)
    rows = space.to_storage(meshes)
    assert rows.dtype == np.float32 and np.array_equal(rows, space.tokens(z).numpy())
    again = space.from_storage(rows)
    assert all(np.array_equal(a.vertices, b.vertices) for a, b in zip(meshes, again))
    pictures = space.render(meshes)
    assert pictures.shape == (3, 3, 32, 32) and pictures.dtype == torch.uint8
    out = space.save_samples(tmp_path / "s.npz", rows, np.array([2, 0, 1]))
    with np.load(out) as data:
        assert np.array_equal(data["arr_0"], rows) and list(data["arr_1"]) == [2, 0, 1]
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["000000-2.obj", "000001-0.obj", "000002-1.obj"]
    loaded = trimesh.load(tmp_path / "s" / files[0], force="mesh")
    assert np.allclose(np.sort(loaded.vertices, 0), np.sort(meshes[0].vertices, 0), atol=1e-6)


def test_an_unfitted_normaliser_is_refused():
    with pytest.raises(ValueError, match="not fitted.*prepare.py"):
        MosaicSDFSpace(n=4, k=2).to_model(torch.zeros(1, 4, 12))


def test_metrics_from_a_mesh_folder_equal_those_from_its_point_clouds(tmp_path):
    write_folder(tmp_path / "ref", 4, seed=1)
    write_folder(tmp_path / "gen", 4, seed=2)
    ref, gen = load_clouds(tmp_path / "ref", 64), load_clouds(tmp_path / "gen", 64)
    assert ref.shape == (4, 64, 3) and ref.abs().amax(dim=(1, 2)).allclose(torch.ones(4), atol=0.05)  # unit box
    np.savez(tmp_path / "gen.npz", points=gen.numpy())
    assert torch.equal(load_clouds(tmp_path / "gen.npz", 64), gen)
    scores = shape_scores(gen, ref, ("cd", "emd"), 16)
    assert 0 < scores["cov-cd"] <= 1 and scores["mmd-cd"] > 0 and scores["num_reference"] == 4
    same = shape_scores(ref, ref, ("cd",), 16)
    assert same["cov-cd"] == 1.0 and same["mmd-cd"] == 0.0
    np.savez(tmp_path / "bad.npz", points=np.zeros((2, 10, 3)))
    with pytest.raises(DataError, match="bad.npz.*P >= eval.shape_points=64"):
        load_clouds(tmp_path / "bad.npz", 64)
