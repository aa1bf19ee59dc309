"""Bernoulli diffusion (gen.objectives.bernoulli) against closed forms, brute-force Bayes and hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen.cond import Cond
from gen.config import ConfigError, load_config
from gen.models import build_model
from gen.models.base import BackboneOutput
from gen.objectives.bernoulli import (BernoulliChain, BernoulliObjective, balanced_weights, cosine_keep, linear_keep,
                                      step_list)
from gen.sampling.noise import sample_generators

pytestmark = pytest.mark.usefixtures("one_thread")
T = 16


def one_step(a: float) -> torch.Tensor:
    """2x2 kernel K[v, w] = q(x_t = w | x_{t-1} = v) of one keep-or-fair-coin step with keep probability a."""
    return torch.tensor([[(1 + a) / 2, (1 - a) / 2], [(1 - a) / 2, (1 + a) / 2]], dtype=torch.float64)


def composed(chain: BernoulliChain, s: int, t: int) -> torch.Tensor:
    """q(x_t | x_s) as a 2x2 matrix, the product of the one-step kernels s+1..t."""
    k = torch.eye(2, dtype=torch.float64)
    for i in range(s + 1, t + 1):
        k = k @ one_step(float(chain.step_keep[i]))
    return k


@pytest.mark.parametrize("schedule", [linear_keep, cosine_keep])
def test_schedule_closed_forms(schedule):
    chain = BernoulliChain(schedule(T))
    if schedule is linear_keep:
        # The reference's step keep a_t = 1 - 1 / (T - t + 1), multiplied up, is k_t = 1 - t / T; k_T = 0.
        a = [1 - 1 / (T - t + 1) for t in range(1, T + 1)]
        assert torch.allclose(chain.keep[1:], torch.tensor(np.cumprod(a)), atol=1e-12)
        assert torch.allclose(chain.keep, 1 - torch.arange(T + 1, dtype=torch.float64) / T, atol=1e-12)
    else:
        assert torch.allclose(chain.keep, 0.5 + 0.5 * torch.cos(math.pi * torch.arange(T + 1.0) / T).double())
    assert float(chain.keep[0]) == 1.0 and abs(float(chain.keep[-1])) < 1e-12
    for t in range(T + 1):
        k = float(chain.keep[t])
        closed = torch.tensor([[(1 + k) / 2, (1 - k) / 2], [(1 - k) / 2, (1 + k) / 2]], dtype=torch.float64)
        assert torch.allclose(composed(chain, 0, t), closed, atol=1e-6)
        x0 = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1)
        assert torch.allclose(chain.marginal(x0, t).reshape(2), closed[:, 1], atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_marginals_and_pair_sampling(schedule):
    obj = BernoulliObjective(num_timesteps=T, schedule=schedule, null_class=None, label_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for bit in (0.0, 1.0):
        x0 = torch.full((4, n), bit)
        t = torch.tensor([1, T // 4, T // 2, T])
        x_t = obj.chain.q_sample(x0, t, torch.rand(x0.shape, generator=g))
        expect = obj.chain.marginal(x0[:, :1], t).reshape(-1)
        sigma = (expect * (1 - expect) / n).sqrt()
        assert ((x_t.mean(dim=1) - expect).abs() <= 4 * sigma + 1e-9).all()
        assert float(expect[-1]) == 0.5
        # SRA's pair: (x_s, x_t) from one chain. u = 0.99 with t_max = 0.25 gives D = floor(0.99 * 5) = 4.
        x0_pair = torch.full((2, 1, 1, n), bit)
        t_pair = torch.tensor([12, 12])
        noise = torch.rand((2, 2, 1, 1, n), generator=g)
        x_s, s = obj.teacher_view(x0_pair, t_pair, noise, torch.tensor([0.99, 0.99]), 0.25)
        assert s.tolist() == [8, 8]
        x_t = obj.chain.q_sample(x0_pair, t_pair, noise[:, 0])
        for x, step in ((x_s, 8), (x_t, 12)):
            p = float(obj.chain.marginal(torch.tensor(bit), step))
            assert abs(float(x.mean()) - p) <= 4 * math.sqrt(p * (1 - p) / (2 * n)) + 1e-9
        # Markov coupling: P(x_t = x_s) = k_{t|s} + (1 - k_{t|s}) / 2.
        kernel = float(obj.chain.keep[12] / obj.chain.keep[8])
        agree = (kernel + 1) / 2
        assert abs(float((x_s == x_t).float().mean()) - agree) <= 4 * math.sqrt(agree * (1 - agree) / (2 * n))


def brute_force_posterior(chain: BernoulliChain, p: float, x_t: int, s: int, t: int) -> float:
    """P(x_s = 1 | x_t) in the joint Bern(p)(x0) q(x_s | x0) q(x_t | x_s), enumerated over the two values."""
    to_s, to_t = composed(chain, 0, s), composed(chain, s, t)
    joint = [sum(prob * to_s[x0, v] * to_t[v, x_t] for x0, prob in ((0, 1 - p), (1, p))) for v in (0, 1)]
    return float(joint[1] / (joint[0] + joint[1]))


@pytest.mark.parametrize("schedule", [linear_keep, cosine_keep])
def test_posterior_equals_brute_force_bayes(schedule):
    chain = BernoulliChain(schedule(T))
    for p in (0.0, 0.3, 1.0):
        for x_t in (0, 1):
            for s, t in ((T - 1, T), (4, 5), (1, 2), (2, 9), (1, T), (0, 3)):
                got = float(chain.posterior(torch.tensor([p], dtype=torch.float64),
                                            torch.tensor([float(x_t)], dtype=torch.float64), s, t))
                assert 0.0 <= got <= 1.0
                assert got == pytest.approx(brute_force_posterior(chain, p, x_t, s, t), abs=1e-9), (p, x_t, s, t)
    half = chain.posterior(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), 5, T)
    assert torch.equal(half, torch.tensor([0.5, 0.5]))


def test_step_list_matches_reference_linspace_and_is_strict():
    for steps, count in ((64, 16), (64, 32), (16, 4), (16, 2), (10, 7)):
        # The reference: int(linspace(0, 1, S) * (T - 1)) indexes 1..T (all T steps when S = T).
        reference = (np.arange(1, steps + 1)[np.array(np.linspace(0.0, 1.0, count) * (steps - 1), int)])[::-1]
        assert step_list(steps, count) == reference.tolist()
    for steps, count in ((64, 64), (64, 16), (64, 22), (15, 8), (16, 4)):
        got = step_list(steps, count)
        assert got[0] == steps and got[-1] == 1 and all(a > b for a, b in zip(got, got[1:]))
        assert got == [1 + (i * (steps - 1)) // (count - 1) for i in range(count)][::-1]
    assert step_list(8, 8) == list(range(8, 0, -1))
    # Exact integers where the reference's float linspace lands just below one: 7/7 * 14 * ... gives 12.999...
    assert step_list(15, 8)[1] == 13
    for bad in (1, 17):
        with pytest.raises(ValueError, match="sampler.num_steps"):
            step_list(16, bad)


def oracle(x0: torch.Tensor):
    """An exact model: flip logits +-30 where x_t differs from / equals x0 (sigma(30) is 1 in float32)."""
    return lambda x, t_frac, cond: torch.where(x != x0, 30.0, -30.0)


def test_oracle_reverse_step_marginal_and_chain_returns_x0_exactly():
    obj = BernoulliObjective(num_timesteps=T, null_class=None, label_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for bit in (0.0, 1.0):
        x0 = torch.full((1, n), bit)
        x_t = obj.chain.q_sample(x0, 10, torch.rand(x0.shape, generator=g))
        x_s = (torch.rand(x0.shape, generator=g) < obj.chain.posterior(x0, x_t, 6, 10)).float()
        p = float(obj.chain.marginal(torch.tensor(bit), 6))
        assert abs(float(x_s.mean()) - p) <= 4 * math.sqrt(p * (1 - p) / n)
    x0 = (torch.rand((3, 8, 4, 4), generator=g) < 0.5).float()
    for steps in (T, 4):
        x_T = obj.prior((8, 4, 4), torch.Generator().manual_seed(steps), n=3)
        out = obj.sample(oracle(x0), x_T, Cond(torch.zeros(3, dtype=torch.long)), num_steps=steps,
                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, x0)


def test_sampler_visits_the_step_subset_and_is_batch_independent():
    obj = BernoulliObjective(num_timesteps=T, null_class=None, label_dropout=0.0)
    seen = []

    def model_fn(x, t_frac, cond):
        seen.append(float(t_frac[0]))
        return torch.sin(7 * x + 3 * t_frac[:, None, None, None])  # a fixed, non-trivial logit map

    visited = []
    gens = sample_generators(0, range(3))
    x_T = obj.prior((4, 2, 2), gens)
    both = obj.sample(model_fn, x_T, Cond(torch.zeros(3, dtype=torch.long)), num_steps=5, generator=gens,
                      callback=lambda d: visited.append(d["t"]))
    assert visited == step_list(T, 5) == [16, 12, 8, 4, 1]
    assert seen == [t / T for t in visited]
    one = sample_generators(0, [2])
    alone = obj.sample(model_fn, obj.prior((4, 2, 2), one), Cond(torch.zeros(1).long()), num_steps=5, generator=one)
    assert torch.equal(alone[0], both[2])  # sample i depends only on its own generator


def test_flip_identity_and_balanced_weight_sum():
    g = torch.Generator().manual_seed(2)
    f = 3 * torch.randn((5, 8, 4, 4), generator=g)
    x0, x_t = ((torch.rand((2, 5, 8, 4, 4), generator=g) < 0.5).float())
    obj = BernoulliObjective(num_timesteps=T)
    left = F.binary_cross_entropy_with_logits(obj.x0_logits(f, x_t), x0, reduction="none")
    right = F.binary_cross_entropy_with_logits(f, torch.logical_xor(x0, x_t).float(), reduction="none")
    assert torch.allclose(left, right, atol=1e-6)
    y = torch.logical_xor(x0, x_t).float()
    rho = y.mean(dim=(1, 2, 3))
    assert torch.allclose(balanced_weights(y).sum(dim=(1, 2, 3)), 2 * rho * (1 - rho) * 8 * 16, atol=1e-4)


class FixedLogits(nn.Module):
    """A stand-in backbone returning given logits and recording its inputs."""

    learn_sigma, null_class = False, None

    def __init__(self, logits):
        super().__init__()
        self.logits, self.inputs = logits, []

    def forward(self, x, t, cond, *, taps=(), stop_at=None):
        self.inputs.append((x, t))
        return BackboneOutput(self.logits, {})


def bce(f: float, y: float) -> float:
    return math.log1p(math.exp(-f)) if y else math.log1p(math.exp(f))


def test_balanced_bce_matches_a_hand_computation():
    x0 = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 1, 4)
    f = torch.tensor([2.0, -1.0, 0.5, -3.0]).reshape(1, 1, 1, 4)
    # t = 8 of 16 (linear): q(x_t = 1 | x0) is 0.75 for ones and 0.25 for zeros; uniforms pick x_t = 1, 0, 0, 0.
    noise = torch.tensor([0.1, 0.9, 0.8, 0.95]).reshape(1, 1, 1, 4).expand(1, 2, 1, 1, 4).reshape(1, 2, 1, 1, 4)
    t = torch.tensor([8])
    x_t = [1.0, 0.0, 0.0, 0.0]
    y = [float(a != b) for a, b in zip([1.0, 0.0, 1.0, 1.0], x_t)]  # flips: 0, 0, 1, 1
    rho = sum(y) / 4
    w = [(1 - rho) if yi else rho for yi in y]
    hand = sum(wi * bce(fi, yi) for wi, fi, yi in zip(w, f.reshape(-1).tolist(), y)) / 4
    model = FixedLogits(f)
    obj = BernoulliObjective(num_timesteps=T, null_class=None, label_dropout=0.0)
    out = obj.loss(model, x0, torch.zeros(1).long(), t=t, noise=noise)
    assert out.x_t.reshape(-1).tolist() == x_t
    assert float(out.loss) == pytest.approx(hand, rel=1e-6)
    # The backbone saw +-1 bits and t / T.
    assert model.inputs[0][0].reshape(-1).tolist() == [1.0, -1.0, -1.0, -1.0] and float(model.inputs[0][1]) == 0.5
    plain = sum(bce(fi, yi) for fi, yi in zip(f.reshape(-1).tolist(), y)) / 4
    assert float(out.logs["bce"]) == pytest.approx(plain, rel=1e-6)
    x0_logits = [(1 - 2 * a) * b for a, b in zip(x_t, f.reshape(-1).tolist())]
    acc = sum(float((lg > 0) == bool(b)) for lg, b in zip(x0_logits, [1, 0, 1, 1])) / 4
    assert float(out.logs["bit_acc"]) == acc and float(out.logs["flip_rate"]) == rho
    weighted = BernoulliObjective(num_timesteps=T, loss="plain", time_weighting="linear", null_class=None)
    got = weighted.loss(FixedLogits(f), x0, torch.zeros(1).long(), t=t, noise=noise, drop=torch.zeros(1).bool())
    assert float(got.loss) == pytest.approx((1 - 7 / 16) * plain, rel=1e-6)


def test_guidance_convention_and_temperature():
    obj = BernoulliObjective(num_timesteps=T, null_class=10, label_dropout=0.1)
    cond_logit, uncond_logit = torch.full((2, 3, 2, 2), 1.5), torch.full((2, 3, 2, 2), -0.5)
    calls = []

    def model_fn(x, t_frac, cond):
        calls.append(len(x))
        null = (cond.labels == 10).reshape(-1, 1, 1, 1)
        return torch.where(null, uncond_logit[:1].expand(len(x), -1, -1, -1), cond_logit[:1].expand(len(x), -1, -1, -1))

    x = torch.zeros((2, 3, 2, 2))  # x_t = 0: the x0-logit is the flip logit
    labels = Cond(torch.tensor([1, 2]))
    t = torch.full((2,), 0.5)
    plain = obj.guided_logits(model_fn, x, t, labels, cfg_scale=1.0)
    assert torch.equal(plain, cond_logit) and calls == [2]  # w = 1 (BLD's w = 0): the conditional logits, one pass
    w = 3.0
    guided = obj.guided_logits(model_fn, x, t, labels, cfg_scale=w, temperature=0.5)
    bld = w - 1.0  # BLD: (1 + w_BLD) l_c - w_BLD l_u on the tempered logits
    assert torch.allclose(guided, ((1 + bld) * cond_logit - bld * uncond_logit) / 0.5)
    assert torch.allclose(guided, (uncond_logit + w * (cond_logit - uncond_logit)) / 0.5)
    no_null = BernoulliObjective(num_timesteps=T, null_class=None)
    with pytest.raises(ValueError, match="null_class"):
        no_null.guided_logits(model_fn, x, t, labels, cfg_scale=2.0)


def test_label_dropout_is_per_sample():
    obj = BernoulliObjective(num_timesteps=T, null_class=10, label_dropout=0.1)
    drawn = obj.draw(20_000, (2, 2, 2), torch.Generator().manual_seed(0))
    assert drawn["noise"].shape == (20_000, 2, 2, 2, 2) and int(drawn["t"].min()) == 1 and int(drawn["t"].max()) == T
    assert abs(float(drawn["drop"].float().mean()) - 0.1) < 4 * math.sqrt(0.09 / 20_000)
    batch = obj.draw(64, (2, 2, 2), torch.Generator().manual_seed(1))
    assert 0 < int(batch["drop"].sum()) < 64  # one batch holds dropped and kept labels
    labels = torch.arange(64) % 10
    out = obj.loss(FixedLogits(torch.zeros(64, 2, 2, 2)), torch.ones(64, 2, 2, 2), labels, **batch)
    assert torch.equal(out.cond.labels, torch.where(batch["drop"], torch.tensor(10), labels))


def test_patch_one_embedding_is_linear_per_position_and_sigma_heads_are_refused():
    model = build_model("SiT-S/1", input_size=4, in_channels=8, depth=1, hidden_size=16, num_heads=2, num_classes=4)
    x = torch.randn(2, 8, 4, 4)
    conv = model.x_embedder.proj
    linear = x.permute(0, 2, 3, 1).reshape(2, 16, 8) @ conv.weight.reshape(16, 8).t() + conv.bias
    assert torch.allclose(model.x_embedder(x), linear, atol=1e-6)
    assert model(x, torch.rand(2), torch.zeros(2).long()).out.shape == (2, 8, 4, 4)
    overrides = ["latent.name=binary", "objective.name=bernoulli", "sampler.sampler=ancestral", "sampler.num_steps=8",
                 "objective.bernoulli.num_timesteps=8", "data.image_size=32", "latent.binary.factor=8"]
    cfg = load_config(None, [*overrides, "model.name=DiT-S/2"])
    dit = build_model("DiT-S/2", input_size=4, in_channels=8, depth=1, hidden_size=16, num_heads=2)
    with pytest.raises(ValueError, match="learn_sigma=false"):
        BernoulliObjective.from_config(cfg, dit)
    with pytest.raises(ConfigError, match="sampler.num_steps"):
        load_config(None, [*overrides, "model.name=SiT-S/1", "sampler.num_steps=9"])
    with pytest.raises(ConfigError, match="objective 'flow'.*'binary' \\(binary\\)"):
        load_config(None, [*overrides, "model.name=SiT-S/1", "objective.name=flow", "sampler.sampler=euler"])


def test_overfits_four_codes_with_a_tiny_model():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    codes = (torch.rand((4, 8, 4, 4), generator=g) < 0.5).float()
    labels = torch.arange(4)
    model = build_model("SiT-S/1", input_size=4, in_channels=8, depth=2, hidden_size=64, num_heads=4, num_classes=4)
    obj = BernoulliObjective(num_timesteps=T, null_class=model.null_class, label_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x0, y = codes.repeat(8, 1, 1, 1), labels.repeat(8)
    for step in range(400):
        drawn = obj.draw(len(x0), x0.shape[1:], g)
        loss = obj.loss(model, x0, y, **drawn).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        drawn = obj.draw(len(x0), x0.shape[1:], g)
        out = obj.loss(model, x0, y, **{**drawn, "t": torch.ones(len(x0)).long()})
        assert float(out.logs["bit_acc"].mean()) > 0.99
        n = 16
        gens = sample_generators(1, range(n))
        samples = obj.sample(obj.model_fn(model), obj.prior((8, 4, 4), gens), labels.repeat(4), num_steps=16,
                             temperature=1.0, generator=gens)
    hits = sum(bool(torch.equal(samples[i], codes[i % 4])) for i in range(n))
    assert hits >= 0.75 * n, hits


def test_focal_and_aux_options_match_hand_computations():
    x0 = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 1, 4)
    f = torch.tensor([2.0, -1.0, 0.5, -3.0]).reshape(1, 1, 1, 4)
    noise = torch.tensor([0.1, 0.9, 0.8, 0.95]).reshape(1, 1, 1, 1, 4).expand(1, 2, 1, 1, 4)
    t = torch.tensor([8])
    y = [0.0, 0.0, 1.0, 1.0]  # flips, as in the balanced hand computation
    sig = [1 / (1 + math.exp(-v)) for v in f.reshape(-1).tolist()]
    miss = [1 - (s if yi else 1 - s) for s, yi in zip(sig, y)]
    hand = sum(m**2 * bce(fi, yi) for m, fi, yi in zip(miss, f.reshape(-1).tolist(), y)) / 4
    focal = BernoulliObjective(num_timesteps=T, loss="plain", focal_gamma=2.0, null_class=None)
    got = focal.loss(FixedLogits(f), x0, torch.zeros(1).long(), t=t, noise=noise)
    assert float(got.loss) == pytest.approx(hand, rel=1e-6)
    # aux: BCE between the model's and the true posterior of x_{t-1}, each from brute-force Bayes.
    chain = BernoulliChain(linear_keep(T))
    x_t = [1, 0, 0, 0]
    p_model = [xt * (1 - s) + (1 - xt) * s for xt, s in zip(x_t, sig)]  # P(x0 = 1) from flip logits
    q_model = [brute_force_posterior(chain, p, xt, 7, 8) for p, xt in zip(p_model, x_t)]
    q_true = [brute_force_posterior(chain, b, xt, 7, 8) for b, xt in zip([1.0, 0.0, 1.0, 1.0], x_t)]
    aux = sum(-(qt * math.log(qm) + (1 - qt) * math.log(1 - qm)) for qm, qt in zip(q_model, q_true)) / 4
    with_aux = BernoulliObjective(num_timesteps=T, loss="plain", aux_weight=0.5, null_class=None)
    got = with_aux.loss(FixedLogits(f), x0, torch.zeros(1).long(), t=t, noise=noise)
    plain = sum(bce(fi, yi) for fi, yi in zip(f.reshape(-1).tolist(), y)) / 4
    assert float(got.logs["aux"]) == pytest.approx(aux, rel=1e-5)
    assert float(got.loss) == pytest.approx(plain + 0.5 * aux, rel=1e-5)
    # At t = 1 the posterior is about x0 itself: an exact model has (clamped) zero aux loss.
    got = with_aux.loss(FixedLogits(torch.full((1, 1, 1, 4), -30.0)), x0, torch.zeros(1).long(),
                        t=torch.tensor([1]), noise=noise)
    assert torch.equal(got.x_t, x0)  # k_1 = 15/16 keeps every bit with these uniforms: "no flip" is exact
    assert float(got.logs["aux"]) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_and_training_step_run_on_cuda():
    dev = torch.device("cuda")
    model = build_model("SiT-S/1", input_size=4, in_channels=8, depth=1, hidden_size=32, num_heads=2,
                        num_classes=4).to(dev)
    obj = BernoulliObjective(num_timesteps=T, null_class=model.null_class, label_dropout=0.1, temperature=0.9)
    gens = sample_generators(0, range(3), dev)
    x = obj.sample(obj.model_fn(model), obj.prior((8, 4, 4), gens, device=dev), torch.arange(3, device=dev),
                   num_steps=4, cfg_scale=2.0, generator=gens)
    one = sample_generators(0, [2], dev)
    alone = obj.sample(obj.model_fn(model), obj.prior((8, 4, 4), one, device=dev), torch.tensor([2], device=dev),
                       num_steps=4, cfg_scale=2.0, generator=one)
    assert x.device.type == "cuda" and torch.equal(alone[0], x[2])
    drawn = obj.draw(4, (8, 4, 4), torch.Generator(dev).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = obj.loss(model, (torch.rand(4, 8, 4, 4, device=dev) < 0.5).float(), torch.arange(4, device=dev), **drawn)
    out.loss.mean().backward()
    assert bool(out.loss.isfinite().all())


def test_churches_recipe_follows_the_reference_readme():
    from helpers import REPO

    cfg = load_config(REPO / "configs" / "bld_churches256.yaml")
    o, t = cfg.objective.bernoulli, cfg.train
    assert (o.num_timesteps, o.schedule, o.prediction, o.loss, o.time_weighting, o.temperature) == (
        64, "linear", "flip", "balanced", "none", 0.9)
    assert (t.lr, tuple(t.betas), t.weight_decay, t.global_batch_size, t.max_steps) == (2e-4, (0.9, 0.95), 0.0, 256,
                                                                                         2_000_000)
    assert cfg.sampler.num_steps == 64 and cfg.latent.binary.arch(256).latent_shape == (64, 16, 16)
    assert cfg.model.name == "SiT-B/1" and cfg.model.dit.depth == 24  # 24 blocks, D 768, 12 heads


@pytest.mark.usefixtures("fresh_accelerate")
def test_sra_trains_on_bits_through_train_py(tmp_path):
    """SRA's teacher view comes from the same Bernoulli chain (teacher_view) and trains through train.py."""
    import json

    import train as train_job
    from latent_helpers import TINY_BAE, save_tiny_bae

    overrides = ["data.name=digits", "data.image_size=16", "data.num_workers=0", "cond.num_classes=10",
                 "train.global_batch_size=8", "log.tracker=none", "log.every_steps=1", "log.preview_every_steps=0",
                 "model.name=SiT-S/1", "model.dit.depth=2", "model.dit.hidden_size=16", "model.dit.num_heads=2",
                 "objective.name=bernoulli", "objective.bernoulli.num_timesteps=8", "sampler.sampler=ancestral",
                 "sampler.num_steps=4", "latent.name=binary", *TINY_BAE,
                 f"latent.binary.weights={save_tiny_bae(tmp_path / 'bae.pt')}", f"train.run_dir={tmp_path / 'r'}",
                 "train.max_steps=2", "align.methods=[sra]", "align.sra.student_layer=1", "align.sra.teacher_layer=2"]
    train_job.train(load_config(None, overrides))
    logs = [json.loads(line) for line in (tmp_path / "r" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(math.isfinite(r["sra"]) and 0.0 <= r["bit_acc"] <= 1.0 for r in logs)
