"""Heun with a guidance interval: which rule decides whether a step's corrector is guided (REPA samplers.py)."""
import pytest
import torch

from gen.cond import Cond, Conditioning
from gen.objectives.flow import FlowObjective
from gen.sampling import sample_heun, with_cfg

F64 = torch.float64
NULL = 9


def shifted(x, t, cond):
    """A linear flow whose conditional and unconditional outputs differ: v = x + label (the null label 9 -> 0)."""
    shift = torch.where(cond.labels == NULL, 0, cond.labels).to(x.dtype)
    return x + shift.view(-1, *[1] * (x.dim() - 1))


class Calls:
    """Records the batch size of every network call."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, x, t, cond):
        self.sizes.append((round(float(t[0]), 6), x.shape[0]))
        return self.fn(x, t, cond)


# Grid 0.75 -> 0.5 -> 0.25 with guidance on t in [0, 0.6], scale 2, x = 1, label 1 (conditional v = x + 1,
# unconditional v = x, guided v = x + 2). Step 1 straddles the edge 0.6; step 2 is the last (Euler, guided).
#   step_start (REPA): predictor v = 1 + 1 = 2, x_pred = 1 - 0.25 * 2 = 0.5; corrector judged at 0.75, unguided:
#     v' = 0.5 + 1 = 1.5; x1 = 1 - 0.125 * (2 + 1.5) = 0.5625; x2 = 0.5625 - 0.25 * (0.5625 + 2) = -0.078125.
#   each_eval: corrector judged at 0.5, guided: v' = 0.5 + 2 = 2.5; x1 = 1 - 0.125 * 4.5 = 0.4375;
#     x2 = 0.4375 - 0.25 * (0.4375 + 2) = -0.171875.
EXPECTED = {"step_start": -0.078125, "each_eval": -0.171875}
DOUBLED = {"step_start": [(0.75, 1), (0.5, 1), (0.5, 2)], "each_eval": [(0.75, 1), (0.5, 2), (0.5, 2)]}


@pytest.mark.parametrize("rule", ["step_start", "each_eval"])
def test_heun_guidance_rule_on_a_step_straddling_the_interval_edge(rule):
    net = Calls(shifted)
    guided = with_cfg(net, 2.0, Conditioning(NULL), interval=(0.0, 0.6))
    ts = torch.tensor([0.75, 0.5, 0.25], dtype=F64)
    x = torch.ones(1, 1, dtype=F64)
    out = sample_heun(guided, x, ts, extra_args={"cond": Cond(torch.tensor([1]))}, guidance=rule)
    assert out.item() == EXPECTED[rule]
    assert net.sizes == DOUBLED[rule]  # (t, batch): 2 = the guided (conditional + unconditional) pass


def test_heun_guides_by_the_step_start_by_default_through_the_objective():
    """FlowObjective's Heun on the grid 1, 0.75, 0.5, 0.25, 0: the steps before 0.75 and after 0.5 are the same for
    both rules, so the default differs from each_eval exactly as above, scaled by the first (unguided) step."""
    obj = FlowObjective(null_class=NULL)
    x, y = torch.ones(1, 1, dtype=F64), torch.tensor([1])
    runs = {rule: obj.sample(shifted, x, y, sampler="heun", num_steps=4, cfg_scale=2.0, cfg_interval=(0.0, 0.6),
                             guidance=rule) for rule in ("step_start", "each_eval")}
    default = obj.sample(shifted, x, y, sampler="heun", num_steps=4, cfg_scale=2.0, cfg_interval=(0.0, 0.6))
    assert torch.equal(default, runs["step_start"]) and not torch.equal(default, runs["each_eval"])
    # Hand computation: step 1 (1 -> 0.75, unguided): v = 2, x_pred = 0.5, v' = 1.5 -> x = 1 - 0.125 * 3.5 = 0.5625.
    # Step 2 as above from x = 0.5625: x_pred = 0.5625 - 0.25 * 1.5625 = 0.171875; step_start: v' = 1.171875,
    # x = 0.5625 - 0.125 * 2.734375 = 0.2207031...; each_eval: v' = 2.171875, x = 0.5625 - 0.125 * 3.734375.
    # Step 3 (0.5 -> 0.25, guided, Heun): x' = x - 0.125 (2 (x + 2) - 0.25 (x + 2)) = x - 0.21875 (x + 2);
    # step 4 (last, Euler, guided): x'' = x' - 0.25 (x' + 2).
    def tail(x):
        x = x - 0.21875 * (x + 2)
        return x - 0.25 * (x + 2)
    assert runs["step_start"].item() == pytest.approx(tail(0.5625 - 0.125 * 2.734375), abs=1e-15)
    assert runs["each_eval"].item() == pytest.approx(tail(0.5625 - 0.125 * 3.734375), abs=1e-15)


def test_heun_refuses_an_unknown_guidance_rule():
    with pytest.raises(ValueError, match="step_start"):
        sample_heun(lambda x, t, **_: x, torch.ones(1, 1), torch.tensor([1.0, 0.0], dtype=F64), guidance="t_next")


def test_the_rule_is_a_sampler_config_field():
    from gen.config import ConfigError, SamplerConfig, load_config

    assert load_config(None, []).sampler.heun_guidance == "step_start"
    opts = FlowObjective(null_class=NULL).sample_options(SamplerConfig(sampler="heun", heun_guidance="each_eval"))
    assert opts["guidance"] == "each_eval"
    with pytest.raises(ConfigError, match="sampler.heun_guidance"):
        load_config(None, ["sampler.heun_guidance=t_next"])
