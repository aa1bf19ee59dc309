"""Flow objective: path coefficients, exact prediction conversions, the loss against its closed formula, label
dropout, time samplers, and a tiny SiT overfitting one batch."""
import math
from typing import NamedTuple

import pytest
import torch
from torch import nn

from gen.objectives.flow import PATHS, FlowObjective

T_INNER = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


class Out(NamedTuple):
    """Stand-in for gen.models.BackboneOutput."""

    out: torch.Tensor
    feats: dict


class Affine(nn.Module):
    """A known network: out = k * x_t + (t + 1) per channel, plus junk extra channels; records its inputs."""

    def __init__(self, channels, extra=0):
        super().__init__()
        self.k = torch.linspace(-1.0, 1.0, channels + extra, dtype=torch.float64).view(1, -1, 1, 1)
        self.extra = extra
        self.calls = []

    def forward(self, x, t, y, taps=(), stop_at=None):
        self.calls.append({"x": x, "t": t, "y": y, "taps": taps})
        xx = torch.cat([x, x[:, : self.extra] * 0 + 1e3], dim=1) if self.extra else x
        out = self.k * xx + (t.view(-1, 1, 1, 1) + 1)
        return Out(out, {k: torch.full((x.shape[0], 2, 3), float(k)) for k in taps})


def closed_form(name, t):
    """(alpha, sigma, d_alpha, d_sigma) written out from SiT transport/path.py (ICPlan,
    GVPCPlan, VPCPlan) under t = 1 - s, independent of flow.py."""
    if name == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if name == "cosine":
        h = math.pi / 2
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
    m = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
    a, da = torch.exp(m), torch.exp(m) * (-0.5 * t * (20 - 0.1) - 0.05)
    s = torch.sqrt(1 - a**2)
    return a, s, da, -a * da / s


@pytest.mark.parametrize("name", sorted(PATHS))
def test_coefficients_match_closed_form_and_finite_differences(name):
    path = PATHS[name]()
    a, s, da, ds = path.coefficients(T_INNER)
    ref = closed_form(name, T_INNER)
    torch.testing.assert_close(a, ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s, ref[1], rtol=1e-10, atol=1e-14)
    h = 1e-6
    ap, sp, _, _ = path.coefficients(T_INNER + h)
    am, sm, _, _ = path.coefficients(T_INNER - h)
    torch.testing.assert_close(da, (ap - am) / (2 * h), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ds, (sp - sm) / (2 * h), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_coefficients_broadcast_like_x_and_follow_its_dtype(name):
    path = PATHS[name]()
    x = torch.zeros(3, 4, 5, 6)
    c = path.coefficients(torch.tensor([0.1, 0.5, 0.9]), x)
    assert all(v.shape == (3, 1, 1, 1) and v.dtype == torch.float32 for v in c)
    a, s, *_ = c
    assert ((a - 1).abs() < 1).all() and ((s - 1).abs() < 1).all()


def test_path_endpoints():
    """t = 0 is data, t = 1 is noise (REPA convention); VP keeps a small alpha at t = 1."""
    for name in ("linear", "cosine"):
        a, s, *_ = PATHS[name]().coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(a, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-15, rtol=0)
        torch.testing.assert_close(s, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15, rtol=0)
    a, s, *_ = PATHS["vp"]().coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert a[0] == 1 and s[0] == 0 and 0 < a[1] < 0.01 and s[1] > 0.9999


KINDS = ("velocity", "noise", "score", "data")


def _definitions(path, n=6):
    """Random (x, eps, t) and each prediction by definition: x_t = a x + s eps, v = a' x + s' eps, score = -eps/s."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    a, s, da, ds = path.coefficients(t, x)
    preds = {"velocity": da * x + ds * eps, "noise": eps, "score": -eps / s, "data": x}
    return a * x + s * eps, t, preds


@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_conversion_agrees_with_the_definitions(name):
    path = PATHS[name]()
    x_t, t, preds = _definitions(path)
    for src in KINDS:
        for dst in KINDS:
            got = path.convert(preds[src], x_t, t, src, dst)
            torch.testing.assert_close(got, preds[dst], rtol=1e-10, atol=1e-10, msg=f"{src} -> {dst}")


@pytest.mark.parametrize("name", sorted(PATHS))
def test_conversion_round_trips_are_exact_on_arbitrary_tensors(name):
    path = PATHS[name]()
    g = torch.Generator().manual_seed(1)
    pred, x_t = torch.randn(2, 5, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.02, 0.98, 5, dtype=torch.float64)
    for src in KINDS:
        for dst in KINDS:
            back = path.convert(path.convert(pred, x_t, t, src, dst), x_t, t, dst, src)
            torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10, msg=f"{src} -> {dst} -> {src}")


def test_velocity_to_score_is_finite_where_alpha_derivative_vanishes():
    """REPA divides by d_alpha (0 at t = 0 on the cosine path); the det form does not."""
    path = PATHS["cosine"]()
    t = torch.tensor([1e-8, 1.0], dtype=torch.float64)
    v, x_t = torch.randn(2, 2, 3, dtype=torch.float64)
    assert torch.isfinite(path.convert(v, x_t, t, "velocity", "score")).all()


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose from"):
        FlowObjective(path="edm")
    with pytest.raises(ValueError, match="choose from"):
        FlowObjective(prediction="x0")
    with pytest.raises(ValueError, match="noise/score"):
        FlowObjective(weighting="likelihood")


def test_time_ranges_follow_sit():
    assert FlowObjective().train_range == (0.0, 1.0) and FlowObjective().sample_range == (0.0, 1.0)
    assert FlowObjective(prediction="noise").train_range == (1e-3, 1 - 1e-3)
    assert FlowObjective(path="cosine", prediction="score").sample_range == (1e-3, 1 - 1e-3)
    assert FlowObjective(path="vp").train_range == (1e-5, 1.0)
    assert FlowObjective(path="vp").sample_range == (1e-3, 1.0)
    assert FlowObjective(train_eps=0.01, sample_eps=0.02).train_range == (0.01, 0.99)
    t = FlowObjective(prediction="noise").sample_time(10000)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3 and t.dtype == torch.float32


# Closed forms of SiT's drift variance Lambda (path.py compute_drift), mapped to our time t = 1 - s.
LAMBDA = {
    "linear": lambda t: t / (1 - t),
    "cosine": lambda t: (math.pi / 2) * torch.tan(math.pi * t / 2),
    "vp": lambda t: 0.5 * (0.1 + t * (20 - 0.1)),
}
WEIGHT = {"none": lambda lam, s: torch.ones_like(s), "velocity": lambda lam, s: (lam / s) ** 2,
          "likelihood": lambda lam, s: lam / s**2}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_drift_variance_matches_sit(name):
    torch.testing.assert_close(PATHS[name]().drift_variance(T_INNER), LAMBDA[name](T_INNER), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("prediction,weighting", [("velocity", "none"), ("noise", "none"), ("noise", "velocity"),
                                                  ("noise", "likelihood"), ("score", "none"),
                                                  ("score", "likelihood"), ("score", "velocity")])
def test_loss_equals_closed_formula_on_pinned_inputs(name, prediction, weighting):
    obj = FlowObjective(path=name, prediction=prediction, weighting=weighting, label_dropout=0.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    model = Affine(2, extra=2)  # the extra channels would dominate the loss if they were used
    out = obj.loss(model, x0, torch.arange(5), t=t, noise=noise, taps=(1, 2))
    a, s, da, ds = (c.view(-1, 1, 1, 1) for c in closed_form(name, t))
    x_t = a * x0 + s * noise
    pred = model.k[:, :2] * x_t + (t.view(-1, 1, 1, 1) + 1)
    err = {"velocity": pred - (da * x0 + ds * noise), "noise": pred - noise, "score": pred * s + noise}[prediction]
    w = WEIGHT[weighting](LAMBDA[name](t).view(-1, 1, 1, 1), s)
    expected = (w * err**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.x_t, x_t, rtol=1e-12, atol=1e-12)
    assert out.t is t and out.noise is noise and sorted(out.feats) == [1, 2]
    assert model.calls[0]["taps"] == (1, 2) and model.calls[0]["t"] is t


def test_loss_draws_time_and_noise_when_not_pinned():
    obj = FlowObjective(label_dropout=0.0)
    x0 = torch.randn(64, 2, 3, 3)
    out = obj.loss(Affine(2), x0, torch.zeros(64, dtype=torch.long))
    assert out.loss.shape == (64,) and out.t.shape == (64,) and out.noise.shape == x0.shape
    assert out.t.std() > 0.1 and abs(out.noise.std() - 1) < 0.2


def test_label_dropout_rate_and_reported_labels():
    null = 10
    obj = FlowObjective(label_dropout=0.3, null_class=null)
    n = 20000
    model = Affine(1)
    y = torch.randint(0, null, (n,))
    torch.manual_seed(0)
    out = obj.loss(model, torch.zeros(n, 1, 1, 1), y)
    dropped = out.cond.labels == null
    assert abs(dropped.float().mean().item() - 0.3) < 0.015  # 4.6 standard errors
    assert torch.equal(out.cond.labels[~dropped], y[~dropped])
    assert torch.equal(model.calls[0]["y"].labels, out.cond.labels)  # the model saw exactly the reported labels
    kept = FlowObjective(label_dropout=0.0, null_class=null).loss(model, torch.zeros(n, 1, 1, 1), y)
    assert torch.equal(kept.cond.labels, y)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_lognormal_times_have_the_stated_quantiles(name):
    """sigma/alpha = exp(N(0,1)): median ratio 1 -> t = 0.5 on both paths; quartile ratios exp(+-0.6745)."""
    obj = FlowObjective(path=name, time_sampler="lognormal")
    t = obj.sample_time(40000, generator=torch.Generator().manual_seed(0)).double()
    r = torch.exp(torch.tensor([-0.6745, 0.0, 0.6745], dtype=torch.float64))
    expected = r / (1 + r) if name == "linear" else (2 / math.pi) * torch.atan(r)
    got = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(got, expected, atol=0.01, rtol=0)
    uniform = FlowObjective(path=name).sample_time(40000, generator=torch.Generator().manual_seed(0))
    assert abs(uniform.double().quantile(0.25).item() - 0.25) < 0.01  # and the two samplers differ


def test_lognormal_refuses_other_paths():
    with pytest.raises(ValueError, match="lognormal.*linear"):
        FlowObjective(path="vp", time_sampler="lognormal")


def test_tiny_sit_overfits_one_batch(one_thread):
    """A depth-2 SiT on one batch with pinned (t, noise) falls below 5% of its starting loss in 100 AdamW steps."""
    from gen.models import build_model

    torch.manual_seed(0)
    model = build_model("SiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=10)
    obj = FlowObjective(label_dropout=0.0, null_class=10)
    x0 = torch.randn(8, 4, 8, 8)
    y = torch.arange(8)
    t, noise = torch.rand(8), torch.randn(8, 4, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = obj.loss(model, x0, y, t=t, noise=noise).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # The model is zero-initialised, so the first loss is |eps - x0|^2 on the batch (about 2).
    assert abs(losses[0] - ((noise - x0) ** 2).mean().item()) < 1e-5
    assert min(losses[-5:]) < 0.05 * losses[0], losses[::10]
