"""Samplers, grids and guidance: exact recovery on a point mass, orders, SDE statistics and reproducibility, CFG."""
import itertools
import math
from typing import NamedTuple

import pytest
import torch
from torch import nn

from gen.cond import Cond, Conditioning
from gen.objectives.flow import PATHS, FlowObjective
from gen.sampling import (
    network_fn,
    ode_grid,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sde_grid,
    with_cfg,
)

F64 = torch.float64


def point_mass(x0):
    """Exact linear-path velocity from the point mass x0: x_t = (1-t) x0 + t eps -> v = eps - x0 = (x_t - x0)/t."""
    return lambda x, t, y=None, **_: (x - x0.to(x.dtype)) / t.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


class Recorder:
    """A model_fn wrapper that records every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, y=None, **guide):
        self.calls.append({"x": x, "t": t, "y": y, **guide})
        return self.fn(x, t, y)


def test_grids():
    torch.testing.assert_close(ode_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    assert ode_grid(3, t_max=0.999, t_min=0.001)[[0, -1]].tolist() == [0.999, 0.001]
    g = sde_grid(5)
    assert g.dtype == F64 and len(g) == 6
    torch.testing.assert_close(g, torch.tensor([1.0, 0.76, 0.52, 0.28, 0.04, 0.0], dtype=F64))
    with pytest.raises(ValueError):
        ode_grid(0)


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ode_samplers_recover_a_point_mass(sampler, dtype):
    """The straight line is an integral curve of v = (x - x0)/t, so both solvers are exact up to rounding."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=F64)
    for steps in (1, 7, 50):
        out = sampler(point_mass(x0), noise.to(dtype), ode_grid(steps))
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler,nfe", [(sample_euler, lambda n: n), (sample_heun, lambda n: 2 * n - 1)])
def test_ode_call_counts_dtypes_and_callback(sampler, nfe):
    x0 = torch.zeros(3, 2, 2, 2)
    fn = Recorder(point_mass(x0))
    seen = []
    ts = ode_grid(6)
    sampler(fn, torch.randn(3, 2, 2, 2), ts, extra_args={"y": torch.arange(3)}, callback=seen.append)
    assert len(fn.calls) == nfe(6)
    assert all(c["x"].dtype == torch.float32 and c["t"].dtype == F64 and c["t"].shape == (3,) for c in fn.calls)
    assert all(torch.equal(c["y"], torch.arange(3)) for c in fn.calls)
    assert min(float(c["t"][0]) for c in fn.calls) > 0  # never evaluated at t = 0
    assert [s["i"] for s in seen] == list(range(6)) and [s["t"] for s in seen] == ts[1:].tolist()
    assert all(s["x"].dtype == F64 for s in seen)


def test_heun_is_second_order_and_euler_first_order():
    """On dx/dt = x (x(0) = x(1) / e) halving the step divides the error by ~4 (Heun) and ~2 (Euler)."""
    x1 = torch.ones(1, 1, dtype=F64)

    def err(sampler, n):
        return (sampler(lambda x, t, **_: x, x1, ode_grid(n)) - math.exp(-1)).abs().item()

    assert 3.5 < err(sample_heun, 20) / err(sample_heun, 40) < 4.5
    assert 1.8 < err(sample_euler, 20) / err(sample_euler, 40) < 2.2


def predicted_residual_std(ts):
    """Std of x - x0 after REPA's EM on the exact point-mass field, per coordinate.

    With e = x - (1 - t) x0 the exact score is -e / t^2 and the drift v - t s = 2 e / t - x0, so one step of size
    h = |dt| maps e -> e (1 - 2h/t) + sqrt(2 t h) xi. The final mean step from t = 0.04 to 0 has 1 - 2h/t = -1: it
    reflects e instead of removing it, so the sample keeps a residual of std ~ 0.04 (the last grid time; the exact
    SDE has std t there) plus the O(h) variance excess of Euler-Maruyama: 0.042 at 250 steps, 0.054 at 50.
    """
    var, grid = 1.0, ts.tolist()
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        h = t - t_next
        var = var * (1 - 2 * h / t) ** 2 + (2 * t * h if i < len(grid) - 2 else 0.0)
    return math.sqrt(var)


@pytest.mark.parametrize("steps", [50, 250])
def test_euler_maruyama_lands_near_the_point_mass(steps, one_thread):
    """Not exact like the ODEs: the sample is x0 plus residual noise of the std the EM recursion predicts."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 64, 4, 8, 8, generator=g, dtype=F64)
    ts = sde_grid(steps)
    fn = Recorder(point_mass(x0))
    out = sample_euler_maruyama(fn, noise, ts, path=PATHS["linear"](), generator=torch.Generator().manual_seed(1))
    assert len(fn.calls) == steps and min(float(c["t"][0]) for c in fn.calls) == pytest.approx(0.04)
    residual = out - x0
    expected = predicted_residual_std(ts)
    assert 0.04 < expected < 0.06
    # 16384 i.i.d. coordinates: 1 s.e. of the std estimate is 0.55%; 3% tolerance; the mean within 5 s.e.
    assert residual.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(residual.mean().item()) < 5 * expected / 128
    assert residual.abs().max().item() < 6 * expected


def test_euler_maruyama_is_reproducible_from_its_generator():
    x0 = torch.zeros(4, 2, 3, 3)
    noise = torch.randn(4, 2, 3, 3)
    path = PATHS["linear"]()

    def run(seed):
        return sample_euler_maruyama(point_mass(x0), noise, sde_grid(20), path=path,
                                     generator=torch.Generator().manual_seed(seed))

    torch.manual_seed(123)
    a = run(7)
    torch.manual_seed(456)  # the global RNG plays no part
    assert torch.equal(a, run(7))
    assert not torch.allclose(a, run(8))
    assert a.dtype == torch.float32


def test_euler_maruyama_per_sample_generators_make_samples_batch_independent():
    """With one generator per sample (gen.sampling.noise), sample i is the same alone or inside a batch."""
    x0 = torch.randn(3, 2, 3, 3, dtype=F64)
    noise = torch.randn(3, 2, 3, 3, dtype=F64)
    path = PATHS["linear"]()

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = sample_euler_maruyama(point_mass(x0), noise, sde_grid(10), path=path, generator=gens([5, 6, 7]))
    alone = sample_euler_maruyama(point_mass(x0[1:2]), noise[1:2], sde_grid(10), path=path, generator=gens([6]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    assert not torch.allclose(batch[0], batch[2])


def labelled(x, t, cond):
    """A fake model_fn whose output depends on x, t and the label (4 channels); model_fns receive a Cond."""
    return x * (cond.labels.view(-1, 1, 1, 1).to(x.dtype) + 1) + t.view(-1, 1, 1, 1).to(x.dtype)


NULL = 9


def test_cfg_scale_one_is_the_conditional_model():
    fn = Recorder(labelled)
    x, t, y = torch.randn(3, 4, 2, 2), torch.full((3,), 0.5), Cond(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(with_cfg(fn, 1.0, Conditioning(NULL))(x, t, y), labelled(x, t, y))
    torch.testing.assert_close(with_cfg(fn, 1.0, Conditioning(NULL))(x, t, y, t_guide=0.5), labelled(x, t, y))
    assert len(fn.calls) == 2 and all(c["x"].shape[0] == 3 and (c["y"].labels != NULL).all() for c in fn.calls)


@pytest.mark.parametrize("channels", [None, 3])
def test_cfg_mixes_the_guided_channels_inside_the_interval(channels):
    fn = Recorder(labelled)
    guided = with_cfg(fn, 2.5, Conditioning(NULL), interval=(0.2, 0.7), channels=channels)
    x, y = torch.randn(4, 4, 2, 2), Cond(torch.tensor([0, 1, 2, 3]))
    t = torch.tensor([0.1, 0.2, 0.5, 0.9])  # outside, boundary (inside), inside, outside
    out = guided(x, t, y)
    assert len(fn.calls) == 1 and fn.calls[0]["x"].shape[0] == 4 + 2  # the two in-interval samples, once
    assert fn.calls[0]["y"].labels[4:].tolist() == [NULL, NULL]
    c, u = labelled(x, t, y), labelled(x, t, Cond(torch.full_like(y.labels, NULL)))
    k = 4 if channels is None else channels
    expected = c.clone()
    inside = torch.tensor([False, True, True, False])
    expected[inside, :k] = u[inside, :k] + 2.5 * (c[inside, :k] - u[inside, :k])
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[inside], c[inside])


def test_cfg_batch_doubles_exactly_once_inside_and_never_outside():
    fn = Recorder(labelled)
    guided = with_cfg(fn, 1.8, Conditioning(NULL), interval=(0.0, 0.7))
    x, y = torch.randn(5, 4, 2, 2), Cond(torch.arange(5))
    out = guided(x, torch.full((5,), 0.9), y)
    assert fn.calls[-1]["x"].shape[0] == 5 and (fn.calls[-1]["y"].labels != NULL).all()
    torch.testing.assert_close(out, labelled(x, torch.full((5,), 0.9), y))
    guided(x, torch.full((5,), 0.3), y)
    assert fn.calls[-1]["x"].shape[0] == 10 and fn.calls[-1]["y"].labels[5:].eq(NULL).all()
    assert len(fn.calls) == 2


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama", "ddpm"])
def test_guided_sampling_reads_no_device_value(sampler):
    """On the meta device every data-dependent host read (bool(), .item(), .tolist()) raises, so a guided sampling
    loop that finishes there makes no host-device sync per step (with_cfg judges the interval at host times)."""
    from gen.objectives.ddpm import DDPMObjective

    obj = (DDPMObjective(num_timesteps=20, learn_sigma=False, null_class=NULL) if sampler == "ddpm"
           else FlowObjective(null_class=NULL))
    noise = torch.empty(3, 2, 2, 2, device="meta")
    cond = Cond(torch.empty(3, dtype=torch.long, device="meta"))
    with pytest.raises(RuntimeError, match="meta"):
        bool(noise.sum() > 0)  # the guard: meta tensors refuse host reads
    kwargs = {"num_steps": 5} if sampler == "ddpm" else {"sampler": sampler, "num_steps": 5}
    out = obj.sample(lambda x, t, c: x * 0.5, noise, cond, cfg_scale=2.0, cfg_interval=(0.3, 0.7), **kwargs)
    assert out.device.type == "meta" and out.shape == noise.shape


def test_bernoulli_guided_sampling_reads_no_device_value():
    """As above for the Bernoulli sampler (binary latents): its guidance interval is judged at host times."""
    from gen.objectives.bernoulli import BernoulliObjective

    obj = BernoulliObjective(num_timesteps=8, null_class=NULL)
    bits = torch.empty(2, 3, 2, 2, device="meta")
    out = obj.sample(lambda x, t, c: x * 0.5, bits, Cond(torch.empty(2, dtype=torch.long, device="meta")),
                     num_steps=4, cfg_scale=2.0, cfg_interval=(0.3, 0.7))
    assert out.device.type == "meta"


class Out(NamedTuple):
    """Stand-in for gen.models.BackboneOutput."""

    out: torch.Tensor
    feats: dict


class Probe(nn.Module):
    """Records the dtypes it is called with."""

    def forward(self, x, t, y, taps=(), stop_at=None):
        self.seen = (x.dtype, t.dtype, y)
        return Out(x.float() * 2, {})


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_network_fn_casts_x_and_time(dtype):
    probe = Probe()
    fn = network_fn(probe, dtype)
    x, y = torch.randn(2, 4, 2, 2, dtype=F64), Cond(torch.tensor([1, 2]))
    out = fn(x, torch.tensor([999.0, 0.5], dtype=F64), y)
    assert probe.seen[0] == (F64 if dtype is None else dtype) and probe.seen[1] == torch.float32
    assert probe.seen[2] is y and out.shape == x.shape


def exact_prediction(obj, x0):
    """The exact point-mass prediction of the objective's kind, from its velocity (x - x0)/t on the linear path."""
    velocity = point_mass(x0)

    def fn(x, t, y):
        return obj.path.convert(velocity(x.double(), t.double()), x.double(), t.double(), "velocity", obj.prediction)

    return fn


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_objective_sampling_converts_predictions_and_uses_its_time_range(prediction, sampler):
    """Lines through x0 are integral curves: from noise at t_max the ODE lands on x0 + t_min/t_max (noise - x0)."""
    obj = FlowObjective(prediction=prediction, null_class=NULL)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=F64)
    out = obj.sample(exact_prediction(obj, x0), noise, torch.zeros(3, dtype=torch.long), sampler=sampler, num_steps=20)
    lo, hi = obj.sample_range
    assert (lo, hi) == ((0.0, 1.0) if prediction == "velocity" else (1e-3, 1 - 1e-3))
    torch.testing.assert_close(out, x0 + (lo / hi) * (noise - x0), atol=1e-8, rtol=0)


def test_objective_guides_with_the_interval():
    """Class c pulls to x0[c], the null class to x0_u; guided targets are affine, so the ODE lands on the guided one
    when guidance covers the end of the trajectory, and on the conditional one when it does not."""
    obj = FlowObjective(null_class=NULL)
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(NULL + 1, 2, 4, 4, generator=g, dtype=F64)
    y = torch.tensor([0, 3, 5])
    fn = Recorder(lambda x, t, cond: point_mass(targets[cond.labels])(x, t))
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    guided_target = targets[NULL] + 1.8 * (targets[y] - targets[NULL])
    out = obj.sample(fn, noise, y, sampler="euler", num_steps=10, cfg_scale=1.8, cfg_interval=(0.0, 0.5))
    torch.testing.assert_close(out, guided_target, atol=1e-10, rtol=0)
    doubled = [float(c["t"][0]) for c in fn.calls if c["x"].shape[0] == 6]
    assert len(fn.calls) == 10 and doubled == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    out = obj.sample(fn, noise, y, sampler="euler", num_steps=10, cfg_scale=1.8, cfg_interval=(0.5, 1.0))
    torch.testing.assert_close(out, targets[y], atol=1e-10, rtol=0)


@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_objective_sde_sampling_defaults_range_and_reproducibility(prediction):
    """Default SDE run: 250 calls starting at the top of the sampling range (1 - 1e-3 for noise: alpha = 0 at t = 1)."""
    obj = FlowObjective(prediction=prediction, null_class=NULL)
    x0 = torch.zeros(2, 2, 4, 4)
    fn = Recorder(exact_prediction(obj, x0))
    noise = torch.randn(2, 2, 4, 4)
    a = obj.sample(fn, noise, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert len(fn.calls) == 250 and a.dtype == noise.dtype  # REPA's FID setting: SDE, 250 steps
    assert float(fn.calls[0]["t"][0]) == obj.sample_range[1]
    b = obj.sample(fn, noise, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.abs().max() < 0.3


def test_objective_sample_options_from_the_sampler_config():
    from gen.config import SamplerConfig

    opts = FlowObjective(null_class=NULL).sample_options(SamplerConfig(sampler="heun", num_steps=7, cfg_scale=1.8,
                                                                       cfg_interval=[0.0, 0.7]))
    assert opts == {"sampler": "heun", "num_steps": 7, "cfg_scale": 1.8, "cfg_interval": (0.0, 0.7),
                    "guidance": "step_start"}  # REPA samplers.py's rule by default
    with pytest.raises(ValueError, match="eta"):
        FlowObjective().sample_options(SamplerConfig(eta=0.5))


def test_objective_refuses_bad_sampling_options():
    with pytest.raises(ValueError, match="choose from"):
        FlowObjective(null_class=NULL).sample(point_mass(torch.zeros(1)), torch.zeros(1, 1), torch.zeros(1),
                                              sampler="rk4")
    with pytest.raises(ValueError, match="null_class"):
        FlowObjective().sample(point_mass(torch.zeros(1)), torch.zeros(1, 1), torch.zeros(1), cfg_scale=2.0)
