"""3D shape metrics: Chamfer and EMD identities, EMD against brute force, COV / MMD / 1-NNA on known set relations."""
import itertools

import pytest
import torch

from gen.eval.shape_metrics import chamfer, coverage, emd, mesh_points, mmd, one_nna, pairwise, set_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def sphere_cloud(radius, count, generator):
    d = torch.randn(count, 3, generator=generator)
    return radius * d / d.norm(dim=-1, keepdim=True)


def cube_cloud(half, count, generator):
    """Points on the surface of an axis-aligned cube: one coordinate pushed to +-half."""
    p = (2 * torch.rand(count, 3, generator=generator) - 1) * half
    axis = torch.randint(3, (count,), generator=generator)
    sign = torch.randint(2, (count,), generator=generator) * 2 - 1
    p[torch.arange(count), axis] = half * sign
    return p


def test_chamfer_is_zero_on_itself_symmetric_and_squared_l2_summed_over_both_directions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 50, 3, generator=g), torch.randn(2, 70, 3, generator=g)
    assert torch.equal(chamfer(x, x), torch.zeros(2))
    assert torch.allclose(chamfer(x, y), chamfer(y, x))
    one, other = torch.zeros(1, 1, 3), torch.tensor([[[2.0, 0.0, 0.0]]])
    assert chamfer(one, other).item() == pytest.approx(8.0)  # 2^2 each way, the two means summed


def test_emd_equals_brute_force_over_all_matchings():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 6, 3, generator=g, dtype=torch.float64), torch.randn(3, 6, 3, generator=g,
                                                                                  dtype=torch.float64)
    dist = torch.cdist(x, y)
    brute = torch.stack([min(dist[b, range(6), list(p)].mean() for p in itertools.permutations(range(6)))
                         for b in range(3)])
    assert torch.allclose(emd(x, y), brute, atol=1e-12)
    assert torch.equal(emd(x, x), torch.zeros(3, dtype=torch.float64))
    assert emd(x, y).gt(0).all()


def test_pairwise_matches_the_direct_computation_in_any_batching():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 32, 3, generator=g), torch.randn(4, 32, 3, generator=g)
    d = pairwise(a, b, "cd")
    assert d.shape == (5, 4)
    assert torch.allclose(d[3, 2], chamfer(a[3:4], b[2:3])[0])
    import gen.eval.shape_metrics as sm
    direct = torch.stack([chamfer(a[i:i + 1].expand(4, -1, -1), b) for i in range(5)])  # the batched cdist path
    assert torch.allclose(sm.chamfer_kdtree(a, b), direct, rtol=1e-6, atol=0)
    assert torch.equal(sm.chamfer_kdtree(a, a).diagonal(), torch.zeros(5))
    before, sm.PAIRS_PER_BATCH = sm.PAIRS_PER_BATCH, 32 * 32 * 3  # three pairs per batch
    try:  # the batched torch path (EMD; Chamfer on the CPU goes through the k-d trees)
        assert torch.allclose(pairwise(a, b, "emd"), torch.stack([emd(a[i:i + 1].expand(4, -1, -1), b)
                                                                  for i in range(5)]))
    finally:
        sm.PAIRS_PER_BATCH = before


def test_identical_sets_have_full_coverage_zero_mmd_and_duplicates_give_zero_1nna():
    g = torch.Generator().manual_seed(3)
    clouds = torch.stack([sphere_cloud(0.2 + 0.05 * i, 64, g) for i in range(6)])
    out = set_metrics(clouds, clouds.clone())
    assert out["cov-cd"] == 1.0 and out["mmd-cd"] == 0.0 and out["cov-emd"] == 1.0 and out["mmd-emd"] == 0.0
    assert out["1-nna-cd"] == 0.0 and out["1-nna-emd"] == 0.0  # each shape's nearest neighbour is its twin


def test_two_samples_of_one_shape_distribution_give_1nna_near_half_and_separated_sets_give_one():
    g = torch.Generator().manual_seed(4)
    radii = 0.2 + 0.4 * torch.rand(80, generator=g)
    clouds = torch.stack([sphere_cloud(float(r), 96, g) for r in radii])
    gen, ref = clouds[:40], clouds[40:]
    d_gr, d_gg, d_rr = pairwise(gen, ref), pairwise(gen, gen), pairwise(ref, ref)
    assert 0.35 <= one_nna(d_gg, d_rr, d_gr) <= 0.65
    assert coverage(d_gr) > 0.4 and mmd(d_gr) < 0.05
    cubes = torch.stack([cube_cloud(0.3 + 0.2 * float(torch.rand(1, generator=g)), 96, g) for _ in range(40)])
    separated = set_metrics(gen, cubes, distances=("cd",))
    assert separated["1-nna-cd"] == 1.0
    assert separated["mmd-cd"] > mmd(d_gr)


def test_mesh_points_lie_on_the_mesh_and_an_empty_mesh_gives_a_finite_cloud():
    import trimesh

    points = mesh_points(trimesh.creation.icosphere(subdivisions=3, radius=0.5), 256, seed=0)
    assert points.shape == (256, 3)
    assert (points.norm(dim=-1) - 0.5).abs().max() < 5e-3
    assert torch.equal(points, mesh_points(trimesh.creation.icosphere(subdivisions=3, radius=0.5), 256, seed=0))
    empty = mesh_points(trimesh.Trimesh(), 16)
    assert empty.shape == (16, 3) and torch.isfinite(empty).all()
