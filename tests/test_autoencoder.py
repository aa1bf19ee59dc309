"""Stage 1 of binary latents (gen/models/bae.py, gen/objectives/autoencoder.py, gen/lpips.py) and stage 2 naming
the stage-1 run: the adaptive weight against a hand computation, gradient isolation of the two networks, an overfit
of a tiny autoencoder, LPIPS loading and identities, bitwise resume of stage 1 through train.py, stage 2 reading the
run's EMA autoencoder, sample.py refusing a stage-1 run, and stage-2 samples on 1 vs 2 processes."""
import json

import numpy as np
import pytest
import torch
from helpers import run_job
from latent_helpers import TINY_BAE, save_tiny_bae
from safetensors.torch import load_file

import sample as sample_job
import train as train_job
from gen.checkpoint import CheckpointError
from gen.config import ConfigError, load_config
from gen.lpips import LPIPS, VGG_CUTS, WIDTHS
from gen.models import build_backbone
from gen.objectives import build_objective
from gen.objectives.autoencoder import adaptive_weight
from latents import build_latent

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

STAGE1 = ["model.name=BAE", "model.bae.disc_layers=1", "model.bae.disc_ndf=8", "objective.name=autoencoder",
          "objective.autoencoder.perceptual_weight=0", "objective.autoencoder.disc_start_step=1",
          "sampler.sampler=reconstruct", "latent.name=pixel", "data.name=digits", "data.image_size=8",
          "data.num_workers=0", "cond.num_classes=10", "cond.label_dropout=0", "train.global_batch_size=16",
          "train.lr=1e-3", "train.ema_decay=0.9", "train.divergence_factor=0", "log.tracker=none",
          "log.every_steps=1", "log.preview_every_steps=0", *TINY_BAE, "latent.binary.attn_resolutions=[2]"]


def stage1_parts(*extra):
    cfg = load_config(None, [*STAGE1, *extra])
    torch.manual_seed(0)
    model = build_backbone(cfg, (1, 8, 8))
    return cfg, model, build_objective(cfg, model).load_weights()


def digits_batch(n=8, size=8):
    from gen.data import DigitsDataset

    ds = DigitsDataset("train", size)
    return torch.stack([ds[i]["image"] for i in range(n)]).float() / 127.5 - 1.0


def test_adaptive_weight_equals_the_hand_computed_gradient_ratio():
    """rec = |W x - a|^2, gen = b . W x: grad_W rec = 2 (W x - a) x^T, grad_W gen = b x^T, ratio of Frobenius norms."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, requires_grad=True)
    x, a, b = torch.randn(4, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    rec, gen = (w @ x - a).pow(2).sum(), (b * (w @ x)).sum()
    r = torch.outer(2 * (w @ x - a), x).detach()
    s = torch.outer(b, x)
    expected = r.norm() / (s.norm() + 1e-4)
    assert torch.allclose(adaptive_weight(rec, gen, w, 1e6), expected, rtol=1e-6)
    assert adaptive_weight(rec, gen, w, 0.25) == min(expected.item(), 0.25)  # the clamp
    flat = (0.0 * w).sum()  # a generator loss with zero gradient: ||rec|| / 1e-4, clamped
    assert adaptive_weight(rec, flat, w, 1.0) == 1.0


def test_each_network_gets_only_its_own_loss_gradient():
    """Total loss gradient: the discriminator's equals that of its hinge loss alone, the autoencoder's that of
    rec + lam * gen alone (lam detached); before disc_start_step the discriminator's gradient is exactly zero."""
    cfg, model, objective = stage1_parts()
    x, u = digits_batch(), torch.rand(8, *model.ae.arch.latent_shape, generator=torch.Generator().manual_seed(1))
    disc, ae = list(model.disc.parameters()), list(model.ae.parameters())
    out = objective.loss(model, x, torch.zeros(8, dtype=torch.long), uniform=u, step=1)
    total = torch.autograd.grad(out.loss.sum(), disc + ae, allow_unused=True)
    # The same terms, by hand: D's hinge loss on the real images and the detached reconstruction ...
    target = model.rgb01(x)
    rec, _ = model.reconstruct(x, "bernoulli", u)
    real, fake = model.disc(target), model.disc(rec.detach())
    d_loss = 0.5 * (torch.relu(1 - real).flatten(1).mean(1) + torch.relu(1 + fake).flatten(1).mean(1))
    for got, want in zip(total[:len(disc)], torch.autograd.grad(d_loss.sum(), disc)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # ... and the autoencoder's: L1 + lam * (-mean D(x^)), D called normally (its gradient is simply not taken).
    l1 = (target - rec).abs().flatten(1).mean(1)
    gen = -model.disc(rec).flatten(1).mean(1)
    lam = out.logs["gan_weight"][0]
    torch.testing.assert_close(out.logs["gan_gen"], gen.detach())
    for got, want in zip(total[len(disc):], torch.autograd.grad((l1 + lam * gen).sum(), ae)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    before = objective.loss(model, x, torch.zeros(8, dtype=torch.long), uniform=u, step=0)
    assert "gan_gen" not in before.logs
    assert all(torch.count_nonzero(gr) == 0 for gr in torch.autograd.grad(before.loss.sum(), disc))


def test_tiny_autoencoder_overfits_a_batch():
    """8 digits, L1 with Bernoulli bits through the straight-through estimator: L1 falls by at least half."""
    _, model, objective = stage1_parts("objective.autoencoder.disc_start_step=null", "model.bae.disc_layers=0",
                                       "latent.binary.bit_channels=16")
    x = digits_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(150):
        u = torch.rand(8, *model.ae.arch.latent_shape, generator=g)
        loss = objective.loss(model, x, torch.zeros(8, dtype=torch.long), uniform=u, step=step).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:3]), losses[::15]
    with torch.no_grad():  # the thresholded reconstruction (what previews and stage 2 decode) is as good
        assert (model.rgb01(x) - (model(x, None, None).out + 1) / 2).abs().mean() < 0.5 * losses[0]


def test_lpips_loads_official_key_names_and_is_a_distance(tmp_path):
    """torchvision's vgg16 `features.*` (+ classifier, ignored) and lpips' `lin{k}.model.1.weight`; d(x, x) = 0,
    symmetric, positive for different images; a missing file names the file, where it is published and the key."""
    torch.manual_seed(0)
    vgg = {f"features.{name}": torch.randn_like(p) * 0.1 for name, p in LPIPS().features.state_dict().items()}
    assert sorted({int(k.split(".")[1]) for k in vgg})[-1] == VGG_CUTS[-1] - 2  # conv5_3 is torchvision's index 28
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1) for k, w in enumerate(WIDTHS)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    net = LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    assert torch.equal(net.lins[2].weight, lin["lin2.model.1.weight"])
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(net(x, x), torch.zeros(2))
    torch.testing.assert_close(net(x, y), net(y, x))
    assert (net(x, y) > 0).all()
    with pytest.raises(FileNotFoundError, match="objective.autoencoder.lpips_lin.*PerceptualSimilarity"):
        LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "missing.pth"))


def test_stage1_resumes_bitwise_and_stage2_reads_its_ema_autoencoder(tmp_path):
    """train.py: 2 steps straight == 1 + resumed 1 (GAN on from step 1: adaptive weight, BatchNorm buffers, EMA);
    a stage-2 config naming the run (or its checkpoint) decodes with the EMA `ae.*` weights; sample.py refuses the
    stage-1 run; a run folder without a checkpoint is refused in one line."""
    def cfg(run, steps):
        return load_config(None, [*STAGE1, f"train.run_dir={tmp_path / run}", f"train.max_steps={steps}",
                                  "train.ckpt_every_steps=1"])

    straight = train_job.train(cfg("a", 2))
    train_job.train(cfg("b", 1))
    resumed = train_job.train(cfg("b", 2), resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(x) for x in (tmp_path / "a" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert "gan_weight" not in logs[0] and 0 <= logs[1]["gan_weight"] <= 1
    ema = load_file(str(straight / "ema.safetensors"))
    stage2 = ["latent.name=binary", "objective.name=bernoulli", "objective.bernoulli.num_timesteps=8",
              "sampler.sampler=ancestral", "sampler.num_steps=4", "model.name=SiT-S/1", "data.image_size=8",
              *TINY_BAE, "latent.binary.attn_resolutions=[2]"]
    for weights in (tmp_path / "a", straight):
        latent = build_latent(load_config(None, [*stage2, f"latent.binary.weights={weights}"])).load_weights()
        assert all(torch.equal(v, ema[f"ae.{k}"]) for k, v in latent._net.state_dict().items())
    with pytest.raises(CheckpointError, match="stage-1 run"):
        sample_job.run(str(tmp_path / "a"), [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint.*train stage 1"):
        build_latent(load_config(None, [*stage2, f"latent.binary.weights={tmp_path / 'empty'}"])).load_weights()


def test_stage1_config_mistakes_are_refused_in_one_line():
    """A GAN without a discriminator, a discriminator without a GAN, a non-pixel latent, the divergence guard."""
    for extra, key in ((["model.bae.disc_layers=0"], "model.bae.disc_layers"),
                       (["objective.autoencoder.disc_start_step=null"], "model.bae.disc_layers"),
                       (["train.divergence_factor=100"], "train.divergence_factor"),
                       (["model.name=SiT-S/2"], "model.name"),
                       (["objective.name=flow", "sampler.sampler=euler"], "objective.name")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [*STAGE1, *extra])


@pytest.mark.slow  # two sample.py launches, ~40 s on a busy 2-core machine
def test_stage2_samples_are_the_same_on_one_and_two_processes(tmp_path):
    """sample.py on a Bernoulli-diffusion run over binary latents draws the same bits, hence images and labels, on 1
    and 2 processes (training on 1 vs 2 processes: tests/jobs/test_train.py, bernoulli-binary)."""
    weights = save_tiny_bae(tmp_path / "bae.pt", image_size=8)
    train_job.train(load_config(None, [
        "latent.name=binary", f"latent.binary.weights={weights}", *TINY_BAE,
        "objective.name=bernoulli", "objective.bernoulli.num_timesteps=8", "sampler.sampler=ancestral",
        "sampler.num_steps=4", "sampler.cfg_scale=2", "model.name=SiT-S/1", "model.dit.depth=2",
        "model.dit.hidden_size=32", "model.dit.num_heads=2", "data.name=digits", "data.image_size=8",
        "data.num_workers=0", "cond.num_classes=10", "train.global_batch_size=16", "train.max_steps=2",
        "log.tracker=none", "log.preview_every_steps=0", f"train.run_dir={tmp_path / 'run'}"]))
    samples = {}
    for processes in (1, 2):
        out = tmp_path / f"s{processes}.npz"
        result = run_job("sample.py", [tmp_path / "run", "sample.num_samples=6", "sample.batch_per_process=2",
                                       "sample.grid_num=4", f"sample.out={out}"], processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        samples[processes] = np.load(out)
    assert np.array_equal(samples[1]["arr_0"], samples[2]["arr_0"])
    assert np.array_equal(samples[1]["arr_1"], samples[2]["arr_1"])
