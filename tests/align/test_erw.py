"""ERW: warmup loss formula, what the warmup trains, the transition, the lambda schedule, resume and 2 processes."""
import json

import pytest
import torch
from accelerate import Accelerator
from helpers import REPO, randomize, run_job
from safetensors.torch import load_file

import train as train_job
from align import ALIGNERS, ERW, AlignBatch
from align.erw import DEFAULT_COEFF, DEFAULT_ERW_DEPTH
from gen.checkpoint import latest_checkpoint
from gen.cond import Cond
from gen.config import ConfigError, load_config
from gen.ema import EMA
from gen.models import build_backbone, build_model, model_size
from gen.objectives import FlowObjective, build_objective
from gen.step import StepDraws, Trainee

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

N, C, INPUT, D, CLASSES = 3, 4, 8, 32, 10  # tiny SiT: 4 blocks, 4 x 4 = 16 tokens
T = (INPUT // 2) ** 2
WARM = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.0.", "blocks.1.")  # warm_depth 2


def tiny_erw(reuse=True, warmup_steps=5):
    model = randomize(build_model("SiT-S/2", depth=4, hidden_size=D, num_heads=2, input_size=INPUT,
                                  num_classes=CLASSES), 0)
    erw = ERW(D, {"a": 24}, 3, warm_depth=2, warmup_steps=warmup_steps, projector_dim=64, reuse_projector=reuse)
    return model, erw


def uniform_only(n=N, **objective):
    """A step's draws with only the aligners' uniforms (and any objective draws given); the rest from torch's RNG."""
    return StepDraws(objective=objective, latent={}, uniform=torch.rand(n))


def pinned(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, C, INPUT, INPUT, generator=g), torch.randint(0, CLASSES, (N,), generator=g),
            torch.randn(N, T, 24, generator=g))


def test_warmup_loss_equals_formula():
    """0.5 * -(1/T) sum_i cos(P(h_2)_i, z_i), h_2 = two blocks run by hand on the clean x0 with t = 0."""
    model, erw = tiny_erw()
    x0, y, z = pinned()
    batch = AlignBatch(x0=x0, x_t=x0, t=torch.zeros(N), noise=torch.zeros_like(x0), cond=Cond(y), step=0,
                       target_feats={"a": z})
    loss = erw.warmup_loss(model, batch)["loss"]
    with torch.no_grad():
        h = model.x_embedder(x0) + model.pos_embed
        c = model.t_embedder(torch.zeros(N)) + model.y_embedder(y)
        for block in model.blocks[:2]:
            h = block(h, c)
        z_hat = erw.projectors[0](h).double()
    cos = (z_hat * z.double()).sum(-1) / (z_hat.norm(dim=-1) * z.double().norm(dim=-1))  # (N, T)
    torch.testing.assert_close(loss.double(), 0.5 * -cos.mean(-1), rtol=1e-5, atol=1e-6)


def test_warmup_phase_trains_embedders_first_blocks_and_projector_only():
    model, erw = tiny_erw()
    trainee = Trainee(model, FlowObjective(label_dropout=0.1, null_class=model.null_class), {"erw": erw})
    assert trainee.phase_at(4) == "warmup" and trainee.phase_at(5) == "full"
    trainee.set_phase("warmup")
    x0, y, z = pinned()
    drop = torch.tensor([True, False, False])
    loss, logs = trainee(x0, Cond(y), 0, uniform_only(drop=drop), target_feats={"a": z})
    loss.mean().backward()
    assert set(logs) == {"erw/warmup", "erw/warmup/cos/a"}
    for name, p in trainee.named_parameters():
        warm = name.startswith("aligners.erw.") or name.removeprefix("model.").startswith(WARM)
        assert p.requires_grad == (warm and name != "model.pos_embed"), name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name
    # the label of sample 0 was dropped: the null class reached the embedder
    assert model.y_embedder.embedding_table.weight.grad[model.null_class].abs().sum() > 0
    trainee.set_phase("full")
    assert all(p.requires_grad for n, p in trainee.named_parameters() if n != "model.pos_embed")


@pytest.mark.parametrize("reuse", [True, False])
def test_transition_keeps_warm_weights_fresh_rest_resets_optimizer_and_ema(reuse):
    """After the transition: the warmed blocks are the phase-1 weights, the rest the fresh init, the EMA equals the
    model, the optimizer is new and covers everything; the projector is kept or re-drawn."""
    torch.manual_seed(0)
    model = build_model("SiT-S/2", depth=4, hidden_size=D, num_heads=2, input_size=INPUT, num_classes=CLASSES)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _, erw = tiny_erw(reuse)
    trainee = Trainee(model, FlowObjective(null_class=model.null_class), {"erw": erw})
    ema = EMA(model, 0.9)
    accelerator = Accelerator(cpu=True)
    wrapped, opt = train_job.prepare_step(accelerator, trainee, "warmup", 0, load_config(None, ["train.lr=1e-2"]))
    for step in range(3):
        x0, y, z = pinned(step)
        wrapped(x0, Cond(y), step, uniform_only(), target_feats={"a": z})[0].mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    warm = {k: v.clone() for k, v in model.state_dict().items()}
    projector = {k: v.clone() for k, v in erw.state_dict().items()}
    erw.end_warmup(torch.Generator().manual_seed(0))
    wrapped, opt = train_job.prepare_step(accelerator, wrapped, "full", 5, load_config(None))
    ema.reset(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, warm[k])
        changed = not torch.equal(v, init[k])
        assert changed == k.startswith(WARM), k  # warmed parts moved, the rest is exactly the initialisation
    assert all(torch.equal(a, b) for a, b in zip(ema.model.state_dict().values(), model.state_dict().values()))
    assert not opt.state and sum(len(g["params"]) for g in opt.param_groups) == sum(
        p.requires_grad for p in trainee.parameters())
    assert all(torch.equal(v, projector[k]) == reuse for k, v in erw.state_dict().items() if k.endswith("weight"))


def test_lambda_schedule_and_defaults():
    cfg = load_config(None, ["model.name=SiT-XL/2", "align.methods=[erw]", "align.erw.warmup_steps=100000",
                             "train.max_steps=300000"])
    model = build_model("SiT-XL/2", depth=15, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
    erw = ALIGNERS["erw"].from_config(cfg, model, build_objective(cfg, model), cached_targets={"dinov2-vit-b"})
    assert (erw.depth, erw.taps, erw.warm_depth, erw.warmup_steps) == (14, (14,), 4, 100_000)
    for k in (100_000, 150_000, 200_000, 123_457, 300_000):  # lambda(k) = c0 2^(-(k - W) / H), c0 = 6 for XL
        assert erw.weight(k) == pytest.approx(6.0 * 2 ** (-(k - 100_000) / 50_000), rel=1e-12)
    assert erw.weight(150_000) == pytest.approx(3.0) and erw.projectors[0][-1].out_features == 768
    assert [DEFAULT_COEFF[model_size(f"SiT-{s}/2")] for s in ("S", "B", "L", "XL")] == [1.0, 1.0, 3.0, 6.0]
    assert [DEFAULT_ERW_DEPTH[model_size(m)] for m in ("SiT-B/2", "SiT-L/2", "SiT-XL/2", "DiT-XL/2")] == [4, 8, 14, 14]


def test_config_validation():
    with pytest.raises(ConfigError, match=r"align.methods.*erw cannot train together with \['repa'\]"):
        load_config(None, ["align.methods=[repa,erw]"])
    with pytest.raises(ConfigError, match="align.erw.warmup_steps"):
        load_config(None, ["align.methods=[erw]", "train.max_steps=1000", "align.erw.warmup_steps=1001"])
    with pytest.raises(ConfigError, match="align.erw.warm_depth"):
        load_config(None, ["model.name=SiT-B/2", "align.methods=[erw]", "align.erw.warm_depth=13",
                           "align.erw.warmup_steps=10"])
    with pytest.raises(ConfigError, match="align.erw.half_life_steps"):
        load_config(None, ["align.methods=[erw]", "align.erw.half_life_steps=0", "align.erw.warmup_steps=10"])


def erw_args(assets, run_dir, *extra):
    vae, images, encoder = assets
    return ["configs/quickstart.yaml", "model.name=SiT-S/2", "model.dit.depth=3", "model.dit.hidden_size=32",
            "model.dit.num_heads=2", "cond.num_classes=2", "data.name=image_folder", f"data.path={images}",
            "data.image_size=32", "latent.name=sd-vae", f"latent.sd_vae.vae_path={vae}", "train.global_batch_size=8",
            "log.tracker=none", "log.preview_every_steps=0", "log.every_steps=1", "data.num_workers=0",
            f"train.run_dir={run_dir}", "align.methods=[erw]", "align.erw.encoders=[dinov2-vit-s]",
            f"align.encoder_weights={{dinov2-vit-s: {encoder}}}", "align.erw.warmup_steps=2",
            "align.erw.warm_depth=1", "align.erw.depth=2", "align.erw.coeff=1.0", "align.erw.half_life_steps=2",
            "train.ckpt_every_steps=2", *extra]


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "logs" / "scalars.jsonl").read_text().splitlines()]


def test_one_command_runs_both_phases_and_resume_across_the_transition_is_exact(tmp_path, assets):
    def cfg(run, steps):
        return load_config(REPO / erw_args(assets, run)[0], [*erw_args(assets, run)[1:], f"train.max_steps={steps}"])

    straight = train_job.train(cfg(tmp_path / "a", 4))
    at_transition = train_job.train(cfg(tmp_path / "b", 2))
    # The checkpoint at W = 2 holds phase 1: non-warm blocks and the output layer are still the initialisation.
    torch.manual_seed(0)
    init = build_backbone(cfg(tmp_path / "c", 2), (4, 4, 4)).state_dict()
    state = load_file(str(at_transition / "model.safetensors"))
    for k, v in init.items():
        warm = k.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "blocks.0."))
        assert torch.equal(state[f"model.{k}"], v) != warm, k
    resumed = train_job.train(cfg(tmp_path / "b", 4), resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    back = load_config(REPO / erw_args(assets, tmp_path / "b")[0],
                       [*erw_args(assets, tmp_path / "b")[1:], "train.max_steps=8", "align.erw.warmup_steps=6"])
    with pytest.raises(ConfigError, match="past the warmup"):  # a full-phase checkpoint cannot go back to warmup
        train_job.train(back, resume=True)
    logs = records(tmp_path / "a")
    assert [("erw/warmup" in r, "denoise" in r) for r in logs] == [(True, False)] * 2 + [(False, True)] * 2
    for r in logs[2:]:  # lambda(k) = 2^(-(k - 2) / 2) at the step k computed (record "step" = k + 1)
        assert r["loss"] == pytest.approx(r["denoise"] + 2 ** (-(r["step"] - 1 - 2) / 2) * r["erw"], rel=1e-5)
    ratio = logs[0]["full_step_equivalents"]
    assert 0 < ratio < 1 and [r["full_step_equivalents"] for r in logs] == pytest.approx(
        [ratio, 2 * ratio, 2 * ratio + 1, 2 * ratio + 2])


def test_two_processes_match_one_across_the_transition(tmp_path, assets):
    """DDP is re-created at the transition with the newly trainable parameters: 1 and 2 processes still agree."""
    runs = {}
    for processes in (1, 2):
        run = tmp_path / f"p{processes}"
        result = run_job("train.py", erw_args(assets, run, "train.max_steps=4"), processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = run
    loss = {p: [r["loss"] for r in records(run)] for p, run in runs.items()}
    torch.testing.assert_close(torch.tensor(loss[1]), torch.tensor(loss[2]), rtol=1e-5, atol=1e-6)
    w1, w2 = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in runs.values())
    for k in w1:  # Adam turns reduction-order noise in near-zero gradients into steps of up to ~lr: atol 1e-5
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_nt_xent_warmup_loss_equals_its_definition():
    """Token InfoNCE: per token, -log of sample n's softmax weight on its own target among the batch's targets."""
    model, _ = tiny_erw()
    erw = ERW(D, {"a": 24}, 3, warm_depth=2, warmup_steps=5, projector_dim=64, warmup_loss="nt_xent", temperature=0.2)
    x0, y, z = pinned()
    batch = AlignBatch(x0=x0, x_t=x0, t=torch.zeros(N), noise=torch.zeros_like(x0), cond=Cond(y), step=0,
                       target_feats={"a": z})
    out = erw.warmup_loss(model, batch)
    with torch.no_grad():
        h = model(x0, torch.zeros(N), y, taps=(2,), stop_at=2).feats[2]
        p = erw.projectors[0](h).double()
    expected = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        for i in range(T):
            sims = torch.stack([torch.cosine_similarity(p[n, i], z[m, i].double(), dim=0) for m in range(N)]) / 0.2
            expected[n] += -(sims[n] - torch.logsumexp(sims, 0)) / T
    torch.testing.assert_close(out["loss"].double(), 0.5 * expected, rtol=1e-5, atol=1e-6)
    cos = torch.cosine_similarity(p, z.double(), dim=-1).mean()
    torch.testing.assert_close(out["cos/a"].double(), cos, rtol=1e-5, atol=1e-6)  # the log stays the cosine
    with pytest.raises(ConfigError, match="align.erw.warmup_loss"):
        load_config(None, ["align.methods=[erw]", "align.erw.warmup_steps=10", "align.erw.warmup_loss=infonce"])


def test_erw_on_dit_with_ddpm_runs_both_phases(tmp_path, assets):
    """The warmup feeds DDPM's step 0 (the objective's t = 0); afterwards DiT's hybrid loss plus REPA."""
    args = erw_args(assets, tmp_path / "run", "train.max_steps=3", "model.name=DiT-S/2", "objective.name=ddpm",
                    "sampler.sampler=ddim", "align.erw.warmup_steps=1")
    ckpt = train_job.train(load_config(REPO / args[0], args[1:]))
    logs = records(tmp_path / "run")
    assert [("erw/warmup" in r, "erw" in r and "denoise" in r) for r in logs] == [(True, False)] + [(False, True)] * 2
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "ema.safetensors")).values())


@pytest.mark.parametrize("reuse", [True, False])
def test_train_redraws_the_projector_at_the_transition_unless_reused(tmp_path, assets, reuse):
    """One Adam step after the transition moves each weight by at most lr (1e-3): from the warm projector, or from
    a fresh xavier draw of the generator seeded with train.seed."""
    args = erw_args(assets, tmp_path / "run", "train.max_steps=3", f"align.erw.reuse_projector={str(reuse).lower()}")
    train_job.train(load_config(REPO / args[0], args[1:]))
    warm, after = (load_file(str(tmp_path / "run" / "checkpoints" / f"step-0000000{k}" / "model.safetensors"))
                   for k in (2, 3))
    g = torch.Generator().manual_seed(0)
    for layer in (0, 2, 4):
        key = f"aligners.erw.projectors.0.{layer}.weight"
        start = warm[key] if reuse else torch.nn.init.xavier_uniform_(torch.empty(warm[key].shape), generator=g)
        assert (after[key] - start).abs().max() <= 1e-3 * 1.01, key
        assert reuse or (after[key] - warm[key]).abs().max() > 1e-2, key
