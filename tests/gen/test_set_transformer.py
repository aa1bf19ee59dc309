"""The set-transformer family: permutation equivariance (and a guard that a position table breaks it), parameter
count against its formula, the null class, and overfitting a few shapes' tokens with the flow objective."""
import pytest
import torch
from helpers import randomize

from gen.cond import Cond
from gen.models import FAMILIES, SIZES, SetTransformer, build_model, require_grid
from gen.objectives import FlowObjective

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(sample_shape=(24, 13), depth=2, hidden_size=32, num_heads=4, num_classes=5)


def test_registered_with_sizes():
    assert FAMILIES["set_transformer"] is SetTransformer
    assert sorted(SetTransformer.MODELS) == sorted(f"SetT-{s}" for s in SIZES)
    assert SetTransformer.LAYOUTS == ("set",)


def analytic_params(depth, hidden_size, width, num_classes, mlp_ratio=4, **_):
    """Parameter count written out by hand: row Linear, time MLP, label table (+ null), blocks, final layer."""
    d = hidden_size
    embed = width * d + d
    cond = (256 * d + d) + (d * d + d) + (num_classes + 1) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + 2 * mlp_ratio * d * d + mlp_ratio * d + d + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (width * d + width)
    return embed + cond + depth * block + final


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameter_count_matches_the_formula(size):
    with torch.device("meta"):
        model = build_model(f"SetT-{size}", sample_shape=(1024, 347), num_classes=55)
    assert sum(p.numel() for p in model.parameters()) == analytic_params(**SIZES[size], width=347, num_classes=55)


def permuted_outputs(model, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *model.sample_shape, generator=g)
    t, y = torch.rand(n, generator=g), torch.tensor([0, 4, model.null_class])[:n]
    perm = torch.randperm(model.sample_shape[0], generator=g)
    model.eval()
    with torch.no_grad():
        a, b = model(x, t, Cond(y), taps=(1, 2)), model(x[:, perm], t, Cond(y), taps=(1, 2))
    return a, b, perm


def test_permutation_equivariant_outputs_and_features():
    model = randomize(build_model("SetT-S", **TINY))
    a, b, perm = permuted_outputs(model)
    assert a.out.abs().max() > 0.1  # not the zero-initialised output
    torch.testing.assert_close(b.out, a.out[:, perm], atol=1e-5, rtol=0)
    for k in (1, 2):
        torch.testing.assert_close(b.feats[k], a.feats[k][:, perm], atol=1e-5, rtol=0)


def test_a_position_embedding_breaks_equivariance(monkeypatch):
    """The guard: the equivariance check above fails as soon as anything indexed by position enters the tokens."""
    model = randomize(build_model("SetT-S", **TINY))
    table = torch.randn(1, *model.sample_shape[:1], model.hidden_size)
    embed = model.x_embedder.forward
    monkeypatch.setattr(model.x_embedder, "forward", lambda x: embed(x) + table)
    a, b, perm = permuted_outputs(model)
    assert not torch.allclose(b.out, a.out[:, perm], atol=1e-3)


def test_no_parameter_or_buffer_depends_on_the_set_size():
    small, large = build_model("SetT-S", **TINY), build_model("SetT-S", **{**TINY, "sample_shape": (57, 13)})
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in large.state_dict().items()}


def test_null_class_and_no_grid():
    model = randomize(build_model("SetT-S", **TINY))
    assert model.null_class == 5 and model.y_embedder.embedding_table.weight.shape[0] == 6
    with pytest.raises(ValueError, match="no grid"):
        require_grid(model, "align.methods=[repa]")


def token_set_chamfer(a, b):
    """Chamfer distance between two token sets (rows as points), to recognise a set whatever its row order."""
    d = torch.cdist(a, b).square()
    return d.amin(1).mean() + d.amin(0).mean()


def test_overfits_a_few_shapes_tokens_class_conditionally():
    """Four procedural shapes (one per class) as Mosaic-SDF token sets, rows shuffled every step: class-conditional
    flow matching learns them, and a guided Euler sample of class c is nearest (as a set) to shape c."""
    from latents.mosaic_sdf import MosaicSDFSpace
    from latents.mosaic_sdf.procedural import ProceduralShapes

    shapes = ProceduralShapes(4, seed=0, classes=("box", "sphere", "torus", "cone"))
    space = MosaicSDFSpace(n=16, k=3, surface_samples=2000)
    raw = space.encode_raw([shapes[i][0] for i in range(4)])
    space.fit(raw)
    labels = torch.arange(4)
    torch.manual_seed(0)
    model = build_model("SetT-S", sample_shape=space.shape, depth=2, hidden_size=64, num_heads=4, num_classes=4)
    objective = FlowObjective(label_dropout=0.1, null_class=model.null_class)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(400):
        x0 = space.to_model(raw.repeat(4, 1, 1), generator=g)
        loss = objective.loss(model, x0, Cond(labels.repeat(4)), taps=(), **objective.draw(16, space.shape, g)).loss
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    assert sum(losses[-20:]) / 20 < 0.4 * sum(losses[:5]) / 5
    model.eval()
    with torch.no_grad():
        z = objective.sample(objective.model_fn(model), torch.randn(4, *space.shape, generator=g), Cond(labels),
                             sampler="euler", num_steps=30, cfg_scale=2.0)
    target = space.to_model(raw, order=torch.arange(16).expand(4, -1))
    nearest = [min(range(4), key=lambda j: float(token_set_chamfer(z[i], target[j]))) for i in range(4)]
    assert nearest == [0, 1, 2, 3]
